"""Serve under an irregular load and check that nothing is lost: no crash, no KV-slot leak, no error.

    source .devbundle/prelude.sh
    python -m benchmarks.serving_stress --flags "--art on" [--shape smollm2] [--requests 60 --concurrency 30]

One server (``sglang_sparse.launch_server``, or plain SGLang with ``--plain``) on dummy weights, then
``--requests`` requests of random token ids with random prompt lengths in ``[--min-len, --max-len]`` and
random output lengths up to ``--max-new``, ``--concurrency`` at a time; a fraction ``--shared-prefix-frac``
starts with one of four common prefixes (radix-cache reuse of pages and page summaries), and a fraction
``--abort-frac`` is aborted through SGLang's ``/abort_request`` after a random delay. A small KV pool
(``--flags "--max-total-tokens N"``) makes SGLang retract running requests too. Then the server idles (SGLang's
scheduler checks its KV pools for leaked slots when it has no work), answers one more request, and its
log is scanned for tracebacks, CUDA errors and leak reports.

``--shape smollm2`` serves a SmolLM2-135M-shaped model (30 layers, 9 query / 3 KV heads of dim 64, the
shape of the quality runs) made from ``$LLAMA8B_SHAPE``'s tokenizer, so that the shapes of the quality
model can be exercised without its weights. ``--env CUDA_LAUNCH_BLOCKING=1`` makes a fault name its kernel.

Prints one JSON line (completed / aborted / failed requests, server alive, suspicious log lines) and
exits non-zero when a request failed unexpectedly, the server died, or the log shows an error.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import threading
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor

from benchmarks.serving import OURS, PLAIN, greedy, log, out_dir, post, post_json, problem_lines, server, tail

# SmolLM2-135M-Instruct's architecture (the quality model; its tokenizer has the same 49,152 ids as the
# tokenizer of $LLAMA8B_SHAPE)
SMOLLM2_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
                 "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True}


def make_shape_dir(base_model: str, shape: dict, dest: str) -> str:
    """A copy of ``base_model``'s directory (tokenizer) whose config has ``shape``'s fields."""
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(base_model):
        src = os.path.join(base_model, name)
        if os.path.isfile(src) and not name.endswith((".safetensors", ".bin")):
            shutil.copy(src, os.path.join(dest, name))
    with open(os.path.join(dest, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(shape)
    cfg.pop("rope_scaling", None)
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return dest


def one_request(base: str, i: int, ids: list, max_new: int, abort_after) -> str:
    """'ok', 'aborted' or 'failed: ...' for one /generate request (aborted through /abort_request)."""
    rid = f"stress-{i}-{random.random():.6f}"
    if abort_after is not None:
        timer = threading.Timer(abort_after, lambda: _abort(base, rid))
        timer.daemon = True
        timer.start()
    try:
        out = post_json(base + "/generate", {"rid": rid, "input_ids": ids, "sampling_params": {
            "max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}}, timeout=900)
    except urllib.error.HTTPError as e:
        return "aborted" if abort_after is not None else f"failed: HTTP {e.code}"
    except Exception as e:  # noqa: BLE001
        return f"failed: {e!r}"[:200]
    reason = (out.get("meta_info") or {}).get("finish_reason") or {}
    if reason.get("type") == "abort":
        return "aborted" if abort_after is not None else f"failed: aborted by the server ({reason})"
    if len(out.get("output_ids", [])) != max_new:
        return f"failed: {len(out.get('output_ids', []))} of {max_new} tokens"
    return "ok"


def _abort(base: str, rid: str) -> None:
    try:
        post(base + "/abort_request", {"rid": rid}, timeout=30)
    except Exception:  # noqa: BLE001
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("LLAMA8B_SHAPE"))
    ap.add_argument("--shape", choices=["model", "smollm2"], default="model",
                    help="smollm2: serve a SmolLM2-135M-shaped model made from --model's tokenizer")
    ap.add_argument("--plain", action="store_true", help="plain sglang.launch_server instead of ours")
    ap.add_argument("--flags", default="", help="extra server flags (one string)")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--concurrency", type=int, default=30)
    ap.add_argument("--min-len", type=int, default=900)
    ap.add_argument("--max-len", type=int, default=7300)
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--abort-frac", type=float, default=0.2)
    ap.add_argument("--shared-prefix-frac", type=float, default=0.5,
                    help="share of the requests whose prompt starts with one of 4 common prefixes (40-80 %% of "
                         "the prompt): the radix cache hands them cached pages and their page summaries")
    ap.add_argument("--idle-s", type=float, default=12.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=30177)
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server's environment")
    ap.add_argument("--name", default="stress")
    args = ap.parse_args(argv)
    if not args.model:
        ap.error("--model (or $LLAMA8B_SHAPE) is required")
    if not (0 <= args.abort_frac <= 1 and 0 <= args.shared_prefix_frac <= 1) or not 1 <= args.min_len <= args.max_len:
        ap.error("need 0 <= --abort-frac, --shared-prefix-frac <= 1 and 1 <= --min-len <= --max-len")
    model = args.model
    ctx = args.max_len + args.max_new + 64
    if args.shape == "smollm2":
        model = make_shape_dir(args.model, SMOLLM2_SHAPE, os.path.join(out_dir(), "smollm2_shape_model"))
        ctx = min(ctx, SMOLLM2_SHAPE["max_position_embeddings"])
    with open(os.path.join(model, "config.json")) as f:
        vocab = min(json.load(f)["vocab_size"], 49152)    # ids the tokenizer of both shapes knows
    rng = random.Random(args.seed)
    lo_id = min(100, vocab // 2)
    prefixes = [[rng.randrange(lo_id, vocab) for _ in range(args.max_len)] for _ in range(4)]
    jobs = []
    for i in range(args.requests):
        n = rng.randint(args.min_len, min(args.max_len, ctx - args.max_new - 8))
        shared = int(n * rng.uniform(0.4, 0.8)) if rng.random() < args.shared_prefix_frac else 0
        ids = rng.choice(prefixes)[:shared] + [rng.randrange(lo_id, vocab) for _ in range(n - shared)]
        abort_after = rng.uniform(0.5, 8.0) if rng.random() < args.abort_frac else None
        jobs.append((i, ids, rng.randint(8, args.max_new), abort_after))
    cmd = (PLAIN if args.plain else OURS) + ["--model-path", model, "--load-format", "dummy", "--grammar-backend",
                                             "none", "--context-length", str(ctx)] + args.flags.split()
    env = dict(os.environ, **dict(kv.split("=", 1) for kv in args.env))
    slog = os.path.join(out_dir(), f"server_{args.name}.log")
    res = {"name": args.name, "flags": args.flags, "shape": args.shape, "requests": args.requests,
           "concurrency": args.concurrency, "shared_prefix_frac": args.shared_prefix_frac, "env": args.env}
    t0 = time.time()
    try:
        with server(cmd, args.port, slog, env=env) as base:
            log(f"{args.requests} requests of {args.min_len}-{args.max_len} tokens, {args.concurrency} at a time")
            done = {}
            with ThreadPoolExecutor(args.concurrency) as pool:
                futs = {pool.submit(one_request, base, i, ids, mx, ab): i for i, ids, mx, ab in jobs}
                for k, fut in enumerate(futs):
                    done[futs[fut]] = fut.result()
                    if (k + 1) % 10 == 0:
                        log(f"{k + 1}/{args.requests} answered")
            outcomes = list(done.values())
            res.update(ok=outcomes.count("ok"), aborted=outcomes.count("aborted"),
                       failed=[o for o in outcomes if o.startswith("failed")][:5],
                       num_failed=sum(o.startswith("failed") for o in outcomes))
            time.sleep(args.idle_s)
            try:
                res["alive_after"] = len(greedy(base, jobs[0][1][:256], 4)) == 4
            except Exception as e:  # noqa: BLE001
                res["alive_after"] = False
                res["alive_error"] = repr(e)[:200]
    except Exception as e:  # noqa: BLE001
        res["server_error"] = repr(e)[:300]
    res["wall_s"] = round(time.time() - t0, 1)
    with open(slog, errors="replace") as f:
        text = f.read()
    bad = problem_lines(text, limit=8)
    res["bad_log_lines"] = bad
    res["retracted_reqs"] = sum(int(n) for n in re.findall(r"Retract requests\. #retracted_reqs: (\d+)", text))
    passed = not bad and res.get("alive_after") and not res.get("num_failed") and "server_error" not in res
    res["passed"] = bool(passed)
    if not passed:
        res["log_tail"] = tail(slog, 25)[-3000:]
    print(json.dumps(res), flush=True)
    with open(os.path.join(out_dir(), f"stress_{args.name}.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
