"""Certified pre-hoc page selection per (request, KV head), fixed-size output, no host sync.

Reference: :func:`sglang_sparse.prhs.select_pages` (selection order, ``num_selected`` and the
pre-hoc ``delta_hat``), fed with :func:`sglang_sparse.prhs.page_bounds` and
:func:`sglang_sparse.prhs.page_lengths`.

One program per (request b, KV head h) holds the bounds of all the request's pages in registers
(tile ``BLOCK_PG = next_pow2(max pages)``):

1. Forced pages F: sinks ``[0, min(sink, N))`` then recents ``[max(N - recent, sinks), N)``; the first
   ``budget`` of them are taken.
2. Candidates C (the other pages) are ranked by descending ub, ties to the lower page id; the
   reference appends them one by one while ``delta_hat = U / (Z_lb + U) > delta`` and the budget
   allows, i.e. it takes the shortest prefix of the top ``k_max = budget - |F|`` candidates whose
   certificate is <= delta. The kernel finds the top k_max without sorting all pages: a radix select
   over the (order-preserving int32 image of the) ub values finds the k_max-th largest, T (four
   8-bit passes, one 256-bin histogram each); ties at T are taken by page id with a prefix sum.
3. Those k_max candidates are compacted (prefix sum + scatter into a scratch row) and sorted by
   (ub desc, id asc) with ``tl.sort`` on packed int64 keys of width ``SORT_PAD = next_pow2(LIST_MAX)``,
   ``LIST_MAX`` being the plan's largest budget (not the buffer width), so a 1/16 budget sorts 1/16
   of the pages. Suffix / prefix sums along the sorted order give the certificate of every prefix at
   once; the first prefix with ``delta_hat <= delta`` is the selection.

``U = sum_{p dropped} n_p exp(ub_p)`` is kept in log space: the pages dropped outside the sorted top are
summed shifted by their own largest bound, and the suffixes of the sorted top come from a scan of (running
max, rescaled sum) pairs (:func:`_lse_scan_rev`), combined with a logaddexp. So a dropped page counts however
far its bound sits below the top page (a sum shifted by the largest bound of all pages drops every term
more than ~104 nats below it, and the certificate would read 0 with all the mass dropped).
``Z_lb = sum_{p selected} n_p exp(lb_p)`` is an fp32 sum shifted by the largest ``log n_p + lb_p`` of all
pages, m: it can lose a term only when the page holding m is dropped, and then ``U >= e^m`` (ub >= lb), so
the certificate is 1 to fp32 precision either way. The two are compared in log space.
``delta == 0`` selects all the budget allows, as the reference; so does a request flagged ``DenseReq[b]``
(a context below ``--prhs-min-context-len``, whose budget is every page): it reads every page in the
selector's order and its delta_hat is 0.

The kernel works only on requests whose device flag ``Flag[b]`` is set (a reselection step), so that a
CUDA graph can hold both this kernel and the reuse kernel (:mod:`flashinfer_ext.kernels.page_dilate`) and
each step's action is chosen per request, out of the graph, by writing the flags.

Budget scale (``HAS_SHIFT``, the dropped-mass audit's feedback): the request's budget becomes
``min(N, LIST_MAX, Budget[b] << Shift[req * stride_shift])`` (``req`` = its ``req_to_token`` row), never below
``Budget[b]``; ``LIST_MAX`` must then be the plan's largest scaled budget.

Outputs, per (b, h), written for positions ``[0, LIST_MAX)`` (entries past the plan's largest budget
are left alone): ``SelPages`` int32 logical page ids in selection order (sinks,
recents, descending ub), -1 padded, and ``SelPhys`` the same list as physical page ids (so the
decode loop has a single indirection); ``NumSel`` (kept for reuse) and ``CurNum`` (read by the
decode); ``SelDhat`` and ``LeadDhat`` fp32 the pre-hoc certificate (the list's, and the selecting layer's
record of it, which the layers sharing the list leave alone); with ``WRITE_STATE``, the list is also kept
in ``StatePages[req, h]`` (``req`` = the request's
``req_to_token`` row, so it survives batch reordering), with ``StateNum`` and the page count at
selection time ``StateNpg[req]``, for the reuse kernel; int32; and, with
``WRITE_REST``, ``SelRest`` fp32 ``rest[j] = log sum_{i >= j} n_{p_i} exp(ub_{p_i})`` over the
list (the unread-mass bound ART's certified test needs, :func:`sglang_sparse.art.art_attention`).

Estimate mode (``EST_G = G > 0``, ``--prhs-select estimate``): the scores are not bounds but the estimated page
log-masses ``Est [bs, H_q, >= npg]`` of :mod:`flashinfer_ext.kernels.page_estimate`. The program normalises each of
its G query heads' rows over the request's pages, takes the group's largest normalised mass ``M_p`` per page and
writes ``ub = lb = log(M_p / n_p)`` into its UB/LB rows, then selects as above with one change: the prefix stops once
the estimated dropped mass ``U = sum_{p dropped} M_p <= delta`` (``log_ratio = log delta``), and ``SelDhat`` reports
that U (capped at 1): an estimate (:func:`sglang_sparse.prhs.select_pages_estimated`), with no certificate.
When every page is allowed (the default budget), delta > 0 and ART is off (nothing reads the list in order), a
request skips the radix select and the sort: :func:`_select_threshold` finds the same pages with a threshold search
over the scores and lists the kept candidates in ascending id.
"""

