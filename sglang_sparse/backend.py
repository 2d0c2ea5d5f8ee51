"""The ``sparse`` attention backend: the one place SGLang calls into sglang_sparse.

``--attention-backend sparse`` builds :class:`SparseAttnBackend`, a subclass of SGLang's
FlashInfer backend. It holds its parts and calls them explicitly: ``self.claa``
(:class:`sglang_sparse.claa_prefill.ClaaPrefill`, CLAA's prefill hooks) and ``self.decoder``
(:class:`sglang_sparse.sparse_decode.SparseDecoder`, PrHS/ART decode and CLAA's kept-token view), each None
when its mechanism is off. What it knows about the batch being run is one object,
``self.sparse_metadata`` (:class:`sglang_sparse.claa_prefill.ForwardMetadata`), started anew for every
forward batch. With every mechanism off each override hands the call straight to FlashInfer's own method, so
SGLang runs FlashInfer's code unchanged.

On a CPU-only host (``--device cpu``, ``SGLANG_USE_CPU_ENGINE=1``) FlashInfer does not exist; the
same overrides sit on SGLang's torch-native backend instead (:class:`SparseTorchNativeAttnBackend`),
which is what CPU tests and CI serve with.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import torch

from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

from sglang_sparse.claa_prefill import ClaaPrefill, ForwardMetadata
from sglang_sparse.config import BACKEND_NAME, ConfigError, SparseConfig, from_server_args, interpreted_decode
from sglang_sparse.sparse_decode import SparseDecoder

if TYPE_CHECKING:
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def load_config(model_runner: "ModelRunner") -> SparseConfig:
    """The validated config, read in this process, checked against the model's depth."""
    cfg = from_server_args(model_runner.server_args)
    num_layers = model_runner.model_config.num_hidden_layers
    filter_layer = cfg.claa.filter_layer
    if cfg.claa.enabled and filter_layer is not None and filter_layer >= num_layers:
        raise ConfigError("--claa-filter-layer",
                          f"must be below the model's {num_layers} layers, got {filter_layer}")
    return cfg


class SparseBackendMixin:
    """The overrides shared by the GPU and CPU variants, in front of one SGLang backend: each calls the
    parts that are on (``claa``, ``decoder``) and SGLang's own method, in that order, explicitly."""

    sparse_config: SparseConfig
    claa: Optional[ClaaPrefill] = None
    decoder: Optional[SparseDecoder] = None
    sparse_metadata: ForwardMetadata = ForwardMetadata()

    def _init_sparse(self, model_runner: "ModelRunner", claa: Optional[ClaaPrefill] = None,
                     decoder: Optional[SparseDecoder] = None) -> None:
        self.sparse_config = load_config(model_runner)
        self.num_layers = model_runner.model_config.num_hidden_layers
        self.claa, self.decoder = claa, decoder
        self.sparse_metadata = ForwardMetadata()
        logger.info("sglang_sparse: '%s' attention backend %s, config %s",
                    BACKEND_NAME, type(self).__name__, self.sparse_config.to_json())

    # ------------------------------------------------------------------ per-forward metadata
    def start_forward(self, fb: "ForwardBatch", claa_kept=None) -> ForwardMetadata:
        """Begin the metadata of ``fb`` (called when SGLang builds it, with CLAA's kept counts, or by
        ``init_forward_metadata``); the metadata of an earlier batch is dropped."""
        self.sparse_metadata = ForwardMetadata(forward_batch=fb, claa_kept=claa_kept)
        return self.sparse_metadata

    def _metadata(self, fb: "ForwardBatch") -> ForwardMetadata:
        md = self.sparse_metadata
        return md if md.forward_batch is fb else self.start_forward(fb)

    def _decodes(self, fb: "ForwardBatch") -> bool:
        return self.decoder is not None and self.decoder.handles(fb)

    def init_forward_metadata(self, forward_batch: "ForwardBatch"):
        md = self._metadata(forward_batch)
        if self._decodes(forward_batch):
            self.decoder.plan(forward_batch)
            return None
        if self.decoder is not None:
            self.decoder.mark_fresh(forward_batch)
        out = super().init_forward_metadata(forward_batch)
        if self.claa is not None and forward_batch.forward_mode.is_extend() \
                and not forward_batch.forward_mode.is_target_verify():
            use_ragged = bool(getattr(self.forward_metadata, "use_ragged", False))
            md.claa = self.claa.begin(forward_batch, use_ragged, md.claa_kept)
        return out

    def init_forward_metadata_out_graph(self, forward_batch: "ForwardBatch", in_capture: bool = False):
        self._metadata(forward_batch)
        if self._decodes(forward_batch):
            self.decoder.plan(forward_batch)
            return None
        if self.decoder is not None:
            self.decoder.mark_fresh(forward_batch)
        return super().init_forward_metadata_out_graph(forward_batch, in_capture)

    def init_forward_metadata_in_graph(self, forward_batch: "ForwardBatch"):
        if self._decodes(forward_batch):
            return None
        return super().init_forward_metadata_in_graph(forward_batch)

    # ------------------------------------------------------------------ forward
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if self.decoder is not None:
            self.decoder.after_extend(k, layer, forward_batch, save_kv_cache)
        if self.claa is not None:
            self.claa.score(layer.layer_id, q, k, forward_batch)
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if not self._decodes(forward_batch):
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        return self.decoder.forward_decode(q, k, v, layer, forward_batch, save_kv_cache)

    def decode_stats(self) -> Optional[dict]:
        """Statistics of the last decode batch (``SparseDecoder.decode_stats``), None without our decode."""
        return self.decoder.decode_stats() if self.decoder is not None else None


