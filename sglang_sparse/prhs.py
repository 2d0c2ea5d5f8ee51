"""PrHS: pre-hoc KV page selection for decode with a certified dropped-mass bound (reference math).

Plain PyTorch, exact, float64-testable. The sparse decode kernels in ``flashinfer_ext`` are checked
against these functions. Everything computes in the dtype of its inputs.

Notation (one request, one decode query, one layer):

    n tokens in the KV cache, pages of P consecutive tokens: page p holds tokens [p*P, min((p+1)*P, n)),
    n_p of them (only the last page may be partial); N = ceil(n / P) pages.
    q [H_q, D] the decode query; k [n, H_kv, D], v [n, H_kv, Dv]; G = H_q / H_kv, query head h reads
    KV head h // G.  s_t = sm_scale * q . k_t is the logit of token t (per query head).

Page summaries (Quest): per page and KV head, ``kmin[p, g, d] = min_{t in p} k[t, g, d]`` and
``kmax`` likewise. For any token t in page p and query head h of group g::

    lb[h, p] = sm_scale * sum_d min(q_d kmin_d, q_d kmax_d)  <=  s_t  <=  sm_scale * sum_d max(q_d kmin_d, q_d kmax_d) = ub[h, p]

(for sm_scale > 0). A KV head (a GQA group) selects one page set for all its query heads, so it
uses the group bounds ``ub[g, p] = max_{h in g} ub[h, p]`` and ``lb[g, p] = min_{h in g} lb[h, p]``.

Certified dropped mass. For a selected page set S, the dropped attention mass of query head h is
``delta_h = D_h / (Z_h + D_h)`` with ``D_h = sum_{t not in S} exp(s_t)`` and ``Z_h = sum_{t in S} exp(s_t)``.
It increases with D_h and decreases with Z_h, and ``D_h <= U = sum_{p not in S} n_p exp(ub_p)``,
``Z_h >= Z_lb = sum_{p in S} n_p exp(lb_p)``, hence for every head of the group::

    delta_h  <=  delta_hat = U / (Z_lb + U)                           (pre-hoc certificate)
    delta_h  <=  U / (min_{h in g} Z_h + U)                           (post-hoc, with the exact Z_h)

A common shift m cancels in the ratio; this module evaluates it in log space (``logsumexp`` of
``log n_p + ub_p``), which is the same number as ``sum n_p exp(ub_p - m)`` with ``m = max ub``
but cannot underflow.

The three pre-hoc axes: time (:func:`reuse_with_dilation`, reselect every R steps and reuse the
kept pages widened by +-r pages in between), depth (the always-kept sink and recent pages) and layer
(g consecutive layers share one selection); :class:`SelectionSchedule` decides which happens at a
given (decode step, layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "PageSelection",
    "SelectionSchedule",
    "page_lengths",
    "page_summaries",
    "page_means",
    "page_bounds",
    "page_mean_lower_bounds",
    "page_log_mean_exp",
    "select_pages",
    "quantise_page_keys",
    "dequantise_page_keys",
    "estimated_page_log_mass",
    "estimated_page_scores",
    "select_pages_estimated",
    "prehoc_delta_hat",
    "posthoc_delta_hat",
    "selection_mask",
    "token_mask",
    "exact_dropped_mass",
    "reuse_with_dilation",
    "sparse_attention",
    "dense_attention",
    "dropped_mass",
    "output_error",
    "layer_error",
    "layer_output_error",
    "scaled_budget",
    "budget_shift_update",
]

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------- pages
def page_lengths(n: int, page_size: int, device=None) -> Tensor:
    """``n_p`` for the ``ceil(n / P)`` pages of an ``n``-token sequence: LongTensor ``[N]``."""
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    num_pages = -(-n // page_size)
    lens = torch.full((num_pages,), page_size, dtype=torch.long, device=device)
    if num_pages:
        lens[-1] = n - (num_pages - 1) * page_size
    return lens


def _paged(x: Tensor, page_size: int, fill: float) -> Tensor:
    """``[n, ...]`` -> ``[N, P, ...]``, the tail of the last page filled with ``fill``."""
    n = x.shape[0]
    num_pages = -(-n // page_size)
    pad = num_pages * page_size - n
    if pad:
        x = torch.cat([x, x.new_full((pad,) + tuple(x.shape[1:]), fill)], dim=0)
    return x.reshape((num_pages, page_size) + tuple(x.shape[1:]))


def page_summaries(k: Tensor, page_size: int) -> Tuple[Tensor, Tensor]:
    """Quest key summaries: ``kmin, kmax`` each ``[N, H_kv, D]``, over the tokens of each page.

    ``kmin[p, g, d] = min_{t in page p} k[t, g, d]``; the last page may be partial (its summaries
    cover only its real tokens).
    """
    if k.dim() != 3:
        raise ValueError(f"k must be [n, H_kv, D], got {tuple(k.shape)}")
    kmin = _paged(k, page_size, float("inf")).amin(dim=1)
    kmax = _paged(k, page_size, _NEG_INF).amax(dim=1)
    return kmin, kmax


def page_means(k: Tensor, page_size: int) -> Tensor:
    """Mean key of each page, ``[N, H_kv, D]`` (an optional summary for a tighter lower bound)."""
    lens = page_lengths(k.shape[0], page_size, device=k.device).to(k.dtype)
    return _paged(k, page_size, 0.0).sum(dim=1) / lens[:, None, None]


def _group_reduce(x: Tensor, h_kv: int, how: str) -> Tensor:
    """``[H_q, N]`` -> ``[H_kv, N]`` by max or min over each group of G consecutive query heads."""
    h_q, num_pages = x.shape
    if h_q % h_kv:
        raise ValueError(f"H_q={h_q} is not a multiple of H_kv={h_kv}")
    x = x.reshape(h_kv, h_q // h_kv, num_pages)
    return x.amax(dim=1) if how == "max" else x.amin(dim=1)


def page_bounds(q: Tensor, kmin: Tensor, kmax: Tensor, sm_scale: float,
                per_query_head: bool = False) -> Tuple[Tensor, Tensor]:
    """Logit bounds of every page: ``(ub, lb)`` each ``[H_kv, N]`` (``[H_q, N]`` if ``per_query_head``).

    Per query head h (KV head g = h // G)::

        ub[h, p] = sm_scale * sum_d max(q[h,d] * kmin[p,g,d], q[h,d] * kmax[p,g,d])
        lb[h, p] = sm_scale * sum_d min(q[h,d] * kmin[p,g,d], q[h,d] * kmax[p,g,d])

    and per GQA group: ``ub[g, p] = max_{h in g} ub[h, p]``, ``lb[g, p] = min_{h in g} lb[h, p]``,
    so every head's logits in page p lie in ``[lb[g, p], ub[g, p]]``. Requires sm_scale > 0.
    """
    if sm_scale <= 0:
        raise ValueError(f"sm_scale must be > 0, got {sm_scale}")
    h_q = q.shape[0]
    h_kv = kmin.shape[1]
    group = h_q // h_kv
    lo = kmin.repeat_interleave(group, dim=1)              # [N, H_q, D]
    hi = kmax.repeat_interleave(group, dim=1)
    a = q[None] * lo
    b = q[None] * hi
    ub = (torch.maximum(a, b).sum(-1) * sm_scale).T       # [H_q, N]
    lb = (torch.minimum(a, b).sum(-1) * sm_scale).T
    if per_query_head:
        return ub.contiguous(), lb.contiguous()
    return _group_reduce(ub, h_kv, "max"), _group_reduce(lb, h_kv, "min")


def page_mean_lower_bounds(q: Tensor, kmean: Tensor, sm_scale: float) -> Tensor:
    """A tighter lower bound on a page's normaliser, from the page's mean key: ``[H_kv, N]``.

    Jensen: ``sum_{t in p} exp(s_t) >= n_p * exp(mean_{t in p} s_t) = n_p * exp(sm_scale * q . kmean_p)``.
    So ``lbm[h, p] = sm_scale * q[h] . kmean[p, g]`` may replace ``lb`` in :func:`select_pages` (the
    certificate stays valid; it bounds the page's *sum*, not each logit). Group: min over the heads.
    """
    h_q = q.shape[0]
    h_kv = kmean.shape[1]
    m = kmean.repeat_interleave(h_q // h_kv, dim=1)        # [N, H_q, D]
    lbm = ((q[None] * m).sum(-1) * sm_scale).T            # [H_q, N]
    return _group_reduce(lbm, h_kv, "min")


def page_log_mean_exp(q: Tensor, k: Tensor, page_size: int, sm_scale: float) -> Tensor:
    """The tightest valid ``lb`` for :func:`select_pages`: ``[H_kv, N]``.

    ``min_{h in g} log( (1/n_p) sum_{t in p} exp(s_t) )``. With it, ``Z_lb`` is the exact selected
    normaliser of the group's weakest head, i.e. the pre-hoc rule becomes the post-hoc one. It needs
    the logits, so it is a reference (or comes from an earlier attention pass), not a pre-hoc summary.
    """
    logits = _logits(q, k, sm_scale)                                          # [H_q, n]
    h_q, n = logits.shape
    lse = torch.logsumexp(_paged(logits.T, page_size, _NEG_INF), dim=1).T     # [H_q, N]
    lse = lse - page_lengths(n, page_size, device=q.device).to(lse.dtype).log()[None, :]
    return _group_reduce(lse, k.shape[1], "min")


# --------------------------------------------------------------------------- selection
@dataclass
class PageSelection:
    """Selected pages per KV head.

    pages         LongTensor ``[H_kv, budget]``: page ids in selection order (sink pages, recent
                  pages, then descending ub), padded with -1 after ``num_selected[g]`` entries.
    num_selected  LongTensor ``[H_kv]``.
    delta_hat     ``[H_kv]`` certified bound on the dropped attention mass of every query head of
                  the group (pre-hoc; post-hoc when the exact selected normaliser was given).
    """

    pages: Tensor
    num_selected: Tensor
    delta_hat: Tensor


def _forced_pages(num_pages: int, sink_pages: int, recent_pages: int) -> list:
    sinks = list(range(min(max(sink_pages, 0), num_pages)))
    recents = [p for p in range(max(0, num_pages - max(recent_pages, 0)), num_pages) if p not in sinks]
    return sinks + recents


def _ratio_from_logs(log_u: Tensor, log_z: Tensor) -> Tensor:
    """``U / (Z + U)`` from logs, with 0 when U = 0 and 1 when Z = 0 < U."""
    out = torch.sigmoid(log_u - log_z)
    out = torch.where(log_u == _NEG_INF, torch.zeros_like(out), out)
    out = torch.where((log_z == _NEG_INF) & (log_u > _NEG_INF), torch.ones_like(out), out)
    return out


def selection_mask(pages: Tensor, num_selected: Tensor, num_pages: int) -> Tensor:
    """Boolean ``[H_kv, N]``: page p selected for KV head g (entries past ``num_selected`` and -1 ignored)."""
    h_kv, width = pages.shape
    mask = torch.zeros(h_kv, num_pages, dtype=torch.bool, device=pages.device)
    valid = (torch.arange(width, device=pages.device)[None, :] < num_selected[:, None]) & (pages >= 0) \
        & (pages < num_pages)
    rows = torch.arange(h_kv, device=pages.device)[:, None].expand(h_kv, width)
    mask[rows[valid], pages[valid]] = True
    return mask


def token_mask(pages: Tensor, num_selected: Tensor, n: int, page_size: int) -> Tensor:
    """Boolean ``[H_kv, n]``: token t lies in a selected page of KV head g."""
    num_pages = -(-n // page_size)
    pm = selection_mask(pages, num_selected, num_pages)
    return pm.repeat_interleave(page_size, dim=1)[:, :n]


def prehoc_delta_hat(ub: Tensor, lb: Tensor, page_lens: Tensor, pages: Tensor, num_selected: Tensor) -> Tensor:
    """Pre-hoc certificate ``U / (Z_lb + U)`` ``[H_kv]`` for any selection (e.g. a reused, dilated one).

    ``U = sum_{p not in S} n_p exp(ub_p)``, ``Z_lb = sum_{p in S} n_p exp(lb_p)``; 0 if nothing is
    dropped, 1 if nothing is selected (and something is dropped).
    """
    sel = selection_mask(pages, num_selected, ub.shape[1])
    log_n = page_lens.to(ub.dtype).log()[None, :]
    log_u = torch.logsumexp((log_n + ub).masked_fill(sel, _NEG_INF), dim=1)
    log_z = torch.logsumexp((log_n + lb).masked_fill(~sel, _NEG_INF), dim=1)
    return _ratio_from_logs(log_u, log_z)


def posthoc_delta_hat(ub: Tensor, page_lens: Tensor, pages: Tensor, num_selected: Tensor,
                      lse_sel: Tensor) -> Tensor:
    """Post-hoc certificate ``[H_kv]`` from the attention pass's exact log-normaliser of the selection.

    ``lse_sel``: ``[H_q]`` or ``[H_kv]``, ``log sum_{t in S} exp(s_t)`` (the LSE a sparse attention
    kernel returns, in natural log, logits already scaled by sm_scale). Per group the smallest
    normaliser is used: ``delta_hat = U / (min_{h in g} Z_h + U)``, valid for every head of the group.
    """
    h_kv, num_pages = ub.shape
    if lse_sel.numel() != h_kv:
        lse_sel = lse_sel.reshape(h_kv, -1).amin(dim=1)
    sel = selection_mask(pages, num_selected, num_pages)
    log_n = page_lens.to(ub.dtype).log()[None, :]
    log_u = torch.logsumexp((log_n + ub).masked_fill(sel, _NEG_INF), dim=1)
    return _ratio_from_logs(log_u, lse_sel.to(ub.dtype))


def select_pages(ub: Tensor, lb: Tensor, page_lens: Tensor, delta: float, budget: int, sink_pages: int,
                 recent_pages: int, z_sel_exact: Optional[Tensor] = None) -> PageSelection:
    """Certified pre-hoc page selection, per KV head.

    Args:
        ub, lb: ``[H_kv, N]`` group bounds (:func:`page_bounds`). ``ub[g, p]`` must bound every
            logit of page p for every head of group g; ``lb`` only needs
            ``n_p exp(lb[g, p]) <= sum_{t in p} exp(s_t)`` for every head, so
            :func:`page_mean_lower_bounds` (Jensen) or :func:`page_log_mean_exp` (exact, e.g. from
            an earlier pass) may replace the box bound. The box and mean bounds are loose on
            pages with one dominant token (a needle), where only the post-hoc value certifies.
        page_lens: ``[N]`` tokens per page (:func:`page_lengths`).
        delta: target bound on the dropped mass, ``0 <= delta < 1``.
        budget: most pages per KV head (the width of ``pages``).
        sink_pages, recent_pages: always selected: pages ``[0, sink)`` and ``[N - recent, N)``.
        z_sel_exact: optional ``[H_kv]`` or ``[H_q]`` exact normaliser ``sum_{t in S} exp(s_t)``
            of the selection this call makes (from an attention pass over it; logits scaled by
            sm_scale, no shift). The selection is unchanged; ``delta_hat`` is then reported post-hoc
            (:func:`posthoc_delta_hat`), which is never larger than the pre-hoc value.

    Rule (each KV head independently):
        1. S = sink pages, then recent pages (ascending page id; the forced set F).
           If ``budget <= |F|`` the first ``budget`` of them are taken and nothing else.
        2. The other pages in descending ub (ties: lower page id first) are appended one at a time
           while ``delta_hat(S) = U / (Z_lb + U) > delta`` and ``|S| < budget``, with
           ``U = sum_{p not in S} n_p exp(ub_p - m)``, ``Z_lb = sum_{p in S} n_p exp(lb_p - m)``.
           delta_hat only decreases along the way, so S is the shortest such prefix.
        3. ``delta == 0`` selects every page the budget allows (delta_hat = 0 only when nothing is
           dropped).
    """
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    h_kv, num_pages = ub.shape
    dev = ub.device
    pages = torch.full((h_kv, budget), -1, dtype=torch.long, device=dev)
    num_selected = torch.zeros(h_kv, dtype=torch.long, device=dev)
    if num_pages == 0:
        return PageSelection(pages, num_selected, torch.zeros(h_kv, dtype=ub.dtype, device=dev))

    forced = _forced_pages(num_pages, sink_pages, recent_pages)
    n_forced = min(len(forced), budget)
    forced_t = torch.tensor(forced[:n_forced], dtype=torch.long, device=dev)
    pages[:, :n_forced] = forced_t
    if budget <= len(forced):
        num_selected[:] = n_forced
    else:
        is_forced = torch.zeros(num_pages, dtype=torch.bool, device=dev)
        is_forced[forced_t] = True
        cand = torch.nonzero(~is_forced).flatten()                       # ascending ids
        n_cand = cand.numel()
        log_n = page_lens.to(ub.dtype).log()
        order = torch.sort(ub[:, cand], dim=1, descending=True, stable=True).indices
        cand_sorted = cand[order]                                        # [H_kv, C]
        wu = (log_n[None, :] + ub).gather(1, cand_sorted)                # log(n_p exp(ub_p)), sorted
        wl = (log_n[None, :] + lb).gather(1, cand_sorted)
        ninf = torch.full((h_kv, 1), _NEG_INF, dtype=ub.dtype, device=dev)
        # log U_j: candidates at sorted positions >= j are dropped (j = 0..C)
        log_u = torch.cat([torch.logcumsumexp(wu.flip(1), dim=1).flip(1), ninf], dim=1)
        # log Z_j: forced pages plus the first j candidates
        log_z_forced = torch.logsumexp(log_n[forced_t][None, :] + lb[:, forced_t], dim=1)[:, None]
        log_z = torch.logaddexp(log_z_forced, torch.cat([ninf, torch.logcumsumexp(wl, dim=1)], dim=1))
        dhat = _ratio_from_logs(log_u, log_z)                            # [H_kv, C + 1]
        j_max = min(n_cand, budget - len(forced))
        if delta > 0:
            ok = dhat[:, : j_max + 1] <= delta
            j = torch.where(ok.any(dim=1), ok.int().argmax(dim=1), torch.full_like(num_selected, j_max))
        else:
            j = torch.full_like(num_selected, j_max)
        take = torch.arange(j_max, device=dev)[None, :] < j[:, None]
        extra = torch.where(take, cand_sorted[:, :j_max], torch.full_like(cand_sorted[:, :j_max], -1))
        pages[:, len(forced): len(forced) + j_max] = extra
        num_selected = len(forced) + j
    if z_sel_exact is not None:
        delta_hat = posthoc_delta_hat(ub, page_lens, pages, num_selected, z_sel_exact.to(ub.dtype).log())
    else:
        delta_hat = prehoc_delta_hat(ub, lb, page_lens, pages, num_selected)
    return PageSelection(pages, num_selected, delta_hat)


# --------------------------------------------------------------------------- estimated page mass
KEY_CODE_BITS = 4


def _page_levels(kmin: Tensor, kmax: Tensor, page_size: int, n: int) -> Tuple[Tensor, Tensor]:
    """Per token, its page's lowest level ``kmin`` and level step ``(kmax - kmin) / 15``, float32 ``[n, H_kv, D]``."""
    lo = kmin.float().repeat_interleave(page_size, dim=0)[:n]
    step = (kmax.float() - kmin.float()).repeat_interleave(page_size, dim=0)[:n] / ((1 << KEY_CODE_BITS) - 1)
    return lo, step


def quantise_page_keys(k: Tensor, kmin: Tensor, kmax: Tensor, page_size: int) -> Tensor:
    """4-bit codes of the keys inside their page's own ``[kmin, kmax]`` (the Quest summaries, as stored):
    ``code = clamp(floor((k - kmin) / step + 1/2), 0, 15)`` with ``step = (kmax - kmin) / 15`` per page, KV head and
    channel (0 where the channel is constant over the page). ``k [n, H_kv, D]`` -> uint8 ``[n, H_kv, D]``, one code
    per element (the kernel packs two per byte). Computed in float32 from the summaries' own dtype."""
    lo, step = _page_levels(kmin, kmax, page_size, k.shape[0])
    x = torch.where(step > 0, (k.float() - lo) / torch.where(step > 0, step, torch.ones_like(step)),
                    torch.zeros_like(step))
    return torch.floor(x + 0.5).clamp(0, (1 << KEY_CODE_BITS) - 1).to(torch.uint8)


def dequantise_page_keys(codes: Tensor, kmin: Tensor, kmax: Tensor, page_size: int) -> Tensor:
    """The keys the codes stand for, float32 ``[n, H_kv, D]``: ``kmin + code * step``."""
    lo, step = _page_levels(kmin, kmax, page_size, codes.shape[0])
    return lo + codes.float() * step


def estimated_page_log_mass(q: Tensor, k_est: Tensor, k: Tensor, page_size: int, sm_scale: float) -> Tensor:
    """Each page's estimated log attention mass per query head, ``[H_q, N]``: ``log sum_{t in p} exp(s~_t)`` with
    the logits ``s~`` of the estimated keys ``k_est`` (:func:`dequantise_page_keys`), except on a partial last page,
    whose codes do not exist yet (a page is quantised when it fills): its exact keys ``k`` are used. Unnormalised
    (the selector normalises per head)."""
    n = k.shape[0]
    dt = torch.promote_types(k_est.dtype, torch.float32)      # the rebuilt keys as computed, never rounded to k's dtype
    k_mix = k_est.to(dt).clone()
    tail = n % page_size
    if tail:
        k_mix[n - tail:] = k[n - tail:].to(dt)
    logits = _logits(q.to(dt), k_mix, sm_scale)                              # [H_q, n]
    return torch.logsumexp(_paged(logits.T, page_size, _NEG_INF), dim=1).T   # [H_q, N]


def estimated_page_scores(est: Tensor, h_kv: int) -> Tensor:
    """A KV group's page scores from estimated page log-masses ``est [H_q, N]``: each query head's masses normalised
    to sum to 1, ``m[h, p]``, then the group's largest, ``M[g, p] = max_{h in g} m[h, p]``, ``[H_kv, N]``."""
    return _group_reduce(torch.exp(est - torch.logsumexp(est, dim=1, keepdim=True)), h_kv, "max")


def select_pages_estimated(est: Tensor, page_lens: Tensor, h_kv: int, delta: float, budget: int, sink_pages: int,
                           recent_pages: int) -> PageSelection:
    """Page selection by estimated mass, per KV head, with delta on the *estimated* dropped mass.

    ``est [H_q, N]`` (:func:`estimated_page_log_mass`) gives each KV group the page scores ``M[g, p]``
    (:func:`estimated_page_scores`). The selection is :func:`select_pages`'s (forced pages, then candidates in
    descending M (per token, ``M / n_p``, the kernel's order; the same for full pages), ties to the lower id, at most
    ``budget`` pages) stopping at the shortest prefix whose dropped ``U = sum_{p dropped} M[g, p] <= delta``. U bounds
    every head's estimated dropped mass (``sum_{p dropped} m[h, p] <= U``); it is what ``delta_hat`` reports, capped at
    1. Only an estimate of the true dropped mass: keys off their codes, and a page whose estimate is low can hold a
    needle.
    """
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    num_pages = est.shape[1]
    score = estimated_page_scores(est, h_kv)                                 # [H_kv, N]
    w = score.log() - page_lens.to(score.dtype).log()[None]
    # select_pages with ub = lb = log(M / n_p) orders the pages by M; its own delta rule is replaced below
    base = select_pages(w, w, page_lens, 0.0, budget, sink_pages, recent_pages)
    n_forced = min(len(_forced_pages(num_pages, sink_pages, recent_pages)), budget)
    pages = base.pages.clone()
    num = base.num_selected.clone()
    dhat = torch.zeros(h_kv, dtype=score.dtype, device=est.device)
    for g in range(h_kv):
        lst = base.pages[g, : int(base.num_selected[g])]
        listed = score[g][lst]
        # dropped[j]: the pages outside the list plus the list's positions >= j (j = 0..len), summed as the kernel does
        in_list = torch.zeros(num_pages, dtype=torch.bool, device=est.device)
        in_list[lst] = True
        outside = score[g][~in_list].sum()
        dropped = outside + torch.cat([listed.flip(0).cumsum(0).flip(0), listed.new_zeros(1)])
        ok = dropped[n_forced:] <= delta if delta > 0 else torch.zeros_like(dropped[n_forced:], dtype=torch.bool)
        take = n_forced + int(ok.int().argmax()) if bool(ok.any()) else lst.numel()
        pages[g, take:] = -1
        num[g] = take
        dhat[g] = dropped[take].clamp(max=1.0)
    return PageSelection(pages, num, dhat)


# --------------------------------------------------------------------------- pre-hoc axes
def reuse_with_dilation(prev_pages: Tensor, r: int, n_pages: int, prev_n_pages: Optional[int] = None,
                        sink_pages: int = 0, recent_pages: int = 1,
                        prev_num_selected: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Time axis: the selection reused between reselections, widened by ``+-r`` pages.

    ``S_new = {p + t : p in S_prev, |t| <= r} U sinks U recents U {new pages}`` clipped to
    ``[0, n_pages)``, where new pages are those appended since the selection was made
    (``[prev_n_pages, n_pages)`` when ``prev_n_pages`` is given) and recents are the last
    ``recent_pages`` pages. Dilation is not capped by a budget: choose r for the budget.

    Args:
        prev_pages: ``[H_kv, B]`` page ids, -1 = padding (e.g. ``PageSelection.pages``).
        prev_num_selected: optional ``[H_kv]``; entries past it are ignored.

    Returns ``(pages [H_kv, W], num_selected [H_kv])`` with each row ascending, padded with -1,
    ``W = max(num_selected)``. Certify it with :func:`prehoc_delta_hat` if needed.
    """
    if r < 0:
        raise ValueError(f"dilation r must be >= 0, got {r}")
    h_kv, width = prev_pages.shape
    dev = prev_pages.device
    valid = prev_pages >= 0
    if prev_num_selected is not None:
        valid &= torch.arange(width, device=dev)[None, :] < prev_num_selected[:, None]
    keep = torch.zeros(h_kv, n_pages + 2 * r, dtype=torch.bool, device=dev)   # offset by r
    rows = torch.arange(h_kv, device=dev)[:, None].expand(h_kv, width)
    for t in range(-r, r + 1):
        idx = prev_pages + t + r
        ok = valid & (idx >= 0) & (idx < n_pages + 2 * r)
        keep[rows[ok], idx[ok]] = True
    keep = keep[:, r: r + n_pages].clone()
    for p in _forced_pages(n_pages, sink_pages, recent_pages):
        keep[:, p] = True
    if prev_n_pages is not None and prev_n_pages < n_pages:
        keep[:, max(prev_n_pages, 0):] = True
    num_selected = keep.sum(dim=1)
    w = int(num_selected.max().item()) if h_kv else 0
    ids = torch.arange(n_pages, device=dev).expand(h_kv, n_pages)
    # ascending ids first, padding after: sort by (not kept, id)
    key = torch.where(keep, ids, ids + n_pages)
    order = torch.sort(key, dim=1).values[:, :w]
    pages = torch.where(order < n_pages, order, torch.full_like(order, -1))
    return pages, num_selected


@dataclass(frozen=True)
class SelectionSchedule:
    """When a (decode step, layer) selects pages afresh, dilates a previous selection, or shares one.

    reselect_interval R: fresh selections at steps 0, R, 2R, ... (step = decode steps since the
        request's prefill); in between the previous selection is reused with dilation ``dilation``.
    dilation r: the ``+-r`` pages of :func:`reuse_with_dilation`.
    layers_per_group g: layers ``[k*g, (k+1)*g)`` share the selection made at their first layer
        (the group leader); the other layers of the group read the leader's pages.

    ``action(step, layer)`` is ``SELECT`` (leader layer, reselect step: compute bounds and
    :func:`select_pages`), ``DILATE`` (leader layer, other steps: :func:`reuse_with_dilation` of the
    leader's last selection) or ``SHARE`` (non-leader layer: use the leader's pages of this step).
    Bounds are computed for ``1 / (R * g)`` of the (step, layer) pairs.
    """

    reselect_interval: int = 1
    dilation: int = 0
    layers_per_group: int = 1

    SELECT = "select"
    DILATE = "dilate"
    SHARE = "share"

    def __post_init__(self):
        if self.reselect_interval < 1 or self.dilation < 0 or self.layers_per_group < 1:
            raise ValueError(f"invalid schedule {self}")

    def leader(self, layer: int) -> int:
        return (layer // self.layers_per_group) * self.layers_per_group

    def is_reselect_step(self, step: int) -> bool:
        return step % self.reselect_interval == 0

    def action(self, step: int, layer: int) -> str:
        if layer != self.leader(layer):
            return self.SHARE
        return self.SELECT if self.is_reselect_step(step) else self.DILATE


# --------------------------------------------------------------------------- attention
def _logits(q: Tensor, k: Tensor, sm_scale: float) -> Tensor:
    """``[H_q, n]`` logits ``sm_scale * q[h] . k[t, h // G]``."""
    group = q.shape[0] // k.shape[1]
    return torch.einsum("hd,thd->ht", q, k.repeat_interleave(group, dim=1)) * sm_scale


def exact_dropped_mass(q: Tensor, k: Tensor, page_size: int, pages: Tensor, num_selected: Tensor,
                       sm_scale: float) -> Tensor:
    """True softmax mass of the tokens outside the selected pages, per query head: ``[H_q]``.

    ``delta_h = sum_{t not in S_g} exp(s_t) / sum_t exp(s_t)`` with g = h // G.
    """
    logits = _logits(q, k, sm_scale)
    h_q, n = logits.shape
    tm = token_mask(pages, num_selected, n, page_size).repeat_interleave(h_q // pages.shape[0], dim=0)
    lse_all = torch.logsumexp(logits, dim=1)
    lse_drop = torch.logsumexp(logits.masked_fill(tm, _NEG_INF), dim=1)
    return torch.exp(lse_drop - lse_all)


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, sm_scale: float, tmask: Optional[Tensor]):
    logits = _logits(q, k, sm_scale)
    if tmask is not None:
        logits = logits.masked_fill(~tmask, _NEG_INF)
    lse = torch.logsumexp(logits, dim=1)                                     # [H_q]
    safe = torch.where(lse == _NEG_INF, torch.zeros_like(lse), lse)
    p = torch.exp(logits - safe[:, None])                                    # 0 on masked tokens
    group = q.shape[0] // k.shape[1]
    out = torch.einsum("ht,thd->hd", p, v.repeat_interleave(group, dim=1))
    return out, lse


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, page_size: int, pages: Tensor, num_selected: Tensor,
                     sm_scale: float, return_lse: bool = False):
    """Exact attention of one decode query restricted to the selected pages: ``out [H_q, Dv]``.

    ``out[h] = sum_{t in S_g} softmax_S(s)_t v[t, g]``, g = h // G. With ``return_lse`` also
    ``lse [H_q] = log sum_{t in S_g} exp(s_t)``. An empty selection gives out = 0, lse = -inf.
    """
    tm = token_mask(pages, num_selected, k.shape[0], page_size)
    tm = tm.repeat_interleave(q.shape[0] // k.shape[1], dim=0)
    out, lse = _masked_attention(q, k, v, sm_scale, tm)
    return (out, lse) if return_lse else out


def dense_attention(q: Tensor, k: Tensor, v: Tensor, sm_scale: float, return_lse: bool = False):
    """Exact attention of one decode query over all n tokens (GQA): ``out [H_q, Dv]`` (and lse)."""
    out, lse = _masked_attention(q, k, v, sm_scale, None)
    return (out, lse) if return_lse else out


def dropped_mass(q: Tensor, k: Tensor, sm_scale: float, lse_read: Tensor) -> Tensor:
    """Attention mass a decode step left out: ``[H_q]``, ``1 - exp(lse_read - log sum_t exp(s_t))`` over all n
    tokens (GQA), where ``lse_read`` is the natural-log normaliser of what the step read (e.g. the ``lse`` of
    :func:`sparse_attention`). Clamped to ``[0, 1]``. The quantity PrHS's ``delta`` is about, measured rather
    than bounded (``flashinfer_ext.audit.DroppedMassAudit``)."""
    lse_all = torch.logsumexp(_logits(q, k, sm_scale), dim=-1)
    return (1.0 - torch.exp(lse_read.to(lse_all.dtype) - lse_all)).clamp(0.0, 1.0)


def output_error(q: Tensor, k: Tensor, v: Tensor, sm_scale: float, o_read: Tensor) -> Tensor:
    """Relative error of a decode step's attention output: ``[H_q]``, ``||o_read - o_all|| / ||o_all||`` per query
    head, where ``o_all`` is the exact attention over all n tokens (:func:`dense_attention`, GQA) and ``o_read``
    (``[H_q, Dv]``) what the step returned. Unlike :func:`dropped_mass` it is small when the dropped tokens' values
    resemble the kept ones (``flashinfer_ext.audit.DroppedMassAudit(measure="output-error")``)."""
    o_all = dense_attention(q, k, v, sm_scale)
    diff = (o_read.to(o_all.dtype) - o_all).norm(dim=-1)
    return diff / o_all.norm(dim=-1).clamp_min(1e-30)


def layer_error(err: Tensor, norm: Tensor) -> Tensor:
    """Relative error of a layer's whole attention output (all its query heads concatenated, what the output
    projection sees) from its heads' relative errors ``err`` and output norms ``norm`` ``[..., H_q]``:
    ``sqrt(sum_h (err_h * norm_h)^2) / sqrt(sum_h norm_h^2)``, over the last dim. Between the norm-weighted
    mean and the max of ``err``. In the inputs' dtype; NaN where any head's value is NaN. Device ops only."""
    tiny = torch.finfo(norm.dtype).tiny
    return ((err * norm).square().sum(dim=-1) / norm.square().sum(dim=-1).clamp_min(tiny)).sqrt()


def layer_output_error(q: Tensor, k: Tensor, v: Tensor, sm_scale: float, o_read: Tensor) -> Tensor:
    """Relative error of a decode step's attention output over all its query heads (a scalar):
    ``sqrt(sum_h ||o_read[h] - o_all[h]||^2) / sqrt(sum_h ||o_all[h]||^2)``, with ``o_all`` and ``o_read`` as in
    :func:`output_error` (:func:`layer_error` of its per-head errors and ``||o_all[h]||``)."""
    o_all = dense_attention(q, k, v, sm_scale)
    return (o_read.to(o_all.dtype) - o_all).norm() / o_all.norm().clamp_min(1e-30)


# --------------------------------------------------------------------------- audit feedback
def scaled_budget(budget: int, shift: int, num_pages: int) -> int:
    """The page budget of a request whose budget shift is ``shift`` (the audit's feedback): ``budget << shift``
    pages, at most every page, never below ``budget``."""
    return max(budget, min(num_pages, budget << shift))


def budget_shift_update(shift: Tensor, rows: Tensor, over: Tensor, max_shift: int) -> Tensor:
    """The audit's feedback rule, in place on one selection group's shifts (``shift``: ``[rows]`` int, indexed by
    ``req_to_token`` row): for each batch entry i with ``over[i]`` (its audited dropped mass exceeded delta),
    ``shift[rows[i]] = min(shift[rows[i]] + 1, max_shift)``; the others are left alone. Shifts only grow (a
    request's budget is reset only when it restarts). A row listed twice (CUDA-graph padding repeating a real
    row) keeps the larger value. Device ops, no host sync. Returns ``shift``."""
    rows = rows.long()
    new = torch.clamp(shift[rows] + over.to(shift.dtype), max=max_shift)
    return shift.scatter_reduce_(0, rows, torch.maximum(new, shift[rows]), reduce="amax")
