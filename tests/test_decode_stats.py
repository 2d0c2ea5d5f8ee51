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



def test_audit_layer_choice_and_logged_statistics():
    """--prhs-audit-interval N: requests whose length is a multiple of N are audited at a layer that moves with
    the length (padding rows never); the logged statistics are the mean, 99th percentile and share above delta
    of the per-request dropped mass (largest over query heads) of the audits so far."""
    from flashinfer_ext.audit import DroppedMassAudit
    from sglang_sparse.config import PrhsConfig, SparseConfig
    from sglang_sparse.sparse_decode import AUDIT_RING

    seed = int(torch.randint(0, 2**31, ()).item())
    gen = torch.Generator().manual_seed(seed)
    n, layers, h_q = 4, 6, 8
    dec = SparseDecoder.__new__(SparseDecoder)
    dec.sparse_config = SparseConfig(prhs=PrhsConfig(mode="prhs", delta=0.05, audit_interval=n))
    dec._audit_every, dec._num_layers = n, layers
    dec.audit = DroppedMassAudit(h_q, 2, 16, 16, max_batch_size=8, max_seq_len=4096, device="cpu", num_sms=4)
    dec._audit_ring = torch.full((AUDIT_RING + 1,), float("nan"))
    dec._audit_pos = torch.zeros((), dtype=torch.int64)
    assert dec.audit_stats()["audits"] == 0
    expect = []
    for step in range(3):
        rows = torch.tensor([3, 7, 1, 5, 2], dtype=torch.int64)
        lens = torch.tensor([100, 204, 37, 400, 8], dtype=torch.int64) + step
        fb = types.SimpleNamespace(req_pool_indices=rows, seq_lens=lens, num_padding=1)
        dec._plan_audit(fb)
        got = dec.audit.layer_of[:5].tolist()
        want = [int((L // n + r) % layers) if L % n == 0 else -1 for r, L in zip(rows.tolist(), lens.tolist())]
        want[-1] = -1                                   # the padding row
        assert got == want, f"seed={seed} step {step}: audited layers {got}, expected {want}"
        assert bool(torch.isnan(dec.audit.dropped).all())
        # what the kernels would leave: values for the audited rows
        vals = torch.rand(5, h_q, generator=gen) * 0.1
        for b in range(5):
            if want[b] >= 0:
                dec.audit.dropped_buf[b] = vals[b]
                expect.append(float(vals[b].max()))
    dec._fold_audit()
    stats = dec.audit_stats()
    e = torch.tensor(expect, dtype=torch.float64)
    # the ring holds the audits alone, in order (requests not audited never take a slot)
    assert torch.equal(dec._audit_ring[: len(expect)].double(), e.float().double()), (seed, dec._audit_ring[:8])
    assert int(dec._audit_pos) == len(expect), (seed, int(dec._audit_pos))
    assert stats["audits"] == len(expect) > 0, (seed, stats, expect)
    assert abs(stats["dropped_mean"] - float(e.mean())) < 1e-6, (seed, stats)
    assert abs(stats["dropped_p99"] - float(torch.quantile(e, 0.99))) < 1e-6, (seed, stats)
    assert abs(stats["dropped_over_delta"] - float((e > 0.05).double().mean())) < 1e-9, (seed, stats)


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


def test_decode_stats_layer_is_the_last_leader(monkeypatch):
    """The layer named with the delta-hat: the group leader of the model's last layer."""
    from types import SimpleNamespace

    import sglang.srt.runtime_context as rc

    from sglang_sparse.config import SparseConfig

    monkeypatch.setattr(rc, "get_parallel", lambda: SimpleNamespace(attn_tp_size=1))
    P = 32
    for layers, g, leader in ((12, 4, 8), (13, 4, 12), (30, 1, 29), (30, 4, 28)):
        cfg = SparseConfig.from_dict({"prhs": {"mode": "prhs", "layers_per_selection": g}})
        pool = SimpleNamespace(start_layer=0, layer_num=layers, get_key_buffer=lambda lid: torch.zeros(64 * P, 2, 16))
        mr = SimpleNamespace(device="cuda", page_size=P, dtype=torch.bfloat16, tp_rank=0,
                             model_config=SimpleNamespace(get_max_num_attention_heads=lambda: 4),
                             req_to_token_pool=SimpleNamespace(size=4, req_to_token=torch.zeros(5, 1024,
                                                                                                dtype=torch.int32)),
                             server_args=SimpleNamespace(max_running_requests=4, decode_log_interval=40,
                                                         enable_metrics=False))
        assert SparseDecoder.create(mr, cfg, pool)._stats_leader == leader, (layers, g)
