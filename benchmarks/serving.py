"""Helpers for GPU serving benchmarks: start a server, wait for it, query it, run bench_serving.

Used by the scripts in this folder; each script prints a short table last and writes its JSON
under benchmarks/results/ and its logs under $OUT (or --log-dir).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Iterator, Optional, Sequence

PLAIN = [sys.executable, "-m", "sglang.launch_server"]
OURS = [sys.executable, "-m", "sglang_sparse.launch_server"]
# server log lines that mean trouble: exceptions, CUDA faults, and the findings of SGLang's idle check of its
# pools ("pool memory leak detected!", "req_to_token_pool memory leak detected!", "KV double free",
# "KV page use-after-free"), which it logs as warnings
PROBLEM_LINE = re.compile(r"Traceback|CUDA error|illegal memory|leak detected|double free|use-after-free|"
                          r"CUBLAS_STATUS|device-side assert|out of memory", re.IGNORECASE)


def problem_lines(text: str, limit: int = 5) -> list[str]:
    """The first ``limit`` lines of a server log that match ``PROBLEM_LINE`` (trimmed)."""
    return [line.strip()[:240] for line in text.splitlines() if PROBLEM_LINE.search(line)][:limit]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _get(url: str, timeout: float = 5.0) -> Optional[bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except Exception:
        return None


def post(url: str, payload: dict, timeout: float = 600.0) -> bytes:
    """POST ``payload`` as JSON; returns the raw answer (some endpoints, e.g. /start_profile, answer text)."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def post_json(url: str, payload: dict, timeout: float = 600.0) -> dict:
    return json.loads(post(url, payload, timeout))


@contextlib.contextmanager
def server(cmd: Sequence[str], port: int, log_path: str, timeout: float = 900.0,
           env: Optional[dict] = None) -> Iterator[str]:
    """Start ``cmd --port port``, yield its base URL once /health answers, then stop it.

    Refuses a port where a server already answers (it would be measured instead of this one), and while
    the server runs a SIGTERM to this process (e.g. from ``timeout``) becomes SystemExit, so that the
    server, which runs in its own session, is stopped too instead of outliving the benchmark.

    Two benchmarks that start servers on one port at about the same time both pass that check; the first server up
    answers both, and the other exits when it cannot bind the port. So the server that answers must serve this
    ``--model-path`` (SGLang's /model_info), and this server must still be running when the caller is done with
    it; otherwise RuntimeError: what was measured may be another server's."""
    base = f"http://127.0.0.1:{port}"
    if _get(base + "/health", 2.0) is not None:
        raise RuntimeError(f"a server already answers on port {port}; stop it or use another port")
    full = list(cmd) + ["--host", "127.0.0.1", "--port", str(port)]
    log(f"start: {' '.join(full)}")
    t0 = time.time()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(full, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}:\n"
                                   + tail(log_path, 30))
            if _get(base + "/health", 2.0) is not None:
                break
            if time.time() - t0 > timeout:
                raise TimeoutError(f"server not healthy after {timeout:.0f}s; see {log_path}")
            time.sleep(2)
        log(f"healthy after {time.time() - t0:.0f}s")
        _check_model_path(base, cmd, port)
        yield base
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} while in use: another server answered on "
                               f"port {port}; see {log_path}:\n" + tail(log_path, 10))
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        time.sleep(3)  # let the GPU memory go back


def _check_model_path(base: str, cmd: Sequence[str], port: int) -> None:
    """The server answering at ``base`` serves ``cmd``'s ``--model-path`` (when the command names one and the
    server tells its model)."""
    cmd = list(cmd)
    if "--model-path" not in cmd:
        return
    want = cmd[cmd.index("--model-path") + 1]
    raw = _get(base + "/model_info", 10.0)
    try:
        got = json.loads(raw).get("model_path") if raw else None
    except ValueError:
        got = None
    if got is not None and got != want:
        raise RuntimeError(f"the server answering on port {port} serves {got}, not {want}: another server holds the "
                           f"port")


def tail(path: str, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def random_prompts(lengths: Sequence[int], seed: int, vocab: int = 49152) -> list[list[int]]:
    """Prompts of random token ids (100 <= id < vocab) of the given lengths, the same for a seed."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(n)] for n in lengths]


def greedy(base: str, input_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    out = post_json(base + "/generate", {
        "input_ids": list(input_ids),
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}})
    return out["output_ids"]


def bench_serving(base: str, tokenizer: str, out_file: str, log_path: str, args: Sequence[str]) -> dict:
    """Run ``python -m sglang.bench_serving`` against ``base``; returns its JSON result line."""
    port = base.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--host", "127.0.0.1",
           "--port", port, "--tokenizer", tokenizer, "--output-file", out_file, "--seed", "1", *args]
    log("bench: " + " ".join(cmd[3:]))
    with open(log_path, "w") as logf:
        subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, check=True, timeout=1800)
    with open(out_file) as f:
        return json.loads(f.read().strip().splitlines()[-1])


def gpu_name() -> str:
    """The first GPU's name from nvidia-smi ("unknown" without one)."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return "unknown"


def out_dir() -> str:
    d = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results", "logs")
    os.makedirs(d, exist_ok=True)
    return d


def save_rows(rows, out: str) -> None:
    """Write results (any JSON value) to ``out`` and, when $OUT is set, to $OUT under the same name."""
    for path in filter(None, [out, os.path.join(os.environ["OUT"], os.path.basename(out))
                              if os.environ.get("OUT") else None]):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def greedy_vs_reference(base: str, prompts: Sequence[Sequence[int]], ref_path: str, is_reference: bool,
                        new_tokens: int = 32):
    """Greedy tokens of ``prompts``; the reference server saves them to ``ref_path``, any other server is
    compared with the saved ones. Returns ``(tokens, [identical per prompt] or None)``."""
    toks = [greedy(base, p, new_tokens) for p in prompts]
    if is_reference:
        with open(ref_path, "w") as f:
            json.dump(toks, f)
        return toks, None
    if not os.path.exists(ref_path):
        return toks, None
    with open(ref_path) as f:
        ref = json.load(f)
    return toks, [a == b for a, b in zip(toks, ref)]
