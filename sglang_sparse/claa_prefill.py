"""CLAA prefill token filtering inside SGLang's ``sparse`` attention backend (GPU).

The math (window scores, cross-layer max, top-k) is :mod:`sglang_sparse.claa`; the scoring kernel is
:class:`flashinfer_ext.claa_score.ClaaWindowScorer`. This module is the wiring, in the order a
prefill batch meets it:

0. **Admission** - ``PrefillAdder.add_one_req`` (patched in ``sglang_sparse/patches/prefill_adder_add_one_req.py``)
   asks :func:`defer_whole_prompt` before SGLang adds a request to the prefill batch it is building: a
   prompt CLAA would filter that no longer fits in the batch's remaining chunk budget waits for a later
   batch instead of being split across two (a split prompt is never filtered).
1. **Scheduler** - ``ScheduleBatch.prepare_for_extend`` (patched in
   ``sglang_sparse/patches/schedule_batch_prepare_for_extend.py``) calls :func:`mark_batch`. A request is filtered
   when its whole prompt is in this extend with no cached prefix, it is long enough, it asks for no
   input logprobs and ``max_new_tokens != 0`` (:func:`filter_decision`). It gets
   ``req.skip_radix_cache_insert = True`` (its later-layer KV is query-specific: never shared) and
   its kept count ``k`` (:func:`kept_count`, a function of the prompt length only, so every TP rank
   agrees without communication) on the request (:data:`KEPT_ATTR`, None for every request left dense),
   and is logged. When SGLang builds the ForwardBatch from that ScheduleBatch
   (``ForwardBatch.init_new``, patched in ``sglang_sparse/patches/forward_batch_init_new.py``), the kept
   counts of its requests start the backend's per-forward metadata (:class:`ForwardMetadata`).
2. **Metadata** - the backend's ``init_forward_metadata`` (extend) plans FlashInfer as usual, then
   :meth:`ClaaPrefill.begin` builds the batch's :class:`BatchPlan` (kept in the per-forward metadata) and
   records, per ``req_to_token`` row, how many leading positions the post-filter layers skip
   (``drop = n - k``, 0 for every other request of the batch).
3. **Scoring** - ``forward_extend`` of the ``N`` layers before the filter layer ``F`` runs
   FlashInfer, then :meth:`ClaaPrefill.score` folds the window scores of each filtered request into
   its cross-layer max (post-RoPE q and k of the layer, no extra KV reads).
4. **Filter** - a forward pre-hook on decoder layer ``F`` (:meth:`ClaaPrefill.apply`) combines the
   scores over TP ranks (max), selects (:func:`select_batch`), gathers hidden states and residuals
   to the kept rows, rewrites the ForwardBatch (:func:`rewrite_forward_batch`: positions = the
   kept tokens' original positions, ``out_cache_loc``, extend lengths and starts) and re-plans
   FlashInfer's ragged prefill. Pre-hooks on layers ``> F`` hand them the kept positions. Layers
   ``>= F`` therefore compute and write KV only for the kept tokens.
5. **KV layout** - the kept tokens' post-filter KV goes to the request's *last* ``k`` slots
   (positions ``[n - k, n)``), in order. ``k`` is rounded up so that ``n - k`` is a multiple of the
   page size: the post-filter view of a request is then the page-aligned suffix ``[drop, seq_len)``,
   which decode reads with ``SparseDecodeWrapper.plan(kv_start=drop)`` (``sparse_decode.py``).
   Layers ``< F`` keep the whole prompt. Slots stay allocated until the request ends (no memory is
   saved; prefill compute and decode reads are).
6. **Response** - a forward hook on the logits processor reports ``claa_kept_tokens`` per request
   through SGLang's ``customized_info`` (it appears in the response's ``meta_info``).

Everything here is inert for batches without a filtered request.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence

import torch

from sglang_sparse import claa
from sglang_sparse.config import CLAA_ARCHITECTURES, ClaaConfig

if TYPE_CHECKING:
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

logger = logging.getLogger(__name__)

# Model classes whose decoder layers are called as layer(positions, hidden, forward_batch, residual).
# the architectures whose decoder layers the hooks know (the launcher refuses others before loading)
SUPPORTED_ARCHITECTURES = CLAA_ARCHITECTURES

# Attribute of SGLang's Req holding CLAA's decision for the prefill being scheduled: the kept count, or None
# (set by mark_batch on every request of an extend batch, read when the batch's ForwardBatch is built).
KEPT_ATTR = "sglang_sparse_claa_kept"

CUSTOM_INFO_KEY = "claa_kept_tokens"

# Prompts long enough for CLAA that it left dense, by reason (a cached prefix, logprobs, a chunked prompt,
# ...), reported at most every SKIP_REPORT_S seconds so that a user sees why CLAA is not acting.
SKIP_REPORT_S = 60.0
_SKIPPED: Counter = Counter()
_SKIP_REPORTED_AT = [float("-inf")]
_NOT_REPORTED = ("filtered", "prompt shorter than --claa-min-prompt-len")


# --------------------------------------------------------------------------- decisions (host)
def kept_count(n: int, cfg: ClaaConfig, page_size: int = 1) -> int:
    """Tokens the post-filter layers process for a prompt of ``n`` tokens.

    ``claa.num_kept_tokens(n, keep_ratio, window)``, rounded up so that ``n - k`` (the dropped
    positions, which the post-filter KV skips) is a multiple of ``page_size``.
    """
    k0 = claa.num_kept_tokens(n, cfg.keep_ratio, cfg.window)
    p = max(1, int(page_size))
    return n - ((n - k0) // p) * p


def _request_reason(req, n: int, cfg: ClaaConfig) -> Optional[str]:
    """Why a whole prompt of ``n`` tokens with no cached prefix would not be filtered (``None``: it would);
    the checks that do not depend on how the scheduler chunks it or on the rest of its batch."""
    if getattr(req, "return_logprob", False):
        return "logprobs requested"
    max_new = getattr(req.sampling_params, "max_new_tokens", None)
    if max_new == 0:
        return "max_new_tokens = 0"
    if getattr(req, "multimodal_inputs", None) is not None or getattr(req, "input_embeds", None) is not None:
        return "multimodal or embedding input"
    if n < max(cfg.min_prompt_len, cfg.window + 1):
        return "prompt shorter than --claa-min-prompt-len"
    if cfg.max_prompt_len and n > cfg.max_prompt_len:
        return "prompt longer than --claa-max-prompt-len"
    return None


def filter_decision(req, cfg: ClaaConfig, page_size: int, batch_return_logprob: bool = False):
    """``(kept, reason)``: the kept count if ``req`` is filtered, else ``(None, why not)``."""
    n = len(req.origin_input_ids) + len(req.output_ids)
    if batch_return_logprob or getattr(req, "return_logprob", False):
        return None, "logprobs requested"
    if len(req.prefix_indices) != 0:
        return None, "cached prefix"
    if req.extend_range.end != n or req.extend_range.length != n:
        return None, "prompt split across prefill chunks"
    reason = _request_reason(req, n, cfg)
    if reason is not None:
        return None, reason
    k = kept_count(n, cfg, page_size)
    if k >= n:
        return None, "nothing to drop"
    return k, "filtered"


# A prompt that CLAA would filter but that does not fit in what is left of the prefill batch's chunk budget
# waits for a later batch instead of being split (a split prompt runs dense), at most this many times
# (a count, not a time: every TP rank must take the same decision).
MAX_WHOLE_PROMPT_DEFERRALS = 32


def defer_whole_prompt(req, cfg: ClaaConfig, batch_reqs: int, rem_chunk_tokens: Optional[int], page_size: int,
                       chunk_size: Optional[int]) -> bool:
    """Whether the scheduler should leave ``req`` out of the prefill batch it is building, so that a later
    batch prefills its prompt whole (``sglang_sparse/patches/prefill_adder_add_one_req.py``).

    True only when all hold: chunked prefill is on; the batch already holds a request (an empty batch
    always takes it, so it is never postponed twice in a row by its own size); the request has no cached
    prefix and CLAA would filter its whole prompt; the prompt, in pages, is longer than the chunk budget
    left (``rem_chunk_tokens``: SGLang would split it) but no longer than a whole chunk (``chunk_size``:
    a later batch can take it whole); and it has been postponed fewer than
    ``MAX_WHOLE_PROMPT_DEFERRALS`` times. Each True is counted on the request.
    """
    if rem_chunk_tokens is None or not chunk_size or chunk_size <= 0 or batch_reqs == 0:
        return False
    if len(req.prefix_indices) != 0:
        return False
    n = len(req.origin_input_ids) + len(req.output_ids)
    p = max(1, int(page_size))
    paged = -(-n // p) * p
    if paged <= rem_chunk_tokens or paged > chunk_size:
        return False
    if _request_reason(req, n, cfg) is not None or kept_count(n, cfg, page_size) >= n:
        return False
    done = getattr(req, "_claa_whole_prompt_deferrals", 0)
    if done >= MAX_WHOLE_PROMPT_DEFERRALS:
        return False
    req._claa_whole_prompt_deferrals = done + 1
    return True


def mark_batch(batch, cfg: ClaaConfig, page_size: int) -> List[Optional[int]]:
    """Decide CLAA for each request of a prefill batch (called after ``prepare_for_extend``)."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    out: List[Optional[int]] = []
    for req in batch.reqs:
        setattr(req, KEPT_ATTR, None)       # no decision left over from an earlier prefill of the request
    if batch.forward_mode != ForwardMode.EXTEND:
        return [None] * len(batch.reqs)
    batch_logprob = bool(getattr(batch, "return_logprob", False))
    for req in batch.reqs:
        k, reason = filter_decision(req, cfg, page_size, batch_logprob)
        out.append(k)
        if k is None:
            if reason not in _NOT_REPORTED:
                _SKIPPED[reason] += 1
            continue
        req.skip_radix_cache_insert = True
        setattr(req, KEPT_ATTR, k)
        n = len(req.origin_input_ids) + len(req.output_ids)
        logger.info("sglang_sparse CLAA: rid=%s prompt %d tokens, %d kept (%.1f%%)", req.rid, n, k, 100.0 * k / n)
    report_skipped()
    return out


