"""Post-RoPE queries and keys (and optionally values) of a transformers model, captured as its attention
receives them.

An attention function registered with transformers' ``AttentionInterface`` hands each call's
``(layer, query, key, scale)`` (``(layer, query, key, scale, value)`` when values are asked for) to a
callback and then runs SDPA, so the model's outputs are unchanged. During ``model.generate`` with a KV
cache, a decode step's ``key`` (and ``value``) is the whole cache (every earlier token and the new one),
exactly what the step's query attends over.
:func:`verify_capture` checks the captured tensors against the eager attention's probabilities.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

__all__ = ["CAPTURE_IMPL", "Capturing", "capture_qk", "verify_capture", "register_capture"]

CAPTURE_IMPL = "sglang_sparse_capture"

_capture_callback: Optional[Callable] = None
_capture_values = False


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention function that hands (layer, q, k, scale[, v]) to the active callback, then runs SDPA.

    ``query`` is ``[B, H_q, T, D]``, ``key`` and ``value`` ``[B, H_kv, T_k, D]`` (post-RoPE keys, the cache
    included; values after their projection, one per KV head)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _capture_callback is not None:
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        if _capture_values:
            _capture_callback(module.layer_idx, query, key, float(scaling), value)
        else:
            _capture_callback(module.layer_idx, query, key, float(scaling))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_capture() -> None:
    """Register the capturing attention (and SDPA's mask) under :data:`CAPTURE_IMPL`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_IMPL, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_IMPL, sdpa_mask)


class Capturing:
    """Context manager: route ``model``'s attention through the capturing attention with ``callback``
    ``(layer, query, key, scale)``, or ``(layer, query, key, scale, value)`` with ``values``; the previous
    attention implementation is restored on exit."""

    def __init__(self, model, callback: Callable, values: bool = False):
        self.model, self.callback, self.values = model, callback, values

    def __enter__(self):
        global _capture_callback, _capture_values
        register_capture()
        self.previous = self.model.config._attn_implementation
        if self.previous != CAPTURE_IMPL:
            self.model.set_attn_implementation(CAPTURE_IMPL)
        _capture_callback, _capture_values = self.callback, self.values
        return self

    def __exit__(self, *exc):
        global _capture_callback, _capture_values
        _capture_callback, _capture_values = None, False
        if self.previous != CAPTURE_IMPL:
            self.model.set_attn_implementation(self.previous)
        return False


@torch.no_grad()
def capture_qk(model, input_ids: Tensor, values: bool = False) -> List[tuple]:
    """One forward pass; per layer ``(q [T, H_q, D], k [T, H_kv, D], scale)`` post-RoPE (batch 1), with
    ``values`` ``(q, k, scale, v [T, H_kv, Dv])``."""
    got: Dict[int, tuple] = {}

    def cb(layer, query, key, scale, value=None):
        row = (query[0].transpose(0, 1).detach().clone(), key[0].transpose(0, 1).detach().clone(), scale)
        if values:
            row += (value[0].transpose(0, 1).detach().clone(),)
        got[layer] = row

    with Capturing(model, cb, values=values):
        model(input_ids=input_ids, use_cache=False)
    return [got[i] for i in sorted(got)]


@torch.no_grad()
def verify_capture(model, input_ids: Tensor) -> float:
    """Largest |difference| between the eager attention probabilities of ``model`` and
    ``causal_softmax(scale * q k^T)`` from the captured q, k (all layers, heads)."""
    captured = capture_qk(model, input_ids)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        ref = model(input_ids=input_ids, use_cache=False, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    worst = 0.0
    for (q, k, scale), att in zip(captured, ref):
        t, h_q, _ = q.shape
        k_rep = k.repeat_interleave(h_q // k.shape[1], dim=1)
        logits = torch.einsum("ihd,jhd->hij", q.float(), k_rep.float()) * scale
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        worst = max(worst, float((probs - att[0].float()).abs().max()))
    return worst
