"""The page-mass estimators of ``benchmarks/page_estimators.py`` against exact attention on random inputs."""

import math

import torch

from benchmarks import page_estimators as pe
from sglang_sparse import calibrate as cal
from sglang_sparse.prhs import _logits, page_summaries

F64 = torch.float64


def _qkv(n=300, h_q=6, h_kv=2, d=16):
    return (torch.randn(h_q, d, dtype=F64), torch.randn(n, h_kv, d, dtype=F64) * 2,
            torch.randn(n, h_kv, d, dtype=F64))


def test_exact_logits_give_the_true_group_page_mass(seed):
    q, k, _ = _qkv()
    got = pe.group_page_mass_from_logits(_logits(q, k, 0.3), k.shape[1], 32)
    want = cal._group_page_mass(q, k, 32, 0.3)
    torch.testing.assert_close(got, want, msg=f"seed {seed}")
    torch.testing.assert_close(pe.ranking_scores("oracle", q, k, 0.3, 32), want, msg=f"seed {seed}")


def test_quantised_keys_stay_within_half_a_step_of_their_page_range(seed):
    q, k, _ = _qkv(n=277)
    k[64:128, 0, 3] = 1.25                                       # a channel constant over a page: kept exact
    for bits in (2, 4, 8):
        kq = pe.quantised_keys(k, 64, bits)
        kmin, kmax = page_summaries(k, 64)
        step = (kmax - kmin) / ((1 << bits) - 1)                 # [N, H_kv, D]
        per_token = step.repeat_interleave(64, dim=0)[: k.shape[0]]
        assert ((kq - k).abs() <= per_token / 2 + 1e-12).all(), f"seed {seed}, bits {bits}"
        lo, hi = kmin.repeat_interleave(64, dim=0)[:277], kmax.repeat_interleave(64, dim=0)[:277]
        assert ((kq >= lo - 1e-12) & (kq <= hi + 1e-12)).all(), f"seed {seed}, bits {bits}"
        assert (kq[64:128, 0, 3] == 1.25).all()
    # with enough bits the estimated page mass is the true one
    est = pe.group_page_mass_from_logits(_logits(q, pe.quantised_keys(k, 64, 24), 0.3), 2, 64)
    torch.testing.assert_close(est, cal._group_page_mass(q, k, 64, 0.3), atol=1e-5, rtol=1e-5, msg=f"seed {seed}")


def test_sparq_logits_exact_with_every_channel_or_a_query_on_r_channels(seed):
    q, k, _ = _qkv()
    torch.testing.assert_close(pe.sparq_logits(q, k, 0.3, q.shape[1]), _logits(q, k, 0.3), msg=f"seed {seed}")
    q4 = q.clone()
    q4[:, 4:] = 0.0                                             # 4 non-zero channels: r = 4 reads all of them
    torch.testing.assert_close(pe.sparq_logits(q4, k, 0.3, 4), _logits(q4, k, 0.3), msg=f"seed {seed}")
    # fewer channels than the query uses: an approximation, rescaled by ||q||_1 / ||q_r||_1
    q2 = torch.tensor([[3.0, 1.0, 0.0, 0.0]], dtype=F64)
    k2 = torch.tensor([[[1.0, 1.0, 5.0, 5.0]]], dtype=F64)
    assert math.isclose(float(pe.sparq_logits(q2, k2, 1.0, 1)[0, 0]), 3.0 * (4.0 / 3.0), rel_tol=1e-12)


def test_mean_scores_are_exact_for_pages_of_equal_keys(seed):
    q = torch.randn(4, 8, dtype=F64)
    page_keys = torch.randn(5, 2, 8, dtype=F64)
    k = page_keys.repeat_interleave(32, dim=0)[:150]           # 5 pages of equal keys, the last one 22 long
    torch.testing.assert_close(pe.ranking_scores("mean", q, k, 0.5, 32), cal._group_page_mass(q, k, 32, 0.5),
                               msg=f"seed {seed}")


