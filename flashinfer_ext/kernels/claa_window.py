"""CLAA window scoring of one layer, accumulated into the cross-layer max.

Reference: :func:`sglang_sparse.claa.window_scores` (per-layer scores ``[H_kv, n]``) followed by
:func:`sglang_sparse.claa.aggregate_max` (element-wise max over layers and KV heads).

For one request and one layer, with the last ``w`` prompt queries (window query ``i`` sits at
position ``n - w + i``) and all ``n`` prompt keys::

    A[h, i, j] = softmax_j(q[n-w+i, h] . k[j, h // G] * sm_scale)   over j <= n-w+i (causal)
    s[h, j]    = sum_i A[h, i, j]
    S[g, j]    = sum_{h in group g} pool(s[h, :])[j]   (pool per segment: prefix [0, n-w), window [n-w, n))
    acc[j]     = max(acc[j], max_g S[g, j])

Three passes, so that no ``w x n`` matrix exists outside a tile:

1. ``_claa_tile_stats_kernel``, grid ``(H_kv, n_tiles)``: the logits of the ``G * w`` rows of a KV
   head against one tile of ``BLOCK_N`` keys (one ``tl.dot``); per row the tile max and the tile's
   sum of ``exp2(s - max)``.
2. ``_claa_row_stats_kernel``, grid ``(H_kv,)``: merges the tiles' (max, sum) into the row's
   softmax normaliser.
3. ``_claa_colsum_kernel``, grid ``(H_kv, n_tiles)``: recomputes the tile's logits, normalises them
   and sums the ``w`` window rows of each query head: ``s[h, j]`` (one fp32 row per query head).
4. ``_claa_pool_max_kernel``, grid ``(cdiv(n, BLOCK_J),)``: pooling per query head within each
   segment, the sum over each GQA group, optionally the per-layer scores ``S``, and the running
   max over KV heads and layers. Each output column is owned by one program (no atomics).

Logits use base 2 (``qk_scale = sm_scale * log2(e)``); softmax is invariant to the base change.
"""

import triton
import triton.language as tl


