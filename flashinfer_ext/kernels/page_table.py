"""Plan-time page table: (request, logical page) -> physical page, page counts and page budgets.

Reference: :func:`sglang_sparse.prhs.page_lengths` (pages of a request and the last page's length)
and :meth:`sglang_sparse.config.PrhsConfig.budget_pages` (the per-request page budget).

SGLang maps (req_pool_idx, logical position) to a KV slot through ``req_to_token``; with
``--page-size P`` a request's logical page ``lp`` (positions ``[lp*P, lp*P + P)``) lives in the
physical page ``req_to_token[r, lp*P] // P`` and its slots are contiguous. The decode wrapper calls
this kernel from ``plan()`` (outside CUDA graphs, where SGLang allows reading ``req_to_token``) and
the graph-captured ``run()`` only reads the copy.

``KvStart`` (optional, ``HAS_START``): per batch row, a number of leading tokens (a multiple of P)
that this table skips: the request's view is positions ``[start, seq_len)``, i.e. logical page
``lp`` of the view is the request's page ``start // P + lp``. CLAA uses it for the layers after its
filter layer, whose kept tokens sit in the request's last slots (see ``sglang_sparse.claa_prefill``).

Short contexts (``--prhs-min-context-len``): a request whose whole context (``SeqLens[b]``, before any
``KvStart``) is shorter than ``dense_below_len`` tokens gets ``DenseReq[b] = 1`` and the budget of every
page (capped by the list width ``list_cap``); the selector then takes all of them without a delta cut, as
the reference decodes such a request densely. The threshold is in tokens, as the reference's.

Grid ``(bs, cdiv(max_pages, BLOCK))``. Entries past a request's page count are set to -1.
"""

import triton
import triton.language as tl


@triton.jit
def _page_table_kernel(ReqToToken, stride_r2t, ReqPoolIdx, SeqLens, PageTable, stride_pt,
                       NumPages, LastLen, Budget, BudgetLut, max_pages, KvStart, DenseReq, dense_below_len, list_cap,
                       P: tl.constexpr, BLOCK: tl.constexpr, HAS_START: tl.constexpr):
    """``BudgetLut[N]`` is the page budget of a request of N pages (built on the host once per
    setting with the reference formula, so rounding matches it exactly)."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    req = tl.load(ReqPoolIdx + b).to(tl.int64)
    n = tl.load(SeqLens + b).to(tl.int32)
    dense = n < dense_below_len
    if HAS_START:
        start = tl.load(KvStart + b).to(tl.int32)
        start = tl.where(start < n, start, 0)     # padded rows of a CUDA graph (seq_len 1): no offset
        n = n - start
    else:
        start = 0
    npg = (n + P - 1) // P
    lp = c * BLOCK + tl.arange(0, BLOCK)
    ok = lp < npg
    slot = tl.load(ReqToToken + req * stride_r2t + start + lp.to(tl.int64) * P, mask=ok, other=0)
    phys = (slot // P).to(tl.int32)
    tl.store(PageTable + b * stride_pt + lp, tl.where(ok, phys, -1), mask=lp < max_pages)
    if c == 0:
        tl.store(NumPages + b, npg)
        tl.store(LastLen + b, tl.where(npg > 0, n - (npg - 1) * P, 0))
        lut = tl.load(BudgetLut + tl.minimum(npg, max_pages))
        tl.store(Budget + b, tl.where(dense, tl.minimum(npg, list_cap), lut))
        tl.store(DenseReq + b, dense.to(tl.int32))