def test_every_ranking_reads_everything_at_the_full_budget_and_the_oracle_finds_a_needle(seed):
    q, k, v = _qkv(n=640, d=16)
    q = q[:1].expand_as(q) + 0.1 * torch.randn_like(q)          # every query head points the same way ...
    k[300, :, :] = q[0] * 3.0                                   # ... at one key, on page 9
    cfg = cal.CalibrationSettings(page_size=32, budget=1 / 16, delta=0.05)
    shifts = cal.max_shift([640], cfg)
    got = pe.sample(q, k, v, 0.4, cfg, shifts, list(pe.RANKINGS))
    for name, (err, mass, _) in got.items():
        assert err.shape == (shifts + 1,) and mass.shape == (shifts + 1,), name
        assert err[-1] < 1e-12 and mass[-1] < 1e-12, f"seed {seed}: {name} at every page: {err}, {mass}"
        assert (mass >= -1e-12).all() and (mass <= 1 + 1e-12).all(), f"seed {seed}: {name} {mass}"
    # the needle's page dominates every head's attention: at the smallest budget with a free page (20 pages:
    # 1/16 is the 3 forced pages, 1/8 has 6) the oracle and the fine estimates keep it
    for name in ("oracle", "kminmax-q4", "sparq-r1/4"):
        assert got[name][1][1] < 0.5, f"seed {seed}: {name} {got[name]}"


def test_selection_by_exact_mass_keeps_every_head_within_delta_with_the_fewest_pages(seed):
    """With the true per-head page masses as the estimate, selecting until the estimate is within delta must keep
    every query head's true dropped mass within delta, and one page fewer (of the ones not forced) must not."""
    from sglang_sparse.prhs import exact_dropped_mass

    q, k, v = _qkv(n=1000, h_q=6, h_kv=2, d=16)
    cfg = cal.CalibrationSettings(page_size=32, budget=1 / 16, delta=0.05)
    head_mass = pe.head_scores("oracle", q, k, 0.3, 32)                  # [H_q, N]
    num_pages = head_mass.shape[1]
    for delta in (0.5, 0.2, 0.05, 0.0):
        pages, num = pe.estimated_mass_selection(head_mass, 2, delta, 1, 2)
        dropped = exact_dropped_mass(q, k, 32, pages, num, 0.3)            # [H_q]
        assert (dropped <= delta + 1e-9).all(), f"seed {seed}, delta {delta}: {dropped}"
        if delta == 0.0:
            assert (num == num_pages).all(), f"seed {seed}: {num}"
        for g in range(2):
            n = int(num[g])
            assert sorted(pages[g, :3].tolist()) == [0, num_pages - 2, num_pages - 1], f"seed {seed}"
            if n > 3:                                                      # one page fewer drops too much
                fewer = num.clone()
                fewer[g] = n - 1
                d2 = exact_dropped_mass(q, k, 32, pages, fewer, 0.3)[g * 3:(g + 1) * 3]
                assert (d2 > delta - 1e-9).any(), f"seed {seed}, delta {delta}, group {g}: {d2}"
    rule = {name: got[2] for name, got in pe.sample(q, k, v, 0.3, cfg, cal.max_shift([1000], cfg),
                                                    ["oracle", "minmax"]).items()}
    for i, d in enumerate(pe.DELTAS):
        assert rule["oracle"][i, 0] <= d + 1e-9, f"seed {seed}: {rule['oracle']}"
        assert 0 < rule["oracle"][i, 1] <= 1 and rule["minmax"][i, 1] <= 1, f"seed {seed}"
    # the min/max rule with every page as the budget is PrHS's certified rule: its dropped mass is within delta too
    assert (rule["minmax"][:, 0] <= torch.tensor(pe.DELTAS, dtype=F64) + 1e-9).all(), f"seed {seed}: {rule['minmax']}"


def test_midrange_is_the_middle_of_prhs_bounds(seed):
    """The midrange estimate ranks pages by (ub + lb) / 2 of PrHS's bounds (plus log n_p): per query head its page
    logits equal the bounds' midpoint."""
    from sglang_sparse.prhs import page_bounds, page_lengths

    q, k, _ = _qkv(n=200, h_q=4, h_kv=2, d=8)
    kmin, kmax = page_summaries(k, 32)
    ub, lb = page_bounds(q, kmin, kmax, 0.3, per_query_head=True)           # [H_q, N]
    logn = page_lengths(200, 32).to(F64).log()
    want = torch.softmax((ub + lb) / 2 + logn[None], dim=-1)
    torch.testing.assert_close(pe.midrange_page_mass(q, k, 0.3, 32), want, msg=f"seed {seed}")


