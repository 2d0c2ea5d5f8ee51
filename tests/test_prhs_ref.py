"""PrHS reference math: page summaries and bounds, the certified dropped-mass bound on thousands of
random and structured cases, the selection rule, edge cases, the pre-hoc axes.

Fresh random seed every run; it is printed in every assertion message (``seed=...``) for reproduction.
"""

import math

import pytest
import torch

from sglang_sparse import prhs

F64 = torch.float64
REL = 1e-9      # float64 slack for comparing a bound with the exact mass


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _case(n, h_kv, group, d, dv=8, needle=False, scale_range=(-1.0, 1.0)):
    """Random decode case: per-query-head logit scale from flat (0.1) to peaked (10); optional needles."""
    h_q = h_kv * group
    k = torch.randn(n, h_kv, d, dtype=F64)
    v = torch.randn(n, h_kv, dv, dtype=F64)
    lo, hi = scale_range
    q = torch.randn(h_q, d, dtype=F64) * (10 ** (torch.rand(h_q, 1, dtype=F64) * (hi - lo) + lo))
    if needle:
        pos = torch.randint(0, n, (h_kv,))
        for g in range(h_kv):
            k[pos[g], g] = q[g * group: (g + 1) * group].mean(0) / q[g * group].norm() * 4
    return q, k, v


def test_page_summaries_and_lengths(seed):
    for n, p in ((1, 16), (16, 16), (17, 16), (100, 16), (95, 32)):
        k = torch.randn(n, 3, 5, dtype=F64)
        kmin, kmax = prhs.page_summaries(k, p)
        lens = prhs.page_lengths(n, p)
        num_pages = math.ceil(n / p)
        msg = f"seed={seed} n={n} P={p}"
        assert kmin.shape == kmax.shape == (num_pages, 3, 5), msg
        assert lens.sum() == n and lens.numel() == num_pages and (lens[:-1] == p).all(), msg
        for i in range(num_pages):
            chunk = k[i * p: min(n, (i + 1) * p)]
            assert torch.equal(kmin[i], chunk.amin(0)) and torch.equal(kmax[i], chunk.amax(0)), msg
        torch.testing.assert_close(prhs.page_means(k, p)[-1], k[(num_pages - 1) * p:].mean(0))


