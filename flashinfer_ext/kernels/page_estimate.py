"""Estimated attention mass of every page per query head, from 4-bit key codes (``--prhs-select estimate``).

Reference: :func:`sglang_sparse.prhs.estimated_page_log_mass` on the keys
:func:`sglang_sparse.prhs.dequantise_page_keys` gives back from the codes.

For request b, KV head h and page p (physical page ``phys``) a key's code ``c`` stands for
``k~ = kmin + c * step``, ``step = (kmax - kmin) / 15`` (the page's summaries as stored, fp32). The kernel never
rebuilds the keys: by linearity ``q . k~ = q . kmin + (q * step) . c``, so per query head it scales the query by
the page's steps once and multiplies the codes themselves, in fp32 on the CUDA cores, reduced along the channels
inside each thread (no tensor-core tile, whose operand layout would have to be staged through shared memory for
every page)::

    Est[b, h * G + g, p] = log sum_{t in p} exp(sm_scale * (q[g] . kmin_p + (q[g] * step_p) . c_t))

A partial last page (``LastLen[b] < P``) has no codes yet (a page is quantised when it fills): the program holding
it scores its exact keys from the K buffer instead. Codes: ``[num_slots, H_kv, D / 2]`` uint8, channel ``d < D / 2``
in the low nibble of byte d, channel ``d + D / 2`` in the high nibble (:mod:`flashinfer_ext.kernels.page_summary`).

Grid ``(bs, H_kv, cdiv(max_pages, PAGES))``: a program scores ``PAGES`` consecutive pages of one (request, KV head)
(pages past the request's count are masked); programs past the count exit, and so do requests whose reselection
flag ``Flag[b]`` is 0. Reads D / 2 bytes per key and KV head, 1/8 of the bf16 K+V bytes a dense step reads, plus
the summaries.
"""

import triton
import triton.language as tl

from flashinfer_ext.kernels.page_summary import page_levels


@triton.jit
def _page_estimate_kernel(Flag, Q, KMin, KMax, Codes, KCache, PageTable, NumPages, LastLen, Est,
                          stride_qb, stride_qh, stride_sp, stride_sh, stride_ct, stride_ch, stride_kt, stride_kh,
                          stride_pt, stride_eb, stride_eh, sm_scale,
                          G: tl.constexpr, HALF_D: tl.constexpr, P: tl.constexpr, PAGES: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    first = tl.program_id(2) * PAGES
    npg = tl.load(NumPages + b)
    if (first < npg) & (tl.load(Flag + b) != 0):
        last_len = tl.load(LastLen + b)
        e = tl.arange(0, HALF_D)
        t = tl.arange(0, P)
        lp = first + tl.arange(0, PAGES)
        ok = lp < npg
        coded = ok & ((lp < npg - 1) | (last_len == P))               # full pages: they have codes
        phys = tl.load(PageTable + b.to(tl.int64) * stride_pt + lp, mask=ok, other=0).to(tl.int64)
        lo_min, lo_step, hi_min, hi_step = page_levels(KMin, KMax, phys[:, None] * stride_sp + h * stride_sh
                                                       + e[None, :], HALF_D, ok[:, None])        # [PAGES, HALF_D]
        slot = phys[:, None] * P + t[None, :]                                                   # [PAGES, P]
        raw = tl.load(Codes + slot[:, :, None] * stride_ct + h * stride_ch + e[None, None, :],
                      mask=coded[:, None, None], other=0).to(tl.int32)                          # [PAGES, P, HALF_D]
        c_lo = (raw & 15).to(tl.float32)
        c_hi = (raw >> 4).to(tl.float32)
        q_base = Q + b.to(tl.int64) * stride_qb + h * G * stride_qh
        e_base = Est + b.to(tl.int64) * stride_eb + h * G * stride_eh
        for g in tl.static_range(G):
            q_lo = tl.load(q_base + g * stride_qh + e).to(tl.float32) * sm_scale
            q_hi = tl.load(q_base + g * stride_qh + HALF_D + e).to(tl.float32) * sm_scale
            base = tl.sum(q_lo[None, :] * lo_min + q_hi[None, :] * hi_min, axis=1)              # [PAGES]
            w_lo = q_lo[None, :] * lo_step
            w_hi = q_hi[None, :] * hi_step
            s = tl.sum(c_lo * w_lo[:, None, :] + c_hi * w_hi[:, None, :], axis=2) + base[:, None]  # [PAGES, P]
            m = tl.max(s, axis=1)
            est = m + tl.log(tl.sum(tl.exp(s - m[:, None]), axis=1))
            tl.store(e_base + g * stride_eh + lp, est, mask=coded)
        # the partial last page, if this program holds it: its exact keys
        if (last_len < P) & (npg - 1 >= first) & (npg - 1 < first + PAGES):
            lp1 = npg - 1
            phys1 = tl.load(PageTable + b.to(tl.int64) * stride_pt + lp1).to(tl.int64)
            d = tl.arange(0, 2 * HALF_D)
            t_ok = t < last_len
            k = tl.load(KCache + (phys1 * P + t)[:, None] * stride_kt + h * stride_kh + d[None, :],
                        mask=t_ok[:, None], other=0.0).to(tl.float32)                           # [P, D]
            for g in tl.static_range(G):
                qx = tl.load(q_base + g * stride_qh + d).to(tl.float32) * sm_scale
                sx = tl.where(t_ok, tl.sum(k * qx[None, :], axis=1), float("-inf"))
                mx = tl.max(sx, axis=0)
                tl.store(e_base + g * stride_eh + lp1, mx + tl.log(tl.sum(tl.exp(sx - mx), axis=0)))