import triton
import triton.language as tl



@triton.jit
def _orderable(x):
    """fp32 -> int32 whose signed order equals the float order (finite values and +-inf)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _lse_combine(m1, s1, m2, s2):
    """(max, sum) pairs standing for ``s * e^m``: their sum, rescaled to the larger max (``-inf`` = empty)."""
    m = tl.maximum(m1, m2)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    return m, s1 * tl.exp(m1 - m_ref) + s2 * tl.exp(m2 - m_ref)


@triton.jit
def _lse_scan_rev(w):
    """``out[j] = log sum_{i >= j} exp(w[i])`` along a 1-D block (``-inf`` entries are empty), without a common
    shift: no term underflows against a larger one elsewhere in the block."""
    one = tl.where(w == float("-inf"), 0.0, 1.0)
    m, t = tl.associative_scan((w, one), 0, _lse_combine, reverse=True)
    return m + tl.log(t)


@triton.jit
def _logaddexp(a, b):
    m = tl.maximum(a, b)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    return m_ref + tl.log(tl.exp(a - m_ref) + tl.exp(b - m_ref))


@triton.jit
def _kth_largest(key, cand, k_max):
    """The k_max-th largest of ``key`` over ``cand`` (``1 <= k_max <= count(cand)``; anything when k_max == 0):
    radix select over the unsigned image of the int32 keys, 8 bits per pass from the top. Each pass
    histograms the digit of the candidates that match the prefix found so far and keeps the largest
    digit whose suffix count still reaches the remaining rank (4 dependent passes)."""
    ukey = key + (1 << 31)                                      # int64 in [0, 2^32), same order
    bins = tl.arange(0, 256)
    prefix = tl.sum(tl.zeros_like(ukey), axis=0)                # int64 0
    k_rem = k_max
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        match = cand & ((ukey >> (shift + 8)) == prefix)
        digit = ((ukey >> shift) & 255).to(tl.int32)
        hist = tl.histogram(digit, 256, mask=match)
        suffix = tl.cumsum(hist, axis=0, reverse=True)          # matching candidates with digit >= d
        d_star = tl.max(tl.where(suffix >= k_rem, bins, 0), axis=0)
        k_rem = k_rem - tl.sum(tl.where(bins > d_star, hist, 0), axis=0)
        prefix = prefix * 256 + d_star
    return prefix - (1 << 31)


@triton.jit
def _page_select_kernel(Flag, UB, LB, NumPages, LastLen, Budget, PageTable, SelPages, SelPhys, NumSel, CurNum,
                        SelDhat, LeadDhat, SelRest, ReqIdx, StatePages, StateNum, StateNpg, Scratch, DenseReq,
                        stride_pt, stride_ub_b, stride_ub_h, stride_sel_b, stride_sel_h, stride_sc_b, stride_sc_h,
                        stride_st_r, stride_st_h, state_width, sink_pages, recent_pages, log_ratio, LIST_MAX,
                        Shift, stride_shift, Est, stride_eb, stride_eh, delta,
                        P: tl.constexpr, BLOCK_PG: tl.constexpr, SORT_PAD: tl.constexpr,
                        DELTA_ZERO: tl.constexpr, WRITE_REST: tl.constexpr, WRITE_STATE: tl.constexpr,
                        HAS_SHIFT: tl.constexpr, EST_G: tl.constexpr):
    """Runs only for requests with ``Flag[b] != 0`` (a reselection step; kernels.page_dilate does the others).
    Estimate mode without ART and with delta > 0 takes the threshold search (:func:`_select_threshold`) for a request
    whose budget allows every page; everything else the sorted selection (:func:`_select_one`)."""
    b = tl.program_id(0)
    if tl.load(Flag + b) != 0:
        budget = _budget_of(b, Budget, NumPages, ReqIdx, Shift, stride_shift, LIST_MAX, HAS_SHIFT)
        threshold = False
        if EST_G > 0:
            if not WRITE_REST:
                if not DELTA_ZERO:
                    threshold = budget >= tl.load(NumPages + b)
        if threshold:
            _select_threshold(b, tl.program_id(1), tl.num_programs(1), NumPages, LastLen, PageTable, SelPages,
                              SelPhys, NumSel, CurNum, SelDhat, LeadDhat, ReqIdx, StatePages, StateNum, StateNpg,
                              DenseReq, stride_pt, stride_sel_b, stride_sel_h, stride_st_r, stride_st_h, state_width,
                              sink_pages, recent_pages, LIST_MAX, Est, stride_eb, stride_eh, delta,
                              P, BLOCK_PG, WRITE_STATE, EST_G)
        else:
            _select_one(b, tl.program_id(1), tl.num_programs(1), budget,
                        UB, LB, NumPages, LastLen, PageTable, SelPages, SelPhys, NumSel, CurNum,
                        SelDhat, LeadDhat, SelRest, ReqIdx, StatePages, StateNum, StateNpg, Scratch, DenseReq,
                        stride_pt, stride_ub_b, stride_ub_h, stride_sel_b, stride_sel_h, stride_sc_b, stride_sc_h,
                        stride_st_r, stride_st_h,
                        state_width, sink_pages, recent_pages, log_ratio, LIST_MAX,
                        Est, stride_eb, stride_eh,
                        P, BLOCK_PG, SORT_PAD, DELTA_ZERO, WRITE_REST, WRITE_STATE, EST_G)


@triton.jit
def _budget_of(b, Budget, NumPages, ReqIdx, Shift, stride_shift, LIST_MAX, HAS_SHIFT: tl.constexpr):
    """Request b's page budget; with ``HAS_SHIFT`` scaled by its audit feedback: ``budget << shift``, at most every
    page and the list width, never below the unscaled budget."""
    budget = tl.load(Budget + b)
    if HAS_SHIFT:
        npg = tl.load(NumPages + b)
        shift = tl.load(Shift + tl.load(ReqIdx + b).to(tl.int64) * stride_shift)
        budget = tl.maximum(budget, tl.minimum(tl.minimum(budget << shift, npg), LIST_MAX))
    return budget


@triton.jit
def _group_scores(Est, stride_eb, stride_eh, b, h, idx, valid, log_n, BLOCK_PG: tl.constexpr, EST_G: tl.constexpr):
    """Estimate mode: each of the group's query heads' page log-masses normalised to masses ``m[g, p]`` (summing to
    1); returns ``log(M_p / n_p)``, ``M_p = max_g m[g, p]`` the page's score (-inf past the pages)."""
    m_best = tl.full([BLOCK_PG], float("-inf"), tl.float32)
    for gg in tl.static_range(EST_G):
        row = tl.load(Est + b.to(tl.int64) * stride_eb + (h * EST_G + gg) * stride_eh + idx, mask=valid,
                      other=float("-inf"))
        r_max = tl.max(row, axis=0)
        r_max = tl.where(r_max == float("-inf"), 0.0, r_max)
        lse = r_max + tl.log(tl.sum(tl.exp(row - r_max), axis=0))
        m_best = tl.maximum(m_best, row - lse)
    return tl.where(valid, m_best - log_n, float("-inf"))