def report_skipped(now: Optional[float] = None) -> Optional[str]:
    """Log (and return) how many prompts of CLAA's length range were prefilled densely since the last
    report, by reason; at most once per ``SKIP_REPORT_S`` seconds, and only when there were any."""
    now = time.monotonic() if now is None else now
    if not _SKIPPED or now - _SKIP_REPORTED_AT[0] < SKIP_REPORT_S:
        return None
    msg = (f"sglang_sparse CLAA: {sum(_SKIPPED.values())} prompt(s) not filtered since the last report: "
           + ", ".join(f"{reason} {n}" for reason, n in _SKIPPED.most_common()))
    if _SKIPPED.get("cached prefix"):
        msg += " (a prompt that starts with a prefix in the radix cache is prefilled densely; " \
               "--disable-radix-cache lets CLAA filter it)"
    if _SKIPPED.get("prompt split across prefill chunks"):
        msg += " (a prompt longer than --chunked-prefill-size, or one postponed " \
               f"{MAX_WHOLE_PROMPT_DEFERRALS} times for a whole-prompt batch, is split and prefilled densely; " \
               "--claa-max-prompt-len N raises the chunk size to N)"
    logger.info(msg)
    _SKIPPED.clear()
    _SKIP_REPORTED_AT[0] = now
    return msg


