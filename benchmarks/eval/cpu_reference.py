"""The reference math of CLAA, PrHS and ART run inside a real model on the CPU (algorithm-level quality).

:class:`ReferenceLlama` runs a Hugging Face Llama-family checkpoint (SmolLM2-135M-Instruct here) with its own
small forward pass over the model's modules (weights, RoPE), so that the attention of every layer goes through
the project's reference functions:

* prefill: dense causal attention; with CLAA (:mod:`sglang_sparse.claa`) the per-layer window scores of the N
  layers before the filter layer are aggregated (element-wise max), :func:`claa.select_tokens` picks the kept
  tokens, and the filter layer and every later layer process only the kept tokens (at their original positions),
  so their KV cache holds only those; earlier layers keep the whole prompt.
* decode: dense attention, or PrHS (:mod:`sglang_sparse.prhs`: pages ranked by Quest page summaries
  (``select="bounds"``) or by their mass estimated from 4-bit key codes (``select="estimate"``), delta and a page
  budget, exact attention over the selected pages), or ART (:mod:`sglang_sparse.art`: blocks =
  pages, stopping rule) over every page in the selector's order (sink pages, recent pages, then descending upper
  bound: PrHS's selector with delta 0 and all pages as budget, as the GPU decode plans dense + ART), or PrHS with
  ART over the pages PrHS selected, in selection order.

The settings are the server's own dataclasses (:class:`sglang_sparse.config.ClaaConfig`, ``PrhsConfig``,
``ArtConfig``), so a CPU-reference row and a server row with the same flags describe the same algorithm. Only the
default PrHS schedule is modelled (select at every step, for every layer: reselect_interval 1, dilation 0,
layers_per_selection 1).

Numerics: the checkpoint's bf16 weights; prefill GEMMs in bf16 (like the GPU server), decode GEMVs in float32 on
the same weight values (CPU bf16 GEMVs are slow); everything else (norms, RoPE, attention, CLAA scores, PrHS
bounds, ART state) in float32. Greedy decoding.

Several settings share work: one dense prefill pass provides the dense KV cache, the CLAA scores and the hidden
state entering the filter layer; each CLAA keep ratio then only re-runs the layers from the filter layer on its
kept tokens, and every decode setting starts from the prefill it needs (:meth:`ReferenceLlama.generate_many`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sglang_sparse import art as art_ref
from sglang_sparse import claa as claa_ref
from sglang_sparse import prhs as prhs_ref
from sglang_sparse.config import ArtConfig, ClaaConfig, PrhsConfig

DEFAULT_PAGE_SIZE = 32


@dataclass(frozen=True)
class RefConfig:
    """One setting: a name and the three mechanisms' configs (each off by default)."""

    name: str
    claa: ClaaConfig = field(default_factory=ClaaConfig)
    prhs: PrhsConfig = field(default_factory=PrhsConfig)
    art: ArtConfig = field(default_factory=ArtConfig)

    @property
    def page_size(self) -> int:
        return self.prhs.page_size or DEFAULT_PAGE_SIZE

    def describe(self) -> Dict:
        out: Dict = {}
        if self.claa.enabled:
            c = self.claa
            out["claa"] = dict(keep_ratio=c.keep_ratio, filter_layer=c.filter_layer, window=c.window,
                               num_layers=c.num_layers, pool_kernel=c.pool_kernel, min_prompt_len=c.min_prompt_len)
        if self.prhs.enabled:
            p = self.prhs
            out["prhs"] = dict(page_size=self.page_size, delta=p.delta, budget=p.budget, sink_pages=p.sink_pages,
                               recent_pages=p.recent_pages, min_context_len=p.min_context_len)
        if self.art.enabled:
            a = self.art
            out["art"] = dict(block_size=self.page_size, tau_mag=a.tau_mag, tau_dir=a.tau_dir,
                              patience=a.patience, eps_cert=a.eps_cert, min_blocks=a.min_blocks)
        return out or {"dense": True}


