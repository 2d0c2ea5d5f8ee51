"""Registration inside spawned SGLang-like processes, config transport, backend class selection."""

import json
import logging
import multiprocessing as mp
import os
import pickle
from types import SimpleNamespace

import pytest

from sglang_sparse import config as C

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")


def _child_config(queue, server_args):
    """A spawned process reading its configuration the way every scheduler does."""
    from sglang_sparse.config import from_server_args

    queue.put(from_server_args(server_args).to_json())


def _child_scheduler_like(queue, use_entry_point):
    """What a freshly spawned scheduler does before building its attention backend."""
    from sglang.srt.layers.attention import attention_registry
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

    before = "sparse" in attention_registry.ATTENTION_BACKENDS
    if use_entry_point:
        from sglang.srt.plugins import load_plugins

        load_plugins()  # SGLang's own call at the top of run_scheduler_process
    else:
        from sglang_sparse import plugin

        plugin.register()  # what plugin.run_scheduler_process does before SGLang's scheduler
    from sglang.srt.utils.common import support_triton
    from sglang.srt.model_executor import forward_batch_info

    factory = attention_registry.ATTENTION_BACKENDS.get("sparse")
    queue.put({
        "before": before,
        "registered": factory is not None,
        "factory_module": getattr(factory, "__module__", None),
        "choice": "sparse" in ATTENTION_BACKEND_CHOICES,
        # the CPU patch: `sparse` on a CPU host answers like torch_native, other names are untouched
        "support_triton": [support_triton("sparse"), support_triton("triton"), support_triton("torch_native")],
        "propagated": forward_batch_info.support_triton("sparse"),
    })


def _spawn(target, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(q, *args))
    p.start()
    out = q.get(timeout=240)
    p.join(60)
    assert p.exitcode == 0
    return out


def _model_dir(tmp_path):
    """A model directory holding only a tiny Llama's config.json: all SGLang's flag resolution needs."""
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 4096, "vocab_size": 400, "torch_dtype": "float32"}))
    return str(tmp_path)


def test_config_reaches_spawned_process_on_server_args(tmp_path, monkeypatch):
    """SGLang's own resolved ServerArgs, with the configuration attached as the launcher does, is pickled into a
    spawned process (as SGLang hands it to its schedulers); there the configuration reads back unchanged, and a
    set SGLANG_SPARSE_CONFIG (inherited by the child) is ignored."""
    from sglang.srt.server_args import prepare_server_args

    cfg, _ = C.parse_known_args(["--sparse-decode", "prhs", "--prhs-delta", "0.013", "--art", "on",
                                 "--art-patience", "7", "--sparse-prefill", "claa", "--claa-keep-ratio", "0.3"])
    server_args = prepare_server_args(["--model-path", _model_dir(tmp_path), "--device", "cpu"])
    C.attach(server_args, cfg)
    monkeypatch.setenv(C.RETIRED_CONFIG_ENV, C.SparseConfig(art=C.ArtConfig("on", patience=3)).to_json())
    assert C.SparseConfig.from_json(_spawn(_child_config, server_args)) == cfg
    plain = prepare_server_args(["--model-path", _model_dir(tmp_path), "--device", "cpu"])
    assert C.SparseConfig.from_json(_spawn(_child_config, plain)) == C.SparseConfig()


def test_without_launcher_everything_is_off_and_the_old_variable_is_ignored(monkeypatch, caplog):
    """``python -m sglang.launch_server --attention-backend sparse`` attaches nothing: all off, said once per
    process, with a warning when SGLANG_SPARSE_CONFIG is set (it no longer turns mechanisms on)."""
    monkeypatch.setattr(C, "_READ", {})
    monkeypatch.setenv(C.RETIRED_CONFIG_ENV, C.SparseConfig(art=C.ArtConfig("on")).to_json())
    monkeypatch.setenv(C.CHECK_ENV, "1")
    with caplog.at_level(logging.INFO, logger=C.logger.name):
        assert C.from_server_args(SimpleNamespace()) == C.SparseConfig()
        assert C.from_server_args(SimpleNamespace(page_size=32)) == C.SparseConfig()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert sum("every sparse mechanism is off" in m for _, m in lines) == 1, lines
    assert [m for lvl, m in lines if lvl == logging.WARNING and C.RETIRED_CONFIG_ENV in m and "ignored" in m], lines
    assert [m for _, m in lines if m.startswith(f"sglang_sparse: environment {C.CHECK_ENV}=1: ")], lines


