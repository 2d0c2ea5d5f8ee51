"""flashinfer_ext's Triton kernels against sglang_sparse's reference math, small sizes.

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors. The interpreter
must be chosen before the kernels are defined, so this file sets ``TRITON_INTERPRET=1`` (when CUDA is
absent) before importing flashinfer_ext; CI runs it in its own pytest process with the variable
already set (ci/run_tests.sh). With CUDA and without ``TRITON_INTERPRET`` the same tests run
compiled on the GPU.

The interpreter's bf16 ``tl.dot`` is wrong in triton 3.6 (it multiplies raw bits); the
``triton_interpreter_bf16_dot`` fixture from conftest.py fixes it for these tests. The interpreter
also truncates fp32 -> bf16 casts (the GPU rounds to nearest), hence the 1e-2 output tolerance.

Sizes are tiny (an interpreted launch costs ~0.1-0.5 s per program); the whole file takes about a
minute on two cores.
"""

import pytest

from kernel_cases import (
    art_p,
    check_claa,
    check_decode,
    check_page_summaries,
    check_reuse,
    check_selection_ties,
    check_shared_layer,
    every_page,
    far_bounds_pool,
    fresh_seed,
    interpreter_device,
    sel,
    tune,
)

DEVICE = interpreter_device("tests/test_kernels_cpu.py")   # before flashinfer_ext's kernels are defined

pytestmark = pytest.mark.usefixtures("triton_interpreter_bf16_dot", "interpreter_bounds_check")

H_Q, H_KV, D = 4, 2, 32


def test_claa_window_scores():
    # n below, at and above one tile; the window longer than a short prompt
    check_claa([5, 64, 150], H_Q, H_KV, D, window=8, device=DEVICE, seed=fresh_seed(), block_n=32)


def test_claa_window_scores_gqa4():
    check_claa([97], 8, 2, 16, window=4, device=DEVICE, seed=fresh_seed(), pool_kinds=("avg",),
               block_n=16, num_layers=3)


@pytest.mark.parametrize("page_size", [16, 32])
def test_page_summaries_extend_decode_reuse(page_size):
    check_page_summaries([3 * page_size + 5, 2 * page_size + 1, 4 * page_size], page_size, H_KV, D,
                         DEVICE, fresh_seed())


def test_dense_decode():
    check_decode([150, 37, 64], 16, H_Q, H_KV, D, D, DEVICE, fresh_seed(),
                 [dict(), dict(tuning=tune(num_splits=3, pages_per_iter=2))])


def test_decode_kv_start():
    # CLAA's post-filter layers: each request reads only its last pages (kept tokens + decode tokens)
    check_decode([150, 37, 97], 16, H_Q, H_KV, D, D, DEVICE, fresh_seed(),
                 [dict(), dict(pages=sel(0.5, 0.05))], kv_start_pages=[4, 0, 3])


def test_prhs_select_and_decode_random():
    check_decode([230, 97], 16, H_Q, H_KV, D, D, DEVICE, fresh_seed(),
                 [dict(pages=sel(0.5, 0.05)), dict(pages=sel(4, 0.0, sink=2, recent=1), tuning=tune(num_splits=2))])


def test_prhs_select_and_decode_structured():
    # peaked attention: the certificate stops the selection before the budget
    check_decode([260, 150], 16, H_Q, H_KV, D, 16, DEVICE, fresh_seed(),
                 [dict(pages=sel(0.75, 0.05)),
                  dict(pages=sel(1.0, 0.6, sink=0, recent=1)),      # delta binds
                  dict(pages=sel(2, 0.05, sink=2, recent=2))],      # budget < forced
                 structured=True)


def test_prhs_select_many_pages():
    # many more candidate pages than the sorted tile (budget 10 of 190 pages sorts 16): the selector's
    # k-th-largest search decides which pages reach the sort, so an error in it changes the selection
    check_decode([3030, 2000], 16, H_Q, H_KV, D, D, DEVICE, fresh_seed(),
                 [dict(pages=sel(10, 0.0)),
                  dict(pages=sel(0.05, 0.05), tuning=tune(bounds_block_p=16, bounds_iters=3))])


def test_prhs_selection_ties():
    check_selection_ties(16, H_Q, H_KV, D, DEVICE, fresh_seed())


def test_art_prhs_structured():
    seed = fresh_seed()
    a = art_p(0.03, 1e-3, patience=2, min_blocks=2)
    check_decode([300, 200], 16, H_Q, H_KV, D, D, DEVICE, seed,
                 [dict(pages=sel(1.0, 0.0), art=a),                                            # sequential
                  dict(pages=sel(1.0, 0.0), art=a, tuning=tune(art_head_pages=5, num_splits=3)),
                  dict(pages=sel(0.8, 0.01), art=art_p(0.03, 1e-3, 2, 2, eps_cert=0.05)),      # certified
                  dict(pages=sel(1.0, 0.0), art=a, tuning=tune(art_head_pages=4, art_tail_pages=2)),
                  # a list longer than the head with no tail program (a reused list widened by dilation, or a
                  # scaled budget, beyond the planned length): the head must read it to the end
                  dict(pages=sel(1.0, 0.0), art=art_p(0.0, 0.0, 2, 2), tuning=tune(art_head_pages=4, num_splits=1))],
                 structured=True)