def kept_counts(batch) -> List[Optional[int]]:
    """CLAA's decisions for the requests of a ScheduleBatch (:func:`mark_batch`), in batch order."""
    return [getattr(req, KEPT_ATTR, None) for req in batch.reqs]


# --------------------------------------------------------------------------- batch plan
def _offsets(lengths: Sequence[int]) -> List[int]:
    """Exclusive prefix sums: where each of consecutive segments of these lengths starts."""
    return list(itertools.accumulate(lengths, initial=0))[:-1]


@dataclass
class BatchPlan:
    """CLAA's view of one prefill batch (host lists; the score buffer on the device)."""

    starts: List[int]            # token offset of each request in the batch
    lens: List[int]              # extend lengths (= prompt lengths of filtered requests)
    kept: List[int]              # kept tokens per request (= lens for requests not filtered)
    filtered: List[int]          # batch indices of filtered requests
    acc_off: List[int]           # offset of each filtered request's scores in acc
    acc: torch.Tensor            # [sum of filtered lens] fp32 cross-layer max, -inf initialised
    applied: bool = False
    positions: Optional[torch.Tensor] = None

    @classmethod
    def build(cls, lens: Sequence[int], kept: Sequence[Optional[int]], device) -> Optional["BatchPlan"]:
        lens = [int(x) for x in lens]
        kept_l = [int(lens[i]) if k is None else int(k) for i, k in enumerate(kept)]
        filtered = [i for i, k in enumerate(kept) if k is not None and int(k) < lens[i]]
        if not filtered:
            return None
        acc_off = _offsets([lens[i] for i in filtered])
        acc = torch.full((sum(lens[i] for i in filtered),), float("-inf"), dtype=torch.float32, device=device)
        return cls(_offsets(lens), lens, kept_l, filtered, acc_off, acc)

    @property
    def drops(self) -> List[int]:
        return [n - k for n, k in zip(self.lens, self.kept)]

    def scores(self, j: int) -> torch.Tensor:
        """Cross-layer max of the j-th filtered request, ``[n]``."""
        i = self.filtered[j]
        return self.acc[self.acc_off[j]: self.acc_off[j] + self.lens[i]]


