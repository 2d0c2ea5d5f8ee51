"""``SparseDecodeWrapper``: PrHS page selection + split-KV paged decode + ART, FlashInfer style.

The wrapper owns every buffer. ``plan()`` runs outside CUDA graphs: it copies the batch's pages out
of SGLang's ``req_to_token`` (one small kernel, no host synchronisation) and fixes the settings.
``run()`` launches only kernels on preallocated buffers (no allocation, no host sync, no Python
branch on tensor values), so it can be captured in a CUDA graph and replayed after each new
``plan()`` with the same batch size and settings.

Kernels and their references (``sglang_sparse``)::

    plan  kernels.page_table     req_to_token -> page table, page counts   prhs.page_lengths, params.page_budget
    run   kernels.page_bounds    Quest ub/lb per page and KV head         prhs.page_bounds
          kernels.page_estimate  page masses from 4-bit key codes         prhs.estimated_page_log_mass
          kernels.page_select    page selection (bounds or estimates)     prhs.select_pages(_estimated)
          kernels.page_dilate    reuse of the last selection (+-r pages)  prhs.reuse_with_dilation
          kernels.paged_decode   split-KV decode (+ ART) and merge        prhs.sparse_attention / dense_attention,
                                                                          art.art_attention

What a plan reads (``plan(pages=..., art=...)``, parameter objects of :mod:`flashinfer_ext.params`):

* ``pages=None``: every page in natural order (no summaries needed); with ``art``, ART in page order
  (no certified test).
* ``pages=PageSelectParams(...)``: PrHS, sinks + recents + the highest-bound pages until the certified
  ``delta_hat <= delta`` or the budget; ART (optional) walks that list in order.
  ``pages.every_page()`` (budget = every page, delta 0) orders the whole list by descending upper bound,
  so that dense + ART walks the important pages first.
* ``pages=PageSelectParams(..., estimate=True)`` (wrapper built with ``estimate=True``): the same list built from
  each page's attention mass estimated from 4-bit key codes (``run(codes=...)``), until the *estimated* dropped mass
  is ``<= delta`` or the budget (``prhs.select_pages_estimated``); ``delta_hat`` is then that estimate. ART's
  certified test needs bounds and is refused. Without ART, with delta > 0 and a budget of every page, the list holds
  the same pages found without sorting (a threshold search over the estimated masses), the forced pages first, then
  the kept ones in ascending id: nothing reads that list in order.

Reuse across layers (PrHS's layer axis, ``SelectionSchedule.SHARE``): call ``run(..., select=False)``
on the layers that share the selection of the group's leader layer; the list of the leader's ``run``
is read again (logical pages, valid for every layer). The leader's bound on the dropped mass was computed
from the leader's queries and keys and says nothing of a sharing layer, whose ``delta_hat`` is NaN (no
certificate); ``leader_delta_hat`` keeps the leader's. For the same reason ART runs there without its
certified test (the leader's suffix bounds would certify this layer's unread mass from the leader's keys):
only the magnitude/direction test, ``art_delta_hat`` NaN where it stopped.

Reuse across decode steps (time axis, ``SelectionSchedule.SELECT`` / ``DILATE``): ``plan(reselect=...)``
with a bool or a ``[bs]`` bool tensor (per request: True = select afresh this step, False = reuse the
request's last fresh selection widened by ``pages.dilation`` pages, plus sinks, recents and pages appended
since, as ``prhs.reuse_with_dilation``). The choice is a device flag per request, so one captured graph
serves both kinds of steps; the leader layer's ``run`` launches the selector and the reuse kernel and
each does only its requests. Fresh selections are kept per ``req_to_token`` row (requests may move
within the batch between steps) and per leader layer (``run(reuse_slot=k)``, ``reuse_slots`` slots
built into the wrapper). ``reselect=None`` (default) always selects and launches no reuse kernel.
A reused list carries no certificate (``delta_hat`` NaN) and no ART certified bound.

Per-request budget scale (the dropped-mass audit's feedback, ``sglang_sparse.sparse_decode``): ``plan(...,
budget_max_shift=s)`` sizes the lists and launch shapes for budgets up to ``budget << s``, and ``run(...,
budget_shift=t)`` (an int32 tensor indexed by ``req_to_token`` row) makes a fresh selection of row r take up to
``min(N, budget << t[r])`` pages. Without them the launches are those of an unscaled plan.

Statistics after ``run`` (views over the first ``bs`` rows, valid until the next ``run``):
``blocks_read [bs, H_q]`` int32 pages read by the head's KV group, ``stop_reason [bs, H_q]`` int32
(``sglang_sparse.art.STOP_*``), ``art_delta_hat [bs, H_q]`` fp32 ART's unread-mass bound at
termination (0 when every listed page was read; NaN where it stopped without page bounds: natural order, a
reused list, a layer sharing the leader's list), ``lse [bs, H_q]`` fp32 natural-log normaliser of
what was read, ``num_selected [bs, H_kv]`` int32, ``delta_hat [bs, H_kv]`` fp32 (PrHS pre-hoc bound on the
dropped mass of the layer just run: NaN for a layer sharing the leader's list, which has no bound of its own;
0 in dense mode) and ``leader_delta_hat`` (the same for the last selecting layer, kept across shared layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from flashinfer_ext.kernels.page_bounds import _page_bounds_kernel
from flashinfer_ext.kernels.page_dilate import _page_dilate_kernel
from flashinfer_ext.kernels.page_estimate import _page_estimate_kernel
from flashinfer_ext.kernels.page_select import _page_select_kernel
from flashinfer_ext.kernels.page_table import _page_table_kernel
from flashinfer_ext.kernels.paged_decode import _decode_split_kernel, _merge_splits_kernel
from flashinfer_ext.params import ArtParams, LaunchTuning, PageSelectParams
from flashinfer_ext.summaries import key_codes_supported

_LOG2E = 1.4426950408889634



def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


@dataclass(frozen=True)
class _Launch:
    """The launch shapes of one plan (``_launch_tuning``)."""

    num_splits: int          # KV splits per (request, KV head); with ART, 1 head program + the tail programs
    head_len: int            # ART's sequential head (0 without ART)
    pages_per_iter: int      # pages gathered per decode iteration (ART's head reads one page per iteration)
    num_warps: int           # decode kernel
    num_stages: int
    select_warps: int
    bounds_block_p: int      # page-bound kernel: pages per chunk, warps, chunks per program
    bounds_warps: int
    bounds_iters: int


def estimate_pages_per_dot(group: int) -> int:
    """Pages per ``tl.dot`` of the estimate kernel: as many as fill its 16 query columns (``KP * G <= 16``, at most
    4), since a wider query tile pads to 32 columns and wastes half of each product. On an H200 at 8 x 32K: 4 query
    heads per KV head (Llama-3.1-8B, 64-token pages) 138 us with 4 pages per dot, 175 us with 2, 176 us with 1
    (decode_breakdown_h200_estimate_kp.json); 6 (Qwen2.5-Coder-1.5B, 32-token pages) 52 us with 2, 66 us with 4
    (decode_breakdown_h200_qwen1.5b_heads.json)."""
    kp = 1
    while kp < 4 and 2 * kp * group <= 16:
        kp *= 2
    return kp


def select_warps_for(block_pg: int, sort_width: int) -> int:
    """Warps of the selection kernel: 4 up to 512 pages in its tile, 8 up to 2048, else 16; and 16 whenever its lists
    may hold 2048 or more pages (measured when the estimate mode sorted every page: on an H200, 8 requests x 2 KV
    heads of 1,062 pages took 41 us with 16 warps, 55 us with 8 and 74 us with 4,
    decode_breakdown_h200_qwen1.5b_heads.json; with a 1/16 budget's short sort 8 stayed best, 16.0 against 17.7).
    The estimate mode now sorts only with ART or a budget below every page; its threshold search over a 1024-page
    tile took 13.4 us with 8 warps and 17.3 with 16 on an H100 (decode_breakdown_h100_threshold_select.json); over
    2048+ pages it has not been timed."""
    if sort_width >= 2048:
        return 16
    return 4 if block_pg <= 512 else 8 if block_pg <= 2048 else 16


def _launch_tuning(t: LaunchTuning, *, bs: int, h_kv: int, page_size: int, num_sms: int, max_splits: int,
                   block_pg: int, list_len: int, art: bool, sort_width: int = 0) -> _Launch:
    """The launch shapes for ``bs`` requests whose lists hold up to ``list_len`` pages; a field of ``t`` that is
    not None replaces the choice made here.

    * splits: about 8 programs per SM in total (many short programs balance the SMs; a tail wave of a few
      long ones would idle most of the GPU), but at least 512 tokens per split (16 pages for pages under
      32 tokens);
    * ART: when ``bs * H_kv`` fills half the SMs, the sequential head is the whole list if it has at most 256
      pages (exact reference semantics), else 64 pages; for smaller batches 8 pages, the rest of the list being
      split over tail programs that run alongside it, at least 8 pages each;
    * the decode kernel gathers 64 rows per iteration (at least one page) with 4 warps and 3 stages (Triton
      turns the K/V gathers into cp.async copies one iteration ahead);
    * the selection kernel: :func:`select_warps_for` (``sort_width``: the pages it sorts); the bound kernel
      scores 64-page chunks, one per program, with 4 warps.
    """
    P = page_size
    base = bs * h_kv
    target = 8 * num_sms
    if art:
        head = t.art_head_pages
        if head is None:
            head = (list_len if list_len <= 256 else 64) if base * 2 >= num_sms else 8
        head_len = max(1, int(head))
        tail = max(0, list_len - head_len)
        if t.num_splits is None:
            tail_pages = 8 if t.art_tail_pages is None else int(t.art_tail_pages)
            if tail_pages < 1:
                raise ValueError(f"art_tail_pages must be >= 1, got {tail_pages}")
            tail_splits = min(triton.cdiv(target, base), tail // tail_pages) if tail > 0 else 0
            tail_splits = max(tail_splits, 1 if tail > 0 else 0)
        else:
            tail_splits = max(0, int(t.num_splits) - 1)
        num_splits = 1 + min(tail_splits, max_splits - 1)
    else:
        head_len = 0
        splits = t.num_splits
        if splits is None:
            min_split_pages = max(1, min(16, 512 // P))
            splits = min(triton.cdiv(target, base), max(1, list_len // min_split_pages))
        num_splits = max(1, min(int(splits), max_splits))
    block_p = 64 if t.bounds_block_p is None else int(t.bounds_block_p)
    if block_p < 16 or block_p & (block_p - 1):
        raise ValueError(f"bounds_block_p must be a power of two >= 16, got {block_p}")
    iters = 1 if t.bounds_iters is None else int(t.bounds_iters)
    if iters < 1:
        raise ValueError(f"bounds_iters must be >= 1, got {iters}")
    return _Launch(num_splits=num_splits, head_len=head_len,
                   pages_per_iter=t.pages_per_iter or max(1, 64 // P),
                   num_warps=t.num_warps or 4, num_stages=t.num_stages or 3,
                   select_warps=t.select_warps or select_warps_for(block_pg, sort_width),
                   bounds_block_p=block_p, bounds_warps=t.bounds_warps or 4, bounds_iters=iters)


class SparseDecodeWrapper:
    """Sparse (PrHS) / dense paged decode with optional ART, for one KV layout.

    Args:
        num_qo_heads, num_kv_heads: H_q and H_kv (GQA: query head h reads KV head ``h // (H_q/H_kv)``).
        head_dim: D of q and k; ``head_dim_v``: Dv of v (default D).
        page_size: P, SGLang's ``--page-size`` (a power of two >= 16); page id = ``slot // P``.
        max_batch_size: largest batch ``plan()`` will see (buffers are sized for it).
        max_seq_len: longest context (tokens) of a request, including the token being decoded.
        max_budget_pages: width of the page lists (default: all pages of ``max_seq_len``; smaller
            saves memory but caps the budget and forbids the bound-ordered dense+ART mode beyond it).
        max_num_splits: most KV splits per (request, KV head).
        device: where the buffers live.
        reuse_slots: number of selections kept per request for reuse across decode steps (one per
            leader layer that reuses; 0 = no reuse, ``plan(reselect=...)`` unavailable).
        max_reqs: rows of ``req_to_token`` (the state is keyed by row); needed with ``reuse_slots``.
        reuse_width: pages kept per (request, KV head) and slot (default ``max_budget_pages``): the
            largest fresh list that must survive (the plan's budget).
        check: every eager ``run`` synchronises and validates the page lists it is about to read and the output
            it wrote (``validate_lists``, ``validate_output``); a violation raises with the offending rows.
            Slow (a host round trip per call), for debugging.
        estimate: keep the buffer of per-query-head page estimates that ``PageSelectParams(estimate=True)`` plans
            need (``max_batch_size * H_q * next_pow2(max pages)`` fp32).
    """

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 max_batch_size: int, max_seq_len: int, head_dim_v: Optional[int] = None,
                 max_budget_pages: Optional[int] = None, max_num_splits: int = 64, device="cuda",
                 reuse_slots: int = 0, max_reqs: Optional[int] = None, reuse_width: Optional[int] = None,
                 check: bool = False, estimate: bool = False):
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads={num_qo_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        if page_size < 16 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 16, got {page_size}")
        self.h_q, self.h_kv = num_qo_heads, num_kv_heads
        self.group = num_qo_heads // num_kv_heads
        self.g_pad = max(16, triton.next_power_of_2(self.group))    # query rows of a GQA group, padded for tl.dot
        self.d = head_dim
        self.dv = head_dim if head_dim_v is None else head_dim_v
        self.page_size = page_size
        self.max_bs = max_batch_size
        self.max_pages = triton.cdiv(max_seq_len, page_size)
        self.max_sel = self.max_pages if max_budget_pages is None else min(self.max_pages, int(max_budget_pages))
        self.max_splits = max_num_splits
        self.device = torch.device(device)
        self.num_sms = _num_sms(self.device)
        self.block_pg = triton.next_power_of_2(self.max_pages)
        if self.block_pg > 32768:
            # the selector's packed counts use 16-bit fields; its register tile holds every page
            raise ValueError(f"{self.max_pages} pages per request exceed the selector's 32768-page limit")

        dev = self.device
        i32 = dict(dtype=torch.int32, device=dev)
        f32 = dict(dtype=torch.float32, device=dev)
        bs, hq, hk = max_batch_size, num_qo_heads, num_kv_heads
        self.page_table = torch.full((bs, self.max_pages), -1, **i32)
        self.num_pages = torch.zeros(bs, **i32)
        self.last_len = torch.zeros(bs, **i32)
        self.budget = torch.zeros(bs, **i32)
        self.dense_req = torch.zeros(bs, **i32)      # 1: context below pages.dense_below_len, every page read
        self.ub = torch.empty(bs, hk, self.block_pg, **f32)
        self.lb = torch.empty(bs, hk, self.block_pg, **f32)
        self.est = torch.empty(bs, hq, self.block_pg, **f32) if estimate else None
        # the estimate kernel's launch: pages per program, warps, pipeline stages, pages per tl.dot
        # (benchmarks.decode_breakdown --estimate-shapes; see estimate_pages_per_dot)
        self.estimate_shape = (8, 4, 2, estimate_pages_per_dot(hq // hk))
        # this step's fresh selection per (batch row, KV head): logical pages in read order, count
        self.sel_pages = torch.full((bs, hk, self.max_sel), -1, **i32)
        self.num_sel = torch.zeros(bs, hk, **i32)
        # the list the decode reads this step (fresh or reused): physical pages, count, ART suffix bounds
        self.cur_pages = torch.full((bs, hk, self.max_sel), -1, **i32)     # logical, reused steps only
        self.cur_phys = torch.full((bs, hk, self.max_sel), -1, **i32)
        self.cur_num = torch.zeros(bs, hk, **i32)
        self.cur_rest = torch.full((bs, hk, self.max_sel), float("-inf"), **f32)
        self.cur_dhat = torch.zeros(bs, hk, **f32)
        # the certificate of the last selecting run's list (the group leader's); layers sharing it leave it alone
        self.lead_dhat = torch.zeros(bs, hk, **f32)
        self.sel_scratch = torch.empty(bs, hk, max(16, triton.next_power_of_2(self.max_sel)), dtype=torch.int64,
                                       device=dev)
        self.bitmap = torch.zeros(bs, hk, self.block_pg, dtype=torch.int8, device=dev)
        self.reselect_flag = torch.ones(bs, **i32)
        self.req_idx = torch.zeros(bs, **i32)
        # per-request state for reuse across steps: [slot, req_to_token row, KV head, pages]
        self.reuse_slots = int(reuse_slots)
        if self.reuse_slots > 0:
            if max_reqs is None:
                raise ValueError("reuse_slots needs max_reqs (the number of req_to_token rows)")
            self.reuse_width = min(self.max_sel, int(reuse_width or self.max_sel))
            self.state_pages = torch.full((self.reuse_slots, max_reqs, hk, self.reuse_width), -1, **i32)
            self.state_num = torch.zeros(self.reuse_slots, max_reqs, hk, **i32)
            self.state_npg = torch.zeros(self.reuse_slots, max_reqs, **i32)
        else:
            self.reuse_width = 1
            self.state_pages = torch.full((1, 1, hk, 1), -1, **i32)
            self.state_num = torch.zeros(1, 1, hk, **i32)
            self.state_npg = torch.zeros(1, 1, **i32)
        self.mid_o = torch.empty(bs, hq, max_num_splits, self.dv, **f32)
        self.mid_lse = torch.empty(bs, hq, max_num_splits, **f32)
        self.blocks_read_buf = torch.zeros(bs, hq, **i32)
        self.stop_reason_buf = torch.zeros(bs, hq, **i32)
        self.art_dhat_buf = torch.zeros(bs, hq, **f32)
        self.lse_buf = torch.zeros(bs, hq, **f32)
        # ART: per (request, KV head) stop flag raised by the head for its tails, pages loaded this step
        # (both reset by the merge kernel), and the pages loaded per query head, published by the merge
        self.art_flag = torch.zeros(bs, hk, **i32)
        self.art_loaded = torch.zeros(bs, hk, **i32)
        self.pages_loaded_buf = torch.zeros(bs, hq, **i32)
        self._out = None
        self._planned = False
        self.check = bool(check)

    # ------------------------------------------------------------------ plan
    def plan(self, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, *,
             pages: Optional[PageSelectParams] = None, art: Optional[ArtParams] = None, reselect=None,
             kv_start: Optional[torch.Tensor] = None, q_dtype: torch.dtype = torch.bfloat16,
             sm_scale: Optional[float] = None, tuning: Optional[LaunchTuning] = None,
             budget_max_shift: int = 0) -> None:
        """Prepare a decode batch (outside CUDA graphs; launches one kernel, no host sync).

        Args:
            req_to_token: ``[max_reqs + 1, max_ctx]`` int32, SGLang's (req_pool_idx, position) -> slot.
            req_pool_indices: ``[bs]`` int32/int64 rows of ``req_to_token``.
            seq_lens: ``[bs]`` int32/int64 context lengths *including* the token decoded now (its K/V
                must be in the pool when ``run`` executes).
            pages: PrHS's page selection (sinks + recents + the highest-bound pages until the certified
                ``delta_hat <= delta`` or the budget); ``None`` reads every page in natural order (dense).
                ``pages.every_page()`` lists every page in descending-bound order (dense + ART walking the
                important pages first).
            art: ART's termination test over the list (``None`` = off). Its certified test (``eps_cert``)
                needs page bounds, i.e. ``pages``.
            reselect: None (select every step), or a bool / ``[bs]`` bool tensor: which requests
                select afresh this step; the others reuse their last fresh selection (``pages.dilation``
                pages around each kept page, plus sinks, recents and new pages). See the module doc.
            kv_start: optional ``[bs]`` int32/int64 device tensor: request ``i`` attends only to
                positions ``[kv_start[i], seq_lens[i])`` (each a multiple of the page size); the page
                table, page counts, sinks and recents are those of that suffix. CLAA's layers after the
                filter layer (their KV holds only the kept tokens, in the request's last slots).
            q_dtype: dtype of q and of the output (the KV dtype in SGLang).
            sm_scale: logit scale, default ``1/sqrt(head_dim)``.
            tuning: launch-shape overrides (benchmarks); default the wrapper's own (``_launch_tuning``).
            budget_max_shift: with ``pages``, the largest per-request budget scale ``run(budget_shift=...)`` may
                pass (a request's budget is then up to ``budget << budget_max_shift`` pages): the lists and the
                launch shapes are sized for it. 0 (default): no scale.
        """
        bs = int(req_pool_indices.shape[0])
        if bs > self.max_bs or bs < 1:
            raise ValueError(f"batch of {bs} requests; this wrapper holds 1..{self.max_bs}")
        if art is not None and art.eps_cert is not None and pages is None:
            raise ValueError("ART's certified test needs page bounds: plan with pages (pages.every_page() for "
                             "every page in bound order)")
        if pages is not None and pages.estimate:
            if self.est is None:
                raise ValueError("plan(pages=PageSelectParams(estimate=True)) needs a wrapper built with estimate=True")
            if not key_codes_supported(self.d):
                raise ValueError(f"the key-code estimate needs a power-of-two head_dim >= 32, got {self.d}")
            if art is not None and art.eps_cert is not None:
                raise ValueError("ART's certified test needs page bounds; estimated page masses bound nothing")
        if reselect is not None and self.reuse_slots == 0:
            raise ValueError("plan(reselect=...) needs a wrapper built with reuse_slots >= 1")
        P = self.page_size
        self.bs = bs
        self.pages_params, self.art_params = pages, art
        self.select = pages is not None
        self.estimate = self.select and pages.estimate
        self.mode = ("prhs-estimate" if self.estimate else "prhs") if self.select else "dense"
        self.art = art is not None
        self.sm_scale = 1.0 / math.sqrt(self.d) if sm_scale is None else float(sm_scale)
        self.delta = pages.delta if self.select else 0.0
        self.sink_pages = pages.sink_pages if self.select else 0
        self.recent_pages = pages.recent_pages if self.select else 0
        self.dilation = pages.dilation if self.select else 0
        self.reuse = reselect is not None and self.select
        self.req_idx[:bs].copy_(req_pool_indices.reshape(-1), non_blocking=True)
        if reselect is None or isinstance(reselect, bool):
            self.reselect_flag[:bs].fill_(0 if reselect is False else 1)
        else:
            self.reselect_flag[:bs].copy_(reselect.reshape(-1)[:bs], non_blocking=True)
        self._reused_all = reselect is False
        if not self.select:
            self.lead_dhat[:bs].zero_()

        lut, self.list_max = self._budget_lut(pages)
        self.max_shift = int(budget_max_shift) if self.select else 0
        if self.max_shift < 0:
            raise ValueError(f"budget_max_shift must be >= 0, got {budget_max_shift}")
        if self.max_shift:
            self.list_max = min(self.max_sel, self.list_max << self.max_shift)
        dense_below = pages.dense_below_len if self.select else 0
        if dense_below > 0:     # the longest context below the minimum reads all its pages
            self.list_max = max(self.list_max, min(self.max_sel, self.max_pages, triton.cdiv(dense_below - 1, P)))
        _page_table_kernel[(bs, triton.cdiv(self.max_pages, 256))](
            req_to_token, req_to_token.stride(0), req_pool_indices, seq_lens, self.page_table,
            self.page_table.stride(0), self.num_pages, self.last_len, self.budget, lut, self.max_pages,
            kv_start if kv_start is not None else seq_lens, self.dense_req, dense_below, self.max_sel,
            P=P, BLOCK=256, HAS_START=kv_start is not None, num_warps=4)

        # static sizing (depends only on bs, the settings and the hint, so graph replays agree)
        tuning = tuning or LaunchTuning()
        hint_pages = triton.cdiv(tuning.seq_len_hint, P) if tuning.seq_len_hint else self.max_pages
        hint_pages = min(hint_pages, self.max_pages)
        list_len = pages.budget_pages(hint_pages) if self.select else hint_pages
        if self.max_shift:      # the longest list a scaled budget may give (ART's head and tails must cover it)
            list_len = min(list_len << self.max_shift, hint_pages)
        list_len = max(1, min(list_len, self.max_sel if self.select else hint_pages))
        self.launch = _launch_tuning(tuning, bs=bs, h_kv=self.h_kv, page_size=P, num_sms=self.num_sms,
                                     max_splits=self.max_splits, block_pg=self.block_pg, list_len=list_len,
                                     art=self.art, sort_width=self._sort_pad() if self.select else 0)
        if self._out is None or self._out.dtype != q_dtype:
            self._out = torch.empty(self.max_bs, self.h_q, self.dv, dtype=q_dtype, device=self.device)
        self._planned = True

    def _budget_lut(self, pages: Optional[PageSelectParams]):
        """(device table ``[max_pages + 1]``: page budget of a request of N pages, largest budget),
        cached per setting: :func:`flashinfer_ext.params.page_budget` (all N pages in dense mode), capped by
        the list width. Contexts below ``pages.dense_below_len`` tokens take every page in the page-table
        kernel instead (a token threshold, which a table over page counts cannot hold)."""
        key = None if pages is None else (pages.budget, pages.sink_pages, pages.recent_pages)
        cache = self.__dict__.setdefault("_lut_cache", {})
        if key not in cache:
            vals = [min(self.max_sel, n if pages is None else pages.budget_pages(n))
                    for n in range(self.max_pages + 1)]
            cache[key] = (torch.tensor(vals, dtype=torch.int32).to(self.device, non_blocking=True), max(1, max(vals)))
        return cache[key]

    # ------------------------------------------------------------------ run
    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            kmin: Optional[torch.Tensor] = None, kmax: Optional[torch.Tensor] = None,
            out: Optional[torch.Tensor] = None, select: bool = True, reuse_slot: int = 0,
            budget_shift: Optional[torch.Tensor] = None, codes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decode attention for the planned batch (graph-capturable).

        Args:
            q: ``[bs, H_q, D]`` (unit last stride), the dtype given to ``plan``.
            k_cache: ``[num_slots, H_kv, D]``, v_cache ``[num_slots, H_kv, Dv]``: one layer of
                SGLang's pool (bf16; unit last stride; the current token already written).
            kmin, kmax: ``[num_pages, H_kv, D]`` this layer's page summaries (``PageSummaries.layer``),
                required when the plan selects pages (PrHS, or dense + ART in bound order).
            out: ``[bs, H_q, Dv]`` output; default the wrapper's own buffer (returned).
            select: False reuses the page lists of the previous selecting ``run`` (layer sharing).
            reuse_slot: with ``plan(reselect=...)``: which per-request state slot this (leader) layer
                keeps its fresh selection in and reuses from, ``0 <= reuse_slot < reuse_slots``.
            budget_shift: optional int32 tensor indexed by ``req_to_token`` row (``[max_reqs + 1]``, any
                stride, e.g. a column of a ``[max_reqs + 1, groups]`` table): a fresh selection of that row
                takes ``min(pages, list width, budget << shift)`` pages (plan with ``budget_max_shift``, which
                sizes the lists). Read on the device by the selector; selecting runs only.
            codes: ``[num_slots, H_kv, D / 2]`` uint8 this layer's 4-bit key codes (``PageSummaries.layer_codes``),
                required when the plan estimates page masses (``PageSelectParams(estimate=True)``).
        Returns ``out``.
        """
        if not self._planned:
            raise RuntimeError("call plan() before run()")
        bs = self.bs
        if q.shape[0] != bs or q.shape[1] != self.h_q or q.shape[2] != self.d:
            raise ValueError(f"q {tuple(q.shape)} does not match the plan ({bs}, {self.h_q}, {self.d})")
        if out is None:
            out = self._out[:bs]
        if self.select and select:
            if kmin is None or kmax is None:
                raise ValueError("this plan selects pages: pass the layer's kmin/kmax summaries")
            if self.reuse and not 0 <= reuse_slot < self.reuse_slots:
                raise ValueError(f"reuse_slot {reuse_slot} outside [0, {self.reuse_slots})")
            if budget_shift is not None and (budget_shift.dim() != 1 or budget_shift.dtype != torch.int32):
                raise ValueError(f"budget_shift must be a 1-D int32 tensor, got {budget_shift.dtype} "
                                 f"{tuple(budget_shift.shape)}")
            if self.estimate:
                if codes is None or codes.dtype != torch.uint8 or tuple(codes.shape[1:]) != (self.h_kv, self.d // 2):
                    raise ValueError(f"this plan estimates page masses: pass the layer's uint8 key codes "
                                     f"[slots, {self.h_kv}, {self.d // 2}]")
                self._launch_estimate(q, kmin, kmax, codes, k_cache)
            else:
                self._launch_bounds(q, kmin, kmax)
            self._launch_select(reuse_slot, budget_shift)
        elif self.select:
            # a layer sharing the leader's list (its own queries and keys, no bounds): no certificate
            self.cur_dhat[:bs].fill_(float("nan"))
        else:
            self.cur_dhat[:bs].zero_()
        checking = self.check and not (q.is_cuda and torch.cuda.is_current_stream_capturing())
        if checking:
            self.validate_lists(k_cache.shape[0])
        self._launch_decode(q, k_cache, v_cache, out, shared=self.select and not select)
        if checking:
            self.validate_output(out)
        return out

    # ------------------------------------------------------------------ checks (``check=True``)
    def validate_lists(self, num_slots: int) -> None:
        """Host-side check of what the decode is about to read (synchronises; for debugging only): page
        counts within the table, table entries within a pool of ``num_slots`` slots, and with selection
        each (request, KV head) list within its budget, made of pages of its own table, without repeats."""
        bs, P = self.bs, self.page_size
        n = self.num_pages[:bs].cpu()
        table = self.page_table[:bs].cpu()
        pool_pages = triton.cdiv(int(num_slots), P)
        bad = []
        for b in range(bs):
            nb = int(n[b])
            if not 1 <= nb <= self.max_pages:
                bad.append(f"row {b}: {nb} pages (1..{self.max_pages} allowed)")
                continue
            row = table[b, :nb]
            if bool(((row < 0) | (row >= pool_pages)).any()):
                bad.append(f"row {b}: page table entries outside [0, {pool_pages}): {row.tolist()[:16]}")
        if self.select and not bad:
            num = self.cur_num[:bs].cpu()
            phys = self.cur_phys[:bs].cpu()
            cap = self.max_sel
            for b in range(bs):
                own = set(table[b, :int(n[b])].tolist())
                for h in range(self.h_kv):
                    k = int(num[b, h])
                    lst = phys[b, h, :max(0, min(k, cap))].tolist()
                    if not 1 <= k <= min(cap, int(n[b])):
                        bad.append(f"row {b} head {h}: list of {k} pages (1..{min(cap, int(n[b]))} allowed)")
                    elif any(p not in own for p in lst) or len(set(lst)) != len(lst):
                        bad.append(f"row {b} head {h}: list {lst[:16]} has pages outside its table or repeats")
        if bad:
            raise RuntimeError(f"decode check: invalid decode page lists (bs={bs}, mode={self.mode}, "
                               f"art={self.art}): " + "; ".join(bad[:8]))

    def validate_output(self, out: torch.Tensor) -> None:
        """Host-side check that the decode wrote a finite output and normaliser for every row."""
        bs = self.bs
        o_bad = ~torch.isfinite(out[:bs].float()).all(dim=-1)
        l_bad = ~torch.isfinite(self.lse_buf[:bs])
        if bool(o_bad.any()) or bool(l_bad.any()):
            rows = torch.nonzero(o_bad | l_bad).tolist()[:8]
            raise RuntimeError(f"decode check: non-finite decode output or lse at (row, q head) {rows} "
                               f"(bs={bs}, mode={self.mode}, art={self.art}, splits={self.launch.num_splits})")

    # The three stages of ``run`` (also timed one by one by benchmarks/decode_breakdown.py).
    def _bounds_chunking(self):
        """Programs per (request, KV head) of the page-bound computation, and its constexprs."""
        block_p, iters = self.launch.bounds_block_p, self.launch.bounds_iters
        return triton.cdiv(self.max_pages, block_p * iters), dict(
            G=self.group, G_PAD=self.g_pad, D=self.d, BLOCK_D=triton.next_power_of_2(self.d), BLOCK_P=block_p,
            ITERS=iters, NUM_STAGES=2 if iters > 1 else 1)

    def _launch_bounds(self, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> None:
        chunks, meta = self._bounds_chunking()
        _page_bounds_kernel[(self.bs, self.h_kv, chunks)](
            self.reselect_flag, q, kmin, kmax, self.page_table, self.num_pages, self.ub, self.lb,
            q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1), self.page_table.stride(0),
            self.ub.stride(0), self.ub.stride(1), self.sm_scale, **meta, num_warps=self.launch.bounds_warps)

    def _launch_estimate(self, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, codes: torch.Tensor,
                         k_cache: torch.Tensor) -> None:
        pages, warps, stages, per_dot = self.estimate_shape
        if pages % per_dot:
            raise ValueError(f"estimate_shape: {pages} pages per program is not a multiple of {per_dot} per tl.dot")
        _page_estimate_kernel[(self.bs, self.h_kv, triton.cdiv(self.max_pages, pages))](
            self.reselect_flag, q, kmin, kmax, codes, k_cache, self.page_table, self.num_pages, self.last_len,
            self.est, q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1), codes.stride(0), codes.stride(1),
            k_cache.stride(0), k_cache.stride(1), self.page_table.stride(0), self.est.stride(0), self.est.stride(1),
            self.sm_scale, G=self.group, G_PAD=max(16, triton.next_power_of_2(self.group * per_dot)),
            HALF_D=self.d // 2, P=self.page_size, PAGES=pages, KP=per_dot, NUM_STAGES=stages, num_warps=warps)

    def _select_state(self, reuse_slot: int):
        """The per-request selection state of ``reuse_slot`` (slot 0's, unused, when nothing is reused)."""
        slot = reuse_slot if self.reuse else 0
        return self.state_pages[slot], self.state_num[slot], self.state_npg[slot]

    def _sort_pad(self) -> int:
        """The selection kernel's sort width: the plan's longest list, a power of two."""
        return max(16, triton.next_power_of_2(self.list_max))

    def _select_meta(self) -> dict:
        return dict(P=self.page_size, BLOCK_PG=self.block_pg, SORT_PAD=self._sort_pad(),
                    DELTA_ZERO=self.delta <= 0.0, WRITE_REST=self.art, WRITE_STATE=self.reuse)

    def _log_ratio(self) -> float:
        """What the selector compares with: ``log(delta / (1 - delta))`` for the bound ratio ``U / Z_lb``; in estimate
        mode ``log delta`` for the estimated dropped mass itself."""
        if self.delta <= 0.0:
            return 0.0
        return math.log(self.delta) if self.estimate else math.log(self.delta / (1.0 - self.delta))

    def _launch_select(self, reuse_slot: int = 0, budget_shift: Optional[torch.Tensor] = None) -> None:
        bs = self.bs
        st_p, st_n, st_g = self._select_state(reuse_slot)
        _page_select_kernel[(bs, self.h_kv)](
            self.reselect_flag, self.ub, self.lb, self.num_pages, self.last_len, self.budget, self.page_table,
            self.sel_pages, self.cur_phys, self.num_sel, self.cur_num, self.cur_dhat, self.lead_dhat, self.cur_rest,
            self.req_idx, st_p, st_n, st_g, self.sel_scratch, self.dense_req,
            self.page_table.stride(0), self.ub.stride(0), self.ub.stride(1), self.sel_pages.stride(0),
            self.sel_pages.stride(1), self.sel_scratch.stride(0), self.sel_scratch.stride(1),
            st_p.stride(0), st_p.stride(1), self.reuse_width,
            self.sink_pages, self.recent_pages, self._log_ratio(), self.list_max,
            budget_shift if budget_shift is not None else self.budget,
            budget_shift.stride(0) if budget_shift is not None else 0,
            self.est if self.estimate else self.ub, self.est.stride(0) if self.estimate else 0,
            self.est.stride(1) if self.estimate else 0, float(self.delta),
            **self._select_meta(), HAS_SHIFT=budget_shift is not None, EST_G=self.group if self.estimate else 0,
            num_warps=self.launch.select_warps)
        self._launch_reuse(reuse_slot)

    def _launch_reuse(self, reuse_slot: int) -> None:
        """Requests that do not reselect this step take their kept list (dilated) instead."""
        if not self.reuse:
            return
        st_p, st_n, st_g = self._select_state(reuse_slot)
        _page_dilate_kernel[(self.bs, self.h_kv)](
            self.reselect_flag, self.req_idx, st_p, st_n, st_g, self.num_pages,
            self.page_table, self.cur_pages, self.cur_phys, self.cur_num, self.cur_dhat, self.lead_dhat, self.cur_rest,
            self.bitmap, self.page_table.stride(0), st_p.stride(0), st_p.stride(1),
            self.cur_pages.stride(0), self.cur_pages.stride(1),
            self.bitmap.stride(0), self.bitmap.stride(1), self.dilation, self.sink_pages,
            self.recent_pages, self.max_sel, BLOCK_PG=self.block_pg,
            PREV_PAD=triton.next_power_of_2(self.reuse_width),
            num_warps=self.launch.select_warps)

    def _launch_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       out: torch.Tensor, shared: bool = False) -> None:
        """``shared``: the list is the leader layer's (``run(select=False)``); its suffix bounds are the leader's,
        so ART runs without its certified test and reports no bound (NaN where it stopped)."""
        bs = self.bs
        g_pad = self.g_pad
        block_d, block_dv = triton.next_power_of_2(self.d), triton.next_power_of_2(self.dv)
        sparse = self.select
        a = self.art_params
        cert = a is not None and a.eps_cert is not None and not shared
        # the ART scalars are read only by ART's code (a constexpr), so without ART any values do
        tau_mag, tau_dir, patience, min_blocks = ((a.tau_mag, a.tau_dir, a.patience, a.min_blocks) if a
                                                  else (0.0, 0.0, 1, 1))
        args = (q, k_cache, v_cache, self.page_table, self.num_pages, self.last_len, self.cur_phys,
                self.cur_num, self.cur_rest, self.mid_o, self.mid_lse, self.blocks_read_buf,
                self.stop_reason_buf, self.art_dhat_buf, self.art_flag, self.art_loaded,
                q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
                v_cache.stride(1), self.page_table.stride(0), self.cur_phys.stride(0), self.cur_phys.stride(1),
                self.mid_o.stride(0), self.mid_o.stride(1), self.mid_o.stride(2),
                self.mid_lse.stride(0), self.mid_lse.stride(1), self.h_q,
                self.sm_scale * _LOG2E, self.launch.num_splits, self.launch.head_len, float(tau_mag),
                float(tau_dir), int(patience), float(a.eps_cert) if cert else 0.0, int(min_blocks))
        meta = dict(G=self.group, G_PAD=g_pad, D=self.d, DV=self.dv, BLOCK_D=block_d, BLOCK_DV=block_dv,
                    P=self.page_size, PPI=self.launch.pages_per_iter, SPARSE=sparse, ART=self.art, CERT=cert,
                    HAS_REST=self.art and sparse and not shared, NUM_STAGES=self.launch.num_stages, TAIL_SUB=4,
                    num_warps=self.launch.num_warps)
        _decode_split_kernel[(bs, self.h_kv, self.launch.num_splits)](*args, **meta)
        _merge_splits_kernel[(bs, self.h_q)](
            self.mid_o, self.mid_lse, self.stop_reason_buf, self.art_flag, self.art_loaded, self.pages_loaded_buf,
            out, self.lse_buf, self.launch.num_splits,
            self.mid_o.stride(0), self.mid_o.stride(1), self.mid_o.stride(2),
            self.mid_lse.stride(0), self.mid_lse.stride(1), out.stride(0), out.stride(1), self.h_q,
            DV=self.dv, BLOCK_DV=block_dv, S_PAD=triton.next_power_of_2(self.launch.num_splits), ART=self.art,
            G=self.group, G_PAD=g_pad,
            num_warps=4)

    # ------------------------------------------------------------------ results
    @property
    def blocks_read(self) -> torch.Tensor:
        return self.blocks_read_buf[: self.bs]

    @property
    def stop_reason(self) -> torch.Tensor:
        return self.stop_reason_buf[: self.bs]

    @property
    def art_delta_hat(self) -> torch.Tensor:
        return self.art_dhat_buf[: self.bs]

    @property
    def lse(self) -> torch.Tensor:
        return self.lse_buf[: self.bs]

    @property
    def pages_loaded(self) -> torch.Tensor:
        """``[bs, H_q]`` int32 pages the query head's KV group actually loaded in the last ``run``: with
        ART, the head's pages plus what the concurrent tail programs read before the stop flag reached
        them (>= ``blocks_read`` after a stop); without ART, ``blocks_read``."""
        if not self.art:
            return self.blocks_read
        return self.pages_loaded_buf[: self.bs]

    @property
    def num_selected(self) -> torch.Tensor:
        if not self.select:
            return self.num_pages[: self.bs, None].expand(self.bs, self.h_kv)
        return self.cur_num[: self.bs]

    @property
    def delta_hat(self) -> torch.Tensor:
        """PrHS pre-hoc bound on the dropped mass of the list the last ``run`` read, for that layer: NaN for a
        reused list and for a layer sharing the leader's list (``run(select=False)``: the bound was computed
        from the leader's queries and keys, it says nothing of this layer), 0 in dense mode."""
        return self.cur_dhat[: self.bs]

    @property
    def leader_delta_hat(self) -> torch.Tensor:
        """``[bs, H_kv]`` the :attr:`delta_hat` of the last selecting ``run`` (the group leader of the layers
        run since): it covers that layer only. NaN for a reused list, 0 in dense mode."""
        return self.lead_dhat[: self.bs]

    @property
    def pages(self) -> torch.Tensor:
        """``[bs, H_kv, max_sel]`` int32 logical page ids in read order, -1 padded up to the plan's
        largest budget (selecting plans). With ``plan(reselect=tensor)`` mixing fresh and reused
        requests, fresh rows are in ``sel_pages`` and reused rows in ``cur_pages``."""
        return (self.cur_pages if self._reused_all else self.sel_pages)[: self.bs]

    def bytes_read(self, kv_bytes_per_token_head: int, summary_bytes_per_page_head: int) -> torch.Tensor:
        """Bytes the last ``run`` read from HBM per request (K/V of the pages read + summaries scored).

        ``kv_bytes_per_token_head = (D + Dv) * elem``; ``summary_bytes_per_page_head = 2 * D * elem``.
        Pages read counts the full page for every loaded page (partial last pages included), as the
        kernel issues masked page loads; with ART, the pages loaded (``pages_loaded``), including tail
        pages read before a stop. Host-side helper for benchmarks (reads device tensors).
        """
        bs = self.bs
        read_pages = self.pages_loaded.reshape(bs, self.h_kv, self.group)[:, :, 0].to(torch.int64)
        kv = read_pages.sum(dim=1) * self.page_size * kv_bytes_per_token_head
        if self.select:
            kv = kv + self.num_pages[:bs].to(torch.int64) * self.h_kv * summary_bytes_per_page_head
        return kv


__all__ = ["SparseDecodeWrapper"]
