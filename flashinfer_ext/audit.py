"""``DroppedMassAudit``: the exact attention mass a sparse decode step left out, measured on chosen requests.

PrHS chooses pages from per-page summaries and ART stops reading early; neither knows what it dropped. On an
audited request, this reads, at every layer, that layer's keys of *every* page of the request once more (keys
only, no values: about half the bytes of a dense decode), computes the exact normaliser over all tokens and
compares it with the normaliser of what the decode read (``SparseDecodeWrapper.lse``):

    dropped[b, hq] = 1 - exp(lse_read[b, hq] - lse_all[b, hq])       (the softmax mass outside the output)

Use, per decode step (kernels in :mod:`flashinfer_ext.kernels.kv_lse`)::

    audit.plan(bs, audited)            # outside CUDA graphs: which requests this step audits
    ...                                # per layer, after wrapper.run(...) of that layer:
    audit.run(wrapper, q, k_cache)     # dropped: that layer's values

``run`` launches its two kernels for every layer (graph-capturable: no allocation, no host sync); requests not
audited this step return at once, so an audited step of a request costs one read of its keys (every layer).
``dropped`` ([bs, H_q] fp32) holds the values of the layer last run, NaN for requests not audited this step.

``measure="output-error"`` also reads the values of every page and measures the relative error of the attention
output itself (reference :func:`sglang_sparse.prhs.output_error`)::

    err[b, hq] = ||o_read[b, hq] - o_all[b, hq]|| / ||o_all[b, hq]||

with ``o_all`` the exact attention over every token and ``o_read`` the wrapper's output of that layer
(``audit.run(wrapper, q, k_cache, v_cache, out)``): about one dense decode of the audited request per layer instead
of half of one. ``out_err`` holds it (NaN for requests not audited); ``dropped`` is measured as well. ``o_norm``
holds ``||o_all[b, hq]||`` and ``layer_err`` the relative error of the layer's whole attention output, all its
query heads concatenated (what the output projection sees; reference :func:`sglang_sparse.prhs.layer_error`)::

    layer_err[b] = sqrt(sum_hq (err[b, hq] * ||o_all[b, hq]||)^2) / sqrt(sum_hq ||o_all[b, hq]||^2)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from flashinfer_ext.kernels.kv_lse import _audit_merge_kernel, _kv_split_kernel

_LOG2E = 1.4426950408889634
MEASURES = ("mass", "output-error")


class DroppedMassAudit:
    """Buffers and launches of the dropped-mass audit for the batches of one :class:`SparseDecodeWrapper`.

    Args:
        num_qo_heads, num_kv_heads, head_dim, page_size, max_batch_size, max_seq_len: as the wrapper's.
        max_num_splits: most page ranges one (request, KV head) is split into.
        device: where the buffers live.
        measure: ``"mass"`` (keys only: ``dropped``) or ``"output-error"`` (keys and values: ``out_err`` as well).
        head_dim_v: Dv of the values (default ``head_dim``).
    """

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int, max_batch_size: int,
                 max_seq_len: int, max_num_splits: int = 32, device="cuda", num_sms: Optional[int] = None,
                 measure: str = "mass", head_dim_v: Optional[int] = None):
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads={num_qo_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
        self.measure = measure
        self.h_q, self.h_kv, self.d, self.page_size = num_qo_heads, num_kv_heads, head_dim, page_size
        self.dv = head_dim if head_dim_v is None else head_dim_v
        self.group = num_qo_heads // num_kv_heads
        self.g_pad = max(16, triton.next_power_of_2(self.group))
        self.max_bs = max_batch_size
        self.max_pages = triton.cdiv(max_seq_len, page_size)
        self.max_splits = max_num_splits
        self.device = torch.device(device)
        if num_sms is None:
            num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                       if self.device.type == "cuda" else 132)
        self.num_sms = int(num_sms)
        f32 = dict(dtype=torch.float32, device=self.device)
        self.audited = torch.zeros(max_batch_size, dtype=torch.int32, device=self.device)
        self.mid_m = torch.empty(max_batch_size, num_qo_heads, max_num_splits, **f32)
        self.mid_l = torch.empty(max_batch_size, num_qo_heads, max_num_splits, **f32)
        self.dropped_buf = torch.full((max_batch_size, num_qo_heads), float("nan"), **f32)
        self.mid_o_buf = self.out_err_buf = self.o_norm_buf = None
        if measure == "output-error":
            # [bs, H_q, num_splits, Dv] per plan, in one flat buffer as large as the largest bs x num_splits
            rows = max(bs * self._splits(bs) for bs in range(1, max_batch_size + 1))
            self.mid_o_buf = torch.empty(rows * num_qo_heads * self.dv, **f32)
            self.out_err_buf = torch.full((max_batch_size, num_qo_heads), float("nan"), **f32)
            self.o_norm_buf = torch.full((max_batch_size, num_qo_heads), float("nan"), **f32)
        self.bs = 0

    def _splits(self, bs: int) -> int:
        """Splits per (request, KV head) of a batch of ``bs`` (static: depends on bs only, so CUDA-graph replays
        agree): about 4 programs per SM, at least 16 pages each."""
        want = triton.cdiv(4 * self.num_sms, bs * self.h_kv)
        return max(1, min(self.max_splits, want, triton.cdiv(self.max_pages, 16)))

    def plan(self, bs: int, audited) -> None:
        """Audit request ``i`` of the next step (at every layer) where ``audited[i]`` is true: a bool for every
        request, or a ``[bs]`` bool / integer tensor (device or host). Resets ``dropped`` to NaN."""
        if not 1 <= bs <= self.max_bs:
            raise ValueError(f"batch of {bs} requests; this audit holds 1..{self.max_bs}")
        self.bs = bs
        if isinstance(audited, (bool, int)):
            self.audited[:bs].fill_(int(bool(audited)))
        else:
            self.audited[:bs].copy_(audited.reshape(-1)[:bs], non_blocking=True)
        self.dropped_buf[:bs].fill_(float("nan"))
        self.num_splits = self._splits(bs)
        self.pages_per_split = triton.cdiv(self.max_pages, self.num_splits)
        if self.out_err_buf is not None:
            self.out_err_buf[:bs].fill_(float("nan"))
            self.o_norm_buf[:bs].fill_(float("nan"))
            n = bs * self.h_q * self.num_splits * self.dv
            self.mid_o = self.mid_o_buf[:n].view(bs, self.h_q, self.num_splits, self.dv)

    def run(self, wrapper, q: torch.Tensor, k_cache: torch.Tensor, v_cache: Optional[torch.Tensor] = None,
            out: Optional[torch.Tensor] = None, sm_scale: Optional[float] = None) -> torch.Tensor:
        """Score the audited requests against ``wrapper``'s last ``run`` (its page table and its ``lse``) on this
        layer's queries and keys; returns ``dropped`` ([bs, H_q], this layer's values for the audited rows).
        With ``measure="output-error"``, ``v_cache`` (this layer's values) and ``out`` (the wrapper's output of
        this layer, ``[bs, H_q, Dv]``) are required, and ``out_err`` gets this layer's values too."""
        bs = self.bs
        if bs != wrapper.bs:
            raise ValueError(f"audit planned for {bs} requests, the wrapper's batch has {wrapper.bs}")
        scale = (1.0 / math.sqrt(self.d) if sm_scale is None else float(sm_scale)) * _LOG2E
        ppi = max(1, 64 // self.page_size)
        with_v = self.measure == "output-error"
        if with_v:
            if v_cache is None or out is None:
                raise ValueError("measure='output-error' needs the values (v_cache) and the wrapper's output (out)")
            out, mo, err, norm, dv = out.view(bs, self.h_q, self.dv), self.mid_o, self.out_err_buf, \
                self.o_norm_buf, self.dv
        else:       # keys only: the value / output arguments are never read (WITH_V=False)
            v_cache, out, mo, err, norm, dv = k_cache, wrapper.lse_buf[:, :, None], self.mid_m[:, :, :, None], \
                self.dropped_buf, self.dropped_buf, 1
        _kv_split_kernel[(bs, self.h_kv, self.num_splits)](
            self.audited, q, k_cache, v_cache, wrapper.page_table, wrapper.num_pages, wrapper.last_len, self.mid_m,
            self.mid_l, mo, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
            v_cache.stride(1), wrapper.page_table.stride(0), self.mid_m.stride(0), self.mid_m.stride(1),
            mo.stride(0), mo.stride(1), mo.stride(2), scale, self.pages_per_split,
            G=self.group, G_PAD=self.g_pad, D=self.d, DV=dv, BLOCK_D=triton.next_power_of_2(self.d),
            BLOCK_DV=triton.next_power_of_2(dv), P=self.page_size, PPI=ppi, WITH_V=with_v, num_warps=4)
        _audit_merge_kernel[(bs, self.h_q)](
            self.audited, self.mid_m, self.mid_l, mo, wrapper.lse_buf, out, self.dropped_buf, err, norm,
            self.mid_m.stride(0), self.mid_m.stride(1), mo.stride(0), mo.stride(1), mo.stride(2),
            wrapper.lse_buf.stride(0), out.stride(0), out.stride(1), self.dropped_buf.stride(0),
            self.num_splits, DV=dv, BLOCK_DV=triton.next_power_of_2(dv),
            S_PAD=triton.next_power_of_2(self.num_splits), WITH_V=with_v, num_warps=4 if with_v else 1)
        return self.dropped

    @property
    def out_err(self) -> Optional[torch.Tensor]:
        """``[bs, H_q]`` fp32 relative error of the attention output of this step's audited requests at the layer
        last run (NaN for the requests not audited); None with ``measure="mass"``."""
        return None if self.out_err_buf is None else self.out_err_buf[: self.bs]

    @property
    def o_norm(self) -> Optional[torch.Tensor]:
        """``[bs, H_q]`` fp32 norm of the exact attention output over every token of this step's audited requests
        at the layer last run (NaN for the requests not audited); None with ``measure="mass"``."""
        return None if self.o_norm_buf is None else self.o_norm_buf[: self.bs]

    @property
    def layer_err(self) -> Optional[torch.Tensor]:
        """``[bs]`` fp32 relative error of the whole attention output (all query heads) of this step's audited
        requests at the layer last run, from ``out_err`` and ``o_norm`` (device ops, no host sync; NaN for the
        requests not audited); None with ``measure="mass"``."""
        if self.out_err_buf is None:
            return None
        from sglang_sparse.prhs import layer_error

        return layer_error(self.out_err, self.o_norm)

    @property
    def dropped(self) -> torch.Tensor:
        """``[bs, H_q]`` fp32 dropped attention mass of this step's audited requests at the layer last run (NaN
        for the requests not audited)."""
        return self.dropped_buf[: self.bs]


__all__ = ["DroppedMassAudit"]
