"""The dropped-mass audit's feedback under Triton's interpreter: the selector's per-request budget scale
(``SparseDecodeWrapper.run(budget_shift=...)``) against ``sglang_sparse.prhs.select_pages`` at the scaled budget,
and the audit of every layer plus the feedback rule (``SparseDecoder``) against ``prhs.budget_shift_update``.

Run in its own process with ``TRITON_INTERPRET=1`` (ci/run_tests.sh does)."""

import math
import types

import pytest

from kernel_cases import (_assert_selection, _budget_pages, art_p, fresh_seed, interpreter_device, make_pool,
                          poison_wrapper, reference_summaries, rel_err, sel)

DEVICE = interpreter_device("tests/test_kernels_cpu_feedback.py")   # before flashinfer_ext's kernels are defined

pytestmark = pytest.mark.usefixtures("triton_interpreter_bf16_dot", "interpreter_bounds_check")

H_Q, H_KV, D, P = 4, 2, 32, 16


def test_select_with_budget_shift_equals_reference_at_scaled_budget():
    """Per request row a shift s: the selection equals the reference at ``min(N, budget << s)`` pages (delta 0
    fills it exactly; delta > 0 may stop earlier, as the reference), and the decode reads the longer lists in
    full (with ART that never stops: its head and tails must cover the scaled list)."""
    import torch

    from flashinfer_ext.decode import SparseDecodeWrapper
    from sglang_sparse import prhs

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    lens = [700, 1300, 333]
    pool = make_pool(lens, P, H_Q, H_KV, D, D, DEVICE, gen, structured=True, max_ctx=1400)
    kmin, kmax = reference_summaries(pool)
    sm = 1 / math.sqrt(D)
    w = SparseDecodeWrapper(H_Q, H_KV, D, P, max_batch_size=4, max_seq_len=1400, device=DEVICE)
    max_rows = pool.req_to_token.shape[0]
    table = torch.zeros(max_rows, 3, dtype=torch.int32, device=DEVICE)
    shifts = [1, 2, 3]
    for b, s in enumerate(shifts):
        table[int(pool.rows[b]), 1] = s
    column = table[:, 1]                                        # a strided column, as the decoder passes
    settings = [dict(pages=sel(1 / 16, 0.0)), dict(pages=sel(1 / 16, 0.05)),
                dict(pages=sel(1 / 16, 0.0), art=art_p(0.0, 0.0, patience=1, min_blocks=1))]
    for cfg in settings:
        tag = f"shifts={shifts} {cfg}"
        poison_wrapper(w)
        w.plan(pool.req_to_token, pool.rows, pool.seq_lens, budget_max_shift=3, **cfg)
        out = w.run(pool.q, pool.kc, pool.vc, kmin, kmax, budget_shift=column)
        pages = cfg["pages"]
        for b, n in enumerate(lens):
            q, k, v = pool.logical(b)
            npg = -(-n // P)
            page_lens = prhs.page_lengths(n, P)
            lo, hi = prhs.page_summaries(k, P)
            ub, lb = prhs.page_bounds(q, lo, hi, sm)
            base = _budget_pages(npg, pages.budget, pages.sink_pages, pages.recent_pages)
            bud = min(npg, base << shifts[b])
            ref = prhs.select_pages(ub, lb, page_lens, pages.delta, bud, pages.sink_pages, pages.recent_pages)
            _assert_selection(w, b, ref, ub, lb, page_lens, pages.delta, bud, pages.sink_pages,
                              pages.recent_pages, seed, f"{tag} budget {base}<<{shifts[b]}")
            if pages.delta == 0.0:
                assert w.num_selected[b].tolist() == [bud] * H_KV, f"seed={seed} {tag} b={b}: {w.num_selected[b].tolist()} " \
                                                                   f"pages selected, expected {bud}"
            order, num = w.pages[b].long(), w.num_selected[b].long()
            ref_out = prhs.sparse_attention(q, k, v, P, order, num, sm)
            e = rel_err(out[b], ref_out)
            assert e <= 1e-2, f"seed={seed} {tag} b={b}: out rel err {e:.3e}"
            assert bool((w.blocks_read[b].long() == num.repeat_interleave(H_Q // H_KV)).all()), \
                f"seed={seed} {tag} b={b}: blocks_read {w.blocks_read[b].tolist()} vs listed {num.tolist()}"
