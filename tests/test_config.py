"""Flag parsing, range validation, combination validation and the config's transport."""

import dataclasses
import json
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sglang_sparse import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_are_all_off_and_sglang_flags_pass_through():
    cfg, rest = C.parse_known_args(["--model-path", "/m", "--page-size", "16", "--tp", "2"])
    assert not cfg.any_enabled
    assert cfg == C.SparseConfig()
    assert rest == ["--model-path", "/m", "--page-size", "16", "--tp", "2"]


def test_prhs_defaults_are_the_setting_the_quality_runs_kept():
    """`--sparse-decode prhs` alone ranks pages by their estimated mass and stops at an estimated dropped mass of
    0.1, every page allowed: the setting whose served answers stayed within 2 points of dense on average, no cell
    more than 5 below, on Qwen2.5-Coder 0.5B (4K-32K) and 1.5B (16K/32K) (rows ``prhs-est-d0.1`` of
    benchmarks/results/quality_qwen2.5-coder-*.json). With the min/max ranking the bound does not stop the
    selection, so ``--prhs-select bounds`` without a budget gets 1/2 (rows ``prhs-b1/2``); a budget given wins."""
    cfg, _ = C.parse_known_args(["--sparse-decode", "prhs"])
    assert (cfg.prhs.select, cfg.prhs.delta, cfg.prhs.budget) == ("estimate", 0.1, 1.0)
    assert cfg.prhs.budget_pages(512) == 512
    cfg, _ = C.parse_known_args(["--sparse-decode", "prhs", "--prhs-select", "bounds"])
    assert (cfg.prhs.select, cfg.prhs.budget) == ("bounds", 0.5) and cfg.prhs.budget_pages(512) == 256
    for argv in (["--prhs-select=bounds", "--prhs-budget", "1/8"], ["--prhs-budget=1/8", "--prhs-select", "bounds"]):
        cfg, _ = C.parse_known_args(["--sparse-decode", "prhs", *argv])
        assert cfg.prhs.budget == 0.125, argv
    cfg, _ = C.parse_known_args(["--sparse-decode", "prhs", "--prhs-budget", "1/4"])
    assert (cfg.prhs.select, cfg.prhs.budget) == ("estimate", 0.25)


def test_estimate_default_refuses_an_unsupported_head_dim_before_loading():
    """The estimate needs a power-of-two head_dim >= 32: a model without one is refused by the launcher's model
    check (before SGLang loads anything), naming the way out; ``--prhs-select bounds`` serves it."""
    cfg, _ = C.parse_known_args(["--sparse-decode", "prhs"])
    model = {"num_hidden_layers": 4, "num_attention_heads": 32, "hidden_size": 2560, "num_key_value_heads": 32,
             "architectures": ["LlamaForCausalLM"]}                              # head_dim 80
    with pytest.raises(C.ConfigError, match=r"--prhs-select: .*head_dim >= 32, this model has 80.*bounds"):
        C.validate_model(cfg, model)
    C.validate_model(cfg, {**model, "hidden_size": 4096})                        # head_dim 128
    bounds, _ = C.parse_known_args(["--sparse-decode", "prhs", "--prhs-select", "bounds"])
    C.validate_model(bounds, model)


def test_every_flag_reaches_its_field():
    argv = ["--sparse-prefill", "claa", "--claa-keep-ratio", "0.1", "--claa-filter-layer", "12",
            "--claa-window", "16", "--claa-num-layers", "3", "--claa-pool-kernel", "5",
            "--claa-min-prompt-len", "1000", "--claa-max-prompt-len", "65536",
            "--sparse-decode", "prhs", "--prhs-page-size", "64", "--prhs-delta", "0.01",
            "--prhs-budget", "1/32", "--prhs-reselect-interval", "4", "--prhs-dilation", "1",
            "--prhs-layers-per-selection", "2", "--prhs-sink-pages", "2", "--prhs-recent-pages", "3",
            "--prhs-min-context-len", "8192", "--prhs-audit-interval", "16",
            "--prhs-audit-measure", "output-error", "--prhs-audit-max-scale", "4", "--prhs-select", "bounds",
            "--art", "on", "--art-tau-mag", "0.02", "--art-tau-dir", "0.001",
            "--art-patience", "5", "--art-eps-cert", "0.05", "--art-min-blocks", "2", "--tp", "1"]
    cfg, rest = C.parse_known_args(argv)
    assert rest == ["--tp", "1"]
    assert cfg.claa == C.ClaaConfig("claa", 0.1, 12, 16, 3, 5, 1000, 65536)
    assert cfg.prhs == C.PrhsConfig("prhs", 64, 0.01, 1 / 32, 4, 1, 2, 2, 3, 8192, 16, 4,
                                      audit_measure="output-error", select="bounds")
    assert cfg.art == C.ArtConfig("on", 0.02, 0.001, 5, 0.05, 2)
    assert len(C.FLAG_NAMES) == len(set(C.FLAG_NAMES)) == 29
    est, _ = C.parse_known_args(["--sparse-decode", "prhs", "--prhs-select", "estimate"])
    assert est.prhs.select == "estimate" and est.prhs.select_params(64).estimate
    assert not cfg.prhs.select_params(64).estimate


