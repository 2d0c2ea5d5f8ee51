"""How well cheap per-page estimates of the attention mass rank PrHS's pages, measured on a real model's decode
queries (CPU or GPU, offline: no server).

PrHS ranks pages by an upper bound on their logits from the pages' per-channel key min/max; on Qwen2.5-Coder the
bound is loose and the ranking leaves attention out that an oracle ranking (pages by their true mass) keeps. This
script measures, per layer and page budget, what each candidate ranking costs in answer-relevant error, to decide
whether a finer estimate is worth a kernel. Candidates (each scores every page of a KV head by an estimate of the
attention mass its tokens get from the group's query heads; sink and recent pages are always kept, as in PrHS):

* ``minmax``: PrHS's selection (:func:`sglang_sparse.prhs.select_pages` on the min/max logit bounds);
* ``oracle``: the true page mass (the best any ranking can do at a budget);
* ``midrange``: ``log n_p + q . (kmin + kmax) / 2`` per page, i.e. the middle of PrHS's own logit bounds
  (nothing read beyond min/max: only the ranking changes); ``midrange-g`` the same from the group bounds the
  selection kernel holds (max / min over the KV group's query heads);
* ``mean``: ``log n_p + q . mean(k)`` per page (one summary vector per page, half of min/max's storage);
* ``kminmax-qN``: every key quantised to N bits per channel inside its page's own ``[kmin, kmax]`` range (the
  min/max summaries PrHS already keeps are the quantisation scales, so the codes add N bits per key element,
  N/16 of the bf16 keys), logits from the dequantised keys;
* ``sparq-rR``: each query head's R largest ``|q|`` channels only (SparQ-style; R/D of the keys read, gathered),
  logits rescaled by ``||q||_1 / ||q_R||_1``.

For each (layer, decode sample, ranking, budget 1/16 .. 1) it computes the relative error of the layer's attention
output (all query heads together, the quantity ``--prhs-audit-measure output-error`` audits) and the worst query
head's dropped mass, and reports per ranking: the mean over layers, the worst layer's ``--quantile``, and the
budget each layer needs for its error to stay within ``--error`` on that quantile of the samples (the mean page
fraction over layers). Estimation cost (a fraction of the keys and values a dense decode reads) is listed next to
it: a ranking pays off only where its cost plus the pages it needs is below min/max's.

It also measures whether ``--prhs-delta`` could bind with an estimate: selection by estimated mass
(:func:`estimated_mass_selection`, no budget: each KV group takes pages in descending estimated mass until every
query head of the group keeps an estimated ``1 - delta`` of its attention), reporting per delta the share of
samples whose *true* worst-head dropped mass is within delta, the pages read and the layer error. For ``minmax``
the same is PrHS's own delta rule on its bounds with the budget at every page.

    python -m benchmarks.page_estimators --model-path .models/qwen2.5-coder-0.5b --lengths 8192 --num-prompts 3 \\
        --out benchmarks/results/page_estimators_qwen2.5-coder-0.5b_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from sglang_sparse import calibrate as cal
from sglang_sparse.prhs import (
    _logits,
    _paged,
    dense_attention,
    dequantise_page_keys,
    estimated_page_log_mass,
    exact_dropped_mass,
    page_bounds,
    page_lengths,
    page_means,
    page_summaries,
    quantise_page_keys,
    scaled_budget,
    select_pages,
    select_pages_estimated,
    sparse_attention,
)

__all__ = ["head_page_mass_from_logits", "group_page_mass_from_logits", "quantised_keys", "sparq_logits",
           "midrange_page_mass", "group_midrange_page_mass", "mean_page_mass", "RANKINGS", "head_scores",
           "ranking_scores", "estimated_mass_selection", "reused_selection_rule", "DELTAS", "sample", "main"]


# ------------------------------------------------------------------------------------------------ estimators
def head_page_mass_from_logits(logits: Tensor, page_size: int) -> Tensor:
    """``[H_q, n]`` (estimated) logits -> each page's softmax mass per query head, ``[H_q, N]``."""
    probs = torch.softmax(logits, dim=-1)
    return _paged(probs.transpose(0, 1), page_size, 0.0).sum(dim=1).transpose(0, 1)


