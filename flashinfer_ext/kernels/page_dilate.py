"""Reuse of the last fresh page selection between reselection steps, widened by +-r pages.

Reference: :func:`sglang_sparse.prhs.reuse_with_dilation` (``S_new = {p + t : p in S_prev, |t| <= r}
U sinks U recents U {pages appended since the selection}``, clipped to ``[0, N)``, ascending) and the
``DILATE`` action of :class:`sglang_sparse.prhs.SelectionSchedule`.

Runs only for the requests whose device flag ``Flag[b] == 0`` (a step that reuses), so a CUDA graph can contain
both the selector and this kernel and the action is chosen out of the graph by writing the flag
(``SparseDecodeWrapper.plan(reselect=...)``). No bounds are computed on such steps: the list carries
no certificate (``delta_hat`` = NaN, in ``CurDhat`` and in the selecting layer's record ``LeadDhat``) and
no unread-mass suffix (``ListRest`` = NaN, so ART's certified test cannot fire; its magnitude/direction test
still runs).

The previous selection is read from the selector's per-request state (``StatePages[req, h]``, keyed
by the request's ``req_to_token`` row, so a request may move within the batch between steps).

One program per (request b, KV head h): the previous list's pages, shifted by ``t`` in ``[-r, r]``,
are scattered as flags into a scratch row of ``BLOCK_PG`` entries, OR-ed with the forced and new
pages, and compacted in ascending order with a prefix sum. The list is capped at the buffer width
``W`` (the reference does not cap; with the default width, all pages, nothing is ever cut).
"""

import triton
import triton.language as tl


@triton.jit
def _page_dilate_kernel(Flag, ReqIdx, StatePages, StateNum, StateNpg, NumPages, PageTable, CurPages, CurPhys,
                        CurNum, CurDhat, LeadDhat, CurRest, Bitmap, stride_pt, stride_st_r, stride_st_h, stride_sel_b,
                        stride_sel_h, stride_bm_b, stride_bm_h, dilation, sink_pages, recent_pages, width,
                        BLOCK_PG: tl.constexpr, PREV_PAD: tl.constexpr):
    b = tl.program_id(0)
    if tl.load(Flag + b) == 0:
        h = tl.program_id(1)
        n_heads = tl.num_programs(1)
        b64 = b.to(tl.int64)
        npg = tl.load(NumPages + b)
        req = tl.load(ReqIdx + b).to(tl.int64)
        prev_npg = tl.load(StateNpg + req)
        n_prev = tl.load(StateNum + req * n_heads + h)
        sel_base = StatePages + req * stride_st_r + h * stride_st_h
        bm_base = Bitmap + b64 * stride_bm_b + h * stride_bm_h
        idx = tl.arange(0, BLOCK_PG)
        tl.store(bm_base + idx, tl.zeros([BLOCK_PG], tl.int8))
        tl.debug_barrier()
        pos = tl.arange(0, PREV_PAD)
        prev_ok = pos < n_prev
        prev = tl.load(sel_base + pos, mask=prev_ok, other=-1)
        prev_ok = prev_ok & (prev >= 0)
        for t in range(-dilation, dilation + 1):
            p = prev + t
            ok = prev_ok & (p >= 0) & (p < npg)
            tl.store(bm_base + p, tl.full([PREV_PAD], 1, tl.int8), mask=ok)
        tl.debug_barrier()
        valid = idx < npg
        ns = tl.minimum(sink_pages, npg)
        keep = tl.load(bm_base + idx) != 0
        keep = keep | (idx < ns) | (idx >= npg - recent_pages) | (idx >= prev_npg)
        keep = keep & valid
        cpos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
        n_new = tl.minimum(tl.sum(keep.to(tl.int32), axis=0), width)
        out_ok = keep & (cpos < width)
        cur_base = b64 * stride_sel_b + h * stride_sel_h
        tl.store(CurPages + cur_base + cpos, idx, mask=out_ok)
        phys = tl.load(PageTable + b64 * stride_pt + idx, mask=out_ok, other=-1)
        tl.store(CurPhys + cur_base + cpos, phys, mask=out_ok)
        tl.store(CurRest + cur_base + cpos, tl.full([BLOCK_PG], float("nan"), tl.float32), mask=out_ok)
        pad = n_new + idx
        pad_ok = pad < width
        tl.store(CurPages + cur_base + pad, tl.full([BLOCK_PG], -1, tl.int32), mask=pad_ok)
        tl.store(CurPhys + cur_base + pad, tl.full([BLOCK_PG], -1, tl.int32), mask=pad_ok)
        tl.store(CurNum + b * n_heads + h, n_new)
        tl.store(CurDhat + b * n_heads + h, n_new.to(tl.float32) * 0.0 + float("nan"))
        tl.store(LeadDhat + b * n_heads + h, n_new.to(tl.float32) * 0.0 + float("nan"))