@pytest.mark.parametrize("argv, flag", [
    (["--sparse-prefill", "gemfilter"], "--sparse-prefill"),
    (["--claa-keep-ratio", "0"], "--claa-keep-ratio"),
    (["--claa-keep-ratio", "1.5"], "--claa-keep-ratio"),
    (["--claa-window", "0"], "--claa-window"),
    (["--claa-num-layers", "0"], "--claa-num-layers"),
    (["--claa-filter-layer", "2", "--claa-num-layers", "4"], "--claa-filter-layer"),
    (["--claa-pool-kernel", "4"], "--claa-pool-kernel"),
    (["--claa-min-prompt-len", "8"], "--claa-min-prompt-len"),
    (["--claa-max-prompt-len", "-1"], "--claa-max-prompt-len"),
    (["--sparse-decode", "quest"], "--sparse-decode"),
    (["--prhs-page-size", "8"], "--prhs-page-size"),
    (["--prhs-page-size", "48"], "--prhs-page-size"),
    (["--prhs-delta", "1"], "--prhs-delta"),
    (["--prhs-delta", "-0.1"], "--prhs-delta"),
    (["--prhs-budget", "0"], "--prhs-budget"),
    (["--prhs-budget", "2.5"], "--prhs-budget"),
    (["--prhs-budget", "2"], "--prhs-budget"),
    (["--prhs-budget", "abc"], "--prhs-budget"),
    (["--prhs-audit-interval", "-1"], "--prhs-audit-interval"),
    (["--prhs-audit-measure", "output"], "--prhs-audit-measure"),
    (["--prhs-select", "quest"], "--prhs-select"),
    (["--sparse-decode", "prhs", "--prhs-select", "estimate", "--art", "on", "--art-eps-cert", "0.01"],
     "--art-eps-cert"),
    (["--prhs-audit-max-scale", "3"], "--prhs-audit-max-scale"),
    (["--prhs-audit-max-scale", "0"], "--prhs-audit-max-scale"),
    (["--prhs-audit-max-scale", "128"], "--prhs-audit-max-scale"),
    (["--prhs-reselect-interval", "0"], "--prhs-reselect-interval"),
    (["--prhs-dilation", "-1"], "--prhs-dilation"),
    (["--prhs-layers-per-selection", "0"], "--prhs-layers-per-selection"),
    (["--prhs-sink-pages", "-1"], "--prhs-sink-pages"),
    (["--prhs-recent-pages", "0"], "--prhs-recent-pages"),
    (["--prhs-min-context-len", "-5"], "--prhs-min-context-len"),
    (["--art", "yes"], "--art"),
    (["--art-tau-mag", "-1"], "--art-tau-mag"),
    (["--art-tau-dir", "3"], "--art-tau-dir"),
    (["--art-patience", "0"], "--art-patience"),
    (["--art-eps-cert", "1"], "--art-eps-cert"),
    (["--art-min-blocks", "0"], "--art-min-blocks"),
])
def test_bad_values_name_their_flag(argv, flag):
    with pytest.raises(C.ConfigError) as e:
        C.parse_known_args(argv)
    assert flag in str(e.value)