def test_config_rides_on_server_args_pickle():
    cfg, _ = C.parse_known_args(["--art", "on", "--art-tau-mag", "0.123"])
    sa = SimpleNamespace()
    C.attach(sa, cfg)
    assert C.from_server_args(pickle.loads(pickle.dumps(sa))) == cfg


@pytest.mark.parametrize("use_entry_point", [True, False], ids=["entry_point", "scheduler_entry"])
def test_registration_in_spawned_scheduler_like_process(use_entry_point):
    if use_entry_point:
        from importlib.metadata import entry_points

        if not any(ep.name == "sglang_sparse" for ep in entry_points(group="sglang.srt.plugins")):
            pytest.skip("package not installed: no sglang.srt.plugins entry point")
    got = _spawn(_child_scheduler_like, use_entry_point)
    assert got["before"] is False
    assert got["registered"] and got["choice"]
    assert got["factory_module"] == "sglang_sparse.plugin"
    assert got["support_triton"] == [False, True, False]
    assert got["propagated"] is False


def test_backend_class_for_sparse():
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from sglang_sparse.backend import SparseAttnBackend, SparseTorchNativeAttnBackend, backend_class_for

    assert backend_class_for("cuda") is SparseAttnBackend
    assert backend_class_for("cuda:1") is SparseAttnBackend
    assert backend_class_for("cpu") is SparseTorchNativeAttnBackend
    assert issubclass(SparseAttnBackend, FlashInferAttnBackend)
    assert issubclass(SparseTorchNativeAttnBackend, TorchNativeAttnBackend)


def test_backend_delegates_everything_when_off():
    """With every mechanism off (no CLAA part, no decoder), each method the sparse backend overrides calls
    SGLang's backend method, unchanged."""
    from sglang_sparse.backend import SparseBackendMixin

    calls = []

    class Parent:
        def __getattr__(self, name):
            raise AttributeError(name)

    for name in ("init_forward_metadata", "init_forward_metadata_out_graph", "init_forward_metadata_in_graph",
                 "forward_extend", "forward_decode"):
        def method(self, *args, _name=name, **kwargs):
            calls.append((_name, args, kwargs))
            return _name
        setattr(Parent, name, method)

    class Backend(SparseBackendMixin, Parent):
        pass

    b = Backend()
    assert b.claa is None and b.decoder is None
    fb = object()
    assert b.init_forward_metadata(fb) == "init_forward_metadata"
    assert b.init_forward_metadata_out_graph(fb, True) == "init_forward_metadata_out_graph"
    assert b.init_forward_metadata_in_graph(fb) == "init_forward_metadata_in_graph"
    assert b.forward_extend(1, 2, 3, "layer", fb, False) == "forward_extend"
    assert b.forward_decode(1, 2, 3, "layer", fb, True) == "forward_decode"
    assert calls == [("init_forward_metadata", (fb,), {}), ("init_forward_metadata_out_graph", (fb, True), {}),
                     ("init_forward_metadata_in_graph", (fb,), {}), ("forward_extend", (1, 2, 3, "layer", fb, False), {}),
                     ("forward_decode", (1, 2, 3, "layer", fb, True), {})]


def test_patches_refuse_other_sglang_versions(monkeypatch):
    import sglang

    from sglang_sparse import patches

    monkeypatch.setattr(sglang, "__version__", "0.5.18")
    with pytest.raises(patches.SGLangVersionError, match="0.5.17"):
        patches.install_all()
