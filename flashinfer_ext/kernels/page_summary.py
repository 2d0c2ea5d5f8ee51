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

Key codes (``HAS_CODES``, ``--prhs-select estimate``): when a run writes a page's last slot (offset P - 1) the page
is full and its summary final, so the leader quantises the page's P keys, read back from the layer's K buffer
``KCache [num_slots, H_KV, D]``, to 4 bits per element inside the page's stored ``[kmin, kmax]``
(:func:`sglang_sparse.prhs.quantise_page_keys`) and writes them to ``Codes [num_slots, H_KV, D / 2]`` uint8: channel
``d < D / 2`` in the low nibble of byte d, channel ``d + D / 2`` in its high nibble. A partial page has no codes (the
estimate reads its exact keys); a full page's codes never change, because its summary no longer does.
"""

import triton
import triton.language as tl


@triton.jit
def _page_summary_kernel(K, Loc, KMin, KMax, n_tok, stride_kt, stride_kh, stride_sp, stride_sh,
                         H_KV, D, KCache, Codes, stride_ct, stride_ch, stride_ot, stride_oh,
                         P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                         HAS_CODES: tl.constexpr, HALF_D: tl.constexpr):
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
        if HAS_CODES:
            last = tl.max(tl.where(alive, loc_t, -1), axis=0)
            if last % P == P - 1:
                tl.debug_barrier()      # the summary just stored is the quantisation range
                _quantise_page(KCache, Codes, KMin, KMax, page, stride_ct, stride_ch, stride_ot, stride_oh,
                               stride_sp, stride_sh, H_KV, P, HALF_D)


@triton.jit
def _quantise_page(KCache, Codes, KMin, KMax, page, stride_ct, stride_ch, stride_ot, stride_oh, stride_sp, stride_sh,
                   H_KV, P: tl.constexpr, HALF_D: tl.constexpr):
    """4-bit codes of the P keys of a full page, every KV head (low nibble: channel e, high: channel e + D/2)."""
    t = tl.arange(0, P)
    e = tl.arange(0, HALF_D)
    slot = page * P + t
    for h in range(0, H_KV):
        lo_min, lo_step, hi_min, hi_step = page_levels(KMin, KMax, page * stride_sp + h * stride_sh + e, HALF_D, True)
        k_off = slot[:, None] * stride_ct + h * stride_ch + e[None, :]
        k_lo = tl.load(KCache + k_off).to(tl.float32)
        k_hi = tl.load(KCache + k_off + HALF_D).to(tl.float32)
        c_lo = _code(k_lo, lo_min[None, :], lo_step[None, :])
        c_hi = _code(k_hi, hi_min[None, :], hi_step[None, :])
        tl.store(Codes + slot[:, None] * stride_ot + h * stride_oh + e[None, :], (c_lo | (c_hi << 4)).to(tl.uint8))


@triton.jit
def page_levels(KMin, KMax, s_off, HALF_D: tl.constexpr, mask):
    """The 16 quantisation levels of a page's two channel halves at summary offsets ``s_off`` (channels ``e`` of the
    low half; the high half is ``HALF_D`` further): ``(lo_min, lo_step, hi_min, hi_step)`` fp32, ``step = (kmax -
    kmin) / 15``; 0 where ``mask`` is off. Shared by the quantisation here and the estimate that reads the codes."""
    lo_min = tl.load(KMin + s_off, mask=mask, other=0.0).to(tl.float32)
    hi_min = tl.load(KMin + s_off + HALF_D, mask=mask, other=0.0).to(tl.float32)
    lo_step = (tl.load(KMax + s_off, mask=mask, other=0.0).to(tl.float32) - lo_min) / 15.0
    hi_step = (tl.load(KMax + s_off + HALF_D, mask=mask, other=0.0).to(tl.float32) - hi_min) / 15.0
    return lo_min, lo_step, hi_min, hi_step


@triton.jit
def _code(k, lo, step):
    """``clamp(floor((k - lo) / step + 1/2), 0, 15)`` (0 where step is 0), int32."""
    x = tl.where(step > 0, (k - lo) / tl.where(step > 0, step, 1.0), 0.0)
    return tl.minimum(tl.maximum(tl.floor(x + 0.5), 0.0), 15.0).to(tl.int32)

