"""The server settings of the GPU benchmark scripts parse and validate here, so that a mistyped or invalid
flag fails in CI instead of after a GPU machine has started: every sglang_sparse setting of
benchmarks/serving_decode.py, serving_logits.py, serving_prefill.py and quality_gpu.py goes through the launcher's parser and
value checks, leaves none of our flags to SGLang, and turns on what its name says."""

import pytest

from benchmarks import quality_gpu, serving_decode, serving_logits, serving_prefill
from benchmarks.serving import OURS
from sglang_sparse import config as C

_OURS_PREFIXES = ("--sparse-", "--claa-", "--prhs-", "--art")


def _settings():
    for name, (launcher, flags) in serving_decode.CONFIGS.items():
        if launcher == OURS:
            yield f"serving_decode:{name}", flags
    for name, (launcher, flags) in serving_logits.CONFIGS.items():
        if launcher == OURS:
            yield f"serving_logits:{name}", flags
    for name, (launcher, flags, _) in serving_prefill.CONFIGS.items():
        if launcher == OURS:
            yield f"serving_prefill:{name}", flags
    for name, (module, flags) in quality_gpu.SETTINGS.items():
        if module == "sglang_sparse.launch_server":
            yield f"quality_gpu:{name}", quality_gpu.COMMON_FLAGS + flags


@pytest.mark.parametrize("name,flags", list(_settings()), ids=[n for n, _ in _settings()])
def test_benchmark_setting_parses_and_validates(name, flags):
    cfg, rest = C.parse_known_args(["--model-path", "m"] + list(flags))
    C.validate_values(cfg)
    assert not [f for f in rest if f.startswith(_OURS_PREFIXES)], rest
    label = name.split(":", 1)[1]
    assert cfg.claa.enabled == ("claa" in label), (label, cfg)
    assert cfg.prhs.enabled == ("prhs" in label or "dense_exact" in label), (label, cfg)
    assert cfg.art.enabled == ("art" in label), (label, cfg)
    if "_g4" in label:
        assert cfg.prhs.layers_per_selection == 4
    if "_r4" in label:
        assert cfg.prhs.reselect_interval == 4
    if "F24" in label:
        assert cfg.claa.filter_layer == 24


def _all_flag_sets():
    decode_common = serving_decode.common_flags("m", 34048, 8)[2:]      # without --model-path
    prefill_common = serving_prefill.common_flags("m", 66560, 65536)[2:]
    for name, (_, flags) in serving_decode.CONFIGS.items():
        yield f"serving_decode:{name}", decode_common + list(flags)
    for name, (_, flags) in serving_logits.CONFIGS.items():
        yield f"serving_logits:{name}", decode_common + list(flags)
    for name, (_, flags, _) in serving_prefill.CONFIGS.items():
        yield f"serving_prefill:{name}", prefill_common + list(flags)
    for name, (_, flags) in quality_gpu.SETTINGS.items():
        yield f"quality_gpu:{name}", quality_gpu.COMMON_FLAGS + list(flags)


