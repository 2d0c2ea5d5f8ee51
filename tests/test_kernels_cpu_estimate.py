"""PrHS's estimate mode under Triton's interpreter: the 4-bit key codes the summary kernel writes when a page fills
(against ``sglang_sparse.prhs.quantise_page_keys``), the page-mass estimate from them and the selection by estimated
dropped mass (against ``prhs.estimated_page_log_mass`` / ``prhs.select_pages_estimated``), and the decode over it.

Run in its own process with ``TRITON_INTERPRET=1`` (ci/run_tests.sh does)."""

import pytest

from kernel_cases import check_estimate_decode, check_key_codes, check_reuse, fresh_seed, interpreter_device, sel

DEVICE = interpreter_device("tests/test_kernels_cpu_estimate.py")   # before flashinfer_ext's kernels are defined

pytestmark = pytest.mark.usefixtures("triton_interpreter_bf16_dot", "interpreter_bounds_check")

H_Q, H_KV, D = 4, 2, 32


@pytest.mark.parametrize("page_size", [16, 32])
def test_key_codes_written_when_pages_fill(page_size):
    # the last request ends one token short of a page boundary: that page must stay uncoded
    # on a GPU a key at a level boundary may round to the neighbouring code (as in tests/test_kernels_gpu.py)
    check_key_codes([3 * page_size + 5, 2 * page_size + 1, 4 * page_size, 3 * page_size - 1], page_size, H_KV, D,
                    DEVICE, fresh_seed(), max_mismatch=5e-3 if DEVICE == "cuda" else 0.0)


@pytest.mark.parametrize("pages_per_program,pages_per_dot", [(1, 1), (2, 1), (4, 2), (8, 4)])
def test_estimate_select_and_decode(pages_per_program, pages_per_dot):
    # 17 and 10 pages with a partial last one (first / second page of a 2-page program, inside a 2- or 4-page
    # tl.dot of the last program), and 6 full pages; 2 query heads per KV head, so 4 pages take 8 of the 16 columns
    threshold_lists = check_estimate_decode([260, 150, 96], 16, H_Q, H_KV, D, DEVICE, fresh_seed(),
                          [dict(pages=sel(1.0, 0.05, estimate=True)),            # delta binds
                           dict(pages=sel(1.0, 0.3, sink=0, recent=1, estimate=True)),
                           dict(pages=sel(0.25, 0.01, estimate=True)),           # budget binds
                           dict(pages=sel(1.0, 0.0, estimate=True))],            # every page, in mass order
                          estimate_shape=(pages_per_program, 4, 2, pages_per_dot))
    assert threshold_lists == 2 * 3       # the first two settings (every page allowed, delta > 0) take the search


