"""How far PrHS moves the decode logits in a real server: ||logits - logits_ref|| / ||logits_ref|| at delta 0,
0.01 and 0.05 against plain SGLang (FlashInfer), on fixed long prompts.

    source .devbundle/prelude.sh && python -m benchmarks.serving_logits [--configs ...] [--prompt-lens 8192,32768]

Dummy weights give random text, so greedy tokens alone say little; the logits of the first decode steps
do. Each server (the flags of ``benchmarks.serving_decode``) gets the same prompts (seeded random ids)
with ``max_new_tokens`` greedy tokens and ``token_ids_logprob`` = the whole vocabulary: SGLang returns
the log-probabilities of every token at every output position. A log-probability is the logit minus
the log-partition, so centring each position's vector over the vocabulary gives the centred logits
exactly; the reported error is that of the centred logits. Position 0 comes from the prefill
(FlashInfer for every config here); positions 1.. from decode steps, compared while the greedy tokens
before them agree (the contexts are then identical).

Rows (``benchmarks/results/serving_logits_h100.json`` by default, and $OUT): ``config``, ``prompt_len``,
``rel_err`` per position, ``max_decode_rel_err``, ``positions_compared``, ``tokens_equal``.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from benchmarks.serving import OURS, PLAIN, gpu_name, log, out_dir, post_json, random_prompts, save_rows, server
from benchmarks.serving_decode import common_flags

_PRHS = ["--sparse-decode", "prhs", "--prhs-select", "bounds"]
CONFIGS = {
    "flashinfer": (PLAIN, ["--attention-backend", "flashinfer"]),
    # the min/max ranking; budget = all pages, so delta alone decides what is dropped (delta 0 is the dense path)
    "prhs_delta0": (OURS, _PRHS + ["--prhs-budget", "1", "--prhs-delta", "0"]),
    "prhs_delta0.01": (OURS, _PRHS + ["--prhs-budget", "1", "--prhs-delta", "0.01"]),
    "prhs_delta0.05": (OURS, _PRHS + ["--prhs-budget", "1", "--prhs-delta", "0.05"]),
    # the min/max ranking at the server's defaults when these rows ran (budget 1/2, delta 0.05), and with ART; the
    # rows of serving_logits_h200.json under these names ran when the default budget was 1/16 (prhs_b16 and
    # prhs_b16_art now)
    "prhs_default": (OURS, _PRHS + ["--prhs-budget", "1/2", "--prhs-delta", "0.05"]),
    "prhs_default_art": (OURS, _PRHS + ["--prhs-budget", "1/2", "--prhs-delta", "0.05", "--art", "on"]),
    "prhs_b16": (OURS, _PRHS + ["--prhs-budget", "1/16", "--prhs-delta", "0.05"]),
    "prhs_b16_art": (OURS, _PRHS + ["--prhs-budget", "1/16", "--prhs-delta", "0.05", "--art", "on"]),
    # the estimate mode at the server's defaults now (delta 0.1, every page allowed)
    "prhs_est_default": (OURS, ["--sparse-decode", "prhs"]),
}


def probe(base: str, prompt: list, new_tokens: int, vocab: int):
    """Greedy tokens and the ``[new_tokens, vocab]`` log-probabilities of every output position."""
    out = post_json(base + "/generate", {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True},
        "return_logprob": True, "token_ids_logprob": list(range(vocab))}, timeout=1800)
    rows = out["meta_info"]["output_token_ids_logprobs"]
    lp = np.full((len(rows), vocab), np.nan, dtype=np.float64)
    for i, row in enumerate(rows):
        for val, tok, _ in row:
            lp[i, tok] = val
    return out["output_ids"], lp


def compare(ref_tokens, ref_lp, tokens, lp) -> dict:
    """Relative error of the centred logits per position, while the earlier greedy tokens agree."""
    n = min(len(ref_tokens), len(tokens), ref_lp.shape[0], lp.shape[0])
    errs = []
    for j in range(n):
        if j > 0 and ref_tokens[j - 1] != tokens[j - 1]:
            break
        a = ref_lp[j] - np.nanmean(ref_lp[j])
        b = lp[j] - np.nanmean(lp[j])
        ok = np.isfinite(a) & np.isfinite(b)
        errs.append(float(np.linalg.norm((b - a)[ok]) / max(np.linalg.norm(a[ok]), 1e-30)))
    return {"rel_err": errs, "positions_compared": len(errs),
            "max_decode_rel_err": max(errs[1:]) if len(errs) > 1 else None,
            "tokens_equal": list(tokens[:n]) == list(ref_tokens[:n])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("LLAMA8B_SHAPE"))
    ap.add_argument("--configs", default=",".join(CONFIGS), help="the first one is the reference")
    ap.add_argument("--prompt-lens", default="8192,32768")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=None, help="logit vector size (default: the model config's)")
    ap.add_argument("--port", type=int, default=30125)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--mem-fraction", type=float, default=0.8,
                    help="--mem-fraction-static of every server (of the GPU memory free when it starts; lower it "
                         "to share the GPU with another job: one request needs little KV)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "serving_logits_h100.json"))
    args = ap.parse_args(argv)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    vocab = args.vocab
    if vocab is None:
        with open(os.path.join(args.model, "config.json")) as f:
            vocab = int(json.load(f)["vocab_size"])
    lens = [int(x) for x in args.prompt_lens.split(",")]
    prompts = random_prompts(lens, 20261201)
    common = common_flags(args.model, max(lens) + args.new_tokens + 1024, 1, args.page_size, args.mem_fraction)
    gpu = gpu_name()
    rows, ref = [], None
    for name in names:
        launcher, flags = CONFIGS[name]
        try:
            with server(launcher + common + flags, args.port, os.path.join(out_dir(), f"server_logits_{name}.log")) as base:
                got = [probe(base, p, args.new_tokens, vocab) for p in prompts]
        except Exception as e:  # noqa: BLE001  keep the other configs' numbers
            log(f"{name} FAILED: {e!r}")
            if ref is None:
                raise
            continue
        if ref is None:
            ref = got
        for L, (tok, lp), (rtok, rlp) in zip(lens, got, ref):
            row = {"config": name, "reference": names[0], "prompt_len": L, "gpu": gpu, "new_tokens": args.new_tokens,
                   "server_flags": " ".join(common[2:] + flags).replace(args.model, "$LLAMA8B_SHAPE"),
                   "command": f"python -m benchmarks.serving_logits --configs {names[0]},{name} "
                              f"--prompt-lens {args.prompt_lens} --page-size {args.page_size}", **compare(rtok, rlp, tok, lp)}
            rows.append(row)
            log(f"{name} L={L}: rel err per position {[round(e, 5) for e in row['rel_err']]}")
        save_rows(rows, args.out)
    print("\n| config | prompt | rel. logits error, prefill position | max over decode positions | positions | "
          "tokens equal |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        first = f"{r['rel_err'][0]:.2e}" if r["rel_err"] else "-"
        mx = "-" if r["max_decode_rel_err"] is None else f"{r['max_decode_rel_err']:.2e}"
        print(f"| {r['config']} | {r['prompt_len']} | {first} | {mx} | {r['positions_compared']} | {r['tokens_equal']} |")


if __name__ == "__main__":
    main()
