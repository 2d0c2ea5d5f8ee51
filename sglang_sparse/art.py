"""ART: run-time termination of the online-softmax decode loop (reference math).

Plain PyTorch, exact, float64-testable. The ART decode kernel in ``flashinfer_ext`` is checked
against :func:`art_attention`. Everything computes in the dtype of its inputs.

One decode query, one layer: ``q [H_q, D]``, ``k [n, H_kv, D]``, ``v [n, H_kv, Dv]``; query head h
reads KV head g = h // G (G = H_q / H_kv). KV blocks of ``block_size`` consecutive tokens: block b
holds tokens ``[b*B, min((b+1)*B, n))``, ``n_b`` of them.

Traversal. The blocks are visited in a given order (natural order, or the selection order of a
sparse policy, e.g. PrHS's descending upper bound). After the j-th block read, the online-softmax
state of head h is ``m`` (running max logit), ``l = sum_seen exp(s_t - m)`` and
``acc = sum_seen exp(s_t - m) v_t``; the running output is ``o_j = acc / l`` (exactly the softmax
attention over the tokens read so far).

Stability criterion (magnitude and direction), from the second block on::

    dmag_j = ||o_j - o_{j-1}|| / ||o_j||          ddir_j = 1 - cos(o_j, o_{j-1})

A boundary "holds" for a KV head when ``dmag_j < tau_mag`` and ``ddir_j < tau_dir`` for EVERY query
head of its GQA group. The group stops after ``patience`` consecutive holding boundaries (so after
at least ``patience + 1`` blocks).

Certified mode (``eps_cert``). With ``ub_b`` an upper bound of every logit in block b for every
head of the group (default: the Quest bound of :func:`sglang_sparse.prhs.page_bounds` with pages =
blocks), the unread mass of head h is bounded by::

    delta_hat_h = U_rest / (Z_seen_h + U_rest),   U_rest = sum_{b unread} n_b exp(ub_b),   Z_seen_h = exp(m) l

and the group stops once ``max_{h in g} delta_hat_h <= eps_cert``. Then, writing
``o_exact = (1 - delta) o_seen + delta o_rest`` with the true unread mass ``delta <= delta_hat``,
``||o_seen - o_exact|| = delta ||o_seen - o_rest|| <= 2 delta_hat max_t ||v_t||`` (the max over the
listed tokens of the KV head): the error bound reported in :class:`ArtResult`.

Granularity. Termination is decided per KV head (GQA group), because a decode kernel processes a
group's query heads together and reads each K/V block once for all of them; a group stops only when
all of its heads meet the criterion. ``blocks_read`` and ``stop_reason`` are per KV head, returned
broadcast to the group's query heads (``[H_q]``). Both rules honour ``min_blocks``; when both fire
at the same block the reason is ``STOP_CERTIFIED``.

The attention being approximated is the one over the listed blocks: blocks missing from a
``block_order`` row (-1 padding) belong to the sparse policy's dropped set and are never read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .prhs import page_bounds, page_lengths, page_summaries

__all__ = [
    "STOP_NONE",
    "STOP_CONVERGED",
    "STOP_CERTIFIED",
    "STOP_REASON_NAMES",
    "ArtResult",
    "block_upper_bounds",
    "art_attention",
]

STOP_NONE = 0        # read every listed block
STOP_CONVERGED = 1   # magnitude and direction stable for `patience` consecutive blocks
STOP_CERTIFIED = 2   # bounded remaining mass <= eps_cert
STOP_REASON_NAMES = {STOP_NONE: "none", STOP_CONVERGED: "converged", STOP_CERTIFIED: "certified"}


@dataclass
class ArtResult:
    """Output of :func:`art_attention`.

    out          ``[H_q, Dv]`` running output at termination (0 for a group with no listed block).
    blocks_read  LongTensor ``[H_q]``: blocks read by the head's KV group.
    stop_reason  LongTensor ``[H_q]``: STOP_NONE / STOP_CONVERGED / STOP_CERTIFIED.
    lse          ``[H_q]`` log-normaliser of the tokens read, ``m + log l`` (-inf if none).
    delta_hat    ``[H_q]`` certified bound on the unread attention mass at termination (over listed blocks).
    error_bound  ``[H_q]`` ``2 * delta_hat * max_t ||v_t||`` over the listed tokens of the KV head.
    """

    out: Tensor
    blocks_read: Tensor
    stop_reason: Tensor
    lse: Optional[Tensor] = None
    delta_hat: Optional[Tensor] = None
    error_bound: Optional[Tensor] = None


def block_upper_bounds(q: Tensor, k: Tensor, block_size: int, sm_scale: float) -> Tensor:
    """Quest upper bound of each block's logits per KV group: ``[H_kv, n_blocks]``."""
    kmin, kmax = page_summaries(k, block_size)
    ub, _ = page_bounds(q, kmin, kmax, sm_scale)
    return ub


def _normalise_order(block_order: Optional[Tensor], h_kv: int, n_blocks: int, device) -> Tensor:
    if block_order is None:
        return torch.arange(n_blocks, device=device).expand(h_kv, n_blocks)
    order = block_order.to(device=device, dtype=torch.long)
    if order.dim() == 1:
        order = order.expand(h_kv, order.numel())
    if order.dim() != 2 or order.shape[0] != h_kv:
        raise ValueError(f"block_order must be [n_blocks] or [H_kv={h_kv}, L], got {tuple(block_order.shape)}")
    if (order >= n_blocks).any():
        raise ValueError(f"block_order holds a block id >= n_blocks={n_blocks}")
    return order