def test_page_bounds_contain_every_logit(seed):
    for group in (1, 2, 4):
        n, h_kv, d, p = 203, 2, 16, 16
        q, k, _ = _case(n, h_kv, group, d)
        s = d ** -0.5
        kmin, kmax = prhs.page_summaries(k, p)
        ub, lb = prhs.page_bounds(q, kmin, kmax, s)
        ubh, lbh = prhs.page_bounds(q, kmin, kmax, s, per_query_head=True)
        logits = torch.einsum("hd,thd->ht", q, k.repeat_interleave(group, dim=1)) * s
        pad = -n % p
        lg = torch.cat([logits, logits[:, -1:].expand(-1, pad)], 1).reshape(h_kv * group, -1, p)
        msg = f"seed={seed} G={group}"
        assert (lg.amax(-1) <= ubh * (1 + 1e-12) + 1e-12).all() and (lg.amin(-1) >= lbh - 1e-12 - 1e-12 * lbh.abs()).all(), msg
        torch.testing.assert_close(ub, ubh.reshape(h_kv, group, -1).amax(1))
        torch.testing.assert_close(lb, lbh.reshape(h_kv, group, -1).amin(1))
        # the formula itself, for one head and page
        h, pg = group - 1, 1
        a, b = q[h] * kmin[pg, h // group], q[h] * kmax[pg, h // group]
        assert abs(float(torch.maximum(a, b).sum() * s - ubh[h, pg])) < 1e-12, msg
        # one-token pages: the bounds are the logit itself
        kmin1, kmax1 = prhs.page_summaries(k, 1)
        ub1, lb1 = prhs.page_bounds(q, kmin1, kmax1, s, per_query_head=True)
        torch.testing.assert_close(ub1, logits)
        torch.testing.assert_close(lb1, logits)


def _check_selection(sel, ub, lb, lens, delta, budget, sink, recent, seed, tag):
    msg = f"seed={seed} {tag}"
    h_kv, num_pages = ub.shape
    forced = list(range(min(sink, num_pages)))
    forced += [p for p in range(max(0, num_pages - recent), num_pages) if p not in forced]
    assert sel.pages.shape == (h_kv, budget), msg
    for g in range(h_kv):
        m = int(sel.num_selected[g])
        row = sel.pages[g].tolist()
        assert all(x == -1 for x in row[m:]), msg
        chosen = row[:m]
        assert len(set(chosen)) == m and all(0 <= x < num_pages for x in chosen), msg
        nf = min(len(forced), budget)
        assert chosen[:nf] == forced[:nf], msg
        rest = chosen[nf:]
        if rest:
            ubs = ub[g, rest]
            assert (ubs[:-1] >= ubs[1:]).all(), msg                 # descending ub
            others = sorted(set(range(num_pages)) - set(chosen))
            if others:
                assert ub[g, others].max() <= ubs.min(), msg         # the best ones were taken
        dh = float(sel.delta_hat[g])
        if dh > delta:
            assert m == min(budget, num_pages), f"{msg}: stopped early at {m} with delta_hat {dh} > {delta}"
        elif rest and delta > 0:
            shorter = prhs.prehoc_delta_hat(ub[g: g + 1], lb[g: g + 1], lens, sel.pages[g: g + 1],
                                            torch.tensor([m - 1]))
            assert float(shorter) > delta, f"{msg}: not the shortest certified prefix"


def test_certified_bound_holds_on_thousands_of_cases(seed):
    gen_cases = 0
    stats = {"met": 0, "budget": 0}
    for it in range(48):
        group = (1, 2, 4)[it % 3]
        h_kv = 64 // group
        p = (16, 32)[it % 2]
        n = int(torch.randint(1, 40 * p, (1,)))
        d = (8, 16, 32)[it % 3]
        q, k, v = _case(n, h_kv, group, d, needle=it % 4 == 1,
                        scale_range=((-1.5, 0.0), (-1.0, 1.0), (0.0, 1.5))[it % 3])
        s = d ** -0.5
        kmin, kmax = prhs.page_summaries(k, p)
        ub, lb = prhs.page_bounds(q, kmin, kmax, s)
        if it % 5 == 4:
            lb = prhs.page_mean_lower_bounds(q, prhs.page_means(k, p), s)    # the tighter, Jensen one
        lens = prhs.page_lengths(n, p)
        num_pages = lens.numel()
        delta = float(torch.tensor([0.0, 0.01, 0.05, 0.2, 0.5, 0.9])[it % 6])
        budget = int(torch.randint(0, num_pages + 3, (1,)))
        sink, recent = int(torch.randint(0, 3, (1,))), int(torch.randint(0, 4, (1,)))
        tag = f"it={it} n={n} P={p} G={group} delta={delta} budget={budget} sink={sink} recent={recent}"
        sel = prhs.select_pages(ub, lb, lens, delta, budget, sink, recent)
        _check_selection(sel, ub, lb, lens, delta, budget, sink, recent, seed, tag)
        exact = prhs.exact_dropped_mass(q, k, p, sel.pages, sel.num_selected, s)       # [H_q]
        bound = sel.delta_hat.repeat_interleave(group)
        assert (exact <= bound * (1 + REL) + 1e-300).all(), \
            f"seed={seed} {tag}: exact {exact.max()} > delta_hat at {int((exact - bound).argmax())}"
        # post-hoc: the exact normaliser of the selection gives a tighter bound that still holds
        _, lse = prhs.sparse_attention(q, k, v, p, sel.pages, sel.num_selected, s, return_lse=True)
        post = prhs.select_pages(ub, lb, lens, delta, budget, sink, recent, z_sel_exact=lse.exp())
        assert torch.equal(post.pages, sel.pages), f"seed={seed} {tag}"
        assert (post.delta_hat <= sel.delta_hat * (1 + REL) + 1e-300).all(), f"seed={seed} {tag}"
        assert (exact <= post.delta_hat.repeat_interleave(group) * (1 + REL) + 1e-300).all(), f"seed={seed} {tag}"
        torch.testing.assert_close(prhs.posthoc_delta_hat(ub, lens, sel.pages, sel.num_selected, lse),
                                   post.delta_hat, rtol=1e-12, atol=0)
        stats["met"] += int((sel.delta_hat <= delta).sum())
        stats["budget"] += int((sel.delta_hat > delta).sum())
        gen_cases += h_kv
    assert gen_cases >= 1500, gen_cases
    # both outcomes occurred: the bound was met (by selection) and the budget stopped selection
    assert stats["met"] > 0 and stats["budget"] > 0, f"seed={seed} {stats}"


def test_needle_page_first_and_posthoc_certifies(seed):
    """A needle token with a huge logit: its page has the largest ub and is taken first after the
    forced pages. The pre-hoc lower bounds (box, mean) are loose on such a page, so the pre-hoc
    certificate needs the whole budget; the post-hoc one (exact normaliser) meets delta, and with
    the exact per-page normaliser as lb the selection stops right after the needle page."""
    n, p, d = 64 * 16, 16, 16
    k = torch.randn(n, 1, d, dtype=F64) * 0.05
    q = torch.randn(1, d, dtype=F64)
    needle = int(torch.randint(32, 900, (1,)))
    k[needle, 0] = q[0] / q[0].norm() * 60
    v = torch.randn(n, 1, 4, dtype=F64)
    s = d ** -0.5
    kmin, kmax = prhs.page_summaries(k, p)
    ub, lb = prhs.page_bounds(q, kmin, kmax, s)
    lbm = prhs.page_mean_lower_bounds(q, prhs.page_means(k, p), s)
    lbx = prhs.page_log_mean_exp(q, k, p, s)
    assert (lbm >= lb).all() and (lbx >= lbm - 1e-12).all(), f"seed={seed}"     # tighter and tighter
    lens = prhs.page_lengths(n, p)
    msg = f"seed={seed} needle={needle}"
    for lower in (lb, lbm):
        sel = prhs.select_pages(ub, lower, lens, 0.05, 16, 1, 1)
        assert int(sel.pages[0, 2]) == needle // p, msg
        exact = prhs.exact_dropped_mass(q, k, p, sel.pages, sel.num_selected, s)
        assert float(exact[0]) <= float(sel.delta_hat[0]) and float(exact[0]) < 1e-6, msg
        _, lse = prhs.sparse_attention(q, k, v, p, sel.pages, sel.num_selected, s, return_lse=True)
        post = prhs.posthoc_delta_hat(ub, lens, sel.pages, sel.num_selected, lse)
        assert float(exact[0]) <= float(post[0]) <= 0.05 < float(sel.delta_hat[0]), msg
    sel = prhs.select_pages(ub, lbx, lens, 0.05, 16, 1, 1)
    assert sel.pages[0, : int(sel.num_selected[0])].tolist() == [0, 63, needle // p], msg
    assert float(prhs.exact_dropped_mass(q, k, p, sel.pages, sel.num_selected, s)[0]) <= float(sel.delta_hat[0]) <= 0.05


@pytest.mark.parametrize("group", [1, 2, 4])
def test_delta_zero_selects_everything_and_equals_dense(seed, group):
    for n in (1, 15, 16, 17, 250):
        p = 16
        q, k, v = _case(n, 2, group, 16, needle=True)
        s = 16 ** -0.5
        kmin, kmax = prhs.page_summaries(k, p)
        ub, lb = prhs.page_bounds(q, kmin, kmax, s)
        lens = prhs.page_lengths(n, p)
        sel = prhs.select_pages(ub, lb, lens, 0.0, lens.numel() + 2, 1, 1)
        msg = f"seed={seed} n={n} G={group}"
        assert (sel.num_selected == lens.numel()).all(), msg
        assert (sel.delta_hat == 0).all(), msg
        assert (prhs.exact_dropped_mass(q, k, p, sel.pages, sel.num_selected, s) == 0).all(), msg
        out, lse = prhs.sparse_attention(q, k, v, p, sel.pages, sel.num_selected, s, return_lse=True)
        dense, dlse = prhs.dense_attention(q, k, v, s, return_lse=True)
        torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-13, msg=lambda m: f"{msg}\n{m}")
        torch.testing.assert_close(lse, dlse, rtol=1e-12, atol=1e-13)


def test_dense_attention_matches_softmax_formula(seed):
    q, k, v = _case(37, 2, 3, 8)
    s = 0.3
    out = prhs.dense_attention(q, k, v, s)
    for h in range(6):
        w = torch.softmax(torch.stack([(q[h] * k[t, h // 3]).sum() * s for t in range(37)]), 0)
        torch.testing.assert_close(out[h], (w[:, None] * v[:, h // 3]).sum(0), msg=lambda m: f"seed={seed}\n{m}")


def test_sparse_attention_equals_dense_on_gathered_tokens(seed):
    n, p, h_kv, group = 150, 16, 3, 2
    q, k, v = _case(n, h_kv, group, 8)
    s = 8 ** -0.5
    pages = torch.tensor([[0, 9, 3, -1], [5, -1, -1, -1], [9, 1, 2, 7]])
    num = torch.tensor([3, 1, 4])
    out = prhs.sparse_attention(q, k, v, p, pages, num, s)
    for g in range(h_kv):
        tok = torch.cat([torch.arange(pg * p, min(n, (pg + 1) * p)) for pg in sorted(pages[g, : num[g]].tolist())])
        ref = prhs.dense_attention(q[g * group: (g + 1) * group], k[tok, g: g + 1], v[tok, g: g + 1], s)
        torch.testing.assert_close(out[g * group: (g + 1) * group], ref, msg=lambda m: f"seed={seed} g={g}\n{m}")
    dropped = prhs.exact_dropped_mass(q, k, p, pages, num, s)
    assert ((dropped > 0) & (dropped < 1)).all(), f"seed={seed}"


def test_one_page_and_empty_budget_edges(seed):
    q, k, v = _case(10, 2, 2, 8)
    s = 8 ** -0.5
    kmin, kmax = prhs.page_summaries(k, 16)
    ub, lb = prhs.page_bounds(q, kmin, kmax, s)
    lens = prhs.page_lengths(10, 16)
    one = prhs.select_pages(ub, lb, lens, 0.05, 4, 0, 0)          # no forced pages, one page in all
    assert one.pages.tolist() == [[0, -1, -1, -1]] * 2 and one.num_selected.tolist() == [1, 1], f"seed={seed}"
    assert one.delta_hat.tolist() == [0.0, 0.0]
    torch.testing.assert_close(prhs.sparse_attention(q, k, v, 16, one.pages, one.num_selected, s),
                               prhs.dense_attention(q, k, v, s))

    q, k, v = _case(100, 2, 2, 8)
    kmin, kmax = prhs.page_summaries(k, 16)
    ub, lb = prhs.page_bounds(q, kmin, kmax, s)
    lens = prhs.page_lengths(100, 16)
    empty = prhs.select_pages(ub, lb, lens, 0.05, 0, 1, 2)
    assert empty.pages.shape == (2, 0) and empty.num_selected.tolist() == [0, 0], f"seed={seed}"
    assert empty.delta_hat.tolist() == [1.0, 1.0]
    out, lse = prhs.sparse_attention(q, k, v, 16, empty.pages, empty.num_selected, s, return_lse=True)
    assert (out == 0).all() and (lse == float("-inf")).all()
    assert torch.allclose(prhs.exact_dropped_mass(q, k, 16, empty.pages, empty.num_selected, s), torch.ones(4, dtype=F64))
    # a budget below the forced pages keeps the first forced ones (sinks first)
    small = prhs.select_pages(ub, lb, lens, 0.05, 2, 1, 2)
    assert small.pages.tolist() == [[0, 5]] * 2 and small.num_selected.tolist() == [2, 2]
    assert ((small.delta_hat > 0) & (small.delta_hat <= 1)).all()
    with pytest.raises(ValueError):
        prhs.select_pages(ub, lb, lens, 1.0, 3, 1, 1)


def test_reuse_with_dilation_hand_case():
    prev = torch.tensor([[3, 7, -1], [0, -1, -1], [9, 10, 5]])
    pages, num = prhs.reuse_with_dilation(prev, 1, 12, prev_n_pages=11, sink_pages=1, recent_pages=1)
    assert pages.tolist() == [[0, 2, 3, 4, 6, 7, 8, 11],
                              [0, 1, 11, -1, -1, -1, -1, -1],
                              [0, 4, 5, 6, 8, 9, 10, 11]]
    assert num.tolist() == [8, 3, 8]
    # r = 0 keeps the selection itself (plus the always-kept pages); entries past num_selected are ignored
    pages, num = prhs.reuse_with_dilation(prev, 0, 12, prev_num_selected=torch.tensor([1, 1, 2]))
    assert pages.tolist() == [[3, 11, -1], [0, 11, -1], [9, 10, 11]]


def test_reuse_keeps_certifiable_selection_over_decode_steps(seed):
    """Time axis: select at step 0, reuse with dilation while keys are appended; the certificate of
    the reused selection (prehoc_delta_hat with current bounds) still bounds the exact mass."""
    p, d, h_kv, group = 16, 16, 2, 2
    n0 = 400
    q, k, v = _case(n0 + 40, h_kv, group, d, needle=True)
    s = d ** -0.5
    sched = prhs.SelectionSchedule(reselect_interval=8, dilation=1, layers_per_group=1)
    sel_pages = sel_num = None
    n_pages_prev = None
    for step in range(40):
        n = n0 + step
        qs = q + 0.05 * step * torch.randn_like(q) / 40          # slowly drifting query
        kk = k[:n]
        kmin, kmax = prhs.page_summaries(kk, p)
        ub, lb = prhs.page_bounds(qs, kmin, kmax, s)
        lens = prhs.page_lengths(n, p)
        if sched.action(step, 0) == sched.SELECT:
            sel = prhs.select_pages(ub, lb, lens, 0.2, 12, 1, 2)
            sel_pages, sel_num = sel.pages, sel.num_selected
        else:
            sel_pages, sel_num = prhs.reuse_with_dilation(sel_pages, sched.dilation, lens.numel(),
                                                          prev_n_pages=n_pages_prev, sink_pages=1, recent_pages=2,
                                                          prev_num_selected=sel_num)
        n_pages_prev = lens.numel()
        dh = prhs.prehoc_delta_hat(ub, lb, lens, sel_pages, sel_num)
        exact = prhs.exact_dropped_mass(qs, kk, p, sel_pages, sel_num, s)
        assert (exact <= dh.repeat_interleave(group) * (1 + REL)).all(), f"seed={seed} step={step}"
        assert (sel_pages[:, 0] == 0).all() and (selection_has(sel_pages, sel_num, lens.numel() - 1)), f"seed={seed}"


def selection_has(pages, num, page):
    return bool(prhs.selection_mask(pages, num, page + 1)[:, page].all())


def test_selection_schedule():
    sch = prhs.SelectionSchedule(reselect_interval=4, dilation=2, layers_per_group=3)
    acts = {(t, l): sch.action(t, l) for t in range(8) for l in range(6)}
    assert acts[(0, 0)] == acts[(0, 3)] == acts[(4, 3)] == sch.SELECT
    assert acts[(1, 0)] == acts[(3, 3)] == sch.DILATE
    assert acts[(0, 1)] == acts[(5, 5)] == sch.SHARE
    assert sum(a == sch.SELECT for a in acts.values()) == len(acts) // (4 * 3)
    assert sch.leader(5) == 3 and sch.leader(2) == 0
    with pytest.raises(ValueError):
        prhs.SelectionSchedule(reselect_interval=0)


def test_layer_output_error_two_heads_by_hand():
    """One head with an error, one without: the layer error weighs the heads' errors by their output norms, so it
    lies between the norm-weighted mean and the max of the per-head errors."""
    F64 = torch.float64
    # keys all equal: each head's output is the mean of the values, (3, 4) for head 0 (kv head 0, norm 5) and
    # (0, 12) for head 1 (kv head 1, norm 12)
    q = torch.randn(2, 4, dtype=F64)
    k = torch.ones(3, 2, 4, dtype=F64)
    v = torch.zeros(3, 2, 2, dtype=F64)
    v[:, 0] = torch.tensor([[3.0, 4.0], [1.0, 2.0], [5.0, 6.0]], dtype=F64)
    v[:, 1] = torch.tensor([[0.0, 12.0], [0.0, 10.0], [0.0, 14.0]], dtype=F64)
    o_all = prhs.dense_attention(q, k, v, 0.5)
    torch.testing.assert_close(o_all, torch.tensor([[3.0, 4.0], [0.0, 12.0]], dtype=F64))
    o_read = o_all.clone()
    o_read[0] += torch.tensor([0.0, 2.5], dtype=F64)  # head 0 off by 2.5: error 0.5; head 1 exact
    err = prhs.output_error(q, k, v, 0.5, o_read)
    torch.testing.assert_close(err, torch.tensor([0.5, 0.0], dtype=F64))
    # sqrt(2.5^2) / sqrt(5^2 + 12^2) = 2.5 / 13
    want = 2.5 / 13
    assert float(prhs.layer_output_error(q, k, v, 0.5, o_read)) == pytest.approx(want, rel=1e-12)
    norms = torch.tensor([5.0, 12.0], dtype=F64)
    assert float(prhs.layer_error(err, norms)) == pytest.approx(want, rel=1e-12)
    weighted_mean = float((err * norms).sum() / norms.sum())            # 2.5 / 17
    assert weighted_mean < want < float(err.max())
    # batched over leading dims; the heads swapped give the same layer error, unequal norms a different one
    got = prhs.layer_error(torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=F64), torch.tensor([[5.0, 12.0]] * 2,
                                                                                        dtype=F64))
    torch.testing.assert_close(got, torch.tensor([2.5 / 13, 6.0 / 13], dtype=F64))


# --------------------------------------------------------------------------- estimate mode
def test_key_codes_round_to_the_nearest_level(seed):
    """Codes are the nearest of 16 levels spanning each page's [kmin, kmax]: the dequantised key is within half a
    step of the key, a channel constant over its page comes back exactly, and the page's extremes are levels."""
    torch.manual_seed(seed)
    for n, p in ((100, 16), (64, 32), (33, 16)):
        k = torch.randn(n, 2, 8, dtype=F64)
        k[:, 1, 3] = 0.7                                                    # constant channel
        kmin, kmax = prhs.page_summaries(k, p)
        codes = prhs.quantise_page_keys(k, kmin, kmax, p)
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
        back = prhs.dequantise_page_keys(codes, kmin, kmax, p).double()
        step = ((kmax - kmin) / 15).repeat_interleave(p, dim=0)[:n]
        assert bool(((back - k).abs() <= step / 2 + 1e-6).all()), f"seed={seed} n={n}: beyond half a step"
        assert bool((back[:, 1, 3] == torch.tensor(0.7).float().double()).all()), f"seed={seed}: constant channel"
        first = k[:p].argmin(dim=0)                                         # page 0's minimum per channel
        assert bool((codes[:p].gather(0, first[None]) == 0).all()), f"seed={seed}: the page minimum is not code 0"


def test_estimated_selection_with_exact_keys_keeps_delta(seed):
    """With exact keys in place of the codes the estimate is each head's real page mass, so the selection's real
    dropped mass (against dense attention) is at most its reported U <= delta for every query head, unless the
    budget ran out; delta 0 fills the budget, in descending group score after the forced pages."""
    torch.manual_seed(seed)
    for n, p, h_kv, group, delta in ((700, 16, 2, 3, 0.1), (1000, 32, 1, 4, 0.05), (520, 16, 2, 2, 0.3)):
        q, k, v = _case(n, h_kv, group, 16, needle=True, scale_range=(0.3, 1.0))
        lens = prhs.page_lengths(n, p)
        npg = lens.numel()
        est = prhs.estimated_page_log_mass(q, k, k, p, 0.25)
        sel = prhs.select_pages_estimated(est, lens, h_kv, delta, npg, 1, 2)
        true = prhs.exact_dropped_mass(q, k, p, sel.pages, sel.num_selected, 0.25).reshape(h_kv, group)
        for g in range(h_kv):
            # (the estimate is computed in float32: 1e-5 relative slack)
            assert float(true[g].max()) <= float(sel.delta_hat[g]) * (1 + 1e-5) + REL, \
                f"seed={seed} n={n} g={g}: U below truth"
            assert float(sel.delta_hat[g]) <= delta + REL, f"seed={seed} n={n} g={g}: stopped above delta"
            assert int(sel.num_selected[g]) < npg or delta == 0, f"seed={seed} n={n}: delta never bound"
        full = prhs.select_pages_estimated(est, lens, h_kv, 0.0, npg // 2, 1, 2)
        assert bool((full.num_selected == npg // 2).all()), f"seed={seed} n={n}: delta 0 must fill the budget"
        m = torch.exp(est - torch.logsumexp(est, dim=1, keepdim=True)).reshape(h_kv, group, npg).amax(dim=1)
        for g in range(h_kv):
            app = m[g, full.pages[g, 3: int(full.num_selected[g])]]
            assert bool((app[1:] <= app[:-1]).all()), f"seed={seed} n={n}: not in descending score"
