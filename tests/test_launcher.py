"""The launcher's checks before SGLang is imported: first errors, rules that need the model's config.json, the
device, the flags it adds on a CPU, and the table of environment variables.

Error cases run ``python -m sglang_sparse.launch_server`` as a subprocess: exit status 2, one line on stderr
naming the flag, and (checked separately) without SGLang having been imported. The model rules run the
launcher's own :func:`check_before_sglang` on a model directory that holds only a config.json.
"""

import json
import logging
import os
import re
import subprocess
import sys

import pytest

from sglang_sparse import config as C
from sglang_sparse import launch_server as L

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "python -m sglang_sparse.launch_server: error: "

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 131072, "vocab_size": 128256, "torch_dtype": "bfloat16"}
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 4096, "vocab_size": 400, "torch_dtype": "float32"}
ALL_ON = ["--sparse-prefill", "claa", "--sparse-decode", "prhs", "--art", "on"]


def _model(tmp_path, name="model", **fields):
    """A model directory with only a config.json: Llama-3.1-8B's shape, changed by ``fields`` (None removes)."""
    d = tmp_path / name
    d.mkdir()
    config = {k: v for k, v in {**LLAMA_8B, **fields}.items() if v is not None}
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


def _env(**kw):
    env = {k: v for k, v in os.environ.items()
           if k not in ("SGLANG_USE_CPU_ENGINE", C.INTERPRET_ENV, "TRITON_INTERPRET", C.RETIRED_CONFIG_ENV)}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(kw)
    return env


def _launch(*argv, cwd=ROOT, **env):
    return subprocess.run([sys.executable, "-m", "sglang_sparse.launch_server", *argv], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=120)


def _one_error_line(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), r.stderr[-3000:]
    return lines[0][len(PREFIX):]


_WRAPPER = """
import runpy, sys
out, sys.argv = sys.argv[1], ["launch_server"] + sys.argv[2:]
code = None
try:
    runpy.run_module("sglang_sparse.launch_server", run_name="__main__")
except SystemExit as e:
    code = e.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"sglang", "torch", "transformers", "triton"})
open(out, "w").write(" ".join([str(code)] + heavy))
"""


def _heavy_modules(tmp_path, *argv, **env):
    """(exit status, the heavy packages imported) of the launcher run in-process on ``argv``."""
    out = tmp_path / "modules.txt"
    subprocess.run([sys.executable, "-c", _WRAPPER, str(out), *argv], cwd=ROOT, env=_env(**env),
                   capture_output=True, text=True, timeout=120)
    code, *heavy = out.read_text().split()
    return (None if code == "None" else int(code)), heavy


# ---------------------------------------------------------------------------------------------- first errors
def test_missing_model_path_is_one_line_naming_our_launcher():
    msg = _one_error_line(_launch("--sparse-decode", "prhs"))
    assert msg.startswith("--model-path: missing")


@pytest.mark.parametrize("path", ["/nonexistent/model", "./no-such-model", "../no-such-model"])
def test_local_model_path_that_does_not_exist(path):
    msg = _one_error_line(_launch("--model-path", path, "--art", "on"))
    assert msg.startswith("--model-path: ") and f"{path} does not exist" in msg


def test_model_path_inside_an_existing_folder_counts_as_local_but_a_hub_id_is_left_to_sglang(tmp_path):
    (tmp_path / "models").mkdir()
    msg = _one_error_line(_launch("--model", "models/llama", cwd=tmp_path))
    assert msg.startswith("--model-path: models/llama does not exist")
    # org/name with no folder "org" here: a hub id; our next check (a bad value of ours) speaks instead.
    msg = _one_error_line(_launch("--model-path", "no-such-org/no-such-model", "--prhs-delta", "1.5", cwd=tmp_path))
    assert msg == "--prhs-delta: must be in [0, 1), got 1.5"


