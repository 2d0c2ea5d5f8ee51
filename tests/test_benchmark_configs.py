"""The server settings of the GPU benchmark scripts parse and validate here, so that a mistyped or invalid
flag fails in CI instead of after a GPU machine has started: every sglang_sparse setting of
benchmarks/serving_decode.py, serving_prefill.py and quality_gpu.py goes through the launcher's parser and
value checks, leaves none of our flags to SGLang, and turns on what its name says."""

import pytest

from benchmarks import quality_gpu, serving_decode, serving_prefill
from benchmarks.serving import OURS
from sglang_sparse import config as C

_OURS_PREFIXES = ("--sparse-", "--claa-", "--prhs-", "--art")


def _settings():
    for name, (launcher, flags) in serving_decode.CONFIGS.items():
        if launcher == OURS:
            yield f"serving_decode:{name}", flags
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
