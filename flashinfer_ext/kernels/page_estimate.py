"""Estimated attention mass of every page per query head, from 4-bit key codes (``--prhs-select estimate``).

Reference: :func:`sglang_sparse.prhs.estimated_page_log_mass` on the keys
:func:`sglang_sparse.prhs.dequantise_page_keys` gives back from the codes.

For request b, KV head h and page p a key's code ``c`` stands for ``k~ = kmin + c * step``, ``step = (kmax - kmin)
/ 15`` (the page's summaries, fp32). By linearity ``q . k~ = q . kmin + (q * step) . c``: the program never rebuilds
the keys. Per page it scales the GQA group's queries by the page's steps (``W = sm_scale * q * step``, a
``[D / 2, G_PAD]`` fp16 tile per channel half) and multiplies the codes themselves on the tensor cores
(``tl.dot(codes, W)``, fp32 accumulation); the codes become fp16 with integer operations only (the nibble is
or-ed into the mantissa of 1024.0, and 1024 subtracted, both exact)::

    Est[b, h * G + g, p] = log sum_{t in p} exp(sm_scale * q[g] . kmin_p + sum_d W_p[d, g] * c_t[d])

fp16 rounding of ``W`` (relative 2^-11 per product) is the only difference from the reference; ``W`` saturates at
fp16's largest finite value instead of overflowing.

A partial last page (``LastLen[b] < P``) has no codes yet (a page is quantised when it fills): the program holding
it scores its exact keys from the K buffer instead. Codes: ``[num_slots, H_kv, D / 2]`` uint8, channel ``d < D / 2``
in the low nibble of byte d, channel ``d + D / 2`` in the high nibble (:mod:`flashinfer_ext.kernels.page_summary`).

Grid ``(bs, H_kv, cdiv(max_pages, PAGES))``: a program scores ``PAGES`` consecutive pages of one (request, KV head)
in a software-pipelined loop, ``KP`` pages per ``tl.dot``: their codes stacked as one ``[KP * P, D / 2]`` tile against
a ``[D / 2, G_PAD]`` tile whose column ``j * G + g`` holds query head g scaled by page j's steps (``G_PAD >= KP * G``),
each page's log-sum-exp taken over its own rows of its own columns. KP = 1 is one page per ``tl.dot``; a larger KP
shares the per-page scaling, reductions and barriers among KP pages (fewer instructions per page; its speed is
measured by ``benchmarks.decode_breakdown --estimate-shapes``). Pages past the request's coded pages are masked;
programs past the page count exit, and so do requests whose reselection flag ``Flag[b]`` is 0. Reads D / 2 bytes per
key and KV head, 1/8 of the bf16 K+V bytes a dense step reads, plus the summaries.
"""

import triton
import triton.language as tl

from flashinfer_ext.kernels.page_summary import page_levels

_FP16_MAX = tl.constexpr(65504.0)


@triton.jit
def _nibbles_fp16(raw):
    """uint8 codes -> the low and high nibbles as exact fp16 values 0..15, with integer operations: the nibble is
    or-ed into the mantissa of 1024.0 (0x6400, one unit per mantissa step) and 1024 subtracted."""
    r = raw.to(tl.int16)
    lo = ((r & 15) | 0x6400).to(tl.float16, bitcast=True)
    hi = ((r >> 4) | 0x6400).to(tl.float16, bitcast=True)
    off = tl.full((1, 1), 1024.0, tl.float16)
    return lo - off, hi - off