@pytest.mark.parametrize("case", ["ties", "random", "dense_req", "underflow"])
def test_threshold_selection_matches_the_sorted_reference(case):
    """The selector's threshold search (estimate mode, every page allowed, no ART) keeps exactly the reference's pages
    (``prhs.select_pages_estimated``, which sorts): page log-masses written straight into the wrapper's estimate
    buffer, with runs of tied scores straddling the delta cut (ties go to the lower page id), random scores, a
    context below ``--prhs-min-context-len`` (every page read) and pages whose scores sit ~200 nats under the top
    (their mass must still count)."""
    import torch

    from flashinfer_ext.decode import SparseDecodeWrapper
    from kernel_cases import make_pool
    from sglang_sparse import prhs

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    P, lens = 16, [16 * 37, 16 * 20 + 5, 16 * 9]
    pool = make_pool(lens, P, H_Q, H_KV, D, D, DEVICE, gen)
    w = SparseDecodeWrapper(H_Q, H_KV, D, P, max_batch_size=len(lens), max_seq_len=max(lens) + P, device=DEVICE,
                            estimate=True)
    for delta in (0.05, 0.3):
        pages = sel(1.0, delta, sink=1, recent=2, estimate=True)
        if case == "dense_req":
            pages = sel(1.0, delta, sink=1, recent=2, estimate=True, dense_below=16 * 21)
        w.plan(pool.req_to_token, pool.rows, pool.seq_lens, pages=pages)
        est = torch.randn(len(lens), H_Q, w.block_pg, generator=gen, dtype=torch.float64) * 2.0
        if case == "ties":
            # runs of 3-6 pages with one score for the whole group, a few of them high
            for b in range(len(lens)):
                p = 0
                while p < w.block_pg:
                    run = int(torch.randint(3, 7, (1,), generator=gen))
                    est[b, :, p:p + run] = est[b, :, p:p + 1] + (3.0 if int(torch.randint(0, 5, (1,), generator=gen)) == 0
                                                                 else 0.0)
                    p += run
        if case == "underflow":
            est[:, :, 3::2] -= 200.0
        est = est.float()
        w.est.copy_(est.to(w.est.dtype))
        w._launch_select()
        for b, n in enumerate(lens):
            npg = -(-n // P)
            page_lens = prhs.page_lengths(n, P)
            ref = prhs.select_pages_estimated(est[b, :, :npg].double(), page_lens, H_KV, delta,
                                              npg, 1, 2)
            dense = case == "dense_req" and n < 16 * 21
            for g in range(H_KV):
                tag = f"seed={seed} delta={delta} b={b} g={g}"
                num = int(w.num_selected[b, g])
                got = sorted(w.pages[b, g, :num].tolist())
                want = list(range(npg)) if dense else sorted(ref.pages[g, : int(ref.num_selected[g])].tolist())
                assert got == want, f"{tag}: kept {got}, reference {want}"
                assert int((w.pages[b, g, num:npg] != -1).sum()) == 0, f"{tag}: list not -1 padded"
                want_dhat = 0.0 if dense else float(ref.delta_hat[g])
                assert abs(float(w.delta_hat[b, g]) - want_dhat) <= 1e-4 * max(want_dhat, 1e-3), \
                    f"{tag}: delta_hat {float(w.delta_hat[b, g])} vs {want_dhat}"


@pytest.mark.parametrize("dilation", [0, 1])
def test_estimate_lists_reused_across_steps(dilation):
    # --prhs-reselect-interval with the estimate: fresh lists from the codes, reused (dilated) lists on the steps
    # between, and a batch mixing both (the estimate kernel skips the reusing requests)
    check_reuse([300, 230], 2, 16, H_Q, H_KV, D, DEVICE, fresh_seed(), dilation=dilation, budget=1.0, delta=0.2,
                estimate=True)


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


def test_decoder_quantises_each_layers_pages_from_its_own_key_buffer():
    """SparseDecoder's KV-write hook in estimate mode: after an extend that fills pages and a decode step that fills
    one more, every full page of each layer holds the codes of that layer's keys (read back from that layer's K
    buffer), and a partial page none; two layers with different keys catch a hook that reads another layer's buffer."""
    import types

    import torch

    from flashinfer_ext.summaries import PageSummaries
    from kernel_cases import _unpack_codes, make_pool
    from sglang_sparse import prhs
    from sglang_sparse.sparse_decode import SparseDecoder

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    P, layers, n = 16, 2, 3 * 16 - 1                   # the prompt leaves its last page one token short
    pools = [make_pool([n + 1], P, H_Q, H_KV, D, D, DEVICE, gen) for _ in range(layers)]
    slots = pools[0].slots[0]
    for p in pools[1:]:                                # one request, the same slots in every layer
        p.kc[slots] = (2.0 * torch.randn(n + 1, H_KV, D, generator=gen)).to(p.kc.device, p.kc.dtype)
    dec = SparseDecoder.__new__(SparseDecoder)
    dec.summaries = PageSummaries(layers, pools[0].kc.shape[0], H_KV, D, P, device=DEVICE, key_codes=True)
    dec.summaries.codes.fill_(0xAB)
    dec._group, dec.layer_offset, dec._estimate = 1, 0, True
    dec.num_kv_heads_local, dec.head_dim = H_KV, D
    dec.token_to_kv_pool = types.SimpleNamespace(get_key_buffer=lambda layer_id: pools[layer_id].kc)
    for lid in range(layers):
        layer = types.SimpleNamespace(layer_id=lid)
        kc = pools[lid].kc
        dec.after_extend(kc[slots[:n]].reshape(n, H_KV * D), layer, types.SimpleNamespace(out_cache_loc=slots[:n]),
                         True)
        assert bool((dec.summaries.codes[lid][slots[2 * P:n]] == 0xAB).all()), f"seed={seed}: a partial page coded"
        dec._update_summaries(layer, kc[slots[n:]].reshape(1, H_KV * D), slots[n:])     # the decode token fills it
        lo, hi = prhs.page_summaries(kc[slots], P)
        want = prhs.quantise_page_keys(kc[slots], lo, hi, P).long()
        got = _unpack_codes(dec.summaries.codes[lid][slots]).to(want.device)
        diff = (got - want).abs()
        # exact under the interpreter; on a GPU a key at a level boundary may round to the neighbouring code
        assert int(diff.max()) <= (1 if DEVICE == "cuda" else 0) and float((diff > 0).double().mean()) <= \
            (1e-3 if DEVICE == "cuda" else 0.0), f"seed={seed} layer {lid}: codes differ from the layer's own keys"


def test_selection_warps_follow_the_sort_width():
    """The selection kernel's warps: 16 once its lists may hold 2048 or more pages, else by its tile (4 up to 512
    pages, 8 up to 2048, 16 above)."""
    import torch

    from flashinfer_ext.decode import SparseDecodeWrapper, select_warps_for
    from kernel_cases import make_pool

    assert [select_warps_for(b, s) for b, s in [(512, 512), (1024, 64), (2048, 128), (2048, 1024), (4096, 256)]] \
        == [4, 8, 8, 8, 16]
    assert select_warps_for(2048, 2048) == 16 and select_warps_for(4096, 4096) == 16
    pool = make_pool([70], 16, H_Q, H_KV, D, D, DEVICE, torch.Generator().manual_seed(0))
    w = SparseDecodeWrapper(H_Q, H_KV, D, 16, max_batch_size=2, max_seq_len=16 * 1100, device=DEVICE, estimate=True)
    assert w.block_pg == 2048
    w.plan(pool.req_to_token, pool.rows, pool.seq_lens, pages=sel(1.0, 0.1, estimate=True))
    assert w.launch.select_warps == 16
    w.plan(pool.req_to_token, pool.rows, pool.seq_lens, pages=sel(1 / 16, 0.1, estimate=True))
    assert w.launch.select_warps == 8


def test_estimate_pages_per_dot_fill_the_query_columns():
    """As many pages per tl.dot as keep the query tile at 16 columns (KP x G <= 16, at most 4): Llama's 4 query heads
    per KV head take 4, Qwen2.5-Coder's 6 / 7 take 2, 16 take 1; the wrapper launches that by default."""
    from flashinfer_ext.decode import SparseDecodeWrapper, estimate_pages_per_dot

    assert [estimate_pages_per_dot(g) for g in (1, 2, 4, 5, 6, 7, 8, 9, 16)] == [4, 4, 4, 2, 2, 2, 2, 1, 1]
    for hq, hk, kp in [(32, 8, 4), (12, 2, 2), (14, 2, 2)]:
        w = SparseDecodeWrapper(hq, hk, D, 16, max_batch_size=1, max_seq_len=256, device=DEVICE, estimate=True)
        assert w.estimate_shape == (8, 4, 2, kp), (hq, hk, w.estimate_shape)