def art_attention(q: Tensor, k: Tensor, v: Tensor, block_size: int, sm_scale: float,
                  block_order: Optional[Tensor] = None, *, tau_mag: float, tau_dir: float, patience: int,
                  min_blocks: int, eps_cert: Optional[float] = None,
                  block_ub: Optional[Tensor] = None) -> ArtResult:
    """Online-softmax decode attention over KV blocks with ART termination (see the module docstring).

    Args:
        q ``[H_q, D]``, k ``[n, H_kv, D]``, v ``[n, H_kv, Dv]``.
        block_size: tokens per KV block (the last block may be partial).
        sm_scale: logit scale (> 0), usually ``1/sqrt(D)``.
        block_order: blocks to visit, in order: ``[n_blocks']`` for all KV heads or ``[H_kv, L]``
            per KV head; -1 ends a row (padding). Default: ``0, 1, ..., n_blocks - 1``.
        tau_mag, tau_dir: thresholds (strict ``<``) on dmag and ddir; 0 disables the rule.
        patience: consecutive holding boundaries required (>= 1).
        eps_cert: certified mode's bound on the unread mass; None disables it.
        block_ub: ``[H_kv, n_blocks]`` group upper bounds of the logits; default
            :func:`block_upper_bounds`.
        min_blocks: never stop before this many blocks were read.
    """
    if q.dim() != 2 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("expected q [H_q, D], k [n, H_kv, D], v [n, H_kv, Dv]")
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    h_q, _ = q.shape
    n, h_kv, _ = k.shape
    dv = v.shape[2]
    group = h_q // h_kv
    dev, dt = q.device, q.dtype
    n_blocks = -(-n // block_size)
    order = _normalise_order(block_order, h_kv, n_blocks, dev)
    blens = page_lengths(n, block_size, device=dev)
    log_blen = blens.to(dt).log()
    if block_ub is None:
        block_ub = block_upper_bounds(q, k, block_size, sm_scale)
    block_ub = block_ub.to(dt)

    out = torch.zeros(h_q, dv, dtype=dt, device=dev)
    lse = torch.full((h_q,), float("-inf"), dtype=dt, device=dev)
    dhat_out = torch.zeros(h_q, dtype=dt, device=dev)
    err_out = torch.zeros(h_q, dtype=dt, device=dev)
    blocks_read = torch.zeros(h_q, dtype=torch.long, device=dev)
    reason = torch.full((h_q,), STOP_NONE, dtype=torch.long, device=dev)
    tiny = torch.finfo(dt).tiny

    for g in range(h_kv):
        heads = slice(g * group, (g + 1) * group)
        row = order[g]
        ends = torch.nonzero(row < 0)
        listed = row[: int(ends[0]) if ends.numel() else row.numel()].tolist()
        qg = q[heads]                                                    # [G, D]
        listed_t = torch.tensor(listed, dtype=torch.long, device=dev)
        in_listed = torch.isin(torch.arange(n, device=dev) // block_size, listed_t)
        vmax = v[in_listed, g].norm(dim=-1).amax() if listed else torch.zeros((), dtype=dt, device=dev)
        # log U_rest after j blocks read: logsumexp over listed[j:] of log n_b + ub_b
        w = log_blen[listed_t] + block_ub[g, listed_t]
        log_u_rest = torch.cat([torch.logcumsumexp(w.flip(0), 0).flip(0),
                                torch.full((1,), float("-inf"), dtype=dt, device=dev)])

        m = torch.full((group,), float("-inf"), dtype=dt, device=dev)
        l = torch.zeros(group, dtype=dt, device=dev)
        acc = torch.zeros(group, dv, dtype=dt, device=dev)
        o_prev = None
        streak = 0
        stop = STOP_NONE
        read = 0
        o = torch.zeros(group, dv, dtype=dt, device=dev)
        dhat = torch.zeros(group, dtype=dt, device=dev)
        for j, b in enumerate(listed):
            t0 = b * block_size
            t1 = t0 + int(blens[b])
            s = (qg @ k[t0:t1, g].T) * sm_scale                          # [G, n_b]
            m_new = torch.maximum(m, s.amax(dim=1))
            alpha = torch.exp(m - m_new)                                 # 0 on the first block
            p = torch.exp(s - m_new[:, None])
            l = l * alpha + p.sum(dim=1)
            acc = acc * alpha[:, None] + p @ v[t0:t1, g]
            m = m_new
            o = acc / l[:, None]
            read = j + 1

            if o_prev is not None:
                diff = (o - o_prev).norm(dim=-1)
                norm_o = o.norm(dim=-1)
                norm_p = o_prev.norm(dim=-1)
                dmag = diff / norm_o.clamp_min(tiny)
                cos = (o * o_prev).sum(-1) / (norm_o * norm_p).clamp_min(tiny)
                ddir = 1 - cos
                holds = bool(((dmag < tau_mag) & (ddir < tau_dir)).all())
                streak = streak + 1 if holds else 0
            o_prev = o

            log_z = m + l.log()
            log_u = log_u_rest[j + 1].expand(group)
            dhat = torch.where(log_u == float("-inf"), torch.zeros_like(log_z), torch.sigmoid(log_u - log_z))
            if read >= min_blocks and read < len(listed):
                if eps_cert is not None and bool((dhat <= eps_cert).all()):
                    stop = STOP_CERTIFIED
                    break
                if streak >= patience:
                    stop = STOP_CONVERGED
                    break

        out[heads] = o
        blocks_read[heads] = read
        reason[heads] = stop
        if read:
            lse[heads] = m + l.log()
            dhat_out[heads] = dhat
            err_out[heads] = 2 * dhat * vmax
    return ArtResult(out, blocks_read, reason, lse, dhat_out, err_out)
