"""Split-KV paged decode attention over a per-(request, KV head) page list, with ART termination.

References: :func:`sglang_sparse.prhs.sparse_attention` (the output over the selected pages),
:func:`sglang_sparse.prhs.dense_attention` (all pages), :func:`sglang_sparse.art.art_attention`
(ART: ``out``, ``blocks_read``, ``stop_reason``, ``lse``, ``delta_hat``; one ART block = one page).

Layout (SGLang's MHA pool): ``K [num_slots, H_kv, D]``, ``V [num_slots, H_kv, Dv]``; physical page
``pp`` holds slots ``[pp*P, pp*P + P)``, i.e. for one KV head a ``[P, D]`` tile whose rows are
``H_kv*D`` elements apart. ``PageTable[b, lp]`` is the physical page of logical page ``lp``.

Stage 1, ``_decode_split_kernel``, grid ``(bs, H_kv, num_splits)``: one program reads a range of
list positions for one (request, KV head) and all ``G`` query heads of its group (padded to 16
rows for ``tl.dot``), so every K/V byte is read once per step. The list is ``ListPhys[b, h, :]``
(``SPARSE``: the selector's or the reuse kernel's list, read as physical ids ``ListPhys``) or the identity ``0..N-1`` (dense). Each iteration gathers ``PPI`` pages (``PPI*P`` rows),
computes the logits with one ``tl.dot``, updates the online softmax (base 2) and ``acc += p V`` with
a second ``tl.dot``. A split ends by storing ``acc / l`` and ``lse = m + log2 l`` to the split buffers.

ART (``ART=True``). A sequential test cannot be split, so the list is cut into a *head* and a
*tail*, read at the same time by the programs of one launch:

* the head, positions ``[0, H)``, is read by split 0 alone, one page per iteration, in order, running
  exactly the reference's test after every page: the running output ``o_j = acc/l`` of every head of
  the group is compared with ``o_{j-1}`` (``||o_j - o_{j-1}|| / ||o_j|| < tau_mag`` and
  ``1 - cos < tau_dir`` for all query heads of the group, ``patience`` consecutive times), and in
  certified mode the unread-mass bound ``U_rest / (Z_seen + U_rest) <= eps_cert`` with ``U_rest`` from
  the selector's suffix sums (``ListRest``). A group stops as a whole (termination is per KV head, as
  the reference); once stopped, the head's remaining pages leave the output unchanged, and it raises
  the group's flag ``ArtFlag[b, h]``. (Every head page is loaded, so that the loads can run ahead of the
  sequential test; the head is short.)
* the tail, ``[H, L)``, is split over programs ``s >= 1`` (``PPI`` pages per iteration), which run
  alongside the head and read the flag before every ``TAIL_SUB`` iterations (an atomic read, whose value
  every warp of the program shares): after a stop they issue no more loads and the merge ignores their
  partial results. Without a stop they read their whole range, so the latency of the head's sequential
  test is hidden behind the tail instead of added to it.

So the kernel equals the reference whenever the reference stops within the first H pages (or never
stops); when the reference would stop later, the kernel reads the whole list (no stop). The pages a
group's programs actually loaded (head and tails, counted by atomics into ``ArtLoaded``) are what an
early stop saves on HBM traffic; the merge publishes them (``PagesLoaded``) and resets the group's
counter and flag for the next step. The per-(request, query head) statistics (``BlocksRead`` = pages
in the output, ``StopReason``, ``ArtDhat``) are written by the head program.

Stage 2, ``_merge_splits_kernel``, grid ``(bs, H_q)``: merges the splits by their LSE (only split 0
for a group ART stopped; it runs after stage 1 has finished, so the reset of the flags is safe),
writes ``out`` in the output dtype and the natural-log ``lse`` (used for PrHS's post-hoc certificate,
:func:`sglang_sparse.prhs.posthoc_delta_hat`).
"""

import triton
import triton.language as tl

_LN2 = 0.6931471805599453


