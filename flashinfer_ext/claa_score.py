"""CLAA window scoring: the last ``w`` prompt queries of a layer against all its prompt keys.

Kernels: :mod:`flashinfer_ext.kernels.claa_window`. Reference: ``sglang_sparse.claa.window_scores``
(one layer, ``[H_kv, n]``) and ``sglang_sparse.claa.aggregate_max`` (max over layers and heads).

Usage, one request at a time (CLAA's decision is per request)::

    scorer = ClaaWindowScorer(num_qo_heads=32, num_kv_heads=8, head_dim=128, window=8,
                              max_len=131072, device="cuda")
    acc = scorer.new_accumulator(n)          # [n] fp32 filled with -inf (or reuse one and .fill_)
    for layer in aggregated_layers:          # e.g. the 4 layers before the filter layer
        scorer.score(q_layer, k_layer, acc)  # acc[j] = max(acc[j], max_g S_layer[g, j])
    keep = claa.select_tokens(acc, keep_ratio, window)

``score`` launches four kernels and never allocates: the workspace (tile statistics and one fp32 row
of column sums per query head, ``H_q * max_len * 4`` bytes) belongs to the scorer. It does not
synchronise with the host and may be called inside a CUDA graph for a fixed ``n``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from flashinfer_ext.kernels.claa_window import (
    _claa_colsum_kernel,
    _claa_pool_max_kernel,
    _claa_row_stats_kernel,
    _claa_tile_stats_kernel,
)

_LOG2E = 1.4426950408889634



class ClaaWindowScorer:
    """Owns the workspace of CLAA's window scoring for prompts of up to ``max_len`` tokens.

    Args:
        num_qo_heads, num_kv_heads, head_dim: the layer's attention shapes (GQA: query head ``h``
            reads KV head ``h // (num_qo_heads // num_kv_heads)``).
        window: observation window ``w`` (CLAA's default 8); ``min(window, n)`` rows are used.
        max_len: longest prompt ``n`` this scorer will see.
        pool_kernel: odd pooling length (default 7); ``pool``: ``"avg"`` or ``"max"``.
        sm_scale: softmax scale, default ``1/sqrt(head_dim)`` (as the reference).
        block_n: keys per tile (a power of two >= 16).
    """

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, window: int, max_len: int,
                 pool_kernel: int = 7, pool: str = "avg", sm_scale: Optional[float] = None,
                 device="cuda", block_n: int = 64, num_warps: int = 4):
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads={num_qo_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        if pool_kernel < 1 or pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be a positive odd number, got {pool_kernel}")
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        if window < 1 or max_len < 1:
            raise ValueError("window and max_len must be >= 1")
        self.h_q, self.h_kv, self.d = num_qo_heads, num_kv_heads, head_dim
        self.group = num_qo_heads // num_kv_heads
        self.window, self.max_len = window, max_len
        self.pool_kernel, self.pool = pool_kernel, pool
        self.sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
        self.block_n, self.num_warps = block_n, num_warps
        self.device = torch.device(device)
        self.g_pad = triton.next_power_of_2(self.group)
        w_pad = triton.next_power_of_2(window)
        # tl.dot needs at least 16 rows
        self.w_pad = max(w_pad, 16 // self.g_pad if self.g_pad < 16 else 1)
        self.rows = self.g_pad * self.w_pad
        self.max_tiles = triton.cdiv(max_len, block_n)
        f32 = dict(dtype=torch.float32, device=self.device)
        self.tile_m = torch.empty(num_kv_heads, self.max_tiles, self.rows, **f32)
        self.tile_l = torch.empty(num_kv_heads, self.max_tiles, self.rows, **f32)
        self.row_m = torch.empty(num_kv_heads, self.rows, **f32)
        self.row_l = torch.empty(num_kv_heads, self.rows, **f32)
        self.colsum = torch.empty(num_qo_heads, max_len, **f32)

    def new_accumulator(self, n: int) -> torch.Tensor:
        """A fresh cross-layer max buffer ``[n]`` fp32 filled with -inf (allocates; not for graphs)."""
        return torch.full((n,), float("-inf"), dtype=torch.float32, device=self.device)

    def score(self, q: torch.Tensor, k: torch.Tensor, acc: Optional[torch.Tensor] = None,
              layer_out: Optional[torch.Tensor] = None) -> None:
        """Score one layer of one request.

        Args:
            q: ``[m, H_q, D]`` queries whose last ``w = min(window, n)`` rows are the window
               (pass the whole prompt's q or just its tail; only the last w rows are read).
               bf16/fp16/fp32; any strides with a unit last stride.
            k: ``[n, H_kv, D]`` the layer's prompt keys (same dtype as q), unit last stride.
            acc: ``[n]`` fp32 cross-layer max buffer, updated in place
                 (``acc[j] = max(acc[j], max_g S[g, j])``); None to skip.
            layer_out: ``[H_kv, n]`` fp32, receives this layer's scores ``S`` (what
                 ``claa.window_scores`` returns); None to skip.
        """
        n = k.shape[0]
        if n > self.max_len:
            raise ValueError(f"prompt of {n} tokens exceeds max_len={self.max_len}")
        if k.shape[1] != self.h_kv or k.shape[2] != self.d or q.shape[1] != self.h_q or q.shape[2] != self.d:
            raise ValueError(f"shapes q {tuple(q.shape)} / k {tuple(k.shape)} do not match the scorer")
        if q.stride(-1) != 1 or k.stride(-1) != 1:
            raise ValueError("q and k need a unit stride along head_dim")
        if acc is None and layer_out is None:
            return
        w = min(self.window, n)
        if q.shape[0] < w:
            raise ValueError(f"q has {q.shape[0]} rows, fewer than the window {w}")
        q_win = q[q.shape[0] - w:]
        n_tiles = triton.cdiv(n, self.block_n)
        qk_scale = self.sm_scale * _LOG2E
        block_d = triton.next_power_of_2(self.d)
        common = dict(G=self.group, G_PAD=self.g_pad, W_PAD=self.w_pad, D=self.d, BLOCK_D=block_d,
                      BLOCK_N=self.block_n, num_warps=self.num_warps)
        _claa_tile_stats_kernel[(self.h_kv, n_tiles)](
            q_win, k, self.tile_m, self.tile_l, n, w, n_tiles,
            q_win.stride(0), q_win.stride(1), k.stride(0), k.stride(1), qk_scale, **common)
        _claa_row_stats_kernel[(self.h_kv,)](self.tile_m, self.tile_l, self.row_m, self.row_l, n_tiles,
                                             ROWS=self.rows, num_warps=1)
        _claa_colsum_kernel[(self.h_kv, n_tiles)](
            q_win, k, self.row_m, self.row_l, self.colsum, n, w, self.colsum.stride(0),
            q_win.stride(0), q_win.stride(1), k.stride(0), k.stride(1), qk_scale, **common)
        block_j = 128 if self.h_q <= 32 else 64
        dummy = self.row_m
        _claa_pool_max_kernel[(triton.cdiv(n, block_j),)](
            self.colsum, acc if acc is not None else dummy, layer_out if layer_out is not None else dummy,
            n, w, self.colsum.stride(0), layer_out.stride(0) if layer_out is not None else 0, self.h_kv,
            G=self.group, G_PAD=self.g_pad, H_KV_PAD=triton.next_power_of_2(self.h_kv), POOL_K=self.pool_kernel,
            POOL_MAX=self.pool == "max", WRITE_LAYER=layer_out is not None, ACCUMULATE=acc is not None,
            BLOCK_J=block_j, num_warps=4)
