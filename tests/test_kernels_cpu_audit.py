"""The dropped-mass audit (``flashinfer_ext.audit``) under Triton's interpreter, against the float64 reference
``sglang_sparse.prhs.dropped_mass`` fed with the reference normaliser of what the decode read.

Run in its own process with ``TRITON_INTERPRET=1`` (ci/run_tests.sh does)."""

import math

import pytest

from kernel_cases import art_p, fresh_seed, interpreter_device, make_pool, reference_summaries, sel

DEVICE = interpreter_device("tests/test_kernels_cpu_audit.py")   # before flashinfer_ext's kernels are defined

pytestmark = pytest.mark.usefixtures("triton_interpreter_bf16_dot", "interpreter_bounds_check")

H_Q, H_KV, D = 8, 2, 64


def _reference_dropped(pool, w, b, read_pages_of_head):
    """float64 dropped mass of request b: mass outside the pages each query head's group read."""
    import torch

    from sglang_sparse import prhs

    q, k, v = pool.logical(b)
    sm = 1 / math.sqrt(D)
    lse = torch.empty(H_Q, dtype=torch.float64)
    for hq in range(H_Q):
        pages = read_pages_of_head(hq)
        g = hq // (H_Q // H_KV)
        sel_pages = torch.full((H_KV, len(pages)), -1, dtype=torch.long)
        sel_pages[g] = torch.tensor(pages, dtype=torch.long)
        num = torch.zeros(H_KV, dtype=torch.long)
        num[g] = len(pages)
        _, lse_h = prhs.sparse_attention(q, k, v, pool.page_size, sel_pages, num, sm, return_lse=True)
        lse[hq] = lse_h[hq]
    return prhs.dropped_mass(q, k, sm, lse)


