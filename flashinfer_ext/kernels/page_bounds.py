"""Quest logit bounds of every page of every request, per KV head (the GQA group's max/min).

Reference: :func:`sglang_sparse.prhs.page_bounds` (group bounds ``ub, lb [H_kv, N]``).

For query head h and page p with key summaries ``kmin <= kmax``::

    ub[h, p] = sm_scale * sum_d max(q_d kmin_d, q_d kmax_d) = sm_scale * (q+ . kmax + q- . kmin)
    lb[h, p] = sm_scale * sum_d min(q_d kmin_d, q_d kmax_d) = sm_scale * (q+ . kmin + q- . kmax)

with ``q+ = max(q, 0)`` and ``q- = min(q, 0)``. Splitting q by sign turns the bounds into four
ordinary dot products, so a program scores ``BLOCK_P`` pages of one (request, KV head) for the
whole GQA group with ``tl.dot`` (rows padded to 16). For bf16 q and bf16 summaries every product is
exact in fp32; only the fp32 summation order differs from the reference.

Grid ``(bs, H_kv, cdiv(max_pages, BLOCK_P * ITERS))``: a program scores ``ITERS`` consecutive chunks
of ``BLOCK_P`` pages in a software-pipelined loop; programs past a request's page count exit, and so do
requests whose reselection flag ``Flag[b]`` is 0 (they reuse an earlier selection). Output
``UB, LB [bs, H_kv, MAX_PAGES]`` fp32 (natural-log units, sm_scale applied), read by the selector.
"""

import triton
import triton.language as tl


@triton.jit
def _page_bounds_kernel(Flag, Q, KMin, KMax, PageTable, NumPages, UB, LB,
                        stride_qb, stride_qh, stride_sp, stride_sh, stride_pt, stride_ub_b, stride_ub_h,
                        sm_scale, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, ITERS: tl.constexpr,
                        NUM_STAGES: tl.constexpr):
    b = tl.program_id(0)
    first = tl.program_id(2) * (BLOCK_P * ITERS)
    if (first < tl.load(NumPages + b)) & (tl.load(Flag + b) != 0):
        _bounds_chunks(Q, KMin, KMax, PageTable, NumPages, UB, LB, b, tl.program_id(1), first,
                       stride_qb, stride_qh, stride_sp, stride_sh, stride_pt, stride_ub_b, stride_ub_h,
                       sm_scale, G, G_PAD, D, BLOCK_D, BLOCK_P, ITERS, NUM_STAGES)


@triton.jit
def _bounds_chunks(Q, KMin, KMax, PageTable, NumPages, UB, LB, b, h, first,
                   stride_qb, stride_qh, stride_sp, stride_sh, stride_pt, stride_ub_b, stride_ub_h,
                   sm_scale, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, ITERS: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Bounds of pages ``[first, first + ITERS * BLOCK_P)`` (those below the page count) of request b, KV head h."""
    npg = tl.load(NumPages + b)
    g = tl.arange(0, G_PAD)
    g_ok = g < G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b.to(tl.int64) * stride_qb + (h * G + g)[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    qf = q.to(tl.float32)
    q_pos = tl.where(qf > 0, qf, 0.0).to(KMin.dtype.element_ty)
    q_neg = tl.where(qf < 0, qf, 0.0).to(KMin.dtype.element_ty)
    base = b.to(tl.int64) * stride_ub_b + h * stride_ub_h
    # ITERS chunks of BLOCK_P pages, software-pipelined (the next chunk's summaries load while this
    # one is scored)
    for i in tl.range(0, ITERS, num_stages=NUM_STAGES):
        lp = first + i * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = lp < npg
        phys = tl.load(PageTable + b.to(tl.int64) * stride_pt + lp, mask=p_ok, other=0).to(tl.int64)
        s_off = phys[:, None] * stride_sp + h * stride_sh + offs_d[None, :]
        m2 = p_ok[:, None] & d_ok[None, :]
        kmin = tl.load(KMin + s_off, mask=m2, other=0.0)
        kmax = tl.load(KMax + s_off, mask=m2, other=0.0)
        ub = tl.dot(q_pos, tl.trans(kmax)) + tl.dot(q_neg, tl.trans(kmin))    # [G_PAD, BLOCK_P]
        lb = tl.dot(q_pos, tl.trans(kmin)) + tl.dot(q_neg, tl.trans(kmax))
        ub_g = tl.max(tl.where(g_ok[:, None], ub, float("-inf")), axis=0) * sm_scale
        lb_g = tl.min(tl.where(g_ok[:, None], lb, float("inf")), axis=0) * sm_scale
        tl.store(UB + base + lp, ub_g, mask=p_ok)
        tl.store(LB + base + lp, lb_g, mask=p_ok)
