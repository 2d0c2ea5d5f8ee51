"""CLAA reference math: scoring against a loop implementation, aggregation, selection, TP combination.

Fresh random seed every run; it is printed in every assertion message (``seed=...``) for reproduction.
"""

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from sglang_sparse import claa

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _naive_window_scores(q, k, window, pool_kernel, pool):
    """Loop-by-loop restatement of the documented formula (independent of claa.window_scores)."""
    n, h_q, d = q.shape
    h_kv = k.shape[1]
    g = h_q // h_kv
    w = min(window, n)
    s = torch.zeros(h_q, n, dtype=q.dtype)
    for h in range(h_q):
        for i in range(w):
            pos = n - w + i
            logits = torch.stack([(q[pos, h] * k[j, h // g]).sum() / math.sqrt(d) for j in range(pos + 1)])
            s[h, : pos + 1] += torch.softmax(logits, dim=0)

    def pool_segment(x):
        r = pool_kernel // 2
        out = torch.empty_like(x)
        for j in range(x.numel()):
            vals = [x[t] for t in range(j - r, j + r + 1) if 0 <= t < x.numel()]
            if pool == "avg":
                out[j] = sum(vals) / pool_kernel
            else:
                out[j] = max(vals)
        return out

    pooled = torch.stack([torch.cat([pool_segment(s[h, : n - w]), pool_segment(s[h, n - w:])]) for h in range(h_q)])
    return torch.stack([pooled[gi * g: (gi + 1) * g].sum(0) for gi in range(h_kv)])


@pytest.mark.parametrize("n,h_q,h_kv,window,pool_kernel,pool", [
    (23, 4, 2, 8, 7, "avg"), (23, 4, 2, 8, 7, "max"), (5, 2, 1, 8, 3, "avg"), (9, 4, 4, 4, 1, "avg"),
    (17, 8, 2, 8, 5, "max"), (1, 2, 2, 8, 7, "avg")])
def test_window_scores_matches_loops(seed, n, h_q, h_kv, window, pool_kernel, pool):
    q = torch.randn(n, h_q, 6, dtype=F64)
    k = torch.randn(n, h_kv, 6, dtype=F64)
    got = claa.window_scores(q, k, window, pool_kernel, pool)
    ref = _naive_window_scores(q, k, window, pool_kernel, pool)
    assert got.shape == (h_kv, n) and got.dtype == F64, f"seed={seed}"
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, msg=lambda m: f"seed={seed}\n{m}")


def test_window_scores_mass_and_causality(seed):
    n, h_q, h_kv, w = 40, 6, 2, 8
    q = torch.randn(n, h_q, 16, dtype=F64) * 3
    k = torch.randn(n, h_kv, 16, dtype=F64)
    s = claa.window_scores(q, k, w, pool_kernel=1)
    # every window query's softmax row sums to 1: total per KV head = G * w
    torch.testing.assert_close(s.sum(1), torch.full((h_kv,), float(h_q // h_kv * w), dtype=F64),
                               msg=lambda m: f"seed={seed}\n{m}")
    # only the window's queries are read: changing the queries in front of the window changes nothing
    q2 = q.clone()
    q2[: n - w] = torch.randn(n - w, h_q, 16, dtype=F64)
    torch.testing.assert_close(claa.window_scores(q2, k, w), claa.window_scores(q, k, w))
    # sm_scale defaults to 1/sqrt(D)
    torch.testing.assert_close(claa.window_scores(q, k, w, sm_scale=0.25), claa.window_scores(q, k, w))


def test_pool_scores_matches_torch_pooling(seed):
    x = torch.rand(3, 31, dtype=F64) + 0.1
    for kern in (1, 3, 7, 13):
        avg = F.avg_pool1d(x[:, None], kern, stride=1, padding=kern // 2, count_include_pad=True)[:, 0]
        mx = F.max_pool1d(x[:, None], kern, stride=1, padding=kern // 2)[:, 0]
        torch.testing.assert_close(claa.pool_scores(x, kern, "avg"), avg, msg=lambda m: f"seed={seed} k={kern}\n{m}")
        torch.testing.assert_close(claa.pool_scores(x, kern, "max"), mx, msg=lambda m: f"seed={seed} k={kern}\n{m}")
    with pytest.raises(ValueError):
        claa.pool_scores(x, 4)


def test_needle_token_is_ranked_first_and_kept(seed):
    n, h_q, h_kv, d, w = 200, 4, 2, 32, 8
    q = torch.randn(n, h_q, d, dtype=F64) * 0.3
    k = torch.randn(n, h_kv, d, dtype=F64) * 0.3
    needle = int(torch.randint(0, n - w, (1,)))
    direction = torch.randn(d, dtype=F64)
    q[n - w:] += direction * 2            # every window query looks for the needle
    k[needle] = direction * 2
    layers = [claa.window_scores(q, k, w, pool_kernel=1) for _ in range(2)]
    imp = claa.aggregate_max(layers)
    assert int(imp[: n - w].argmax()) == needle, f"seed={seed} needle={needle}"
    kept = claa.select_tokens(imp, 0.1, w)
    assert needle in kept.tolist(), f"seed={seed}"
    # pooled scores spread the needle to its neighbours, still the needle region wins
    pooled = claa.window_scores(q, k, w, pool_kernel=7)
    assert abs(int(claa.rank_fastkv(pooled)[: n - w].argmax()) - needle) <= 3, f"seed={seed}"


def test_aggregate_max_hand_computed():
    l0 = torch.tensor([[1.0, 5.0, 0.5, 2.0], [3.0, 0.0, 0.25, 1.0]], dtype=F64)
    l1 = torch.tensor([[0.5, 4.0, 6.0, 0.1], [2.0, 2.0, 2.0, 2.5]], dtype=F64)
    got = claa.aggregate_max([l0, l1])
    torch.testing.assert_close(got, torch.tensor([3.0, 5.0, 6.0, 2.5], dtype=F64))
    # the kept prefix tokens follow it: n=4, w=1, keep 0.5 -> one prefix token (position 2) + window
    assert claa.select_tokens(got, 0.5, 1).tolist() == [2, 3]


def test_single_layer_rankings_and_ranksum_hand_computed():
    s = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 1.0]], dtype=F64)
    torch.testing.assert_close(claa.rank_fastkv(s), torch.tensor([5.0, 2.0, 4.0], dtype=F64))
    torch.testing.assert_close(claa.rank_gemfilter(s), torch.tensor([5.0, 2.0, 4.0], dtype=F64))
    # per-layer max over heads: layer 0 -> [4, 2, 3] ranks [2, 0, 1]; layer 1 -> [1, 1, 7] ranks [0.5, 0.5, 2]
    s1 = torch.tensor([[1.0, 1.0, 7.0]], dtype=F64)
    torch.testing.assert_close(claa.rank_weighted_ranksum([s, s1]),
                               torch.tensor([2 + 2 * 0.5, 0 + 2 * 0.5, 1 + 2 * 2.0], dtype=F64))
    torch.testing.assert_close(claa.rank_weighted_ranksum([s, s1], weights=[1.0, 0.0]),
                               torch.tensor([2.0, 0.0, 1.0], dtype=F64))


def test_average_ranks_with_ties():
    x = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])
    assert claa.average_ranks(x).tolist() == [3.0, 0.0, 3.0, 1.0, 3.0]


def test_keep_all_returns_every_token(seed):
    for n in (1, 7, 8, 9, 100, 1000):
        imp = torch.rand(n, dtype=F64) + 0.01
        assert torch.equal(claa.select_tokens(imp, 1.0, 8), torch.arange(n)), f"seed={seed} n={n}"


def test_select_tokens_rule(seed):
    for _ in range(50):
        n = int(torch.randint(1, 300, (1,)))
        w = int(torch.randint(1, 16, (1,)))
        keep = float(torch.rand(()) * 0.9 + 0.05)
        imp = torch.rand(n, dtype=F64) + 0.01
        kept = claa.select_tokens(imp, keep, w)
        ww = min(w, n)
        total = claa.num_kept_tokens(n, keep, w)
        msg = f"seed={seed} n={n} w={w} keep={keep}"
        assert kept.numel() == total == min(n, max(ww, math.floor(keep * n + 1e-9))), msg
        assert torch.equal(kept, torch.sort(kept).values) and kept.unique().numel() == kept.numel(), msg
        assert set(range(n - ww, n)) <= set(kept.tolist()), msg
        prefix_kept = kept[kept < n - ww]
        dropped = torch.tensor(sorted(set(range(n - ww)) - set(prefix_kept.tolist())), dtype=torch.long)
        if prefix_kept.numel() and dropped.numel():
            assert imp[prefix_kept].min() >= imp[dropped].max(), msg


def test_select_tokens_ties_prefer_lower_positions():
    imp = torch.ones(20, dtype=F64)
    assert claa.select_tokens(imp, 0.5, 4).tolist() == list(range(6)) + list(range(16, 20))
    assert claa.num_kept_tokens(30, 0.1, 2) == 3      # 0.1 * 30 is 2.9999999999999996 in float


def test_defaults_scale_with_depth():
    assert claa.default_filter_layer(32) == 15
    assert claa.default_claa_layers(32) == [11, 12, 13, 14]
    assert claa.default_gemfilter_layer(32) == 13
    assert claa.default_claa_layers(32, filter_layer=2) == [0, 1]
    prev = 0
    for L in range(2, 129):
        f = claa.default_filter_layer(L)
        assert 1 <= f <= L - 1 and f >= prev
        assert abs(f - 15 * L / 32) <= 0.5 + 1e-9 or f in (1, L - 1)
        prev = f
    assert [claa.default_filter_layer(L) for L in (24, 28, 36, 40, 80)] == [11, 13, 17, 19, 38]


class _FakeGroup:
    """A process group of ``world`` ranks run as threads; all_reduce meets at a barrier."""

    def __init__(self, world):
        import torch.distributed as dist

        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots = [None] * world
        self.local = threading.local()
        self.ops = {dist.ReduceOp.SUM: lambda xs: torch.stack(xs).sum(0),
                    dist.ReduceOp.MAX: lambda xs: torch.stack(xs).amax(0)}
        self.calls = 0

    def all_reduce(self, tensor, op, group):
        assert group is self
        rank = self.local.rank
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        result = self.ops[op](self.slots)
        self.barrier.wait()
        tensor.copy_(result)
        self.calls += 1

    def run(self, fn):
        out = [None] * self.world
        errors = []

        def worker(r):
            self.local.rank = r
            try:
                out[r] = fn(r)
            except BaseException as e:  # surfaced below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=worker, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_tp_combined_ranking_equals_single_device(seed, world):
    n, h_kv, num_layers, w, keep = 150, 12, 4, 8, 0.2
    g = 2
    q = [torch.randn(n, h_kv * g, 16, dtype=F64) for _ in range(num_layers)]
    k = [torch.randn(n, h_kv, 16, dtype=F64) for _ in range(num_layers)]
    full = [claa.window_scores(q[l], k[l], w) for l in range(num_layers)]
    single_max = claa.aggregate_max(full)
    single_sum = claa.rank_fastkv(full[-1])
    per = h_kv // world

    def rank_fn(r):
        # each rank holds KV heads [r*per, (r+1)*per) and their query heads
        hs = slice(r * per, (r + 1) * per)
        qs = slice(r * per * g, (r + 1) * per * g)
        local = [claa.window_scores(q[l][:, qs], k[l][:, hs], w) for l in range(num_layers)]
        mx = claa.combine_tp_scores(torch.cat(local), group=fake, op="max", all_reduce=fake.all_reduce)
        sm = claa.combine_tp_scores(local[-1], group=fake, op="sum", all_reduce=fake.all_reduce)
        return mx, sm

    fake = _FakeGroup(world)
    results = fake.run(rank_fn)
    assert fake.calls == 2 * world, f"seed={seed}"
    ref_max = claa.select_tokens(single_max, keep, w)
    ref_sum = claa.select_tokens(single_sum, keep, w)
    for r, (mx, sm) in enumerate(results):
        msg = f"seed={seed} world={world} rank={r}"
        assert torch.equal(mx, single_max), msg                   # max is exact
        torch.testing.assert_close(sm, single_sum, rtol=1e-13, atol=0, msg=lambda m: f"{msg}\n{m}")
        assert torch.equal(claa.select_tokens(mx, keep, w), ref_max), msg
        assert torch.equal(claa.select_tokens(sm, keep, w), ref_sum), msg
    # without the all-reduce a rank's local ranking is not the global one (the test can fail)
    local_only = claa.aggregate_max([claa.window_scores(q[l][:, : per * g], k[l][:, :per], w)
                                     for l in range(num_layers)])
    assert not torch.equal(local_only, single_max), f"seed={seed}"


def test_combine_tp_scores_without_group_is_local_reduction(seed):
    s = torch.rand(3, 10, dtype=F64)
    torch.testing.assert_close(claa.combine_tp_scores(s), s.sum(0))
    torch.testing.assert_close(claa.combine_tp_scores(s, op="max"), s.amax(0))
    with pytest.raises(ValueError):
        claa.combine_tp_scores(s, op="mean")


def _gloo_rank(rank: int, world: int, port: int, seed: int, out_dir: str) -> None:
    """One rank of a real torch.distributed (gloo) group: its half of the KV heads' window scores, combined with
    combine_tp_scores' default all-reduce; writes the combined scores and the kept tokens."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(seed)
        n, h_kv, g, num_layers, w = 160, 4, 2, 3, 8
        q = [torch.randn(n, h_kv * g, 16, dtype=F64, generator=gen) for _ in range(num_layers)]
        k = [torch.randn(n, h_kv, 16, dtype=F64, generator=gen) for _ in range(num_layers)]
        per = h_kv // world
        hs, qs = slice(rank * per, (rank + 1) * per), slice(rank * per * g, (rank + 1) * per * g)
        local = torch.cat([claa.window_scores(q[l][:, qs], k[l][:, hs], w) for l in range(num_layers)])
        mx = claa.combine_tp_scores(local, group=dist.group.WORLD, op="max")
        torch.save({"max": mx, "kept": claa.select_tokens(mx, 0.2, w)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_combine_tp_scores_over_a_real_gloo_group(seed, tmp_path):
    """Two processes in a gloo group (the CPU stand-in for a TP group of two GPUs): each holds half the KV heads;
    after combine_tp_scores both hold the single-device cross-layer max and keep the same tokens as one device."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = 2
    mp.start_processes(_gloo_rank, args=(world, port, seed, str(tmp_path)), nprocs=world, start_method="spawn")
    gen = torch.Generator().manual_seed(seed)
    n, h_kv, g, num_layers, w = 160, 4, 2, 3, 8
    q = [torch.randn(n, h_kv * g, 16, dtype=F64, generator=gen) for _ in range(num_layers)]
    k = [torch.randn(n, h_kv, 16, dtype=F64, generator=gen) for _ in range(num_layers)]
    single = claa.aggregate_max([claa.window_scores(q[l], k[l], w) for l in range(num_layers)])
    kept = claa.select_tokens(single, 0.2, w)
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.equal(got["max"], single), f"seed={seed} rank={r}: combined scores differ from one device's"
        assert torch.equal(got["kept"], kept), f"seed={seed} rank={r}: kept tokens differ from one device's"