def _poison_page_tails(pool, lens, P):
    """Slots past a request's last token on its last page get keys aligned with its queries: a kernel that
    scored them would see them dominate the normaliser."""
    import torch

    group = H_Q // H_KV
    for b, n in enumerate(lens):
        last = int(pool.slots[b][-1])
        tail = torch.arange(last + 1, (last // P + 1) * P)
        for g in range(H_KV):
            u = pool.q[b, g * group:(g + 1) * group].float().sum(0)
            pool.kc[tail, g] = (4.0 * math.sqrt(D) * u / u.norm()).to(pool.kc.dtype)


@pytest.mark.parametrize("page_size", [16, 32])
def test_audit_measures_what_prhs_and_art_dropped(page_size):
    """PrHS 1/4 (with and without ART stopping early) on peaked keys with bounds far below zero: for the audited
    requests the kernel's dropped mass equals the reference computed from the pages the decode actually read
    (the selected list, cut at ART's stop); requests not audited this step stay NaN; a dense plan drops
    nothing."""
    import torch

    from flashinfer_ext.audit import DroppedMassAudit
    from flashinfer_ext.decode import SparseDecodeWrapper

    seed = fresh_seed()
    P = page_size
    lens = [700, 1300, 333]
    pool = make_pool(lens, P, H_Q, H_KV, D, D, DEVICE, torch.Generator().manual_seed(seed), structured=True,
                     negative=True)
    _poison_page_tails(pool, lens, P)
    kmin, kmax = reference_summaries(pool)
    max_len = max(lens) + P
    w = SparseDecodeWrapper(H_Q, H_KV, D, P, max_batch_size=4, max_seq_len=max_len, device=DEVICE)
    audit = DroppedMassAudit(H_Q, H_KV, D, P, max_batch_size=4, max_seq_len=max_len, device=DEVICE, num_sms=2)
    plans = [("prhs", dict(pages=sel(1 / 4, 0.0))),
             ("prhs+art", dict(pages=sel(1 / 2, 0.0), art=art_p(0.05, 1e-3, patience=1, min_blocks=1))),
             ("dense", dict())]
    for name, cfg in plans:
        tag = f"seed={seed} P={P} {name}"
        w.plan(pool.req_to_token, pool.rows, pool.seq_lens, **cfg)
        w.run(pool.q, pool.kc, pool.vc, kmin, kmax)
        audit.plan(len(lens), False)
        audit.run(w, pool.q, pool.kc)                     # no request audited this step: nothing is scored
        assert bool(torch.isnan(audit.dropped).all()), f"{tag}: requests not audited were scored"
        audit.plan(len(lens), torch.tensor([True, False, True]))
        dropped = audit.run(w, pool.q, pool.kc).clone()
        assert bool(torch.isnan(dropped[1]).all()), f"{tag}: request 1 was not audited but got {dropped[1]}"
        for b in (0, 2):
            if cfg.get("pages") is None:
                npg = -(-lens[b] // P)
                ref = _reference_dropped(pool, w, b, lambda hq: list(range(npg)))
            else:
                lst = w.pages[b].tolist()
                read = w.blocks_read[b].tolist()          # pages in the output per query head (ART: cut at its stop)
                ref = _reference_dropped(pool, w, b, lambda hq: lst[hq // (H_Q // H_KV)][: read[hq]])
            err = (dropped[b].double() - ref).abs().max().item()
            assert err <= 2e-2, f"{tag} b={b}: dropped {dropped[b].tolist()} vs reference {ref.tolist()}"
        if name == "dense":
            assert float(dropped[[0, 2]].max()) <= 1e-2, f"{tag}: a dense read dropped {dropped.tolist()}"
    # keys without needles spread the mass over every page: 1/4 of the pages must leave most of it out
    flat = make_pool(lens, P, H_Q, H_KV, D, D, DEVICE, torch.Generator().manual_seed(seed + 1))
    _poison_page_tails(flat, lens, P)
    kmin, kmax = reference_summaries(flat)
    w.plan(flat.req_to_token, flat.rows, flat.seq_lens, pages=sel(1 / 4, 0.0))
    w.run(flat.q, flat.kc, flat.vc, kmin, kmax)
    audit.plan(len(lens), True)
    dropped = audit.run(w, flat.q, flat.kc).clone()
    for b in range(len(lens)):
        lst = w.pages[b].tolist()
        group = H_Q // H_KV
        ref = _reference_dropped(flat, w, b, lambda hq: lst[hq // group][: int(w.num_selected[b, hq // group])])
        err = (dropped[b].double() - ref).abs().max().item()
        assert err <= 2e-2, f"seed={seed} P={P} flat b={b}: dropped {dropped[b].tolist()} vs {ref.tolist()}"
        assert float(dropped[b].min()) > 0.3, f"seed={seed} P={P} flat b={b}: dropped {dropped[b].tolist()}"


def _same_values_pool(lens, P, seed):
    """Random keys (flat attention: the mass spreads over every page) and one value vector per (request, KV head)
    at every token: the attention output is that vector whichever pages are read."""
    import torch

    base = make_pool(lens, P, H_Q, H_KV, D, D, DEVICE, torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 7)
    for b, s in enumerate(base.slots):
        base.vc[s] = torch.randn(1, H_KV, D, generator=gen).to(base.vc.dtype)
    return base


@pytest.mark.parametrize("page_size", [16, 32])
def test_output_error_audit_equals_reference(page_size):
    """measure="output-error": for the audited requests the relative output error equals the float64 reference
    ``prhs.output_error`` against the wrapper's own output, and the dropped mass is still measured; PrHS 1/4 on
    flat attention (random keys and values) leaves a large error, a dense read none, and flat attention over
    identical values none although most of the mass is dropped. Requests not audited stay NaN. Several splits per
    request (a forgotten split or rescale moves o_all off the reference and the dense error off 0)."""
    import torch

    from flashinfer_ext.audit import DroppedMassAudit
    from flashinfer_ext.decode import SparseDecodeWrapper
    from sglang_sparse import prhs

    seed = fresh_seed()
    P = page_size
    lens = [700, 1300, 333]
    max_len = max(lens) + P
    sm = 1 / math.sqrt(D)
    group = H_Q // H_KV
    w = SparseDecodeWrapper(H_Q, H_KV, D, P, max_batch_size=4, max_seq_len=max_len, device=DEVICE)
    audit = DroppedMassAudit(H_Q, H_KV, D, P, max_batch_size=4, max_seq_len=max_len, device=DEVICE, num_sms=8,
                             measure="output-error")
    pools = [("flat", make_pool(lens, P, H_Q, H_KV, D, D, DEVICE, torch.Generator().manual_seed(seed))),
             ("needles", make_pool(lens, P, H_Q, H_KV, D, D, DEVICE, torch.Generator().manual_seed(seed + 1),
                                   structured=True, negative=True)),
             ("same values", _same_values_pool(lens, P, seed + 2))]
    for pname, pool in pools:
        _poison_page_tails(pool, lens, P)
        kmin, kmax = reference_summaries(pool)
        for name, cfg in (("prhs", dict(pages=sel(1 / 4, 0.0))), ("dense", dict())):
            tag = f"seed={seed} P={P} {pname} {name}"
            w.plan(pool.req_to_token, pool.rows, pool.seq_lens, **cfg)
            out = w.run(pool.q, pool.kc, pool.vc, kmin, kmax)
            audit.plan(len(lens), torch.tensor([True, False, True]))
            assert audit.num_splits >= 3, (tag, audit.num_splits)
            audit.mid_o_buf.fill_(float("nan"))
            audit.run(w, pool.q, pool.kc, pool.vc, out)
            err, dropped = audit.out_err.clone(), audit.dropped.clone()
            norm, layer = audit.o_norm.clone(), audit.layer_err.clone()
            assert bool(torch.isnan(err[1]).all()) and bool(torch.isnan(dropped[1]).all()), \
                f"{tag}: request 1 was not audited but got {err[1].tolist()} {dropped[1].tolist()}"
            assert bool(torch.isnan(norm[1]).all()) and bool(torch.isnan(layer[1])), f"{tag}: {norm[1].tolist()}"
            for b in (0, 2):
                q, k, v = pool.logical(b)
                ref = prhs.output_error(q, k, v, sm, out[b].double())
                assert bool(torch.isfinite(err[b]).all()), f"{tag} b={b}: {err[b].tolist()}"
                gap = ((err[b].double() - ref).abs() - 1e-2 * ref).max().item()
                assert gap <= 1e-2, f"{tag} b={b}: err {err[b].tolist()} vs reference {ref.tolist()}"
                # ||o_all|| per head, and the whole layer's relative error
                ref_n = prhs.dense_attention(q, k, v, sm).norm(dim=-1)
                torch.testing.assert_close(norm[b].double(), ref_n, atol=1e-3, rtol=1e-2, msg=f"{tag} b={b}")
                ref_l = float(prhs.layer_output_error(q, k, v, sm, out[b].double()))
                assert abs(float(layer[b]) - ref_l) <= 1e-2 * ref_l + 1e-2, f"{tag} b={b}: {float(layer[b])} {ref_l}"
                assert float(layer[b]) <= float(err[b].max()) + 1e-6, f"{tag} b={b}: {float(layer[b])}"
                if name == "prhs":
                    lst, num = w.pages[b].tolist(), w.num_selected[b].tolist()
                    ref_d = _reference_dropped(pool, w, b, lambda hq: lst[hq // group][: num[hq // group]])
                else:
                    ref_d = _reference_dropped(pool, w, b, lambda hq: list(range(-(-lens[b] // P))))
                gap_d = (dropped[b].double() - ref_d).abs().max().item()
                assert gap_d <= 2e-2, f"{tag} b={b}: dropped {dropped[b].tolist()} vs reference {ref_d.tolist()}"
                if name == "dense" or pname == "same values":
                    assert float(err[b].max()) <= 1e-2, f"{tag} b={b}: output error {err[b].tolist()}"
                elif pname == "flat":
                    assert float(err[b].min()) > 0.3, f"{tag} b={b}: output error {err[b].tolist()}"
                if name == "prhs" and pname != "needles":
                    assert float(dropped[b].min()) > 0.3, f"{tag} b={b}: dropped {dropped[b].tolist()}"
    # not audited this step: nothing is scored
    audit.plan(len(lens), False)
    audit.run(w, pool.q, pool.kc, pool.vc, out)
    assert bool(torch.isnan(audit.out_err).all()) and bool(torch.isnan(audit.dropped).all()), f"seed={seed}"
    assert bool(torch.isnan(audit.o_norm).all()) and bool(torch.isnan(audit.layer_err).all()), f"seed={seed}"
    with pytest.raises(ValueError):
        audit.run(w, pool.q, pool.kc)