@triton.jit
def _load_window_logits(Q, K, h, t, n, w, stride_qn, stride_qh, stride_kn, stride_kh, qk_scale,
                        G: tl.constexpr, G_PAD: tl.constexpr, W_PAD: tl.constexpr, D: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Logits (base 2) of the G*w window rows of KV head ``h`` against key tile ``t``.

    Rows are laid out as ``r = g * W_PAD + i``; returns (s [ROWS, BLOCK_N] with -inf where
    invisible, offs_j [BLOCK_N], row_ok [ROWS])."""
    ROWS: tl.constexpr = G_PAD * W_PAD
    r = tl.arange(0, ROWS)
    g = r // W_PAD
    i = r % W_PAD
    row_ok = (g < G) & (i < w)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_ptrs = Q + i[:, None].to(tl.int64) * stride_qn + (h * G + g)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    offs_j = t * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = offs_j < n
    k_ptrs = K + offs_j[:, None].to(tl.int64) * stride_kn + h * stride_kh + offs_d[None, :]
    k = tl.load(k_ptrs, mask=j_ok[:, None] & d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale
    visible = row_ok[:, None] & j_ok[None, :] & (offs_j[None, :] <= (n - w + i)[:, None])
    s = tl.where(visible, s, float("-inf"))
    return s, offs_j, row_ok


@triton.jit
def _claa_tile_stats_kernel(Q, K, TileM, TileL, n, w, n_tiles,
                            stride_qn, stride_qh, stride_kn, stride_kh, qk_scale,
                            G: tl.constexpr, G_PAD: tl.constexpr, W_PAD: tl.constexpr,
                            D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    h = tl.program_id(0)
    t = tl.program_id(1)
    ROWS: tl.constexpr = G_PAD * W_PAD
    s, offs_j, row_ok = _load_window_logits(Q, K, h, t, n, w, stride_qn, stride_qh, stride_kn, stride_kh,
                                            qk_scale, G, G_PAD, W_PAD, D, BLOCK_D, BLOCK_N)
    m = tl.max(s, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
    r = tl.arange(0, ROWS)
    base = (h * n_tiles + t) * ROWS
    tl.store(TileM + base + r, m)
    tl.store(TileL + base + r, l)


@triton.jit
def _claa_row_stats_kernel(TileM, TileL, RowM, RowL, n_tiles, ROWS: tl.constexpr):
    h = tl.program_id(0)
    r = tl.arange(0, ROWS)
    m_run = tl.full([ROWS], float("-inf"), tl.float32)
    l_run = tl.zeros([ROWS], tl.float32)
    for t in range(0, n_tiles):
        base = (h * n_tiles + t) * ROWS
        m_t = tl.load(TileM + base + r)
        l_t = tl.load(TileL + base + r)
        m_new = tl.maximum(m_run, m_t)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_run = l_run * tl.exp2(m_run - m_ref) + l_t * tl.exp2(m_t - m_ref)
        m_run = m_new
    tl.store(RowM + h * ROWS + r, m_run)
    tl.store(RowL + h * ROWS + r, l_run)


@triton.jit
def _claa_colsum_kernel(Q, K, RowM, RowL, ColSum, n, w, stride_cs,
                        stride_qn, stride_qh, stride_kn, stride_kh, qk_scale,
                        G: tl.constexpr, G_PAD: tl.constexpr, W_PAD: tl.constexpr,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    h = tl.program_id(0)
    t = tl.program_id(1)
    ROWS: tl.constexpr = G_PAD * W_PAD
    s, offs_j, row_ok = _load_window_logits(Q, K, h, t, n, w, stride_qn, stride_qh, stride_kn, stride_kh,
                                            qk_scale, G, G_PAD, W_PAD, D, BLOCK_D, BLOCK_N)
    r = tl.arange(0, ROWS)
    m = tl.load(RowM + h * ROWS + r)
    l = tl.load(RowL + h * ROWS + r)
    m = tl.where(row_ok, m, 0.0)
    inv_l = tl.where(row_ok & (l > 0), 1.0 / l, 0.0)
    p = tl.exp2(s - m[:, None]) * inv_l[:, None]          # exp2(-inf) = 0 where invisible
    col = tl.sum(tl.reshape(p, [G_PAD, W_PAD, BLOCK_N]), axis=1)   # [G_PAD, BLOCK_N]
    g = tl.arange(0, G_PAD)
    ptrs = ColSum + (h * G + g)[:, None].to(tl.int64) * stride_cs + offs_j[None, :]
    tl.store(ptrs, col, mask=(g < G)[:, None] & (offs_j < n)[None, :])


@triton.jit
def _claa_pool_max_kernel(ColSum, Acc, LayerOut, n, w, stride_cs, stride_lo, H_KV,
                          G: tl.constexpr, G_PAD: tl.constexpr, H_KV_PAD: tl.constexpr,
                          POOL_K: tl.constexpr, POOL_MAX: tl.constexpr,
                          WRITE_LAYER: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_J: tl.constexpr):
    pid = tl.program_id(0)
    HQ_PAD: tl.constexpr = H_KV_PAD * G_PAD
    R: tl.constexpr = POOL_K // 2
    r = tl.arange(0, HQ_PAD)
    kv = r // G_PAD
    g = r % G_PAD
    row_ok = (kv < H_KV) & (g < G)
    hq = kv * G + g
    offs_j = pid * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = offs_j < n
    win_start = n - w
    seg_j = offs_j >= win_start
    if POOL_MAX:
        pooled = tl.full([HQ_PAD, BLOCK_J], float("-inf"), tl.float32)
    else:
        pooled = tl.zeros([HQ_PAD, BLOCK_J], tl.float32)
    for dt in tl.static_range(POOL_K):
        jj = offs_j + (dt - R)
        ok = j_ok & (jj >= 0) & (jj < n) & ((jj >= win_start) == seg_j)
        m2 = row_ok[:, None] & ok[None, :]
        x = tl.load(ColSum + hq[:, None].to(tl.int64) * stride_cs + jj[None, :], mask=m2, other=0.0)
        if POOL_MAX:
            pooled = tl.maximum(pooled, tl.where(m2, x, float("-inf")))
        else:
            pooled += x
    if POOL_MAX:
        pooled = tl.where(row_ok[:, None], pooled, 0.0)
    else:
        pooled = pooled * (1.0 / POOL_K)
    per_kv = tl.sum(tl.reshape(pooled, [H_KV_PAD, G_PAD, BLOCK_J]), axis=1)   # [H_KV_PAD, BLOCK_J]
    kvs = tl.arange(0, H_KV_PAD)
    kv_ok = kvs < H_KV
    if WRITE_LAYER:
        tl.store(LayerOut + kvs[:, None].to(tl.int64) * stride_lo + offs_j[None, :], per_kv,
                 mask=kv_ok[:, None] & j_ok[None, :])
    if ACCUMULATE:
        best = tl.max(tl.where(kv_ok[:, None], per_kv, float("-inf")), axis=0)
        old = tl.load(Acc + offs_j, mask=j_ok, other=float("-inf"))
        tl.store(Acc + offs_j, tl.maximum(old, best), mask=j_ok)