def test_benchmark_flags_are_known_to_sglang_or_us():
    """Every flag of every setting (plain SGLang ones too) is one SGLang's parser or ours accepts."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    from sglang_sparse.plugin import register

    register()                               # adds the `sparse` backend to SGLang's choices
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    C.add_cli_args(parser)
    for name, flags in _all_flag_sets():
        try:
            parser.parse_args(["--model-path", "m"] + flags)
        except SystemExit as e:             # argparse reports the bad flag on stderr and exits 2
            pytest.fail(f"{name}: {flags} rejected (exit {e.code})")


def test_profile_trace_summary(tmp_path):
    """The decode profile's busy time is the union of kernel intervals; totals and launches per step."""
    import gzip
    import json
    import random

    from benchmarks.profile_decode import summarize_trace

    rng = random.Random()
    a, b = rng.uniform(5, 50), rng.uniform(5, 50)
    ev = [{"cat": "kernel", "name": "attn", "ts": 0.0, "dur": a},
          {"cat": "kernel", "name": "gemm", "ts": a / 2, "dur": a},          # overlaps the first
          {"cat": "kernel", "name": "attn", "ts": 2 * a + 10, "dur": b},     # after a 10 us gap
          {"cat": "kernel", "name": "_decode_split_kernel", "ts": 2 * a + 20 + b, "dur": a},   # an attention kernel
          {"cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 999.0}]
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    res = summarize_trace(str(path), steps=2)
    assert res["kernels"] == 4
    assert abs(res["wall_us_per_step"] - (3 * a + 20 + b) / 2) < 1e-6
    assert abs(res["busy_us_per_step"] - (2.5 * a + b) / 2) < 1e-6
    top = {r["name"]: r for r in res["top"]}
    assert abs(top["attn"]["us_per_step"] - (a + b) / 2) < 1e-6 and top["attn"]["launches_per_step"] == 1
    assert set(top) == {"attn", "gemm", "_decode_split_kernel"}
    assert abs(res["attention_us_per_step"] - a / 2) < 1e-6      # only ours is an attention kernel by name
    assert abs(summarize_trace(str(path), steps=2, top=1)["attention_us_per_step"] - a / 2) < 1e-6   # list cut
    assert abs(res["step_without_attention_us"] - (res["kernel_us_per_step"] - a / 2 + res["wall_us_per_step"]
                                                    - res["busy_us_per_step"])) < 1e-6


def test_profile_attention_split():
    """Which kernels count as attention (FlashInfer's decode/prefill and merge, all of ours) and the step
    time left without them (other kernels + GPU idle)."""
    import random

    from benchmarks.profile_decode import attention_split

    rng = random.Random()
    t = {n: rng.uniform(1, 100) for n in ("void flashinfer::BatchPrefillWithPagedKVCacheKernel<x>",
                                         "void flashinfer::PersistentVariableLengthMergeStatesKernel<8u>",
                                         "_decode_split_kernel", "_page_select_kernel", "_merge_splits_kernel",
                                         "nvjet_sm90_tst_128x8", "void flashinfer::norm::FusedAddRMSNormKernel<8u>",
                                         "void (anonymous namespace)::store_kvcache<2048l>")}
    wall, busy = rng.uniform(900, 1000), rng.uniform(500, 800)
    res = attention_split({"top": [{"name": n, "us_per_step": v} for n, v in t.items()],
                           "kernel_us_per_step": sum(t.values()), "wall_us_per_step": wall, "busy_us_per_step": busy})
    att = sum(list(t.values())[:5])
    assert abs(res["attention_us_per_step"] - att) < 1e-9
    assert abs(res["step_without_attention_us"] - (sum(list(t.values())[5:]) + wall - busy)) < 1e-9


def test_profile_waits_for_a_new_full_decode_batch(tmp_path):
    """The decode profile starts only on a full batch logged after its requests were sent."""
    from benchmarks.profile_decode import _wait_for_decode_batch

    log = tmp_path / "server.log"
    log.write_text("[t] Decode batch, #running-req: 8, #token: 100, cuda graph: True\n")
    offset = log.stat().st_size
    assert _wait_for_decode_batch(str(log), 8, 0.2, 0)
    assert not _wait_for_decode_batch(str(log), 8, 0.2, offset)          # only the earlier batch
    with open(log, "a") as f:
        f.write("[t] Decode batch, #running-req: 3, #token: 50\n")
    assert not _wait_for_decode_batch(str(log), 8, 0.2, offset)          # not full
    with open(log, "a") as f:
        f.write("[t] Decode batch, #running-req: 8, #token: 200\n")
    assert _wait_for_decode_batch(str(log), 8, 0.2, offset)


def test_logits_comparison_centres_and_stops_at_divergence():
    """serving_logits compares centred logits (a per-position constant, the log-partition, cancels) and only
    while the earlier greedy tokens agree."""
    import numpy as np

    from benchmarks.serving_logits import compare

    rng = np.random.default_rng()
    ref = rng.normal(size=(4, 50))
    shifted = ref + rng.normal(size=(4, 1)) * 10            # log-probabilities of the same logits
    same = compare([1, 2, 3, 4], ref, [1, 2, 3, 4], shifted)
    assert same["positions_compared"] == 4 and max(same["rel_err"]) < 1e-12 and same["tokens_equal"]
    noisy = shifted + 0.01 * rng.normal(size=(4, 50))
    res = compare([1, 2, 3, 4], ref, [1, 9, 3, 4], noisy)   # diverges after position 1
    assert res["positions_compared"] == 2 and not res["tokens_equal"]
    assert 1e-4 < res["rel_err"][1] < 0.1 and res["max_decode_rel_err"] == res["rel_err"][1]


def test_server_helper_refuses_a_busy_port_and_stops_its_server_on_sigterm(tmp_path):
    """benchmarks.serving.server: a second server on a port that already answers is refused (it would be
    measured instead); a SIGTERM to the benchmark (``timeout``) stops the server it started."""
    import os
    import signal
    import socket
    import sys
    import time
    import urllib.request

    from benchmarks.serving import server

    fake = ("import sys, http.server\n"
            "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        self.send_response(200); self.end_headers(); self.wfile.write(b'ok')\n"
            "    def log_message(self, *a): pass\n"
            "http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", fake]

    def answers():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return True
        except Exception:
            return False

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit):
        with server(cmd, port, str(tmp_path / "a.log"), timeout=60):
            assert answers()
            with pytest.raises(RuntimeError, match="already answers"):
                with server(cmd, port, str(tmp_path / "b.log"), timeout=60):
                    pass
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)           # the handler raises SystemExit here
    assert not answers()                                    # the server went with the benchmark
    assert signal.getsignal(signal.SIGTERM) == before      # and the previous handler is back


