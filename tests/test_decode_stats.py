"""The served decode statistics (``SparseDecoder.decode_stats``) from a wrapper's buffers: the
fraction of KV pages read counts the pages actually loaded (ART's concurrent tails included), the
ART blocks are the pages in the output, the delta-hat is the last selecting (leader) layer's. CPU only:
the buffers are filled by hand."""

import types

import torch

from flashinfer_ext.decode import SparseDecodeWrapper
from sglang_sparse.sparse_decode import SparseDecoder


def _wrapper(art: bool, gen: torch.Generator):
    h_q, h_kv, bs = 8, 2, 3
    w = SparseDecodeWrapper(h_q, h_kv, 16, 16, max_batch_size=4, max_seq_len=4096, device="cpu")
    w.bs, w._planned, w.art, w.select = bs, True, art, True
    npg = torch.randint(20, 200, (bs,), generator=gen, dtype=torch.int32)
    w.num_pages[:bs] = npg
    per_group = torch.stack([torch.randint(1, int(n), (h_kv,), generator=gen) for n in npg]).to(torch.int32)
    loaded = torch.minimum(per_group + torch.randint(0, 9, (bs, h_kv), generator=gen, dtype=torch.int32),
                           npg[:, None])
    w.blocks_read_buf[:bs] = per_group.repeat_interleave(h_q // h_kv, dim=1)
    w.pages_loaded_buf[:bs] = loaded.repeat_interleave(h_q // h_kv, dim=1)
    w.stop_reason_buf[:bs] = (torch.rand(bs, h_kv, generator=gen) < 0.5).int().repeat_interleave(h_q // h_kv, dim=1)
    w.lead_dhat[:bs] = torch.rand(bs, h_kv, generator=gen)
    w.cur_dhat[:bs] = w.lead_dhat[:bs]
    return w, npg, per_group, loaded


def test_decode_stats_counts_loaded_pages():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    for art in (True, False):
        w, npg, blocks, loaded = _wrapper(art, gen)
        stats = SparseDecoder.decode_stats(types.SimpleNamespace(decode_wrapper=w, audit=None))
        read = (loaded if art else blocks).double()
        expect = read.sum() / (npg.double()[:, None].expand_as(read)).sum()
        assert abs(stats["pages_read_frac"] - float(expect)) < 1e-6, (art, stats, float(expect))
        assert abs(stats["blocks_read_mean"] - float(blocks.double().mean())) < 1e-4
        stop = w.stop_reason_buf[: w.bs, ::4].ne(0).double().mean()
        assert abs(stats["art_stop_rate"] - float(stop)) < 1e-6
        assert abs(stats["delta_hat_max"] - float(w.lead_dhat[: w.bs].max())) < 1e-6
        assert stats["batch_size"] == w.bs


def test_decode_stats_skip_reused_lists():
    """A reused list has no certificate (NaN): mean and max are over the fresh lists."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    w, _, _, _ = _wrapper(True, gen)
    w.lead_dhat[0] = float("nan")
    stats = SparseDecoder.decode_stats(types.SimpleNamespace(decode_wrapper=w))
    fresh = w.lead_dhat[1: w.bs]
    assert abs(stats["delta_hat_mean"] - float(fresh.mean())) < 1e-6
    assert abs(stats["delta_hat_max"] - float(fresh.max())) < 1e-6
    w.lead_dhat[: w.bs] = float("nan")
    stats = SparseDecoder.decode_stats(types.SimpleNamespace(decode_wrapper=w))
    assert stats["delta_hat_mean"] != stats["delta_hat_mean"] and stats["delta_hat_max"] != stats["delta_hat_max"]



def _audit_decoder(n, layers, group, max_scale, delta=0.05, h_q=8, max_rows=10):
    """A SparseDecoder with only its audit state (CPU, no kernels run)."""
    from sglang_sparse.config import PrhsConfig, SparseConfig

    dec = SparseDecoder.__new__(SparseDecoder)
    p = PrhsConfig(mode="prhs", delta=delta, budget=1 / 2, audit_interval=n, layers_per_selection=group,
                   audit_max_scale=max_scale)
    dec.sparse_config = SparseConfig(prhs=p)
    dec._audit_every, dec._num_layers, dec._group, dec._reselect_every = n, layers, group, 1
    dec.layer_offset = 0
    dec._init_budget_shift(max_rows, "cpu")
    dec.num_q_heads_local, dec.num_kv_heads_local, dec.head_dim, dec.page_size, dec.max_ctx = h_q, 2, 16, 16, 4096
    dec._init_audit(8, max_rows, "cpu")
    return dec


def test_audit_choice_counters_and_first_step_flag():
    """--prhs-audit-interval N: a request is audited (at every layer) on its first decode step after a (re)start,
    the flag being consumed, and whenever its length + 1 is a multiple of N (with reselection every R | N steps, at
    lengths that are multiples of R, that is the last step of a reuse window: reused lists get measured); padding
    rows never (and consume no flag).
    Every (request, layer) audit goes to the ring and the counters, the first-step ones apart; with
    --prhs-audit-max-scale 1 the audit only reports."""
    from types import SimpleNamespace

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_sparse.sparse_decode import AUDIT_RING

    seed = int(torch.randint(0, 2**31, ()).item())
    gen = torch.Generator().manual_seed(seed)
    n, layers, h_q, delta = 4, 3, 8, 0.05
    dec = _audit_decoder(n, layers, 1, max_scale=1, delta=delta, h_q=h_q)
    assert dec.budget_shift is None and dec._max_shift == 0
    assert dec.audit_stats()["audits"] == 0
    rows = torch.tensor([3, 7, 1, 5, 2], dtype=torch.int64)      # the last one is CUDA-graph padding
    dec.decode_wrapper = SimpleNamespace(req_idx=rows.to(torch.int32))
    expect, first_of, fresh = [], [], {3, 7, 1, 5, 2, 0, 4, 6, 8, 9}
    for step in range(4):
        if step == 2:       # row 7 restarts (an extend batch): audited again on its next decode step
            dec.mark_fresh(SimpleNamespace(forward_mode=ForwardMode.EXTEND, batch_size=1,
                                           req_pool_indices=torch.tensor([7])))
            fresh.add(7)
        lens = torch.tensor([101, 205, 38, 401, 9], dtype=torch.int64) + step
        dec._plan_audit(SimpleNamespace(req_pool_indices=rows, seq_lens=lens, num_padding=1))
        want = [(r in fresh) or (L + 1) % n == 0 for r, L in zip(rows.tolist()[:4], lens.tolist()[:4])] + [False]
        first = [r in fresh for r in rows.tolist()[:4]] + [False]
        fresh -= set(rows.tolist()[:4])
        got = dec.audit.audited[:5].bool().tolist()
        assert got == want, f"seed={seed} step {step}: audited {got}, expected {want}"
        assert dec._audit_first[:5].tolist() == first, f"seed={seed} step {step}: first {dec._audit_first[:5]}"
        assert bool(dec._audit_fresh[2]), f"seed={seed}: the padding row consumed a first-step flag"
        for lid in range(layers):
            assert bool(torch.isnan(dec.audit.dropped).all())
            vals = torch.rand(5, h_q, generator=gen) * 0.1        # what the kernels would leave for this layer
            for b in range(5):
                if want[b]:
                    dec.audit.dropped_buf[b] = vals[b]
                    expect.append(float(vals[b].max()))
                    first_of.append(first[b])
            dec._fold_audit(lid, rows)
            dec.audit.dropped_buf.fill_(float("nan"))
    assert not bool(dec._audit_fresh[rows[:4]].any()), f"seed={seed}: first-step flags not consumed"
    stats = dec.audit_stats()
    e = torch.tensor(expect, dtype=torch.float64)
    # the ring holds the audits alone, in order (requests not audited never take a slot)
    assert torch.equal(dec._audit_ring[: len(expect)].double(), e.float().double()), (seed, dec._audit_ring[:8])
    assert int(dec._audit_pos) == len(expect), (seed, int(dec._audit_pos))
    assert stats["audits"] == len(expect) > 0, (seed, stats, expect)
    assert abs(stats["dropped_mean"] - float(e.mean())) < 1e-6, (seed, stats)
    assert abs(stats["dropped_p99"] - float(torch.quantile(e, 0.99))) < 1e-6, (seed, stats)
    assert abs(stats["dropped_over_delta"] - float((e > delta).double().mean())) < 1e-9, (seed, stats)
    over = [x > delta for x in e.float().tolist()]
    later = [not f for f in first_of]
    assert stats["audits_total"] == len(expect) and stats["audits_total_over"] == sum(over), (seed, stats)
    assert stats["audits_later"] == sum(later) < len(expect), (seed, stats)
    assert stats["audits_later_over"] == sum(o and lt for o, lt in zip(over, later)), (seed, stats)
    assert stats["budget_shift_mean"] == 0.0, (seed, stats)


def test_audit_feedback_rule():
    """--prhs-audit-max-scale S (selection groups of 2 layers): after an audited step, the budget shift of a
    (request, group) whose dropped mass exceeded delta at a layer of the group is raised by one, once per step,
    never past log2(S); the others and the padding row are left alone; an extend batch resets the row."""
    from types import SimpleNamespace

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    seed = int(torch.randint(0, 2**31, ()).item())
    gen = torch.Generator().manual_seed(seed)
    layers, group, delta = 5, 2, 0.05                          # groups {0, 1}, {2, 3}, {4}
    dec = _audit_decoder(1, layers, group, max_scale=4, delta=delta)
    assert dec._max_shift == 2 and tuple(dec.budget_shift.shape) == (10, 3)
    rows = torch.tensor([3, 7, 1, 3], dtype=torch.int64)       # the padding row repeats row 3
    dec.decode_wrapper = SimpleNamespace(req_idx=rows.to(torch.int32))
    expect = torch.zeros(10, 3, dtype=torch.int32)
    for step in range(4):
        dec._plan_audit(SimpleNamespace(req_pool_indices=rows, seq_lens=torch.full((4,), 50 + step), num_padding=1))
        raised = torch.zeros(10, 3, dtype=torch.bool)
        for lid in range(layers):
            vals = torch.rand(4, 8, generator=gen) * 0.1
            vals[3] = 0.9                                      # padding: never audited, never raises
            dec.audit.dropped_buf[:3] = vals[:3]
            for b in range(3):
                raised[int(rows[b]), lid // group] |= float(vals[b].max()) > delta
            dec._fold_audit(lid, rows)
            dec.audit.dropped_buf.fill_(float("nan"))
        expect = torch.where(raised, (expect + 1).clamp(max=2), expect)
        assert torch.equal(dec.budget_shift, expect), f"seed={seed} step {step}: {dec.budget_shift} vs {expect}"
    assert int(dec.budget_shift.max()) <= 2
    assert abs(dec.audit_stats()["budget_shift_mean"] - float(expect[[3, 7, 1]].float().mean())) < 1e-6
    dec.mark_fresh(SimpleNamespace(forward_mode=ForwardMode.EXTEND, batch_size=1, req_pool_indices=torch.tensor([7])))
    expect[7] = 0
    assert torch.equal(dec.budget_shift, expect), f"seed={seed}: the restarted row kept its scale"


def test_decode_stats_shared_last_layer():
    """--prhs-layers-per-selection: the batch's last layer shares its leader's list and has no bound of its own
    (delta_hat NaN); the logged delta-hat is the leader layer's, and the statistics name that layer."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    w, _, _, _ = _wrapper(True, gen)
    w.cur_dhat[: w.bs] = float("nan")            # what a shared run leaves for its own layer
    stats = SparseDecoder.decode_stats(types.SimpleNamespace(decode_wrapper=w, _stats_leader=28))
    lead = w.lead_dhat[: w.bs]
    assert abs(stats["delta_hat_mean"] - float(lead.mean())) < 1e-6, (stats, lead)
    assert abs(stats["delta_hat_max"] - float(lead.max())) < 1e-6, (stats, lead)
    assert stats["delta_hat_layer"] == 28


def _create_decoder(cfg, P, *, start_layer, layers, max_ctx):
    """``SparseDecoder.create`` on stand-ins for SGLang's model runner and KV pool (4 requests, 2 KV heads of 16
    dims, a stage holding layers ``start_layer .. start_layer + layers - 1``)."""
    from types import SimpleNamespace

    pool = SimpleNamespace(start_layer=start_layer, layer_num=layers,
                           get_key_buffer=lambda lid: torch.zeros(64 * P, 2, 16))
    mr = SimpleNamespace(device="cuda", page_size=P, dtype=torch.bfloat16, tp_rank=0,
                         model_config=SimpleNamespace(get_max_num_attention_heads=lambda: 4),
                         req_to_token_pool=SimpleNamespace(size=4, req_to_token=torch.zeros(5, max_ctx,
                                                                                            dtype=torch.int32)),
                         server_args=SimpleNamespace(max_running_requests=4, decode_log_interval=40,
                                                     enable_metrics=False))
    return SparseDecoder.create(mr, cfg, pool)


def test_decode_stats_layer_is_the_last_leader(monkeypatch):
    """The layer named with the delta-hat: the group leader of the model's last layer."""
    from types import SimpleNamespace

    import sglang.srt.runtime_context as rc

    from sglang_sparse.config import SparseConfig

    monkeypatch.setattr(rc, "get_parallel", lambda: SimpleNamespace(attn_tp_size=1))
    P = 32
    for layers, g, leader in ((12, 4, 8), (13, 4, 12), (30, 1, 29), (30, 4, 28)):
        cfg = SparseConfig.from_dict({"prhs": {"mode": "prhs", "layers_per_selection": g, "select": "bounds"}})
        assert _create_decoder(cfg, P, start_layer=0, layers=layers, max_ctx=1024)._stats_leader == leader, (layers, g)


def test_profile_shifts_of_a_pipeline_stage_and_the_plan_width(monkeypatch):
    """A decoder built for the layers 4..11 of a 12-layer model (two layers per selection) with a profile's
    per-layer shifts: each row starts at the largest shift of each of its groups' layers (global indices), the plan
    covers the largest of those and of the feedback, and the reused lists are wide enough. Without a profile, or
    with PrHS reading every page, no shift exists and the plan is unchanged."""
    from types import SimpleNamespace

    import sglang.srt.runtime_context as rc

    from sglang_sparse.config import SparseConfig

    monkeypatch.setattr(rc, "get_parallel", lambda: SimpleNamespace(attn_tp_size=1))
    P = 32
    shifts = [5, 5, 5, 5, 0, 1, 0, 0, 2, 0, 0, 3]

    def build(**prhs):
        cfg = SparseConfig.from_dict({"prhs": {"mode": "prhs", "layers_per_selection": 2, "select": "bounds",
                                               "budget": 1 / 2, **prhs}})
        return _create_decoder(cfg, P, start_layer=4, layers=8, max_ctx=4096)

    dec = build(layer_budget_shift=shifts, reselect_interval=4, budget=1 / 16)
    assert dec.budget_shift.tolist() == [[1, 0, 2, 3]] * 5
    assert dec._plan_kwargs["budget_max_shift"] == 3
    assert dec.decode_wrapper.reuse_width >= min(4096 // P, dec.sparse_config.prhs.budget_pages(4096 // P) << 3)
    dec = build(layer_budget_shift=shifts, audit_interval=16, audit_max_scale=32)
    assert dec._plan_kwargs["budget_max_shift"] == 5 and dec._max_shift == 5
    for prhs in ({}, {"layer_budget_shift": [0] * 12}, {"layer_budget_shift": shifts, "budget": 1.0}):
        dec = build(**prhs)
        assert dec.budget_shift is None and "budget_max_shift" not in dec._plan_kwargs, prhs


def test_buffers_sized_by_the_models_context_not_the_token_table():
    """SGLang's req_to_token rows carry 4 tokens of slack past the context length, which no request reaches (it is
    capped at context_len - 1): the decoder's longest context is the model's, so a 32K model's 32-token pages make a
    1024-page selection tile, not 2048; without a model config, the table's width."""
    from types import SimpleNamespace

    from sglang_sparse.sparse_decode import longest_context

    runner = SimpleNamespace(model_config=SimpleNamespace(context_len=32768))
    assert longest_context(32772, runner) == 32768
    assert -(-longest_context(32772, runner) // 32) == 1024
    assert longest_context(4100, SimpleNamespace(model_config=SimpleNamespace(context_len=8192))) == 4100
    assert longest_context(32772, SimpleNamespace()) == 32772