@dataclass
class ForwardMetadata:
    """What the ``sparse`` backend knows about the forward batch being run: started when SGLang builds the
    ForwardBatch (with CLAA's kept counts of its requests, ``claa_kept``) or by the backend's
    ``init_forward_metadata``; ``claa`` is the batch's CLAA plan (None: nothing filtered). The model hooks act
    only on the ForwardBatch it describes (``forward_batch``)."""

    forward_batch: Any = None
    claa_kept: Optional[List[Optional[int]]] = None
    claa: Optional[BatchPlan] = None

    def claa_plan(self, fb) -> Optional[BatchPlan]:
        """The CLAA plan of ``fb`` (None for any other batch)."""
        return self.claa if self.forward_batch is fb else None


def select_batch(plan: BatchPlan, window: int):
    """``(keep_idx, loc_idx)``: batch rows the post-filter layers process, and the rows of the old
    ``out_cache_loc`` their KV is written to (the request's last ``k`` slots).

    Per filtered request: the ``k - w`` highest scores among positions ``[0, n - w)`` plus the ``w``
    window tokens, ascending (:func:`sglang_sparse.claa.select_tokens` with ``k`` given); other
    requests keep every row.
    """
    dev = plan.acc.device
    keep, loc = [], []
    fpos = {i: j for j, i in enumerate(plan.filtered)}
    for i, (s, n, k) in enumerate(zip(plan.starts, plan.lens, plan.kept)):
        if i not in fpos:
            r = torch.arange(s, s + n, device=dev)
            keep.append(r)
            loc.append(r)
            continue
        w = min(window, n)
        imp = plan.scores(fpos[i])[: n - w]
        top = torch.topk(imp, k - w, sorted=False).indices if k > w else imp.new_zeros(0, dtype=torch.long)
        keep.append(torch.cat([torch.sort(top).values + s, torch.arange(s + n - w, s + n, device=dev)]))
        loc.append(torch.arange(s + n - k, s + n, device=dev))
    return torch.cat(keep), torch.cat(loc)


