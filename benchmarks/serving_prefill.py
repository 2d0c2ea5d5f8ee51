"""CLAA prefill inside SGLang on one GPU: time-to-first-token of plain FlashInfer vs CLAA keep ratios.

    source .devbundle/prelude.sh && python -m benchmarks.serving_prefill [--configs a,b] [--input-lens 8192,32768,65536]

Each config is one server on dummy weights of the Llama-3.1-8B-shaped model, the same SGLang flags for
all (--page-size 32, prefill CUDA graphs off, decode graphs on, one prefill chunk up to the longest
prompt, radix cache off so that every prompt is prefilled in full). Per server:
  1. greedy parity: 8 fixed prompts (17 to 12,000 tokens), 32 tokens each, against the ``flashinfer``
     config's tokens (keep 100 % must be identical; prompts below --claa-min-prompt-len stay dense);
  2. a mixed batch: the 8 prompts again, sent together with two long prompts that CLAA filters; the
     dense prompts must give the tokens they gave alone on the same server;
  3. ``meta_info`` of one filtered request (``claa_kept_tokens``);
  4. ``python -m sglang.bench_serving --dataset-name random-ids --random-range-ratio 1`` with output 32
     at each input length, single request (3 prompts) and concurrency 4 (4 prompts, one wave): median TTFT;
  5. after the load, 10 s idle, then SGLang's log is checked for leaked KV slots and tracebacks.
Rows go to benchmarks/results/serving_prefill_h100.json (and $OUT): ``config``, ``input_len``,
``concurrency``, ``median_ttft_ms``, ``speedup`` (plain FlashInfer TTFT / this one), ``ceiling``
(1 / (F/L + keep (1 - F/L)) for filter layer F of L layers) and ``frac_of_ceiling``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from benchmarks.parity import fixed_prompts
from benchmarks.serving import (OURS, PLAIN, bench_serving, gpu_name, greedy, greedy_vs_reference, log, out_dir,
                                post_json, problem_lines, random_prompts, save_rows, server)

NUM_LAYERS, FILTER_LAYER = 32, 15


def claa(keep: float) -> list:
    return ["--sparse-prefill", "claa", "--claa-keep-ratio", str(keep), "--claa-filter-layer", str(FILTER_LAYER)]


def common_flags(model: str, ctx: int, longest: int) -> list:
    """SGLang flags of every server of this benchmark (one prefill chunk per prompt, no radix cache)."""
    return ["--model-path", model, "--load-format", "dummy", "--grammar-backend", "none",
            "--mem-fraction-static", "0.8", "--context-length", str(ctx), "--page-size", "32",
            "--disable-prefill-cuda-graph", "--chunked-prefill-size", str(longest), "--cuda-graph-max-bs", "16",
            "--max-running-requests", "16", "--disable-radix-cache"]


CONFIGS = {
    "flashinfer": (PLAIN, ["--attention-backend", "flashinfer"], None),
    "claa_keep100": (OURS, claa(1.0), 1.0),
    "claa_keep10": (OURS, claa(0.1), 0.1),
    "claa_keep20": (OURS, claa(0.2), 0.2),
    "claa_keep40": (OURS, claa(0.4), 0.4),
}


def ceiling(keep: float) -> float:
    f = FILTER_LAYER / NUM_LAYERS
    return 1.0 / (f + keep * (1.0 - f))


def concurrent_greedy(base: str, prompts: list, new_tokens: int) -> list:
    out = [None] * len(prompts)

    def go(i):
        out[i] = greedy(base, prompts[i], new_tokens)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("LLAMA8B_SHAPE"))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--input-lens", default="8192,32768,65536")
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--single-prompts", type=int, default=3, help="prompts of the single-request runs")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--port", type=int, default=30125)
    ap.add_argument("--skip-checks", action="store_true", help="only bench_serving")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "serving_prefill_h100.json"))
    args = ap.parse_args(argv)
    lens = [int(x) for x in args.input_lens.split(",")]
    concs = [int(x) for x in args.concurrency.split(",")]
    longest = max(lens)
    ctx = longest + args.output_len + 1024
    common = common_flags(args.model, ctx, longest)
    rows = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            rows = json.load(f)
    checks_path = os.path.join(os.path.dirname(args.out), "serving_prefill_checks_h100.json")
    checks = {}
    if os.path.exists(checks_path):
        with open(checks_path) as f:
            checks = json.load(f)
    ref_path = os.path.join(out_dir(), "prefill_parity_tokens_flashinfer.json")
    prompts = fixed_prompts()
    long_prompts = random_prompts((16384, 9000), 7)
    for name in args.configs.split(","):
        launcher, flags, keep = CONFIGS[name]
        if keep is not None:
            flags = flags + ["--claa-max-prompt-len", str(longest)]
        slog = os.path.join(out_dir(), f"server_{name}.log")
        try:
            with server(launcher + common + flags, args.port, slog) as base:
                chk = {"config": name}
                if not args.skip_checks:
                    toks, same = greedy_vs_reference(base, prompts, ref_path, name == "flashinfer")
                    if same is not None:
                        chk["identical_to_flashinfer"] = same
                        log(f"{name}: greedy tokens identical to flashinfer: {same}")
                    mixed = concurrent_greedy(base, prompts + long_prompts, 32)
                    chk["mixed_batch_same_as_alone"] = [a == b for a, b in zip(mixed[:len(prompts)], toks)]
                    log(f"{name}: mixed batch (8 prompts + 2 filtered long ones) same tokens as alone: "
                        f"{chk['mixed_batch_same_as_alone']}")
                    r = post_json(base + "/generate", {"input_ids": long_prompts[1], "sampling_params": {
                        "max_new_tokens": 4, "temperature": 0, "ignore_eos": True}})
                    mi = r.get("meta_info", {})
                    chk["meta_info_claa_kept_tokens"] = mi.get("claa_kept_tokens")
                    chk["meta_info_prompt_tokens"] = mi.get("prompt_tokens")
                    log(f"{name}: meta_info prompt_tokens={mi.get('prompt_tokens')} "
                        f"claa_kept_tokens={mi.get('claa_kept_tokens')}")
                for L in lens:
                    for C in concs:
                        n = args.single_prompts if C == 1 else C
                        tag = f"{name}_{L}_{C}"
                        res = bench_serving(base, args.model, os.path.join(out_dir(), f"bench_{tag}.jsonl"),
                                            os.path.join(out_dir(), f"bench_{tag}.log"),
                                            ["--dataset-name", "random-ids", "--random-range-ratio", "1",
                                             "--random-input-len", str(L), "--random-output-len",
                                             str(args.output_len), "--num-prompts", str(n),
                                             "--max-concurrency", str(C), "--tokenize-prompt"])
                        if not res.get("median_ttft_ms"):
                            raise RuntimeError(f"bench_serving served nothing; see {slog}")
                        row = {"config": name, "keep": keep, "input_len": L, "concurrency": C,
                               "median_ttft_ms": res.get("median_ttft_ms"), "mean_ttft_ms": res.get("mean_ttft_ms"),
                               "completed": res.get("completed"), "num_prompts": n,
                               "ceiling": ceiling(keep) if keep is not None else 1.0, "gpu": gpu_name(),
                               "command": f"python -m benchmarks.serving_prefill --configs {name}",
                               "server_flags": " ".join(common[2:] + flags).replace(args.model, "$LLAMA8B_SHAPE")}
                        rows = [x for x in rows if (x["config"], x["input_len"], x["concurrency"]) != (name, L, C)]
                        rows.append(row)
                        log(f"{name} L={L} C={C}: median TTFT {row['median_ttft_ms']:.1f} ms")
                        save_rows(rows, args.out)
                time.sleep(10)   # idle: SGLang's scheduler checks for leaked KV slots when it has no work
                chk["server_alive_after"] = greedy(base, prompts[0], 4) is not None
                with open(slog, errors="replace") as f:
                    text = f.read()
                chk["leak_or_traceback_lines"] = problem_lines(text)
                chk["claa_log_lines"] = sum("sglang_sparse CLAA: rid=" in x for x in text.splitlines())
                checks[name] = chk
                os.makedirs(os.path.dirname(checks_path), exist_ok=True)
                with open(checks_path, "w") as f:
                    json.dump(checks, f, indent=1)
                log(f"{name}: checks {json.dumps(chk)}")
        except Exception as e:  # keep the other configs' numbers
            log(f"{name} FAILED: {e!r}")
    base_ttft = {(r["input_len"], r["concurrency"]): r["median_ttft_ms"] for r in rows if r["config"] == "flashinfer"}
    for r in rows:
        b = base_ttft.get((r["input_len"], r["concurrency"]))
        r["speedup"] = b / r["median_ttft_ms"] if b and r["median_ttft_ms"] else None
        r["frac_of_ceiling"] = r["speedup"] / r["ceiling"] if r["speedup"] else None
    save_rows(rows, args.out)
    print("\n| config | input | conc | median TTFT ms | speedup | ceiling | of ceiling |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for r in sorted(rows, key=lambda r: (r["input_len"], r["concurrency"], r["config"])):
        print(f"| {r['config']} | {r['input_len']} | {r['concurrency']} | {r['median_ttft_ms']:.1f} | "
              f"{fmt(r['speedup'], '.2f')} | {r['ceiling']:.2f} | {fmt(r['frac_of_ceiling'], '.0%')} |")


if __name__ == "__main__":
    sys.exit(main())
