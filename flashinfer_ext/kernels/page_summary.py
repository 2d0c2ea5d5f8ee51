"""Page summaries (Quest key min/max) updated right after K is written to SGLang's KV pool.

Reference: :func:`sglang_sparse.prhs.page_summaries` (``kmin, kmax [N, H_kv, D]`` over the tokens of
each page), kept per *physical* page: ``page = slot // P``.

Input: the keys just written ``k [n_tok, H_kv, D]`` and their slots ``loc [n_tok]`` (SGLang's
``out_cache_loc``). The tokens of one physical page must appear contiguously in ``loc`` in ascending
slot order; SGLang's page-aligned allocation guarantees this for extend and decode batches (a page
belongs to one request and its positions are written in order).

Rule per touched page ("reset on first write"): when this batch writes the page's slot at offset 0,
the page starts over: ``kmin = min over the tokens written now``; otherwise the new tokens are folded
in: ``kmin = min(kmin, new tokens)``. A freed and reused page is always rewritten from offset 0, so
its stale summary never survives.

Grid ``(n_tok,)``: the program of the first token of each run (a "leader") finds the run's length
(at most P) from the slots, reads its tokens and writes the page's summary once; the other programs
exit. No atomics, no races.
Min/max are taken in fp32 and stored in the summary dtype (exact for bf16 keys into bf16 summaries).
"""

import triton
import triton.language as tl


@triton.jit
def _page_summary_kernel(K, Loc, KMin, KMax, n_tok, stride_kt, stride_kh, stride_sp, stride_sh,
                         H_KV, D, P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    loc = tl.load(Loc + i).to(tl.int64)
    page = loc // P
    prev = tl.load(Loc + tl.maximum(i - 1, 0)).to(tl.int64)
    leader = (i == 0) | (prev // P != page) | (prev >= loc)
    if leader:
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        hd_ok = (offs_h[:, None] < H_KV) & (offs_d[None, :] < D)
        k_off = offs_h[:, None] * stride_kh + offs_d[None, :]
        # the run: tokens i, i+1, ... while they are in range, on this page and in ascending slot order
        # (found at once over P candidates, so that a decode step's one-token runs loop once)
        t = tl.arange(0, P)
        tok = tl.minimum(i + t, n_tok - 1)
        loc_t = tl.load(Loc + tok).to(tl.int64)
        loc_p = tl.load(Loc + tl.maximum(tok - 1, 0)).to(tl.int64)
        ok = (i + t < n_tok) & (loc_t // P == page) & ((t == 0) | (loc_t > loc_p))
        alive = tl.cumsum((~ok).to(tl.int32), axis=0) == 0
        n_run = tl.sum(alive.to(tl.int32), axis=0)
        reset = tl.sum((alive & (loc_t % P == 0)).to(tl.int32), axis=0) > 0
        mn = tl.full([BLOCK_H, BLOCK_D], float("inf"), tl.float32)
        mx = tl.full([BLOCK_H, BLOCK_D], float("-inf"), tl.float32)
        for r in range(0, n_run):
            kt = tl.load(K + (i + r).to(tl.int64) * stride_kt + k_off, mask=hd_ok, other=0.0).to(tl.float32)
            mn = tl.minimum(mn, kt)
            mx = tl.maximum(mx, kt)
        s_off = page * stride_sp + offs_h[:, None] * stride_sh + offs_d[None, :]
        if reset == 0:
            old_mn = tl.load(KMin + s_off, mask=hd_ok, other=0.0).to(tl.float32)
            old_mx = tl.load(KMax + s_off, mask=hd_ok, other=0.0).to(tl.float32)
            mn = tl.minimum(mn, old_mn)
            mx = tl.maximum(mx, old_mx)
        tl.store(KMin + s_off, mn.to(KMin.dtype.element_ty), mask=hd_ok)
        tl.store(KMax + s_off, mx.to(KMax.dtype.element_ty), mask=hd_ok)
