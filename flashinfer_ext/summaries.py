"""Per-physical-page key summaries (Quest min/max) for PrHS, kept next to SGLang's KV pool.

Kernel: :mod:`flashinfer_ext.kernels.page_summary`. Reference: ``sglang_sparse.prhs.page_summaries``.

Storage: ``kmin, kmax [num_layers, num_pages, H_kv, D]`` in the KV dtype (bf16), indexed by physical
page ``slot // page_size``; ``num_pages = ceil(num_slots / page_size)`` for a pool of ``num_slots``
slots (SGLang's pool has ``size + page_size`` slots). Their size is ``2 / page_size`` of the K
buffer, i.e. ``1 / page_size`` of K+V.

Call :meth:`PageSummaries.update` right after SGLang's ``set_kv_buffer(layer, loc, k, v)`` in both
extend and decode, with the same ``k`` and ``loc`` (``out_cache_loc``). A page whose offset-0 slot is
written in this batch is reset, so pages freed and reused later never carry stale bounds; nothing
has to be invalidated on free. The update launches one kernel, never allocates and does not
synchronise: it is safe inside a CUDA graph (the decode graph captures it with the layer).
"""

from __future__ import annotations

import torch
import triton

from flashinfer_ext.kernels.page_summary import _page_summary_kernel



def update_page_summaries(kmin: torch.Tensor, kmax: torch.Tensor, k: torch.Tensor, loc: torch.Tensor,
                          page_size: int) -> None:
    """Fold freshly written keys into one layer's page summaries.

    Args:
        kmin, kmax: ``[num_pages, H_kv, D]`` summaries of one layer (any float dtype; unit stride on D).
        k: ``[n_tok, H_kv, D]`` the keys just written (unit stride on D).
        loc: ``[n_tok]`` int32/int64 slots they were written to; the tokens of one page must be
             contiguous and ascending in ``loc`` (true for SGLang's page-aligned allocation).
        page_size: P, the pool's page size.
    """
    n_tok = loc.shape[0]
    if n_tok == 0:
        return
    if k.shape[0] != n_tok or k.shape[1] != kmin.shape[1] or k.shape[2] != kmin.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} does not match loc [{n_tok}] and summaries {tuple(kmin.shape)}")
    if k.stride(-1) != 1 or kmin.stride(-1) != 1 or kmax.stride() != kmin.stride():
        raise ValueError("k and the summaries need a unit stride along head_dim (and kmin/kmax equal strides)")
    h_kv, d = k.shape[1], k.shape[2]
    _page_summary_kernel[(n_tok,)](
        k, loc, kmin, kmax, n_tok, k.stride(0), k.stride(1), kmin.stride(0), kmin.stride(1), h_kv, d,
        P=page_size, BLOCK_H=triton.next_power_of_2(h_kv), BLOCK_D=triton.next_power_of_2(d), num_warps=4)


class PageSummaries:
    """Owns ``kmin, kmax [num_layers, num_pages, H_kv, D]`` for a KV pool of ``num_slots`` slots."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, page_size: int,
                 dtype: torch.dtype = torch.bfloat16, device="cuda"):
        if page_size < 16 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 16, got {page_size}")
        self.page_size = page_size
        self.num_pages = triton.cdiv(num_slots, page_size)
        shape = (num_layers, self.num_pages, num_kv_heads, head_dim)
        # +inf / -inf so that an unwritten page bounds nothing (never read by a valid request anyway)
        self.kmin = torch.full(shape, float("inf"), dtype=dtype, device=device)
        self.kmax = torch.full(shape, float("-inf"), dtype=dtype, device=device)

    def layer(self, layer_id: int):
        """``(kmin, kmax)`` views of one layer, ``[num_pages, H_kv, D]`` each."""
        return self.kmin[layer_id], self.kmax[layer_id]

    def update(self, layer_id: int, k: torch.Tensor, loc: torch.Tensor) -> None:
        """After ``set_kv_buffer(layer, loc, k, v)``: fold ``k [n_tok, H_kv, D]`` into its pages."""
        update_page_summaries(self.kmin[layer_id], self.kmax[layer_id], k, loc, self.page_size)

    def nbytes(self) -> int:
        return self.kmin.numel() * self.kmin.element_size() * 2


__all__ = ["PageSummaries", "update_page_summaries"]
