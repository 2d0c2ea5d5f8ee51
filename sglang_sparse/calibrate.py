"""Per-layer PrHS budget calibration: how many pages the key-bound ranking needs to keep a quality measure
(by default the dropped attention mass) under delta, measured on a model's own decode queries.

    python -m sglang_sparse.calibrate --model-path DIR [--device cpu|cuda] [--prompt-lens 8192,16384]
        [--num-prompts N] [--page-size 64] [--budget 1/16] [--delta 0.05] [--quantile 0.9]
        [--measure mass|mass-mean|output-error|output-error-layer] [--claa on|off] [--claa-recall 0.9]
        [--claa-keep-ratios 0.1,0.2,0.4] [--claa-num-layers 4] [--answer-tokens 16] [--seed 0]
        [--out PROFILE.json] [--results RESULTS.json]

Method. For each prompt length, N synthetic key-value retrieval prompts (lines ``key <id>: value <number>``
from a seeded RNG, then a question about one key, in the model's chat template when it has one) are
answered greedily by ``model.generate``. The generation runs with the capturing attention of
:mod:`sglang_sparse.capture`: at each decode step it records every layer's post-RoPE query of the token
being fed (an answer token at position ``pos``) and the KV cache it attends over, keys and values
``[0, pos]``. The first ``--answer-tokens`` answer tokens are the decode samples.

For each sample and layer (``n`` keys, pages of P tokens, ``N = ceil(n / P)`` pages), with the server's
sink and recent pages (:class:`sglang_sparse.config.PrhsConfig`):

* budget at shift s: ``scaled_budget(page_budget(N, budget, sink, recent), s, N)`` pages (the audit
  feedback's ``budget << s``), s = 0..S_max, where S_max is the first shift that reaches every page for
  every sample;
* bound ranking: :func:`~sglang_sparse.prhs.select_pages` on the key min/max bounds
  (:func:`~sglang_sparse.prhs.page_bounds`), with ``--delta`` as the server's selection cut (it stops
  adding pages once its certified bound is <= delta, so at S_max it may keep fewer than every page, and
  then drops at most delta);
* oracle ranking: the same forced sink/recent pages, then the other pages by their true attention mass
  summed over the KV group's query heads, filling the budget;
* measures of each selection (:func:`sample_measures`), per query head h:

  - dropped mass ``delta_h``: :func:`~sglang_sparse.prhs.exact_dropped_mass`;
  - output error ``e_h = ||o_sparse[h] - o_dense[h]|| / ||o_dense[h]||`` (:func:`output_error`), o_sparse the
    softmax attention over the selected pages' tokens only, renormalised over them
    (:func:`~sglang_sparse.prhs.sparse_attention`), o_dense over all the keys
    (:func:`~sglang_sparse.prhs.dense_attention`);

  a sample's ``mass`` is ``max_h delta_h`` (as the server's audit reports it), ``mass-mean`` is
  ``mean_h delta_h``, ``output-error`` is ``max_h e_h``, ``output-error-mean`` is ``mean_h e_h``, and
  ``output-error-layer`` is the relative error of the layer's whole attention output, all its query heads
  concatenated (what the output projection sees):
  ``sqrt(sum_h ||o_sparse[h] - o_dense[h]||^2) / sqrt(sum_h ||o_dense[h]||^2)``
  (:func:`~sglang_sparse.prhs.layer_error`; between the norm-weighted mean and the max of ``e_h``).

Per layer, shift and curve the ``--quantile`` order statistic of the samples' values is reported: the
smallest value v with at least ``ceil(quantile * samples)`` samples <= v. The chosen shift of a layer is
the smallest s whose quantile value of the ``--measure`` curve (bound ranking) is <= delta, i.e. that
measure <= delta on at least ``quantile`` of the samples (S_max, every page, when no smaller shift does).

By construction the oracle ranking keeps at least as much group-summed mass as any selection of the same
size that holds the forced pages, so its dropped mass summed (or averaged) over a group's query heads is never
above the bound ranking's. That does not hold per query head, nor for the max over heads.

CLAA (``--claa on``, the default). During each prompt's prefill the capture also computes every layer's
:func:`~sglang_sparse.claa.window_scores` (the server's window and pooling, :class:`ClaaConfig`); the
answer-informed oracle is :func:`~sglang_sparse.answer_oracle.oracle_importance` of the decode samples'
queries over the prompt keys (mean over the answer tokens of the max over layers and heads of the
attention, softmax over the prompt only). For each filter layer f = 1 .. L-1 and keep ratio r the prompt's
mass recall of CLAA's ranking (:func:`~sglang_sparse.claa.aggregate_max` over the ``--claa-num-layers``
layers before f) is :func:`~sglang_sparse.answer_oracle.ranking_metrics`' ``recall@r``
(:func:`claa_recalls`). The choice (:func:`choose_claa`): the earliest f >= ``--claa-num-layers`` (the server
needs that many layers before the filter layer) at which some r reaches ``--claa-recall`` on at least
``--quantile`` of the prompts, then the smallest such r; the profile's ``claa`` is
``{"filter_layer", "keep_ratio", "recall"}`` (the quantile recall), or null when no pair reaches it.

Writes the profile (``--out``; schema in :func:`build_profile`; ``prhs.measure`` names the measure the
shifts were chosen by) and, with ``--results``, the full measurement with the command line and the wall
time: ``measures`` holds every curve's per-layer statistics (:func:`summarise`), ``per_layer`` those of
``--measure``, ``claa`` the recall tables (quantile, mean and per prompt, ``[f - 1][r]``) and the choice.
A missing or invalid ``--model-path`` (or another bad flag value) exits with status 2 and one line
``python -m sglang_sparse.calibrate: error: ...`` before anything is loaded. Never downloads: the model is
loaded with ``local_files_only=True``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from flashinfer_ext.params import page_budget
from sglang_sparse.answer_oracle import oracle_importance, ranking_metrics
from sglang_sparse.capture import Capturing
from sglang_sparse.claa import aggregate_max, default_claa_layers, window_scores
from sglang_sparse.config import ClaaConfig, PrhsConfig
from sglang_sparse.prhs import (
    _logits,
    dense_attention,
    exact_dropped_mass,
    page_bounds,
    page_lengths,
    page_summaries,
    scaled_budget,
    select_pages,
    sparse_attention,
)

__all__ = [
    "PROG",
    "CalibrationSettings",
    "max_shift",
    "sample_dropped",
    "output_error",
    "sample_measures",
    "MEASURES",
    "CURVES",
    "quantile_value",
    "choose_shift",
    "build_profile",
    "ClaaSettings",
    "claa_recalls",
    "recall_quantile",
    "choose_claa",
    "kv_retrieval_prompt",
    "main",
]

PROG = "python -m sglang_sparse.calibrate"
FORMAT = 1
DEFAULT_PAGE_SIZE = 64
# what the per-layer shift choice compares with delta (--measure)
MEASURES = ("mass", "mass-mean", "output-error", "output-error-layer")
# every per-sample curve measured: the measures, and the output error averaged over the query heads
CURVES = ("mass", "mass-mean", "output-error", "output-error-mean", "output-error-layer")


@dataclass(frozen=True)
class CalibrationSettings:
    """What one calibration measures; defaults are the server's (:class:`PrhsConfig`)."""

    page_size: int = DEFAULT_PAGE_SIZE
    budget: float = 1 / 16
    delta: float = PrhsConfig.delta
    quantile: float = 0.9
    sink_pages: int = PrhsConfig.sink_pages
    recent_pages: int = PrhsConfig.recent_pages
    measure: str = "mass"