def _server_args(**kw):
    base = dict(attention_backend="sparse", prefill_attention_backend=None, decode_attention_backend=None,
                speculative_algorithm=None, page_size=32, enable_mixed_chunk=False, chunked_prefill_size=8192,
                device="cuda", disable_prefill_cuda_graph=True, cuda_graph_backend_prefill=None,
                disable_cuda_graph=False)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("ours, sglang, flag", [
    (["--sparse-decode", "prhs"], dict(attention_backend="flashinfer"), "--attention-backend"),
    (["--art", "on"], dict(decode_attention_backend="triton"), "--decode-attention-backend"),
    (["--sparse-prefill", "claa"], dict(prefill_attention_backend="fa3"), "--prefill-attention-backend"),
    (["--sparse-decode", "prhs"], dict(speculative_algorithm="EAGLE"), "--speculative-algorithm"),
    (["--sparse-decode", "prhs"], dict(page_size=1), "--page-size"),
    (["--art", "on"], dict(page_size=8), "--page-size"),
    (["--sparse-decode", "prhs", "--prhs-page-size", "64"], dict(page_size=32), "--prhs-page-size"),
    (["--sparse-prefill", "claa"], dict(enable_mixed_chunk=True), "--enable-mixed-chunk"),
    (["--sparse-decode", "prhs"], dict(device="cpu"), "--device"),
    (["--sparse-prefill", "claa"], dict(device="cpu"), "--device"),
    (["--sparse-prefill", "claa"], dict(page_size=1), "--page-size"),
    (["--sparse-prefill", "claa"], dict(disable_prefill_cuda_graph=False, cuda_graph_backend_prefill="breakable"),
     "--cuda-graph-backend-prefill"),
    (["--sparse-prefill", "claa"], dict(disable_prefill_cuda_graph=False), "--cuda-graph-backend-prefill"),
    (["--sparse-prefill", "claa", "--claa-max-prompt-len", "32768"], dict(chunked_prefill_size=8192),
     "--chunked-prefill-size"),
])
def test_incompatible_combinations(ours, sglang, flag):
    cfg, _ = C.parse_known_args(ours)
    with pytest.raises(C.ConfigError) as e:
        C.validate_with_server_args(cfg, _server_args(**sglang))
    assert str(e.value).startswith(flag)


def test_all_off_accepts_any_backend_and_valid_combinations_pass():
    C.validate_with_server_args(C.SparseConfig(), _server_args(attention_backend="fa3", page_size=1,
                                                               speculative_algorithm="EAGLE"))
    cfg, _ = C.parse_known_args(["--sparse-prefill", "claa", "--sparse-decode", "prhs", "--art", "on"])
    C.validate_with_server_args(cfg, _server_args(chunked_prefill_size=-1))


def test_launcher_fills_in_sglang_flags():
    cfg, rest = C.parse_known_args(["--model-path", "m", "--sparse-decode", "prhs", "--prhs-page-size", "64",
                                    "--sparse-prefill", "claa", "--claa-max-prompt-len", "65536"])
    out = C.adjust_sglang_argv(cfg, rest)
    assert out == ["--model-path", "m", "--attention-backend", "sparse", "--page-size", "64",
                   "--max-running-requests", "64", "--chunked-prefill-size", "65536", "--disable-prefill-cuda-graph"]
    cfg2, rest2 = C.parse_known_args(["--sparse-prefill", "claa"])
    assert C.adjust_sglang_argv(cfg2, rest2) == ["--attention-backend", "sparse", "--page-size", "32",
                                                 "--max-running-requests", "64", "--disable-prefill-cuda-graph"]
    # Flags the user gave are never overridden.
    given = ["--attention-backend=flashinfer", "--page-size", "16", "--chunked-prefill-size", "4096",
             "--max-running-requests", "8", "--cuda-graph-backend-prefill", "disabled"]
    assert C.adjust_sglang_argv(cfg, given) == given
    assert C.adjust_sglang_argv(C.SparseConfig(), []) == ["--attention-backend", "sparse"]