@triton.jit
def _record(b, h, n_heads, n_sel, dhat, NumSel, CurNum, SelDhat, LeadDhat, sel_base, npg, ReqIdx, StatePages,
            StateNum, StateNpg, stride_st_r, stride_st_h, state_width, pos, WRITE_STATE: tl.constexpr):
    """The selection's length and delta-hat (the list's, and the selecting layer's record of it); with
    ``WRITE_STATE`` the fresh list (already stored at ``sel_base``) is also kept per (request pool row, KV head) for
    reuse."""
    tl.store(NumSel + b * n_heads + h, n_sel)
    tl.store(CurNum + b * n_heads + h, n_sel)
    tl.store(SelDhat + b * n_heads + h, dhat)
    tl.store(LeadDhat + b * n_heads + h, dhat)
    if WRITE_STATE:
        tl.debug_barrier()
        req = tl.load(ReqIdx + b).to(tl.int64)
        st_ok = (pos < n_sel) & (pos < state_width)
        lst_s = tl.load(sel_base + pos, mask=st_ok, other=-1)
        tl.store(StatePages + req * stride_st_r + h * stride_st_h + pos, lst_s, mask=st_ok)
        tl.store(StateNum + req * n_heads + h, tl.minimum(n_sel, state_width))
        if h == 0:
            tl.store(StateNpg + req, npg)


