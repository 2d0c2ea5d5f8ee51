"""The ``sparse`` attention backend: the one place SGLang calls into sglang_sparse.

``--attention-backend sparse`` builds :class:`SparseAttnBackend`, a subclass of SGLang's
FlashInfer backend. Prefill (extend) is FlashInfer's; the decode path, CLAA's prefill hooks and
PrHS/ART belong here as the mechanisms are wired in. With every mechanism off each override hands
the call straight to FlashInfer's own method, so SGLang runs FlashInfer's code unchanged.

On a CPU-only host (``--device cpu``, ``SGLANG_USE_CPU_ENGINE=1``) FlashInfer does not exist; the
same mixin sits on SGLang's torch-native backend instead (:class:`SparseTorchNativeAttnBackend`),
which is what CPU tests and CI serve with.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

from sglang_sparse.claa_prefill import ClaaBackendMixin
from sglang_sparse.config import BACKEND_NAME, ConfigError, SparseConfig, from_server_args, interpreted_decode
from sglang_sparse.sparse_decode import SparseDecodeMixin

if TYPE_CHECKING:
    from sglang.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class SparseBackendMixin:
    """State shared by the GPU and CPU variants: the validated config, read in this process."""

    sparse_config: SparseConfig

    def _init_sparse(self, model_runner: "ModelRunner") -> None:
        cfg = from_server_args(model_runner.server_args)
        num_layers = model_runner.model_config.num_hidden_layers
        filter_layer = cfg.claa.filter_layer
        if cfg.claa.enabled and filter_layer is not None and filter_layer >= num_layers:
            raise ConfigError("--claa-filter-layer",
                              f"must be below the model's {num_layers} layers, got {filter_layer}")
        self.sparse_config = cfg
        self.num_layers = num_layers
        logger.info("sglang_sparse: '%s' attention backend %s, config %s",
                    BACKEND_NAME, type(self).__name__, cfg.to_json())


class SparseAttnBackend(ClaaBackendMixin, SparseDecodeMixin, SparseBackendMixin, FlashInferAttnBackend):
    """FlashInfer prefill and decode, plus the sparse mechanisms that are switched on.

    CLAA prefill filtering: :class:`sglang_sparse.claa_prefill.ClaaBackendMixin`.
    Decode with PrHS and/or ART (and CLAA's kept-token view): :class:`sglang_sparse.sparse_decode.SparseDecodeMixin`.
    """

    def __init__(self, model_runner: "ModelRunner", **kwargs):
        super().__init__(model_runner, **kwargs)
        # FlashInfer checks KV-cache access modes (quantised KV layouts) only for its own class;
        # the same checks apply to us.
        prefill, decode = model_runner.server_args.get_attention_backends()
        if prefill == BACKEND_NAME:
            self._check_kv_attention_access("prefill", self.prefill_kv_access)
        if decode == BACKEND_NAME:
            self._check_kv_attention_access("decode", self.decode_kv_access)
        self._init_sparse(model_runner)
        self._init_claa(model_runner)
        self._init_sparse_decode(model_runner)


class SparseTorchNativeAttnBackend(SparseBackendMixin, TorchNativeAttnBackend):
    """CPU variant: SGLang's torch-native attention plus the sparse mechanisms' reference paths."""

    def __init__(self, model_runner: "ModelRunner"):
        super().__init__(model_runner)
        self._init_sparse(model_runner)

    def support_triton(self):
        return False


class SparseTorchNativeDecodeBackend(SparseDecodeMixin, SparseTorchNativeAttnBackend):
    """CPU variant whose decode runs PrHS / ART through the Triton kernels in Triton's interpreter
    (``SGLANG_SPARSE_INTERPRET=1`` with ``TRITON_INTERPRET=1``): extend is torch-native (plus the page-summary
    update), decode is ours. For checking the wiring with a real model where no GPU is at hand; slow.
    The kernels compute in float32 whatever the model's dtype (:meth:`_interpret_in_float32`)."""

    def __init__(self, model_runner: "ModelRunner"):
        super().__init__(model_runner)
        self._init_sparse_decode(model_runner)
        self._interpret_in_float32()

    def _interpret_in_float32(self) -> None:
        """Plan the decode wrappers for float32 and hand their ``run`` float32 copies of the query, the layer's
        K/V and page summaries, returning the output in the query's dtype. Triton's interpreter keeps bf16
        values as their raw 16 bits and its ``tl.dot`` (and bf16 arithmetic) works on those integers, so on a
        bf16 pool the interpreted bounds and attention would be meaningless."""
        if not self._decode_on:
            return
        logger.info("sglang_sparse: interpreted decode kernels compute in float32 (model dtype %s)", self._q_dtype)
        self._q_dtype = torch.float32
        for w in (self.decode_wrapper, self.decode_wrapper_kept):
            if w is not None:
                w.run = _float32_run(w.run)

    def _kv_write_scales(self, layer):
        return None, None      # the torch-native pool's set_kv_buffer takes no scales (FlashInfer's hook)


def _float32_run(run):
    """``run(q, k_cache, v_cache, kmin, kmax, out=None, **kw)`` computed on float32 copies of its tensors, its
    output cast back to ``q``'s dtype (into ``out`` when given)."""

    def run_float32(q, k_cache, v_cache, kmin=None, kmax=None, out=None, **kw):
        o = run(q.float(), k_cache.float(), v_cache.float(), None if kmin is None else kmin.float(),
                None if kmax is None else kmax.float(), **kw)
        if out is None:
            return o.to(q.dtype)
        return out.copy_(o)

    return run_float32


def backend_class_for(device: str) -> type:
    """The class ``--attention-backend sparse`` builds on ``device``."""
    if not str(device).startswith("cpu"):
        return SparseAttnBackend
    return SparseTorchNativeDecodeBackend if interpreted_decode() else SparseTorchNativeAttnBackend


def create_sparse_backend(model_runner: "ModelRunner"):
    """Factory registered under the name ``sparse`` in SGLang's attention registry."""
    if model_runner.use_mla_backend:
        raise ValueError("--attention-backend sparse supports multi-head / grouped-query attention "
                         "models, not MLA models")
    cls = backend_class_for(model_runner.device)
    if cls is SparseAttnBackend:
        return cls(model_runner, init_new_workspace=model_runner.init_new_workspace)
    return cls(model_runner)
