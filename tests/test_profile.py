"""``--sparse-profile``: reading a calibration profile, checking it against the model before SGLang is imported,
the defaults it supplies (flags given explicitly win), ``auto`` lookup of shipped profiles, and the transport of
its per-layer budget shifts. Profiles here are small fixtures written to tmp_path."""

import json
import logging
import os

import pytest

from sglang_sparse import config as C
from sglang_sparse import launch_server as L
from test_launcher import _heavy_modules, _launch, _model, _one_error_line

SHIFTS = [0] * 32
SHIFTS[3], SHIFTS[4], SHIFTS[20] = 1, 2, 3


def _profile(tmp_path, name="profile.json", **changes):
    """A profile for the Llama-3.1-8B shape (32 layers, 8 KV heads, head_dim 128, pages of 32) with ``changes``
    (``prhs``/``claa`` dicts replace those sections; None removes a key)."""
    data = {"format": 1, "model": "meta-llama/Llama-3.1-8B-Instruct", "num_layers": 32, "num_kv_heads": 8,
            "head_dim": 128, "page_size": 32, "created_by": "sglang_sparse.calibrate", "device": "cpu",
            "prompt_lens": [8192], "num_prompts": 4,
            "prhs": {"budget": 0.125, "delta": 0.1, "quantile": 0.95, "layer_budget_shift": list(SHIFTS)},
            "claa": {"filter_layer": 14, "keep_ratio": 0.25}, "measurements": {}}
    data.update(changes)
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def _check(model_dir, *argv):
    return L.check_before_sglang(["--model-path", model_dir, "--device", "cuda", *argv])


@pytest.fixture(autouse=True)
def _cuda_as_if_present(monkeypatch):
    monkeypatch.setattr(L, "cuda_available", lambda: True)


def test_profile_supplies_the_defaults_and_is_logged(tmp_path):
    prof = _profile(tmp_path)
    cfg, argv, notes = _check(_model(tmp_path), "--sparse-decode", "prhs", "--sparse-prefill", "claa",
                              "--prhs-layers-per-selection", "2", "--sparse-profile", prof)
    assert cfg.profile == prof
    assert (cfg.prhs.budget, cfg.prhs.delta, cfg.prhs.page_size) == (0.125, 0.1, 32)
    assert cfg.prhs.select == "bounds"          # the ranking the calibration measured, not the server's default
    assert cfg.prhs.layer_budget_shift == tuple(SHIFTS)
    assert (cfg.claa.filter_layer, cfg.claa.keep_ratio) == (14, 0.25)
    assert argv[argv.index("--page-size") + 1] == "32"
    line = " ".join(text for level, text in notes if level == logging.INFO)
    assert f"profile {prof}" in line and "--prhs-budget 0.125" in line and "--prhs-delta 0.1" in line
    assert "--prhs-select bounds" in line
    assert "--claa-filter-layer 14" in line and "--page-size 32" in line and "budget shifts" in line
    # the shifts reach the schedulers through the transport
    assert C.SparseConfig.from_json(cfg.to_json()) == cfg


def test_explicit_flags_win_over_the_profile(tmp_path):
    prof = _profile(tmp_path)
    cfg, argv, notes = _check(_model(tmp_path), "--sparse-decode", "prhs", "--sparse-prefill", "claa",
                              "--sparse-profile", prof, "--prhs-budget", "1/32", "--prhs-delta=0.02",
                              "--claa-filter-layer", "16", "--claa-keep-ratio", "0.5", "--page-size", "32")
    assert (cfg.prhs.budget, cfg.prhs.delta) == (1 / 32, 0.02)
    assert (cfg.claa.filter_layer, cfg.claa.keep_ratio) == (16, 0.5)
    model = os.path.join(str(tmp_path), "model")
    est, _, _ = _check(model, "--sparse-decode", "prhs", "--sparse-profile", prof, "--prhs-select", "estimate")
    assert est.prhs.select == "estimate" and est.prhs.budget == 0.125
    assert cfg.prhs.layer_budget_shift == tuple(SHIFTS)
    assert argv.count("--page-size") == 1
    text = " ".join(t for _, t in notes)
    assert "--prhs-budget, --prhs-delta, --claa-filter-layer, --claa-keep-ratio kept" in text
    assert any(level == logging.WARNING and "measured at --prhs-budget 0.125" in t for level, t in notes)


def test_page_size_from_the_profile_or_checked_against_the_flags(tmp_path):
    prof = _profile(tmp_path, page_size=64)
    model = _model(tmp_path)
    cfg, argv, _ = _check(model, "--art", "on", "--sparse-profile", prof)
    assert cfg.prhs.page_size == 64 and argv[argv.index("--page-size") + 1] == "64"
    cfg, argv, _ = _check(model, "--art", "on", "--sparse-profile", prof, "--prhs-page-size", "64")
    assert argv[argv.index("--page-size") + 1] == "64"
    with pytest.raises(C.ConfigError) as e:
        _check(model, "--art", "on", "--sparse-profile", prof, "--prhs-page-size", "32")
    assert str(e.value).startswith("--sparse-profile: ") and "--prhs-page-size 32" in str(e.value)