@triton.jit
def _page_estimate_kernel(Flag, Q, KMin, KMax, Codes, KCache, PageTable, NumPages, LastLen, Est,
                          stride_qb, stride_qh, stride_sp, stride_sh, stride_ct, stride_ch, stride_kt, stride_kh,
                          stride_pt, stride_eb, stride_eh, sm_scale,
                          G: tl.constexpr, G_PAD: tl.constexpr, HALF_D: tl.constexpr, P: tl.constexpr,
                          PAGES: tl.constexpr, KP: tl.constexpr, NUM_STAGES: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    first = tl.program_id(2) * PAGES
    npg = tl.load(NumPages + b)
    if (first < npg) & (tl.load(Flag + b) != 0):
        last_len = tl.load(LastLen + b)
        n_coded = tl.where(last_len < P, npg - 1, npg)            # full pages: they have codes
        # columns of the score tile: c = j * G + g, page j (of the KP pages of one tl.dot) and query head g
        c = tl.arange(0, G_PAD)
        c_ok = c < KP * G
        cj = c // G
        cg = c % G
        e = tl.arange(0, HALF_D)
        t = tl.arange(0, P)
        r = tl.arange(0, KP * P)
        q_base = Q + b.to(tl.int64) * stride_qb + h * G * stride_qh
        pt_base = PageTable + b.to(tl.int64) * stride_pt
        e_base = Est + b.to(tl.int64) * stride_eb + (h * G + cg) * stride_eh
        # the group's queries per column, channels along rows: [HALF_D, G_PAD] per half, sm_scale folded in
        q_off = q_base + cg[None, :] * stride_qh + e[:, None]
        q_lo = tl.load(q_off, mask=c_ok[None, :], other=0.0).to(tl.float32) * sm_scale
        q_hi = tl.load(q_off + HALF_D, mask=c_ok[None, :], other=0.0).to(tl.float32) * sm_scale
        own = (r // P)[:, None] == cj[None, :]                     # a row's page is its column's page
        for i in tl.range(0, PAGES, KP, num_stages=NUM_STAGES):
            # KP pages, their codes stacked as one [KP * P, HALF_D] tile (a page past the coded ones reads page 0
            # and stores nothing)
            lp = first + i + tl.arange(0, KP)
            phys = tl.load(pt_base + lp, mask=lp < n_coded, other=0).to(tl.int64)
            slot = tl.reshape(phys[:, None] * P + t[None, :], [KP * P])
            raw = tl.load(Codes + slot[:, None] * stride_ct + h * stride_ch + e[None, :])          # [KP * P, HALF_D]
            c_lo, c_hi = _nibbles_fp16(raw)
            # each column's page: its levels, the queries scaled by its steps
            lp_c = first + i + cj
            ok_c = c_ok & (lp_c < n_coded)
            phys_c = tl.load(pt_base + lp_c, mask=ok_c, other=0).to(tl.int64)
            lo_min, lo_step, hi_min, hi_step = page_levels(KMin, KMax, phys_c[None, :] * stride_sp + h * stride_sh
                                                           + e[:, None], HALF_D, ok_c[None, :])   # [HALF_D, G_PAD]
            w_lo = tl.minimum(tl.maximum(q_lo * lo_step, -_FP16_MAX), _FP16_MAX).to(tl.float16)
            w_hi = tl.minimum(tl.maximum(q_hi * hi_step, -_FP16_MAX), _FP16_MAX).to(tl.float16)
            base = tl.sum(q_lo * lo_min + q_hi * hi_min, axis=0)                                  # [G_PAD]
            s = tl.dot(c_lo, w_lo)
            s = tl.dot(c_hi, w_hi, acc=s) + base[None, :]                                         # [KP * P, G_PAD]
            s = tl.where(own, s, float("-inf"))
            m = tl.max(s, axis=0)
            m = tl.where(c_ok, m, 0.0)
            est = m + tl.log(tl.sum(tl.exp(s - m[None, :]), axis=0))
            tl.store(e_base + lp_c, est, mask=ok_c)
        # the partial last page, if this program holds it: its exact keys
        if (last_len < P) & (npg - 1 < first + PAGES):
            lp1 = npg - 1
            phys1 = tl.load(PageTable + b.to(tl.int64) * stride_pt + lp1).to(tl.int64)
            d = tl.arange(0, 2 * HALF_D)
            t_ok = t < last_len
            k = tl.load(KCache + (phys1 * P + t)[:, None] * stride_kt + h * stride_kh + d[None, :],
                        mask=t_ok[:, None], other=0.0).to(tl.float32)                           # [P, D]
            for gg in tl.static_range(G):
                qx = tl.load(q_base + gg * stride_qh + d).to(tl.float32) * sm_scale
                sx = tl.where(t_ok, tl.sum(k * qx[None, :], axis=1), float("-inf"))
                mx = tl.max(sx, axis=0)
                tl.store(Est + b.to(tl.int64) * stride_eb + (h * G + gg) * stride_eh + lp1,
                         mx + tl.log(tl.sum(tl.exp(sx - mx), axis=0)))