def test_json_round_trip_with_random_values():
    rng = random.Random(os.urandom(8))
    for _ in range(50):
        cfg = C.SparseConfig(
            claa=C.ClaaConfig("claa", rng.uniform(0.01, 1), rng.choice([None, rng.randint(4, 40)]),
                              rng.randint(1, 32), rng.randint(1, 4), rng.choice([1, 3, 7]),
                              rng.randint(40, 9000), rng.randint(0, 10 ** 5)),
            prhs=C.PrhsConfig("prhs", rng.choice([None, 16, 32, 64]), rng.uniform(0, 0.99),
                              rng.choice([rng.uniform(0.01, 1), float(rng.randint(8, 500))]),
                              rng.randint(1, 9), rng.randint(0, 3), rng.randint(1, 4), rng.randint(0, 3),
                              rng.randint(1, 4), rng.randint(0, 10 ** 5),
                              select=rng.choice(["bounds", "estimate"])),
            art=C.ArtConfig("on", rng.uniform(0, 1), rng.uniform(0, 2), rng.randint(1, 9),
                            rng.choice([None, rng.uniform(0.001, 0.9)]), rng.randint(1, 9)))
        if cfg.prhs.select == "estimate":       # ART's certified stop needs page bounds
            cfg = dataclasses.replace(cfg, art=dataclasses.replace(cfg.art, eps_cert=None))
        server_args = SimpleNamespace()
        C.attach(server_args, cfg)
        assert C.from_server_args(server_args) == cfg
    assert C.from_server_args(SimpleNamespace()) == C.SparseConfig()
    with pytest.raises(C.ConfigError):
        C.SparseConfig.from_json(json.dumps({"prhs": {"delta": 2.0}}))
    with pytest.raises(C.ConfigError):
        C.SparseConfig.from_json(json.dumps({"prhs": {"detla": 0.1}}))


def test_budget_pages():
    p = C.PrhsConfig("prhs", budget=1 / 16, sink_pages=1, recent_pages=2)
    assert [p.budget_pages(n) for n in (1, 3, 16, 17, 160, 4096)] == [1, 3, 3, 3, 10, 256]
    q = C.PrhsConfig("prhs", budget=100.0)
    assert [q.budget_pages(n) for n in (2, 50, 100, 1000)] == [2, 50, 100, 100]


def _launch(*argv):
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1")
    return subprocess.run([sys.executable, "-m", "sglang_sparse.launch_server", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_launcher_exit_status_2_with_one_line(tmp_path):
    r = _launch("--model-path", str(tmp_path), "--prhs-delta", "1.5")
    assert r.returncode == 2
    errors = [l for l in r.stderr.splitlines() if "error" in l]
    assert errors == ["python -m sglang_sparse.launch_server: error: --prhs-delta: must be in [0, 1), got 1.5"]


def test_launcher_help_shows_both_groups():
    r = _launch("--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--model-path", "--attention-backend", "--page-size", "--sparse-prefill", "--claa-keep-ratio",
                 "--sparse-decode", "--prhs-delta", "--prhs-budget", "--art", "--art-patience"):
        assert flag in r.stdout, flag
    text = " ".join(r.stdout.split())
    assert "(default: None)" not in text
    for flag, shown in (("--claa-filter-layer", "auto"), ("--prhs-page-size", "auto"), ("--art-eps-cert", "off")):
        help_text = text[text.rindex(flag + " "):]      # its entry in the options list (after the usage)
        start = help_text.index("(default:")
        assert help_text[start:help_text.index(")", start) + 1] == f"(default: {shown})", help_text[:300]


def test_interpreted_decode_mode_admits_cpu_for_decode_only(monkeypatch):
    """SGLANG_SPARSE_INTERPRET=1 with TRITON_INTERPRET=1 (a developer mode: the decode kernels interpreted on a CPU
    server) admits --device cpu for PrHS / ART, still refuses CLAA there, and builds the CPU backend that carries
    the decode wiring; without TRITON_INTERPRET the mode is off."""
    from sglang_sparse.backend import SparseTorchNativeAttnBackend, SparseTorchNativeDecodeBackend, backend_class_for

    prhs, _ = C.parse_known_args(["--sparse-decode", "prhs", "--art", "on"])
    claa, _ = C.parse_known_args(["--sparse-prefill", "claa"])
    monkeypatch.setenv(C.INTERPRET_ENV, "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not C.interpreted_decode() and backend_class_for("cpu") is SparseTorchNativeAttnBackend
    with pytest.raises(C.ConfigError, match="^--device"):
        C.validate_with_server_args(prhs, _server_args(device="cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert C.interpreted_decode()
    C.validate_with_server_args(prhs, _server_args(device="cpu"))
    with pytest.raises(C.ConfigError, match="^--device"):
        C.validate_with_server_args(claa, _server_args(device="cpu"))
    assert backend_class_for("cpu") is SparseTorchNativeDecodeBackend
    assert SparseTorchNativeDecodeBackend._make_decoder is not SparseTorchNativeAttnBackend._make_decoder
