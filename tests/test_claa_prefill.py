"""CLAA's SGLang wiring on CPU: eligibility, kept counts, batch selection, the ForwardBatch rewrite and
the KV layout that decode reads (sglang_sparse.claa_prefill)."""

import os
import random
from types import SimpleNamespace

import pytest
import torch

from sglang_sparse import claa
from sglang_sparse import claa_prefill as CP
from sglang_sparse.config import ClaaConfig


def _req(n, prefix=0, end=None, rid="r", max_new=16, logprob=False, output=0, mm=None):
    end = n + output if end is None else end
    return SimpleNamespace(
        rid=rid, origin_input_ids=list(range(n)), output_ids=list(range(output)), prefix_indices=[0] * prefix,
        extend_range=SimpleNamespace(start=prefix, end=end, length=end - prefix),
        sampling_params=SimpleNamespace(max_new_tokens=max_new), return_logprob=logprob,
        multimodal_inputs=mm, input_embeds=None, skip_radix_cache_insert=False)


CFG = ClaaConfig(mode="claa", keep_ratio=0.1, window=8, num_layers=4, min_prompt_len=256, max_prompt_len=8192)


@pytest.mark.parametrize("page_size", [1, 16, 32])
def test_kept_count_page_aligned(page_size, seed):
    rng = random.Random(seed)
    for _ in range(300):
        n = rng.randint(9, 20000)
        cfg = ClaaConfig(mode="claa", keep_ratio=rng.uniform(0.01, 0.99), window=rng.randint(1, 8))
        k0 = claa.num_kept_tokens(n, cfg.keep_ratio, cfg.window)
        k = CP.kept_count(n, cfg, page_size)
        assert (n - k) % page_size == 0, (n, k, page_size)
        assert k0 <= k < k0 + page_size and k <= n, (n, k0, k, page_size)


def test_filter_decision_rules():
    P = 32
    assert CP.filter_decision(_req(4000), CFG, P) == (CP.kept_count(4000, CFG, P), "filtered")
    why = {
        "logprobs requested": _req(4000, logprob=True),
        "cached prefix": _req(4000, prefix=64),
        "prompt split across prefill chunks": _req(4000, end=2048),
        "max_new_tokens = 0": _req(4000, max_new=0),
        "multimodal or embedding input": _req(4000, mm=object()),
        "prompt shorter than --claa-min-prompt-len": _req(255),
        "prompt longer than --claa-max-prompt-len": _req(8193),
    }
    for reason, req in why.items():
        assert CP.filter_decision(req, CFG, P) == (None, reason)
    assert CP.filter_decision(_req(4000), CFG, P, batch_return_logprob=True) == (None, "logprobs requested")
    # a retracted request re-prefilled with its outputs is a whole prompt again
    assert CP.filter_decision(_req(3000, output=100), CFG, P)[0] == CP.kept_count(3100, CFG, P)
    # keep 100 %: nothing to drop, the request stays dense (and cacheable)
    full = ClaaConfig(mode="claa", keep_ratio=1.0, min_prompt_len=16)
    assert CP.filter_decision(_req(4000), full, P) == (None, "nothing to drop")


def test_mark_batch_sets_skip_insert_and_kept_counts():
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    reqs = [_req(4000, rid="a"), _req(100, rid="b"), _req(5000, rid="c", prefix=32)]
    batch = SimpleNamespace(forward_mode=ForwardMode.EXTEND, reqs=reqs, return_logprob=False)
    kept = CP.mark_batch(batch, CFG, 16)
    assert kept == [CP.kept_count(4000, CFG, 16), None, None]
    assert [r.skip_radix_cache_insert for r in reqs] == [True, False, False]
    assert CP.kept_counts(batch) == kept
    # a later batch of the same request (a mixed batch, or a prefill with logprobs) carries no old decision
    mixed = SimpleNamespace(forward_mode=ForwardMode.MIXED, reqs=[reqs[0]], return_logprob=False)
    assert CP.mark_batch(mixed, CFG, 16) == [None] and CP.kept_counts(mixed) == [None]
    logp = SimpleNamespace(forward_mode=ForwardMode.EXTEND, reqs=[reqs[0]], return_logprob=True)
    assert CP.mark_batch(logp, CFG, 16) == [None] and CP.kept_counts(logp) == [None]


