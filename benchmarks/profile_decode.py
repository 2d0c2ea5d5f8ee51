"""Where a served decode step's time goes: a GPU kernel profile of steady-state decode batches.

Used by ``python -m benchmarks.serving_decode --profile-steps N`` on a running server: C requests of
L prompt tokens are started (greedy, long outputs), and once the scheduler logs a decode batch of C
running requests, SGLang's ``/start_profile`` records N decode steps (torch profiler, GPU activity;
kernels replayed from CUDA graphs are listed one by one). The trace is summarised here:

* wall time per step (first kernel start to last kernel end, over N) and GPU busy time per step
  (union of kernel intervals): their difference is time the GPU waited for the host;
* every kernel name's time and launches per step, largest first.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import threading
import time
from collections import defaultdict
from typing import Optional

from benchmarks.serving import greedy, log, post, random_prompts

DECODE_LINE = re.compile(r"Decode batch.*?#running-req: (\d+)")


# kernels of the attention itself: FlashInfer's decode (its tensor-core path runs the prefill kernel) and
# merge, and every kernel of ours (page summaries, bounds, selection, reuse, split decode, merge)
ATTENTION_KERNEL = re.compile(r"flashinfer::Batch(Decode|Prefill)|MergeStates|^_(page|decode|merge|bounds)_")


def attention_split(res: dict, attention_us: Optional[float] = None) -> dict:
    """Attention kernels vs everything else per step, and the step time left if attention cost nothing: other
    kernels plus the GPU's idle time (wall - busy). ``attention_us``: the attention kernels' time per step;
    default: summed over the summary's (possibly cut) kernel list."""
    att = attention_us if attention_us is not None else sum(
        r["us_per_step"] for r in res.get("top", []) if ATTENTION_KERNEL.search(r["name"]))
    other = res.get("kernel_us_per_step", 0.0) - att
    idle = max(0.0, res.get("wall_us_per_step", 0.0) - res.get("busy_us_per_step", 0.0))
    return {"attention_us_per_step": att, "other_kernels_us_per_step": other, "idle_us_per_step": idle,
            "step_without_attention_us": other + idle}


def summarize_trace(path: str, steps: int, top: int = 25) -> dict:
    """Kernel totals of a Chrome trace written by torch.profiler (``.json`` or ``.json.gz``)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        return {"steps": steps, "kernels": 0}
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels)
    busy, cur_s, cur_e = 0.0, spans[0][0], spans[0][1]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    wall = max(e for _, e in spans) - spans[0][0]
    per = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        p = per[e["name"]]
        p[0] += float(e["dur"])
        p[1] += 1
    rows = sorted(per.items(), key=lambda kv: -kv[1][0])
    res = {"steps": steps, "kernels": len(kernels), "wall_us_per_step": wall / steps,
           "busy_us_per_step": busy / steps, "kernel_us_per_step": sum(v[0] for v in per.values()) / steps,
           "top": [{"name": n[:120], "us_per_step": v[0] / steps, "launches_per_step": v[1] / steps}
                   for n, v in rows[:top]]}
    # the split over every kernel (the top list is cut)
    res.update(attention_split(res, sum(v[0] for n, v in per.items() if ATTENTION_KERNEL.search(n)) / steps))
    return res


def _wait_for_decode_batch(log_path: str, conc: int, timeout: float, offset: int = 0, alive=None) -> bool:
    """Wait until the server log, from byte ``offset`` on, reports a decode batch of ``conc`` requests; stop early,
    False, once ``alive()`` says the requests that would form it have all ended (refused or finished)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if alive is not None and not alive():
            return False
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        if any(int(m) >= conc for m in DECODE_LINE.findall(text)):
            return True
        time.sleep(0.5)
    return False


def profile_new_tokens(input_len: int, steps: int, context_length: Optional[int] = None) -> Optional[int]:
    """Tokens each profiled request asks for: ``steps`` plus 400 of slack (the batch must still be full when the
    profile starts), cut to what the server's context holds (SGLang refuses a request longer than the context
    length - 2). None when not even ``steps + 8`` fit."""
    want = steps + 400
    if context_length:
        want = min(want, context_length - 2 - input_len)
    return want if want >= steps + 8 else None


def profile_running_decode(base: str, log_path: str, out_dir: str, input_len: int, conc: int, steps: int,
                           vocab: int = 49152, seed: int = 7, timeout: float = 600.0,
                           context_length: Optional[int] = None) -> Optional[dict]:
    """Start ``conc`` requests of ``input_len`` random ids and profile ``steps`` decode steps of the full
    batch. Returns :func:`summarize_trace`'s dict (plus the trace path), or None if nothing was written."""
    new_tokens = profile_new_tokens(input_len, steps, context_length)
    if new_tokens is None:
        log(f"profile: a context of {context_length} tokens cannot hold {input_len} prompt tokens and {steps + 8} "
            f"decode steps")
        return None
    prompts = random_prompts([input_len] * conc, seed, vocab)

    def run_all(new_tokens: int) -> list:
        threads = [threading.Thread(target=lambda p=p: greedy(base, p, new_tokens), daemon=True) for p in prompts]
        for t in threads:
            t.start()
        return threads

    # prefill every prompt first (one token each): the radix cache then holds them, so the measured
    # requests start decoding together instead of one after the other's prefill
    for t in run_all(1):
        t.join(timeout=timeout)
    offset = os.path.getsize(log_path)      # earlier decode batches (a benchmark before) do not count
    threads = run_all(new_tokens)
    prof_dir = os.path.join(out_dir, f"prof_{int(time.time())}")
    os.makedirs(prof_dir, exist_ok=True)
    try:
        if not _wait_for_decode_batch(log_path, conc, timeout, offset,
                                      alive=lambda: any(t.is_alive() for t in threads)):
            log(f"profile: no decode batch of {conc} requests within {timeout:.0f}s")
            return None
        post(base + "/start_profile", {"output_dir": prof_dir, "num_steps": steps, "activities": ["GPU"]})
        t0 = time.time()
        traces = []
        while time.time() - t0 < timeout and not traces:
            time.sleep(2)
            traces = glob.glob(os.path.join(prof_dir, "*.json*"))
        if not traces:
            log("profile: no trace written")
            return None
        time.sleep(3)  # the file may still be being written
        res = summarize_trace(traces[0], steps)
        res["trace"] = os.path.basename(traces[0])
        return res
    finally:
        for t in threads:
            t.join(timeout=timeout)


def print_summary(name: str, res: dict) -> None:
    print(f"\n{name}: {res['steps']} decode steps, wall {res.get('wall_us_per_step', 0):.0f} us/step, GPU busy "
          f"{res.get('busy_us_per_step', 0):.0f} us/step, kernels {res.get('kernel_us_per_step', 0):.0f} us/step")
    if "attention_us_per_step" in res:
        print(f"attention kernels {res['attention_us_per_step']:.0f} us/step, other kernels "
              f"{res['other_kernels_us_per_step']:.0f}, GPU idle {res['idle_us_per_step']:.0f}: without attention a "
              f"step would take ~{res['step_without_attention_us']:.0f} us")
    print("| kernel | us/step | launches/step |")
    print("|---|---|---|")
    for r in res.get("top", []):
        print(f"| {r['name'][:80]} | {r['us_per_step']:.1f} | {r['launches_per_step']:.1f} |")