@dataclass(frozen=True)
class ClaaSettings:
    """What the CLAA calibration measures; the scoring defaults are the server's (:class:`ClaaConfig`)."""

    keep_ratios: Tuple[float, ...] = (0.1, 0.2, 0.4)
    recall: float = 0.9
    quantile: float = 0.9
    window: int = ClaaConfig.window
    num_layers: int = ClaaConfig.num_layers
    pool_kernel: int = ClaaConfig.pool_kernel


# --------------------------------------------------------------------------- measurement
def _base_budget(num_pages: int, cfg: CalibrationSettings) -> int:
    return page_budget(num_pages, cfg.budget, cfg.sink_pages, cfg.recent_pages)


def max_shift(num_keys: Sequence[int], cfg: CalibrationSettings) -> int:
    """The first shift s at which ``budget << s`` reaches every page for every context length in ``num_keys``."""
    worst = 0
    for n in num_keys:
        num_pages = -(-n // cfg.page_size)
        base = _base_budget(num_pages, cfg)
        s = 0
        while scaled_budget(base, s, num_pages) < num_pages:
            s += 1
        worst = max(worst, s)
    return worst


def _group_page_mass(q: Tensor, k: Tensor, page_size: int, sm_scale: float) -> Tensor:
    """True attention mass of every page summed over each KV group's query heads: ``[H_kv, N]``."""
    h_q, h_kv = q.shape[0], k.shape[1]
    probs = torch.softmax(_logits(q, k, sm_scale), dim=-1)                  # [H_q, n]
    n = k.shape[0]
    num_pages = -(-n // page_size)
    pad = num_pages * page_size - n
    if pad:
        probs = torch.cat([probs, probs.new_zeros(h_q, pad)], dim=1)
    per_head = probs.reshape(h_q, num_pages, page_size).sum(dim=-1)         # [H_q, N]
    return per_head.reshape(h_kv, h_q // h_kv, num_pages).sum(dim=1)


def _selections(q: Tensor, k: Tensor, sm_scale: float, cfg: CalibrationSettings, shifts: int):
    """``(bound, oracle)`` page selections of one decode query at budget shifts ``0..shifts`` (see the module)."""
    n = k.shape[0]
    lens = page_lengths(n, cfg.page_size, device=k.device)
    num_pages = lens.numel()
    base = _base_budget(num_pages, cfg)
    kmin, kmax = page_summaries(k, cfg.page_size)
    ub, lb = page_bounds(q, kmin, kmax, sm_scale)
    mass = _group_page_mass(q, k, cfg.page_size, sm_scale)
    out = []
    for s in range(shifts + 1):
        b = scaled_budget(base, s, num_pages)
        sel = select_pages(ub, lb, lens, cfg.delta, b, cfg.sink_pages, cfg.recent_pages)
        osel = select_pages(mass, mass, lens, 0.0, b, cfg.sink_pages, cfg.recent_pages)
        out.append((sel, osel))
    return out


def sample_dropped(q: Tensor, k: Tensor, sm_scale: float, cfg: CalibrationSettings, shifts: int,
                   per_head: bool = False) -> Tuple[Tensor, Tensor]:
    """Dropped mass of one decode query at budget shifts ``0..shifts``: ``(bound, oracle)``, each
    ``[shifts + 1]`` (the max over query heads), or ``[shifts + 1, H_q]`` with ``per_head``.

    q ``[H_q, D]`` post-RoPE, k ``[n, H_kv, D]`` the keys it attends over (itself included).
    """
    bound, oracle = [], []
    for sel, osel in _selections(q, k, sm_scale, cfg, shifts):
        bound.append(exact_dropped_mass(q, k, cfg.page_size, sel.pages, sel.num_selected, sm_scale))
        oracle.append(exact_dropped_mass(q, k, cfg.page_size, osel.pages, osel.num_selected, sm_scale))
    bound_t, oracle_t = torch.stack(bound), torch.stack(oracle)            # [S + 1, H_q]
    if per_head:
        return bound_t, oracle_t
    return bound_t.amax(dim=1), oracle_t.amax(dim=1)


def output_error(q: Tensor, k: Tensor, v: Tensor, page_size: int, pages: Tensor, num_selected: Tensor,
                 sm_scale: float, dense: Optional[Tensor] = None) -> Tensor:
    """Relative attention-output error of a page selection, per query head: ``[H_q]``,
    ``||o_sparse - o_dense|| / ||o_dense||`` with o_sparse the softmax attention over the selected pages'
    tokens only (renormalised over them, :func:`~sglang_sparse.prhs.sparse_attention`) and o_dense over all
    n keys (:func:`~sglang_sparse.prhs.dense_attention`, or ``dense`` when given). A head whose dense output
    is 0 gets 0 if its sparse output is 0 too, else inf."""
    if dense is None:
        dense = dense_attention(q, k, v, sm_scale)
    sparse = sparse_attention(q, k, v, page_size, pages, num_selected, sm_scale)
    return _relative((sparse - dense).norm(dim=-1), dense.norm(dim=-1))


def _relative(diff: Tensor, ref: Tensor) -> Tensor:
    """``diff / ref``; 0 where both are 0, inf where only ref is."""
    return torch.where(ref > 0, diff / ref.clamp_min(torch.finfo(ref.dtype).tiny),
                       torch.where(diff > 0, torch.full_like(diff, math.inf), torch.zeros_like(diff)))


def sample_measures(q: Tensor, k: Tensor, v: Tensor, sm_scale: float, cfg: CalibrationSettings,
                    shifts: int) -> Dict[str, Tuple[Tensor, Tensor]]:
    """Every curve of :data:`CURVES` for one decode query at budget shifts ``0..shifts``:
    ``{curve: (bound [shifts + 1], oracle [shifts + 1])}``, for the same selections as :func:`sample_dropped`.

    ``mass``: dropped mass, max over query heads; ``mass-mean``: its mean over query heads; ``output-error``:
    :func:`output_error`, max over query heads; ``output-error-mean``: its mean over query heads;
    ``output-error-layer``: the relative error of all the query heads' outputs together
    (``||o_sparse - o_dense|| / ||o_dense||`` over ``[H_q, Dv]``).
    q ``[H_q, D]``, k ``[n, H_kv, D]``, v ``[n, H_kv, Dv]``.
    """
    dense = dense_attention(q, k, v, sm_scale)
    ref = dense.norm(dim=-1)                                                # [H_q]
    rows = {"mass": ([], []), "error": ([], []), "layer": ([], [])}
    for sel, osel in _selections(q, k, sm_scale, cfg, shifts):
        for i, x in enumerate((sel, osel)):
            rows["mass"][i].append(exact_dropped_mass(q, k, cfg.page_size, x.pages, x.num_selected, sm_scale))
            diff = (sparse_attention(q, k, v, cfg.page_size, x.pages, x.num_selected, sm_scale) - dense).norm(dim=-1)
            rows["error"][i].append(_relative(diff, ref))
            rows["layer"][i].append(_relative(diff.square().sum().sqrt(), ref.square().sum().sqrt()))
    mass = [torch.stack(x) for x in rows["mass"]]                          # [S + 1, H_q] each
    err = [torch.stack(x) for x in rows["error"]]
    layer = [torch.stack(x) for x in rows["layer"]]                        # [S + 1] each
    return {"mass": (mass[0].amax(dim=1), mass[1].amax(dim=1)),
            "mass-mean": (mass[0].mean(dim=1), mass[1].mean(dim=1)),
            "output-error": (err[0].amax(dim=1), err[1].amax(dim=1)),
            "output-error-mean": (err[0].mean(dim=1), err[1].mean(dim=1)),
            "output-error-layer": (layer[0], layer[1])}


def quantile_value(values: Sequence[float], quantile: float) -> float:
    """The smallest v with at least ``ceil(quantile * len(values))`` of ``values`` <= v."""
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("no samples")
    idx = min(len(vals), max(1, math.ceil(quantile * len(vals) - 1e-9)))
    return vals[idx - 1]


def choose_shift(quantile_by_shift: Sequence[float], delta: float) -> int:
    """The smallest s with ``quantile_by_shift[s] <= delta``; the last shift (every page) when none is."""
    for s, v in enumerate(quantile_by_shift):
        if v <= delta:
            return s
    return len(quantile_by_shift) - 1


def summarise(bound: List[Tensor], oracle: List[Tensor], cfg: CalibrationSettings) -> dict:
    """Per-layer statistics from per-layer ``[samples, S + 1]`` values of one curve (e.g. the dropped mass, max
    over heads); ``shift`` is each layer's :func:`choose_shift` of the bound ranking's quantile values."""
    out = {"bound_quantile": [], "oracle_quantile": [], "bound_mean": [], "oracle_mean": [],
           "bound_over_delta": [], "oracle_over_delta": [], "shift": []}
    for b, o in zip(bound, oracle):
        bq = [quantile_value(b[:, s].tolist(), cfg.quantile) for s in range(b.shape[1])]
        oq = [quantile_value(o[:, s].tolist(), cfg.quantile) for s in range(o.shape[1])]
        out["bound_quantile"].append(bq)
        out["oracle_quantile"].append(oq)
        out["bound_mean"].append([float(x) for x in b.double().mean(dim=0)])
        out["oracle_mean"].append([float(x) for x in o.double().mean(dim=0)])
        out["bound_over_delta"].append([float(x) for x in (b > cfg.delta).double().mean(dim=0)])
        out["oracle_over_delta"].append([float(x) for x in (o > cfg.delta).double().mean(dim=0)])
        out["shift"].append(choose_shift(bq, cfg.delta))
    return out


def claa_recalls(layer_window_scores: Sequence[Tensor], oracle: Tensor, ccfg: ClaaSettings) -> List[List[float]]:
    """Mass recall of CLAA's ranking against the answer-informed oracle for one prompt:
    ``[filter layer f - 1][keep ratio]`` for f = 1 .. L - 1 (NaN read as 0).

    ``layer_window_scores[l]``: :func:`~sglang_sparse.claa.window_scores` of layer l's prompt ``[H_kv, S]``; the
    ranking at filter layer f is :func:`~sglang_sparse.claa.aggregate_max` over
    :func:`~sglang_sparse.claa.default_claa_layers` ``(L, f, num_layers)``; the recall is
    :func:`~sglang_sparse.answer_oracle.ranking_metrics`' ``recall@r`` (window tokens left out of both)."""
    num_layers = len(layer_window_scores)
    table = []
    for f in range(1, num_layers):
        span = [layer_window_scores[l] for l in default_claa_layers(num_layers, f, ccfg.num_layers)]
        got = ranking_metrics(aggregate_max(span), oracle, ccfg.window, ccfg.keep_ratios)
        row = [got[f"recall@{r:g}"] for r in ccfg.keep_ratios]
        table.append([0.0 if math.isnan(x) else float(x) for x in row])
    return table


def recall_quantile(values: Sequence[float], quantile: float) -> float:
    """The largest v with at least ``ceil(quantile * len(values))`` of ``values`` >= v."""
    return -quantile_value([-float(x) for x in values], quantile)


def choose_claa(recalls: Tensor, ccfg: ClaaSettings) -> Tuple[Optional[dict], List[List[float]]]:
    """CLAA's filter layer and keep ratio from per-prompt recalls ``[prompts, L - 1, len(keep_ratios)]`` (row i is
    filter layer i + 1): the earliest filter layer f >= ``ccfg.num_layers`` (the server needs that many layers
    before it) at which some keep ratio reaches ``ccfg.recall`` on at least ``ccfg.quantile`` of the prompts
    (:func:`recall_quantile`), then the smallest such keep ratio. Returns (``{"filter_layer", "keep_ratio",
    "recall"}`` or None when no pair reaches it, the quantile table ``[L - 1][len(keep_ratios)]``)."""
    table = [[recall_quantile(recalls[:, i, j].tolist(), ccfg.quantile) for j in range(recalls.shape[2])]
             for i in range(recalls.shape[1])]
    order = sorted(range(len(ccfg.keep_ratios)), key=lambda j: ccfg.keep_ratios[j])
    for i, row in enumerate(table):
        f = i + 1
        if f < ccfg.num_layers:
            continue
        for j in order:
            if row[j] >= ccfg.recall:
                return {"filter_layer": f, "keep_ratio": float(ccfg.keep_ratios[j]), "recall": row[j]}, table
    return None, table


def build_profile(*, model: str, num_layers: int, num_kv_heads: int, head_dim: int, cfg: CalibrationSettings,
                  created_by: str, device: str, prompt_lens: Sequence[int], num_prompts: int, stats: dict,
                  claa: Optional[dict] = None) -> dict:
    """The profile JSON (format 1); ``stats``: ``{curve: summarise(...)}`` for every curve of :data:`CURVES`.
    The shifts are those of ``cfg.measure``; the measurements are the dropped mass (max over heads). ``claa``:
    :func:`choose_claa`'s choice, or None."""
    chosen, mass = stats[cfg.measure], stats["mass"]
    return {
        "format": FORMAT,
        "model": model,
        "num_layers": num_layers,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "page_size": cfg.page_size,
        "created_by": created_by,
        "device": device,
        "prompt_lens": list(prompt_lens),
        "num_prompts": num_prompts,
        "prhs": {"budget": float(cfg.budget), "delta": float(cfg.delta), "quantile": float(cfg.quantile),
                 "measure": cfg.measure, "layer_budget_shift": list(chosen["shift"])},
        "claa": claa,
        "measurements": {
            "prhs_dropped_by_shift": {"bound": mass["bound_quantile"], "oracle": mass["oracle_quantile"]},
            "mean_bound_dropped": [row[0] for row in mass["bound_mean"]],
        },
    }


# --------------------------------------------------------------------------- prompts
_SYLLABLES = ("ba", "ko", "ri", "mu", "te", "sa", "lo", "ni", "ve", "du", "ga", "pi", "zo", "fe", "hu", "ya")


def _word_id(rng: random.Random) -> str:
    word = "".join(rng.choice(_SYLLABLES) for _ in range(3))
    return f"{word}-{rng.randrange(100, 1000)}"


def _encode(tokenizer, text: str) -> List[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(text)["input_ids"])


def kv_retrieval_prompt(tokenizer, target_tokens: int, seed: int) -> Tuple[List[int], str, str]:
    """A key-value retrieval prompt of at most ``target_tokens`` tokens (as close as whole lines allow):
    ``(input ids, the asked key, its value)``. Deterministic for a seed."""
    rng = random.Random(seed)
    head = "Below is a list of keys and their values. Remember them; a question follows.\n\n"
    lines, keys = [], set()

    def add_lines(count):
        while count > 0:
            key = _word_id(rng)
            if key in keys:
                continue
            keys.add(key)
            lines.append((key, str(rng.randrange(10000, 100000))))
            count -= 1

    def text_of(num_lines, ask):
        body = "".join(f"key {k}: value {v}\n" for k, v in lines[:num_lines])
        return head + body + f"\nWhat is the value of key {ask}? Answer with the number only."

    add_lines(64)
    per_line = max(1.0, (len(_encode(tokenizer, text_of(64, lines[0][0]))) -
                         len(_encode(tokenizer, text_of(0, lines[0][0])))) / 64)
    add_lines(max(0, int(target_tokens / per_line * 1.05) - len(lines)))
    hi = len(lines)
    lo = 1
    # largest line count whose prompt fits; the asked key is drawn from those lines afterwards
    probe = lines[0][0]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(_encode(tokenizer, text_of(mid, probe))) <= target_tokens:
            lo = mid
        else:
            hi = mid - 1
    count = lo
    key, value = lines[rng.randrange(count)]
    ids = _encode(tokenizer, text_of(count, key))
    while len(ids) > target_tokens and count > 1:              # a longer asked key than the probe's
        count -= 1
        if lines.index((key, value)) >= count:
            key, value = lines[rng.randrange(count)]
        ids = _encode(tokenizer, text_of(count, key))
    return ids, key, value


# --------------------------------------------------------------------------- capture during decode
class DecodeCollector:
    """Callback of :class:`~sglang_sparse.capture.Capturing` (with values) during ``generate``: per layer the
    decode queries ``[H_q, D]`` of the first ``max_steps`` decode steps and the latest KV cache keys and values;
    with ``claa``, also each layer's CLAA window scores of the prompt (:func:`~sglang_sparse.claa.window_scores`,
    ``[H_kv, S]``) from the prefill."""

    def __init__(self, prompt_len: int, max_steps: int, claa: Optional[ClaaSettings] = None):
        self.prompt_len, self.max_steps, self.claa = prompt_len, max_steps, claa
        self.window_scores: Dict[int, Tensor] = {}
        self.queries: Dict[int, List[Tensor]] = {}
        self.keys: Dict[int, Tensor] = {}
        self.values: Dict[int, Tensor] = {}
        self.scale: Optional[float] = None

    def __call__(self, layer, query, key, scale, value=None):
        if query.shape[2] != 1:                          # the prefill
            if self.claa is not None:
                c = self.claa
                self.window_scores[layer] = window_scores(
                    query[0].transpose(0, 1).float(), key[0, :, : self.prompt_len].transpose(0, 1).float(),
                    c.window, c.pool_kernel, "avg", sm_scale=scale).cpu()
            return
        got = self.queries.setdefault(layer, [])
        if len(got) >= self.max_steps:
            return
        got.append(query[0, :, 0].detach().clone())
        need = self.prompt_len + len(got)
        if key.shape[2] < need:
            raise RuntimeError(f"layer {layer}: the cache holds {key.shape[2]} keys, expected at least {need}")
        self.keys[layer] = key[0, :, :need].transpose(0, 1)           # [n, H_kv, D], a view of the cache
        if value is not None:
            self.values[layer] = value[0, :, :need].transpose(0, 1)   # [n, H_kv, Dv], a view of the cache
        self.scale = scale

    def samples(self, layer: int) -> List[Tuple[Tensor, Tensor, Optional[Tensor]]]:
        """``(q [H_q, D], k [n, H_kv, D], v [n, H_kv, Dv] or None)`` per decode step: step i attends keys
        ``[0, prompt_len + i]``."""
        k = self.keys[layer].float()
        v = self.values[layer].float() if layer in self.values else None
        n = self.prompt_len
        return [(q.float(), k[: n + i + 1], None if v is None else v[: n + i + 1])
                for i, q in enumerate(self.queries[layer])]

    def oracle(self) -> Tensor:
        """The answer-informed oracle importance of the prompt tokens ``[S]`` from the captured answer queries
        (:func:`~sglang_sparse.answer_oracle.oracle_importance`)."""
        pairs = [(torch.stack(self.queries[l]).float(), self.keys[l][: self.prompt_len].float())
                 for l in sorted(self.queries)]
        return oracle_importance(pairs, self.scale).cpu()


@torch.no_grad()
def generate_and_capture(model, tokenizer, ids: List[int], answer_tokens: int, device,
                         claa: Optional[ClaaSettings] = None) -> Tuple[List[int], DecodeCollector]:
    """Greedy answer (one token more than ``answer_tokens``, so that each answer token is fed as a decode query)
    and the captured decode queries, keys and values (and CLAA's window scores with ``claa``)."""
    col = DecodeCollector(len(ids), answer_tokens, claa)
    inp = torch.tensor([ids], device=device)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    with Capturing(model, col, values=True):
        gen = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=answer_tokens + 1,
                             do_sample=False, pad_token_id=pad)
    return gen[0, len(ids):].tolist(), col


# --------------------------------------------------------------------------- CLI
def _fail(message: str):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", required=True, help="local Hugging Face model directory (causal LM)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--prompt-lens", default="8192,16384", help="comma-separated prompt lengths in tokens")
    p.add_argument("--num-prompts", type=int, default=4, help="prompts per length")
    p.add_argument("--answer-tokens", type=int, default=16, help="answer tokens used as decode queries")
    p.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE)
    p.add_argument("--budget", default="1/16", help="base page budget: a fraction like 1/16 or a page count")
    p.add_argument("--delta", type=float, default=PrhsConfig.delta)
    p.add_argument("--quantile", type=float, default=0.9)
    p.add_argument("--measure", default="mass", choices=MEASURES,
                   help="what each layer's shift choice compares with --delta: the dropped mass of the worst query "
                        "head (mass), the dropped mass averaged over query heads (mass-mean), or the relative "
                        "attention-output error of the worst query head (output-error), or the relative error of "
                        "the layer's attention output over all its query heads (output-error-layer)")
    p.add_argument("--claa", default="on", choices=("on", "off"),
                   help="also choose CLAA's filter layer and keep ratio (off: the profile's claa is null)")
    p.add_argument("--claa-recall", type=float, default=0.9,
                   help="mass recall against the answer-informed oracle CLAA must reach on --quantile of the prompts")
    p.add_argument("--claa-keep-ratios", default="0.1,0.2,0.4", help="comma-separated candidate keep ratios")
    p.add_argument("--claa-num-layers", type=int, default=ClaaConfig.num_layers,
                   help="layers aggregated before the filter layer (the server's --claa-num-layers); the filter "
                        "layer is chosen from this layer on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="profile JSON (default: <model dir name>.json here)")
    p.add_argument("--results", default=None, help="also write the full measurement here")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _validate(args: argparse.Namespace) -> Tuple[CalibrationSettings, List[int], Optional[ClaaSettings]]:
    path = args.model_path
    if not os.path.isdir(path):
        _fail(f"--model-path: {path!r} is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        _fail(f"--model-path: {path!r} has no config.json (not a Hugging Face model directory)")
    try:
        budget = float(Fraction(args.budget.strip()))
    except (ValueError, ZeroDivisionError):
        _fail(f"--budget: expected a fraction like 1/16 or a page count, got {args.budget!r}")
    if not (budget > 0 and (budget <= 1 or budget.is_integer())):
        _fail(f"--budget: must be a fraction in (0, 1] or a whole page count, got {args.budget!r}")
    try:
        lens = [int(x) for x in args.prompt_lens.split(",") if x.strip()]
    except ValueError:
        _fail(f"--prompt-lens: expected comma-separated integers, got {args.prompt_lens!r}")
    if not lens or any(n < 64 for n in lens):
        _fail(f"--prompt-lens: need at least one length, each >= 64, got {args.prompt_lens!r}")
    if args.num_prompts < 1:
        _fail(f"--num-prompts: must be >= 1, got {args.num_prompts}")
    if args.answer_tokens < 1:
        _fail(f"--answer-tokens: must be >= 1, got {args.answer_tokens}")
    if args.page_size < 1:
        _fail(f"--page-size: must be >= 1, got {args.page_size}")
    if not 0 <= args.delta < 1:
        _fail(f"--delta: must be in [0, 1), got {args.delta}")
    if not 0 < args.quantile <= 1:
        _fail(f"--quantile: must be in (0, 1], got {args.quantile}")
    if args.device == "cuda" and not torch.cuda.is_available():
        _fail("--device: cuda requested but no CUDA device is available")
    try:
        ratios = tuple(sorted(float(x) for x in args.claa_keep_ratios.split(",") if x.strip()))
    except ValueError:
        _fail(f"--claa-keep-ratios: expected comma-separated fractions, got {args.claa_keep_ratios!r}")
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        _fail(f"--claa-keep-ratios: each must be in (0, 1], got {args.claa_keep_ratios!r}")
    if not 0 < args.claa_recall <= 1:
        _fail(f"--claa-recall: must be in (0, 1], got {args.claa_recall}")
    if args.claa_num_layers < 1:
        _fail(f"--claa-num-layers: must be >= 1, got {args.claa_num_layers}")
    cfg = CalibrationSettings(page_size=args.page_size, budget=budget, delta=args.delta, quantile=args.quantile,
                              measure=args.measure)
    ccfg = None
    if args.claa == "on":
        ccfg = ClaaSettings(keep_ratios=ratios, recall=args.claa_recall, quantile=args.quantile,
                            num_layers=args.claa_num_layers)
    return cfg, lens, ccfg


def _model_name(path: str) -> str:
    try:
        with open(os.path.join(path, "config.json")) as f:
            name = json.load(f).get("_name_or_path") or ""
    except (OSError, ValueError):
        name = ""
    if not name or os.path.isabs(name) or os.path.exists(name):
        name = os.path.basename(os.path.normpath(os.path.abspath(path)))
    return name


def _load(path: str, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                 attn_implementation="sdpa")
    return model.to(device).eval(), tokenizer


def _log(msg: str) -> None:
    print(f"[calibrate] {msg}", file=sys.stderr, flush=True)


def _progress(iterable, disable: bool, **kw):
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, disable=disable, file=sys.stderr, **kw)


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    cfg, lens, ccfg = _validate(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    created_by = " ".join([PROG] + [shlex.quote(a) for a in argv])
    t0 = time.time()
    model, tokenizer = _load(args.model_path, device)
    mc = model.config
    num_layers = mc.num_hidden_layers
    num_kv_heads = getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    _log(f"loaded {args.model_path} on {device} in {time.time() - t0:.1f}s: {num_layers} layers, "
         f"{mc.num_attention_heads}/{num_kv_heads} heads x {head_dim}")

    jobs = [(n, i) for n in lens for i in range(args.num_prompts)]
    # the longest context: prompt + answer tokens, so every sample's budget grid reaches all its pages
    shifts = max_shift([n + args.answer_tokens for n in lens], cfg)
    curves: Dict[str, Tuple[List[List[Tensor]], List[List[Tensor]]]] = {
        c: ([[] for _ in range(num_layers)], [[] for _ in range(num_layers)]) for c in CURVES}
    prompts, claa_rows = [], []
    for j, (target, i) in enumerate(jobs):
        t1 = time.time()
        ids, key, value = kv_retrieval_prompt(tokenizer, target, seed=args.seed * 1_000_003 + target * 101 + i)
        answer, col = generate_and_capture(model, tokenizer, ids, args.answer_tokens, device, ccfg)
        text = tokenizer.decode(answer[: args.answer_tokens], skip_special_tokens=True)
        t_gen = time.time() - t1
        steps = len(col.queries.get(0, []))
        if steps == 0:
            _log(f"prompt {j + 1}/{len(jobs)}: no decode step (answer {text!r}); skipped")
            continue
        for layer in _progress(range(num_layers), args.no_progress, desc=f"prompt {j + 1} layers", unit="layer",
                               leave=False):
            got = [sample_measures(q, k, v, col.scale, cfg, shifts) for q, k, v in col.samples(layer)]
            for c in CURVES:
                for side in (0, 1):
                    curves[c][side][layer].append(torch.stack([g[c][side] for g in got]).cpu())
        if ccfg is not None:
            claa_rows.append(claa_recalls([col.window_scores[l] for l in range(num_layers)], col.oracle(), ccfg))
        prompts.append({"target_tokens": target, "prompt_tokens": len(ids), "decode_samples": steps,
                        "key": key, "value": value, "answer": text, "correct": value in text,
                        "generate_s": round(t_gen, 1), "measure_s": round(time.time() - t1 - t_gen, 1)})
        s0 = {c: sum(float(curves[c][0][layer][-1][:, 0].mean()) for layer in range(num_layers)) / num_layers
              for c in CURVES}
        _log(f"prompt {j + 1}/{len(jobs)}: {len(ids)} tokens, {steps} decode samples, answer {text!r} "
             f"({'correct' if value in text else 'expected ' + value}); generate {t_gen:.0f}s, measure "
             f"{time.time() - t1 - t_gen:.0f}s; bound ranking at s=0, mean over layers: dropped mass "
             f"{s0['mass']:.3f} (max over heads), {s0['mass-mean']:.3f} (mean), output error "
             f"{s0['output-error']:.3f} (max), {s0['output-error-mean']:.3f} (mean), "
             f"{s0['output-error-layer']:.3f} (layer)")
        del col
    if not prompts:
        raise SystemExit(f"{PROG}: no prompt produced a decode step: nothing to calibrate")
    stats = {c: summarise([torch.cat(x) for x in curves[c][0]], [torch.cat(x) for x in curves[c][1]], cfg)
             for c in CURVES}
    samples_per_layer = int(torch.cat(curves["mass"][0][0]).shape[0])
    claa_choice, claa_results = None, None
    if ccfg is not None:
        recalls = torch.tensor(claa_rows, dtype=torch.float64)               # [prompts, L - 1, ratios]
        claa_choice, table = choose_claa(recalls, ccfg)
        claa_results = {"settings": {"keep_ratios": list(ccfg.keep_ratios), "recall": ccfg.recall,
                                     "quantile": ccfg.quantile, "window": ccfg.window,
                                     "num_layers": ccfg.num_layers, "pool_kernel": ccfg.pool_kernel},
                        "filter_layers": list(range(1, num_layers)), "recall_quantile": table,
                        "recall_mean": recalls.mean(dim=0).tolist(), "recall_per_prompt": recalls.tolist(),
                        "choice": claa_choice}
        _log(f"CLAA: {claa_choice if claa_choice else 'no filter layer and keep ratio reach the recall'}")
    profile = build_profile(model=_model_name(args.model_path), num_layers=num_layers, num_kv_heads=num_kv_heads,
                            head_dim=head_dim, cfg=cfg, created_by=created_by, device=device, prompt_lens=lens,
                            num_prompts=args.num_prompts, stats=stats, claa=claa_choice)
    wall = time.time() - t0
    out = args.out or f"{_model_name(args.model_path)}.json"
    _write(out, profile)
    _log(f"profile: {out} (layer budget shifts by {cfg.measure}: {stats[cfg.measure]['shift']})")
    if args.results:
        results = {"command": created_by, "wall_s": round(wall, 1), "device": device,
                   "dtype": str(next(model.parameters()).dtype), "torch_threads": torch.get_num_threads(),
                   "settings": {"page_size": cfg.page_size, "budget": cfg.budget, "delta": cfg.delta,
                                "quantile": cfg.quantile, "measure": cfg.measure, "sink_pages": cfg.sink_pages,
                                "recent_pages": cfg.recent_pages, "max_shift": shifts,
                                "answer_tokens": args.answer_tokens, "seed": args.seed},
                   "samples_per_layer": samples_per_layer, "prompts": prompts,
                   "per_layer": stats[cfg.measure], "measures": stats, "claa": claa_results, "profile": profile}
        _write(args.results, results)
        _log(f"results: {args.results}")
    _log(f"done in {wall:.0f}s")
    return profile


def _write(path: str, obj: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run(_parse_args(argv), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