def test_problem_lines_match_sglangs_idle_pool_check():
    """The benchmarks' log scan (benchmarks.serving.problem_lines) catches what SGLang's idle pool check
    logs: each phrase is taken from SGLang's own source, so a change of its wording fails here."""
    import inspect

    from sglang.srt.managers.scheduler_components import invariant_checker

    from benchmarks.serving import problem_lines

    src = inspect.getsource(invariant_checker)
    phrases = ["memory leak detected!", "KV double free", "KV page use-after-free", "Mem Leak Detected!"]
    for phrase in phrases:
        assert phrase in src, f"SGLang no longer logs {phrase!r}"
    log = "\n".join(["[2026-12-01 10:00:00] Decode batch, #running-req: 8"]
                    + [f"[2026-12-01 10:00:01] WARNING pool {p} available_size=3" for p in phrases]
                    + ["[2026-12-01 10:00:02] INFO: 127.0.0.1 - \"GET /health HTTP/1.1\" 200 OK"])
    found = problem_lines(log, limit=100)
    assert len(found) == len(phrases) and all(p in line for p, line in zip(phrases, found))


def test_quality_merge_leaves_out_runs_with_unanswered_requests(tmp_path):
    """A setting whose server died mid-run (requests without an answer, scored 0) must not enter the
    quality table as accuracy; a complete run does."""
    import json

    def result(config, errors):
        rows = [{"config": config, "task": "single_needle", "length": L, "accuracy": 0.0 if errors else 0.7,
                 "correct": 0 if errors else 7, "samples": 10, "errors": errors, "where": "sglang-gpu"}
                for L in (1024, 2048)]
        return {"meta": {"config": config, "where": "sglang-gpu"}, "rows": rows, "records": []}

    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(result("claa-keep0.1", 0)))
    bad.write_text(json.dumps(result("art-tau0.01", 10)))
    table = tmp_path / "quality.json"
    quality_gpu.merge([str(good), str(bad)], table, tmp_path / "quality.png")
    configs = {r["config"] for r in json.loads(table.read_text())["rows"]}
    assert configs == {"claa-keep0.1"}


def test_quality_gpu_retries_a_server_that_found_no_kv_memory(monkeypatch):
    """A server that started while others were loading on the same GPU can find no room for its KV pool;
    quality_gpu tries it again (and only then), with the phrase SGLang 0.5.17 actually logs."""
    import inspect

    from sglang.srt.mem_cache import kv_cache_configurator

    assert quality_gpu.NO_KV_MEMORY in inspect.getsource(kv_cache_configurator)
    results = [{"config": "x", "failed": "server did not come up", "log_tail": f"ValueError: Loaded weights "
                f"{quality_gpu.NO_KV_MEMORY} under --mem-fraction-static=0.15"}, {"config": "x", "rows": []}]
    calls = []
    monkeypatch.setattr(quality_gpu, "_run_setting_once", lambda name, args: calls.append(name) or results[len(calls) - 1])
    monkeypatch.setattr(quality_gpu.time, "sleep", lambda s: None)
    assert quality_gpu.run_setting("x", None) == {"config": "x", "rows": []} and len(calls) == 2

    other = {"config": "x", "failed": "server did not come up", "log_tail": "Traceback: something else"}
    calls.clear()
    monkeypatch.setattr(quality_gpu, "_run_setting_once", lambda name, args: calls.append(name) or other)
    assert quality_gpu.run_setting("x", None) is other and len(calls) == 1


def test_serving_decode_allows_a_context_longer_than_the_model_window(tmp_path):
    """128K input + 256 output + margin exceeds Llama-3.1's 131,072 positions: SGLang must be told to accept it."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 131072}))
    env = serving_decode.longer_context_env(str(tmp_path), 131072 + 256 + 1024)
    assert env is not None and env["SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"] == "1"
    assert serving_decode.longer_context_env(str(tmp_path), 32768 + 256 + 1024) is None
    assert serving_decode.longer_context_env(str(tmp_path / "missing"), 10 ** 6) is None
