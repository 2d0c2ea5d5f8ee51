"""CLAA window-scoring cost vs one prefill layer of Llama-3.1-8B on the H100.

    source .devbundle/prelude.sh && python -m benchmarks.claa_score_cost

For prompts of 8K, 32K and 128K tokens: the time of ``ClaaWindowScorer.score`` (window 8, avg pool 7,
accumulating into the cross-layer max) against the same layer's prefill: FlashInfer's causal ragged
prefill attention (``BatchPrefillWithRaggedKVCacheWrapper``, what SGLang runs for an extend without
prefix) plus the layer's GEMMs measured with torch matmuls of Llama-3.1-8B shapes (qkv 4096 x 6144,
o 4096 x 4096, gate/up 4096 x 28672, down 14336 x 4096, bf16). Goal: < 3 % of the layer at 32K.

Writes benchmarks/results/claa_score_cost_h100.json (rows: n, claa_us, attention_us, gemm_us,
layer_us, frac_of_layer, frac_of_attention), also to ``$OUT`` when set, and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

H_Q, H_KV, D, HIDDEN, INTER = 32, 8, 128, 4096, 14336
T0 = time.time()


def log(msg):
    print(f"[claa_score_cost {time.time() - T0:6.1f}s] {msg}", flush=True)


def time_us(fn, reps=10, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "claa_score_cost_h100.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from flashinfer_ext.claa_score import ClaaWindowScorer

    dev = "cuda"
    rows = []
    lengths = [int(x) for x in args.lengths.split(",")]
    scorer = ClaaWindowScorer(H_Q, H_KV, D, window=8, max_len=max(lengths), device=dev)
    gemm_shapes = [(HIDDEN, H_Q * D + 2 * H_KV * D), (H_Q * D, HIDDEN), (HIDDEN, 2 * INTER), (INTER, HIDDEN)]
    for n in lengths:
        row = dict(n=n)
        try:
            q = torch.randn(n, H_Q, D, device=dev, dtype=torch.bfloat16)
            k = torch.randn(n, H_KV, D, device=dev, dtype=torch.bfloat16)
            v = torch.randn(n, H_KV, D, device=dev, dtype=torch.bfloat16)
            acc = torch.full((n,), float("-inf"), device=dev)
            row["claa_us"] = time_us(lambda: scorer.score(q, k, acc))
            log(f"n={n}: CLAA scoring {row['claa_us']:.1f} us")
        except Exception as exc:  # noqa: BLE001
            row["error_claa"] = repr(exc)
            traceback.print_exc()
        try:
            import flashinfer

            ws = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
            w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
            indptr = torch.tensor([0, n], dtype=torch.int32, device=dev)
            try:
                w.plan(indptr, indptr, H_Q, H_KV, D, causal=True, q_data_type=torch.bfloat16)
            except TypeError:
                w.plan(indptr, indptr, H_Q, H_KV, D, causal=True)
            row["attention_us"] = time_us(lambda: w.run(q, k, v), reps=5)
            log(f"n={n}: FlashInfer ragged causal prefill {row['attention_us']:.1f} us")
        except Exception as exc:  # noqa: BLE001
            row["error_attention"] = repr(exc)
            traceback.print_exc()
        try:
            x = torch.randn(n, HIDDEN, device=dev, dtype=torch.bfloat16)
            ws_ = [torch.randn(a, b, device=dev, dtype=torch.bfloat16) * 0.02 for a, b in gemm_shapes]
            h = torch.randn(n, INTER, device=dev, dtype=torch.bfloat16)

            def gemms():
                torch.matmul(x, ws_[0])
                torch.matmul(x, ws_[1])
                torch.matmul(x, ws_[2])
                torch.matmul(h, ws_[3])

            row["gemm_us"] = time_us(gemms, reps=5)
            log(f"n={n}: layer GEMMs {row['gemm_us']:.1f} us")
            del x, ws_, h
        except Exception as exc:  # noqa: BLE001
            row["error_gemm"] = repr(exc)
            traceback.print_exc()
        if "claa_us" in row and "attention_us" in row and "gemm_us" in row:
            row["layer_us"] = row["attention_us"] + row["gemm_us"]
            row["frac_of_layer"] = row["claa_us"] / row["layer_us"]
            row["frac_of_attention"] = row["claa_us"] / row["attention_us"]
        rows.append(row)
        for folder in [os.path.dirname(args.out)] + ([os.environ["OUT"]] if os.environ.get("OUT") else []):
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, os.path.basename(args.out)), "w") as f:
                json.dump(rows, f, indent=1)
        torch.cuda.empty_cache()
    print("\nCLAA window scoring (w=8, avg pool 7) vs one Llama-3.1-8B prefill layer (H100)")
    print(f"{'n':>7s} {'claa_us':>9s} {'attn_us':>10s} {'gemm_us':>10s} {'% layer':>8s} {'% attn':>7s}")
    for r in rows:
        fl = r.get("frac_of_layer")
        fa = r.get("frac_of_attention")
        print(f"{r['n']:7d} {r.get('claa_us', float('nan')):9.1f} {r.get('attention_us', float('nan')):10.1f} "
              f"{r.get('gemm_us', float('nan')):10.1f} {'' if fl is None else f'{100 * fl:7.2f}%':>8s} "
              f"{'' if fa is None else f'{100 * fa:6.2f}%':>7s}")


if __name__ == "__main__":
    main()