@dataclass
class _State:
    """KV cache of one request for one setting: post-RoPE keys and values per layer, [n_l, H_kv, D]."""

    k: List[Tensor]
    v: List[Tensor]
    next_pos: int
    kmin: List[Optional[Tensor]]
    kmax: List[Optional[Tensor]]
    kept: Optional[int] = None   # prompt tokens kept by CLAA (None: dense prefill)
    kbuf: Optional[List[Tensor]] = None   # decode: preallocated caches, k[i] is a view of kbuf[i][:len]
    vbuf: Optional[List[Tensor]] = None

    def for_decode(self, max_new_tokens: int) -> "_State":
        """A copy with room for ``max_new_tokens`` more tokens per layer (the prefill tensors stay untouched)."""
        kbuf, vbuf, k, v = [], [], [], []
        for kl, vl in zip(self.k, self.v):
            n = kl.shape[0]
            kb = kl.new_empty((n + max_new_tokens,) + tuple(kl.shape[1:]))
            vb = vl.new_empty((n + max_new_tokens,) + tuple(vl.shape[1:]))
            kb[:n] = kl
            vb[:n] = vl
            kbuf.append(kb)
            vbuf.append(vb)
            k.append(kb[:n])
            v.append(vb[:n])
        return _State(k, v, self.next_pos, list(self.kmin), list(self.kmax), self.kept, kbuf, vbuf)

    def append(self, i: int, k: Tensor, v: Tensor) -> None:
        n = self.k[i].shape[0]
        self.kbuf[i][n:n + 1] = k
        self.vbuf[i][n:n + 1] = v
        self.k[i] = self.kbuf[i][:n + 1]
        self.v[i] = self.vbuf[i][:n + 1]


@dataclass
class GenResult:
    text: str
    token_ids: List[int]
    stats: Dict[str, float]


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