@triton.jit
def _load_page_rows(KCache, VCache, list_base, jpos, end, npg, last_len, last_phys, h,
                    stride_ks, stride_kh, stride_vs, stride_vh, offs_d, offs_dv, d_ok, dv_ok,
                    P: tl.constexpr, PPI: tl.constexpr, SPARSE: tl.constexpr, active):
    """K [PPI*P, BLOCK_D], V [PPI*P, BLOCK_DV] of list positions jpos..jpos+PPI-1 and the row mask.

    ``list_base`` points at the physical page ids of the list: ``ListPhys[b, h]`` (sparse) or the
    request's page-table row (dense, where list position = logical page)."""
    j = jpos + tl.arange(0, PPI)
    j_ok = (j < end) & active
    phys = tl.load(list_base + j, mask=j_ok, other=0)
    if SPARSE:
        j_ok = j_ok & (phys >= 0)
        plen = tl.where(phys == last_phys, last_len, P)
    else:
        plen = tl.where(j == npg - 1, last_len, P)
    phys = phys.to(tl.int64)
    ROWS: tl.constexpr = PPI * P
    r = tl.arange(0, P)
    slot = tl.reshape(phys[:, None] * P + r[None, :], [ROWS])
    row_ok = tl.reshape(j_ok[:, None] & (r[None, :] < plen[:, None]), [ROWS])
    k = tl.load(KCache + slot[:, None] * stride_ks + h * stride_kh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(VCache + slot[:, None] * stride_vs + h * stride_vh + offs_dv[None, :],
                mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    return k, v, row_ok


@triton.jit
def _online_update(q, k, v, row_ok, m, l, acc, qk_scale):
    qk = tl.dot(q, tl.trans(k)) * qk_scale                       # [G_PAD, ROWS], base-2 logits
    qk = tl.where(row_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m, tl.max(qk, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_ref)
    p = tl.exp2(qk - m_ref[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc


@triton.jit
def _decode_split_kernel(Q, KCache, VCache, PageTable, NumPages, LastLen, ListPhys, ListNum, ListRest,
                         MidO, MidLse, BlocksRead, StopReason, ArtDhat, ArtFlag, ArtLoaded,
                         stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_pt,
                         stride_sel_b, stride_sel_h, stride_mo_b, stride_mo_h, stride_mo_s,
                         stride_ml_b, stride_ml_h, H_Q,
                         qk_scale, num_splits, head_len, tau_mag, tau_dir, patience, eps_cert, min_blocks,
                         G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, P: tl.constexpr, PPI: tl.constexpr,
                         SPARSE: tl.constexpr, ART: tl.constexpr, CERT: tl.constexpr,
                         HAS_REST: tl.constexpr, NUM_STAGES: tl.constexpr, TAIL_SUB: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    b64 = b.to(tl.int64)
    npg = tl.load(NumPages + b)
    last_len = tl.load(LastLen + b)
    if SPARSE:
        n_list = tl.load(ListNum + b * (H_Q // G) + h)
    else:
        n_list = npg
    pt_base = PageTable + b64 * stride_pt
    if SPARSE:
        list_base = ListPhys + b64 * stride_sel_b + h * stride_sel_h
    else:
        list_base = pt_base
    last_phys = tl.load(pt_base + tl.maximum(npg - 1, 0))

    g = tl.arange(0, G_PAD)
    g_ok = g < G
    hq = h * G + g
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    q = tl.load(Q + b64 * stride_qb + hq[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(KCache.dtype.element_ty)

    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_DV], tl.float32)

    if ART:
        flag_ptr = ArtFlag + b64 * (H_Q // G) + h
        if s > 0:
            # tail split s of [H, L): runs alongside the head and skips its remaining sub-ranges once the
            # head has published a stop; the merge then ignores its result
            head = tl.minimum(head_len, n_list)
            tail_len = n_list - head
            chunk = tl.cdiv(tl.cdiv(tail_len, num_splits - 1), PPI) * PPI
            start = head + (s - 1) * chunk
            end = tl.minimum(start + chunk, n_list)
            loaded = b * 0
            # the flag is read once per sub-range of TAIL_SUB iterations; inside one the loads do not
            # depend on it, so the loop stays software-pipelined. It is read with a scalar atomic: one thread
            # performs it and every warp gets its result through shared memory, so the whole program takes the
            # same side of the branch. With a load per thread, warps that read before and after the head's stop
            # split here; the barriers inside the branch then paired with barriers elsewhere, and warps took
            # page ids from shared memory that another warp's copies never filled (illegal K/V addresses).
            for c in range(start, end, PPI * TAIL_SUB):
                if tl.atomic_add(flag_ptr, 0, sem="relaxed") == 0:
                    c_end = tl.minimum(c + PPI * TAIL_SUB, end)
                    for jpos in tl.range(c, c_end, PPI, num_stages=NUM_STAGES):
                        k, v, row_ok = _load_page_rows(KCache, VCache, list_base, jpos, c_end, npg, last_len,
                                                       last_phys, h, stride_ks, stride_kh, stride_vs, stride_vh,
                                                       offs_d, offs_dv, d_ok, dv_ok, P, PPI, SPARSE, jpos >= 0)
                        m, l, acc = _online_update(q, k, v, row_ok, m, l, acc, qk_scale)
                    loaded += c_end - c
            tl.atomic_add(ArtLoaded + b64 * (H_Q // G) + h, loaded)
        else:
            # the head reads [0, H); with no tail program it reads the whole list, which can be longer than the
            # planned length (a reused list widened by dilation)
            end = tl.where(num_splits > 1, tl.minimum(head_len, n_list), n_list)
            o_prev = tl.zeros([G_PAD, BLOCK_DV], tl.float32)
            streak = b * 0
            read = b * 0
            reason = b * 0
            stopped = b < 0
            dhat = tl.zeros([G_PAD], tl.float32)
            rest_base = ListRest + b64 * stride_sel_b + h * stride_sel_h
            for jpos in tl.range(0, end, 1, num_stages=NUM_STAGES):
                live = ~stopped
                # every head page is loaded (a load masked by the stop decision of the previous
                # iteration could not be issued ahead); pages after a stop are not used
                k, v, row_ok = _load_page_rows(KCache, VCache, list_base, jpos, end, npg, last_len,
                                               last_phys, h, stride_ks, stride_kh, stride_vs, stride_vh,
                                               offs_d, offs_dv, d_ok, dv_ok, P, 1, SPARSE, jpos >= 0)
                m2, l2, acc2 = _online_update(q, k, v, row_ok, m, l, acc, qk_scale)
                m = tl.where(live, m2, m)
                l = tl.where(live, l2, l)
                acc = tl.where(live, acc2, acc)
                # stability test of the running output against the previous one
                o = acc / tl.where(l > 0, l, 1.0)[:, None]
                diff = tl.sqrt(tl.sum((o - o_prev) * (o - o_prev), axis=1))
                n_o = tl.sqrt(tl.sum(o * o, axis=1))
                n_p = tl.sqrt(tl.sum(o_prev * o_prev, axis=1))
                dmag = diff / tl.maximum(n_o, 1e-30)
                ddir = 1.0 - tl.sum(o * o_prev, axis=1) / tl.maximum(n_o * n_p, 1e-30)
                ok = (dmag < tau_mag) & (ddir < tau_dir)
                holds = tl.min((ok | (~g_ok)).to(tl.int32), axis=0) > 0
                streak = tl.where(live & (read > 0), tl.where(holds, streak + 1, 0), streak)
                o_prev = tl.where(live, o, o_prev)
                read = tl.where(live, read + 1, read)
                if HAS_REST:
                    log_u = tl.load(rest_base + jpos + 1, mask=live & (jpos + 1 < n_list), other=float("-inf"))
                    log_z = (m + tl.log2(tl.where(l > 0, l, 1.0))) * 0.6931471805599453
                    dh = 1.0 / (1.0 + tl.exp(log_z - log_u))
                    dh = tl.where(log_u == float("-inf"), 0.0, dh)
                    dhat = tl.where(live, dh, dhat)
                can_stop = live & (read >= min_blocks) & (read < n_list)
                if CERT:
                    # every head of the group certified (NaN, e.g. a reused list, never is)
                    cert = tl.max((g_ok & (~(dhat <= eps_cert))).to(tl.int32), axis=0) == 0
                    stop_c = can_stop & cert
                    reason = tl.where(stop_c, 2, reason)
                    stopped = stopped | stop_c
                stop_m = can_stop & (~stopped) & (streak >= patience)
                reason = tl.where(stop_m, 1, reason)
                stopped = stopped | stop_m
                tl.atomic_xchg(flag_ptr, 1, mask=stopped & live, sem="relaxed")    # the tails stop loading
            tl.atomic_add(ArtLoaded + b64 * (H_Q // G) + h, end)
            if stopped == 0:
                read = n_list
                dhat = tl.zeros([G_PAD], tl.float32)
            st_ptr = b64 * H_Q + hq
            tl.store(BlocksRead + st_ptr, tl.zeros([G_PAD], tl.int32) + read, mask=g_ok)
            tl.store(StopReason + st_ptr, tl.zeros([G_PAD], tl.int32) + reason, mask=g_ok)
            if HAS_REST:
                tl.store(ArtDhat + st_ptr, dhat, mask=g_ok)
            else:
                tl.store(ArtDhat + st_ptr, tl.where(stopped, float("nan"), 0.0) + tl.zeros([G_PAD], tl.float32),
                         mask=g_ok)
    else:
        chunk = tl.cdiv(tl.cdiv(n_list, num_splits), PPI) * PPI
        start = s * chunk
        end = tl.minimum(start + chunk, n_list)
        for jpos in tl.range(start, end, PPI, num_stages=NUM_STAGES):
            k, v, row_ok = _load_page_rows(KCache, VCache, list_base, jpos, end, npg, last_len, last_phys, h,
                                           stride_ks, stride_kh, stride_vs, stride_vh, offs_d, offs_dv, d_ok, dv_ok,
                                           P, PPI, SPARSE, jpos >= 0)
            m, l, acc = _online_update(q, k, v, row_ok, m, l, acc, qk_scale)
        if s == 0:
            st_ptr = b64 * H_Q + hq
            tl.store(BlocksRead + st_ptr, tl.zeros([G_PAD], tl.int32) + n_list, mask=g_ok)
            tl.store(StopReason + st_ptr, tl.zeros([G_PAD], tl.int32), mask=g_ok)
            tl.store(ArtDhat + st_ptr, tl.zeros([G_PAD], tl.float32), mask=g_ok)

    o_out = acc / tl.where(l > 0, l, 1.0)[:, None]
    lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
    mo = MidO + b64 * stride_mo_b + hq[:, None] * stride_mo_h + s * stride_mo_s + offs_dv[None, :]
    tl.store(mo, o_out, mask=g_ok[:, None] & dv_ok[None, :])
    tl.store(MidLse + b64 * stride_ml_b + hq * stride_ml_h + s, lse, mask=g_ok)


@triton.jit
def _merge_splits_kernel(MidO, MidLse, StopReason, ArtFlag, ArtLoaded, PagesLoaded, Out, LseOut, num_splits,
                         stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h,
                         stride_ob, stride_oh, H_Q, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                         S_PAD: tl.constexpr, ART: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    b64 = b.to(tl.int64)
    n_use = num_splits
    if ART:
        reason = tl.load(StopReason + b64 * H_Q + hq)
        n_use = tl.where(reason != 0, 1, num_splits)
        if hq % G == 0:
            # the group's first head: pages its programs loaded this step (for every head of the group),
            # then the group's counters and stop flag are reset for the next step
            grp = b64 * (H_Q // G) + hq // G
            gg = tl.arange(0, G_PAD)
            tl.store(PagesLoaded + b64 * H_Q + hq + gg, tl.zeros([G_PAD], tl.int32) + tl.load(ArtLoaded + grp),
                     mask=gg < G)
            tl.store(ArtLoaded + grp, 0)
            tl.store(ArtFlag + grp, 0)
    offs_s = tl.arange(0, S_PAD)
    s_ok = offs_s < n_use
    lse = tl.load(MidLse + b64 * stride_ml_b + hq * stride_ml_h + offs_s, mask=s_ok, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    mx_ref = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.where(s_ok, tl.exp2(lse - mx_ref), 0.0)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    o = tl.load(MidO + b64 * stride_mo_b + hq * stride_mo_h + offs_s[:, None] * stride_mo_s + offs_dv[None, :],
                mask=(s_ok & (w > 0))[:, None] & dv_ok[None, :], other=0.0)
    tot = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(tot > 0, tot, 1.0)
    tl.store(Out + b64 * stride_ob + hq * stride_oh + offs_dv, out.to(Out.dtype.element_ty), mask=dv_ok)
    lse_nat = tl.where(tot > 0, (mx_ref + tl.log2(tl.where(tot > 0, tot, 1.0))) * 0.6931471805599453,
                       float("-inf"))
    tl.store(LseOut + b64 * H_Q + hq, lse_nat)