@pytest.mark.parametrize("case, words", [
    ("format", "format must be 1, got 2"),
    ("layers", "num_layers 24, but this model has 32"),
    ("kv heads", "num_kv_heads 4, but this model has 8"),
    ("head dim", "head_dim 64, but this model has 128"),
    ("page size", "pages of 32 tokens, but the server uses --page-size 16"),
    ("shift range", "values must be integers in [0, 10], got [11]"),
    ("shift type", "values must be integers in [0, 10], got [1.5]"),
    ("shift length", "one shift per layer (32), got 31"),
    ("budget", "prhs.budget must be a fraction"),
    ("claa layer", "claa.filter_layer must be in [1, 32), got 32"),
    ("missing", "cannot read"),
    ("not json", "cannot read"),
])
def test_each_bad_profile_exits_2_with_one_line_naming_the_flag(tmp_path, case, words):
    bad_shift = lambda x: {"budget": 0.125, "delta": 0.1, "quantile": 0.95,  # noqa: E731
                           "layer_budget_shift": SHIFTS[:31] + [x]}
    changes = {"format": dict(format=2), "layers": dict(num_layers=24), "kv heads": dict(num_kv_heads=4),
               "head dim": dict(head_dim=64), "shift range": dict(prhs=bad_shift(11)),
               "shift type": dict(prhs=bad_shift(1.5)),
               "shift length": dict(prhs={"budget": 0.125, "delta": 0.1, "quantile": 0.9,
                                          "layer_budget_shift": SHIFTS[:31]}),
               "budget": dict(prhs={"budget": 1.5, "delta": 0.1, "quantile": 0.9, "layer_budget_shift": SHIFTS}),
               "claa layer": dict(claa={"filter_layer": 32, "keep_ratio": 0.2})}.get(case, {})
    prof = _profile(tmp_path, **changes)
    if case == "missing":
        prof = str(tmp_path / "nope.json")
    if case == "not json":
        (tmp_path / "profile.json").write_text("{not json")
    extra = ["--page-size", "16"] if case == "page size" else []
    msg = _one_error_line(_launch("--model-path", _model(tmp_path), "--sparse-decode", "prhs",
                                  "--sparse-profile", prof, *extra))
    assert msg.startswith("--sparse-profile: ") and words in msg, msg


def test_a_bad_profile_is_refused_before_sglang_or_torch_is_imported(tmp_path):
    code, heavy = _heavy_modules(tmp_path, "--model-path", _model(tmp_path), "--sparse-decode", "prhs",
                                 "--sparse-profile", _profile(tmp_path, num_layers=24))
    assert code == 2 and heavy == [], (code, heavy)


def test_a_profile_needs_a_local_model_config(tmp_path):
    with pytest.raises(C.ConfigError) as e:
        L.check_before_sglang(["--model-path", "org/name", "--device", "cuda", "--sparse-decode", "prhs",
                               "--sparse-profile", _profile(tmp_path)])
    assert str(e.value).startswith("--sparse-profile: ") and "config.json" in str(e.value)


def test_auto_finds_a_shipped_profile_by_name_and_says_when_none_matches(tmp_path, monkeypatch):
    shipped = tmp_path / "profiles"
    shipped.mkdir()
    monkeypatch.setattr(C, "PROFILES_DIR", str(shipped))
    other = _profile(shipped, "a-other.json", model="Qwen/Qwen3-8B", num_layers=36, claa=None,
                     prhs={"budget": 0.25, "delta": 0.1, "quantile": 0.9, "layer_budget_shift": [1] * 36})
    (shipped / "broken.json").write_text("[")
    mine = _profile(shipped, "llama.json")
    # by the model directory's name (the last part of the profile's model)
    cfg, _, notes = _check(_model(tmp_path, "Llama-3.1-8B-Instruct"), "--sparse-decode", "prhs",
                           "--sparse-profile", "auto")
    assert cfg.profile == mine and cfg.prhs.layer_budget_shift == tuple(SHIFTS)
    assert any(f"auto: using {mine}" in t for _, t in notes), notes
    # by config.json's _name_or_path
    cfg, _, notes = _check(_model(tmp_path, "m", _name_or_path="Qwen/Qwen3-8B", num_hidden_layers=36),
                           "--sparse-decode", "prhs", "--sparse-profile", "auto")
    assert cfg.profile == other
    # none matches: said, and the configuration is the one without a profile
    model = _model(tmp_path, "unknown-model")
    cfg, argv, notes = _check(model, "--sparse-decode", "prhs", "--sparse-profile", "auto")
    plain, plain_argv, _ = _check(model, "--sparse-decode", "prhs")
    assert cfg == plain and argv == plain_argv and cfg.profile is None
    assert any("no profile" in t and "unknown-model" in t for _, t in notes), notes


def test_without_a_profile_nothing_changes(tmp_path):
    cfg, argv, notes = _check(_model(tmp_path), "--sparse-decode", "prhs")
    assert cfg.profile is None and cfg.prhs.layer_budget_shift == ()
    assert cfg.prhs.group_budget_shifts(range(32)) == [0] * 32
    assert "layer_budget_shift" in json.loads(cfg.to_json())["prhs"]
    assert not any("profile" in t for _, t in notes)


def test_group_shifts_are_the_largest_of_each_group_of_the_stage():
    p = C.PrhsConfig(mode="prhs", budget=1 / 2, layers_per_selection=2, layer_budget_shift=tuple(SHIFTS))
    assert p.group_budget_shifts(range(32))[:3] == [0, 1, 2] and p.group_budget_shifts(range(32))[10] == 3
    assert p.group_budget_shifts(range(16, 32)) == [0, 0, 3] + [0] * 5         # a later pipeline stage
    assert C.PrhsConfig(mode="prhs", budget=1.0, layer_budget_shift=tuple(SHIFTS)).group_budget_shifts(
        range(4)) == [0] * 4
    with pytest.raises(C.ConfigError) as e:
        C.validate_values(C.SparseConfig(prhs=C.PrhsConfig(layer_budget_shift=(0, 12))))
    assert e.value.flag == "--sparse-profile"