class ReferenceLlama:
    def __init__(self, model_path: str, weight_dtype: torch.dtype = torch.bfloat16):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=weight_dtype).eval()
        cfg = self.hf.config
        self.config = cfg
        self.wdtype = weight_dtype
        self.num_layers = cfg.num_hidden_layers
        self.h_q = cfg.num_attention_heads
        self.h_kv = cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.sm_scale = self.d ** -0.5
        self.eos_ids = {int(x) for x in ([cfg.eos_token_id] if isinstance(cfg.eos_token_id, int)
                                         else (cfg.eos_token_id or []))}
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(self.tokenizer.eos_token_id))
        if cfg.hidden_act != "silu":
            raise NotImplementedError(f"hidden_act {cfg.hidden_act}")
        m = self.hf.model
        self.embed = m.embed_tokens
        self.layers = m.layers
        self.norm = m.norm
        self.lm_head = self.hf.lm_head
        self.rotary = m.rotary_emb
        self._w32: Dict[int, Tensor] = {}

    # ------------------------------------------------------------------ building blocks
    def _lin(self, x: Tensor, mod) -> Tensor:
        if x.shape[0] <= 4:
            # decode: a GEMV; CPU bf16 GEMVs are slow, so use float32 copies of the same (bf16-valued) weights
            w = self._w32.get(id(mod))
            if w is None:
                w = self._w32[id(mod)] = mod.weight.float()
            return F.linear(x.float(), w)
        return F.linear(x.to(self.wdtype), mod.weight).float()

    def _rope(self, q: Tensor, k: Tensor, pos: Tensor) -> Tuple[Tensor, Tensor]:
        """q [n, H_q, D], k [n, H_kv, D] at positions pos [n] -> rotated (same shapes)."""
        cos, sin = self.rotary(q, pos[None])            # [1, n, D]
        cos, sin = cos[0].float()[:, None, :], sin[0].float()[:, None, :]

        def rot(x):
            x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
            return torch.cat((-x2, x1), dim=-1)

        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    def _qkv(self, i: int, h: Tensor, pos: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        layer = self.layers[i]
        att = layer.self_attn
        x = _rms(h, layer.input_layernorm.weight, self.eps)
        n = h.shape[0]
        q = self._lin(x, att.q_proj).view(n, self.h_q, self.d)
        k = self._lin(x, att.k_proj).view(n, self.h_kv, self.d)
        v = self._lin(x, att.v_proj).view(n, self.h_kv, self.d)
        q, k = self._rope(q, k, pos)
        return q, k, v

    def _finish_layer(self, i: int, h: Tensor, attn: Tensor) -> Tensor:
        layer = self.layers[i]
        h = h + self._lin(attn.reshape(h.shape[0], -1), layer.self_attn.o_proj)
        x = _rms(h, layer.post_attention_layernorm.weight, self.eps)
        mlp = layer.mlp
        return h + self._lin(F.silu(self._lin(x, mlp.gate_proj)) * self._lin(x, mlp.up_proj), mlp.down_proj)

    def _prefill_layer(self, i: int, h: Tensor, pos: Tensor):
        q, k, v = self._qkv(i, h, pos)
        # causal over the given tokens, which are in ascending position order (index-causal == position-causal)
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           is_causal=True, scale=self.sm_scale, enable_gqa=True)
        h = self._finish_layer(i, h, o[0].transpose(0, 1))
        return h, q, k, v

    def _logits(self, h_last: Tensor) -> Tensor:
        return self._lin(_rms(h_last, self.norm.weight, self.eps), self.lm_head)

    @torch.no_grad()
    def dense_logits(self, ids: Sequence[int]) -> Tensor:
        """Logits of the last prompt token with dense attention (for checks against the HF forward)."""
        h = self.embed(torch.tensor(list(ids))).float()
        pos = torch.arange(len(ids))
        for i in range(self.num_layers):
            h, *_ = self._prefill_layer(i, h, pos)
        return self._logits(h[-1])

    # ------------------------------------------------------------------ prefill (shared across settings)
    @staticmethod
    def _claa_key(cfg: RefConfig, n: int, num_layers: int):
        c = cfg.claa
        if not c.enabled or c.keep_ratio >= 1 or n < c.min_prompt_len:
            return None
        f = c.filter_layer if c.filter_layer is not None else claa_ref.default_filter_layer(num_layers)
        return (float(c.keep_ratio), int(f), int(c.window), int(c.num_layers), int(c.pool_kernel))

    @torch.no_grad()
    def prefill_many(self, ids: Sequence[int], configs: Sequence[RefConfig]) -> Dict[object, Tuple[_State, Tensor]]:
        """Prefill states keyed by CLAA setting (None = dense): (state, last-token logits)."""
        n = len(ids)
        keys = {self._claa_key(c, n, self.num_layers) for c in configs}
        claa_keys = [k for k in keys if k is not None]
        need_dense = None in keys
        hidden_at = {k[1] for k in claa_keys}
        score_sets = {(k[1], k[2], k[3], k[4]) for k in claa_keys}   # (filter, window, N, pool_kernel)
        last_needed = self.num_layers if need_dense else max(hidden_at)

        h = self.embed(torch.tensor(list(ids))).float()
        pos = torch.arange(n)
        ks: List[Tensor] = []
        vs: List[Tensor] = []
        hidden_in: Dict[int, Tensor] = {}
        scores: Dict[tuple, List[Tensor]] = {s: [] for s in score_sets}
        for i in range(last_needed):
            h, q, k, v = self._prefill_layer(i, h, pos)
            if i + 1 in hidden_at:
                hidden_in[i + 1] = h                  # the hidden state entering layer i + 1
            ks.append(k)
            vs.append(v)
            for s in score_sets:
                f, w, nl, pk = s
                if i in claa_ref.default_claa_layers(self.num_layers, f, nl):
                    scores[s].append(claa_ref.window_scores(q, k, w, pool_kernel=pk, pool="avg",
                                                            sm_scale=self.sm_scale))
        out: Dict[object, Tuple[_State, Tensor]] = {}
        if need_dense:
            st = _State(list(ks), list(vs), n, [None] * self.num_layers, [None] * self.num_layers)
            out[None] = (st, self._logits(h[-1]))
        for key in claa_keys:
            keep, f, w, nl, pk = key
            importance = claa_ref.aggregate_max(scores[(f, w, nl, pk)])
            kept = claa_ref.select_tokens(importance, keep, w)
            h2 = hidden_in[f][kept]
            k2, v2 = list(ks[:f]), list(vs[:f])
            for i in range(f, self.num_layers):
                h2, _, k, v = self._prefill_layer(i, h2, kept)
                k2.append(k)
                v2.append(v)
            st = _State(k2, v2, n, [None] * self.num_layers, [None] * self.num_layers, kept=int(kept.numel()))
            out[key] = (st, self._logits(h2[-1]))
        return out

    # ------------------------------------------------------------------ decode
    def _summaries(self, st: _State, i: int, page_size: int) -> Tuple[Tensor, Tensor]:
        """Quest summaries of layer i, kept up to date incrementally (equal to recomputing them)."""
        k = st.k[i]
        n = k.shape[0]
        n_pages = -(-n // page_size)
        if st.kmin[i] is None:
            st.kmin[i], st.kmax[i] = prhs_ref.page_summaries(k, page_size)
        elif st.kmin[i].shape[0] < n_pages:          # the new token opened a page
            st.kmin[i] = torch.cat([st.kmin[i], k[-1:]])
            st.kmax[i] = torch.cat([st.kmax[i], k[-1:]])
        else:
            st.kmin[i] = st.kmin[i].clone()
            st.kmax[i] = st.kmax[i].clone()
            st.kmin[i][-1] = torch.minimum(st.kmin[i][-1], k[-1])
            st.kmax[i][-1] = torch.maximum(st.kmax[i][-1], k[-1])
        return st.kmin[i], st.kmax[i]

    def _decode_attention(self, i: int, q: Tensor, st: _State, cfg: RefConfig, stats: Dict[str, float]) -> Tensor:
        k, v = st.k[i], st.v[i]
        n = k.shape[0]
        P = cfg.page_size
        seq_len = st.next_pos + 1
        use_prhs = cfg.prhs.enabled and seq_len >= cfg.prhs.min_context_len
        use_art = cfg.art.enabled
        stats["attn_calls"] += 1
        stats["kv_tokens"] += n
        if not (use_prhs or use_art):
            stats["tokens_read"] += n
            o = F.scaled_dot_product_attention(q[None, :, None, :], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                               scale=self.sm_scale, enable_gqa=True)
            return o[0, :, 0, :]                                  # dense softmax attention, [H_q, D]
        kmin, kmax = self._summaries(st, i, P)
        ub, lb = prhs_ref.page_bounds(q, kmin, kmax, self.sm_scale)
        page_lens = prhs_ref.page_lengths(n, P)
        n_pages = page_lens.numel()
        if use_prhs:
            budget = cfg.prhs.budget_pages(n_pages)
            if cfg.prhs.select == "estimate":
                # the served estimate: full pages scored from their 4-bit codes, the partial last page exactly
                k_est = prhs_ref.dequantise_page_keys(prhs_ref.quantise_page_keys(k, kmin, kmax, P), kmin, kmax, P)
                est = prhs_ref.estimated_page_log_mass(q, k_est, k, P, self.sm_scale)
                sel = prhs_ref.select_pages_estimated(est, page_lens, self.h_kv, cfg.prhs.delta, budget,
                                                      cfg.prhs.sink_pages, cfg.prhs.recent_pages)
            else:
                sel = prhs_ref.select_pages(ub, lb, page_lens, cfg.prhs.delta, budget, cfg.prhs.sink_pages,
                                            cfg.prhs.recent_pages)
            stats["delta_hat_sum"] += float(sel.delta_hat.mean())
            stats["prhs_calls"] += 1
            order, num_sel = sel.pages, sel.num_selected
        else:
            # ART over all pages: the selector with delta 0 and every page as budget gives the read order
            # (sink pages, recent pages, then descending upper bound), as the GPU decode plans it
            sel = prhs_ref.select_pages(ub, lb, page_lens, 0.0, n_pages, cfg.prhs.sink_pages,
                                        cfg.prhs.recent_pages)
            order, num_sel = sel.pages, sel.num_selected
        if use_art:
            a = cfg.art
            res = art_ref.art_attention(q, k, v, P, self.sm_scale, block_order=order, tau_mag=a.tau_mag,
                                        tau_dir=a.tau_dir, patience=a.patience, eps_cert=a.eps_cert, block_ub=ub,
                                        min_blocks=a.min_blocks)
            read_blocks = res.blocks_read.view(self.h_kv, -1)[:, 0]
            stats["tokens_read"] += float(self._tokens_in(order, read_blocks, page_lens).float().mean())
            return res.out
        stats["tokens_read"] += float(self._tokens_in(order, num_sel, page_lens).float().mean())
        return prhs_ref.sparse_attention(q, k, v, P, order, num_sel, self.sm_scale)

    @staticmethod
    def _tokens_in(order: Tensor, count: Tensor, page_lens: Tensor) -> Tensor:
        """Tokens in the first count[g] pages of order[g] (per KV head)."""
        width = order.shape[1]
        valid = (torch.arange(width)[None, :] < count[:, None]) & (order >= 0)
        lens = page_lens[order.clamp_min(0)]
        return (lens * valid).sum(dim=1)

    @torch.no_grad()
    def _decode_step(self, st: _State, token: int, cfg: RefConfig, stats: Dict[str, float]) -> Tensor:
        h = self.embed(torch.tensor([token])).float()
        pos = torch.tensor([st.next_pos])
        for i in range(self.num_layers):
            q, k, v = self._qkv(i, h, pos)
            st.append(i, k, v)
            o = self._decode_attention(i, q[0], st, cfg, stats)
            h = self._finish_layer(i, h, o[None])
        st.next_pos += 1
        return self._logits(h[-1])

    @torch.no_grad()
    def generate_many(self, ids: Sequence[int], configs: Sequence[RefConfig], max_new_tokens: int,
                      stop: Optional[Callable[[str], bool]] = None) -> Dict[str, GenResult]:
        """Greedy generation for every setting from the shared prefills; ``stop(text)`` ends a generation early
        (e.g. once the score can no longer change)."""
        t0 = time.time()
        prefills = self.prefill_many(ids, configs)
        t_prefill = time.time() - t0
        results: Dict[str, GenResult] = {}
        n = len(ids)
        for cfg in configs:
            t1 = time.time()
            base, logits = prefills[self._claa_key(cfg, n, self.num_layers)]
            st = base.for_decode(max_new_tokens)
            stats = {"attn_calls": 0, "kv_tokens": 0.0, "tokens_read": 0.0, "delta_hat_sum": 0.0, "prhs_calls": 0}
            out: List[int] = []
            text = ""
            for step in range(max_new_tokens):
                tok = int(torch.argmax(logits))
                if tok in self.eos_ids:
                    break
                out.append(tok)
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                if stop is not None and stop(text):
                    break
                if step + 1 < max_new_tokens:
                    logits = self._decode_step(st, tok, cfg, stats)
            s = {"prompt_tokens": n, "new_tokens": len(out), "decode_seconds": round(time.time() - t1, 2),
                 "prefill_seconds_shared": round(t_prefill, 2)}
            if base.kept is not None:
                s["claa_kept_tokens"] = base.kept
            if stats["attn_calls"]:
                s["decode_read_fraction"] = stats["tokens_read"] / stats["kv_tokens"]
            if stats["prhs_calls"]:
                s["mean_delta_hat"] = stats["delta_hat_sum"] / stats["prhs_calls"]
            results[cfg.name] = GenResult(text, out, s)
        return results
