"""Exact attention over every page of a request, for auditing what a sparse decode dropped.

References: :func:`sglang_sparse.prhs.dropped_mass` (the attention mass outside what was read) and
:func:`sglang_sparse.prhs.output_error` (the relative error of the output).

A sparse decode (PrHS's page list, ART's early stop) reads part of a request's KV and reports the natural-log
normaliser ``lse_read`` of what it read (``SparseDecodeWrapper.lse``). The mass it dropped is exactly
``1 - exp(lse_read - lse_all)``, where ``lse_all`` is the normaliser over every token. Two kernels:

* ``_kv_split_kernel``, grid ``(bs, H_kv, num_splits)``: one program scores the pages
  ``[s * pages_per_split, (s + 1) * pages_per_split)`` of request ``b`` for the ``G`` query heads of KV head
  ``h`` (one ``tl.dot`` per ``PPI`` pages) and keeps the base-2 running maximum and sum; with ``WITH_V`` it also
  reads the values and keeps ``acc += p V`` (one more ``tl.dot``), stored per split as the unnormalised output
  ``MidO[b, hq, s, :Dv]`` relative to the split's running maximum;
* ``_audit_merge_kernel``, grid ``(bs, H_q)``: merges the splits and writes ``Dropped[b, hq]``; with ``WITH_V``
  also the exact output over every token ``o_all``, ``OutErr[b, hq] = ||o_read - o_all|| / ||o_all||`` against
  the output the decode returned (``ORead``) and ``ONorm[b, hq] = ||o_all||`` (from which the caller forms the
  relative error of the layer's output over all its query heads).

Without ``WITH_V`` the values are never read (keys only: about half the bytes of a dense decode of the request).
Only requests whose flag ``Audit[b]`` is set are scored (the others cost one load and leave the outputs alone),
so a caller can capture the launches of every layer in one CUDA graph and choose, per request and step, which
requests are audited by writing ``Audit`` outside the graph.
"""

import triton
import triton.language as tl

from flashinfer_ext.kernels.paged_decode import _online_update

_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _kv_split_kernel(Audit, Q, KCache, VCache, PageTable, NumPages, LastLen, MidM, MidL, MidO,
                     stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_pt,
                     stride_mb, stride_mh, stride_ob, stride_oh, stride_os, qk_scale, pages_per_split,
                     G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, P: tl.constexpr, PPI: tl.constexpr,
                     WITH_V: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    if tl.load(Audit + b) == 0:
        return
    b64 = b.to(tl.int64)
    npg = tl.load(NumPages + b)
    last_len = tl.load(LastLen + b)
    start = s * pages_per_split
    end = tl.minimum(start + pages_per_split, npg)

    g = tl.arange(0, G_PAD)
    g_ok = g < G
    hq = h * G + g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    q = tl.load(Q + b64 * stride_qb + hq[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(KCache.dtype.element_ty)
    pt_base = PageTable + b64 * stride_pt
    ROWS: tl.constexpr = PPI * P
    r = tl.arange(0, P)

    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_DV], tl.float32)
    for jpos in range(start, end, PPI):
        j = jpos + tl.arange(0, PPI)
        j_ok = j < end
        phys = tl.load(pt_base + j, mask=j_ok, other=0).to(tl.int64)
        plen = tl.where(j == npg - 1, last_len, P)
        slot = tl.reshape(phys[:, None] * P + r[None, :], [ROWS])
        row_ok = tl.reshape(j_ok[:, None] & (r[None, :] < plen[:, None]), [ROWS])
        k = tl.load(KCache + slot[:, None] * stride_ks + h * stride_kh + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if WITH_V:      # the decode kernel's online-softmax step
            v = tl.load(VCache + slot[:, None] * stride_vs + h * stride_vh + offs_dv[None, :],
                        mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
            m, l, acc = _online_update(q, k, v, row_ok, m, l, acc, qk_scale)
        else:           # the same step for the normaliser alone
            qk = tl.dot(q, tl.trans(k)) * qk_scale              # [G_PAD, ROWS], base-2 logits
            qk = tl.where(row_ok[None, :], qk, float("-inf"))
            m_new = tl.maximum(m, tl.max(qk, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp2(m - m_ref) + tl.sum(tl.exp2(qk - m_ref[:, None]), axis=1)
            m = m_new
    out = b64 * stride_mb + hq * stride_mh + s
    tl.store(MidM + out, m, mask=g_ok)
    tl.store(MidL + out, l, mask=g_ok)
    if WITH_V:
        tl.store(MidO + b64 * stride_ob + hq[:, None] * stride_oh + s * stride_os + offs_dv[None, :], acc,
                 mask=g_ok[:, None] & dv_ok[None, :])


@triton.jit
def _audit_merge_kernel(Audit, MidM, MidL, MidO, LseRead, ORead, Dropped, OutErr, ONorm,
                        stride_mb, stride_mh, stride_ob, stride_oh, stride_os, stride_lb, stride_rb, stride_rh,
                        stride_db, num_splits, DV: tl.constexpr, BLOCK_DV: tl.constexpr, S_PAD: tl.constexpr,
                        WITH_V: tl.constexpr):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    b64 = b.to(tl.int64)
    if tl.load(Audit + b) == 0:
        return
    sp = tl.arange(0, S_PAD)
    sp_ok = sp < num_splits
    m = tl.load(MidM + b64 * stride_mb + hq * stride_mh + sp, mask=sp_ok, other=float("-inf"))
    l = tl.load(MidL + b64 * stride_mb + hq * stride_mh + sp, mask=sp_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_ref)                                      # 0 for empty splits
    total = tl.sum(l * w, axis=0)
    lse_all = (m_ref + tl.log2(total)) * _LN2                   # natural log
    lse_read = tl.load(LseRead + b64 * stride_lb + hq)
    kept = tl.exp(lse_read - lse_all)
    dropped = tl.minimum(tl.maximum(1.0 - kept, 0.0), 1.0)
    tl.store(Dropped + b64 * stride_db + hq, dropped)
    if WITH_V:
        offs_dv = tl.arange(0, BLOCK_DV)
        dv_ok = offs_dv < DV
        o = tl.load(MidO + b64 * stride_ob + hq * stride_oh + sp[:, None] * stride_os + offs_dv[None, :],
                    mask=sp_ok[:, None] & dv_ok[None, :], other=0.0)
        o_all = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
        o_read = tl.load(ORead + b64 * stride_rb + hq * stride_rh + offs_dv, mask=dv_ok, other=0.0).to(tl.float32)
        diff = o_read - o_all
        norm = tl.sqrt(tl.sum(o_all * o_all, axis=0))
        err = tl.sqrt(tl.sum(diff * diff, axis=0)) / tl.maximum(norm, 1e-30)
        tl.store(OutErr + b64 * stride_db + hq, err)
        tl.store(ONorm + b64 * stride_db + hq, norm)
