"""The Answer-Informed Oracle (CLAA paper) and the ranking metrics against it, as pure functions.

For a prompt of S tokens and an answer of A tokens, with post-RoPE queries ``q_l[h, a]`` of answer token a
and prompt keys ``k_l[g, j]`` at layer l (h reads KV head g = h // G)::

    P[l, h, a, j] = softmax_{j < S}( scale * q_l[h, a] . k_l[g, j] )      (softmax over the prompt keys only)
    M[a, j]       = max_{l, h} P[l, h, a, j]                              (max over layers and heads)
    oracle[j]     = mean_{a < k} M[a, j]                                  (first k answer tokens)
    oracle        = pool(oracle)                                          (optional 1-D pooling; off by default)

Ranking quality of a heuristic importance ``x`` (higher = keep) against the oracle ``o``, both restricted
to the prefix ``[0, S - w)`` (the w window tokens are kept by every method, so they are left out of both):

* Spearman rank correlation: the Pearson correlation of the average ranks of x and o (:func:`spearman`).
* Mass recall at keep ratio r: with ``K = num_kept_tokens(S, r, w) - w`` prefix tokens kept
  (:func:`sglang_sparse.claa.num_kept_tokens`), H = the top-K prefix tokens by x, O = the top-K by o::

      recall@r = sum_{j in H} o[j] / sum_{j in O} o[j]      in [0, 1]; 1 = the oracle's own choice

  (:func:`mass_recall`).

Used by ``benchmarks/oracle.py`` (per-layer reports) and :mod:`sglang_sparse.calibrate` (CLAA's filter layer
and keep ratio).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from sglang_sparse.claa import average_ranks, num_kept_tokens, pool_scores

__all__ = ["spearman", "mass_recall", "answer_attention_max", "oracle_importance", "ranking_metrics"]


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (average ranks for ties), in float64.

    NaN when either input is constant or has fewer than 2 elements.
    """
    if x.numel() != y.numel():
        raise ValueError(f"lengths differ: {x.numel()} vs {y.numel()}")
    if x.numel() < 2:
        return float("nan")
    rx = average_ranks(x.double().flatten())
    ry = average_ranks(y.double().flatten())
    rx = rx - rx.mean()
    ry = ry - ry.mean()
    den = torch.sqrt((rx * rx).sum() * (ry * ry).sum())
    if den == 0:
        return float("nan")
    return float((rx * ry).sum() / den)


def _top_k(x: Tensor, k: int) -> Tensor:
    # ties: lower index first, as in claa.select_tokens
    return torch.sort(x, descending=True, stable=True).indices[:k]


def mass_recall(oracle: Tensor, heuristic: Tensor, k: int) -> float:
    """``sum_{j in topK(heuristic)} oracle[j] / sum_{j in topK(oracle)} oracle[j]``; NaN if k < 1
    or the oracle's top-K mass is 0."""
    if k < 1:
        return float("nan")
    o = oracle.double()
    best = o[_top_k(o, k)].sum()
    if best <= 0:
        return float("nan")
    return float(o[_top_k(heuristic, k)].sum() / best)


def answer_attention_max(q_answer: Tensor, k_prompt: Tensor, sm_scale: float, chunk: int = 64) -> Tensor:
    """``max_h softmax_{j<S}(sm_scale * q[a, h] . k[j, h//G])`` for one layer: ``[A, S]``.

    q_answer ``[A, H_q, D]``, k_prompt ``[S, H_kv, D]``; computed in the inputs' dtype, ``chunk``
    answer tokens at a time.
    """
    a_len, h_q, _ = q_answer.shape
    group = h_q // k_prompt.shape[1]
    k_rep = k_prompt.repeat_interleave(group, dim=1)                     # [S, H_q, D]
    out = []
    for a0 in range(0, a_len, chunk):
        logits = torch.einsum("ahd,jhd->haj", q_answer[a0: a0 + chunk], k_rep) * sm_scale
        out.append(torch.softmax(logits, dim=-1).amax(dim=0))
    return torch.cat(out, dim=0) if out else q_answer.new_zeros(0, k_prompt.shape[0])


def oracle_importance(layer_qk: Sequence[Tuple[Tensor, Tensor]], sm_scale: float, first_k: Optional[int] = None,
                      pool_kernel: int = 1, pool: str = "max") -> Tensor:
    """Answer-Informed Oracle importance ``[S]`` (module docstring) from per-layer
    ``(q_answer [A, H_q, D], k_prompt [S, H_kv, D])`` pairs."""
    m = None
    for q_ans, k_pr in layer_qk:
        if first_k is not None:
            q_ans = q_ans[:first_k]
        layer_max = answer_attention_max(q_ans, k_pr, sm_scale)
        m = layer_max if m is None else torch.maximum(m, layer_max)
    imp = m.mean(dim=0)
    return pool_scores(imp, pool_kernel, pool) if pool_kernel > 1 else imp


def ranking_metrics(importance: Tensor, oracle: Tensor, window: int, keep_ratios: Sequence[float]) -> Dict[str, float]:
    """``{"spearman": ..., "recall@r": ...}`` over the prefix ``[0, S - w)`` (module docstring)."""
    s_len = oracle.numel()
    w = min(window, s_len)
    x, o = importance[: s_len - w], oracle[: s_len - w]
    out = {"spearman": spearman(x, o)}
    for r in keep_ratios:
        out[f"recall@{r:g}"] = mass_recall(o, x, num_kept_tokens(s_len, r, window) - w)
    return out