def test_no_accelerator_without_device_cpu_suggests_it(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    msg = _one_error_line(_launch("--model-path", _model(tmp_path)))
    assert msg.startswith("--device: ") and "--device cpu" in msg
    # SGLang's CPU engine switch means the CPU without --device: accepted (fails later, on our CPU refusal).
    msg = _one_error_line(_launch("--model-path", _model(tmp_path, "m2"), "--art", "on", SGLANG_USE_CPU_ENGINE="1"))
    assert msg.startswith("--device: ") and "got --device cpu" in msg


def test_prhs_layer_groups_must_divide_the_claa_filter_layer_before_loading(tmp_path):
    """The Llama-3.1-8B shape (32 layers, CLAA filter layer 15 by default) with 4 layers per PrHS selection."""
    msg = _one_error_line(_launch("--model-path", _model(tmp_path), *ALL_ON, "--prhs-layers-per-selection", "4"))
    assert msg.startswith("--prhs-layers-per-selection: must divide the CLAA filter layer (15)")


@pytest.mark.parametrize("case", ["missing", "nonexistent", "our value", "model rule"])
def test_errors_come_before_sglang_or_torch_is_imported(tmp_path, case):
    argv = {"missing": ["--art", "on"],
            "nonexistent": ["--model-path", "/nonexistent/model"],
            "our value": ["--model-path", str(tmp_path), "--claa-pool-kernel", "4"],
            "model rule": ["--model-path", _model(tmp_path), *ALL_ON, "--prhs-layers-per-selection", "2"]}[case]
    code, heavy = _heavy_modules(tmp_path, *argv)
    assert code == 2 and heavy == [], (code, heavy)


def test_no_accelerator_check_imports_torch_but_not_sglang(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the launcher would go on to start SGLang")
    code, heavy = _heavy_modules(tmp_path, "--model-path", _model(tmp_path))
    assert "sglang" not in heavy and "transformers" not in heavy, heavy


def test_device_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    msg = _one_error_line(_launch("--model-path", _model(tmp_path), "--device", "cuda", "--art", "on"))
    assert msg.startswith("--device: cuda: no CUDA GPU found") and "--device cpu" in msg


# ---------------------------------------------------------------------------------------------- model rules
@pytest.fixture(autouse=True)
def _cuda_as_if_present(monkeypatch):
    """In-process checks below run as on a GPU machine (``--device cuda``); the subprocess tests are unaffected."""
    monkeypatch.setattr(L, "cuda_available", lambda: True)


def _check(tmp_path, *argv, **fields):
    """The launcher's checks on a model dir of the Llama-8B shape changed by ``fields``, with ``--device cuda``."""
    return L.check_before_sglang(["--model-path", _model(tmp_path, **fields), "--device", "cuda", *argv])


def _refused(tmp_path, *argv, **fields) -> str:
    with pytest.raises(C.ConfigError) as e:
        _check(tmp_path, *argv, **fields)
    return str(e.value)


def test_claa_filter_layer_must_be_below_the_model_depth(tmp_path):
    assert _refused(tmp_path, "--sparse-prefill", "claa", "--claa-filter-layer", "32") == \
        "--claa-filter-layer: must be below the model's 32 layers, got 32"
    (tmp_path / "ok").mkdir()
    _check(tmp_path / "ok", "--sparse-prefill", "claa", "--claa-filter-layer", "31")


def test_layer_groups_against_the_auto_and_the_given_filter_layer(tmp_path):
    for i, (extra, layers, ok) in enumerate([
            (["--prhs-layers-per-selection", "4"], 32, False),       # auto 15
            (["--prhs-layers-per-selection", "5"], 32, True),        # 15 = 3 * 5
            (["--prhs-layers-per-selection", "4", "--claa-filter-layer", "16"], 32, True),
            (["--prhs-layers-per-selection", "3"], 24, False),       # auto 11 for 24 layers
            (["--prhs-layers-per-selection", "13"], 28, True)]):     # auto 13 for 28 layers
        d = tmp_path / str(i)
        d.mkdir()
        if ok:
            _check(d, *ALL_ON, *extra, num_hidden_layers=layers)
        else:
            msg = _refused(d, *ALL_ON, *extra, num_hidden_layers=layers)
            assert msg.startswith(f"--prhs-layers-per-selection: must divide the CLAA filter layer "
                                  f"({C.default_filter_layer(layers)})"), msg
    d = tmp_path / "no-claa"
    d.mkdir()
    _check(d, "--sparse-decode", "prhs", "--prhs-layers-per-selection", "4")      # without CLAA: any g


@pytest.mark.parametrize("fields, words", [
    (dict(query_pre_attn_scalar=144, head_dim=128), "query_pre_attn_scalar=144"),
    (dict(attention_multiplier=0.015625), "attention_multiplier=0.015625"),
    (dict(attn_logit_softcapping=50.0), "soft-capping"),
    (dict(sliding_window=4096), "sliding_window=4096"),
    (dict(layer_types=["sliding_attention", "full_attention"] * 16), "16 of 32 sliding"),
    (dict(use_sliding_window=True, sliding_window=32768), "sliding_window=32768"),
    (dict(quantization_config={"quant_method": "modelopt", "kv_cache_quant_algo": "FP8"}), "FP8 KV cache"),
], ids=["gemma2-scalar", "granite-multiplier", "softcap", "mistral-window", "layer-types", "qwen2-window-on",
        "fp8-checkpoint"])
@pytest.mark.parametrize("mechanism", [["--sparse-decode", "prhs"], ["--art", "on"], ["--sparse-prefill", "claa"]],
                         ids=["prhs", "art", "claa"])
def test_unsupported_attention_features_are_refused(tmp_path, fields, words, mechanism):
    msg = _refused(tmp_path, *mechanism, **fields)
    assert msg.startswith(mechanism[0] + ": ") and "cannot serve this model" in msg and words in msg, msg
    (tmp_path / "off").mkdir()
    _check(tmp_path / "off", **fields)             # every mechanism off: the model is SGLang's business


@pytest.mark.parametrize("fields", [
    dict(query_pre_attn_scalar=128, head_dim=128),                  # the standard 1/sqrt(head_dim) after all
    dict(attention_multiplier=128 ** -0.5),
    dict(attn_logit_softcapping=None),
    dict(sliding_window=None),                                      # Mistral v0.2+
    dict(sliding_window=131072, use_sliding_window=False, max_window_layers=28),     # Qwen2 / Qwen3
    dict(layer_types=["full_attention"] * 32, sliding_window=None),
], ids=["scalar-equal", "multiplier-equal", "softcap-null", "window-null", "qwen2", "layer-types-full"])
def test_standard_attention_is_accepted(tmp_path, fields):
    _check(tmp_path, *ALL_ON, "--prhs-layers-per-selection", "5", **fields)


def test_fp8_kv_cache_flag_is_refused_and_bf16_overrides_an_fp8_checkpoint(tmp_path):
    assert _refused(tmp_path, "--art", "on", "--kv-cache-dtype", "fp8_e4m3").startswith(
        "--kv-cache-dtype: ART read 16-bit KV pages")
    for i, dtype in enumerate(("bf16", "bfloat16", "auto")):
        (tmp_path / str(i)).mkdir()
        _check(tmp_path / str(i), "--art", "on", "--kv-cache-dtype", dtype)
    (tmp_path / "q").mkdir()
    _check(tmp_path / "q", "--art", "on", "--kv-cache-dtype", "bf16",
           quantization_config={"quant_method": "modelopt", "kv_cache_quant_algo": "FP8"})


def test_mla_models_are_refused_by_the_sparse_backend(tmp_path):
    mla = dict(kv_lora_rank=512, architectures=["DeepseekV3ForCausalLM"])
    assert _refused(tmp_path, "--sparse-decode", "prhs", **mla).startswith("--sparse-decode: ")
    (tmp_path / "off").mkdir()
    msg = _refused(tmp_path / "off", **mla)          # all off, but the launcher's default backend is ours
    assert msg.startswith("--attention-backend: ") and "kv_lora_rank=512" in msg, msg
    (tmp_path / "other").mkdir()
    _check(tmp_path / "other", "--attention-backend", "flashinfer", **mla)    # not our backend: SGLang's choice


def test_claa_architecture_allow_list(tmp_path):
    msg = _refused(tmp_path, "--sparse-prefill", "claa", architectures=["Phi3ForCausalLM"])
    assert msg.startswith("--sparse-prefill: CLAA supports") and "Phi3ForCausalLM" in msg
    for arch in C.CLAA_ARCHITECTURES:
        (tmp_path / arch).mkdir()
        _check(tmp_path / arch, "--sparse-prefill", "claa", architectures=[arch])
    (tmp_path / "prhs").mkdir()
    _check(tmp_path / "prhs", "--sparse-decode", "prhs", architectures=["Phi3ForCausalLM"])     # PrHS: any


def test_claa_refuses_pipeline_parallelism(tmp_path):
    assert _refused(tmp_path, "--sparse-prefill", "claa", "--pp-size", "2").startswith("--pp-size: ")
    (tmp_path / "prhs").mkdir()
    _check(tmp_path / "prhs", "--sparse-decode", "prhs", "--pipeline-parallel-size", "2")


def test_model_override_args_are_applied_before_the_rules(tmp_path):
    msg = _refused(tmp_path, "--art", "on", "--json-model-override-args", '{"attn_logit_softcapping": 30.0}')
    assert "soft-capping" in msg


# ---------------------------------------------------------------------------------------------- CPU defaults
def _cpu(tmp_path, *argv, model=None, **env_and_fields):
    path = model or _model(tmp_path, **env_and_fields)
    cfg, sglang_argv, notes = L.check_before_sglang(["--model-path", path, "--device", "cpu", *argv])
    return sglang_argv, [line for _, line in notes]


def _value(argv, flag):
    return int(argv[argv.index(flag) + 1])


def test_cpu_kv_pool_is_sized_from_the_context_and_bounded(tmp_path):
    # Llama-8B shape: 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes = 128 KiB per token -> 2 GiB = 16384 tokens
    argv, notes = _cpu(tmp_path)
    assert _value(argv, "--max-total-tokens") == 16384
    assert any("--max-total-tokens 16384" in n for n in notes), notes
    (tmp_path / "f32").mkdir()
    assert _value(_cpu(tmp_path / "f32", "--dtype", "float32")[0], "--max-total-tokens") == 8192
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "config.json").write_text(json.dumps(TINY))
    assert _value(_cpu(tmp_path, model=str(tiny))[0], "--max-total-tokens") == 4096        # its whole context
    assert _value(_cpu(tmp_path, "--context-length", "100000", model=str(tiny))[0],
                  "--max-total-tokens") == L.CPU_KV_MAX_TOKENS
    for given in (["--max-total-tokens", "1024"], ["--mem-fraction-static", "0.3"]):
        argv, notes = _cpu(tmp_path, *given, model=str(tiny))
        assert argv.count("--max-total-tokens") == given.count("--max-total-tokens") and not notes, (argv, notes)
    (tmp_path / "gpu").mkdir()
    _, argv, _ = L.check_before_sglang(["--model-path", _model(tmp_path / "gpu"), "--device", "cuda"])
    assert "--max-total-tokens" not in argv


def test_interpreted_mode_skips_the_warmup_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv(C.INTERPRET_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    argv, notes = _cpu(tmp_path, "--art", "on")
    assert argv.count("--skip-server-warmup") == 1
    assert [n for n in notes if "minutes" in n and "--skip-server-warmup" in n], notes
    (tmp_path / "given").mkdir()
    argv, notes = _cpu(tmp_path / "given", "--sparse-decode", "prhs", "--skip-server-warmup")
    assert argv.count("--skip-server-warmup") == 1 and [n for n in notes if "minutes" in n], notes
    (tmp_path / "off").mkdir()
    argv, notes = _cpu(tmp_path / "off")       # mechanisms off: decode is torch-native, the warm-up is quick
    assert "--skip-server-warmup" not in argv and not [n for n in notes if "minutes" in n]
    monkeypatch.delenv("TRITON_INTERPRET")
    (tmp_path / "no-interp").mkdir()
    with pytest.raises(C.ConfigError, match="^--device: "):
        _cpu(tmp_path / "no-interp", "--art", "on")


# ---------------------------------------------------------------------------------------------- environment
# Names that appear in the code but are on their way out with the code that reads them.


def test_every_environment_variable_the_code_reads_is_in_the_table():
    read = set()
    patterns = [r"""environ\.get\(\s*["']([A-Z][A-Z0-9_]+)["']""", r"""environ\[\s*["']([A-Z][A-Z0-9_]+)["']\s*\]""",
                r"""getenv\(\s*["']([A-Z][A-Z0-9_]+)["']""", r"""^\s*[A-Z_]*ENV\s*=\s*["']([A-Z][A-Z0-9_]+)["']"""]
    for folder in ("sglang_sparse", "flashinfer_ext", "patches", "benchmarks", "tests"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    text = open(os.path.join(dirpath, name), encoding="utf-8").read()
                    for pat in patterns:
                        read |= set(re.findall(pat, text, flags=re.M))
    table = {name for name, _, _ in C.ENVIRONMENT}
    assert "SGLANG_SPARSE_CHECK" in read and "SGLANG_SPARSE_HAYSTACK" in read      # the scan finds them
    # SGLang's own switches, only set for servers here; PYTHONPATH, only extended for child processes
    read -= {"SGLANG_USE_CPU_ENGINE", "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "PYTHONPATH"}
    assert sorted(read - table) == []
    assert len(table) == len(C.ENVIRONMENT)


def test_set_server_variables_are_logged_and_the_old_config_variable_warned_about():
    notes = C.environment_notes({C.INTERPRET_ENV: "1", C.CHECK_ENV: "1", C.RETIRED_CONFIG_ENV: "{}", "OUT": "/x",
                                 "PATH": "/bin"})
    assert [lvl for lvl, _ in notes] == [logging.INFO, logging.INFO, logging.WARNING], notes
    assert notes[0][1].startswith(f"sglang_sparse: environment {C.INTERPRET_ENV}=1: ")
    assert notes[1][1].startswith(f"sglang_sparse: environment {C.CHECK_ENV}=1: ")
    assert notes[2][1].startswith(f"sglang_sparse: {C.RETIRED_CONFIG_ENV} is set and ignored")
    assert C.environment_notes({}) == []
