"""Decode inside SGLang on one GPU: plain FlashInfer vs the sparse backend's PrHS / ART decode.

    source .devbundle/prelude.sh && python -m benchmarks.serving_decode [--configs a,b] [--input-lens 32768]

For each config a server is started on dummy weights of the Llama-3.1-8B-shaped model (same SGLang
flags for all: --page-size 32 or --page-size N, decode CUDA graphs on, prefill graphs off), then:
  1. greedy parity: 8 fixed prompts, 32 tokens, compared with the ``flashinfer`` config's tokens;
  2. ``python -m sglang.bench_serving --dataset-name random-ids --random-range-ratio 1
     --random-input-len L --random-output-len 256 --max-concurrency C`` for each L and C;
  3. the decode statistics the backend logged (pages read, certified delta-hat, ART stop rate).
Rows are merged into benchmarks/results/serving_decode_h100.json (and $OUT).

On a real checkpoint (``--model DIR --load-format auto --prompts-from <quality run>/samples-<model>.json
--input-lens <its lengths>``) the prompts are a quality run's tasks, so the pages read and the speed are those
of prompts whose answers that run measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from typing import List, Optional, Sequence

from benchmarks.parity import fixed_prompts
from benchmarks.profile_decode import print_summary, profile_running_decode
from benchmarks.serving import (OURS, PLAIN, bench_serving, gpu_name, greedy, greedy_vs_reference, log, out_dir,
                                problem_lines, save_rows, server)

# PrHS with the min/max ranking at delta 0.05, the server's defaults when the rows under these names ran
_BOUNDS = ["--sparse-decode", "prhs", "--prhs-select", "bounds", "--prhs-delta", "0.05"]
# PrHS ranking pages by their estimated mass
_ESTIMATE = ["--sparse-decode", "prhs", "--prhs-select", "estimate"]
CONFIGS = {
    "flashinfer": (PLAIN, ["--attention-backend", "flashinfer"]),
    "ours_off": (OURS, ["--attention-backend", "sparse"]),
    "ours_dense_exact": (OURS, ["--sparse-decode", "prhs", "--prhs-select", "bounds", "--prhs-budget", "1",
                                "--prhs-delta", "0"]),
    "ours_prhs": (OURS, [*_BOUNDS, "--prhs-budget", "1/16"]),
    "ours_prhs_art": (OURS, [*_BOUNDS, "--prhs-budget", "1/16", "--art", "on"]),
    "ours_prhs_g4": (OURS, [*_BOUNDS, "--prhs-budget", "1/16", "--prhs-layers-per-selection", "4"]),
    "ours_prhs_g4_art": (OURS, [*_BOUNDS, "--prhs-budget", "1/16", "--prhs-layers-per-selection",
                                "4", "--art", "on"]),
    "ours_dense_art": (OURS, ["--art", "on"]),
    # the min/max ranking at budget 1/2 (the default of --prhs-select bounds), alone and with ART
    "ours_prhs_b2": (OURS, [*_BOUNDS, "--prhs-budget", "1/2"]),
    "ours_prhs_b2_art": (OURS, [*_BOUNDS, "--prhs-budget", "1/2", "--art", "on"]),
    # PrHS ranking pages by their mass estimated from 4-bit key codes, delta on the estimated dropped mass and no
    # budget cut (quality_gpu's prhs-est-d0.1 / d0.05 without the audit; d0.1 is the server's default now)
    "ours_prhs_est_d0.1": (OURS, [*_ESTIMATE, "--prhs-budget", "1", "--prhs-delta", "0.1"]),
    # the same at delta 0.1 with the page budget capped at 1/2: on dummy weights attention is nearly flat and
    # delta alone reads ~90 % of the pages; real models read about half at delta 0.1 (quality rows)
    "ours_prhs_est_d0.1_b2": (OURS, [*_ESTIMATE, "--prhs-budget", "1/2", "--prhs-delta", "0.1"]),
    # the same with a fresh selection every 4 steps (quality_gpu's prhs-est-d0.1-r4): the estimate runs on a
    # quarter of the steps
    "ours_prhs_est_d0.1_r4": (OURS, [*_ESTIMATE, "--prhs-budget", "1", "--prhs-delta", "0.1",
                                     "--prhs-reselect-interval", "4"]),
    "ours_prhs_est_d0.1_b2_r4": (OURS, [*_ESTIMATE, "--prhs-budget", "1/2", "--prhs-delta", "0.1",
                                        "--prhs-reselect-interval", "4"]),
    # and with one selection per 2 layers as well (quality_gpu's prhs-est-d0.1-g2-r4): the estimate runs once per
    # 2 layers and 4 steps
    "ours_prhs_est_d0.1_g2_r4": (OURS, [*_ESTIMATE, "--prhs-budget", "1", "--prhs-delta", "0.1",
                                        "--prhs-layers-per-selection", "2", "--prhs-reselect-interval", "4"]),
    "ours_prhs_est_d0.05": (OURS, [*_ESTIMATE, "--prhs-budget", "1", "--prhs-delta", "0.05"]),
    # PrHS with its depth and time selectors: one selection per 4 layers, refreshed every 4 steps (reused
    # steps read the last selection plus the new pages, no dilation: dilation 1 read 17.5 % of the pages
    # instead of 6.3 % and was slower, 6.82 ms median TPOT on an H200), plus ART
    "ours_prhs_g4_r4": (OURS, [*_BOUNDS, "--prhs-budget", "1/16", "--prhs-layers-per-selection",
                               "4", "--prhs-reselect-interval", "4", "--prhs-dilation", "0"]),
    "ours_prhs_g4_r4_art": (OURS, [*_BOUNDS, "--prhs-budget", "1/16",
                                   "--prhs-layers-per-selection", "4", "--prhs-reselect-interval", "4",
                                   "--prhs-dilation", "0", "--art", "on"]),
}
# The quality_gpu setting whose answers were measured at each config's mechanism settings (the audit, which only
# measures, and the context floor of --prhs-min-context-len apart; tests/test_benchmark_configs.py checks that the
# two parse to the same mechanisms). Rows carry it as ``quality_setting``; a config without one has no quality row.
QUALITY_SETTING = {
    "flashinfer": "dense",
    "ours_off": "ours-off",
    "ours_prhs": "prhs-b1/16",
    "ours_prhs_art": "prhs-b1/16+art",
    "ours_prhs_g4": "prhs-b1/16-g4",
    "ours_prhs_b2": "prhs-b1/2",
    "ours_prhs_b2_art": "prhs-b1/2+art",
    "ours_dense_art": "art",
    "ours_prhs_est_d0.1": "prhs-est-d0.1",
    "ours_prhs_est_d0.1_r4": "prhs-est-d0.1-r4",
    "ours_prhs_est_d0.1_g2_r4": "prhs-est-d0.1-g2-r4",
}

_NUM = r"([\d.]+|nan)"      # delta-hat is NaN for a batch of reused lists only
STATS = re.compile(rf"sglang_sparse decode stats: bs=(\d+) pages_read={_NUM} delta_hat mean={_NUM} "
                   rf"max={_NUM} art_stop_rate={_NUM} blocks_read_mean={_NUM}")


def common_flags(model: str, ctx: int, max_bs: int, page_size: int = 32, mem_fraction: float = 0.8,
                 load_format: str = "dummy") -> list:
    """SGLang flags of every server of this benchmark (decode graphs up to the largest concurrency: fewer
    graphs, faster start)."""
    return ["--model-path", model, "--load-format", load_format, "--grammar-backend", "none",
            "--mem-fraction-static", str(mem_fraction), "--context-length", str(ctx), "--page-size", str(page_size),
            "--disable-prefill-cuda-graph", "--cuda-graph-max-bs", str(max_bs), "--max-running-requests",
            str(max_bs), "--decode-log-interval", "40"]


def longer_context_env(model: str, ctx: int) -> Optional[dict]:
    """The servers' environment when ``--context-length ctx`` exceeds the model's ``max_position_embeddings``
    (a 128K prompt plus its output on Llama-3.1's 131,072): SGLang refuses that unless
    ``SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1``. None (inherit) otherwise."""
    try:
        with open(os.path.join(model, "config.json")) as f:
            max_pos = int(json.load(f).get("max_position_embeddings") or 0)
    except (OSError, ValueError):
        return None
    if not max_pos or ctx <= max_pos:
        return None
    log(f"context length {ctx} > the model's max_position_embeddings {max_pos}: "
        "serving with SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1")
    return dict(os.environ, SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN="1")


def task_prompts(samples_file: str, length: int, count: int) -> List[str]:
    """``count`` prompts of target length ``length`` from a quality run's samples file (the
    ``samples-<model>.json`` benchmarks/quality_gpu.py builds: RULER-style tasks on the essays haystack),
    rendered as that run sent them (its chat format, answer prefix included), taking the tasks in turn."""
    from benchmarks.eval.harness import PromptFormat, render_prompt
    from benchmarks.eval.tasks import TaskSample

    with open(samples_file) as f:
        data = json.load(f)
    kind, _, template = data["key"]["format"].partition(":")
    fmt = PromptFormat(kind, template or None)
    by_task: dict = {}
    for d in data["samples"]:
        if int(d["length"]) == length:
            by_task.setdefault(d["task"], []).append(TaskSample(**d))
    if not by_task:
        lengths = sorted({int(d["length"]) for d in data["samples"]})
        raise ValueError(f"{samples_file} has no samples of length {length} (it has {lengths})")
    queues = [sorted(v, key=lambda x: x.index) for _, v in sorted(by_task.items())]
    picked: List[str] = []
    while len(picked) < count and any(queues):
        for q in queues:
            if q and len(picked) < count:
                picked.append(render_prompt(q.pop(0), fmt))
    if len(picked) < count:
        raise ValueError(f"{samples_file} has {len(picked)} samples of length {length}, {count} asked")
    return picked


def write_custom_dataset(prompts: Sequence[str], path: str) -> str:
    """The JSONL bench_serving's ``--dataset-name custom`` reads: one two-turn conversation per prompt (the
    second turn is unused: the output length is fixed by ``--sharegpt-output-len``)."""
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"conversations": [{"role": "user", "content": p},
                                                  {"role": "assistant", "content": "-"}]}) + "\n")
    return path


def row_key(r: dict, context_length: Optional[int] = None) -> tuple:
    """What a row measured apart from its config: input length, concurrency, cached prompts, TP, model, prompts and
    context length (``context_length`` stands in for rows written before the field existed)."""
    return (r["input_len"], r["concurrency"], bool(r.get("warm_prefix")), r.get("tp", 1),
            r.get("model", "$LLAMA8B_SHAPE"), r.get("prompts", "random token ids"),
            r.get("context_length", context_length))


def decode_stats(log_path: str) -> dict:
    rows = []
    with open(log_path, errors="replace") as f:
        for line in f:
            m = STATS.search(line)
            if m:
                rows.append([float(x) for x in m.groups()])
    if not rows:
        return {}
    big = [r for r in rows if r[0] >= 2] or rows

    def mean(i):
        vals = [r[i] for r in big if not math.isnan(r[i])]
        return sum(vals) / len(vals) if vals else None

    dmax = [r[3] for r in big if not math.isnan(r[3])]
    return {"pages_read_frac": mean(1), "delta_hat_mean": mean(2), "delta_hat_max": max(dmax) if dmax else None,
            "art_stop_rate": mean(4), "blocks_read_mean": mean(5), "stat_samples": len(big),
            "stat_samples_with_fresh_selection": sum(not math.isnan(r[2]) for r in big)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("LLAMA8B_SHAPE"))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--input-lens", default="32768")
    ap.add_argument("--concurrency", default="8")
    ap.add_argument("--num-prompts-per-concurrency", type=int, default=2)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--port", type=int, default=30124)
    ap.add_argument("--page-size", type=int, default=32,
                    help="SGLang's --page-size for every server (PrHS pages; compare only rows of one page size)")
    ap.add_argument("--mem-fraction", type=float, default=0.8,
                    help="--mem-fraction-static of every server (lower it when other processes share the GPU)")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallelism of every server (--tp-size)")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--parity-configs", default=None,
                    help="check greedy parity only for these configs (default: every config unless --skip-parity)")
    ap.add_argument("--parity-only", action="store_true", help="greedy parity, no bench_serving")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="after the benchmark, profile this many decode steps of a full batch (first input "
                         "length, largest concurrency) and summarise the kernels (benchmarks/profile_decode.py)")
    ap.add_argument("--profile-only", action="store_true", help="skip parity and bench_serving; profile only")
    ap.add_argument("--warm-prefix", action="store_true",
                    help="run each bench_serving command twice and keep the second: its prompts are then in the "
                         "radix cache, so no prefill stalls the decode steps and TPOT measures decode alone "
                         "(rows get warm_prefix=true)")
    ap.add_argument("--shared-prefix-load", action="store_true",
                    help="after parity, run bench_serving's generated-shared-prefix dataset (radix-cache reuse, "
                         "page-summary reuse) and check the server survives and reports no KV leak at idle")
    ap.add_argument("--context-length", type=int, default=0,
                    help="SGLang's --context-length of every server (default: the longest input + output + 1024); a "
                         "real model's own length keeps the decode buffers and PrHS's selection tile as it serves them")
    ap.add_argument("--load-format", default="dummy",
                    help="SGLang's --load-format of every server: dummy (random weights of the model's shape, the "
                         "default) or auto for a real checkpoint")
    ap.add_argument("--prompts-from", default=None,
                    help="serve the prompts of a quality run (the samples-<model>.json benchmarks/quality_gpu.py "
                         "writes into its --out-dir; --input-lens are then its lengths) through bench_serving's "
                         "custom dataset instead of random token ids: with real weights the pages PrHS reads are "
                         "those of the tasks whose answers were measured")
    ap.add_argument("--check-metrics", action="store_true",
                    help="serve with --enable-metrics and record the sglang_sparse gauges of /metrics")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "serving_decode_h100.json"))
    args = ap.parse_args(argv)
    lens = [int(x) for x in args.input_lens.split(",")]
    concs = [int(x) for x in args.concurrency.split(",")]
    ctx = max(lens) + args.output_len + 1024  # prompts are sent as token ids (--tokenize-prompt): exact lengths
    if args.context_length:
        if args.context_length < max(lens) + args.output_len + 2:
            ap.error(f"--context-length {args.context_length} cannot hold {max(lens)} prompt tokens and "
                     f"{args.output_len} output tokens (SGLang caps a request at the context length - 2)")
        ctx = args.context_length
    common = common_flags(args.model, ctx, max(concs), args.page_size, args.mem_fraction, args.load_format)
    dummy = args.load_format == "dummy"
    model_tag = "$LLAMA8B_SHAPE" if dummy else os.path.basename(os.path.normpath(args.model))
    base_env = longer_context_env(args.model, ctx)
    if args.tp < 1:
        ap.error(f"--tp must be >= 1, got {args.tp}")
    if args.tp > 1:
        common += ["--tp-size", str(args.tp)]
    gpu = gpu_name()
    rows = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            rows = json.load(f)
    # TP changes the reduction order of every projection: the reference tokens are those of flashinfer
    # at the same TP
    tp_tag = f"_tp{args.tp}" if args.tp > 1 else ""
    ref_path = os.path.join(out_dir(), f"parity_tokens_flashinfer{tp_tag}.json")
    # Reference tokens of plain SGLang (FlashInfer) from an earlier run: dummy weights are seeded, so they
    # are the same on every H100 with this stack. A run that includes the flashinfer config refreshes them.
    kept_ref = os.path.join(os.path.dirname(args.out), "parity_tokens_flashinfer_llama8b_dummy.json")
    if not dummy:
        ref_path = os.path.join(out_dir(), f"parity_tokens_flashinfer{tp_tag}_{model_tag}.json")
    elif not os.path.exists(ref_path) and os.path.exists(kept_ref) and args.tp == 1:
        ref_path = kept_ref
    prompts = fixed_prompts()
    # a quality run's prompts as bench_serving's custom dataset, once per (input length, prompt count), before any
    # server starts (a length the run does not have fails here)
    datasets = {}
    if args.prompts_from:
        for n in sorted({C * args.num_prompts_per_concurrency for C in concs}):
            for L in lens:
                datasets[L, n] = write_custom_dataset(task_prompts(args.prompts_from, L, n),
                                                      os.path.join(out_dir(), f"prompts_{L}_{n}.jsonl"))
    prof_out = args.out.replace(".json", "_profile.json")
    profiles = []
    if args.profile_steps > 0 and os.path.exists(prof_out):
        with open(prof_out) as f:
            profiles = json.load(f)
    for name in args.configs.split(","):
        launcher, flags = CONFIGS[name]
        if args.check_metrics:
            flags = flags + ["--enable-metrics"]
        logs = out_dir()
        slog = os.path.join(logs, f"server_{name}.log")
        try:
            with server(launcher + common + flags, args.port, slog, env=base_env) as base:
                parity = None
                if not args.skip_parity and not args.profile_only and (
                        args.parity_configs is None or name in args.parity_configs.split(",")):
                    _, same = greedy_vs_reference(base, prompts, ref_path, name == "flashinfer")
                    if same is not None:
                        parity = sum(same)
                        log(f"{name}: greedy tokens identical to flashinfer on {parity}/8 prompts")
                        for r in rows:
                            if r["config"] == name and r.get("tp", 1) == args.tp:
                                r["greedy_identical_prompts"] = parity
                if args.check_metrics:
                    import urllib.request

                    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
                        lines = [l for l in r.read().decode().splitlines() if l.startswith("sglang_sparse:")]
                    log(f"{name}: /metrics sglang_sparse gauges: {lines}")
                    with open(os.path.join(out_dir(), f"metrics_{name}.txt"), "w") as f:
                        f.write("\n".join(lines) + "\n")
                if args.shared_prefix_load:
                    gsp = bench_serving(base, args.model, os.path.join(logs, f"gsp_{name}.jsonl"),
                                        os.path.join(logs, f"gsp_{name}.log"),
                                        ["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "4",
                                         "--gsp-prompts-per-group", "16", "--gsp-system-prompt-len", "8192",
                                         "--gsp-question-len", "256", "--gsp-output-len", "128",
                                         "--max-concurrency", "16"])
                    time.sleep(10)  # idle: SGLang's scheduler checks for leaked KV slots when it has no work
                    alive = greedy(base, prompts[0], 4) is not None
                    with open(slog, errors="replace") as f:
                        text = f.read()
                    leak = problem_lines(text)
                    res = {"config": name, "tp": args.tp, "dataset": "generated-shared-prefix", "completed": gsp.get("completed"),
                           "median_tpot_ms": gsp.get("median_tpot_ms"), "server_alive_after": alive,
                           "leak_or_traceback_lines": leak}
                    log(f"{name}: shared-prefix load {json.dumps(res)}")
                    with open(os.path.join(out_dir(), f"shared_prefix_{name}{tp_tag}.json"), "w") as f:
                        json.dump(res, f, indent=1)
                if args.parity_only:
                    save_rows(rows, args.out)
                    continue
                for L in ([] if args.profile_only else lens):
                    for C in concs:
                        warm = "_warm" if args.warm_prefix else ""
                        n = C * args.num_prompts_per_concurrency
                        if args.prompts_from:
                            bench_args = ["--dataset-name", "custom", "--dataset-path", datasets[L, n],
                                          "--sharegpt-output-len", str(args.output_len)]
                        else:
                            bench_args = ["--dataset-name", "random-ids", "--random-range-ratio", "1",
                                          "--random-input-len", str(L), "--random-output-len", str(args.output_len),
                                          "--tokenize-prompt"]
                        bench_args += ["--num-prompts", str(n), "--max-concurrency", str(C)]
                        for _ in range(2 if args.warm_prefix else 1):   # the same seed: the same prompts
                            res = bench_serving(base, args.model, os.path.join(logs, f"bench_{name}_{L}_{C}{warm}.jsonl"),
                                                os.path.join(logs, f"bench_{name}_{L}_{C}{warm}.log"), bench_args)
                        if not res.get("median_ttft_ms"):
                            raise RuntimeError(f"bench_serving served nothing (TTFT 0); see {slog}")
                        row = {"config": name, "input_len": L, "concurrency": C, "gpu": gpu,
                               "num_prompts": C * args.num_prompts_per_concurrency, "output_len": args.output_len,
                               "output_tok_s": res.get("output_throughput"),
                               "median_tpot_ms": res.get("median_tpot_ms"), "mean_tpot_ms": res.get("mean_tpot_ms"),
                               "median_itl_ms": res.get("median_itl_ms"), "mean_itl_ms": res.get("mean_itl_ms"),
                               "median_ttft_ms": res.get("median_ttft_ms"), "p99_itl_ms": res.get("p99_itl_ms"),
                               "completed": res.get("completed"), "page_size": args.page_size,
                               "warm_prefix": args.warm_prefix, "tp": args.tp, "model": model_tag, "context_length": ctx,
                               "quality_setting": QUALITY_SETTING.get(name),
                               "prompts": ("quality-run tasks (" + os.path.basename(args.prompts_from) + ")"
                                           if args.prompts_from else "random token ids"),
                               "greedy_identical_prompts": parity,
                               "command": f"python -m benchmarks.serving_decode --configs {name}"
                                          + f" --input-lens {L} --concurrency {C} --page-size {args.page_size}"
                                          + f" --output-len {args.output_len}"
                                          + (f" --context-length {args.context_length}" if args.context_length else "")
                                          + (" --warm-prefix" if args.warm_prefix else "")
                                          + (f" --tp {args.tp}" if args.tp > 1 else "")
                                          + ("" if dummy else f" --model {model_tag} --load-format {args.load_format}")
                                          + (f" --prompts-from {os.path.basename(args.prompts_from)}"
                                             if args.prompts_from else ""),
                               "server_flags": " ".join(common[2:] + flags).replace(args.model, model_tag)}
                        row.update({k: None for k in ("pages_read_frac", "delta_hat_mean", "art_stop_rate")})
                        row.update(decode_stats(slog))
                        rows = [r for r in rows
                                if (r["config"], row_key(r, ctx)) != (name, row_key(row))]
                        rows.append(row)
                        log(f"{name} L={L} C={C}: {json.dumps({k: row[k] for k in ('output_tok_s', 'median_tpot_ms', 'pages_read_frac', 'delta_hat_mean', 'art_stop_rate')})}")
                        save_rows(rows, args.out)
                if args.profile_steps > 0:
                    prof = profile_running_decode(base, slog, logs, lens[0], max(concs), args.profile_steps,
                                                  context_length=ctx)
                    if prof:
                        prof.update(config=name, input_len=lens[0], concurrency=max(concs), gpu=gpu,
                                    command=f"python -m benchmarks.serving_decode --configs {name} "
                                            f"--profile-steps {args.profile_steps}")
                        profiles = [p for p in profiles if p["config"] != name] + [prof]
                        save_rows(profiles, prof_out)
                        print_summary(name, prof)
        except Exception as e:  # keep the other configs' numbers
            log(f"{name} FAILED: {e!r}")
    base_tpot = {row_key(r): r["median_tpot_ms"] for r in rows if r["config"] == "flashinfer"}
    try:
        from benchmarks.plot_serving_decode import plot

        log(f"plot: {plot(args.out)}")
    except Exception as e:  # noqa: BLE001
        log(f"plot failed: {e!r}")
    print("\n| config | input | conc | out tok/s | median TPOT ms | median ITL ms | vs flashinfer | pages read | "
          "delta_hat | ART stop |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = base_tpot.get(row_key(r))
        sp = f"{b / r['median_tpot_ms']:.2f}x" if b and r["median_tpot_ms"] else "-"
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        tag = (" (warm)" if r.get("warm_prefix") else "") + (f" TP{r['tp']}" if r.get("tp", 1) > 1 else "") \
            + (f" {r['model']}" if r.get("model", "$LLAMA8B_SHAPE") != "$LLAMA8B_SHAPE" else "")
        print(f"| {r['config']}{tag} | {r['input_len']} | {r['concurrency']} | {r['output_tok_s'] or 0:.1f} | "
              f"{r['median_tpot_ms'] or 0:.2f} | {r.get('median_itl_ms') or 0:.2f} | {sp} | {fmt(r['pages_read_frac'])} | {fmt(r['delta_hat_mean'])} | "
              f"{fmt(r['art_stop_rate'])} |")


if __name__ == "__main__":
    sys.exit(main())
