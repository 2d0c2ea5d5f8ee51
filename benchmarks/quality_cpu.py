"""Algorithm-level quality of CLAA, PrHS and ART on SmolLM2-135M-Instruct, on the CPU (reference math).

Converts SmolLM2 if needed (benchmarks/models/smollm2.py), builds the RULER-style samples with the same prompt text
the SGLang harness sends (chat format, chatml), and generates greedily with every setting through
:class:`benchmarks.eval.cpu_reference.ReferenceLlama`. Rows (config, task, length, accuracy, samples,
where="cpu-reference") go into benchmarks/results/quality_smollm2.json (merged with any GPU rows already there),
per-sample records into benchmarks/results/quality_smollm2_cpu_records.json, and the plot into
benchmarks/results/quality_smollm2.png.

Two phases:
  1. dense only, on --dense-tasks (default: all five), --dense-samples per cell: which tasks dense solves;
  2. every setting, on --tasks (default single_needle, multi_key), --samples per cell.
Samples go round-robin (sample 0 of every task and length, then sample 1, ...), so a run cut by --time-budget-min
leaves balanced cells; the JSON states how many samples each cell has. Results are written after every round.

    python benchmarks/quality_cpu.py --samples 10 --time-budget-min 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.models.smollm2 import DEFAULT_OUT, ensure_smollm2  # noqa: E402
from benchmarks.quality_plot import DEFAULT_JSON, DEFAULT_PNG, plot  # noqa: E402
from sglang_sparse.config import ArtConfig, ClaaConfig, PrhsConfig  # noqa: E402
from benchmarks.eval import tasks as T  # noqa: E402
from benchmarks.eval.cpu_reference import RefConfig  # noqa: E402
from benchmarks.eval.harness import (PromptFormat, claa_kept_fraction, merge_rows, render_prompt,  # noqa: E402
                                        template_overhead)

RECORDS = DEFAULT_JSON.parent / "quality_smollm2_cpu_records.json"
WHERE = "cpu-reference"


def settings() -> List[RefConfig]:
    """The settings measured. Length floors are 0 so that every setting acts at every length (the server's
    defaults are --claa-min-prompt-len 2048 and --prhs-min-context-len 4096: pass 16 and 0 there for the same
    rows; the CLAA floor must exceed its window)."""
    claa = lambda r, f=None: ClaaConfig(mode="claa", keep_ratio=r, min_prompt_len=0, filter_layer=f)  # noqa: E731
    prhs = lambda d, b: PrhsConfig(mode="prhs", delta=d, budget=b, min_context_len=0, select="bounds")  # noqa: E731
    art = ArtConfig(mode="on", tau_mag=0.01, tau_dir=1e-4)     # the former default thresholds
    return [
        RefConfig("dense"),
        RefConfig("claa-keep0.1", claa=claa(0.1)),
        RefConfig("claa-keep0.2", claa=claa(0.2)),
        RefConfig("claa-keep0.4", claa=claa(0.4)),
        RefConfig("claa-keep0.8", claa=claa(0.8)),
        # CLAA filtering later than the default layer 14 of SmolLM2's 30: from layer 20 on, the window
        # scores keep the needle's digit tokens, at the price of a lower TTFT ceiling
        RefConfig("claa-keep0.1-F18", claa=claa(0.1, 18)),
        RefConfig("claa-keep0.1-F20", claa=claa(0.1, 20)),
        RefConfig("claa-keep0.1-F22", claa=claa(0.1, 22)),
        RefConfig("claa-keep0.1-F24", claa=claa(0.1, 24)),
        RefConfig("claa-keep0.2-F24", claa=claa(0.2, 24)),
        RefConfig("claa-keep0.4-F24", claa=claa(0.4, 24)),
        RefConfig("prhs-d0.05-b1/16", prhs=prhs(0.05, 1 / 16)),
        RefConfig("prhs-d0.01-b1/16", prhs=prhs(0.01, 1 / 16)),
        RefConfig("prhs-d0.05-b1/4", prhs=prhs(0.05, 1 / 4)),
        # the same budget over 16-token pages (Quest's page size): twice as many, finer pages
        RefConfig("prhs-d0.05-b1/16-P16", prhs=PrhsConfig(mode="prhs", delta=0.05, budget=1 / 16, min_context_len=0,
                                                         page_size=16, select="bounds")),
        # the server's PrHS default now: pages ranked by their estimated mass, delta 0.1, every page allowed
        RefConfig("prhs-est-d0.1", prhs=PrhsConfig(mode="prhs", delta=0.1, budget=1.0, min_context_len=0,
                                                  select="estimate")),
        RefConfig("art-tau0.01", art=art),
        # ART with tighter convergence thresholds, and ART's certified rule alone (no convergence stop)
        RefConfig("art-tau0.001", art=ArtConfig(mode="on", tau_mag=1e-3, tau_dir=1e-6)),
        RefConfig("art-tau0.0001", art=ArtConfig(mode="on", tau_mag=1e-4, tau_dir=1e-8)),
        RefConfig("art-cert0.05", art=ArtConfig(mode="on", tau_mag=0.0, tau_dir=0.0, eps_cert=0.05)),
        RefConfig("all(claa0.2+prhs+art-tau0.01)", claa=claa(0.2), prhs=prhs(0.05, 1 / 16), art=art),
        # the same with ART's current default thresholds (the served "all" setting of quality_gpu.py)
        RefConfig("all(claa0.2+prhs+art-tau0.001)", claa=claa(0.2), prhs=prhs(0.05, 1 / 16),
                  art=ArtConfig(mode="on", tau_mag=1e-3, tau_dir=1e-6)),
    ]


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x.strip()]


def log(t0: float, msg: str) -> None:
    print(f"[quality_cpu {time.time() - t0:7.1f}s] {msg}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT, help="converted checkpoint (made if missing)")
    ap.add_argument("--gguf", type=Path, default=None, help="convert this GGUF instead of downloading")
    ap.add_argument("--tasks", type=_csv(str), default=["single_needle", "multi_key"])
    ap.add_argument("--dense-tasks", type=_csv(str), default=list(T.TASKS))
    ap.add_argument("--lengths", type=_csv(int), default=list(T.DEFAULT_LENGTHS))
    ap.add_argument("--samples", type=int, default=10, help="samples per cell, every setting (phase 2)")
    ap.add_argument("--dense-samples", type=int, default=3, help="samples per cell, dense only (phase 1; 0 = skip)")
    ap.add_argument("--configs", type=_csv(str), default=None, help="subset of setting names")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--haystack", default="essays")
    ap.add_argument("--time-budget-min", type=float, default=40.0,
                    help="no new round starts when it would end after this many minutes")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--records", type=Path, default=RECORDS)
    ap.add_argument("--png", type=Path, default=DEFAULT_PNG)
    args = ap.parse_args(argv)

    import torch

    from benchmarks.eval.cpu_reference import ReferenceLlama

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    deadline = t0 + 60 * args.time_budget_min
    model_dir = ensure_smollm2(args.model, args.gguf)
    model = ReferenceLlama(str(model_dir))
    tok = model.tokenizer
    fmt = PromptFormat("chat", "chatml")
    count = T.token_counter(tok)
    reserve = template_overhead(fmt, count)
    all_settings = settings()
    if args.configs:
        names = set(args.configs)
        all_settings = [c for c in all_settings if c.name in names]
    dense = [c for c in all_settings if c.name == "dense"] or [RefConfig("dense")]
    log(t0, f"model {model_dir} ({model.num_layers} layers, {model.h_q}/{model.h_kv} heads), torch threads "
            f"{torch.get_num_threads()}, prompt format {fmt.describe()} (+{reserve} tokens); settings: "
            f"{[c.name for c in all_settings]}")

    records: List[Dict] = []
    dense_only = [t for t in args.dense_tasks if t not in args.tasks]   # sweep tasks get dense rows anyway

    def run_sample(task: str, length: int, index: int, configs: List[RefConfig], phase: str) -> None:
        s = T.make_sample(task, length, index, tok, seed=args.seed, haystack=args.haystack, reserve=reserve)
        ids = tok(render_prompt(s, fmt))["input_ids"]
        t1 = time.time()
        res = model.generate_many(ids, configs, s.max_new_tokens, stop=lambda o: T.score_is_final(s, o))
        line = []
        for c in configs:
            r = res[c.name]
            sc = T.score(s, r.text)
            records.append({"phase": phase, "config": c.name, "id": s.sample_id, "task": task, "length": length,
                            "index": index, "depth": s.depth, "prompt_tokens": len(ids), "answers": s.answers,
                            "output": r.text, "score": sc, **r.stats})
            line.append(f"{c.name}={sc}")
        log(t0, f"{phase} {task} {length} #{index} ({len(ids)} tok, {time.time() - t1:.1f}s): {' '.join(line)}")

    def rows_for(phase: str) -> List[Dict]:
        from collections import defaultdict

        g = defaultdict(list)
        for r in records:
            if r["phase"] == phase:
                g[(r["config"], r["task"], r["length"])].append(r)
        out = []
        for (c, task, length), rs in sorted(g.items()):
            row = {"config": c, "task": task, "length": length, "accuracy": sum(r["score"] for r in rs) / len(rs),
                   "correct": sum(r["score"] for r in rs), "samples": len(rs), "where": WHERE}
            fr = [r["decode_read_fraction"] for r in rs if "decode_read_fraction" in r]
            if fr:
                row["decode_read_fraction"] = round(sum(fr) / len(fr), 4)
            kept = claa_kept_fraction(rs)
            if kept is not None:
                row["claa_kept_fraction"] = kept
            out.append(row)
        return out

    def save(final: bool = False) -> None:
        # phase-2 rows win over phase-1 rows of the same (config, task, length)
        p2 = rows_for("sweep")
        have = {(r["config"], r["task"], r["length"]) for r in p2}
        rows = [r for r in rows_for("dense") if (r["config"], r["task"], r["length"]) not in have] + p2
        meta = {
            "what": "reference math of CLAA / PrHS / ART inside a transformers forward of SmolLM2-135M-Instruct "
                    "(bf16 linear layers, float32 attention), greedy, exact match",
            "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
            "model": str(model_dir), "prompt_format": fmt.describe(), "template_tokens": reserve,
            "haystack": args.haystack, "seed": args.seed, "lengths": args.lengths,
            "dense_tasks": args.dense_tasks, "dense_samples_requested": args.dense_samples,
            "sweep_tasks": args.tasks, "sweep_samples_requested": args.samples,
            "settings": {c.name: c.describe() for c in all_settings},
            "elapsed_s": round(time.time() - t0, 1), "complete": final,
            "host": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__} "
                    f"({torch.get_num_threads()} threads)",
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        run_key = f"{WHERE}/" + "+".join(sorted(set(args.tasks) | set(dense_only)))
        merge_rows(args.json, rows, run_key, meta)          # replaces only the (config, task, length) cells run here
        kept_records = []
        if args.records.exists():                           # keep other runs' records
            mine = {(r["config"], r["id"]) for r in records}
            kept_records = [r for r in json.loads(args.records.read_text()).get("records", [])
                            if (r["config"], r["id"]) not in mine]
        args.records.write_text(json.dumps({"runs_note": "records of every quality_cpu.py run; see runs in "
                                                         + args.json.name, "records": kept_records + records},
                                           indent=0) + "\n")
        data = json.loads(args.json.read_text())
        plot(data["rows"], args.png)

    def rounds(task_list, n, configs, phase) -> None:
        last = None
        for index in range(n):
            if last is not None and time.time() + last > deadline:
                log(t0, f"{phase}: stopping before round {index} (time budget; a round takes ~{last:.0f}s)")
                return
            t1 = time.time()
            for task in task_list:
                for length in args.lengths:
                    run_sample(task, length, index, configs, phase)
            last = time.time() - t1
            save()
            log(t0, f"{phase}: round {index} done in {last:.0f}s; results saved")

    if args.dense_samples > 0 and dense_only:
        rounds(dense_only, args.dense_samples, dense, "dense")
    rounds(args.tasks, args.samples, all_settings, "sweep")
    save(final=True)
    log(t0, f"done; wrote {args.json}, {args.records}, {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
