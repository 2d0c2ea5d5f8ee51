"""ART reference math: exactness with thresholds 0, the stopping rule against a prefix-by-prefix
recomputation, the certified error bound on many random and structured cases, orders and padding.

Fresh random seed every run; it is printed in every assertion message (``seed=...``) for reproduction.
"""


import pytest
import torch

from sglang_sparse import art, prhs

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _case(n, h_kv, group, d=16, dv=8, q_scale=1.0, needle=False):
    q = torch.randn(h_kv * group, d, dtype=F64) * q_scale
    k = torch.randn(n, h_kv, d, dtype=F64)
    v = torch.randn(n, h_kv, dv, dtype=F64)
    if needle:
        for g in range(h_kv):
            pos = int(torch.randint(0, n, (1,)))
            k[pos, g] = q[g * group: (g + 1) * group].mean(0) * 3
            v[pos, g] *= 5          # a high-norm value on the needle
    return q, k, v


def _tokens(blocks, bs, n):
    if not blocks:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(b * bs, min(n, (b + 1) * bs)) for b in blocks])


def _listed_dense(q, k, v, bs, order, s):
    """Dense attention of each KV group over the tokens of its listed blocks: [H_q, Dv]."""
    h_q, h_kv = q.shape[0], k.shape[1]
    g_size = h_q // h_kv
    out = torch.zeros(h_q, v.shape[2], dtype=q.dtype)
    for g in range(h_kv):
        listed = [b for b in order[g].tolist() if b >= 0] if order is not None else list(range(-(-k.shape[0] // bs)))
        tok = _tokens(listed, bs, k.shape[0])
        if tok.numel():
            out[g * g_size: (g + 1) * g_size] = prhs.dense_attention(q[g * g_size: (g + 1) * g_size], k[tok, g: g + 1],
                                                                     v[tok, g: g + 1], s)
    return out


@pytest.mark.parametrize("group", [1, 2, 4])
def test_thresholds_zero_read_everything_and_equal_dense(seed, group):
    for n, bs in ((1, 16), (16, 16), (17, 16), (301, 32), (500, 64)):
        q, k, v = _case(n, 2, group, needle=n > 100)
        s = 16 ** -0.5
        n_blocks = -(-n // bs)
        dense = prhs.dense_attention(q, k, v, s)
        for order in (None, torch.randperm(n_blocks), torch.stack([torch.randperm(n_blocks) for _ in range(2)])):
            r = art.art_attention(q, k, v, bs, s, order, tau_mag=0.0, tau_dir=0.0, patience=1, min_blocks=1)
            msg = f"seed={seed} n={n} bs={bs} G={group}"
            assert (r.blocks_read == n_blocks).all() and (r.stop_reason == art.STOP_NONE).all(), msg
            torch.testing.assert_close(r.out, dense, rtol=1e-12, atol=1e-13, msg=lambda m: f"{msg}\n{m}")
            torch.testing.assert_close(r.lse, prhs.dense_attention(q, k, v, s, return_lse=True)[1])
            assert (r.delta_hat == 0).all() and (r.error_bound == 0).all(), msg


def _expected_stop(q, k, v, bs, listed, s, tau_mag, tau_dir, patience, min_blocks, eps, ub):
    """Prefix-by-prefix restatement of the rule for one KV group: (blocks_read, reason, out)."""
    n = k.shape[0]
    prev = None
    streak = 0
    out = None
    for j in range(1, len(listed) + 1):
        tok = _tokens(listed[:j], bs, n)
        o, lse = prhs.dense_attention(q, k[tok], v[tok], s, return_lse=True)
        if prev is not None:
            dmag = (o - prev).norm(dim=-1) / o.norm(dim=-1)
            cos = (o * prev).sum(-1) / (o.norm(dim=-1) * prev.norm(dim=-1))
            streak = streak + 1 if bool(((dmag < tau_mag) & (1 - cos < tau_dir)).all()) else 0
        prev = o
        out = o
        if j >= min_blocks and j < len(listed):
            rest = listed[j:]
            lens = prhs.page_lengths(n, bs)
            u = sum(float(lens[b]) * torch.exp(ub[b]) for b in rest)
            dh = u / (torch.exp(lse) + u)
            if eps is not None and bool((dh <= eps).all()):
                return j, art.STOP_CERTIFIED, out
            if streak >= patience:
                return j, art.STOP_CONVERGED, out
    return len(listed), art.STOP_NONE, out


def test_stopping_rule_matches_prefix_recomputation(seed):
    hits = {art.STOP_NONE: 0, art.STOP_CONVERGED: 0, art.STOP_CERTIFIED: 0}
    for it in range(30):
        group = (1, 2, 4)[it % 3]
        n, bs, h_kv = int(torch.randint(40, 400, (1,))), 16, 2
        q, k, v = _case(n, h_kv, group, q_scale=float(10 ** (torch.rand(()) - 0.5)), needle=it % 2 == 0)
        s = 16 ** -0.5
        n_blocks = -(-n // bs)
        ub = art.block_upper_bounds(q, k, bs, s)
        order = torch.sort(ub, dim=1, descending=True, stable=True).indices if it % 3 else None
        tau_mag, tau_dir = float(torch.rand(()) * 0.1), float(torch.rand(()) * 1e-2)
        patience, min_blocks = int(torch.randint(1, 4, (1,))), int(torch.randint(1, 5, (1,)))
        eps = (None, 0.3, 0.05)[it % 3]
        r = art.art_attention(q, k, v, bs, s, order, tau_mag=tau_mag, tau_dir=tau_dir, patience=patience,
                              eps_cert=eps, min_blocks=min_blocks)
        for g in range(h_kv):
            heads = slice(g * group, (g + 1) * group)
            listed = order[g].tolist() if order is not None else list(range(n_blocks))
            j, reason, out = _expected_stop(q[heads], k[:, g: g + 1], v[:, g: g + 1], bs, listed, s, tau_mag, tau_dir, patience,
                                            min_blocks, eps, ub[g])
            msg = (f"seed={seed} it={it} g={g} tau=({tau_mag},{tau_dir}) patience={patience} "
                   f"min_blocks={min_blocks} eps={eps}")
            assert r.blocks_read[heads].tolist() == [j] * group, msg
            assert r.stop_reason[heads].tolist() == [reason] * group, msg
            torch.testing.assert_close(r.out[heads], out, rtol=1e-11, atol=1e-12, msg=lambda m: f"{msg}\n{m}")
            hits[reason] += 1
    assert hits[art.STOP_CONVERGED] > 0 and hits[art.STOP_NONE] + hits[art.STOP_CERTIFIED] > 0, f"seed={seed} {hits}"


def test_certified_error_never_exceeds_bound(seed):
    cases = certified = 0
    for it in range(150):
        group = (1, 2, 4)[it % 3]
        h_kv = 4
        n = int(torch.randint(1, 600, (1,)))
        bs = (16, 32, 64)[it % 3]
        q, k, v = _case(n, h_kv, group, d=8, q_scale=float(10 ** (torch.rand(()) * 2 - 1)), needle=it % 2 == 1)
        s = 8 ** -0.5
        n_blocks = -(-n // bs)
        ub = art.block_upper_bounds(q, k, bs, s)
        if it % 4 == 0:
            order = None
        elif it % 4 == 1:
            order = torch.stack([torch.randperm(n_blocks) for _ in range(h_kv)])
        else:
            order = torch.sort(ub, dim=1, descending=True, stable=True).indices
            if it % 4 == 3 and n_blocks > 2:      # a sparse policy dropped some blocks: -1 padding
                keep = int(torch.randint(1, n_blocks, (1,)))
                order[:, keep:] = -1
        eps = float((0.5, 0.2, 0.05, 0.01)[it % 4])
        r = art.art_attention(q, k, v, bs, s, order, eps_cert=eps, tau_mag=0.0, tau_dir=0.0, patience=1,
                              min_blocks=1)
        exact = _listed_dense(q, k, v, bs, order, s)
        err = (r.out - exact).norm(dim=-1)
        msg = f"seed={seed} it={it} n={n} bs={bs} G={group} eps={eps}"
        assert (err <= r.error_bound * (1 + 1e-9) + 1e-12).all(), f"{msg}: {err} > {r.error_bound}"
        # the true unread mass never exceeds delta_hat
        for g in range(h_kv):
            listed = [b for b in (order[g].tolist() if order is not None else range(n_blocks)) if b >= 0]
            read = listed[: int(r.blocks_read[g * group])]
            tok_all, tok_read = _tokens(listed, bs, n), _tokens(read, bs, n)
            heads = slice(g * group, (g + 1) * group)
            logits = q[heads] @ k[tok_all, g].T * s
            mass_read = torch.exp(torch.logsumexp(q[heads] @ k[tok_read, g].T * s, 1) - torch.logsumexp(logits, 1))
            assert ((1 - mass_read) <= r.delta_hat[heads] * (1 + 1e-9) + 1e-12).all(), msg
        cert = r.stop_reason == art.STOP_CERTIFIED
        vmax = v.norm(dim=-1).amax(0).repeat_interleave(group)
        assert (r.delta_hat[cert] <= eps).all() and (err[cert] <= 2 * eps * vmax[cert] * (1 + 1e-9)).all(), msg
        cases += q.shape[0]
        certified += int(cert.sum())
    assert certified > 0, f"seed={seed}: certified mode never stopped early"
    assert cases > 500


def test_convergence_stops_on_a_peaked_head_and_not_on_a_flat_one(seed):
    """Needle at the front of the order: the output stops moving, ART stops early; with a flat
    attention and random values it keeps moving and reads more."""
    n, bs, d = 1024, 32, 16
    q = torch.randn(1, d, dtype=F64)
    k = torch.randn(n, 1, d, dtype=F64) * 0.1
    v = torch.randn(n, 1, 8, dtype=F64)
    k[100, 0] = q[0] / q[0].norm() * 40
    order = torch.tensor([100 // bs] + [b for b in range(n // bs) if b != 100 // bs])
    s = d ** -0.5
    peaked = art.art_attention(q, k, v, bs, s, order, tau_mag=1e-3, tau_dir=1e-4, patience=2, min_blocks=1)
    assert int(peaked.stop_reason[0]) == art.STOP_CONVERGED and int(peaked.blocks_read[0]) == 3, f"seed={seed}"
    dense = prhs.dense_attention(q, k, v, s)
    assert float((peaked.out - dense).norm()) < 1e-3 * float(dense.norm()), f"seed={seed}"
    flat = art.art_attention(q * 0, k, v, bs, s, order, tau_mag=1e-3, tau_dir=1e-4, patience=2, min_blocks=1)
    assert int(flat.blocks_read[0]) > 3 * int(peaked.blocks_read[0]), f"seed={seed}"
    # min_blocks holds the peaked head back
    held = art.art_attention(q, k, v, bs, s, order, tau_mag=1e-3, tau_dir=1e-4, patience=2, min_blocks=10)
    assert int(held.blocks_read[0]) == 10 and int(held.stop_reason[0]) == art.STOP_CONVERGED, f"seed={seed}"


def test_group_stops_only_when_every_head_agrees(seed):
    n, bs, d = 512, 32, 16
    k = torch.randn(n, 1, d, dtype=F64) * 0.1
    v = torch.randn(n, 1, 8, dtype=F64)
    q_peaked = torch.randn(d, dtype=F64)
    k[5, 0] = q_peaked / q_peaked.norm() * 40
    q = torch.stack([q_peaked, torch.zeros(d, dtype=F64) + 1e-3])          # head 1 is flat
    s = d ** -0.5
    alone = art.art_attention(q[:1], k, v, bs, s, tau_mag=1e-3, tau_dir=1e-4, patience=2, min_blocks=1)
    both = art.art_attention(q, k, v, bs, s, tau_mag=1e-3, tau_dir=1e-4, patience=2, min_blocks=1)
    assert int(alone.blocks_read[0]) < int(both.blocks_read[0]), f"seed={seed}"
    assert both.blocks_read[0] == both.blocks_read[1] and both.stop_reason[0] == both.stop_reason[1]


def test_padding_and_empty_rows(seed):
    n, bs = 200, 16
    q, k, v = _case(n, 2, 2)
    s = 0.25
    order = torch.tensor([[3, 5, 0, -1, -1], [-1, -1, -1, -1, -1]])
    r = art.art_attention(q, k, v, bs, s, order, tau_mag=0.0, tau_dir=0.0, patience=1, min_blocks=1)
    assert r.blocks_read.tolist() == [3, 3, 0, 0] and r.stop_reason.tolist() == [0, 0, 0, 0], f"seed={seed}"
    tok = _tokens([0, 3, 5], bs, n)
    torch.testing.assert_close(r.out[:2], prhs.dense_attention(q[:2], k[tok, :1], v[tok, :1], s))
    assert (r.out[2:] == 0).all() and (r.lse[2:] == float("-inf")).all()
    with pytest.raises(ValueError):
        art.art_attention(q, k, v, bs, s, torch.tensor([0, 99]), tau_mag=0.0, tau_dir=0.0, patience=1,
                          min_blocks=1)
    with pytest.raises(ValueError):
        art.art_attention(q, k, v, bs, s, tau_mag=0.0, tau_dir=0.0, patience=0, min_blocks=1)
