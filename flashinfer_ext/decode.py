"""``SparseDecodeWrapper``: PrHS page selection + split-KV paged decode + ART, FlashInfer style.

The wrapper owns every buffer. ``plan()`` runs outside CUDA graphs: it copies the batch's pages out
of SGLang's ``req_to_token`` (one small kernel, no host synchronisation) and fixes the settings.
``run()`` launches only kernels on preallocated buffers (no allocation, no host sync, no Python
branch on tensor values), so it can be captured in a CUDA graph and replayed after each new
``plan()`` with the same batch size and settings.

Kernels and their references (``sglang_sparse``)::

    plan  kernels.page_table     req_to_token -> page table, page counts   prhs.page_lengths, PrhsConfig.budget_pages
    run   kernels.page_bounds    Quest ub/lb per page and KV head         prhs.page_bounds
          kernels.page_select    certified selection, ordered list        prhs.select_pages
          kernels.page_dilate    reuse of the last selection (+-r pages)  prhs.reuse_with_dilation
          kernels.paged_decode   split-KV decode (+ ART) and merge        prhs.sparse_attention / dense_attention,
                                                                          art.art_attention

Modes (``plan(mode=...)``):

* ``"dense"``: every page in natural order (no summaries needed). With ``art=True`` and
  ``art_order="bound"`` (default) the pages are first ordered by descending upper bound (the
  selector with ``delta=0`` and the budget = all pages, summaries needed), since ART is meant to walk
  the important pages first; ``art_order="natural"`` runs ART in page order (no certified test).
* ``"prhs"``: sinks + recents + the highest-bound pages until the certified ``delta_hat <= delta`` or
  the budget; ART (optional) walks that list in order.

Reuse across layers (PrHS's layer axis, ``SelectionSchedule.SHARE``): call ``run(..., select=False)``
on the layers that share the selection of the group's leader layer; the list of the leader's ``run``
is read again (logical pages, valid for every layer).

Reuse across decode steps (time axis, ``SelectionSchedule.SELECT`` / ``DILATE``): ``plan(reselect=...)``
with a bool or a ``[bs]`` bool tensor (per request: True = select afresh this step, False = reuse the
request's last fresh selection widened by ``dilation`` pages, plus sinks, recents and pages appended
since, as ``prhs.reuse_with_dilation``). The choice is a device flag per request, so one captured graph
serves both kinds of steps; the leader layer's ``run`` launches the selector and the reuse kernel and
each does only its requests. Fresh selections are kept per ``req_to_token`` row (requests may move
within the batch between steps) and per leader layer (``run(reuse_slot=k)``, ``reuse_slots`` slots
built into the wrapper). ``reselect=None`` (default) always selects and launches no reuse kernel.
A reused list carries no certificate (``delta_hat`` NaN) and no ART certified bound.

Statistics after ``run`` (views over the first ``bs`` rows, valid until the next ``run``):
``blocks_read [bs, H_q]`` int32 pages read by the head's KV group, ``stop_reason [bs, H_q]`` int32
(``sglang_sparse.art.STOP_*``), ``art_delta_hat [bs, H_q]`` fp32 ART's unread-mass bound at
termination (0 when every listed page was read), ``lse [bs, H_q]`` fp32 natural-log normaliser of
what was read, ``num_selected [bs, H_kv]`` int32 and ``delta_hat [bs, H_kv]`` fp32 (PrHS pre-hoc
certificate of the selection; 0 in dense mode).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton

from flashinfer_ext.kernels.page_bounds import _page_bounds_kernel
from flashinfer_ext.kernels.page_dilate import _page_dilate_kernel
from flashinfer_ext.kernels.page_select import _bounds_select_kernel, _page_select_kernel
from flashinfer_ext.kernels.page_table import _page_table_kernel
from flashinfer_ext.kernels.paged_decode import _decode_split_kernel, _merge_splits_kernel
from sglang_sparse.config import page_budget

_LOG2E = 1.4426950408889634
# developer switch: "1" makes every eager ``run`` synchronise and validate the page lists it built and the
# output it wrote (``SparseDecodeWrapper.check``); a violation raises with the stage and the offending rows
CHECK_ENV = "SGLANG_SPARSE_CHECK"


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _pdl_default(device: torch.device) -> bool:
    """Programmatic dependent launch when ``$SGLANG_SPARSE_PDL=1`` on a Hopper or later GPU. Off by default:
    on an H200 it left PrHS decode at 128K x 8 unchanged (114.6 us with and without)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return os.environ.get("SGLANG_SPARSE_PDL") == "1" and torch.cuda.get_device_capability(device)[0] >= 9


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


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
    """

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 max_batch_size: int, max_seq_len: int, head_dim_v: Optional[int] = None,
                 max_budget_pages: Optional[int] = None, max_num_splits: int = 64, device="cuda",
                 reuse_slots: int = 0, max_reqs: Optional[int] = None, reuse_width: Optional[int] = None):
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads={num_qo_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        if page_size < 16 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 16, got {page_size}")
        self.h_q, self.h_kv = num_qo_heads, num_kv_heads
        self.group = num_qo_heads // num_kv_heads
        self.g_pad = max(16, _pow2(self.group))     # query rows of a GQA group, padded for tl.dot
        self.d = head_dim
        self.dv = head_dim if head_dim_v is None else head_dim_v
        self.page_size = page_size
        self.max_bs = max_batch_size
        self.max_pages = triton.cdiv(max_seq_len, page_size)
        self.max_sel = self.max_pages if max_budget_pages is None else min(self.max_pages, int(max_budget_pages))
        self.max_splits = max_num_splits
        self.device = torch.device(device)
        self.num_sms = _num_sms(self.device)
        self.block_pg = _pow2(self.max_pages)
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
        self.ub = torch.empty(bs, hk, self.block_pg, **f32)
        self.lb = torch.empty(bs, hk, self.block_pg, **f32)
        # this step's fresh selection per (batch row, KV head): logical pages in read order, count
        self.sel_pages = torch.full((bs, hk, self.max_sel), -1, **i32)
        self.num_sel = torch.zeros(bs, hk, **i32)
        # the list the decode reads this step (fresh or reused): physical pages, count, ART suffix bounds
        self.cur_pages = torch.full((bs, hk, self.max_sel), -1, **i32)     # logical, reused steps only
        self.cur_phys = torch.full((bs, hk, self.max_sel), -1, **i32)
        self.cur_num = torch.zeros(bs, hk, **i32)
        self.cur_rest = torch.full((bs, hk, self.max_sel), float("-inf"), **f32)
        self.cur_dhat = torch.zeros(bs, hk, **f32)
        self.sel_scratch = torch.empty(bs, hk, max(16, _pow2(self.max_sel)), dtype=torch.int64, device=dev)
        self.bitmap = torch.zeros(bs, hk, self.block_pg, dtype=torch.int8, device=dev)
        self.reselect_flag = torch.ones(bs, **i32)
        self.sel_count = torch.zeros(bs, hk, **i32)      # fused bounds + selection: chunks done per (b, h)
        self.merge_count = torch.zeros(bs, hk, **i32)    # fused merge: splits done per (b, h)
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
        self.check = os.environ.get(CHECK_ENV) == "1"

    # ------------------------------------------------------------------ plan
    def plan(self, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, *,
             mode: str = "prhs", budget: float = 1 / 16, delta: float = 0.05, sink_pages: int = 1,
             recent_pages: int = 2, sm_scale: Optional[float] = None, art: bool = False,
             tau_mag: float = 0.01, tau_dir: float = 1e-4, patience: int = 2, eps_cert: Optional[float] = None,
             min_blocks: int = 4, art_order: str = "bound", art_head_pages: Optional[int] = None,
             art_tail_pages: int = 8,
             dense_below_pages: int = 0, reselect=None, dilation: int = 0,
             num_splits: Optional[int] = None, seq_len_hint: Optional[int] = None,
             pages_per_iter: Optional[int] = None, num_warps: int = 4, num_stages: int = 3,
             select_warps: Optional[int] = None, bounds_block_p: int = 64, bounds_warps: int = 4,
             bounds_iters: int = 1, bounds_heads: int = 1, fused_select: bool = False, fused_merge: bool = False,
             kv_start: Optional[torch.Tensor] = None, pdl: Optional[bool] = None,
             q_dtype: torch.dtype = torch.bfloat16) -> None:
        """Prepare a decode batch (outside CUDA graphs; launches one kernel, no host sync).

        Args:
            req_to_token: ``[max_reqs + 1, max_ctx]`` int32, SGLang's (req_pool_idx, position) -> slot.
            req_pool_indices: ``[bs]`` int32/int64 rows of ``req_to_token``.
            seq_lens: ``[bs]`` int32/int64 context lengths *including* the token decoded now (its K/V
                must be in the pool when ``run`` executes).
            mode: ``"prhs"`` or ``"dense"``.
            budget: PrHS page budget per (request, KV head): a fraction of the request's pages
                (``<= 1``, rounded up) or an absolute page count (``> 1``); never below
                sink + recent (capped by the request's pages), as ``PrhsConfig.budget_pages``.
            delta: PrHS target on the certified dropped mass, ``0 <= delta < 1`` (0 = fill the budget).
            sink_pages, recent_pages: always-selected pages at the start / end.
            sm_scale: logit scale, default ``1/sqrt(head_dim)``.
            art, tau_mag, tau_dir, patience, eps_cert, min_blocks: ART's settings
                (``sglang_sparse.art.art_attention``; one ART block = one page).
            art_order: dense + ART: ``"bound"`` (descending upper bound) or ``"natural"``.
            art_head_pages: ART's sequential head H (see ``kernels.paged_decode``): ART can stop only
                within the first H pages of the list. Default: when ``bs * H_kv`` fills half the SMs,
                the whole list if it has at most 256 pages (exact reference semantics), else 64;
                for smaller batches 8 (the rest of the list is split over programs that run alongside).
            art_tail_pages: ART: fewest list pages per tail program when the split count is chosen
                (default 8; smaller gives more, shorter tail programs).
            num_splits: KV splits per (request, KV head); default from bs, H_kv, the SM count and
                ``seq_len_hint`` (default ``max_seq_len``). Fixed for a captured graph.
            pages_per_iter: pages gathered per loop iteration (default 64 // P rows, at least 1).
            num_warps, num_stages: launch settings of the decode kernel (with 3 stages Triton turns the
                K/V gathers into cp.async copies one iteration ahead, ~96 registers per thread).
            select_warps: warps of the selection kernel (default by tile size: 4 up to 512 pages,
                8 up to 2048, else 16; the fastest on an H200 in benchmarks/decode_breakdown.py).
            bounds_block_p, bounds_warps, bounds_iters: pages per chunk, warps, and chunks per program
                (pipelined) of the page-bound kernel.
            bounds_heads: KV heads per program of the page-bound kernel (a divisor of H_kv; 1 with
                ``fused_select``): one program reads the adjacent summaries of several heads of its pages.
            fused_select: compute the page bounds and select in one launch
                (``kernels.page_select._bounds_select_kernel``, ``select_warps`` warps): each
                (request, KV head) selects as soon as its bounds are in.
            fused_merge: no separate merge launch: the last split program of each (request, KV head)
                merges its group's heads (``kernels.paged_decode``).
            q_dtype: dtype of q and of the output (the KV dtype in SGLang).
            pdl: launch ``run``'s kernels with programmatic dependent launch (``kernels.pdl``): each
                starts while the previous one drains and waits for its results in-kernel. Default: on
                when ``$SGLANG_SPARSE_PDL=1`` and the device has compute capability >= 9, else off.
            dense_below_pages: PrHS: a request with fewer pages than this reads all of them (its
                budget is all its pages), so short requests take the dense path of the same kernel.
            reselect: None (select every step), or a bool / ``[bs]`` bool tensor: which requests
                select afresh this step; the others reuse their last fresh selection (``dilation``
                pages around each kept page, plus sinks, recents and new pages). See the module doc.
            dilation: r of the reuse (``>= 0``).
            kv_start: optional ``[bs]`` int32/int64 device tensor: request ``i`` attends only to
                positions ``[kv_start[i], seq_lens[i])`` (each a multiple of the page size); the page
                table, page counts, sinks and recents are those of that suffix. CLAA's layers after the
                filter layer (their KV holds only the kept tokens, in the request's last slots).
        """
        if mode not in ("prhs", "dense"):
            raise ValueError(f"mode must be 'prhs' or 'dense', got {mode!r}")
        if art_order not in ("bound", "natural"):
            raise ValueError(f"art_order must be 'bound' or 'natural', got {art_order!r}")
        if not 0 <= delta < 1:
            raise ValueError(f"delta must be in [0, 1), got {delta}")
        bs = int(req_pool_indices.shape[0])
        if bs > self.max_bs or bs < 1:
            raise ValueError(f"batch of {bs} requests; this wrapper holds 1..{self.max_bs}")
        P = self.page_size
        self.bs = bs
        self.mode = mode
        self.art = bool(art)
        self.sm_scale = 1.0 / math.sqrt(self.d) if sm_scale is None else float(sm_scale)
        self.select = mode == "prhs" or (self.art and art_order == "bound")
        if mode == "prhs":
            budget_mode = 1 if budget <= 1 else 2
        else:
            budget_mode = 0
        self.delta = float(delta) if mode == "prhs" else 0.0
        self.sink_pages, self.recent_pages = int(sink_pages), int(recent_pages)
        if self.art and eps_cert is not None and not self.select:
            raise ValueError("ART's certified test needs page bounds: use art_order='bound' in dense mode")
        self.tau_mag, self.tau_dir, self.patience = float(tau_mag), float(tau_dir), int(patience)
        self.eps_cert = eps_cert
        self.min_blocks = int(min_blocks)
        if dilation < 0:
            raise ValueError(f"dilation must be >= 0, got {dilation}")
        self.reuse = reselect is not None and self.select
        if reselect is not None and self.reuse_slots == 0:
            raise ValueError("plan(reselect=...) needs a wrapper built with reuse_slots >= 1")
        self.req_idx[:bs].copy_(req_pool_indices.reshape(-1), non_blocking=True)
        self.dilation = int(dilation)
        if reselect is None or isinstance(reselect, bool):
            self.reselect_flag[:bs].fill_(0 if reselect is False else 1)
        else:
            self.reselect_flag[:bs].copy_(reselect.reshape(-1)[:bs], non_blocking=True)
        self._reused_all = reselect is False

        lut, self.list_max = self._budget_lut(budget_mode, budget, int(dense_below_pages))
        _page_table_kernel[(bs, triton.cdiv(self.max_pages, 256))](
            req_to_token, req_to_token.stride(0), req_pool_indices, seq_lens, self.page_table,
            self.page_table.stride(0), self.num_pages, self.last_len, self.budget, lut, self.max_pages,
            kv_start if kv_start is not None else seq_lens, P=P, BLOCK=256, HAS_START=kv_start is not None,
            num_warps=4)

        # static sizing (depends only on bs, the settings and the hint, so graph replays agree)
        hint_pages = triton.cdiv(seq_len_hint, P) if seq_len_hint else self.max_pages
        hint_pages = min(hint_pages, self.max_pages)
        if mode == "prhs":
            list_len = page_budget(hint_pages, budget, self.sink_pages, self.recent_pages)
        else:
            list_len = hint_pages
        list_len = max(1, min(list_len, self.max_sel if self.select else hint_pages))
        self.ppi = pages_per_iter or max(1, 64 // P)   # ART's head reads one page per iteration
        # Splits: about 8 programs per SM in total (many short programs balance the SMs; a tail
        # wave of a few long ones would idle most of the GPU), but at least MIN_SPLIT_PAGES pages each.
        base = bs * self.h_kv
        target = 8 * self.num_sms
        # at least 512 tokens per split (16 pages of 32; 8 of 64), 16 pages for smaller pages
        min_split_pages = max(1, min(16, 512 // P))
        if self.art:
            if art_head_pages is None:
                # a batch that fills the GPU can afford one sequential program per (request, KV head)
                # for a PrHS-sized list; long lists and small batches keep a short sequential head
                if base * 2 >= self.num_sms:
                    art_head_pages = list_len if list_len <= 256 else 64
                else:
                    art_head_pages = 8
            self.head_len = max(1, int(art_head_pages))
            tail = max(0, list_len - self.head_len)
            if num_splits is None:
                # the tails run alongside the sequential head: split them finer (art_tail_pages at least)
                if art_tail_pages < 1:
                    raise ValueError(f"art_tail_pages must be >= 1, got {art_tail_pages}")
                tail_splits = min(triton.cdiv(target, base), tail // int(art_tail_pages)) if tail > 0 else 0
                tail_splits = max(tail_splits, 1 if tail > 0 else 0)
            else:
                tail_splits = max(0, int(num_splits) - 1)
            self.num_splits = 1 + min(tail_splits, self.max_splits - 1)
        else:
            self.head_len = 0
            if num_splits is None:
                num_splits = min(triton.cdiv(target, base), max(1, list_len // min_split_pages))
            self.num_splits = max(1, min(int(num_splits), self.max_splits))
        self.num_warps, self.num_stages = num_warps, num_stages
        if bounds_block_p < 16 or bounds_block_p & (bounds_block_p - 1):
            raise ValueError(f"bounds_block_p must be a power of two >= 16, got {bounds_block_p}")
        if bounds_iters < 1:
            raise ValueError(f"bounds_iters must be >= 1, got {bounds_iters}")
        self.bounds_block_p, self.bounds_warps = int(bounds_block_p), int(bounds_warps)
        self.bounds_iters = int(bounds_iters)
        if bounds_heads < 1 or self.h_kv % bounds_heads or (fused_select and bounds_heads != 1):
            raise ValueError(f"bounds_heads must divide num_kv_heads={self.h_kv} (and be 1 with fused_select), "
                             f"got {bounds_heads}")
        self.bounds_heads = int(bounds_heads)
        self.fused_select = bool(fused_select)
        self.fused_merge = bool(fused_merge)
        if pdl and os.environ.get("TRITON_INTERPRET") == "1":
            raise ValueError("pdl=True needs compiled kernels (the Triton interpreter has no griddepcontrol)")
        self.pdl = _pdl_default(self.device) if pdl is None else bool(pdl)
        self._pdl = dict(PDL=True, launch_pdl=True) if self.pdl else {}
        self.select_warps = select_warps or (4 if self.block_pg <= 512 else 8 if self.block_pg <= 2048 else 16)
        if self._out is None or self._out.dtype != q_dtype:
            self._out = torch.empty(self.max_bs, self.h_q, self.dv, dtype=q_dtype, device=self.device)
        self._planned = True

    def _budget_lut(self, budget_mode: int, budget: float, dense_below_pages: int = 0) -> torch.Tensor:
        """(device table ``[max_pages + 1]``: page budget of a request of N pages, largest budget),
        cached per setting: ``sglang_sparse.config.page_budget`` (all N pages in dense mode and below
        ``dense_below_pages``), capped by the list width."""
        key = (budget_mode, float(budget), self.sink_pages, self.recent_pages, dense_below_pages)
        cache = self.__dict__.setdefault("_lut_cache", {})
        if key not in cache:
            vals = [min(self.max_sel, n if budget_mode == 0 or n < dense_below_pages
                        else page_budget(n, budget, self.sink_pages, self.recent_pages))
                    for n in range(self.max_pages + 1)]
            cache[key] = (torch.tensor(vals, dtype=torch.int32).to(self.device, non_blocking=True), max(1, max(vals)))
        return cache[key]

    # ------------------------------------------------------------------ run
    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            kmin: Optional[torch.Tensor] = None, kmax: Optional[torch.Tensor] = None,
            out: Optional[torch.Tensor] = None, select: bool = True, reuse_slot: int = 0) -> torch.Tensor:
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
            if self.fused_select:
                self._launch_bounds_select(q, kmin, kmax, reuse_slot)
            else:
                self._launch_bounds(q, kmin, kmax)
                self._launch_select(reuse_slot)
        elif not self.select:
            self.cur_dhat[:bs].zero_()
        checking = self.check and not (q.is_cuda and torch.cuda.is_current_stream_capturing())
        if checking:
            self.validate_lists(k_cache.shape[0])
        self._launch_decode(q, k_cache, v_cache, out)
        if checking:
            self.validate_output(out)
        return out

    # ------------------------------------------------------------------ checks (SGLANG_SPARSE_CHECK=1)
    def validate_lists(self, num_slots: int) -> None:
        """Host-side check of what the decode is about to read (synchronises; for debugging only): page
        counts within the table, table entries within a pool of ``num_slots`` slots, and with selection
        each (request, KV head) list within its budget, made of pages of its own table, without repeats."""
        bs, P = self.bs, self.page_size
        n = self.num_pages[:bs].cpu()
        table = self.page_table[:bs].cpu()
        pool_pages = -(-int(num_slots) // P)
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
            raise RuntimeError(f"{CHECK_ENV}: invalid decode page lists (bs={bs}, mode={self.mode}, "
                               f"art={self.art}): " + "; ".join(bad[:8]))

    def validate_output(self, out: torch.Tensor) -> None:
        """Host-side check that the decode wrote a finite output and normaliser for every row."""
        bs = self.bs
        o_bad = ~torch.isfinite(out[:bs].float()).all(dim=-1)
        l_bad = ~torch.isfinite(self.lse_buf[:bs])
        if bool(o_bad.any()) or bool(l_bad.any()):
            rows = torch.nonzero(o_bad | l_bad).tolist()[:8]
            raise RuntimeError(f"{CHECK_ENV}: non-finite decode output or lse at (row, q head) {rows} "
                               f"(bs={bs}, mode={self.mode}, art={self.art}, splits={self.num_splits})")

    # The three stages of ``run`` (also timed one by one by benchmarks/decode_breakdown.py).
    def _bounds_chunking(self):
        """Programs per (request, KV head) of the page-bound computation, and its constexprs."""
        block_p, iters = self.bounds_block_p, self.bounds_iters
        return triton.cdiv(self.max_pages, block_p * iters), dict(
            G=self.group, G_PAD=self.g_pad, D=self.d, BLOCK_D=_pow2(self.d), BLOCK_P=block_p, ITERS=iters,
            NUM_STAGES=2 if iters > 1 else 1)

    def _launch_bounds(self, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> None:
        chunks, meta = self._bounds_chunking()
        _page_bounds_kernel[(self.bs, self.h_kv // self.bounds_heads, chunks)](
            self.reselect_flag, q, kmin, kmax, self.page_table, self.num_pages, self.ub, self.lb,
            q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1), self.page_table.stride(0),
            self.ub.stride(0), self.ub.stride(1), self.sm_scale, **meta, HEADS=self.bounds_heads,
            num_warps=self.bounds_warps, **self._pdl)

    def _select_state(self, reuse_slot: int):
        """The per-request selection state of ``reuse_slot`` (slot 0's, unused, when nothing is reused)."""
        slot = reuse_slot if self.reuse else 0
        return self.state_pages[slot], self.state_num[slot], self.state_npg[slot]

    def _select_meta(self) -> dict:
        return dict(P=self.page_size, BLOCK_PG=self.block_pg, SORT_PAD=max(16, _pow2(self.list_max)),
                    DELTA_ZERO=self.delta <= 0.0, WRITE_REST=self.art, WRITE_STATE=self.reuse)

    def _log_ratio(self) -> float:
        return 0.0 if self.delta <= 0.0 else math.log(self.delta / (1.0 - self.delta))

    def _launch_select(self, reuse_slot: int = 0) -> None:
        bs = self.bs
        st_p, st_n, st_g = self._select_state(reuse_slot)
        _page_select_kernel[(bs, self.h_kv)](
            self.reselect_flag, self.ub, self.lb, self.num_pages, self.last_len, self.budget, self.page_table,
            self.sel_pages, self.cur_phys, self.num_sel, self.cur_num, self.cur_dhat, self.cur_rest,
            self.req_idx, st_p, st_n, st_g, self.sel_scratch,
            self.page_table.stride(0), self.ub.stride(0), self.ub.stride(1), self.sel_pages.stride(0),
            self.sel_pages.stride(1), self.sel_scratch.stride(0), self.sel_scratch.stride(1),
            st_p.stride(0), st_p.stride(1), self.reuse_width,
            self.sink_pages, self.recent_pages, self._log_ratio(), self.list_max,
            **self._select_meta(), num_warps=self.select_warps, **self._pdl)
        self._launch_reuse(reuse_slot)

    def _launch_bounds_select(self, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                              reuse_slot: int = 0) -> None:
        """Bounds and selection in one launch (``plan(fused_select=True)``)."""
        chunks, meta = self._bounds_chunking()
        st_p, st_n, st_g = self._select_state(reuse_slot)
        _bounds_select_kernel[(chunks, self.h_kv, self.bs)](
            self.reselect_flag, self.sel_count, q, kmin, kmax, self.ub, self.lb, self.num_pages, self.last_len,
            self.budget, self.page_table, self.sel_pages, self.cur_phys, self.num_sel, self.cur_num, self.cur_dhat,
            self.cur_rest, self.req_idx, st_p, st_n, st_g, self.sel_scratch,
            q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1), self.page_table.stride(0),
            self.ub.stride(0), self.ub.stride(1), self.sel_pages.stride(0), self.sel_pages.stride(1),
            self.sel_scratch.stride(0), self.sel_scratch.stride(1), st_p.stride(0), st_p.stride(1),
            self.reuse_width, self.sink_pages, self.recent_pages, self._log_ratio(), self.list_max, self.sm_scale,
            **meta, **self._select_meta(), num_warps=self.select_warps, **self._pdl)
        self._launch_reuse(reuse_slot)

    def _launch_reuse(self, reuse_slot: int) -> None:
        """Requests that do not reselect this step take their kept list (dilated) instead."""
        if not self.reuse:
            return
        st_p, st_n, st_g = self._select_state(reuse_slot)
        _page_dilate_kernel[(self.bs, self.h_kv)](
            self.reselect_flag, self.req_idx, st_p, st_n, st_g, self.num_pages,
            self.page_table, self.cur_pages, self.cur_phys, self.cur_num, self.cur_dhat, self.cur_rest,
            self.bitmap, self.page_table.stride(0), st_p.stride(0), st_p.stride(1),
            self.cur_pages.stride(0), self.cur_pages.stride(1),
            self.bitmap.stride(0), self.bitmap.stride(1), self.dilation, self.sink_pages,
            self.recent_pages, self.max_sel, BLOCK_PG=self.block_pg, PREV_PAD=_pow2(self.reuse_width),
            num_warps=self.select_warps, **self._pdl)

    def _launch_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       out: torch.Tensor) -> None:
        bs = self.bs
        g_pad = self.g_pad
        block_d, block_dv = _pow2(self.d), _pow2(self.dv)
        sparse = self.select
        cert = self.art and self.eps_cert is not None
        args = (q, k_cache, v_cache, self.page_table, self.num_pages, self.last_len, self.cur_phys,
                self.cur_num, self.cur_rest, self.mid_o, self.mid_lse, self.blocks_read_buf,
                self.stop_reason_buf, self.art_dhat_buf, self.art_flag, self.art_loaded,
                self.merge_count, self.pages_loaded_buf, out, self.lse_buf,
                q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
                v_cache.stride(1), self.page_table.stride(0), self.cur_phys.stride(0), self.cur_phys.stride(1),
                self.mid_o.stride(0), self.mid_o.stride(1), self.mid_o.stride(2),
                self.mid_lse.stride(0), self.mid_lse.stride(1), out.stride(0), out.stride(1), self.h_q,
                self.sm_scale * _LOG2E, self.num_splits, self.head_len, self.tau_mag, self.tau_dir,
                self.patience, float(self.eps_cert) if cert else 0.0, self.min_blocks)
        meta = dict(G=self.group, G_PAD=g_pad, D=self.d, DV=self.dv, BLOCK_D=block_d, BLOCK_DV=block_dv,
                    P=self.page_size, PPI=self.ppi, SPARSE=sparse, ART=self.art, CERT=cert,
                    HAS_REST=self.art and sparse, NUM_STAGES=self.num_stages, TAIL_SUB=4,
                    FUSED_MERGE=self.fused_merge, S_PAD=_pow2(self.num_splits) if self.fused_merge else 1,
                    num_warps=self.num_warps, **self._pdl)
        _decode_split_kernel[(bs, self.h_kv, self.num_splits)](*args, **meta)
        if self.fused_merge:
            return
        _merge_splits_kernel[(bs, self.h_q)](
            self.mid_o, self.mid_lse, self.stop_reason_buf, self.art_flag, self.art_loaded, self.pages_loaded_buf,
            out, self.lse_buf, self.num_splits,
            self.mid_o.stride(0), self.mid_o.stride(1), self.mid_o.stride(2),
            self.mid_lse.stride(0), self.mid_lse.stride(1), out.stride(0), out.stride(1), self.h_q,
            DV=self.dv, BLOCK_DV=block_dv, S_PAD=_pow2(self.num_splits), ART=self.art, G=self.group, G_PAD=g_pad,
            num_warps=4, **self._pdl)

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
        """PrHS pre-hoc certificate of the list read this step (NaN for a reused list, 0 in dense mode)."""
        return self.cur_dhat[: self.bs]

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
