"""CLAA's Answer-Informed Oracle report on SmolLM2-135M-Instruct (CPU): per-layer ranking quality of
CLAA's cross-layer aggregation against single-layer heuristics, on RULER-style samples.

    python -m benchmarks.oracle_smollm2 [--tasks single_needle,multi_key] [--lengths 1024,2048,4096] [--samples 6]

Builds the model if needed (``benchmarks.models.smollm2``), renders each task sample exactly as the
frontend-language harness sends it (ChatML, answer prefix included), takes the planted answer as the
reference answer, and runs ``python -m benchmarks.oracle`` on it. Output (table, JSON, PNG) goes to
``benchmarks/results/oracle_smollm2/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.models.smollm2 import DEFAULT_OUT, ensure_smollm2  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--tasks", default="single_needle,multi_key")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--samples", type=int, default=6, help="samples per (task, length)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--haystack", default="essays")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "oracle_smollm2")
    args = ap.parse_args(argv)

    from benchmarks import oracle
    from benchmarks.eval import tasks as T
    from benchmarks.eval.harness import PromptFormat, render_prompt, template_overhead
    from transformers import AutoTokenizer

    model_dir = ensure_smollm2(args.model, args.gguf)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    fmt = PromptFormat("chat", "chatml")
    count = T.token_counter(tok)
    reserve = template_overhead(fmt, count)
    rows = []
    for task in args.tasks.split(","):
        for length in [int(x) for x in args.lengths.split(",")]:
            for i in range(args.samples):
                s = T.make_sample(task, length, i, tok, seed=args.seed, haystack=args.haystack, reserve=reserve)
                # the reference answer: the planted value(s), as the model is asked to continue the prefix
                rows.append({"prompt": render_prompt(s, fmt), "answer": " " + ", ".join(s.answers) + ".",
                             "id": f"{task}/{length}/{i}"})
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "samples.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        rc = oracle.main(["--model-path", str(model_dir), "--data", str(data), "--out", str(args.out),
                          "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "16"])
    report = args.out / "ranking_quality.json"
    if report.exists():                      # machine-local paths out of the committed report
        d = json.loads(report.read_text())
        d.setdefault("meta", {}).update(model_path="SmolLM2-135M-Instruct (benchmarks/models/smollm2.py)",
                                        data="RULER-style samples made by benchmarks/oracle_smollm2.py")
        report.write_text(json.dumps(d, indent=1) + "\n")
    (args.out / "command.txt").write_text(
        "python -m benchmarks.oracle_smollm2 " + " ".join(argv if argv is not None else sys.argv[1:]) + "\n"
        + f"{len(rows)} samples: tasks {args.tasks}, lengths {args.lengths}, {args.samples} each, seed {args.seed}, "
          f"haystack {args.haystack}; reference answer = the planted value(s)\n")
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
