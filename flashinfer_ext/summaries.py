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

from typing import Optional

import torch
import triton

from flashinfer_ext.kernels.page_summary import _page_summary_kernel
from flashinfer_ext.params import key_codes_supported


def update_page_summaries(kmin: torch.Tensor, kmax: torch.Tensor, k: torch.Tensor, loc: torch.Tensor,
                          page_size: int, k_cache: Optional[torch.Tensor] = None,
                          codes: Optional[torch.Tensor] = None) -> None:
    """Fold freshly written keys into one layer's page summaries.

    Args:
        kmin, kmax: ``[num_pages, H_kv, D]`` summaries of one layer (any float dtype; unit stride on D).
        k: ``[n_tok, H_kv, D]`` the keys just written (unit stride on D).
        loc: ``[n_tok]`` int32/int64 slots they were written to; the tokens of one page must be
             contiguous and ascending in ``loc`` (true for SGLang's page-aligned allocation).
        page_size: P, the pool's page size.
        k_cache, codes: with key codes (``--prhs-select estimate``), the layer's K buffer ``[num_slots, H_kv, D]``
            (holding ``k`` already) and its codes ``[num_slots, H_kv, D / 2]`` uint8: every page this call fills
            is quantised (kernel doc).
    """
    n_tok = loc.shape[0]
    if n_tok == 0:
        return
    if k.shape[0] != n_tok or k.shape[1] != kmin.shape[1] or k.shape[2] != kmin.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} does not match loc [{n_tok}] and summaries {tuple(kmin.shape)}")
    if k.stride(-1) != 1 or kmin.stride(-1) != 1 or kmax.stride() != kmin.stride():
        raise ValueError("k and the summaries need a unit stride along head_dim (and kmin/kmax equal strides)")
    h_kv, d = k.shape[1], k.shape[2]
    has_codes = codes is not None
    if has_codes:
        if k_cache is None or not key_codes_supported(d) or codes.dtype != torch.uint8 \
                or tuple(codes.shape[1:]) != (h_kv, d // 2) or tuple(k_cache.shape[1:]) != (h_kv, d) \
                or codes.stride(-1) != 1 or k_cache.stride(-1) != 1:
            raise ValueError(f"key codes need k_cache [slots, {h_kv}, {d}] and uint8 codes [slots, {h_kv}, {d // 2}] "
                             f"(D a power of two >= 32), got {None if k_cache is None else tuple(k_cache.shape)} and "
                             f"{codes.dtype} {tuple(codes.shape)}")
    kc = k_cache if has_codes else k
    cd = codes if has_codes else loc
    _page_summary_kernel[(n_tok,)](
        k, loc, kmin, kmax, n_tok, k.stride(0), k.stride(1), kmin.stride(0), kmin.stride(1), h_kv, d,
        kc, cd, kc.stride(0), kc.stride(1) if has_codes else 0, cd.stride(0), cd.stride(1) if has_codes else 0,
        P=page_size, BLOCK_H=triton.next_power_of_2(h_kv), BLOCK_D=triton.next_power_of_2(d),
        HAS_CODES=has_codes, HALF_D=max(1, d // 2), num_warps=4)


class PageSummaries:
    """Owns ``kmin, kmax [num_layers, num_pages, H_kv, D]`` for a KV pool of ``num_slots`` slots, and with
    ``key_codes`` the 4-bit key codes ``codes [num_layers, num_slots, H_kv, D / 2]`` uint8 (``D / 2`` bytes per key
    and KV head, 1/8 of a bf16 K+V token) that ``--prhs-select estimate`` scores pages with."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, page_size: int,
                 dtype: torch.dtype = torch.bfloat16, device="cuda", key_codes: bool = False):
        if page_size < 16 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 16, got {page_size}")
        self.page_size = page_size
        self.num_pages = triton.cdiv(num_slots, page_size)
        shape = (num_layers, self.num_pages, num_kv_heads, head_dim)
        # +inf / -inf so that an unwritten page bounds nothing (never read by a valid request anyway)
        self.kmin = torch.full(shape, float("inf"), dtype=dtype, device=device)
        self.kmax = torch.full(shape, float("-inf"), dtype=dtype, device=device)
        self.codes = (torch.zeros((num_layers, num_slots, num_kv_heads, head_dim // 2), dtype=torch.uint8,
                                  device=device) if key_codes else None)

    def layer(self, layer_id: int):
        """``(kmin, kmax)`` views of one layer, ``[num_pages, H_kv, D]`` each."""
        return self.kmin[layer_id], self.kmax[layer_id]

    def layer_codes(self, layer_id: int) -> Optional[torch.Tensor]:
        """The key codes of one layer, ``[num_slots, H_kv, D / 2]`` (None without key codes)."""
        return None if self.codes is None else self.codes[layer_id]

    def update(self, layer_id: int, k: torch.Tensor, loc: torch.Tensor, k_cache: Optional[torch.Tensor] = None) -> None:
        """After ``set_kv_buffer(layer, loc, k, v)``: fold ``k [n_tok, H_kv, D]`` into its pages (and, with key codes,
        quantise the pages this fills from the layer's K buffer ``k_cache``)."""
        if self.codes is not None and k_cache is None:
            raise ValueError("these summaries keep key codes: pass the layer's K buffer")
        update_page_summaries(self.kmin[layer_id], self.kmax[layer_id], k, loc, self.page_size,
                              k_cache=k_cache, codes=self.layer_codes(layer_id))

    def nbytes(self) -> int:
        n = self.kmin.numel() * self.kmin.element_size() * 2
        return n + (self.codes.numel() if self.codes is not None else 0)


__all__ = ["PageSummaries", "key_codes_supported", "update_page_summaries"]
