"""The parameters ``SparseDecodeWrapper.plan`` takes, as frozen objects (standard library only).

The mechanisms' settings (:class:`PageSelectParams` for PrHS, :class:`ArtParams` for ART) have no defaults
here: their one set of defaults is ``sglang_sparse.config`` (``PrhsConfig.select_params``,
``ArtConfig.art_params`` build these objects from it), and the tests and benchmarks spell out what they run.
:class:`LaunchTuning` overrides the wrapper's launch shapes (benchmarks that sweep them); every field left
``None`` takes the wrapper's own choice (``flashinfer_ext.decode._launch_tuning``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional


def page_budget(num_pages: int, budget: float, sink_pages: int, recent_pages: int) -> int:
    """PrHS page budget of a request of ``num_pages`` pages: ``ceil(budget * N)`` for a fraction
    (``budget <= 1``) or ``budget`` pages (``> 1``), never below sink + recent (capped by N), never above N.
    The one definition: the reference (``PrhsConfig.budget_pages``) and the decode wrapper's per-length
    table and list width use it."""
    want = math.ceil(budget * num_pages) if budget <= 1 else int(budget)
    return max(min(num_pages, sink_pages + recent_pages), min(num_pages, want))


@dataclass(frozen=True)
class PageSelectParams:
    """PrHS page selection per (request, KV head) (``sglang_sparse.prhs.select_pages``).

    budget             a fraction of the request's pages (``<= 1``, rounded up) or a page count (``> 1``);
                       never below sink + recent (capped by the request's pages), see :func:`page_budget`.
    delta              target on the certified dropped mass, ``0 <= delta < 1`` (0 = fill the budget).
    sink_pages, recent_pages  always-selected pages at the start / end of the context.
    dense_below_len    a request whose context is shorter than this many tokens (its whole context, whatever
                       ``plan(kv_start=...)`` skips) reads every page: the budget is all its pages and there is
                       no delta cut (the selector orders them as with delta 0), so its delta_hat is 0.
    dilation           r of the reuse across decode steps (``plan(reselect=...)``): a reused list is the
                       last fresh one widened by +-r pages (``sglang_sparse.prhs.reuse_with_dilation``).
    estimate           False: rank by the min/max upper bounds, delta on the bounded dropped mass
                       (``select_pages``); True: rank by the pages' masses estimated from 4-bit key codes, delta on
                       the estimated dropped mass (``select_pages_estimated``; the wrapper must be built with
                       ``estimate=True`` and ``run`` given the codes).
    """

    budget: float
    delta: float
    sink_pages: int
    recent_pages: int
    dense_below_len: int
    dilation: int
    estimate: bool = False

    def __post_init__(self):
        if not self.budget > 0:
            raise ValueError(f"budget must be > 0, got {self.budget}")
        if not 0 <= self.delta < 1:
            raise ValueError(f"delta must be in [0, 1), got {self.delta}")
        if self.sink_pages < 0 or self.recent_pages < 0 or self.dense_below_len < 0:
            raise ValueError(f"sink_pages, recent_pages and dense_below_len must be >= 0, got {self}")
        if self.dilation < 0:
            raise ValueError(f"dilation must be >= 0, got {self.dilation}")

    def budget_pages(self, num_pages: int) -> int:
        """Page budget of a request holding ``num_pages`` pages."""
        return page_budget(num_pages, self.budget, self.sink_pages, self.recent_pages)

    def every_page(self) -> "PageSelectParams":
        """The same forced pages with the budget at every page and delta 0: the selector then orders the whole
        list, sinks and recents first, then by descending upper bound (the order dense + ART walks)."""
        return replace(self, budget=1.0, delta=0.0)


@dataclass(frozen=True)
class ArtParams:
    """ART's termination test (``sglang_sparse.art.art_attention``; one ART block = one page).

    tau_mag, tau_dir  stop once the relative change of the running output and 1 - cos between consecutive
                      outputs stay below these ...
    patience          ... for this many consecutive pages.
    eps_cert          certified mode (None = off): also stop once the bounded unread mass is <= eps_cert
                      (needs page bounds, i.e. a selecting plan).
    min_blocks        never stop before this many pages have been read.
    """

    tau_mag: float
    tau_dir: float
    patience: int
    eps_cert: Optional[float]
    min_blocks: int


@dataclass(frozen=True)
class LaunchTuning:
    """Overrides of the decode wrapper's launch shapes; ``None`` leaves a field to the wrapper.

    seq_len_hint      longest context the launch shapes are sized for (default: the wrapper's ``max_seq_len``);
                      the shapes depend only on it, the batch size and the settings, so CUDA-graph replays agree.
    num_splits        KV splits per (request, KV head) (with ART: 1 head program + tail programs).
    pages_per_iter    pages gathered per decode iteration.
    num_warps, num_stages  of the decode kernel.
    select_warps      of the selection kernel.
    bounds_block_p, bounds_warps, bounds_iters  pages per chunk (a power of two >= 16), warps, and chunks per
                      program (pipelined) of the page-bound kernel.
    art_head_pages    ART's sequential head H: ART can stop only within the first H pages of the list.
    art_tail_pages    ART: fewest list pages per tail program when the split count is chosen.
    """

    seq_len_hint: Optional[int] = None
    num_splits: Optional[int] = None
    pages_per_iter: Optional[int] = None
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None
    select_warps: Optional[int] = None
    bounds_block_p: Optional[int] = None
    bounds_warps: Optional[int] = None
    bounds_iters: Optional[int] = None
    art_head_pages: Optional[int] = None
    art_tail_pages: Optional[int] = None


def key_codes_supported(head_dim: int) -> bool:
    """Whether keys of ``head_dim`` channels can have 4-bit codes and be scored from them: two halves of a power of
    two channels, at least 16 each (the estimate's ``tl.dot``), i.e. a power-of-two head_dim >= 32."""
    return head_dim >= 32 and head_dim & (head_dim - 1) == 0


__all__ = ["ArtParams", "LaunchTuning", "PageSelectParams", "key_codes_supported", "page_budget"]
