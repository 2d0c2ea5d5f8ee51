"""Greedy-token parity and throughput: plain SGLang (FlashInfer) vs sglang_sparse with everything off.

    source .devbundle/prelude.sh && python -m benchmarks.parity [--model $LLAMA8B_SHAPE]

Starts ``python -m sglang.launch_server --attention-backend flashinfer`` and then
``python -m sglang_sparse.launch_server --attention-backend sparse`` with the same flags (dummy weights
of a Llama-3.1-8B-shaped model), sends 8 fixed prompts with greedy sampling to each one at a time
and compares the tokens, then runs ``python -m sglang.bench_serving --dataset-name random-ids
--random-input-len 16384 --random-output-len 128 --random-range-ratio 1 --num-prompts 16
--max-concurrency 8`` against each (after one warm-up pass). Writes
benchmarks/results/parity_h100.json and logs under $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.serving import OURS, PLAIN, bench_serving, greedy, log, out_dir, random_prompts, server

BENCH = ["--dataset-name", "random-ids", "--random-input-len", "16384", "--random-output-len", "128",
         "--random-range-ratio", "1", "--num-prompts", "16", "--max-concurrency", "8"]
WARMUP = ["--dataset-name", "random-ids", "--random-input-len", "4096", "--random-output-len", "32",
          "--random-range-ratio", "1", "--num-prompts", "8", "--max-concurrency", "8"]


def fixed_prompts(n: int = 8, vocab: int = 49152) -> list[list[int]]:
    return random_prompts([17, 64, 300, 1000, 2048, 4000, 7000, 12000][:n], 20261122, vocab)


def run_one(label: str, launcher: list, flags: list, args, prompts) -> dict:
    logs = out_dir()
    res = {"label": label}
    with server(launcher + flags, args.port, os.path.join(logs, f"server_{label}.log")) as base:
        t = time.time()
        res["tokens"] = [greedy(base, p, args.new_tokens) for p in prompts]
        log(f"{label}: 8 greedy prompts in {time.time() - t:.1f}s")
        bench_serving(base, args.model, os.path.join(logs, f"warmup_{label}.jsonl"),
                      os.path.join(logs, f"warmup_{label}.log"), WARMUP)
        r = bench_serving(base, args.model, os.path.join(logs, f"bench_{label}.jsonl"),
                          os.path.join(logs, f"bench_{label}.log"), BENCH)
        res["bench"] = {k: r.get(k) for k in ("output_throughput", "median_tpot_ms", "median_ttft_ms",
                                              "median_itl_ms", "completed", "duration")}
        log(f"{label}: {res['bench']}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("LLAMA8B_SHAPE"))
    ap.add_argument("--port", type=int, default=30123)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--extra", default="--disable-prefill-cuda-graph",
                    help="extra SGLang flags for both servers")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "parity_h100.json"))
    args = ap.parse_args(argv)
    common = ["--model-path", args.model, "--load-format", "dummy", "--grammar-backend", "none",
              "--mem-fraction-static", "0.8", "--context-length", "32768", *args.extra.split()]
    prompts = fixed_prompts()
    plain = run_one("flashinfer", PLAIN, common + ["--attention-backend", "flashinfer"], args, prompts)
    ours = run_one("sparse_off", OURS, common + ["--attention-backend", "sparse"], args, prompts)
    same = [a == b for a, b in zip(plain["tokens"], ours["tokens"])]
    x, y = plain["bench"]["output_throughput"], ours["bench"]["output_throughput"]
    result = {
        "identical_greedy": all(same), "prompts": len(prompts), "identical_per_prompt": same,
        "prompt_lens": [len(p) for p in prompts], "new_tokens": args.new_tokens,
        "dense_output_tok_s": x, "ours_output_tok_s": y, "throughput_ratio": y / x,
        "dense_bench": plain["bench"], "ours_bench": ours["bench"],
        "command": "python -m benchmarks.parity " + " ".join(argv if argv is not None else sys.argv[1:]),
        "server_flags": " ".join(common[2:]).replace(args.model, "$LLAMA8B_SHAPE"),
        "bench_flags": " ".join(BENCH),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "parity_h100.json"), "w") as f:
            json.dump(result, f, indent=1)
    print("\n| server | output tok/s | median TPOT ms | median TTFT ms |\n|---|---|---|---|")
    for r in (plain, ours):
        b = r["bench"]
        print(f"| {r['label']} | {b['output_throughput']:.1f} | {b['median_tpot_ms']:.2f} | {b['median_ttft_ms']:.0f} |")
    print(f"identical greedy tokens: {all(same)} {same}; throughput ratio {y / x:.4f}")


if __name__ == "__main__":
    main()
