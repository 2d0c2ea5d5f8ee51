"""PrHS's estimate mode under Triton's interpreter: the 4-bit key codes the summary kernel writes when a page fills
(against ``sglang_sparse.prhs.quantise_page_keys``), the page-mass estimate from them and the selection by estimated
dropped mass (against ``prhs.estimated_page_log_mass`` / ``prhs.select_pages_estimated``), and the decode over it.

Run in its own process with ``TRITON_INTERPRET=1`` (ci/run_tests.sh does)."""

import pytest

from kernel_cases import check_estimate_decode, check_key_codes, fresh_seed, interpreter_device, sel

DEVICE = interpreter_device("tests/test_kernels_cpu_estimate.py")   # before flashinfer_ext's kernels are defined

pytestmark = pytest.mark.usefixtures("triton_interpreter_bf16_dot", "interpreter_bounds_check")

H_Q, H_KV, D = 4, 2, 32


@pytest.mark.parametrize("page_size", [16, 32])
def test_key_codes_written_when_pages_fill(page_size):
    # the last request ends one token short of a page boundary: that page must stay uncoded
    check_key_codes([3 * page_size + 5, 2 * page_size + 1, 4 * page_size, 3 * page_size - 1], page_size, H_KV, D,
                    DEVICE, fresh_seed())


def test_estimate_select_and_decode():
    check_estimate_decode([260, 150, 96], 16, H_Q, H_KV, D, DEVICE, fresh_seed(),
                          [dict(pages=sel(1.0, 0.05, estimate=True)),            # delta binds
                           dict(pages=sel(1.0, 0.3, sink=0, recent=1, estimate=True)),
                           dict(pages=sel(0.25, 0.01, estimate=True)),           # budget binds
                           dict(pages=sel(1.0, 0.0, estimate=True))])            # every page, in mass order


def test_estimate_refuses_certified_art_and_missing_codes():
    import torch

    from flashinfer_ext.decode import SparseDecodeWrapper
    from kernel_cases import art_p, make_pool

    gen = torch.Generator().manual_seed(0)
    pool = make_pool([70], 16, H_Q, H_KV, D, D, DEVICE, gen)
    plain = SparseDecodeWrapper(H_Q, H_KV, D, 16, max_batch_size=2, max_seq_len=96, device=DEVICE)
    with pytest.raises(ValueError, match="estimate=True"):
        plain.plan(pool.req_to_token, pool.rows, pool.seq_lens, pages=sel(1.0, 0.1, estimate=True))
    w = SparseDecodeWrapper(H_Q, H_KV, D, 16, max_batch_size=2, max_seq_len=96, device=DEVICE, estimate=True)
    with pytest.raises(ValueError, match="certified"):
        w.plan(pool.req_to_token, pool.rows, pool.seq_lens, pages=sel(1.0, 0.1, estimate=True),
               art=art_p(0.01, 1e-3, 2, 1, eps_cert=1e-3))
    w.plan(pool.req_to_token, pool.rows, pool.seq_lens, pages=sel(1.0, 0.1, estimate=True))
    kmin = torch.zeros(pool.num_pages, H_KV, D, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="key codes"):
        w.run(pool.q, pool.kc, pool.vc, kmin, kmin)
