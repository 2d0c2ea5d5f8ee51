"""``python -m benchmarks.eval --url http://127.0.0.1:PORT --tasks ... --lengths ... --samples N --out FILE``

Runs the RULER-style tasks against a running SGLang server (plain SGLang or ``sglang_sparse.launch_server``)
through the frontend language, writes a JSON file (meta, rows, per-sample records) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .harness import PROMPT_FORMATS, format_table, merge_rows, run_eval
from .haystack import HAYSTACKS
from .tasks import DEFAULT_LENGTHS, TASKS


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.eval", description=__doc__.split("\n\n")[1])
    ap.add_argument("--url", required=True, help="server address, e.g. http://127.0.0.1:30000")
    ap.add_argument("--tasks", type=_csv(str), default=list(TASKS), help=f"comma list from {','.join(TASKS)}")
    ap.add_argument("--lengths", type=_csv(int), default=list(DEFAULT_LENGTHS), help="comma list of token lengths")
    ap.add_argument("--samples", type=int, default=20, help="samples per (task, length)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--depths", type=_csv(float), default=None,
                    help="needle depths cycled over the samples (default 0,0.25,0.5,0.75,1)")
    ap.add_argument("--haystack", choices=HAYSTACKS, default="essays")
    ap.add_argument("--tokenizer", default=None, help="tokenizer path (default: the server's model path)")
    ap.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                    help="chat roles (sgl.user / sgl.assistant) or plain text; auto = chat if the model has a "
                         "chat template")
    ap.add_argument("--chat-template", default=None, help="frontend chat template name (e.g. chatml)")
    ap.add_argument("--system-prompt", default=None)
    ap.add_argument("--num-threads", type=int, default=16, help="concurrent requests")
    ap.add_argument("--config", default="unnamed", help="label of the server setting (dense, claa-0.2, ...)")
    ap.add_argument("--where", default="sglang-gpu", help="label of where it ran")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for this run")
    ap.add_argument("--append-to", type=Path, default=None,
                    help="also merge the rows into this combined file (e.g. benchmarks/results/quality_smollm2.json)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    bad = [t for t in args.tasks if t not in TASKS]
    if bad:
        ap.error(f"unknown tasks {bad}; choose from {TASKS}")
    result = run_eval(args.url, args.tasks, args.lengths, args.samples, seed=args.seed,
                      tokenizer_path=args.tokenizer, prompt_format=args.prompt_format,
                      chat_template=args.chat_template, system_prompt=args.system_prompt,
                      haystack=args.haystack, depths=args.depths, num_threads=args.num_threads,
                      config=args.config, where=args.where, progress=not args.no_progress)
    print(format_table(result["rows"]))
    errors = sum(r["errors"] for r in result["rows"])
    if errors:
        print(f"[eval] {errors} requests failed (counted as wrong); see 'error' in the records", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"[eval] wrote {args.out}", file=sys.stderr)
    if args.append_to:
        merge_rows(args.append_to, result["rows"], f"{args.where}/{args.config}", result["meta"])
        print(f"[eval] merged {len(result['rows'])} rows into {args.append_to}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