def rewrite_forward_batch(fb: "ForwardBatch", plan: BatchPlan, keep_idx: torch.Tensor,
                          loc_idx: torch.Tensor) -> None:
    """Point the ForwardBatch at the kept tokens (new tensors; the old ones are not modified).

    positions -> the kept tokens' original positions; out_cache_loc -> the request's last k slots;
    extend_seq_lens(_cpu), extend_start_loc, extend_num_tokens -> the kept counts. seq_lens,
    req_pool_indices and the prefix lengths are unchanged (the request still holds n tokens).
    """
    dev = fb.positions.device
    fb.positions = fb.positions[keep_idx]
    fb.out_cache_loc = fb.out_cache_loc[loc_idx]
    kept = list(plan.kept)
    fb.extend_seq_lens = torch.tensor(kept, dtype=fb.extend_seq_lens.dtype, device=dev)
    fb.extend_start_loc = torch.tensor(_offsets(kept), dtype=fb.extend_start_loc.dtype, device=dev)
    fb.extend_seq_lens_cpu = kept
    fb.extend_num_tokens = sum(kept)
    plan.positions = fb.positions


# --------------------------------------------------------------------------- in the backend
class ClaaPrefill:
    """Per-backend CLAA state: scorer, per-row drop counts, model hooks.

    ``pool``: SGLang's KV pool; ``replan(fb)``: rebuilds the backend's extend plan for the kept lengths;
    ``metadata()``: the backend's current :class:`ForwardMetadata` (the hooks read the batch's plan there)."""

    def __init__(self, model_runner, cfg: ClaaConfig, num_layers: int, pool, replan: Callable[[Any], None],
                 metadata: Callable[[], ForwardMetadata]):
        from flashinfer_ext.claa_score import ClaaWindowScorer
        from sglang.srt.runtime_context import get_parallel

        self.cfg = cfg
        self.replan = replan
        self.metadata = metadata
        self.filter_layer = claa.default_filter_layer(num_layers) if cfg.filter_layer is None else cfg.filter_layer
        self.agg_layers = set(claa.default_claa_layers(num_layers, self.filter_layer, cfg.num_layers))
        self.layer_offset = getattr(pool, "start_layer", 0) or 0
        k0 = pool.get_key_buffer(self.layer_offset)
        self.h_kv, self.d = k0.shape[1], k0.shape[2]
        self.h_q = model_runner.model_config.get_max_num_attention_heads() // get_parallel().attn_tp_size
        self.page_size = model_runner.page_size
        self.tp_group = get_parallel().attn_tp_group if get_parallel().attn_tp_size > 1 else None
        self.scorer = ClaaWindowScorer(self.h_q, self.h_kv, self.d, cfg.window,
                                       max_len=model_runner.model_config.context_len,
                                       pool_kernel=cfg.pool_kernel, device=k0.device)
        # per req_to_token row: leading positions the post-filter layers skip (0 = dense)
        self.drop = torch.zeros(model_runner.req_to_token_pool.req_to_token.shape[0], dtype=torch.int32,
                                device=k0.device)
        self.active = self._install_hooks(model_runner)
        logger.info("sglang_sparse CLAA: filter layer %d, scores of layers %s, keep %.3f, window %d%s",
                    self.filter_layer, sorted(self.agg_layers), cfg.keep_ratio, cfg.window,
                    "" if self.active else " - INACTIVE (unsupported model), prompts are prefilled densely")

    # -- hooks
    def _install_hooks(self, model_runner) -> bool:
        model = model_runner.model
        arch = (getattr(model_runner.model_config.hf_config, "architectures", None) or ["?"])[0]
        layers = getattr(getattr(model, "model", None), "layers", None)
        if arch not in SUPPORTED_ARCHITECTURES or layers is None or getattr(model, "pp_group", None) is not None \
                and not (model.pp_group.is_first_rank and model.pp_group.is_last_rank):
            logger.warning("sglang_sparse CLAA: %s is not supported (supported: %s, no pipeline parallelism); "
                           "--sparse-prefill claa falls back to dense prefill", arch, ", ".join(SUPPORTED_ARCHITECTURES))
            return False
        for i in range(self.filter_layer, len(layers)):
            layers[i].register_forward_pre_hook(self._pre_hook_filter if i == self.filter_layer
                                                else self._pre_hook_positions)
        lp = getattr(model, "logits_processor", None)
        if lp is not None:
            lp.register_forward_hook(self._logits_hook)
        return True

    def _plan(self, fb) -> Optional[BatchPlan]:
        return self.metadata().claa_plan(fb)

    def _pre_hook_filter(self, module, args):
        fb = args[2]
        plan = self._plan(fb)
        if plan is None or plan.applied:
            return None
        hidden, residual = self.apply(fb, plan, args[1], args[3])
        return (fb.positions, hidden, fb, residual) + tuple(args[4:])

    def _pre_hook_positions(self, module, args):
        plan = self._plan(args[2])
        if plan is None or not plan.applied:
            return None
        return (plan.positions,) + tuple(args[1:])

    def _logits_hook(self, module, args, output):
        fb = args[3] if len(args) > 3 else None
        plan = self._plan(fb)
        if plan is None or not plan.applied or not hasattr(output, "customized_info"):
            return None
        info = dict(output.customized_info or {})
        info[CUSTOM_INFO_KEY] = list(plan.kept)
        output.customized_info = info
        return output

    # -- per batch
    def begin(self, fb: "ForwardBatch", use_ragged: bool,
              kept: Optional[Sequence[Optional[int]]]) -> Optional[BatchPlan]:
        """After FlashInfer's extend plan: the batch plan from the requests' kept counts (``kept``, batch order;
        None = nothing decided), and each row's drop recorded for decode."""
        bs = int(fb.req_pool_indices.shape[0])
        kept = list(kept) if kept is not None and len(kept) == bs else [None] * bs
        plan = None
        if self.active and use_ragged and any(k is not None for k in kept) \
                and not fb.return_logprob and fb.extend_seq_lens_cpu is not None \
                and not any(fb.extend_prefix_lens_cpu[i] for i, k in enumerate(kept) if k is not None):
            plan = BatchPlan.build(fb.extend_seq_lens_cpu, kept, fb.positions.device)
        if plan is not None:
            logger.debug("sglang_sparse CLAA batch: %d of %d requests filtered, %d -> %d tokens after layer %d",
                        len(plan.filtered), bs, sum(plan.lens), sum(plan.kept), self.filter_layer)
        drops = plan.drops if plan is not None else [0] * bs
        if len(drops) == bs and bs > 0:
            self.drop[fb.req_pool_indices] = torch.tensor(drops, dtype=torch.int32).to(self.drop.device,
                                                                                       non_blocking=True)
        return plan

    def score(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, fb: "ForwardBatch") -> None:
        plan = self._plan(fb)
        lid = layer_id - self.layer_offset
        if plan is None or plan.applied or lid not in self.agg_layers or k is None:
            return
        q3 = q.reshape(-1, self.h_q, self.d)
        k3 = k.reshape(-1, self.h_kv, self.d)
        for j, i in enumerate(plan.filtered):
            s, n = plan.starts[i], plan.lens[i]
            self.scorer.score(q3[s: s + n], k3[s: s + n], plan.scores(j))

    def apply(self, fb: "ForwardBatch", plan: BatchPlan, hidden: torch.Tensor, residual: Optional[torch.Tensor]):
        if self.tp_group is not None:
            plan.acc.copy_(claa.combine_tp_scores(plan.acc[None], self.tp_group.device_group, op="max"))
        keep_idx, loc_idx = select_batch(plan, self.cfg.window)
        rewrite_forward_batch(fb, plan, keep_idx, loc_idx)
        plan.applied = True
        self.replan(fb)
        hidden = hidden[keep_idx]
        residual = residual[keep_idx] if residual is not None else None
        return hidden, residual