class SparseAttnBackend(SparseBackendMixin, FlashInferAttnBackend):
    """FlashInfer prefill and decode, plus the sparse mechanisms that are switched on."""

    def __init__(self, model_runner: "ModelRunner", **kwargs):
        super().__init__(model_runner, **kwargs)
        # FlashInfer checks KV-cache access modes (quantised KV layouts) only for its own class;
        # the same checks apply to us.
        prefill, decode = model_runner.server_args.get_attention_backends()
        if prefill == BACKEND_NAME:
            self._check_kv_attention_access("prefill", self.prefill_kv_access)
        if decode == BACKEND_NAME:
            self._check_kv_attention_access("decode", self.decode_kv_access)
        cfg = load_config(model_runner)
        claa = None
        if cfg.claa.enabled and str(model_runner.device).startswith("cuda"):
            claa = ClaaPrefill(model_runner, cfg.claa, model_runner.model_config.num_hidden_layers,
                               self.token_to_kv_pool, replan=self._claa_replan,
                               metadata=lambda: self.sparse_metadata)
        decoder = SparseDecoder.create(model_runner, cfg, self.token_to_kv_pool, claa,
                                       kv_write_scales=self._kv_write_scales)
        self._init_sparse(model_runner, claa, decoder)

    def _claa_replan(self, fb: "ForwardBatch") -> None:
        """FlashInfer's ragged prefill plan for CLAA's kept lengths (paged prefix part unchanged)."""
        import torch
        from sglang.srt.layers.attention.flashinfer_backend import MultiItemScoringParams

        prefix_cpu = list(fb.extend_prefix_lens_cpu)
        seq_cpu = torch.tensor([p + k for p, k in zip(prefix_cpu, fb.extend_seq_lens_cpu)], dtype=torch.int64)
        seq_lens = fb.extend_prefix_lens.to(torch.int64) + fb.extend_seq_lens.to(torch.int64)
        self.indices_updater_prefill.update(
            fb.req_pool_indices, seq_lens, seq_cpu, int(seq_cpu.sum()), fb.extend_prefix_lens,
            prefill_wrappers=self.prefill_wrappers_paged, use_ragged=True, encoder_lens=fb.encoder_lens,
            spec_info=None, fixed_split_size=self.prefill_split_tile_size,
            multi_item_params=MultiItemScoringParams(), extend_prefix_lens_cpu=prefix_cpu)


class SparseTorchNativeAttnBackend(SparseBackendMixin, TorchNativeAttnBackend):
    """CPU variant: SGLang's torch-native attention (every mechanism's kernels need a GPU)."""

    def __init__(self, model_runner: "ModelRunner"):
        super().__init__(model_runner)
        self._init_sparse(model_runner, decoder=self._make_decoder(model_runner))

    def _make_decoder(self, model_runner: "ModelRunner") -> Optional[SparseDecoder]:
        return None

    def support_triton(self):
        return False


class SparseTorchNativeDecodeBackend(SparseTorchNativeAttnBackend):
    """CPU variant whose decode runs PrHS / ART through the Triton kernels in Triton's interpreter
    (``SGLANG_SPARSE_INTERPRET=1`` with ``TRITON_INTERPRET=1``): extend is torch-native (plus the page-summary
    update), decode is ours. For checking the wiring with a real model where no GPU is at hand; slow.
    The kernels compute in float32 whatever the model's dtype (:meth:`_interpret_in_float32`)."""

    def _make_decoder(self, model_runner: "ModelRunner") -> Optional[SparseDecoder]:
        # the torch-native pool's set_kv_buffer takes no scales
        decoder = SparseDecoder.create(model_runner, load_config(model_runner), self.token_to_kv_pool)
        if decoder is not None:
            _interpret_in_float32(decoder)
        return decoder


def _interpret_in_float32(decoder: SparseDecoder) -> None:
    """Plan the decode wrappers for float32 and hand their ``run`` float32 copies of the query, the layer's K/V and
    page summaries, returning the output in the query's dtype. Triton's interpreter keeps bf16 values as their raw
    16 bits and its ``tl.dot`` (and bf16 arithmetic) works on those integers, so on a bf16 pool the interpreted
    bounds and attention would be meaningless."""
    logger.info("sglang_sparse: interpreted decode kernels compute in float32 (model dtype %s)", decoder._q_dtype)
    decoder._q_dtype = torch.float32
    for w in (decoder.decode_wrapper, decoder.decode_wrapper_kept):
        if w is not None:
            w.run = _float32_run(w.run)
    if decoder.audit is not None:
        audit_run = decoder.audit.run
        decoder.audit.run = lambda w, layer, q, k_cache, **kw: audit_run(w, layer, q.float(), k_cache.float(), **kw)


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
