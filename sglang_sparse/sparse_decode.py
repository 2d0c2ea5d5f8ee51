"""PrHS + ART decode inside SGLang's ``sparse`` attention backend (GPU).

What SGLang calls, and what happens (the ``sparse`` backend, :mod:`sglang_sparse.backend`, holds a
:class:`SparseDecoder` and hands it these calls):

* ``forward_extend``: FlashInfer prefill as usual (it writes K/V), then the written keys are folded
  into the per-physical-page summaries (``flashinfer_ext.summaries.PageSummaries``).
* ``init_forward_metadata`` (eager) and ``init_forward_metadata_out_graph`` (before a CUDA-graph
  capture or replay) for decode batches: ``SparseDecodeWrapper.plan`` copies the batch's pages out
  of ``req_to_token`` (the only place it is read) into the wrapper's fixed-size buffers. No host
  synchronisation.
* ``forward_decode``: write K/V, update the summaries, then ``SparseDecodeWrapper.run``: page bounds,
  certified selection (PrHS), split-KV decode with ART, merge - kernels only, graph-capturable. A
  group of ``--prhs-layers-per-selection`` consecutive layers shares its first layer's selection.

Extend batches, idle batches and everything else go to FlashInfer unchanged. Page summaries are
keyed by physical page (``slot // page_size``): a prefix reused from the radix cache reuses its
pages' summaries, and a page's summary is reset when its first slot is written, so freed and
reused pages are never stale.

Statistics of the decode batches (pages read, PrHS's delta-hat of the last selecting layer, ART stop rate,
blocks read) are read back every ``--decode-log-interval`` decode batches (one device-to-host copy) and
logged; see :meth:`SparseDecoder.decode_stats` for what each covers.

The dropped-mass audit (``--prhs-audit-interval N``): a request is audited on its first decode step after each
(re)start and whenever its length + 1 is a multiple of N (fresh selections happen at lengths that are multiples of
``--prhs-reselect-interval R``; with R dividing N the audited steps are the last of a reuse window, so the oldest
reused lists are the ones measured, not only fresh ones); an audited step measures, at every layer, the exact
attention mass the decode left out (``flashinfer_ext.audit``); with ``--prhs-audit-measure output-error`` also the
relative error of the layer's attention output over all its query heads (this rank's) against the exact output over
every token, and that error, not the dropped mass, is what is compared with ``--prhs-delta``. With
``--prhs-audit-max-scale`` > 1 the measurement feeds back into PrHS (:meth:`SparseDecoder._fold_audit`): a
(request, selection group) whose audited measure exceeds ``--prhs-delta`` at any layer of the group has its page
budget doubled for its later fresh selections (``budget_shift``, reference
:func:`sglang_sparse.prhs.budget_shift_update`), up to the maximum scale;
it is reset when the request (re)starts. All of it is device ops, inside the captured decode graph.

A calibration profile (``--sparse-profile``) gives per-layer budget shifts: a (request, selection group) then starts,
on each (re)start, from the largest shift of the group's layers instead of 0, and the audit's feedback (when on)
raises it from there.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Callable, Optional

import torch

from sglang_sparse.config import (CHECK_ENV, DEFAULT_MAX_RUNNING_REQUESTS, ConfigError, SparseConfig,
                                  interpreted_decode)
from sglang_sparse.prhs import budget_shift_update

if TYPE_CHECKING:
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

logger = logging.getLogger(__name__)


# audits kept for the logged statistics (one per audited request and step)
AUDIT_RING = 4096


def summary_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, elem_size: int,
                            page_size: int, key_codes: bool = False) -> int:
    """HBM cost of the page summaries per KV-cache token (min and max keys per page, every layer), plus with
    ``key_codes`` (``--prhs-select estimate``) the 4-bit codes of each key (D / 2 bytes per layer and KV head)."""
    codes = num_layers * num_kv_heads * (head_dim // 2) if key_codes else 0
    return -(-2 * num_layers * num_kv_heads * head_dim * elem_size // page_size) + codes


def _selects(p) -> bool:
    """Whether PrHS selects pages: PrHS that must read every page (budget = all pages, delta = 0) is the dense
    path of the kernel."""
    return p.enabled and not (p.budget == 1.0 and p.delta == 0.0)


def longest_context(r2t_width: int, model_runner) -> int:
    """The most tokens a request can hold, which sizes every per-page buffer and the selection's tile
    (``next_pow2`` of its pages). SGLang's ``req_to_token`` rows are ``context_len + 4`` wide (the slack of
    speculative decoding, which this backend refuses), while a request is capped at ``max_req_len =
    context_len - 1`` tokens (scheduler ``init_req_max_new_tokens``): the model's context length is the bound.
    With 32-token pages and a 32K model that is a 1024-page tile instead of 2048 (the selection over every page
    took 23 us instead of 55 us at 8 x 32K, Qwen2.5-Coder-1.5B's heads, decode_breakdown_h200_qwen1.5b_heads.json)."""
    context_len = getattr(getattr(model_runner, "model_config", None), "context_len", None)
    return min(r2t_width, int(context_len)) if context_len else r2t_width


class SparseDecoder:
    """Our decode path of one backend: page summaries, the decode wrappers, the per-request reselection state
    and the served statistics. Built only when PrHS, ART or CLAA is on (:meth:`create`)."""

    audit = None            # the dropped-mass audit (--prhs-audit-interval), when on
    budget_shift = None     # [req_to_token rows, selection groups] int32 log2 budget scales (profile, audit feedback)
    _estimate = False       # --prhs-select estimate: key codes kept with the summaries, pages ranked by estimated mass

    @classmethod
    def create(cls, model_runner, cfg: SparseConfig, pool, claa=None,
               kv_write_scales: Optional[Callable] = None) -> Optional["SparseDecoder"]:
        """The decoder for this backend, or None when decode is SGLang's own (every mechanism off, or a
        device without the Triton kernels)."""
        on = (cfg.prhs.enabled or cfg.art.enabled or claa is not None) \
            and (str(model_runner.device).startswith("cuda") or interpreted_decode())
        return cls(model_runner, cfg, pool, claa, kv_write_scales) if on else None

    def __init__(self, model_runner, cfg: SparseConfig, pool, claa=None, kv_write_scales: Optional[Callable] = None):
        """``pool``: SGLang's KV pool (``token_to_kv_pool``); ``claa``: the backend's
        :class:`sglang_sparse.claa_prefill.ClaaPrefill` (its filter layer and per-row drops), or None;
        ``kv_write_scales(layer)``: the backend's K/V scales for ``set_kv_buffer`` (None: no scales)."""
        from flashinfer_ext.decode import SparseDecodeWrapper
        from flashinfer_ext.summaries import PageSummaries, key_codes_supported
        from sglang.srt.runtime_context import get_parallel

        self.sparse_config = cfg
        self.claa = claa
        self.token_to_kv_pool = pool
        self.req_to_token_pool = model_runner.req_to_token_pool
        self._kv_write_scales = kv_write_scales or (lambda layer: (None, None))
        self.layer_offset = getattr(pool, "start_layer", 0) or 0
        k0 = pool.get_key_buffer(self.layer_offset)
        self.page_size = model_runner.page_size
        self.num_kv_heads_local = k0.shape[1]
        self.head_dim = k0.shape[2]
        self.num_q_heads_local = (model_runner.model_config.get_max_num_attention_heads()
                                  // get_parallel().attn_tp_size)
        self._q_dtype = model_runner.dtype
        # With g layers per selection only every g-th layer (the group's leader) selects pages, so
        # only the leaders keep summaries.
        self._group = cfg.prhs.layers_per_selection if cfg.prhs.enabled else 1
        # CLAA: layers from the filter layer on read only the kept tokens (a page-aligned suffix of each
        # filtered request), through a second wrapper planned with kv_start.
        self._claa_from = claa.filter_layer if claa is not None and claa.active else None
        if self._claa_from is not None and self._claa_from % self._group:
            raise ConfigError("--prhs-layers-per-selection",
                              f"must divide the CLAA filter layer ({self._claa_from}) so that no selection "
                              f"group spans it, got {self._group}")
        self._need_summaries = cfg.prhs.enabled or cfg.art.enabled
        self._estimate = cfg.prhs.enabled and cfg.prhs.select == "estimate"
        if self._estimate and not key_codes_supported(self.head_dim):
            raise ConfigError("--prhs-select", f"estimate needs a power-of-two head_dim >= 32, this model has "
                                               f"{self.head_dim}")
        self.summaries = (PageSummaries(-(-pool.layer_num // self._group), k0.shape[0], self.num_kv_heads_local,
                                        self.head_dim, self.page_size, dtype=k0.dtype, device=k0.device,
                                        key_codes=self._estimate)
                          if self._need_summaries else None)
        max_bs = min(model_runner.req_to_token_pool.size, model_runner.server_args.max_running_requests
                     or DEFAULT_MAX_RUNNING_REQUESTS)
        r2t = model_runner.req_to_token_pool.req_to_token
        self.max_ctx = longest_context(r2t.shape[1], model_runner)
        self._plan_kwargs = self._make_plan_kwargs()
        # PrHS's time axis: a request selects afresh on its first decode step and whenever its length is a
        # multiple of R; in between, each leader layer reuses its last fresh selection (kept per
        # req_to_token row and leader layer), widened by --prhs-dilation pages.
        p = cfg.prhs
        self._reselect_every = p.reselect_interval if _selects(p) else 1
        # the budget shifts (the profile's, the audit's feedback): plans cover the largest (0: unscaled budgets)
        self._audit_every = p.audit_interval if (p.enabled or cfg.art.enabled) else 0
        self._num_layers = pool.layer_num
        plan_shift = self._init_budget_shift(r2t.shape[0], k0.device)
        if plan_shift:
            self._plan_kwargs = dict(self._plan_kwargs, budget_max_shift=plan_shift)
        reuse = {}
        if self._reselect_every > 1:
            max_pages = -(-self.max_ctx // self.page_size)
            # the kept list must hold the longest fresh list: the budget at the longest context, or every
            # page of a request short enough to be read densely (--prhs-min-context-len)
            width = max(p.budget_pages(max_pages) << plan_shift, -(-p.min_context_len // self.page_size))
            reuse = dict(reuse_slots=-(-pool.layer_num // self._group), max_reqs=r2t.shape[0],
                         reuse_width=min(max_pages, width))
            self._fresh = torch.ones(r2t.shape[0], dtype=torch.bool, device=k0.device)
        check = os.environ.get(CHECK_ENV) == "1"

        def wrapper():
            return SparseDecodeWrapper(self.num_q_heads_local, self.num_kv_heads_local, self.head_dim,
                                       self.page_size, max_batch_size=max_bs, max_seq_len=self.max_ctx,
                                       device=k0.device, check=check, estimate=self._estimate, **reuse)

        self.decode_wrapper = wrapper()
        self.decode_wrapper_kept = wrapper() if self._claa_from is not None else None
        # the layer whose selection the logged delta-hat bounds: the group leader of the last layer that
        # decode_wrapper runs (the model's last layer, or the last one before CLAA's filter layer)
        last = (self._claa_from if self._claa_from is not None else pool.layer_num) - 1
        self._stats_leader = self.layer_offset + (last // self._group) * self._group
        # the dropped-mass audit (--prhs-audit-interval N): a request's first decode step and every N-th step
        # measure, at every layer, the exact mass the step left out; values go to a device ring and counters read
        # with the stats, and (feedback) raise the budget of the (request, group) that dropped more than delta
        if self._audit_every:
            self._init_audit(max_bs, r2t.shape[0], k0.device)
        self._log_every = max(1, int(getattr(model_runner.server_args, "decode_log_interval", 40) or 40))
        self._decode_batches = 0
        self._metrics_on = bool(getattr(model_runner.server_args, "enable_metrics", False))
        self._gauges = None
        self._tp_rank = str(getattr(model_runner, "tp_rank", 0))
        what = ("PrHS" + (" + ART" if cfg.art.enabled else "") if cfg.prhs.enabled
                else "dense + ART" if cfg.art.enabled else "dense")
        if self._reselect_every > 1:
            what += f", fresh selection every {self._reselect_every} steps (dilation {cfg.prhs.dilation})"
        if self._audit_every:
            err = self._audit_err
            what += (f", dropped mass{' and output error' if err else ''} audited at every layer on a request's "
                     f"first decode step and every {self._audit_every} steps")
            if self._max_shift:
                over = "whose output error exceeds" if err else "dropping more than"
                what += (f", a (request, selection group) {over} delta gets its budget doubled, up to "
                         f"x{1 << self._max_shift}")
        if self.budget_shift is not None and any(self._initial_shift):
            what += (f", budgets of the selection groups start scaled by the profile's "
                     f"x{[1 << s for s in self._initial_shift]}")
        if self._estimate:
            what += (f"; pages ranked by their attention mass estimated from 4-bit key codes; the logged delta_hat "
                     f"is the estimated dropped attention mass of layer {self._stats_leader}'s selection (an "
                     f"estimate, not a bound; the layers sharing it have none)")
        elif cfg.prhs.enabled:
            what += (f"; the logged delta_hat is the min/max-bound upper bound on the dropped attention mass of "
                     f"layer {self._stats_leader}'s selection (the layers sharing it have none)")
        logger.info("sglang_sparse decode: %s%s, page summaries %.1f MiB, wrapper for %d requests x %d tokens",
                    what, f", CLAA-kept tokens from layer {self._claa_from}" if self._claa_from is not None else "",
                    self.summaries.nbytes() / 2 ** 20 if self.summaries is not None else 0.0, max_bs, self.max_ctx)

    def _init_budget_shift(self, max_rows: int, device) -> int:
        """PrHS's per-(``req_to_token`` row, selection group) budget shifts, when it selects and the audit's feedback
        or the profile's shifts may scale a budget: ``_max_shift`` is the feedback's largest shift, and
        ``_initial_shift`` the profile's shift of each selection group of this stage (the largest of its layers),
        which a row takes on each (re)start. Returns the largest shift a selection may take (0: no shifts, the
        selection runs unscaled)."""
        p = self.sparse_config.prhs
        self._max_shift = p.audit_max_shift() if _selects(p) else 0
        layers = range(self.layer_offset, self.layer_offset + self._num_layers)
        self._initial_shift = p.group_budget_shifts(layers) if _selects(p) else []
        plan_shift = max([self._max_shift, *self._initial_shift])
        if plan_shift:
            self._shift_init = torch.tensor(self._initial_shift, dtype=torch.int32, device=device)
            self.budget_shift = self._shift_init.repeat(max_rows, 1)
        return plan_shift

    def _init_audit(self, max_bs: int, max_rows: int, device) -> None:
        """The audit and its state: per ``req_to_token`` row a first-step flag; per batch row whether this step's
        audit is the request's first, and the groups over delta so far this step; the ring of the last audits and
        the cumulative counters."""
        from flashinfer_ext.audit import DroppedMassAudit

        measure = self.sparse_config.prhs.audit_measure
        self.audit = DroppedMassAudit(self.num_q_heads_local, self.num_kv_heads_local, self.head_dim,
                                      self.page_size, max_batch_size=max_bs, max_seq_len=self.max_ctx, device=device,
                                      measure=measure)
        self._audit_err = measure == "output-error"
        self._audit_fresh = torch.ones(max_rows, dtype=torch.bool, device=device)
        self._audit_first = torch.zeros(max_bs, dtype=torch.bool, device=device)
        self._audit_over = torch.zeros(max_bs, dtype=torch.bool, device=device)
        self._audit_rows = 0
        # the last AUDIT_RING audits, plus one spare slot that takes the rows not audited (see _fold_audit)
        self._audit_ring = torch.full((AUDIT_RING + 1,), float("nan"), dtype=torch.float32, device=device)
        # output-error: the same audits' layer output errors, slot for slot
        self._audit_err_ring = self._audit_ring.clone() if self._audit_err else None
        self._audit_pos = torch.zeros((), dtype=torch.int64, device=device)
        # since start: audits, audits over delta, audits after a request's first decode step, those over delta
        self._audit_counts = torch.zeros(4, dtype=torch.int64, device=device)

    def _make_plan_kwargs(self) -> dict:
        """The mechanisms' parameters for ``SparseDecodeWrapper.plan``, from the configuration."""
        p, a = self.sparse_config.prhs, self.sparse_config.art
        pages = p.select_params(self.page_size)
        art = a.art_params() if a.enabled else None
        if not _selects(p):
            # every page: in natural order, or with ART in descending-bound order (ART walks the important
            # pages first)
            pages = pages.every_page() if art is not None else None
        return dict(pages=pages, art=art)

    # ------------------------------------------------------------------ metadata
    def handles(self, fb: "ForwardBatch") -> bool:
        """Whether this batch decodes through our kernels (decode batches with requests)."""
        return fb.forward_mode.is_decode() and fb.batch_size > 0

    def plan(self, fb: "ForwardBatch") -> None:
        """Plan the decode wrappers for this batch (eager, or before a CUDA-graph capture or replay)."""
        self._maybe_log_stats()
        r2t = self.req_to_token_pool.req_to_token
        kw = self._plan_kwargs
        if self._reselect_every > 1:
            # device-side choice per request (no host sync): fresh rows and lengths that are multiples of R.
            # A CUDA-graph replay pads the batch with stale row indices (``num_padding``); those may belong
            # to other requests, so padded entries never select (the selector would overwrite that row's
            # kept selection) and never consume a fresh flag.
            rows = fb.req_pool_indices
            n_real = rows.shape[0] - int(getattr(fb, "num_padding", 0) or 0)
            reselect = self._fresh[rows] | (fb.seq_lens % self._reselect_every == 0)
            if n_real < rows.shape[0]:
                reselect[n_real:] = False
            self._fresh[rows[:n_real]] = False
            kw = dict(kw, reselect=reselect)
        self.decode_wrapper.plan(r2t, fb.req_pool_indices, fb.seq_lens, q_dtype=self._q_dtype, **kw)
        if self.decode_wrapper_kept is not None:
            self.decode_wrapper_kept.plan(r2t, fb.req_pool_indices, fb.seq_lens, q_dtype=self._q_dtype,
                                          kv_start=self.claa.drop[fb.req_pool_indices], **kw)
        if self.audit is not None:
            self._plan_audit(fb)

    def _plan_audit(self, fb: "ForwardBatch") -> None:
        """Choose this step's audited requests (device-side, no host sync): those on their first decode step
        since they (re)started (the flag is consumed) and those whose length + 1 is a multiple of N (the step
        before a fresh selection when R divides N, see the module's docstring); CUDA-graph
        padding rows are never audited and consume no flag."""
        rows, lens = fb.req_pool_indices, fb.seq_lens
        bs = rows.shape[0]
        n_real = bs - int(getattr(fb, "num_padding", 0) or 0)
        first = self._audit_fresh[rows]
        audited = first | ((lens + 1) % self._audit_every == 0)
        if n_real < bs:
            audited[n_real:] = False
            first[n_real:] = False
        self._audit_fresh[rows[:n_real]] = False
        self._audit_first[:bs].copy_(first)
        self._audit_over[:bs].zero_()
        self._audit_rows = n_real
        self.audit.plan(bs, audited)

    def _fold_audit(self, lid: int, rows: torch.Tensor) -> None:
        """After the audit of layer ``lid`` (device ops only, graph-capturable): append its values (per request,
        the largest dropped mass over its query heads) to the ring, audited rows taking the next ring slots in
        batch order and the others the spare slot past the ring's end (the ring holds audits alone, without a
        host sync); count them; with feedback, at the last layer of a selection group, raise by one (up to the
        maximum) the budget shift of the audited rows that dropped more than delta at any layer of the group
        (:func:`sglang_sparse.prhs.budget_shift_update`): one doubling per (request, group) and audited step.
        With the output-error measure, the relative error of the layer's whole attention output (its query heads
        concatenated: ``sqrt(sum_h (err_h * n_h)^2) / sqrt(sum_h n_h^2)`` from the heads' errors ``err_h`` and
        exact output norms ``n_h``, :func:`sglang_sparse.prhs.layer_error`) goes to a second ring (same slots),
        and it, not the dropped mass, is compared with delta by the counters and the feedback."""
        bs = self.audit.bs
        vals = self.audit.dropped.amax(dim=1)          # NaN for requests not audited
        audited = ~torch.isnan(vals)
        slot = (self._audit_pos + torch.cumsum(audited, dim=0) - 1) % AUDIT_RING
        idx = torch.where(audited, slot, AUDIT_RING)
        self._audit_ring[idx] = vals
        measured = vals
        if self._audit_err_ring is not None:
            measured = self.audit.layer_err             # NaN for requests not audited
            self._audit_err_ring[idx] = measured
        self._audit_pos += audited.sum()
        over = audited & (measured > self.sparse_config.prhs.delta)
        later = audited & ~self._audit_first[:bs]
        self._audit_counts += torch.stack([audited.sum(), over.sum(), later.sum(), (later & over).sum()])
        if self.budget_shift is None or not self._max_shift:
            return
        self._audit_over[:bs] |= over
        if (lid + 1) % self._group == 0 or lid == self._num_layers - 1:
            budget_shift_update(self.budget_shift[:, lid // self._group], rows, self._audit_over[:bs], self._max_shift)
            self._audit_over[:bs] = False

    def mark_fresh(self, fb: "ForwardBatch") -> None:
        """Rows that (re)start a request (an extend batch) select afresh on their next decode step, are audited
        on it, and start from the profile's budget shifts (0 without a profile)."""
        if not (fb.forward_mode.is_extend() and fb.batch_size > 0):
            return
        rows = fb.req_pool_indices
        if self._reselect_every > 1:
            self._fresh[rows] = True
        if self.audit is not None:
            self._audit_fresh[rows] = True
        if self.budget_shift is not None:
            self.budget_shift[rows] = self._shift_init

    # ------------------------------------------------------------------ forward
    def _update_summaries(self, layer, k, loc) -> None:
        """Fold the keys just written into the page summaries (leader layers only; with key codes, the pages this
        write fills are quantised from the layer's K buffer)."""
        lid = layer.layer_id - self.layer_offset
        if self.summaries is not None and lid % self._group == 0:
            k_buf = self.token_to_kv_pool.get_key_buffer(layer.layer_id) if self._estimate else None
            self.summaries.update(lid // self._group, k.view(-1, self.num_kv_heads_local, self.head_dim), loc,
                                  k_cache=k_buf)

    def after_extend(self, k, layer, fb: "ForwardBatch", save_kv_cache: bool) -> None:
        """After SGLang's extend attention wrote K/V: fold the keys into the page summaries."""
        if save_kv_cache and k is not None:
            self._update_summaries(layer, k, fb.out_cache_loc)

    def forward_decode(self, q, k, v, layer, fb: "ForwardBatch", save_kv_cache: bool = True):
        """Write K/V, update the summaries, then the planned wrapper's run (graph-capturable)."""
        from sglang.srt.mem_cache.memory_pool import KVWriteLoc

        lid = layer.layer_id - self.layer_offset
        if k is not None and save_kv_cache:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(fb.out_cache_loc, None), k, v,
                                                *self._kv_write_scales(layer))
            self._update_summaries(layer, k, fb.out_cache_loc)
        k_buf, v_buf = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        leader = lid % self._group == 0
        kmin, kmax = (self.summaries.layer(lid // self._group) if leader and self.summaries is not None
                      else (None, None))
        w = self.decode_wrapper_kept if self._claa_from is not None and lid >= self._claa_from else self.decode_wrapper
        reuse = {"reuse_slot": lid // self._group} if self._reselect_every > 1 else {}
        if self.budget_shift is not None and leader:
            reuse["budget_shift"] = self.budget_shift[:, lid // self._group]
        if self._estimate and leader:
            reuse["codes"] = self.summaries.layer_codes(lid // self._group)
        qv = q.contiguous().view(-1, layer.tp_q_head_num, layer.head_dim)
        o = w.run(qv, k_buf, v_buf, kmin, kmax, select=leader, **reuse)
        if self.audit is not None:
            self.audit.run(w, qv, k_buf, v_buf, o)
            self._fold_audit(lid, fb.req_pool_indices)
        return o.view(-1, layer.tp_q_head_num * layer.v_head_dim)

    # ------------------------------------------------------------------ statistics
    def decode_stats(self) -> Optional[dict]:
        """Statistics of the last decode batch (reads device buffers: synchronises), from the last layer that
        ``decode_wrapper`` ran (the model's last layer, or the last one before CLAA's filter layer):

        * ``pages_read_frac``, ``art_stop_rate``, ``blocks_read_mean``: that layer's pages loaded, ART stops
          and pages in its output.
        * ``delta_hat_mean``, ``delta_hat_max``: PrHS's pre-hoc upper bound on the dropped attention mass, from
          the per-page key min/max bounds, of the selection made at the last *selecting* layer,
          ``delta_hat_layer`` (the group leader of that last layer, with ``--prhs-layers-per-selection``).
          It bounds the dropped mass of that layer only, up to fp32 rounding of the bounds: a diagnostic
          upper bound, not a guarantee for the model. The layers sharing the leader's list have no bound of
          their own (their queries and keys differ) and are not covered. Over freshly selected lists only
          (a list reused across steps has none; NaN when every list was reused); 0 in dense mode."""
        w = self.decode_wrapper
        if not getattr(w, "_planned", False):
            return None
        bs = w.bs
        g = w.group
        blocks = w.blocks_read.reshape(bs, w.h_kv, g)[:, :, 0].float()        # pages in the output
        loaded = w.pages_loaded.reshape(bs, w.h_kv, g)[:, :, 0].float()       # pages read from HBM
        pages = w.num_pages[:bs].float().clamp(min=1)[:, None].expand(bs, w.h_kv)
        dhat = w.leader_delta_hat.float()   # NaN for a list reused from an earlier step (no bound)
        dhat_max = dhat.nan_to_num(nan=float("-inf")).max()
        dhat_max = torch.where(torch.isinf(dhat_max), torch.full_like(dhat_max, float("nan")), dhat_max)
        stop = (w.stop_reason.reshape(bs, w.h_kv, g)[:, :, 0] != 0).float()
        vals = torch.stack([loaded.sum() / pages.sum(), dhat.nanmean(), dhat_max, stop.mean(), blocks.mean()]).tolist()
        stats = dict(zip(("pages_read_frac", "delta_hat_mean", "delta_hat_max", "art_stop_rate", "blocks_read_mean"),
                         vals), batch_size=bs, delta_hat_layer=getattr(self, "_stats_leader", None))
        if getattr(self, "audit", None) is not None:
            stats.update(self.audit_stats())
        return stats

    def audit_stats(self) -> dict:
        """The audited dropped mass (reads device buffers: synchronises). One audit is one (request, layer) of an
        audited step. Over the ring's last audits: mean, 99th percentile, share above ``--prhs-delta``, and how
        many audits they cover (``audits``). Since start: ``audits_total`` and ``audits_total_over`` (above
        delta); ``audits_later`` and ``audits_later_over``, the same for the audits after a request's first
        decode step (the first one runs at the starting budget, before any feedback), and their share above
        delta ``dropped_over_delta_later``. ``budget_shift_mean``: the mean log2 budget scale over the last
        batch's requests and selection groups (0 without feedback or profile).

        With ``--prhs-audit-measure output-error`` also ``err_mean`` and ``err_p99``, the relative error of the
        layer's attention output over all its query heads on the same audits, and every "above delta"
        (``dropped_over_delta``, the ``*_over`` counters, ``*_later``) is the output error's, the measure the
        feedback compares with delta; ``dropped_mean`` / ``dropped_p99`` stay the mass."""
        total, total_over, later, later_over = (int(x) for x in self._audit_counts.tolist())
        shift = self.budget_shift
        rows = self.decode_wrapper.req_idx[: self._audit_rows].long() if self._audit_rows else None
        out = dict(audits_total=total, audits_total_over=total_over, audits_later=later, audits_later_over=later_over,
                   dropped_over_delta_later=later_over / later if later else float("nan"),
                   budget_shift_mean=(0.0 if shift is None else float(shift[rows].float().mean()))
                   if rows is not None else float("nan"))
        ring = self._audit_ring[:AUDIT_RING]
        kept = ~torch.isnan(ring)
        d = ring[kept].double()
        err_ring = getattr(self, "_audit_err_ring", None)
        e = err_ring[:AUDIT_RING][kept].double() if err_ring is not None else None
        if d.numel() == 0:
            nan = float("nan")
            out = dict(out, dropped_mean=nan, dropped_p99=nan, dropped_over_delta=nan, audits=0)
            return dict(out, err_mean=nan, err_p99=nan) if e is not None else out
        compared = d if e is None else e
        out = dict(out, dropped_mean=float(d.mean()), dropped_p99=float(torch.quantile(d, 0.99)),
                   dropped_over_delta=float((compared > self.sparse_config.prhs.delta).double().mean()),
                   audits=int(d.numel()))
        if e is not None:
            out.update(err_mean=float(e.mean()), err_p99=float(torch.quantile(e, 0.99)))
        return out

    def _maybe_log_stats(self) -> None:
        self._decode_batches += 1
        if self._decode_batches % self._log_every:
            return
        stats = self.decode_stats()
        if stats:
            self.last_decode_stats = stats
            # the line's format is parsed by benchmarks/ (quality_gpu, serving_decode); which layer the delta-hat
            # covers is logged once at start-up
            logger.info("sglang_sparse decode stats: bs=%d pages_read=%.3f delta_hat mean=%.4f max=%.4f "
                        "art_stop_rate=%.3f blocks_read_mean=%.1f", stats["batch_size"], stats["pages_read_frac"],
                        stats["delta_hat_mean"], stats["delta_hat_max"], stats["art_stop_rate"],
                        stats["blocks_read_mean"])
            if "audits" in stats:
                err = "err_mean" in stats          # --prhs-audit-measure output-error
                logger.info("sglang_sparse audited dropped mass (last %d audits): mean=%.4f p99=%.4f "
                            "over_delta(%.3g)=%.3f total=%d total_over=%d later=%d later_over=%d mean_shift=%.2f"
                            + (" err_mean=%.4f err_p99=%.4f" if err else ""),
                            stats["audits"], stats["dropped_mean"], stats["dropped_p99"],
                            self.sparse_config.prhs.delta, stats["dropped_over_delta"], stats["audits_total"],
                            stats["audits_total_over"], stats["audits_later"], stats["audits_later_over"],
                            stats["budget_shift_mean"], *((stats["err_mean"], stats["err_p99"]) if err else ()))
            if self._metrics_on:
                self._export_metrics(stats)

    _METRICS = (("pages_read_frac", "Fraction of KV pages the last decode batch read (PrHS/ART)."),
                ("delta_hat_mean", "Mean pre-hoc upper bound (per-page key min/max) on the dropped attention mass "
                                   "of the last decode batch's selection at its last selecting layer."),
                ("delta_hat_max", "Largest pre-hoc upper bound (per-page key min/max) on the dropped attention mass "
                                  "of the last decode batch's selection at its last selecting layer."),
                ("art_stop_rate", "Fraction of (request, KV head) pairs where ART stopped early."),
                ("blocks_read_mean", "Mean KV pages read per (request, KV head) in the last decode batch."),
                ("dropped_mean", "Mean audited attention mass a decode step dropped (--prhs-audit-interval)."),
                ("dropped_p99", "99th percentile of the audited dropped attention mass."),
                ("dropped_over_delta", "Share of audits whose dropped attention mass (with --prhs-audit-measure "
                                       "output-error: output error) exceeded --prhs-delta."),
                ("err_mean", "Mean audited relative error of the layer's attention output over all its query heads "
                             "(--prhs-audit-measure output-error)."),
                ("err_p99", "99th percentile of the audited relative error of the layer's attention output."),
                ("audits_total", "Audits (request, layer) since start."),
                ("audits_total_over", "Audits since start whose dropped attention mass exceeded --prhs-delta."),
                ("audits_later", "Audits since start after a request's first decode step."),
                ("audits_later_over", "Audits since start after a request's first decode step whose dropped "
                                      "attention mass exceeded --prhs-delta."),
                ("dropped_over_delta_later", "Share of the audits after a request's first decode step whose dropped "
                                             "attention mass exceeded --prhs-delta (since start)."),
                ("budget_shift_mean", "Mean log2 PrHS budget scale (audit feedback) over the last decode batch's "
                                      "requests and selection groups."))

    def _export_metrics(self, stats: dict) -> None:
        """Publish the statistics on SGLang's Prometheus endpoint (``--enable-metrics``)."""
        if self._gauges is None:
            # imported late, as SGLang does, after PROMETHEUS_MULTIPROC_DIR is set
            from prometheus_client import Gauge

            self._gauges = {name: Gauge(f"sglang_sparse:{name}", doc, labelnames=["tp_rank"],
                                        multiprocess_mode="mostrecent") for name, doc in self._METRICS}
        for name, gauge in self._gauges.items():
            if name in stats:
                gauge.labels(tp_rank=self._tp_rank).set(stats[name])
