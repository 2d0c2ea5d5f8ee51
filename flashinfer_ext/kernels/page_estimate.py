"""Estimated attention mass of every page per query head, from 4-bit key codes (``--prhs-select estimate``).

Reference: :func:`sglang_sparse.prhs.estimated_page_log_mass` on the keys
:func:`sglang_sparse.prhs.dequantise_page_keys` gives back from the codes.

For request b, KV head h and page p (physical page ``phys``) the program rebuilds each key of the page from its
code, ``k~ = kmin + code * (kmax - kmin) / 15`` (the summaries as stored, fp32), and scores it against the GQA
group's queries (two ``tl.dot`` over the two channel halves the nibbles hold, rows padded to 16, operands in the
query's dtype, fp32 accumulation)::

    Est[b, h * G + g, p] = log sum_{t in p} exp(sm_scale * q[g] . k~_t)

A partial last page (``LastLen[b] < P``) has no codes yet (a page is quantised when it fills): its exact keys
are read from the K buffer instead. Codes: ``[num_slots, H_kv, D / 2]`` uint8, channel ``d < D / 2`` in the low
nibble of byte d, channel ``d + D / 2`` in the high nibble (:mod:`flashinfer_ext.kernels.page_summary`).

Grid ``(bs, H_kv, cdiv(max_pages, PAGES))``: a program scores ``PAGES`` consecutive pages in a pipelined loop (pages
past the request's count are masked); programs past the count exit, and so do requests whose reselection flag
``Flag[b]`` is 0. Reads D / 2 bytes per
key and KV head: 1/8 of the bf16 K+V bytes a dense step reads, plus the summaries.
"""

import triton
import triton.language as tl

from flashinfer_ext.kernels.page_summary import page_levels


@triton.jit
def _page_estimate_kernel(Flag, Q, KMin, KMax, Codes, KCache, PageTable, NumPages, LastLen, Est,
                          stride_qb, stride_qh, stride_sp, stride_sh, stride_ct, stride_ch, stride_kt, stride_kh,
                          stride_pt, stride_eb, stride_eh, sm_scale,
                          G: tl.constexpr, G_PAD: tl.constexpr, HALF_D: tl.constexpr, P: tl.constexpr,
                          PAGES: tl.constexpr, NUM_STAGES: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    first = tl.program_id(2) * PAGES
    npg = tl.load(NumPages + b)
    if (first < npg) & (tl.load(Flag + b) != 0):
        last_len = tl.load(LastLen + b)
        g = tl.arange(0, G_PAD)
        g_ok = g < G
        e = tl.arange(0, HALF_D)
        t = tl.arange(0, P)
        # the group's queries, split in the two channel halves the nibbles hold
        q_off = Q + b.to(tl.int64) * stride_qb + (h * G + g)[:, None] * stride_qh + e[None, :]
        q_lo = tl.load(q_off, mask=g_ok[:, None], other=0.0)
        q_hi = tl.load(q_off + HALF_D, mask=g_ok[:, None], other=0.0)
        e_base = Est + b.to(tl.int64) * stride_eb + (h * G + g) * stride_eh
        # PAGES pages, software-pipelined (masked past the page count, no branch)
        for i in tl.range(0, PAGES, num_stages=NUM_STAGES):
            lp = first + i
            ok = lp < npg
            phys = tl.load(PageTable + b.to(tl.int64) * stride_pt + lp, mask=ok, other=0).to(tl.int64)
            lo_min, lo_step, hi_min, hi_step = page_levels(KMin, KMax, phys * stride_sp + h * stride_sh + e, HALF_D,
                                                           ok)
            slot = phys * P + t
            n_p = tl.where(lp == npg - 1, last_len, P)
            partial = n_p < P
            raw = tl.load(Codes + slot[:, None] * stride_ct + h * stride_ch + e[None, :],
                          mask=ok & (n_p == P), other=0).to(tl.int32)
            k_lo = lo_min[None, :] + (raw & 15).to(tl.float32) * lo_step[None, :]
            k_hi = hi_min[None, :] + (raw >> 4).to(tl.float32) * hi_step[None, :]
            # a partial last page has no codes yet: its exact keys
            x_off = KCache + slot[:, None] * stride_kt + h * stride_kh + e[None, :]
            x_ok = ok & partial & (t < n_p)[:, None]
            k_lo = tl.where(partial, tl.load(x_off, mask=x_ok, other=0.0).to(tl.float32), k_lo)
            k_hi = tl.where(partial, tl.load(x_off + HALF_D, mask=x_ok, other=0.0).to(tl.float32), k_hi)
            s = tl.dot(q_lo, tl.trans(k_lo.to(Q.dtype.element_ty)))
            s = tl.dot(q_hi, tl.trans(k_hi.to(Q.dtype.element_ty)), acc=s) * sm_scale     # [G_PAD, P]
            s = tl.where((t < n_p)[None, :], s, float("-inf"))
            m = tl.max(s, axis=1)
            est = m + tl.log(tl.sum(tl.exp(s - m[:, None]), axis=1))
            tl.store(e_base + lp, est, mask=g_ok & ok)