def test_art_dense_orders():
    a = art_p(0.05, 2e-3, patience=1, min_blocks=3)
    check_decode([170, 120], 16, H_Q, H_KV, D, D, DEVICE, fresh_seed(),
                 [dict(pages=every_page(), art=a),          # every page in bound order
                  dict(art=a)],                             # natural order
                 structured=True)


@pytest.mark.parametrize("dilation", [0, 1])
def test_prhs_reuse_across_steps(dilation):
    check_reuse([300, 230], 2, 16, H_Q, H_KV, D, DEVICE, fresh_seed(), dilation=dilation)


def test_art_dense_whole_list_head_gqa3():
    """SmolLM2's shapes (9 query / 3 KV heads, d 64): a batch that fills the (small) GPU gives ART's
    sequential head the whole bound-ordered list, shorter than the planned list length."""
    a = art_p(1e-3, 1e-6, patience=2, min_blocks=4)
    check_decode([230, 75, 140], 32, 9, 3, 64, 64, DEVICE, fresh_seed(),
                 [dict(pages=every_page(), art=a), dict(pages=sel(1 / 4, 0.05), art=a)],
                 structured=True, max_seq_len=512, num_sms=4)


def test_bounds_checker_catches_out_of_bounds():
    """The interpreter's bounds check (tests/interp_bounds.py) fails an access past a tensor's end."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < n, other=0.0), mask=offs < n)

    x = torch.randn(16, device=DEVICE)
    y = torch.empty(16, device=DEVICE)
    _copy[(1,)](x, y, 16, BLOCK=32)
    assert torch.equal(x, y)
    with pytest.raises(Exception, match="outside every tensor"):     # the interpreter wraps it
        _copy[(1,)](x, y, 24, BLOCK=32)


def test_check_mode_catches_bad_lists_and_output():
    """The wrapper's check mode (SGLANG_SPARSE_CHECK=1 in a server) passes a correct run and names a list page outside the request's
    table, a repeated page, and a non-finite output (each injected after the real kernels ran)."""
    import math

    import torch
    from kernel_cases import make_pool, reference_summaries, sel

    from flashinfer_ext.decode import SparseDecodeWrapper

    gen = torch.Generator().manual_seed(fresh_seed())
    P = 16
    pool = make_pool([200, 90], P, H_Q, H_KV, D, D, DEVICE, gen, structured=True)
    kmin, kmax = reference_summaries(pool)
    w = SparseDecodeWrapper(H_Q, H_KV, D, P, max_batch_size=3, max_seq_len=256, device=DEVICE, check=True)
    w.plan(pool.req_to_token, pool.rows, pool.seq_lens, pages=sel(1 / 2, 0.05))
    out = w.run(pool.q, pool.kc, pool.vc, kmin, kmax)
    assert torch.isfinite(out.float()).all()
    select, decode = w._launch_select, w._launch_decode
    other = int(pool.slots[1][0]) // P            # a page of request 1, not in request 0's table

    def corrupt(fn):
        def launch(*a, **k):
            select(*a, **k)
            fn()
        return launch

    for bad in (lambda: w.cur_phys[0, 0, 0].fill_(other),
                lambda: w.cur_phys[0, 0, 1].copy_(w.cur_phys[0, 0, 0])):
        w._launch_select = corrupt(bad)
        with pytest.raises(RuntimeError, match="outside its table or repeats"):
            w.run(pool.q, pool.kc, pool.vc, kmin, kmax)
    w._launch_select = select

    def nan_out(q, k, v, o, **kw):
        decode(q, k, v, o, **kw)
        o[1, 0, 0] = math.nan
    w._launch_decode = nan_out
    with pytest.raises(RuntimeError, match=r"non-finite decode output .*\[\[1, 0\]\]"):
        w.run(pool.q, pool.kc, pool.vc, kmin, kmax)


def test_selection_negative_bounds():
    """Pages whose upper bounds are far below zero (real models' keys; random keys give positive bounds):
    the selector's sort must still place every candidate before its empty padding. Dense + ART orders all
    pages by bound (most of them negative); PrHS at budget 1/2 keeps many negative-bound pages too."""
    a = art_p(1e-3, 1e-6, patience=2, min_blocks=4)
    check_decode([300, 230, 140], 16, H_Q, H_KV, D, D, DEVICE, fresh_seed(),
                 [dict(pages=every_page(), art=a), dict(pages=sel(1 / 2, 0.0)), dict(pages=sel(1 / 2, 0.05), art=a)],
                 structured=True, negative=True)


def test_art_qwen_server_launch_shape():
    """The launch of a Qwen2.5-Coder-0.5B server with --art on at 32K context (14 query / 2 KV heads, d 64, 32-token
    pages, a wrapper as wide as SGLang's req_to_token: 32772 tokens, 1025 pages; 132 SMs, so 64 splits: an 8-page
    head and 63 tail programs), dense + ART in bound order on keys with negative bounds, with thresholds that stop
    the head at page 5 (the tails then read the raised flag and skip) and at the defaults. Bounds-checked.
    The race that made this launch fault on the GPU (warps of a tail program disagreeing on the flag) cannot occur
    in the interpreter, which runs a program as one thread: tests/test_kernels_compile.py checks for it."""
    check_decode([2400, 700], 32, 14, 2, 64, 64, DEVICE, fresh_seed(),
                 [dict(pages=every_page(), art=art_p(0.5, 0.5, patience=1, min_blocks=5))],
                 structured=True, negative=True, max_seq_len=32768 + 4, num_sms=132)


def test_prhs_art_bounds_beyond_fp32_range():
    """Page bounds more than 104 nats apart (below fp32's smallest subnormal when shifted by the top bound): a
    wide page's box bound sits 115 nats above the other pages, whose logits hold nearly all the mass. The
    selector's dropped sum and ART's unread-mass suffix must still count those pages (the float64 reference's
    log-space sums), so the selector does not stop after the wide page with delta_hat 0, and ART's certified
    test does not stop there either."""
    import torch

    seed = fresh_seed()
    pool = far_bounds_pool([320, 250], 16, H_Q, H_KV, D, DEVICE, torch.Generator().manual_seed(seed))
    check_decode(None, 16, H_Q, H_KV, D, D, DEVICE, seed,
                 [dict(pages=sel(1.0, 0.05)),
                  dict(pages=sel(0.75, 0.05, sink=0, recent=1)),
                  dict(pages=sel(1.0, 0.0, sink=0, recent=0), art=art_p(0.0, 0.0, 2, 1, eps_cert=0.05))],
                 pool=pool)


def test_prhs_short_context_reads_every_page():
    """``--prhs-min-context-len``: a request whose context is shorter than the minimum (in tokens, as the CPU
    reference decides) reads every page: no delta cut, delta_hat 0; longer ones select. 150 and 159 tokens are
    below 160 but fill as many 16-token pages as the minimum (10), 97 is well below, 230 and 260 above. Also with
    kv_start (CLAA's kept-token layers), where the full context decides (230 tokens viewed from page 5 still
    select), and with ART over the list."""
    seed = fresh_seed()
    lens = [150, 97, 230, 159, 260]
    check_decode(lens, 16, H_Q, H_KV, D, D, DEVICE, seed,
                 [dict(pages=sel(0.5, 0.05, dense_below=160)), dict(pages=sel(4, 0.02, dense_below=160))],
                 structured=True)
    check_decode(lens, 16, H_Q, H_KV, D, D, DEVICE, seed,
                 [dict(pages=sel(0.5, 0.05, dense_below=160), art=art_p(0.03, 1e-3, 2, 2, eps_cert=0.05))],
                 structured=True, kv_start_pages=[2, 0, 5, 1, 0])


def test_prhs_shared_layer_has_no_certificate():
    """--prhs-layers-per-selection: a layer reading its leader's list (run(select=False)) reports delta_hat NaN,
    not the leader's bound (computed from the leader's queries and keys); leader_delta_hat keeps the leader's."""
    check_shared_layer([230, 150], 16, H_Q, H_KV, D, DEVICE, fresh_seed(),
                       [dict(pages=sel(0.5, 0.05)), dict(pages=sel(0.25, 0.01), tuning=tune(num_splits=2))])


def test_art_shared_layer_no_certified_stop():
    """ART's certified stop in a layer sharing its leader's list: the leader's suffix bounds (from the leader's
    queries and keys) say nothing of this layer's unread mass, so the layer runs only ART's magnitude/direction
    test; with keys whose logits dwarf the leader's bounds, a certified test on the leader's bounds would stop
    after min_blocks pages with most of the mass unread."""
    a = art_p(0.0, 0.0, patience=2, min_blocks=2, eps_cert=0.05)        # only the certified test could stop
    check_shared_layer([230, 150], 16, H_Q, H_KV, D, DEVICE, fresh_seed(),
                       [dict(pages=sel(0.5, 0.01), art=a),
                        dict(pages=sel(1.0, 0.0), art=art_p(0.05, 2e-3, 1, 3, eps_cert=0.05),
                             tuning=tune(art_head_pages=5, num_splits=3))])