def _group_sum(per_head: Tensor, h_kv: int) -> Tensor:
    return per_head.reshape(h_kv, -1, per_head.shape[1]).sum(dim=1)


def group_page_mass_from_logits(logits: Tensor, h_kv: int, page_size: int) -> Tensor:
    """``[H_q, n]`` (estimated) logits -> each page's softmax mass summed over its KV group's query heads,
    ``[H_kv, N]``."""
    return _group_sum(head_page_mass_from_logits(logits, page_size), h_kv)


def quantised_keys(k: Tensor, page_size: int, bits: int) -> Tensor:
    """Keys ``[n, H_kv, D]`` rounded to ``bits`` bits per channel inside their page's ``[kmin, kmax]`` (the
    page summaries): ``kmin + round((k - kmin) / step) * step``, ``step = (kmax - kmin) / (2^bits - 1)``; a
    channel constant over its page is returned exactly."""
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    n = k.shape[0]
    kmin, kmax = page_summaries(k, page_size)                                # [N, H_kv, D]
    paged = _paged(k, page_size, 0.0)                                        # [N, P, H_kv, D]
    levels = (1 << bits) - 1
    step = ((kmax - kmin) / levels)[:, None]
    lo = kmin[:, None]
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round((paged - lo) / safe).clamp(0, levels)
    out = torch.where(step > 0, lo + codes * step, lo.expand_as(paged))
    return out.reshape((-1,) + tuple(k.shape[1:]))[:n]


def sparq_logits(q: Tensor, k: Tensor, sm_scale: float, r: int) -> Tensor:
    """Approximate logits ``[H_q, n]`` from each query head's ``r`` largest-``|q|`` channels, scaled by
    ``||q||_1 / ||q_r||_1`` (with ``r = D`` the exact logits)."""
    h_q, d = q.shape
    r = max(1, min(d, r))
    idx = q.abs().topk(r, dim=-1).indices                                    # [H_q, r]
    mask = torch.zeros_like(q).scatter_(1, idx, 1.0)
    q_r = q * mask
    scale = q.abs().sum(dim=-1, keepdim=True) / q_r.abs().sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return _logits(q_r * scale, k, sm_scale)


def _page_softmax(page_logits: Tensor, n: int, page_size: int) -> Tensor:
    """Per query head, a softmax over pages of ``log n_p + page_logits[h, p]``: each page's estimated mass when all
    its ``n_p`` tokens are taken to score ``page_logits``, ``[H_q, N]``."""
    lens = page_lengths(n, page_size, device=page_logits.device).to(page_logits.dtype)
    return torch.softmax(page_logits + lens.log()[None], dim=-1)


def midrange_page_mass(q: Tensor, k: Tensor, sm_scale: float, page_size: int) -> Tensor:
    """:func:`mean_page_mass` with the midpoint of PrHS's own logit bounds, ``(ub + lb) / 2`` per query head
    (:func:`~sglang_sparse.prhs.page_bounds`; no summary beyond min/max), in place of the mean key's logit."""
    ub, lb = page_bounds(q, *page_summaries(k, page_size), sm_scale, per_query_head=True)
    return _page_softmax((ub + lb) / 2, k.shape[0], page_size)