def test_group_midrange_uses_the_group_bounds(seed):
    from sglang_sparse.prhs import page_bounds, page_lengths

    q, k, _ = _qkv(n=200, h_q=4, h_kv=2, d=8)
    kmin, kmax = page_summaries(k, 32)
    ub, lb = page_bounds(q, kmin, kmax, 0.3)                                 # [H_kv, N]: max / min over the group
    want = torch.softmax((ub + lb) / 2 + page_lengths(200, 32).to(F64).log()[None], dim=-1)
    got = pe.group_midrange_page_mass(q, k, 0.3, 32)
    torch.testing.assert_close(got[0], want[0], msg=f"seed {seed}")
    torch.testing.assert_close(got[1], want[0], msg=f"seed {seed}")
    torch.testing.assert_close(got[3], want[1], msg=f"seed {seed}")


def _moving_needle(seed, n, page_then, page_next, P=16, h_kv=2, d=16):
    """Two consecutive decode steps over ``n + 1`` then ``n + 2`` keys: the first query points at page
    ``page_then``, the second at page ``page_next`` (each a page of keys along its own channel), the rest noise."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n + 2, h_kv, d, dtype=F64, generator=gen) * 0.1
    v = torch.randn(n + 2, h_kv, d, dtype=F64, generator=gen)
    steps = []
    for j, page in enumerate((page_then, page_next)):
        u = torch.zeros(d, dtype=F64)
        u[j] = 1.0
        k[page * P:(page + 1) * P] += 6.0 * u
        steps.append(((4.0 * u).repeat(2 * h_kv, 1), k[: n + 1 + j], v[: n + 1 + j]))
    return steps


def test_reused_lists_miss_a_needle_that_appears_after_the_fresh_selection(seed):
    """--prhs-reselect-interval 2 offline: step 0 selects afresh (its query points at page 2), step 1 reuses that list
    plus the page created since, while its query points at page 5, outside the list: the reused step drops nearly all
    the mass. With steps that do not change, a reused step reads what a fresh selection reads."""
    P = 16
    steps = _moving_needle(seed, 16 * 8 - 1, 2, 5)               # 7 full pages + one token: step 1 starts page 8
    r = pe.reused_selection_rule(steps, 1.0, P, 2, sink_pages=1, recent_pages=1, deltas=(0.1,))
    assert r.shape == (1, 1, 2), r.shape
    dropped, read = float(r[0, 0, 0]), float(r[0, 0, 1])
    assert dropped > 0.9, f"seed {seed}: the reused list read page 5 ({dropped})"
    fresh_num = len({0, 2, 7})                                    # sink, the needle page, the recent page
    assert math.isclose(read, (fresh_num + 1) / 9), f"seed {seed}: {read} of 9 pages (the new page 8 appended)"
    same = pe.reused_selection_rule([steps[0], steps[0]], 1.0, P, 2, 1, 1, deltas=(0.1,))
    assert float(same[0, 0, 0]) <= 0.1, f"seed {seed}: an unchanged step dropped {float(same[0, 0, 0])}"
    assert pe.reused_selection_rule(steps, 1.0, P, 1, 1, 1, deltas=(0.1,)).shape[0] == 0


def test_reused_lists_widened_by_dilation(seed):
    """--prhs-dilation 1 offline: the reused list also reads the neighbours of every kept page (here pages 1 and 3
    around the needle page 2, and 6 before the recent page 7), so a query moving to the next page is still covered."""
    steps = _moving_needle(seed, 16 * 8 - 2, 2, 3)
    plain = pe.reused_selection_rule(steps, 1.0, 16, 2, 1, 1, deltas=(0.1,))
    wide = pe.reused_selection_rule(steps, 1.0, 16, 2, 1, 1, deltas=(0.1,), dilation=1)
    assert float(plain[0, 0, 0]) > 0.9 and float(wide[0, 0, 0]) < 0.1, f"seed {seed}: {plain} {wide}"
    assert math.isclose(float(wide[0, 0, 1]), 6 / 8), f"seed {seed}: pages 0-3, 6, 7 of 8, got {float(wide[0, 0, 1])}"