def test_unfiltered_long_prompts_are_reported_by_reason(monkeypatch):
    """Prompts in CLAA's length range that stay dense are counted by reason and reported at most once per
    SKIP_REPORT_S (with the radix-cache hint when a cached prefix was the reason); short prompts are not."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    CP._SKIPPED.clear()
    monkeypatch.setattr(CP, "_SKIP_REPORTED_AT", [float("-inf")])
    clock = [1000.0]
    monkeypatch.setattr(CP.time, "monotonic", lambda: clock[0])
    reqs = [_req(4000, rid="a", prefix=32), _req(4000, rid="b", prefix=64), _req(100, rid="c"),
            _req(4000, rid="d", end=2048), _req(4000, rid="e")]
    CP.mark_batch(SimpleNamespace(forward_mode=ForwardMode.EXTEND, reqs=reqs, return_logprob=False), CFG, 16)
    assert not CP._SKIPPED, "the first skips are reported at once"
    assert CP._SKIP_REPORTED_AT[0] == 1000.0
    clock[0] += 1.0
    CP.mark_batch(SimpleNamespace(forward_mode=ForwardMode.EXTEND, reqs=[_req(4000, rid="f", prefix=32)],
                                  return_logprob=False), CFG, 16)
    assert CP._SKIPPED == {"cached prefix": 1}, "within SKIP_REPORT_S the count accumulates"
    clock[0] += CP.SKIP_REPORT_S
    msg = CP.report_skipped()
    assert msg.startswith("sglang_sparse CLAA: 1 prompt(s) not filtered") and "--disable-radix-cache" in msg
    assert CP.report_skipped() is None and not CP._SKIPPED


def test_skip_report_text(monkeypatch):
    monkeypatch.setattr(CP, "_SKIP_REPORTED_AT", [float("-inf")])
    CP._SKIPPED.clear()
    CP._SKIPPED.update({"cached prefix": 3, "prompt split across prefill chunks": 1})
    msg = CP.report_skipped(now=0.0)
    assert msg == ("sglang_sparse CLAA: 4 prompt(s) not filtered since the last report: cached prefix 3, prompt "
                   "split across prefill chunks 1 (a prompt that starts with a prefix in the radix cache is "
                   "prefilled densely; --disable-radix-cache lets CLAA filter it) (a prompt longer than "
                   "--chunked-prefill-size, or one postponed 32 times for a whole-prompt batch, is split and "
                   "prefilled densely; --claa-max-prompt-len N raises the chunk size to N)")


def _hand_built_batch(lens, prefix, page_size, gen):
    """A ForwardBatch as SGLang builds it for an extend batch, over a paged req_to_token."""
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    bs = len(lens)
    rows = torch.randperm(3 * bs, generator=gen)[:bs] + 1
    max_ctx = max(p + n for p, n in zip(prefix, lens)) + page_size
    num_pages = sum(-(-(p + n) // page_size) for p, n in zip(prefix, lens)) + 2
    perm = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    r2t = torch.zeros(3 * bs + 2, max_ctx, dtype=torch.int32)
    locs, pos, used = [], [], 0
    for b, (p, n) in enumerate(zip(prefix, lens)):
        npg = -(-(p + n) // page_size)
        pages = torch.tensor(perm[used: used + npg])
        used += npg
        slots = (pages[:, None] * page_size + torch.arange(page_size)[None, :]).flatten()[: p + n]
        r2t[rows[b], : p + n] = slots.to(torch.int32)
        locs.append(slots[p:])
        pos.append(torch.arange(p, p + n))
    ext = torch.tensor(lens, dtype=torch.int32)
    fb = ForwardBatch(forward_mode=ForwardMode.EXTEND, batch_size=bs, input_ids=torch.randint(0, 100, (sum(lens),)),
                      req_pool_indices=rows, seq_lens=torch.tensor([p + n for p, n in zip(prefix, lens)]),
                      out_cache_loc=torch.cat(locs), seq_lens_sum=sum(prefix) + sum(lens),
                      positions=torch.cat(pos), extend_seq_lens=ext,
                      extend_start_loc=torch.cumsum(ext, 0) - ext, extend_seq_lens_cpu=list(lens),
                      extend_prefix_lens=torch.tensor(prefix, dtype=torch.int32), extend_prefix_lens_cpu=list(prefix),
                      extend_num_tokens=sum(lens), rids=[f"r{i}" for i in range(bs)])
    return fb, r2t


@pytest.mark.parametrize("page_size", [16, 32])
def test_select_and_rewrite_against_reference(page_size, seed):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    lens = [rng.randint(300, 900), rng.randint(20, 60), rng.randint(300, 900)]
    prefix = [0, 64, 0]          # the middle request reuses a cached prefix: dense
    cfg = ClaaConfig(mode="claa", keep_ratio=rng.choice([0.1, 0.2, 0.4]), window=8)
    fb, r2t = _hand_built_batch(lens, prefix, page_size, gen)
    old_pos, old_loc = fb.positions.clone(), fb.out_cache_loc.clone()
    kept = [CP.kept_count(lens[0], cfg, page_size), None, CP.kept_count(lens[2], cfg, page_size)]
    plan = CP.BatchPlan.build(fb.extend_seq_lens_cpu, kept, "cpu")
    assert plan.filtered == [0, 2] and plan.drops[1] == 0
    for j in range(2):                              # cross-layer max of random layer scores
        plan.scores(j).copy_(torch.rand(plan.scores(j).shape, generator=gen, dtype=torch.float64).float())
    keep_idx, loc_idx = CP.select_batch(plan, cfg.window)
    CP.rewrite_forward_batch(fb, plan, keep_idx, loc_idx)

    off = 0
    for i, (p, n) in enumerate(zip(prefix, lens)):
        k = plan.kept[i]
        rows_i = keep_idx[off: off + k] - plan.starts[i]
        if i in plan.filtered:
            w = cfg.window
            imp = plan.scores(plan.filtered.index(i))
            ref = torch.sort(imp[: n - w], descending=True, stable=True).indices[: k - w]
            ref = torch.sort(torch.cat([ref, torch.arange(n - w, n)])).values
            assert torch.equal(rows_i, ref)
            # kept rows keep their original positions (RoPE)
            assert torch.equal(fb.positions[off: off + k], old_pos[plan.starts[i] + ref])
            # KV of the post-filter layers goes to the request's last k slots, which decode reads as
            # the page-aligned suffix [drop, n) of req_to_token
            drop = n - k
            assert drop % page_size == 0 and drop > 0
            assert torch.equal(fb.out_cache_loc[off: off + k].to(torch.int32), r2t[fb.req_pool_indices[i], drop:n])
        else:
            assert torch.equal(rows_i, torch.arange(n))
            assert torch.equal(fb.out_cache_loc[off: off + k], old_loc[plan.starts[i]: plan.starts[i] + n])
        off += k
    assert fb.extend_seq_lens_cpu == plan.kept and fb.extend_num_tokens == sum(plan.kept) == keep_idx.numel()
    assert fb.extend_seq_lens.tolist() == plan.kept
    assert fb.extend_start_loc.tolist() == [sum(plan.kept[:i]) for i in range(3)]
    assert fb.seq_lens.tolist() == [p + n for p, n in zip(prefix, lens)]     # the request still holds n tokens


def test_filtered_attention_equals_dense_attention_over_kept_tokens(seed):
    """What the post-filter layers compute: causal attention among the kept tokens, in original order
    (FlashInfer's ragged prefill over the rewritten lengths) = dense causal attention restricted to the kept
    keys, evaluated at the kept queries."""
    gen = torch.Generator().manual_seed(seed)
    n, h, d = 200, 2, 16
    q, k, v = (torch.randn(n, h, d, generator=gen, dtype=torch.float64) for _ in range(3))
    keep = torch.sort(torch.randperm(n - 8, generator=gen)[:40]).values
    keep = torch.cat([keep, torch.arange(n - 8, n)])
    # ragged causal attention on the gathered rows (index-causal)
    qk = torch.einsum("ihd,jhd->hij", q[keep], k[keep]) / d ** 0.5
    m = len(keep)
    qk = qk.masked_fill(torch.triu(torch.ones(m, m, dtype=torch.bool), 1), float("-inf"))
    ragged = torch.einsum("hij,jhd->ihd", qk.softmax(-1), v[keep])
    # dense causal attention with every dropped key masked (position-causal)
    full = torch.einsum("ihd,jhd->hij", q, k) / d ** 0.5
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[keep] = False
    full = full.masked_fill(mask | dropped[None, :], float("-inf"))
    dense = torch.einsum("hij,jhd->ihd", full.softmax(-1), v)[keep]
    assert torch.allclose(ragged, dense, atol=1e-12)


def test_no_filtered_request_means_no_plan():
    assert CP.BatchPlan.build([100, 200], [None, None], "cpu") is None
    assert CP.BatchPlan.build([100], [100], "cpu") is None


def test_prepare_for_extend_patch_marks_only_with_claa_on(monkeypatch):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    import sglang.srt.runtime_context as rc
    import sglang_sparse.patches.schedule_batch_prepare_for_extend as patch
    from sglang_sparse.config import SparseConfig, attach

    batch = SimpleNamespace(forward_mode=ForwardMode.EXTEND, reqs=[_req(4000, rid="x")], return_logprob=False)
    monkeypatch.setattr(patch, "_cfg", None)
    monkeypatch.setattr(rc, "get_server_args", lambda: SimpleNamespace(page_size=32))     # no config attached
    assert patch.hook("result", batch) == "result"
    assert CP.kept_counts(batch) == [None] and not batch.reqs[0].skip_radix_cache_insert      # all off: inert

    monkeypatch.setattr(patch, "_cfg", None)
    server_args = SimpleNamespace(page_size=32)
    attach(server_args, SparseConfig(claa=CFG))
    monkeypatch.setattr(rc, "get_server_args", lambda: server_args)
    assert patch.hook("result", batch) == "result"
    assert CP.kept_counts(batch) == [CP.kept_count(4000, CFG, 32)] and batch.reqs[0].skip_radix_cache_insert


def test_decode_routes_post_filter_layers_to_the_kept_view(seed, monkeypatch):
    """SparseDecoder with CLAA: both page tables are planned (the kept one from each row's drop), layers
    before the filter layer read the full view, layers from it the kept view; with PrHS layer sharing the
    filter layer must start a selection group."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_sparse.config import ConfigError, SparseConfig
    from sglang_sparse.sparse_decode import SparseDecoder

    class FakeWrapper:
        def __init__(self):
            self.plans, self.runs = [], []

        def plan(self, r2t, rows, seq_lens, **kw):
            self.plans.append(kw)

        def run(self, q, k, v, kmin, kmax, select=True):
            self.runs.append(select)
            return torch.zeros(q.shape[0], q.shape[1], q.shape[2])

    gen = torch.Generator().manual_seed(seed)
    F = 12
    m = SparseDecoder.__new__(SparseDecoder)
    m.sparse_config = SparseConfig()
    m._claa_from, m._group, m.summaries, m.layer_offset = F, 1, None, 0
    m._reselect_every = 1
    m.decode_wrapper, m.decode_wrapper_kept = FakeWrapper(), FakeWrapper()
    m.claa = SimpleNamespace(drop=torch.randint(0, 50, (10,), generator=gen, dtype=torch.int32) * 32)
    m.req_to_token_pool = SimpleNamespace(req_to_token=torch.zeros(10, 64, dtype=torch.int32))
    m.token_to_kv_pool = SimpleNamespace(get_kv_buffer=lambda lid: (None, None))
    m._q_dtype, m._plan_kwargs, m._log_every, m._decode_batches = torch.bfloat16, {"pages": None}, 10 ** 9, 0
    rows = torch.tensor([3, 7, 1])
    fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=3, req_pool_indices=rows,
                         seq_lens=torch.tensor([2000, 3000, 4000]))
    assert m.handles(fb)
    m.plan(fb)
    assert len(m.decode_wrapper.plans) == 1 and "kv_start" not in m.decode_wrapper.plans[0]
    assert torch.equal(m.decode_wrapper_kept.plans[0]["kv_start"], m.claa.drop[rows])
    for lid in range(16):
        layer = SimpleNamespace(layer_id=lid, tp_q_head_num=4, head_dim=8, v_head_dim=8)
        m.forward_decode(torch.randn(3, 32), None, None, layer, fb, save_kv_cache=False)
    assert len(m.decode_wrapper.runs) == F and len(m.decode_wrapper_kept.runs) == 16 - F

    # layer sharing across the filter layer is refused at start-up
    cfg2 = SparseConfig.from_dict({"prhs": {"mode": "prhs", "select": "bounds", "layers_per_selection": 8}})
    pool2 = SimpleNamespace(start_layer=0, get_key_buffer=lambda lid: torch.zeros(4, 2, 8))
    mr = SimpleNamespace(device="cuda", page_size=32, dtype=torch.bfloat16, req_to_token_pool=None,
                         model_config=SimpleNamespace(get_max_num_attention_heads=lambda: 4))
    import sglang.srt.runtime_context as rc

    monkeypatch.setattr(rc, "get_parallel", lambda: SimpleNamespace(attn_tp_size=1))
    with pytest.raises(ConfigError, match="--prhs-layers-per-selection"):
        SparseDecoder.create(mr, cfg2, pool2, claa=SimpleNamespace(filter_layer=F, active=True))


def test_decode_time_axis_reselects_fresh_rows_and_every_r_steps(seed):
    """--prhs-reselect-interval R: a request's first decode step after an extend selects afresh, later
    steps select afresh only when the length is a multiple of R, and leader layers reuse their own slot."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from flashinfer_ext.params import PageSelectParams
    from sglang_sparse.config import SparseConfig
    from sglang_sparse.sparse_decode import SparseDecoder

    class FakeWrapper:
        def __init__(self):
            self.plans, self.runs = [], []

        def plan(self, r2t, rows, seq_lens, **kw):
            self.plans.append(kw)

        def run(self, q, k, v, kmin, kmax, select=True, reuse_slot=None):
            self.runs.append((select, reuse_slot))
            return torch.zeros(q.shape[0], q.shape[1], q.shape[2])

    gen = torch.Generator().manual_seed(seed)
    R, G = 4, 2
    m = SparseDecoder.__new__(SparseDecoder)
    m.sparse_config = SparseConfig.from_dict({"prhs": {"mode": "prhs", "select": "bounds", "reselect_interval": R,
                                                       "dilation": 1, "layers_per_selection": G}})
    m._claa_from, m._group, m.summaries, m.layer_offset = None, G, None, 0
    m._reselect_every = R
    m._fresh = torch.zeros(10, dtype=torch.bool)
    m.decode_wrapper, m.decode_wrapper_kept = FakeWrapper(), None
    m.req_to_token_pool = SimpleNamespace(req_to_token=torch.zeros(10, 64, dtype=torch.int32))
    m.token_to_kv_pool = SimpleNamespace(get_kv_buffer=lambda lid: (None, None))
    pages = m.sparse_config.prhs.select_params(32)
    assert isinstance(pages, PageSelectParams) and pages.dilation == 1
    m._q_dtype, m._plan_kwargs, m._log_every, m._decode_batches = torch.bfloat16, {"pages": pages}, 10 ** 9, 0
    rows = torch.randperm(10, generator=gen)[:3]
    lens = torch.randint(100, 5000, (3,), generator=gen)
    # an extend batch of the first two rows (new requests) marks them fresh; the third row is older
    ext = SimpleNamespace(forward_mode=ForwardMode.EXTEND, batch_size=2, req_pool_indices=rows[:2])
    m.mark_fresh(ext)
    for step in range(2 * R):
        seq = lens + step
        fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=3, req_pool_indices=rows, seq_lens=seq)
        m.plan(fb)
        kw = m.decode_wrapper.plans[-1]
        expect = seq % R == 0
        if step == 0:
            expect = expect | torch.tensor([True, True, False])
        assert torch.equal(kw["reselect"], expect), (step, kw["reselect"], expect)
        assert kw["pages"] is pages
    assert not bool(m._fresh[rows].any())
    # a CUDA-graph replay view padded with a stale row that now belongs to another, fresh request: the
    # padded entry neither selects nor clears that request's flag
    other = int(torch.tensor([r for r in range(10) if r not in rows.tolist()])[0])
    m.mark_fresh(SimpleNamespace(forward_mode=ForwardMode.EXTEND, batch_size=1, req_pool_indices=torch.tensor([other])))
    seq = torch.cat([lens + 2 * R, torch.tensor([R * 3])])                  # multiples of R where padded
    padded = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=4, num_padding=1,
                             req_pool_indices=torch.cat([rows, torch.tensor([other])]), seq_lens=seq)
    m.plan(padded)
    kw = m.decode_wrapper.plans[-1]
    assert not bool(kw["reselect"][3]) and bool(m._fresh[other])
    assert torch.equal(kw["reselect"][:3], seq[:3] % R == 0)
    for lid in range(6):
        layer = SimpleNamespace(layer_id=lid, tp_q_head_num=4, head_dim=8, v_head_dim=8)
        m.forward_decode(torch.randn(3, 32), None, None, layer, fb, save_kv_cache=False)
    assert m.decode_wrapper.runs == [(lid % G == 0, lid // G) for lid in range(6)]


def test_decode_time_axis_state_sizes(monkeypatch):
    """With --prhs-reselect-interval > 1 both the state slots (one per leader layer) and the kept list's width
    (the budget at the longest context, or every page of a densely read short request) are sized at start-up."""
    from sglang_sparse.config import SparseConfig
    from sglang_sparse.sparse_decode import SparseDecoder
    import sglang.srt.runtime_context as rc

    monkeypatch.setattr(rc, "get_parallel", lambda: SimpleNamespace(attn_tp_size=1))
    L, G, P, ctx = 12, 4, 32, 32768
    for min_ctx, expect_width in ((0, 64), (4096, 128)):
        cfg = SparseConfig.from_dict({"prhs": {"mode": "prhs", "select": "bounds", "budget": 1 / 16,
                                               "reselect_interval": 4, "layers_per_selection": G,
                                               "min_context_len": min_ctx}})
        pool = SimpleNamespace(start_layer=0, layer_num=L, get_key_buffer=lambda lid: torch.zeros(64 * P, 2, 16))
        r2t = torch.zeros(9, ctx, dtype=torch.int32)
        mr = SimpleNamespace(device="cuda", page_size=P, dtype=torch.bfloat16, tp_rank=0,
                             model_config=SimpleNamespace(get_max_num_attention_heads=lambda: 4),
                             req_to_token_pool=SimpleNamespace(size=8, req_to_token=r2t),
                             server_args=SimpleNamespace(max_running_requests=8, decode_log_interval=40,
                                                         enable_metrics=False))
        m = SparseDecoder.create(mr, cfg, pool)
        w = m.decode_wrapper
        assert m._reselect_every == 4 and w.reuse_slots == L // G and w.reuse_width == expect_width
        assert w.state_pages.shape == (L // G, 9, 2, expect_width) and bool(m._fresh.all())


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_decode_wrapper_uses_the_local_heads_under_tensor_parallelism(tp, monkeypatch):
    """Under tensor parallelism each rank's pool holds H_kv / TP KV heads and its attention H_q / TP query
    heads; the decode wrapper and the page summaries are built for those local heads (selection is per local
    KV head, so ranks never exchange anything), and the GQA group size stays H_q / H_kv."""
    from sglang_sparse.config import SparseConfig
    from sglang_sparse.sparse_decode import SparseDecoder
    import sglang.srt.runtime_context as rc

    H_Q, H_KV, D, P, L = 32, 8, 16, 32, 4
    monkeypatch.setattr(rc, "get_parallel", lambda: SimpleNamespace(attn_tp_size=tp))
    cfg = SparseConfig.from_dict({"prhs": {"mode": "prhs", "select": "bounds", "budget": 1 / 16},
                                  "art": {"mode": "on"}})
    pool = SimpleNamespace(start_layer=0, layer_num=L, get_key_buffer=lambda lid: torch.zeros(64 * P, H_KV // tp, D))
    mr = SimpleNamespace(device="cuda", page_size=P, dtype=torch.bfloat16, tp_rank=tp - 1,
                         model_config=SimpleNamespace(get_max_num_attention_heads=lambda: H_Q),
                         req_to_token_pool=SimpleNamespace(size=8, req_to_token=torch.zeros(9, 4096, dtype=torch.int32)),
                         server_args=SimpleNamespace(max_running_requests=8, decode_log_interval=40,
                                                     enable_metrics=False))
    m = SparseDecoder.create(mr, cfg, pool)
    w = m.decode_wrapper
    assert (w.h_q, w.h_kv, w.group) == (H_Q // tp, H_KV // tp, H_Q // H_KV)
    kmin, kmax = m.summaries.layer(0)
    assert kmin.shape == kmax.shape == (64, H_KV // tp, D)
    assert m._tp_rank == str(tp - 1)


# --------------------------------------------------------------------------- admission (whole prompts)
def _adder_env(monkeypatch, claa_on: bool, chunk: int = 4096, page: int = 16):
    """SGLang's real PrefillAdder and Req over a ChunkCache (the cache SGLang uses with the radix cache
    off), with the patch of ``PrefillAdder.add_one_req`` configured for CLAA on or off."""
    import sglang.srt.managers.schedule_policy as SP
    import sglang.srt.runtime_context as rc
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.chunk_cache import ChunkCache

    import sglang_sparse.patches.prefill_adder_add_one_req as patch
    from sglang_sparse.config import SparseConfig

    monkeypatch.setattr(SP, "is_dsa_prefill_cp_in_seq_split", lambda: False)
    monkeypatch.setattr(SP, "is_prefill_context_parallel_enabled", lambda: False)
    monkeypatch.setattr(rc, "get_server_args", lambda: SimpleNamespace(chunked_prefill_size=chunk, page_size=page))
    monkeypatch.setattr(patch, "_cfg", SparseConfig(claa=CFG) if claa_on else SparseConfig())

    class Alloc:
        device = torch.device("cpu")

        def available_size(self):
            return 1 << 20

    cache = ChunkCache(CacheInitParams(disable=True, req_to_token_pool=None, token_to_kv_pool_allocator=Alloc(),
                                       page_size=page))
    original = getattr(SP.PrefillAdder.add_one_req, "__wrapped__", SP.PrefillAdder.add_one_req)

    def new_adder():
        return SP.PrefillAdder(page, cache, Alloc(), None, 0.5, 16384, chunk)

    def add(adder, req):
        req.init_next_round_input(cache)
        return patch.hook(original, adder, req, has_chunked_req=False, truncation_align_size=None)

    return SP.AddReqResult, new_adder, add


def _real_req(rid, n, logprob=False):
    from array import array

    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    return Req(rid, "", array("q", range(1, n + 1)), SamplingParams(max_new_tokens=8), return_logprob=logprob)


def _ranges(adder):
    return [(r.rid, r.extend_range.start, r.extend_range.end) for r in adder.can_run_list]


def test_admission_unchanged_with_claa_off(monkeypatch):
    R, new_adder, add = _adder_env(monkeypatch, claa_on=False)
    adder = new_adder()
    assert add(adder, _real_req("a", 3000)) == R.CONTINUE
    add(adder, _real_req("b", 3000))
    assert _ranges(adder) == [("a", 0, 3000), ("b", 0, 1088)] and adder.new_chunked_req.rid == "b"  # SGLang splits b


def test_admission_keeps_a_claa_prompt_whole(monkeypatch):
    """A prompt CLAA would filter that does not fit the batch's remaining chunk budget is skipped (it stays
    queued; shorter requests behind it still join), and the next batch takes it whole, so CLAA filters it."""
    R, new_adder, add = _adder_env(monkeypatch, claa_on=True)
    adder = new_adder()
    a, b, c = _real_req("a", 3000), _real_req("b", 3000), _real_req("c", 500)
    assert add(adder, a) == R.CONTINUE
    assert add(adder, b) == R.CONTINUE and b not in adder.can_run_list and adder.new_chunked_req is None
    add(adder, c)
    assert _ranges(adder) == [("a", 0, 3000), ("c", 0, 500)]
    nxt = new_adder()                          # the next prefill batch: b first, whole
    add(nxt, b)
    assert _ranges(nxt) == [("b", 0, 3000)] and nxt.new_chunked_req is None
    b.prefix_indices = torch.zeros(0, dtype=torch.int64)
    assert CP.filter_decision(b, CFG, 16) == (CP.kept_count(3000, CFG, 16), "filtered")


@pytest.mark.parametrize("case", ["longer than a chunk", "logprobs", "below min length", "limit reached"])
def test_admission_splits_what_claa_would_not_filter_anyway(monkeypatch, case):
    """No postponing where waiting cannot help: a prompt longer than a whole chunk, one CLAA leaves dense
    anyway, or one already postponed MAX_WHOLE_PROMPT_DEFERRALS times is split as SGLang would."""
    R, new_adder, add = _adder_env(monkeypatch, claa_on=True, chunk=4096 if case != "longer than a chunk" else 2048)
    adder = new_adder()
    add(adder, _real_req("a", 1000 if case == "longer than a chunk" else 3000))
    n = {"longer than a chunk": 2500, "below min length": 200}.get(case, 3000)
    b = _real_req("b", n, logprob=case == "logprobs")
    if case == "below min length":             # keep the remaining budget below b's length
        add(adder, _real_req("a2", 1000))
    if case == "limit reached":
        b._claa_whole_prompt_deferrals = CP.MAX_WHOLE_PROMPT_DEFERRALS
    add(adder, b)
    assert b in adder.can_run_list and adder.new_chunked_req is b and b.extend_range.end < n


def test_admission_never_postpones_into_an_empty_batch(monkeypatch):
    R, new_adder, add = _adder_env(monkeypatch, claa_on=True)
    adder = new_adder()
    b = _real_req("b", 4000)
    assert add(adder, b) == R.CONTINUE and _ranges(adder) == [("b", 0, 4000)]
    assert getattr(b, "_claa_whole_prompt_deferrals", 0) == 0


def test_admission_patch_is_installed_on_sglangs_prefill_adder(monkeypatch):
    """Through SGLang's HookRegistry (what the server does at start-up), the real
    ``PrefillAdder.add_one_req`` consults CLAA."""
    from sglang_sparse import patches

    R, new_adder, add = _adder_env(monkeypatch, claa_on=True)
    assert "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req" in patches.install_all()
    adder = new_adder()
    a, b = _real_req("a", 3000), _real_req("b", 3000)
    for r in (a, b):
        r.init_next_round_input(adder.tree_cache)
        adder.add_one_req(r, has_chunked_req=False, truncation_align_size=None)
    assert _ranges(adder) == [("a", 0, 3000)] and b._claa_whole_prompt_deferrals == 1


# --------------------------------------------------------------------------- per-forward metadata
def test_kept_counts_reach_the_backend_through_forward_batch_init_new(monkeypatch):
    """The scheduler's decisions travel on the requests; when SGLang builds the ForwardBatch of an extend batch
    (the patched ``ForwardBatch.init_new``), they start the sparse backend's per-forward metadata, and
    ``init_forward_metadata`` turns them into the batch's CLAA plan, seen only for that batch."""
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    import sglang_sparse.patches.forward_batch_init_new as patch
    from sglang_sparse.backend import SparseBackendMixin

    class Parent:
        def init_forward_metadata(self, fb):
            self.forward_metadata = SimpleNamespace(use_ragged=True)

    class Backend(SparseBackendMixin, Parent):
        pass

    begun = []
    b = Backend()
    b.claa = SimpleNamespace(begin=lambda fb, ragged, kept: begun.append((fb, ragged, kept)) or ("plan", kept))
    reqs = [_req(4000, rid="a"), _req(100, rid="b")]
    batch = SimpleNamespace(forward_mode=ForwardMode.EXTEND, reqs=reqs, return_logprob=False)
    CP.mark_batch(batch, CFG, 16)
    kept = CP.kept_counts(batch)
    assert kept[0] is not None and kept[1] is None
    fb = SimpleNamespace(forward_mode=ForwardMode.EXTEND)
    assert patch.hook(fb, ForwardBatch, batch, SimpleNamespace(attn_backend=b)) is fb
    assert b.sparse_metadata.forward_batch is fb and b.sparse_metadata.claa_kept == kept
    b.init_forward_metadata(fb)
    assert begun == [(fb, True, kept)] and b.sparse_metadata.claa_plan(fb) == ("plan", kept)
    assert b.sparse_metadata.claa_plan(SimpleNamespace()) is None          # another batch sees no plan
    # a decode batch's ForwardBatch hands nothing over, and its metadata replaces the extend batch's
    dec = SimpleNamespace(forward_mode=ForwardMode.DECODE)
    patch.hook(dec, ForwardBatch, batch, SimpleNamespace(attn_backend=b))
    assert b.sparse_metadata.forward_batch is fb
    b.init_forward_metadata(dec)
    assert b.sparse_metadata.forward_batch is dec and b.sparse_metadata.claa_plan(fb) is None
    # with CLAA off (no CLAA part) or another backend, the hook does nothing
    b.claa = None
    patch.hook(fb, ForwardBatch, batch, SimpleNamespace(attn_backend=b))
    assert b.sparse_metadata.forward_batch is dec
    assert patch.hook(fb, ForwardBatch, batch, SimpleNamespace(attn_backend=object())) is fb


def test_init_new_patch_is_installed_on_sglangs_forward_batch():
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    from sglang_sparse import patches

    assert "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new" in patches.install_all()
    assert isinstance(ForwardBatch.__dict__["init_new"], classmethod)