def group_midrange_page_mass(q: Tensor, k: Tensor, sm_scale: float, page_size: int) -> Tensor:
    """The same from PrHS's *group* bounds, as the selection kernel holds them (``ub`` the max over the group's
    query heads, ``lb`` the min): one estimate per KV group, repeated for its query heads, ``[H_q, N]``."""
    ub, lb = page_bounds(q, *page_summaries(k, page_size), sm_scale)         # [H_kv, N]
    return _page_softmax((ub + lb) / 2, k.shape[0], page_size).repeat_interleave(q.shape[0] // k.shape[1], dim=0)


def mean_page_mass(q: Tensor, k: Tensor, sm_scale: float, page_size: int) -> Tensor:
    """Each page's estimated mass per query head, ``[H_q, N]``: a softmax over pages of
    ``log n_p + sm_scale q . mean_p(k)``."""
    return _page_softmax(_logits(q, page_means(k, page_size), sm_scale), k.shape[0], page_size)


# scorer q, k, sm_scale, P -> each page's estimated mass per query head [H_q, N] (None for min/max, which selects
# with its bounds)
Scorer = Callable[[Tensor, Tensor, float, int], Tensor]


def _oracle(q, k, s, p):
    return head_page_mass_from_logits(_logits(q, k, s), p)


def _quant(bits: int) -> Scorer:
    return lambda q, k, s, p: head_page_mass_from_logits(_logits(q, quantised_keys(k, p, bits), s), p)


def _key4_served(q, k, s, p):
    """The served estimate (``--prhs-select estimate``): 4-bit codes in the page's bf16 min/max range, the partial
    last page exact; masses normalised per head."""
    kmin, kmax = page_summaries(k, p)
    kmin, kmax = kmin.to(torch.bfloat16), kmax.to(torch.bfloat16)
    k_est = dequantise_page_keys(quantise_page_keys(k, kmin, kmax, p), kmin, kmax, p)
    return torch.softmax(estimated_page_log_mass(q, k_est, k, p, s), dim=-1).to(q.dtype)


def _sparq(frac: int) -> Scorer:
    return lambda q, k, s, p: head_page_mass_from_logits(sparq_logits(q, k, s, q.shape[1] // frac), p)


# name -> (fraction of a dense decode's K+V bytes the estimate reads, from head dim D and page size P; scorer)
RANKINGS: Dict[str, Tuple[Callable[[int, int], float], object]] = {
    "minmax": (lambda d, p: 2 / p / 2, None),                      # kmin + kmax per page: 2/P of K, K is half
    "oracle": (lambda d, p: 0.5, _oracle),                         # every key (the exact logits)
    "midrange": (lambda d, p: 2 / p / 2, midrange_page_mass),      # the min/max summaries, ranked otherwise
    "midrange-g": (lambda d, p: 2 / p / 2, group_midrange_page_mass),
    "mean": (lambda d, p: 1 / p / 2, mean_page_mass),
    "kminmax-q2": (lambda d, p: 2 / 16 / 2 + 2 / p / 2, _quant(2)),
    "kminmax-q4": (lambda d, p: 4 / 16 / 2 + 2 / p / 2, _quant(4)),
    "key4-served": (lambda d, p: 4 / 16 / 2 + 2 / p / 2, _key4_served),
    "sparq-r1/8": (lambda d, p: 1 / 8 / 2, _sparq(8)),
    "sparq-r1/4": (lambda d, p: 1 / 4 / 2, _sparq(4)),
}


# rankings whose delta rule is the server's (``sglang_sparse.prhs.select_pages_estimated``: the dropped sum of the
# group's largest per-head masses), not the per-head rule of ``estimated_mass_selection``
SERVED_RULE = ("key4-served",)


def head_scores(name: str, q: Tensor, k: Tensor, sm_scale: float, page_size: int) -> Tensor:
    """Each page's estimated mass per query head ``[H_q, N]`` under ranking ``name`` (not for ``minmax``)."""
    scorer = RANKINGS[name][1]
    if scorer is None:
        raise ValueError("minmax selects with its bounds, it has no scores")
    return scorer(q, k, sm_scale, page_size)


def ranking_scores(name: str, q: Tensor, k: Tensor, sm_scale: float, page_size: int) -> Tensor:
    """The page scores ``[H_kv, N]`` of ranking ``name``: its estimated mass summed over each KV group."""
    return _group_sum(head_scores(name, q, k, sm_scale, page_size), k.shape[1])


def estimated_mass_selection(head_mass: Tensor, h_kv: int, delta: float, sink_pages: int,
                             recent_pages: int) -> Tuple[Tensor, Tensor]:
    """Pages per KV group chosen by estimated mass alone: the sink and recent pages, then the others in descending
    group-summed estimate, until every query head of the group has an estimated dropped mass ``<= delta`` (its
    estimates normalised to sum to 1). Returns ``(pages [H_kv, N]`` in selection order, ``num_selected [H_kv])``.
    """
    h_q, num_pages = head_mass.shape
    per = head_mass / head_mass.sum(dim=1, keepdim=True).clamp_min(1e-300)
    group = _group_sum(per, h_kv)                                            # [H_kv, N]
    forced = torch.zeros(num_pages, dtype=torch.bool, device=head_mass.device)
    forced[: min(sink_pages, num_pages)] = True
    if recent_pages:
        forced[max(0, num_pages - recent_pages):] = True
    key = group + forced[None].to(group.dtype) * 1e30                        # forced pages first
    order = key.argsort(dim=1, descending=True)                              # [H_kv, N]
    g = h_q // h_kv
    kept = per.reshape(h_kv, g, num_pages).gather(2, order[:, None].expand(h_kv, g, num_pages)).cumsum(dim=2)
    ok = (1.0 - kept <= delta).all(dim=1)                                    # [H_kv, N]: prefix k+1 suffices
    first = torch.where(ok.any(dim=1), ok.float().argmax(dim=1), torch.full_like(ok[:, 0], num_pages - 1,
                                                                                  dtype=torch.long))
    num = torch.maximum(first + 1, torch.full_like(first, int(forced.sum())))
    return order, num


DELTAS = (0.2, 0.1, 0.05, 0.02)


def sample(q: Tensor, k: Tensor, v: Tensor, sm_scale: float, cfg: cal.CalibrationSettings, shifts: int,
           names: Sequence[str], deltas: Sequence[float] = DELTAS) -> Dict[str, Tuple[Tensor, Tensor, Tensor]]:
    """Every measurement of one decode query, per ranking: ``(error [shifts + 1], mass [shifts + 1], rule
    [len(deltas), 3])``.

    ``error`` and ``mass``: the layer output error and the worst head's dropped mass at budgets ``base << s``
    (``base`` = ``cfg.budget`` of the pages, at least sink + recent), the ranking filling the budget (``minmax``:
    PrHS's selection with ``cfg.delta``). ``rule``: per delta, (true worst-head dropped mass, fraction of the pages
    read, layer output error) of selecting by the ranking's estimated mass until the estimate is within delta
    (:func:`estimated_mass_selection`; ``minmax``: PrHS's delta rule on its bounds, every page as the budget).
    The dense output, the bounds and each ranking's estimate are computed once for both."""
    lens = page_lengths(k.shape[0], cfg.page_size, device=k.device)
    num_pages = lens.numel()
    base = cal._base_budget(num_pages, cfg)
    dense = dense_attention(q, k, v, sm_scale)
    ref = dense.norm()
    ub, lb = page_bounds(q, *page_summaries(k, cfg.page_size), sm_scale)

    def measure(pages: Tensor, num: Tensor) -> Tuple[float, float]:
        o = sparse_attention(q, k, v, cfg.page_size, pages, num, sm_scale)
        err = float((o - dense).norm() / ref) if ref > 0 else 0.0
        return err, float(exact_dropped_mass(q, k, cfg.page_size, pages, num, sm_scale).max())

    out = {}
    for name in names:
        bounds = RANKINGS[name][1] is None
        hm = None if bounds else head_scores(name, q, k, sm_scale, cfg.page_size)
        scores = None if bounds else _group_sum(hm, k.shape[1])
        curve = []
        for s in range(shifts + 1):
            b = scaled_budget(base, s, num_pages)
            sel = (select_pages(ub, lb, lens, cfg.delta, b, cfg.sink_pages, cfg.recent_pages) if bounds
                   else select_pages(scores, scores, lens, 0.0, b, cfg.sink_pages, cfg.recent_pages))
            curve.append(measure(sel.pages, sel.num_selected))
        rule = []
        for d in deltas:
            if bounds:
                sel = select_pages(ub, lb, lens, d, num_pages, cfg.sink_pages, cfg.recent_pages)
                pages, num = sel.pages, sel.num_selected
            elif name in SERVED_RULE:
                sel = select_pages_estimated(hm.log(), lens, k.shape[1], d, num_pages, cfg.sink_pages,
                                             cfg.recent_pages)
                pages, num = sel.pages, sel.num_selected
            else:
                pages, num = estimated_mass_selection(hm, k.shape[1], d, cfg.sink_pages, cfg.recent_pages)
            err, dropped = measure(pages, num)
            rule.append([dropped, float(num.double().mean()) / num_pages, err])
        c = torch.tensor(curve, dtype=torch.float64)                         # [S + 1, (error, mass)]
        out[name] = (c[:, 0], c[:, 1], torch.tensor(rule, dtype=torch.float64))
    return out


def reused_selection_rule(steps: Sequence[Tuple[Tensor, Tensor, Optional[Tensor]]], sm_scale: float, page_size: int,
                          interval: int, sink_pages: int, recent_pages: int,
                          deltas: Sequence[float] = DELTAS, dilation: int = 0) -> Tensor:
    """The served estimate's delta rule on a fresh selection every ``interval`` decode steps, the list reused in
    between, widened by ``dilation`` pages on each side of every kept page, with the pages created since appended
    (``--prhs-reselect-interval R --prhs-dilation X``). ``steps``: one
    layer's consecutive decode steps ``(q, k, v)``, step j attending ``k[: n + j + 1]``. Returns, for every reused
    step, per delta, ``(true worst-head dropped mass, fraction of the pages read)``: ``[reused steps, deltas, 2]``
    (empty with ``interval`` 1). Measures what an audit sampling only fresh steps cannot see."""
    rows = []
    fresh: Dict[float, Tuple[List[List[int]], int]] = {}
    for j, (q, k, _) in enumerate(steps):
        lens = page_lengths(k.shape[0], page_size, device=k.device)
        num_pages, h_kv = lens.numel(), k.shape[1]
        if j % interval == 0:
            est = _key4_served(q, k, sm_scale, page_size).log()
            for d in deltas:
                sel = select_pages_estimated(est, lens, h_kv, d, num_pages, sink_pages, recent_pages)
                fresh[d] = ([sel.pages[h, : int(sel.num_selected[h])].tolist() for h in range(h_kv)], num_pages)
            continue
        row = []
        for d in deltas:
            lists, npg_then = fresh[d]
            lists = [sorted({p + o for p in lst for o in range(-dilation, dilation + 1) if 0 <= p + o < npg_then})
                     + list(range(npg_then, num_pages)) for lst in lists]
            num = torch.tensor([len(x) for x in lists], dtype=torch.long, device=k.device)
            pages = torch.full((h_kv, max(1, int(num.max()))), -1, dtype=torch.long, device=k.device)
            for h, lst in enumerate(lists):
                pages[h, : len(lst)] = torch.tensor(lst, dtype=torch.long, device=k.device)
            dropped = float(exact_dropped_mass(q, k, page_size, pages, num, sm_scale).max())
            row.append([dropped, float(num.double().mean()) / num_pages])
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(deltas), 2)


# ------------------------------------------------------------------------------------------------ driver
def _needed_fraction(per_layer_q: List[List[float]], error: float, fractions: Sequence[float]) -> float:
    """Mean over layers of the smallest budget fraction whose error quantile is within ``error``."""
    need = []
    for row in per_layer_q:
        s = next((i for i, x in enumerate(row) if x <= error), len(row) - 1)
        need.append(fractions[s])
    return sum(need) / len(need)


def run(args) -> dict:
    cfg = cal.CalibrationSettings(page_size=args.page_size, budget=1 / 16, delta=0.05)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    model, tokenizer = cal._load(args.model_path, device)
    num_layers = model.config.num_hidden_layers
    shifts = cal.max_shift([n + args.answer_tokens for n in args.lengths], cfg)
    names = list(args.rankings)
    errs = {n: [[] for _ in range(num_layers)] for n in names}
    rule = {n: [] for n in names}
    masses = {n: [[] for _ in range(num_layers)] for n in names}
    reused: List[Tensor] = []
    prompts = []
    jobs = [(n, i) for n in args.lengths for i in range(args.num_prompts)]
    for j, (target, i) in enumerate(jobs):
        t1 = time.time()
        ids, key, value = cal.kv_retrieval_prompt(tokenizer, target, seed=target * 101 + i)
        answer, col = cal.generate_and_capture(model, tokenizer, ids, args.answer_tokens, device)
        text = tokenizer.decode(answer[: args.answer_tokens], skip_special_tokens=True)
        for layer in cal._progress(range(num_layers), args.no_progress, desc=f"prompt {j + 1}/{len(jobs)}",
                                   unit="layer", leave=False):
            steps = col.samples(layer)
            for q, k, v in steps:
                for n, (err, mass, rows) in sample(q, k, v, col.scale, cfg, shifts, names).items():
                    errs[n][layer].append(err)
                    masses[n][layer].append(mass)
                    rule[n].append(rows)
            if args.reselect_interval > 1:
                reused.append(reused_selection_rule(steps, col.scale, cfg.page_size, args.reselect_interval,
                                                    cfg.sink_pages, cfg.recent_pages, dilation=args.dilation))
        prompts.append({"target_tokens": target, "prompt_tokens": len(ids), "answer": text,
                        "correct": value in text, "seconds": round(time.time() - t1, 1)})
        print(f"[page_estimators] prompt {j + 1}/{len(jobs)}: {len(ids)} tokens, answer {text!r} "
              f"({'correct' if value in text else 'expected ' + value}), {time.time() - t1:.0f}s",
              file=sys.stderr, flush=True)
        del col
    fractions = [min(1.0, cfg.budget * (1 << s)) for s in range(shifts + 1)]
    summary = {}
    for n in names:
        e = [torch.stack(x) for x in errs[n]]                                # per layer [samples, S + 1]
        m = [torch.stack(x) for x in masses[n]]
        q_layer = [[float(torch.quantile(x[:, s], args.quantile)) for s in range(shifts + 1)] for x in e]
        summary[n] = {
            "cost_kv_fraction": RANKINGS[n][0](model.config.hidden_size // model.config.num_attention_heads,
                                               cfg.page_size),
            "error_mean": [float(torch.stack([x[:, s].mean() for x in e]).mean()) for s in range(shifts + 1)],
            "error_quantile_worst_layer": [max(r[s] for r in q_layer) for s in range(shifts + 1)],
            "mass_mean": [float(torch.stack([x[:, s].mean() for x in m]).mean()) for s in range(shifts + 1)],
            "needed_fraction": _needed_fraction(q_layer, args.error, fractions),
            "error_quantile_per_layer": q_layer,
        }
        r = torch.stack(rule[n])                                             # [samples x layers, deltas, 3]
        summary[n]["delta_rule"] = [
            {"delta": d, "within_delta": float((r[:, i, 0] <= d).double().mean()),
             "dropped_mean": float(r[:, i, 0].mean()), "pages_read": float(r[:, i, 1].mean()),
             "error_mean": float(r[:, i, 2].mean()),
             "error_quantile": float(torch.quantile(r[:, i, 2], args.quantile))}
            for i, d in enumerate(DELTAS)]
    reuse = None
    if reused:
        r = torch.cat(reused)                                                # [reused steps x layers, deltas, 2]
        reuse = {"reselect_interval": args.reselect_interval, "dilation": args.dilation, "ranking": "key4-served",
                 "reused_steps": r.shape[0],
                 "delta_rule": [{"delta": d, "within_delta": float((r[:, i, 0] <= d).double().mean()),
                                 "dropped_mean": float(r[:, i, 0].mean()),
                                 "dropped_p99": float(torch.quantile(r[:, i, 0], 0.99)),
                                 "pages_read": float(r[:, i, 1].mean())} for i, d in enumerate(DELTAS)]}
    return {"command": " ".join(["python -m benchmarks.page_estimators"] + sys.argv[1:]),
            "device": device, "wall_s": round(time.time() - t0, 1), "model": cal._model_name(args.model_path),
            "page_size": cfg.page_size, "budget_fractions": fractions, "quantile": args.quantile,
            "error": args.error, "samples_per_layer": len(errs[names[0]][0]), "prompts": prompts,
            "rankings": summary, "reused_lists": reuse}


def table(res: dict) -> str:
    fr = res["budget_fractions"]
    head = ("| ranking | estimate reads (of K+V) | " + " | ".join(f"error @ {f:g}" for f in fr)
            + f" | worst layer q{res['quantile']:g} @ 1/4 | pages for error <= {res['error']:g} | total read |")
    lines = [head, "|" + "---|" * (len(fr) + 5)]
    i4 = fr.index(0.25) if 0.25 in fr else 0
    for n, s in res["rankings"].items():
        total = s["cost_kv_fraction"] + s["needed_fraction"]
        lines.append(f"| {n} | {100 * s['cost_kv_fraction']:.1f} % | "
                     + " | ".join(f"{x:.3f}" for x in s["error_mean"])
                     + f" | {s['error_quantile_worst_layer'][i4]:.3f} | {100 * s['needed_fraction']:.1f} % "
                     + f"| {'-' if n == 'oracle' else f'{100 * total:.1f} %'} |")
    lines += ["", "Selection by estimated mass until it is within delta (no budget): share of samples whose true "
              "worst-head dropped mass is within delta / pages read / mean layer error", "",
              "| ranking | " + " | ".join(f"delta {d:g}" for d in DELTAS) + " |", "|" + "---|" * (len(DELTAS) + 1)]
    for n, s in res["rankings"].items():
        lines.append(f"| {n} | " + " | ".join(f"{100 * x['within_delta']:.0f} % / {100 * x['pages_read']:.0f} % / "
                                              f"{x['error_mean']:.3f}" for x in s["delta_rule"]) + " |")
    reuse = res.get("reused_lists")
    if reuse:
        lines += ["", f"key4-served lists reused between fresh selections every {reuse['reselect_interval']} steps, "
                      f"dilation {reuse.get('dilation', 0)} ({reuse['reused_steps']} reused steps x layers): within "
                      "delta / mean dropped / pages read", "",
                  "| " + " | ".join(f"delta {x['delta']:g}" for x in reuse["delta_rule"]) + " |",
                  "|" + "---|" * len(reuse["delta_rule"]),
                  "| " + " | ".join(f"{100 * x['within_delta']:.0f} % / {x['dropped_mean']:.3f} / "
                                    f"{100 * x['pages_read']:.0f} %" for x in reuse["delta_rule"]) + " |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[8192])
    p.add_argument("--num-prompts", type=int, default=3)
    p.add_argument("--answer-tokens", type=int, default=8, help="decode samples per prompt and layer")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--quantile", type=float, default=0.9)
    p.add_argument("--error", type=float, default=0.1, help="layer output error a layer's budget must keep")
    p.add_argument("--rankings", type=lambda x: x.split(","), default=list(RANKINGS),
                   help=f"comma-separated subset of {','.join(RANKINGS)}")
    p.add_argument("--reselect-interval", type=int, default=0,
                   help="also measure the served estimate's lists reused between fresh selections every R decode "
                        "steps (--prhs-reselect-interval R, dilation 0): true dropped mass on the reused steps")
    p.add_argument("--dilation", type=int, default=0,
                   help="with --reselect-interval: widen each reused list by this many pages on each side of every "
                        "kept page (--prhs-dilation)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    unknown = [r for r in args.rankings if r not in RANKINGS]
    if unknown or not args.rankings:
        p.error(f"--rankings: unknown {unknown}; known: {list(RANKINGS)}")
    if not (0 < args.quantile <= 1) or args.error <= 0 or args.num_prompts < 1 or args.answer_tokens < 1:
        p.error("--quantile in (0, 1], --error > 0, --num-prompts >= 1, --answer-tokens >= 1")
    res = run(args)
    print(table(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
