"""CLAA: prefill token ranking by cross-layer attention aggregation (reference math).

Plain PyTorch, exact, CPU-friendly and float64-testable. The window-scoring kernel in
``flashinfer_ext`` and the prefill hook of the ``sparse`` backend are checked against these
functions. Everything computes in the dtype of its inputs.

Notation (one request, one layer):

    n        prompt length;  w = min(window, n) observation window (the last w prompt tokens)
    q        [n, H_q, D]  post-RoPE queries;   k  [n, H_kv, D]  post-RoPE keys
    G        = H_q / H_kv query heads per KV head (GQA); query head h reads KV head h // G
             (the Hugging Face ``repeat_kv`` layout, also SGLang's)

Pipeline (authors' CLAA; see ``/work/shared/design/anchors.md``):

1. :func:`window_scores` at every layer before the filter layer:
       A[h, i, j] = softmax_j( q[n-w+i, h] . k[j, h//G] / sqrt(D) ),  keys j <= n-w+i (causal),
       s[h, j]    = sum_i A[h, i, j]                       (sum over the w window queries)
       s'[h, :]   = pool_1d(s[h, :])                       (avg or max, kernel 7, stride 1)
       S[g, j]    = sum_{h in group g} s'[h, j]             -> [H_kv, n]
2. :func:`aggregate_max`: importance[j] = max over the N x H_kv rows of the last N layers.
3. :func:`select_tokens`: the top ``keep*n - w`` prefix tokens plus the w window tokens, in
   original order (the indices ARE the original positions).

The single-layer rankings CLAA is compared with (:func:`rank_fastkv`, :func:`rank_gemfilter`) and a
weighted rank-sum over layers (:func:`rank_weighted_ranksum`) use the same per-layer scores.
Tensor parallelism: each rank holds H_kv / tp KV heads; :func:`combine_tp_scores` makes the ranking
of the combined scores equal to the single-device ranking.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# The filter-layer default lives in the configuration module so that the launcher can check it against a
# model's depth without importing torch.
from sglang_sparse.config import AUTHORS_FILTER_LAYER, AUTHORS_NUM_LAYERS, default_filter_layer
from sglang_sparse.config import scaled_layer as _scaled_layer

__all__ = [
    "AUTHORS_NUM_LAYERS",
    "AUTHORS_FILTER_LAYER",
    "AUTHORS_GEMFILTER_LAYER",
    "window_scores",
    "pool_scores",
    "aggregate_max",
    "rank_fastkv",
    "rank_gemfilter",
    "rank_weighted_ranksum",
    "average_ranks",
    "num_kept_tokens",
    "select_tokens",
    "default_filter_layer",
    "default_claa_layers",
    "default_gemfilter_layer",
    "combine_tp_scores",
]

# Authors' defaults, stated for a 32-layer model (Llama-3.1-8B-Instruct).
AUTHORS_GEMFILTER_LAYER = 13
DEFAULT_WINDOW = 8
DEFAULT_NUM_AGG_LAYERS = 4
DEFAULT_POOL_KERNEL = 7


# --------------------------------------------------------------------------- scoring
def pool_scores(scores: Tensor, pool_kernel: int, pool: str = "avg") -> Tensor:
    """1-D pooling along the last axis with stride 1 and the same output length.

    ``pool_kernel`` must be odd; the row is padded with ``r = pool_kernel // 2`` entries on each side:

    * ``avg``: zero padding, the divisor is always ``pool_kernel``
      (``F.avg_pool1d(..., padding=r, count_include_pad=True)``, the authors' choice), so
      ``out[j] = (1/K) * sum_{|t| <= r, 0 <= j+t < L} x[j+t]``; the ends are damped.
    * ``max``: padding that never wins (``-inf``): ``out[j] = max_{|t| <= r, 0 <= j+t < L} x[j+t]``.

    ``pool_kernel == 1`` returns the input unchanged. Works on any leading shape.
    """
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be a positive odd number, got {pool_kernel}")
    if pool not in ("avg", "max"):
        raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
    if pool_kernel == 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    x = scores.reshape(-1, 1, shape[-1])
    r = pool_kernel // 2
    if pool == "avg":
        y = F.pad(x, (r, r), value=0.0).unfold(-1, pool_kernel, 1).sum(-1) / pool_kernel
    else:
        y = F.pad(x, (r, r), value=float("-inf")).unfold(-1, pool_kernel, 1).amax(-1)
    return y.reshape(shape)


def window_scores(q: Tensor, k: Tensor, window: int, pool_kernel: int = DEFAULT_POOL_KERNEL,
                  pool: str = "avg", sm_scale: Optional[float] = None) -> Tensor:
    """Per-KV-head token scores of one layer from the last ``window`` queries: ``[H_kv, n]``.

    Args:
        q: ``[n, H_q, D]`` post-RoPE queries of the whole prompt (only the last w rows are read).
        k: ``[n, H_kv, D]`` post-RoPE keys; ``H_q % H_kv == 0``.
        window: observation window; ``w = min(window, n)``.
        pool_kernel, pool: see :func:`pool_scores`.
        sm_scale: logit scale; default ``1/sqrt(D)`` (pass the model's own scale if it differs).

    Formula (query head h, its KV head g = h // G, window query i at position p_i = n - w + i)::

        A[h, i, j] = exp(q[p_i,h].k[j,g]/sqrt(D)) / sum_{j' <= p_i} exp(q[p_i,h].k[j',g]/sqrt(D))   (j <= p_i, else 0)
        s[h, j]    = sum_{i < w} A[h, i, j]

    Pooling is applied to the two segments separately: the prefix ``[0, n-w)`` (the tokens that
    compete for selection) and the window ``[n-w, n)``, each padded on its own as in
    :func:`pool_scores`. This is the authors' convention (they pool only the prefix columns), so the
    large window-to-window scores near the diagonal never leak into the last prefix tokens. The
    window entries are returned for completeness; :func:`select_tokens` keeps those tokens anyway.
    Finally the pooled scores of the G query heads of each KV head are summed::

        S[g, j] = sum_{h : h // G = g} pool(s[h, :])[j]

    Every prefix row sums (before pooling) to at most w; with avg pooling, sum_j S[g, j] <= G * w.
    """
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q must be [n, H_q, D] and k [n, H_kv, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    n, h_q, d = q.shape
    if k.shape[0] != n or k.shape[2] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on n or D")
    h_kv = k.shape[1]
    if h_q % h_kv:
        raise ValueError(f"H_q={h_q} is not a multiple of H_kv={h_kv}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    group = h_q // h_kv
    w = min(window, n)

    q_win = q[n - w:]                                          # [w, H_q, D]
    k_rep = k.repeat_interleave(group, dim=1)                  # [n, H_q, D]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    logits = torch.einsum("ihd,jhd->hij", q_win, k_rep) * scale         # [H_q, w, n]
    pos_q = torch.arange(n - w, n, device=q.device)
    pos_k = torch.arange(n, device=q.device)
    visible = pos_k[None, :] <= pos_q[:, None]                 # [w, n]
    logits = logits.masked_fill(~visible, float("-inf"))
    attn = torch.softmax(logits, dim=-1)                       # [H_q, w, n]
    s = attn.sum(dim=1)                                        # [H_q, n]

    pooled = torch.cat([pool_scores(s[:, : n - w], pool_kernel, pool),
                        pool_scores(s[:, n - w:], pool_kernel, pool)], dim=-1)
    return pooled.reshape(h_kv, group, n).sum(dim=1)


# --------------------------------------------------------------------------- rankings
def aggregate_max(layer_scores: Sequence[Tensor]) -> Tensor:
    """CLAA's aggregation: element-wise max over all N x H_kv rows.

    ``importance[j] = max_{l in layers, g < H_kv} S_l[g, j]``. No normalisation (the authors' choice).
    Each element of ``layer_scores`` is ``[H_kv, n]`` (``[n]`` is accepted as one row).
    """
    if len(layer_scores) == 0:
        raise ValueError("aggregate_max needs at least one layer's scores")
    rows = torch.cat([s.reshape(-1, s.shape[-1]) for s in layer_scores], dim=0)
    return rows.amax(dim=0)


def rank_fastkv(scores_at_filter_layer: Tensor) -> Tensor:
    """FastKV-style single-layer importance: the filter layer's scores summed over KV heads.

    ``importance[j] = sum_g S_f[g, j]`` (a mean would rank identically). Input ``[H_kv, n]``,
    output ``[n]``; pass :func:`window_scores` of the filter layer (w = 8, avg pool 7 in FastKV).
    """
    return scores_at_filter_layer.reshape(-1, scores_at_filter_layer.shape[-1]).sum(dim=0)


def rank_gemfilter(scores_one_early_layer: Tensor) -> Tensor:
    """GemFilter-style single-layer importance from one early layer, summed over KV heads.

    ``importance[j] = sum_g S_e[g, j]``. GemFilter scores with the last query only and no pooling:
    pass ``window_scores(q, k, window=1, pool_kernel=1)`` of layer
    :func:`default_gemfilter_layer` (13 of 32) for the faithful variant. Output ``[n]``.
    """
    return scores_one_early_layer.reshape(-1, scores_one_early_layer.shape[-1]).sum(dim=0)


def average_ranks(x: Tensor) -> Tensor:
    """Ranks along the last axis, 0 = smallest, ties get the mean of their ranks (float, x's dtype
    if floating else float64). Deterministic; used for rank-sums and Spearman correlation."""
    dtype = x.dtype if x.is_floating_point() else torch.float64
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty(flat.shape, dtype=dtype, device=x.device)
    for r in range(flat.shape[0]):
        vals, order = torch.sort(flat[r], stable=True)
        n = vals.numel()
        if n == 0:
            continue
        # run boundaries of equal values
        new_run = torch.ones(n, dtype=torch.bool, device=x.device)
        new_run[1:] = vals[1:] != vals[:-1]
        run_id = torch.cumsum(new_run.long(), 0) - 1
        starts = torch.nonzero(new_run).flatten()
        ends = torch.cat([starts[1:], torch.tensor([n], device=x.device)]) - 1
        mean_rank = (starts + ends).to(dtype) / 2
        out[r, order] = mean_rank[run_id]
    return out.reshape(x.shape)


def rank_weighted_ranksum(layer_scores: Sequence[Tensor], weights: Optional[Sequence[float]] = None) -> Tensor:
    """Weighted rank-sum aggregation over layers (an ablation in the authors' code).

    Per layer l: a token score ``t_l[j] = max_g S_l[g, j]`` (max over KV heads, as in CLAA), turned
    into average ranks ``R_l[j]`` (0 = least important, ties share the mean rank). Then::

        importance[j] = sum_l w_l * R_l[j],   default w_l = 2**l  (doubling per later layer)

    with l = 0 for the first (earliest) element of ``layer_scores``. Output ``[n]`` (float), higher =
    more important.
    """
    if len(layer_scores) == 0:
        raise ValueError("rank_weighted_ranksum needs at least one layer's scores")
    if weights is None:
        weights = [2.0 ** i for i in range(len(layer_scores))]
    if len(weights) != len(layer_scores):
        raise ValueError(f"{len(weights)} weights for {len(layer_scores)} layers")
    total = None
    for wgt, s in zip(weights, layer_scores):
        per_token = s.reshape(-1, s.shape[-1]).amax(dim=0)
        term = float(wgt) * average_ranks(per_token)
        total = term if total is None else total + term
    return total


# --------------------------------------------------------------------------- selection
def num_kept_tokens(n: int, keep_ratio: float, window: int) -> int:
    """Number of tokens :func:`select_tokens` keeps (window included).

    ``keep_ratio >= 1`` -> n. Otherwise ``min(n, max(min(window, n), floor(keep_ratio * n)))``:
    the authors' ``int(prompt_len * percentage)`` (floor; a 1e-9 slack absorbs products such as
    0.1 * 30 = 2.9999999999999996), never fewer than the window tokens.
    """
    if not keep_ratio > 0:
        raise ValueError(f"keep_ratio must be > 0, got {keep_ratio}")
    if keep_ratio >= 1:
        return n
    w = min(window, n)
    return min(n, max(w, int(math.floor(keep_ratio * n + 1e-9))))


def select_tokens(importance: Tensor, keep_ratio: float, window: int) -> Tensor:
    """Kept token positions, ascending: the top prefix tokens plus the w window tokens.

    With ``n = importance.numel()``, ``w = min(window, n)`` and ``K = num_kept_tokens(n, keep_ratio,
    window)``: the ``K - w`` tokens of largest importance among positions ``[0, n - w)`` (ties: the
    lower position first), plus positions ``[n - w, n)``; returned sorted ascending as a LongTensor.
    ``keep_ratio >= 1`` returns ``arange(n)``. ``importance[n-w:]`` is ignored.
    """
    if importance.dim() != 1:
        raise ValueError(f"importance must be [n], got {tuple(importance.shape)}")
    n = importance.numel()
    dev = importance.device
    total = num_kept_tokens(n, keep_ratio, window)
    if total >= n:
        return torch.arange(n, device=dev)
    w = min(window, n)
    k_prefix = total - w
    order = torch.sort(importance[: n - w], descending=True, stable=True).indices
    kept = torch.cat([order[:k_prefix], torch.arange(n - w, n, device=dev)])
    return torch.sort(kept).values


# --------------------------------------------------------------------------- defaults
def default_gemfilter_layer(num_layers: int) -> int:
    """GemFilter's early layer, 13 for 32 layers, scaled like :func:`default_filter_layer`."""
    return _scaled_layer(AUTHORS_GEMFILTER_LAYER, num_layers)


def default_claa_layers(num_layers: int, filter_layer: Optional[int] = None,
                        num_agg_layers: int = DEFAULT_NUM_AGG_LAYERS) -> List[int]:
    """Layers whose scores CLAA aggregates: the ``N`` layers just before the filter layer.

    ``[f - N, ..., f - 1]`` with ``f = filter_layer`` (default :func:`default_filter_layer`), clipped
    at layer 0 when ``f < N``. For 32 layers: ``[11, 12, 13, 14]``.
    """
    f = default_filter_layer(num_layers) if filter_layer is None else int(filter_layer)
    if not 1 <= f <= num_layers:
        raise ValueError(f"filter_layer must be in [1, {num_layers}], got {f}")
    if num_agg_layers < 1:
        raise ValueError(f"num_agg_layers must be >= 1, got {num_agg_layers}")
    return list(range(max(0, f - num_agg_layers), f))


# --------------------------------------------------------------------------- tensor parallel
def combine_tp_scores(scores: Tensor, group=None, op: str = "sum",
                      all_reduce: Optional[Callable] = None) -> Tensor:
    """Combine this rank's per-KV-head scores into the global per-token importance ``[n]``.

    With TP each rank holds a slice of the KV heads, so a ranking from local heads alone differs
    between ranks and from the single-device ranking. This reduces the local rows, then all-reduces
    over ``group``:

    * ``op="sum"``: ``sum_{ranks} sum_{local rows} scores`` = the sum over the heads of all ranks
      (matches :func:`rank_fastkv` / :func:`rank_gemfilter`, which sum over heads);
    * ``op="max"``: ``max_{ranks} max_{local rows} scores`` = the max over all rows (matches
      :func:`aggregate_max`; pass ``torch.cat(local_layer_scores)``, i.e. ``[N * H_kv_local, n]``).

    Either way the result equals the single-device value up to float summation order (exactly, for
    max), so the ranking equals the single-device ranking.

    ``group=None``: no communication (single device). ``all_reduce`` is called as
    ``all_reduce(tensor, op=ReduceOp, group=group)`` and must reduce ``tensor`` in place; it
    defaults to :func:`torch.distributed.all_reduce` (tests inject a fake group and function).
    """
    if op not in ("sum", "max"):
        raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
    rows = scores.reshape(-1, scores.shape[-1])
    local = rows.sum(dim=0) if op == "sum" else rows.amax(dim=0)
    if group is None:
        return local
    import torch.distributed as dist

    if all_reduce is None:
        all_reduce = dist.all_reduce
    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    local = local.contiguous().clone()
    all_reduce(local, op=reduce_op, group=group)
    return local