@triton.jit
def _page_tile(npg, last_len, P: tl.constexpr, BLOCK_PG: tl.constexpr):
    """A request's page tile: the page ids, which are real (``< npg``) and each page's log length (the last page
    holds ``last_len`` tokens)."""
    idx = tl.arange(0, BLOCK_PG)
    valid = idx < npg
    n_p = tl.where(idx == npg - 1, last_len, P).to(tl.float32)
    return idx, valid, tl.log(tl.where(valid, n_p, 1.0))


@triton.jit
def _forced_pages(idx, valid, npg, sink_pages, recent_pages):
    """Sinks ``[0, min(sink, N))`` then recents ``[max(N - recent, sinks), N)``: which pages are forced, each one's
    position in the list's forced prefix, how many there are, and the candidates (the other real pages)."""
    ns = tl.minimum(sink_pages, npg)
    rs = tl.maximum(npg - recent_pages, ns)
    forced = valid & ((idx < ns) | (idx >= rs))
    fpos = tl.where(idx < ns, idx, ns + idx - rs)
    return forced, fpos, ns + (npg - rs), valid & (~forced)


@triton.jit
def _select_threshold(b, h, n_heads, NumPages, LastLen, PageTable, SelPages, SelPhys, NumSel, CurNum, SelDhat,
                      LeadDhat, ReqIdx, StatePages, StateNum, StateNpg, DenseReq, stride_pt, stride_sel_b,
                      stride_sel_h, stride_st_r, stride_st_h, state_width, sink_pages,
                      recent_pages, LIST_MAX, Est, stride_eb, stride_eh, delta,
                      P: tl.constexpr, BLOCK_PG: tl.constexpr, WRITE_STATE: tl.constexpr, EST_G: tl.constexpr):
    """Estimate mode, every page allowed, delta > 0, no ART: the same pages as the sorted selection, found without
    sorting. The candidates dropped are the longest tail of the order (score desc, id asc) whose summed score is
    <= delta: those whose key is below the largest threshold T with ``W(key < T) <= delta`` (``W``: the summed score
    of the candidates below; T found 4 bits at a time from the top, 8 dependent passes, each summing 16 trial
    thresholds at once), plus the candidates tied at T taken from the highest id down while the sum stays <= delta.
    The list holds the forced pages (as the sorted selection writes them), then the kept candidates in ascending
    id; ``SelDhat`` is the estimated dropped mass."""
    npg = tl.load(NumPages + b)
    last_len = tl.load(LastLen + b)
    sel_base = SelPages + b.to(tl.int64) * stride_sel_b + h * stride_sel_h
    phys_base = SelPhys + b.to(tl.int64) * stride_sel_b + h * stride_sel_h
    pt_base = PageTable + b.to(tl.int64) * stride_pt

    idx, valid, log_n = _page_tile(npg, last_len, P, BLOCK_PG)
    ub = _group_scores(Est, stride_eb, stride_eh, b, h, idx, valid, log_n, BLOCK_PG, EST_G)
    mass = tl.where(valid, tl.exp(log_n + ub), 0.0)                 # M_p
    forced, fpos, n_forced, cand = _forced_pages(idx, valid, npg, sink_pages, recent_pages)
    cmass = tl.where(cand, mass, 0.0)

    ukey = _orderable(ub).to(tl.int64) + (1 << 31)                  # [0, 2^32), the order of the scores
    dig = tl.arange(0, 16).to(tl.int64)
    t = tl.sum(tl.zeros_like(ukey), axis=0)                         # int64 0: W(key < 0) = 0 <= delta
    for p in tl.static_range(8):
        trial = t + (dig << (28 - 4 * p))                           # [16]; trial 0 is t itself
        w = tl.sum(tl.where(ukey[:, None] < trial[None, :], cmass[:, None], 0.0), axis=0)
        d_star = tl.max(tl.where(w <= delta, dig, 0), axis=0)       # W grows with the trial: the largest that fits
        t = t + (d_star << (28 - 4 * p))
    below = cand & (ukey < t)
    w_below = tl.sum(tl.where(below, cmass, 0.0), axis=0)
    tie = cand & (ukey == t)
    tie_tail = tl.cumsum(tl.where(tie, cmass, 0.0), axis=0, reverse=True)    # tied mass at this id and above
    dropped = below | (tie & (w_below + tie_tail <= delta))
    dropped = dropped & (tl.load(DenseReq + b) == 0)                # short context: every page
    u = tl.sum(tl.where(dropped, cmass, 0.0), axis=0)

    kept = cand & (~dropped)
    n_sel = n_forced + tl.sum(kept.to(tl.int32), axis=0)
    kpos = n_forced + tl.cumsum(kept.to(tl.int32), axis=0) - 1
    lpos = tl.where(forced, fpos, kpos)
    listed = forced | kept
    tl.store(sel_base + lpos, idx, mask=listed)
    tl.store(phys_base + lpos, tl.load(pt_base + idx, mask=listed, other=-1), mask=listed)
    pad_ok = (idx >= n_sel) & (idx < LIST_MAX)
    tl.store(sel_base + idx, tl.full([BLOCK_PG], -1, tl.int32), mask=pad_ok)
    tl.store(phys_base + idx, tl.full([BLOCK_PG], -1, tl.int32), mask=pad_ok)
    _record(b, h, n_heads, n_sel, tl.minimum(u, 1.0), NumSel, CurNum, SelDhat, LeadDhat, sel_base, npg, ReqIdx,
            StatePages, StateNum, StateNpg, stride_st_r, stride_st_h, state_width, idx, WRITE_STATE)


