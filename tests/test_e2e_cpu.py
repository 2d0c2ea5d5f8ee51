"""End to end on CPU: a real SGLang server process tree on a tiny random Llama.

Plain ``python -m sglang.launch_server --attention-backend torch_native`` and
``python -m sglang_sparse.launch_server`` (the ``sparse`` backend, everything off) are started in
turn; both must give transformers' greedy tokens, and ours must answer the OpenAI API (completions,
chat, streaming) and a frontend-language program (gen, select, run_batch).
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.e2e
ENV = dict(os.environ, SGLANG_USE_CPU_ENGINE="1", PYTHONUNBUFFERED="1")
COMMON = ["--device", "cpu", "--skip-server-warmup", "--max-total-tokens", "4096", "--dtype", "float32",
          "--grammar-backend", "none", "--host", "127.0.0.1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-llama")
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "tiny_llama.py"), str(out)], check=True,
                   capture_output=True, timeout=300)
    return str(out)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, module, model, *extra, log_path):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", module, "--model-path", model, "--port", str(self.port), *COMMON, *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            assert self.proc.poll() is None, f"server died:\n{self.log()[-3000:]}"
            try:
                if requests.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(self.log()[-3000:])

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def greedy(self, prompt, n):
        r = requests.post(self.base + "/generate", timeout=120, json={
            "text": prompt, "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}})
        r.raise_for_status()
        return r.json()["output_ids"]

    def stop(self):
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


def _reference(model_dir):
    with open(os.path.join(model_dir, "hf_greedy.json")) as f:
        return json.load(f)


def test_plain_and_ours_match_transformers(model_dir, tmp_path):
    ref = _reference(model_dir)
    n = ref["new_tokens"]
    plain = Server("sglang.launch_server", model_dir, "--attention-backend", "torch_native",
                   log_path=str(tmp_path / "plain.log"))
    try:
        plain_tokens = {p: plain.greedy(p, n) for p in ref["greedy"]}
        _logits_probe_checks(plain.base, model_dir)
    finally:
        plain.stop()
    assert plain_tokens == ref["greedy"]

    ours = Server("sglang_sparse.launch_server", model_dir, "--art-patience", "3",
                  log_path=str(tmp_path / "ours.log"))
    try:
        assert {p: ours.greedy(p, n) for p in ref["greedy"]} == ref["greedy"]
        _openai_checks(ours.base)
        _frontend_checks(ours.base)
    finally:
        ours.stop()
    log = ours.log()
    # The scheduler process built our backend with the launcher's config.
    assert "'sparse' attention backend SparseTorchNativeAttnBackend" in log
    assert '"patience": 3' in log


def _logits_probe_checks(base, model_dir):
    """benchmarks/serving_logits.py's request (every vocabulary log-probability of each greedy position)
    against a real server: the arg-max of each position is the greedy token, every entry is filled, and the
    centred-logit comparison of a run with itself is ~0 and with shifted values is not."""
    import numpy as np

    from benchmarks.serving_logits import compare, probe

    with open(os.path.join(model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    prompt = [int(x) for x in np.random.default_rng(7).integers(10, vocab - 10, 200)]
    tokens, lp = probe(base, prompt, 4, vocab)
    assert lp.shape == (4, vocab) and np.isfinite(lp).all()
    assert [int(np.argmax(row)) for row in lp] == list(tokens)
    same = compare(tokens, lp, tokens, lp)
    assert same["positions_compared"] == 4 and same["tokens_equal"] and max(same["rel_err"]) == 0.0
    noisy = lp + np.random.default_rng(8).normal(0, 0.1, lp.shape)
    assert min(compare(tokens, lp, tokens, noisy)["rel_err"]) > 1e-3


def _openai_checks(base):
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="none")
    model = client.models.list().data[0].id
    c = client.completions.create(model=model, prompt="the quick brown", max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens == 10 and c.choices[0].text
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 8
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "one two"}],
                                            max_tokens=6, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    pieces = [ev.choices[0].delta.content for ev in stream if ev.choices and ev.choices[0].delta.content]
    assert pieces


def _frontend_checks(base):
    import sglang as sgl

    @sgl.function
    def qa(s, question):
        s += "question: " + question + "\nanswer:" + sgl.gen("answer", max_tokens=6, temperature=0)
        s += " choice:" + sgl.select("pick", choices=["paris", "france", "dog"])

    backend = sgl.RuntimeEndpoint(base)
    state = qa.run(question="what is the capital", backend=backend)
    assert state["answer"] and state["pick"] in ("paris", "france", "dog")
    states = qa.run_batch([{"question": q} for q in ("one", "two", "three")], backend=backend, num_threads=3)
    assert all(s["answer"] and s["pick"] in ("paris", "france", "dog") for s in states)


@pytest.mark.parametrize("argv, line", [
    (["--sparse-decode", "prhs", "--page-size", "8"], "error: --device:"),
    (["--art", "on", "--attention-backend", "torch_native"], "error: --attention-backend:"),
])
def test_launcher_rejects_combinations_before_loading(model_dir, argv, line):
    r = subprocess.run([sys.executable, "-m", "sglang_sparse.launch_server", "--model-path", model_dir,
                        "--device", "cpu", *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    errors = [l for l in r.stderr.splitlines() if "error" in l]
    assert len(errors) == 1 and errors[0].startswith(f"python -m sglang_sparse.launch_server: {line}"), r.stderr
    assert "Load weight" not in r.stderr and "Loading safetensors" not in r.stderr


def test_ours_under_irregular_load(model_dir, tmp_path):
    """``benchmarks/serving_stress.py`` against our launcher on CPU (mechanisms off): prompts sharing prefixes,
    aborted requests and a KV pool small enough that SGLang may retract running requests. Every request must be
    answered in full or aborted, the server must answer after idling, and its log must show no traceback
    and no leaked KV slot."""
    import json

    out = tmp_path / "stress"
    env = dict(ENV, OUT=str(out))
    flags = "--device cpu --skip-server-warmup --max-total-tokens 1024 --dtype float32"
    r = subprocess.run([sys.executable, "-m", "benchmarks.serving_stress", "--model", model_dir, "--flags", flags,
                        "--requests", "12", "--concurrency", "6", "--min-len", "100", "--max-len", "300",
                        "--max-new", "250", "--abort-frac", "0.25", "--idle-s", "3", "--port", str(_free_port())],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    res = json.loads((out / "stress_stress.json").read_text())
    assert r.returncode == 0 and res["passed"], (res, r.stdout[-2000:], r.stderr[-2000:])
    assert res["ok"] + res["aborted"] == 12, res      # (retractions are likely here, not certain: reported only)