@triton.jit
def _select_one(b, h, n_heads, budget, UB, LB, NumPages, LastLen, PageTable, SelPages, SelPhys, NumSel, CurNum,
                SelDhat, LeadDhat, SelRest, ReqIdx, StatePages, StateNum, StateNpg, Scratch, DenseReq, stride_pt,
                stride_ub_b, stride_ub_h, stride_sel_b, stride_sel_h, stride_sc_b, stride_sc_h, stride_st_r,
                stride_st_h,
                state_width, sink_pages, recent_pages, log_ratio, LIST_MAX,
                Est, stride_eb, stride_eh,
                P: tl.constexpr, BLOCK_PG: tl.constexpr, SORT_PAD: tl.constexpr,
                DELTA_ZERO: tl.constexpr, WRITE_REST: tl.constexpr, WRITE_STATE: tl.constexpr,
                EST_G: tl.constexpr):
    """Selection of request b, KV head h (of ``n_heads``), at most ``budget`` pages (:func:`_budget_of`)."""
    npg = tl.load(NumPages + b)
    last_len = tl.load(LastLen + b)
    ub_base = UB + b.to(tl.int64) * stride_ub_b + h * stride_ub_h
    lb_base = LB + b.to(tl.int64) * stride_ub_b + h * stride_ub_h
    sel_base = SelPages + b.to(tl.int64) * stride_sel_b + h * stride_sel_h
    sc_base = Scratch + b.to(tl.int64) * stride_sc_b + h * stride_sc_h
    phys_base = SelPhys + b.to(tl.int64) * stride_sel_b + h * stride_sel_h
    pt_base = PageTable + b.to(tl.int64) * stride_pt

    idx, valid, log_n = _page_tile(npg, last_len, P, BLOCK_PG)
    if EST_G > 0:
        # estimate mode: the group's page scores M_p, written as ub = lb = log(M_p / n_p) for the rest
        ub = _group_scores(Est, stride_eb, stride_eh, b, h, idx, valid, log_n, BLOCK_PG, EST_G)
        lb = ub
        tl.store(ub_base + idx, ub, mask=valid)
        tl.store(lb_base + idx, lb, mask=valid)
        tl.debug_barrier()
    else:
        ub = tl.load(ub_base + idx, mask=valid, other=float("-inf"))
        lb = tl.load(lb_base + idx, mask=valid, other=float("-inf"))
    wu = tl.where(valid, log_n + ub, float("-inf"))
    wl = tl.where(valid, log_n + lb, float("-inf"))

    # forced pages: sinks, then recents (ascending); the first `budget` of them are taken
    forced, fpos, n_forced, cand = _forced_pages(idx, valid, npg, sink_pages, recent_pages)
    taken_f = forced & (fpos < budget)
    n_taken_f = tl.minimum(n_forced, budget)
    n_cand = npg - n_forced
    k_max = tl.maximum(tl.minimum(budget - n_forced, n_cand), 0)

    ml = tl.max(wl, axis=0)
    ml = tl.where(ml == float("-inf"), 0.0, ml)
    el = tl.where(valid, tl.exp(wl - ml), 0.0)
    s_forced = tl.sum(tl.where(taken_f, el, 0.0), axis=0)

    key = _orderable(ub).to(tl.int64)
    pos = tl.arange(0, SORT_PAD)

    # 1. the k_max-th largest candidate key T
    t_key = _kth_largest(key, cand, k_max)
    # 2. the top k_max candidates in the reference's order: keys above T, then ties at T by page id
    gt = cand & (key > t_key)
    eq = cand & (key == t_key)
    cnt_gt = tl.sum(gt.to(tl.int32), axis=0)
    eq_rank = tl.cumsum(eq.to(tl.int32), axis=0)
    top = (gt | (eq & (eq_rank <= k_max - cnt_gt))) & (k_max > 0)
    # 3. compact them into the scratch row and sort by (ub desc, id asc). The padding is INT64_MIN, below
    #    every packed key (key >= -2^31, so key << 32 >= -2^63, and the id part is > 0): a page with a
    #    negative bound packs below -2^62 as soon as its bound is <= -2, so a smaller pad would sort
    #    ahead of such pages and hand its id 2^31 - 1 to the list.
    tl.store(sc_base + pos, tl.full([SORT_PAD], -9223372036854775808, tl.int64))
    tl.debug_barrier()
    cpos = tl.cumsum(top.to(tl.int32), axis=0) - 1
    packed = (key << 32) | (2147483647 - idx).to(tl.int64)
    tl.store(sc_base + cpos, packed, mask=top & (cpos < SORT_PAD))
    tl.debug_barrier()
    tops = tl.sort(tl.load(sc_base + pos), descending=True)
    top_ids = (2147483647 - (tops - ((tops >> 32) << 32))).to(tl.int32)
    in_top = pos < k_max
    # 4. the shortest prefix of that order whose certificate is <= delta (else all k_max of it):
    #    log U_j = logaddexp(pages dropped outside the top (forced pages cut by the budget, candidates outside
    #              the top), log-space suffix of the top from position j),
    #    Z_j = forced pages taken + top positions < j                              (prefix sum)
    ub_s = tl.load(ub_base + top_ids, mask=in_top, other=float("-inf"))
    lb_s = tl.load(lb_base + top_ids, mask=in_top, other=float("-inf"))
    log_len_s = tl.log(tl.where(top_ids == npg - 1, last_len, P).to(tl.float32))
    wu_s = tl.where(in_top, log_len_s + ub_s, float("-inf"))
    el_s = tl.where(in_top, tl.exp(log_len_s + lb_s - ml), 0.0)
    w_out = tl.where((forced & (~taken_f)) | (cand & (~top)), wu, float("-inf"))
    m_out = tl.max(w_out, axis=0)
    m_out = tl.where(m_out == float("-inf"), 0.0, m_out)
    log_out = tl.log(tl.sum(tl.exp(w_out - m_out), axis=0)) + m_out          # -inf when nothing is out
    log_u_j = _logaddexp(log_out, _lse_scan_rev(wu_s))
    if DELTA_ZERO:
        k = k_max
    else:
        s_j = s_forced + tl.cumsum(el_s, axis=0) - el_s
        if EST_G > 0:
            # estimate mode: the estimated dropped mass U itself against delta (log_ratio = log delta)
            ok = ((log_u_j == float("-inf")) | (log_u_j <= log_ratio)) & in_top
        else:
            lhs = log_u_j - tl.log(s_j) - ml
            ok = ((log_u_j == float("-inf")) | ((s_j > 0.0) & (lhs <= log_ratio))) & in_top
        k = tl.min(tl.where(ok, pos, k_max), axis=0)
        k = tl.where(tl.load(DenseReq + b) != 0, k_max, k)   # short context: its budget is every page
    n_sel = n_taken_f + k

    # pre-hoc certificate of the final selection (log U_k: position k of the same suffix, -inf past the top)
    log_u = tl.max(tl.where(pos == k, log_u_j, float("-inf")), axis=0)
    log_u = tl.where(k >= SORT_PAD, log_out, log_u)
    s_fin = s_forced + tl.sum(tl.where(pos < k, el_s, 0.0), axis=0)
    log_z = tl.log(s_fin) + ml
    dhat = 1.0 / (1.0 + tl.exp(log_z - log_u))
    dhat = tl.where(log_u == float("-inf"), 0.0, tl.where(s_fin <= 0.0, 1.0, dhat))
    if EST_G > 0:
        dhat = tl.minimum(tl.exp(log_u), 1.0)       # the estimated dropped mass, not a bound

    # the list: forced pages, the first k of the sorted top, -1 after
    tl.store(sel_base + fpos, idx, mask=taken_f)
    tl.store(phys_base + fpos, tl.load(pt_base + idx, mask=taken_f, other=-1), mask=taken_f)
    pad_ok = (n_sel + pos) < LIST_MAX
    tl.store(sel_base + n_sel + pos, tl.full([SORT_PAD], -1, tl.int32), mask=pad_ok)
    tl.store(phys_base + n_sel + pos, tl.full([SORT_PAD], -1, tl.int32), mask=pad_ok)
    top_ok = (pos < k) & ((n_taken_f + pos) < LIST_MAX)
    tl.store(sel_base + n_taken_f + pos, top_ids, mask=top_ok)
    tl.store(phys_base + n_taken_f + pos, tl.load(pt_base + top_ids, mask=top_ok, other=-1), mask=top_ok)
    _record(b, h, n_heads, n_sel, dhat, NumSel, CurNum, SelDhat, LeadDhat, sel_base, npg, ReqIdx,
            StatePages, StateNum, StateNpg, stride_st_r, stride_st_h, state_width, pos, WRITE_STATE)

    if WRITE_REST:
        tl.debug_barrier()
        lst_ok = pos < n_sel
        lst = tl.load(sel_base + pos, mask=lst_ok, other=0)
        ub_l = tl.load(ub_base + lst, mask=lst_ok, other=float("-inf"))
        len_l = tl.where(lst == npg - 1, last_len, P).to(tl.float32)
        w = tl.where(lst_ok, tl.log(len_l) + ub_l, float("-inf"))
        rest = _lse_scan_rev(w)                 # log space: a page far below the list's top still counts
        rest_base = SelRest + b.to(tl.int64) * stride_sel_b + h * stride_sel_h
        tl.store(rest_base + pos, tl.where(lst_ok, rest, float("-inf")), mask=pos < LIST_MAX)
