"""Test cases shared by tests/test_kernels_cpu.py (Triton interpreter, tiny sizes) and
tests/test_kernels_gpu.py (CUDA, Llama-3.1-8B shapes): flashinfer_ext's kernels against the
reference math of sglang_sparse (claa, prhs, art), computed in float64 on the same bf16 inputs.

Every case draws a fresh seed (printed in the assertion messages) and poisons every output buffer
(NaN / sentinel) before the kernels run, so elements a kernel forgets to write fail the checks.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import List, Optional

import torch

from flashinfer_ext.params import ArtParams, LaunchTuning, PageSelectParams
from sglang_sparse import art, claa, prhs

SENTINEL = -777


def sel(budget: float, delta: float, sink: int = 1, recent: int = 2, dilation: int = 0,
        dense_below: int = 0, estimate: bool = False) -> PageSelectParams:
    """PrHS page selection of a test plan (every request selects unless its context is shorter than
    ``dense_below`` tokens; ``estimate``: by the pages' masses estimated from key codes)."""
    return PageSelectParams(budget=budget, delta=delta, sink_pages=sink, recent_pages=recent,
                            dense_below_len=dense_below, dilation=dilation, estimate=estimate)


def every_page() -> PageSelectParams:
    """Every page in descending-bound order (dense + ART in bound order)."""
    return sel(1.0, 0.0).every_page()


def art_p(tau_mag: float, tau_dir: float, patience: int, min_blocks: int, eps_cert=None) -> ArtParams:
    return ArtParams(tau_mag=tau_mag, tau_dir=tau_dir, patience=patience, eps_cert=eps_cert, min_blocks=min_blocks)


def tune(**kw) -> LaunchTuning:
    return LaunchTuning(**kw)


def interpreter_device(test_file: str) -> str:
    """Device for a kernel test file: on a host without CUDA, select Triton's interpreter (it must be set
    before the kernels are defined) and return "cpu"; otherwise "cuda". Kernels defined earlier in this
    process without the interpreter cannot run on CPU tensors: the module is then skipped with a message
    (ci/run_tests.sh runs these files in their own process under TRITON_INTERPRET=1)."""
    import sys

    import pytest

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "cuda"
    stale = any(type(obj).__name__ == "JITFunction"
                for name, mod in list(sys.modules.items()) if name.startswith("flashinfer_ext.kernels.")
                for obj in vars(mod).values())
    if stale:
        pytest.skip(f"flashinfer_ext kernels were imported before TRITON_INTERPRET=1 was set; run "
                    f"`TRITON_INTERPRET=1 pytest {test_file}` in its own process (ci/run_tests.sh does)",
                    allow_module_level=True)
    return "cpu"


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double()
    b = b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- KV pool
@dataclass
class Pool:
    kc: torch.Tensor            # [num_slots, H_kv, D]
    vc: torch.Tensor            # [num_slots, H_kv, Dv]
    req_to_token: torch.Tensor  # [max_reqs + 1, max_ctx] int32
    rows: torch.Tensor          # [bs] req_pool_indices
    seq_lens: torch.Tensor      # [bs]
    slots: List[torch.Tensor]   # per request, [n] int64 slots in logical order
    q: torch.Tensor             # [bs, H_q, D]
    num_pages: int              # physical pages in the pool
    page_size: int

    def logical(self, b: int):
        """(q [H_q, D], k [n, H_kv, D], v [n, H_kv, Dv]) of request b in float64."""
        s = self.slots[b]
        return self.q[b].double(), self.kc[s].double(), self.vc[s].double()


def make_pool(lens, page_size, h_q, h_kv, d, dv, device, gen: torch.Generator, structured: bool = False,
              max_ctx: Optional[int] = None, spare_pages: int = 3, needles_per_req: int = 3,
              dtype=torch.bfloat16, negative: bool = False) -> Pool:
    """A paged KV pool holding ``len(lens)`` random requests in randomly permuted physical pages.

    ``structured``: a few "needle" pages per request whose keys align with the request's queries
    (high logits) over small random keys elsewhere: peaked attention, where PrHS's certificate
    becomes small and ART can stop early. Otherwise keys and values are plain N(0, 1).
    ``negative`` (with ``structured``): the keys outside the needles point away from the queries, so
    most pages have strongly negative logits and upper bounds (below -2, as real models give), not the
    positive bounds of random keys.
    """
    P = page_size
    group = h_q // h_kv
    qs, ks, vs = [], [], []
    for n in lens:
        q = torch.randn(h_q, d, generator=gen)
        k = torch.randn(n, h_kv, d, generator=gen)
        v = torch.randn(n, h_kv, dv, generator=gen)
        if structured:
            npg = -(-n // P)
            k *= 0.3
            if negative:
                for g in range(h_kv):
                    u = q[g * group:(g + 1) * group].sum(0)
                    k[:, g] -= 2.0 * math.sqrt(d) * u / u.norm()
            cand = list(range(1, npg - 2)) if npg > 4 else []
            rnd = random.Random(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            for lp in rnd.sample(cand, min(needles_per_req, len(cand))):
                lo, hi = lp * P, min((lp + 1) * P, n)
                for g in range(h_kv):
                    u = q[g * group:(g + 1) * group].sum(0)
                    u = u / u.norm()
                    scale = rnd.uniform(2.0, 3.0) * math.sqrt(d)
                    k[lo:hi, g] = scale * u[None, :] / math.sqrt(group) + 0.3 * torch.randn(hi - lo, d, generator=gen)
        qs.append(q)
        ks.append(k)
        vs.append(v)
    return pool_from_kv(qs, ks, vs, P, device, gen, spare_pages=spare_pages, dtype=dtype, max_ctx=max_ctx)


def pool_from_kv(qs, ks, vs, page_size, device, gen: torch.Generator, spare_pages: int = 3,
                 dtype=torch.bfloat16, max_ctx: Optional[int] = None) -> Pool:
    """A paged pool holding given requests (random ones from ``make_pool``, or e.g. one model's layers at one
    decode step, a request per layer): ``qs[b] [H_q, D]``, ``ks[b] [n_b, H_kv, D]``, ``vs[b] [n_b, H_kv, Dv]``,
    stored in randomly permuted physical pages (page 0 reserved, like SGLang's dummy page; unused slots hold
    random values) under random ``req_to_token`` rows ``max_ctx`` wide (default the longest request)."""
    P = page_size
    lens = [int(k.shape[0]) for k in ks]
    bs = len(lens)
    npgs = [-(-n // P) for n in lens]
    num_pages = sum(npgs) + spare_pages + 1
    h_kv, d, dv = ks[0].shape[1], ks[0].shape[2], vs[0].shape[2]
    perm = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    rows = torch.randperm(2 * bs + 2, generator=gen)[:bs] + 1
    r2t = torch.zeros(2 * bs + 3, max_ctx or max(lens), dtype=torch.int32)
    kc = torch.randn(num_pages * P, h_kv, d, generator=gen)
    vc = torch.randn(num_pages * P, h_kv, dv, generator=gen)
    slots, used = [], 0
    for b, n in enumerate(lens):
        pages = torch.tensor(perm[used: used + npgs[b]], dtype=torch.long)
        used += npgs[b]
        sl = (pages[:, None] * P + torch.arange(P)[None, :]).flatten()[:n]
        r2t[rows[b], :n] = sl.to(torch.int32)
        kc[sl] = ks[b].float().cpu()
        vc[sl] = vs[b].float().cpu()
        slots.append(sl)
    q = torch.stack([x.float().cpu() for x in qs])
    return Pool(kc.to(device=device, dtype=dtype), vc.to(device=device, dtype=dtype), r2t.to(device),
                rows.to(device), torch.tensor(lens, dtype=torch.int64, device=device),
                [x.to(device) for x in slots], q.to(device=device, dtype=dtype), num_pages, P)


def far_bounds_pool(lens, page_size, h_q, h_kv, d, device, gen: torch.Generator, top: float = 45.0,
                    low: float = -70.0, wide_pages: int = 1, dtype=torch.bfloat16) -> Pool:
    """Requests whose page bounds span more than fp32's exponent range, so that a sum of ``exp(bound)`` shifted
    by the largest bound of all pages underflows to 0 for the pages far below it.

    Each group's query heads point along one unit vector ``u`` (``q = sqrt(d) u`` + a little noise, so a logit
    is about ``c`` for a key ``c u``). Most pages ("low") hold keys ``low * u`` + noise: every logit and bound
    near ``low``. ``wide_pages`` pages in the middle of each request are "wide": each token aligns with ``u``
    on half of the dimensions (coefficient ``top``) and points against it on the other half (``anti =
    -(2 |low| + top)``), the halves alternating between tokens; ``u`` has equal norm on both halves, so every
    logit of such a page is ``(top + anti) / 2 = low`` like the others, while its per-dimension box bound is
    ``ub = top`` (and ``lb = anti``). Reading the wide page certifies nothing: the low pages after it, ``top -
    low`` nats below its bound, still hold nearly all the mass, and a certificate must count them."""
    P = page_size
    group = h_q // h_kv
    anti = -(2 * abs(low) + top)
    qs, ks, vs = [], [], []
    for n in lens:
        npg = -(-n // P)
        q = torch.empty(h_q, d)
        k = torch.empty(n, h_kv, d)
        half = torch.arange(d) < d // 2
        wide = list(range(npg // 3, npg // 3 + wide_pages))
        for g in range(h_kv):
            u = torch.randn(d, generator=gen)
            u[half] = u[half] / u[half].norm()
            u[~half] = u[~half] / u[~half].norm()
            u = u / math.sqrt(2.0)
            q[g * group:(g + 1) * group] = math.sqrt(d) * u[None, :] + 0.05 * torch.randn(group, d, generator=gen)
            k[:, g] = low * u[None, :] + 0.1 * torch.randn(n, d, generator=gen)
            for lp in wide:
                for t in range(lp * P, min((lp + 1) * P, n)):
                    first = (t % 2 == 0)
                    coef = torch.where(half if first else ~half, torch.tensor(top), torch.tensor(anti))
                    k[t, g] = coef * u
        qs.append(q)
        ks.append(k)
        vs.append(torch.randn(n, h_kv, d, generator=gen))
    return pool_from_kv(qs, ks, vs, P, device, gen, dtype=dtype)


def reference_summaries(pool: Pool):
    """Physical-page summaries built from the reference (independent of the summary kernel)."""
    h_kv, d = pool.kc.shape[1], pool.kc.shape[2]
    kmin = torch.full((pool.num_pages, h_kv, d), float("nan"), dtype=pool.kc.dtype, device=pool.kc.device)
    kmax = kmin.clone()
    for b, s in enumerate(pool.slots):
        lo, hi = prhs.page_summaries(pool.kc[s], pool.page_size)
        phys = s[:: pool.page_size] // pool.page_size
        kmin[phys] = lo
        kmax[phys] = hi
    return kmin, kmax


def poison_wrapper(w, keep_selection: bool = False) -> None:
    """Fill the wrapper's outputs with NaN / SENTINEL. ``keep_selection`` spares the state a reuse
    step reads (the kept fresh selections: state_pages, state_num, state_npg)."""
    names = ["page_table", "num_pages", "last_len", "budget", "dense_req", "cur_pages", "cur_phys", "cur_num",
             "blocks_read_buf", "stop_reason_buf", "pages_loaded_buf", "sel_pages", "num_sel"]
    if not keep_selection:
        names += ["state_pages", "state_num", "state_npg"]
    for name in names:
        getattr(w, name).fill_(SENTINEL)
    for name in ("ub", "lb", "cur_rest", "cur_dhat", "mid_o", "mid_lse", "art_dhat_buf", "lse_buf"):
        getattr(w, name).fill_(float("nan"))
    if w._out is not None:
        w._out.fill_(float("nan"))


# ----------------------------------------------------------------------------- CLAA
def check_claa(n_list, h_q, h_kv, d, window, device, seed, pool_kinds=("avg", "max"), block_n=64, num_layers=2,
               tol=1e-4):
    from flashinfer_ext.claa_score import ClaaWindowScorer

    gen = torch.Generator().manual_seed(seed)
    for pool in pool_kinds:
        for n in n_list:
            sc = ClaaWindowScorer(h_q, h_kv, d, window, max_len=max(n_list), pool=pool, device=device,
                                  block_n=block_n)
            sc.colsum.fill_(float("nan"))
            acc = torch.full((n,), float("nan"), device=device)
            acc.fill_(float("-inf"))
            refs = []
            for layer in range(num_layers):
                q = (torch.randn(n, h_q, d, generator=gen) * (1 + layer)).to(device, torch.bfloat16)
                k = torch.randn(n, h_kv, d, generator=gen).to(device, torch.bfloat16)
                out = torch.full((h_kv, n), float("nan"), device=device)
                sc.score(q, k, acc, out)
                ref = claa.window_scores(q.double(), k.double(), window, 7, pool)
                refs.append(ref)
                e = rel_err(out, ref)
                assert e <= tol, f"seed={seed} pool={pool} n={n} layer={layer}: window scores rel err {e:.2e}"
            agg = claa.aggregate_max(refs)
            e = rel_err(acc, agg)
            assert e <= tol, f"seed={seed} pool={pool} n={n}: cross-layer max rel err {e:.2e}"


# ----------------------------------------------------------------------------- summaries
def kv_write_batches(pool: Pool, lens, P: int, rng: random.Random):
    """The slots of each KV write, as SGLang batches them: the prompts (all but the last P + 3 tokens) prefilled in
    extend chunks of 1..3P tokens per request (all requests in one batch), then one decode token per request per
    step. Yields ``loc`` (int64 slots; a page's tokens contiguous and ascending)."""
    prompt = [max(1, n - P - 3) for n in lens]
    pos = [0] * len(lens)
    while any(pos[b] < prompt[b] for b in range(len(lens))):
        locs = []
        for b in range(len(lens)):
            if pos[b] < prompt[b]:
                e = min(prompt[b], pos[b] + rng.randint(1, 3 * P))
                locs.append(pool.slots[b][pos[b]:e])
                pos[b] = e
        yield torch.cat(locs)
    while any(pos[b] < lens[b] for b in range(len(lens))):
        idx = [b for b in range(len(lens)) if pos[b] < lens[b]]
        for b in idx:
            pos[b] += 1
        yield torch.stack([pool.slots[b][pos[b] - 1] for b in idx])


def check_page_summaries(lens, page_size, h_kv, d, device, seed, chunk_sizes=(None,)):
    """Write requests through the summary kernel the way SGLang writes KV (extend chunks, then
    decode tokens, several requests per batch) into pages holding stale garbage; compare with
    prhs.page_summaries of each request's logical keys (bit-exact for bf16)."""
    from flashinfer_ext.summaries import update_page_summaries

    gen = torch.Generator().manual_seed(seed)
    P = page_size
    pool = make_pool(lens, P, h_kv, h_kv, d, d, device, gen)
    # stale summaries everywhere (a reused page must be reset on its first write)
    kmin = (torch.randn(pool.num_pages, h_kv, d, generator=gen) - 5).to(device, torch.bfloat16)
    kmax = (torch.randn(pool.num_pages, h_kv, d, generator=gen) + 5).to(device, torch.bfloat16)
    rng = random.Random(seed)
    for loc in kv_write_batches(pool, lens, P, rng):
        update_page_summaries(kmin, kmax, pool.kc[loc], loc.to(torch.int32 if rng.random() < 0.5 else torch.int64), P)
    for b, s in enumerate(pool.slots):
        lo, hi = prhs.page_summaries(pool.kc[s].double(), P)
        phys = s[::P] // P
        assert torch.equal(kmin[phys].double(), lo), f"seed={seed} request {b}: kmin differs"
        assert torch.equal(kmax[phys].double(), hi), f"seed={seed} request {b}: kmax differs"


# ----------------------------------------------------------------------------- selection + decode
def _budget_pages(npg, budget, sink, recent):
    want = math.ceil(budget * npg) if budget <= 1 else int(budget)
    return max(min(npg, sink + recent), min(npg, want))


def _assert_selection(w, b, ref_sel, ub, lb, page_lens, delta, budget, sink, recent, seed, tag):
    """Kernel selection vs reference, tolerant only where float32 and float64 may legitimately differ:

    * the forced prefix (sinks, recents) must be identical;
    * the appended pages must come in non-increasing ub order, and the kernel's and the reference's
      appended sets may differ only in pages whose ub is within ``ub_tol`` of the cut (near-ties);
    * the counts may differ only where the reference's certificate sits at delta (to 1e-4 relative);
    * the kernel's delta_hat must equal the reference certificate of the kernel's own selection;
    * entries past the selection up to the budget are -1.
    """
    h_kv, width = ref_sel.pages.shape
    npg = ub.shape[1]
    ub_tol = 4e-5 * max(1.0, float(ub.abs().max()))
    k_pages = w.pages[b].long()
    k_num = w.num_selected[b].long()
    n_sinks = min(max(sink, 0), npg)
    n_forced = min(n_sinks + len([p for p in range(max(0, npg - recent), npg) if p >= n_sinks]), budget)
    for g in range(h_kv):
        kn, rn = int(k_num[g]), int(ref_sel.num_selected[g])
        kp, rp = k_pages[g, :kn], ref_sel.pages[g, :rn]
        msg = f"seed={seed} {tag} b={b} g={g}"
        assert kn <= budget and bool((kp >= 0).all()) and bool((kp < npg).all()), f"{msg}: bad list {kp.tolist()}"
        assert torch.equal(kp[:n_forced], rp[:n_forced]), f"{msg}: forced pages {kp[:n_forced].tolist()} vs {rp[:n_forced].tolist()}"
        assert len(set(kp.tolist())) == kn, f"{msg}: duplicate pages"
        u = ub[g]
        ka, ra = kp[n_forced:], rp[n_forced:]
        if ka.numel() > 1:
            assert bool((u[ka][1:] <= u[ka][:-1] + ub_tol).all()), f"{msg}: appended pages not in descending ub"
        if kn != rn:
            j = min(kn, rn)
            dh = float(prhs.prehoc_delta_hat(u[None], lb[g:g + 1], page_lens, rp[None, :j] if j <= rn else kp[None, :j],
                                             torch.tensor([j], device=u.device)))
            assert abs(dh - delta) <= 1e-4 * max(delta, 1e-3) + 2e-6, \
                f"{msg}: {kn} vs {rn} pages selected, reference delta_hat at {j} = {dh} vs delta {delta}"
        m = min(ka.numel(), ra.numel())
        diff = set(ka[:m].tolist()) ^ set(ra[:m].tolist())
        if diff:
            cut = float(torch.minimum(u[ka[:m]].min(), u[ra[:m]].min()))
            far = [p for p in diff if abs(float(u[p]) - cut) > ub_tol]
            assert not far, f"{msg}: selected sets differ beyond near-ties: {sorted(diff)}"
        assert bool((k_pages[g, kn:width] == -1).all()), f"{msg}: padding not -1"
        own = float(prhs.prehoc_delta_hat(u[None], lb[g:g + 1], page_lens, kp[None], torch.tensor([kn], device=u.device)))
        dk = float(w.delta_hat[b, g])
        assert abs(dk - own) <= 1e-4 + 1e-3 * abs(own), f"{msg}: delta_hat {dk} vs reference {own}"


def check_decode(lens, page_size, h_q, h_kv, d, dv, device, seed, settings, structured=False,
                 tol=1e-2, max_seq_len=None, check_bounds=True, kv_start_pages=None, num_sms=None,
                 negative=False, pool: Optional[Pool] = None):
    """One pool, several plans: each ``settings`` entry is a dict of plan() keyword arguments (``pages``,
    ``art``, ``tuning``).

    ``kv_start_pages``: per request, leading pages the plan skips (``plan(kv_start=pages * P)``); the
    reference then sees only the request's positions from there on (CLAA's post-filter layers).
    ``pool``: run on these requests (``pool_from_kv``, e.g. a real model's queries and KV) instead of a
    random pool; ``lens`` is then ignored."""
    from flashinfer_ext.decode import SparseDecodeWrapper

    gen = torch.Generator().manual_seed(seed)
    P = page_size
    if pool is None:
        pool = make_pool(lens, P, h_q, h_kv, d, dv, device, gen, structured=structured, negative=negative)
    lens = pool.seq_lens.tolist()
    kmin, kmax = reference_summaries(pool)
    sm_scale = 1.0 / math.sqrt(d)
    w = SparseDecodeWrapper(h_q, h_kv, d, P, max_batch_size=len(lens) + 1,
                            max_seq_len=max_seq_len or max(lens) + P, head_dim_v=dv, device=device)
    if num_sms is not None:     # the SM count steers the launch shapes (splits, ART's head length)
        w.num_sms = num_sms
    starts = [0] * len(lens) if kv_start_pages is None else [p * P for p in kv_start_pages]
    kv_start = None if kv_start_pages is None else torch.tensor(starts, dtype=torch.int32, device=device)
    for cfg in settings:
        tag = f"{cfg} kv_start={starts}"
        poison_wrapper(w)
        w.plan(pool.req_to_token, pool.rows, pool.seq_lens, kv_start=kv_start, **cfg)
        out = w.run(pool.q, pool.kc, pool.vc, kmin, kmax)
        # pages loaded (published by the merge with ART) cover the pages in the output, within the list
        nb = len(lens)
        loaded = w.pages_loaded.reshape(nb, h_kv, h_q // h_kv).long()
        assert bool((loaded >= w.blocks_read.reshape(nb, h_kv, h_q // h_kv).long()).all()), \
            f"seed={seed} {cfg}: fewer pages loaded than read"
        assert bool((loaded <= w.num_selected.reshape(nb, h_kv, 1).long()).all()), \
            f"seed={seed} {cfg}: more pages loaded than listed"
        pages = cfg.get("pages")
        use_art = cfg.get("art") is not None
        for b, n in enumerate(lens):
            q, k, v = pool.logical(b)
            assert starts[b] < n, "kv_start must leave at least one token"
            k, v, n = k[starts[b]:], v[starts[b]:], n - starts[b]
            npg = -(-n // P)
            page_lens = prhs.page_lengths(n, P, device=k.device)
            lo, hi = prhs.page_summaries(k, P)
            ub, lb = prhs.page_bounds(q, lo, hi, sm_scale)
            if check_bounds and w.select:
                ku = w.ub[b, :, :npg].double()
                kl = w.lb[b, :, :npg].double()
                scale = ub.abs().max().clamp_min(1.0)
                assert float((ku - ub).abs().max() / scale) < 1e-5, f"seed={seed} {tag} b={b}: ub differs"
                assert float((kl - lb).abs().max() / lb.abs().max().clamp_min(1.0)) < 1e-5, \
                    f"seed={seed} {tag} b={b}: lb differs"
            if pages is not None:       # PrHS, or every page in bound order (budget 1, delta 0)
                sink, recent, delta = pages.sink_pages, pages.recent_pages, pages.delta
                bud = _budget_pages(npg, pages.budget, sink, recent)
                if lens[b] < pages.dense_below_len:
                    # a context shorter than the minimum (the whole request's, kv_start aside) reads every
                    # page, in the selector's order (delta 0), as the CPU reference decodes it
                    bud, delta = npg, 0.0
                ref_sel = prhs.select_pages(ub, lb, page_lens, delta, bud, sink, recent)
                _assert_selection(w, b, ref_sel, ub, lb, page_lens, delta, bud, sink, recent, seed, tag)
                order = w.pages[b, :, :bud].long()
                num = w.num_selected[b].long()
            else:
                order = torch.arange(npg, device=k.device)[None, :].expand(h_kv, npg)
                num = torch.full((h_kv,), npg, device=k.device, dtype=torch.long)
            if not use_art:
                if pages is not None:
                    ref, ref_lse = prhs.sparse_attention(q, k, v, P, order, num, sm_scale, return_lse=True)
                else:
                    ref, ref_lse = prhs.dense_attention(q, k, v, sm_scale, return_lse=True)
                e = rel_err(out[b], ref)
                assert e <= tol, f"seed={seed} {tag} b={b}: out rel err {e:.3e}"
                assert torch.allclose(w.lse[b].double(), ref_lse, atol=2e-3, rtol=1e-4), \
                    f"seed={seed} {tag} b={b}: lse {w.lse[b].tolist()} vs {ref_lse.tolist()}"
                assert bool((w.blocks_read[b].long() == num.repeat_interleave(h_q // h_kv)).all()), \
                    f"seed={seed} {tag} b={b}: blocks_read"
                assert bool((w.stop_reason[b] == art.STOP_NONE).all()), f"seed={seed} {tag} b={b}: stop_reason"
            else:
                _check_art(w, out, b, q, k, v, P, sm_scale, order, ub, cfg["art"], seed, tag, tol)


def _art_ref(q, k, v, P, sm_scale, order, ub, a: ArtParams, scale_tau=1.0, scale_eps=1.0):
    return art.art_attention(q, k, v, P, sm_scale, block_order=order, tau_mag=a.tau_mag * scale_tau,
                             tau_dir=a.tau_dir * scale_tau, patience=a.patience,
                             eps_cert=None if a.eps_cert is None else a.eps_cert * scale_eps, block_ub=ub,
                             min_blocks=a.min_blocks)


def _check_art(w, out, b, q, k, v, P, sm_scale, order, ub, cfg, seed, tag, tol, bounds=None):
    """ART decisions must equal the reference's (tolerating thresholds perturbed by +-20% where the
    float32 kernel and the float64 reference sit on opposite sides of a threshold); output,
    lse and delta_hat must match the reference run with the same decisions. ``bounds`` (default: the plan
    selects): whether the kernel had page bounds for the list; without, its delta_hat is unknown (NaN) where
    it stopped and 0 where it read the whole list."""
    bounds = w.select if bounds is None else bounds
    h_q = q.shape[0]
    kb = w.blocks_read[b].long()
    kr = w.stop_reason[b].long()
    head = w.launch.head_len
    match = None
    for st, se in ((1.0, 1.0), (0.8, 1.0), (1.25, 1.0), (1.0, 0.8), (1.0, 1.25), (0.8, 0.8), (1.25, 1.25)):
        ref = _art_ref(q, k, v, P, sm_scale, order, ub, cfg, st, se)
        rb, rr = ref.blocks_read.clone(), ref.stop_reason.clone()
        listed = (order >= 0).sum(dim=1).repeat_interleave(h_q // order.shape[0])
        late = (rr != art.STOP_NONE) & (rb > head)          # the kernel never stops after its head
        rb = torch.where(late, listed, rb)
        rr = torch.where(late, torch.full_like(rr, art.STOP_NONE), rr)
        if torch.equal(kb.cpu(), rb.cpu()) and torch.equal(kr.cpu(), rr.cpu()):
            match = (ref, late)
            break
    assert match is not None, (f"seed={seed} {tag} b={b}: ART blocks_read {kb.tolist()} reason {kr.tolist()} vs "
                               f"reference {_art_ref(q, k, v, P, sm_scale, order, ub, cfg).blocks_read.tolist()} "
                               f"{_art_ref(q, k, v, P, sm_scale, order, ub, cfg).stop_reason.tolist()}")
    ref, late = match
    # pages the group actually loaded: at least those in the output, at most the list (the tails run
    # alongside the head and may load pages past a stop; the counters are reset after every run)
    loaded = w.pages_loaded[b].long().cpu()
    listed_q = (order >= 0).sum(dim=1).repeat_interleave(h_q // order.shape[0]).cpu()
    assert bool((loaded >= kb.cpu()).all()) and bool((loaded <= listed_q).all()), \
        f"seed={seed} {tag} b={b}: pages_loaded {loaded.tolist()} vs blocks_read {kb.tolist()} / listed {listed_q.tolist()}"
    ref_out, ref_lse, ref_dhat = ref.out.clone(), ref.lse.clone(), ref.delta_hat.clone()
    if bool(late.any()):
        full = art.art_attention(q, k, v, P, sm_scale, block_order=order, tau_mag=0.0, tau_dir=0.0, patience=1,
                                 eps_cert=None, block_ub=ub, min_blocks=1)      # never stops: the whole list
        lm = late.to(ref_out.device)
        ref_out[lm] = full.out[lm]
        ref_lse[lm] = full.lse[lm]
        ref_dhat[lm] = full.delta_hat[lm]
    e = rel_err(out[b], ref_out)
    assert e <= tol, f"seed={seed} {tag} b={b}: ART out rel err {e:.3e}"
    assert torch.allclose(w.lse[b].double(), ref_lse, atol=2e-3, rtol=1e-4), f"seed={seed} {tag} b={b}: ART lse"
    if bounds:     # natural-order ART and shared layers have no page bounds: delta_hat is NaN where it stopped
        assert torch.allclose(w.art_delta_hat[b].double(), ref_dhat, atol=1e-4, rtol=2e-2), \
            f"seed={seed} {tag} b={b}: ART delta_hat {w.art_delta_hat[b].tolist()} vs {ref_dhat.tolist()}"
    else:
        stopped = kr != art.STOP_NONE
        assert bool(w.art_delta_hat[b][~stopped.to(w.art_delta_hat.device)].eq(0).all()), \
            f"seed={seed} {tag} b={b}: ART delta_hat of unstopped groups must be 0"


# ----------------------------------------------------------------------------- reuse across layers
def check_shared_layer(lens, page_size, h_q, h_kv, d, device, seed, settings, scale: float = 20.0, tol=1e-2):
    """Layer axis (``run(select=False)``): a leader layer selects on a structured pool, then a layer sharing its
    list runs on other keys and values of the same pages (``scale`` times larger keys, so its logits dwarf the
    leader's page bounds) and other queries. The shared layer must read the leader's list, report no certificate
    of its own (``delta_hat`` NaN) while ``leader_delta_hat`` keeps the leader's, and, with ART, run only the
    magnitude/direction test (the leader's suffix bounds certify nothing here): its decisions and output equal
    the reference's without ``eps_cert``, and its ART delta-hat claims no bound (NaN where it stopped)."""
    from dataclasses import replace

    from flashinfer_ext.decode import SparseDecodeWrapper

    gen = torch.Generator().manual_seed(seed)
    P = page_size
    pool = make_pool(lens, P, h_q, h_kv, d, d, device, gen, structured=True)
    kmin, kmax = reference_summaries(pool)
    kc2 = (scale * torch.randn(pool.kc.shape, generator=gen)).to(device=device, dtype=pool.kc.dtype)
    vc2 = torch.randn(pool.vc.shape, generator=gen).to(device=device, dtype=pool.vc.dtype)
    q2 = torch.randn(pool.q.shape, generator=gen).to(device=device, dtype=pool.q.dtype)
    sm_scale = 1.0 / math.sqrt(d)
    w = SparseDecodeWrapper(h_q, h_kv, d, P, max_batch_size=len(lens), max_seq_len=max(lens) + P, device=device)
    for cfg in settings:
        tag = f"seed={seed} shared layer {cfg}"
        poison_wrapper(w)
        w.plan(pool.req_to_token, pool.rows, pool.seq_lens, **cfg)
        w.run(pool.q, pool.kc, pool.vc, kmin, kmax)
        lead = w.delta_hat.clone()
        pages, num = w.pages.long().clone(), w.num_selected.long().clone()
        assert bool(torch.isfinite(lead).all()), f"{tag}: leader delta_hat {lead.tolist()}"
        out = w.run(q2, kc2, vc2, select=False)
        assert bool(torch.isnan(w.delta_hat).all()), f"{tag}: a shared layer's delta_hat {w.delta_hat.tolist()}"
        assert torch.equal(w.leader_delta_hat, lead), f"{tag}: leader_delta_hat {w.leader_delta_hat.tolist()}"
        assert torch.equal(w.num_selected.long(), num), f"{tag}: the shared layer read other lists"
        a = cfg.get("art")
        for b in range(len(lens)):
            s = pool.slots[b]
            q, k, v = q2[b].double(), kc2[s].double(), vc2[s].double()
            width = int(num[b].max())
            order = pages[b, :, :width]
            if a is None:
                ref = prhs.sparse_attention(q, k, v, P, order, num[b], sm_scale)
                e = rel_err(out[b], ref)
                assert e <= tol, f"{tag} b={b}: out rel err {e:.3e}"
                continue
            assert not bool((w.stop_reason[b] == art.STOP_CERTIFIED).any()), \
                f"{tag} b={b}: certified stop on the leader's bounds, ART delta_hat {w.art_delta_hat[b].tolist()}"
            _check_art(w, out, b, q, k, v, P, sm_scale, order, None, replace(a, eps_cert=None), seed, tag, tol,
                       bounds=False)


# ----------------------------------------------------------------------------- reuse across steps
def check_reuse(lens, grow_pages, page_size, h_q, h_kv, d, device, seed, dilation=1, budget=0.25, delta=0.05,
                sink=1, recent=2, tol=1e-2, estimate=False):
    """Time axis: step 1 selects afresh on page-aligned prefixes; step 2 (``grow_pages`` more pages
    per request, batch order reversed) reuses that selection with dilation (prhs.reuse_with_dilation);
    step 3 (original order) mixes a fresh selection (request 0) with reuse (the others) through the
    per-request flags. The state lives in slot 1 of 2, keyed by req_to_token row. With ``estimate`` the fresh
    selections rank pages by their estimated mass (checked by :func:`check_estimate_decode`; here the reuse of the
    list the kernel chose, and the attention over every list)."""
    from flashinfer_ext.decode import SparseDecodeWrapper

    gen = torch.Generator().manual_seed(seed)
    P = page_size
    pool = make_pool(lens, P, h_q, h_kv, d, d, device, gen, structured=True)
    kmin, kmax = reference_summaries(pool)
    codes = reference_codes(pool, kmin, kmax) if estimate else None
    sm_scale = 1.0 / math.sqrt(d)
    prefix = [(-(-n // P) - grow_pages) * P for n in lens]
    assert min(prefix) > 0
    w = SparseDecodeWrapper(h_q, h_kv, d, P, max_batch_size=len(lens), max_seq_len=max(lens), device=device,
                            reuse_slots=2, max_reqs=pool.req_to_token.shape[0], estimate=estimate)
    slot = 1
    cfg = dict(pages=sel(budget, delta, sink, recent, dilation, estimate=estimate))
    pre_lens = torch.tensor(prefix, dtype=torch.int64, device=device)

    def bounds(b, n):
        q, k, v = pool.logical(b)
        k, v = k[:n], v[:n]
        lo, hi = prhs.page_summaries(k, P)
        ub, lb = prhs.page_bounds(q, lo, hi, sm_scale)
        return q, k, v, ub, lb

    # step 1: fresh selection on the prefixes
    poison_wrapper(w)
    w.plan(pool.req_to_token, pool.rows, pre_lens, reselect=True, **cfg)
    w.run(pool.q, pool.kc, pool.vc, kmin, kmax, reuse_slot=slot, codes=codes)
    first = []
    for b, n in enumerate(prefix):
        q, k, v, ub, lb = bounds(b, n)
        npg = n // P
        bud = _budget_pages(npg, budget, sink, recent)
        if not estimate:
            ref_sel = prhs.select_pages(ub, lb, prhs.page_lengths(n, P, device=k.device), delta, bud, sink, recent)
            _assert_selection(w, b, ref_sel, ub, lb, prhs.page_lengths(n, P, device=k.device), delta, bud, sink,
                              recent, seed, "reuse step 1")
        first.append((w.pages[b, :, :bud].long().clone(), w.num_selected[b].long().clone(), npg))

    # step 2: every request reuses (dilated) on the grown contexts; step 3: request 0 selects afresh
    nb = len(lens)
    for step, flags, order in ((2, False, list(reversed(range(nb)))),
                               (3, torch.tensor([b == 0 for b in range(nb)], device=device), list(range(nb)))):
        poison_wrapper(w, keep_selection=True)
        perm = torch.tensor(order, device=device)
        w.plan(pool.req_to_token, pool.rows[perm], pool.seq_lens[perm], reselect=flags, **cfg)
        out_perm = w.run(pool.q[perm], pool.kc, pool.vc, kmin, kmax, reuse_slot=slot, codes=codes)
        pos_of = {r: i for i, r in enumerate(order)}
        for b, n in enumerate(lens):
            i = pos_of[b]                                  # batch row of request b in this step
            q, k, v, ub, lb = bounds(b, n)
            npg = -(-n // P)
            tag = f"seed={seed} reuse step {step} b={b}"
            fresh = step == 3 and b == 0
            if fresh:
                bud = _budget_pages(npg, budget, sink, recent)
                page_lens = prhs.page_lengths(n, P, device=k.device)
                if not estimate:
                    ref_sel = prhs.select_pages(ub, lb, page_lens, delta, bud, sink, recent)
                    _assert_selection(w, i, ref_sel, ub, lb, page_lens, delta, bud, sink, recent, seed, tag)
                pages, num = w.sel_pages[i, :, :bud].long(), w.cur_num[i].long()
            else:
                prev_pages, prev_num, prev_npg = first[b]
                ref_pages, ref_num = prhs.reuse_with_dilation(prev_pages, dilation, npg, prev_npg, sink, recent,
                                                              prev_num)
                num = w.cur_num[i].long()
                assert torch.equal(num, ref_num), f"{tag}: {num.tolist()} vs {ref_num.tolist()} pages"
                width = ref_pages.shape[1]
                pages = w.cur_pages[i, :, :width].long()
                assert torch.equal(pages, ref_pages), f"{tag}: reused list differs"
                assert bool(torch.isnan(w.cur_dhat[i]).all()), f"{tag}: a reused list has no certificate (NaN)"
            ref = prhs.sparse_attention(q, k, v, P, pages, num, sm_scale)
            e = rel_err(out_perm[i], ref)
            assert e <= tol, f"{tag}: out rel err {e:.3e}"


def check_selection_ties(page_size, h_q, h_kv, d, device, seed, n=400, patterns=3):
    """Pages with identical keys (so identical bounds): the selection must break ties by page id
    exactly like the reference, including a tie group cut by the budget or by delta."""
    from flashinfer_ext.decode import SparseDecodeWrapper

    gen = torch.Generator().manual_seed(seed)
    P = page_size
    pool = make_pool([n], P, h_q, h_kv, d, d, device, gen)
    s = pool.slots[0]
    npg = -(-n // P)
    for lp in range(patterns, npg - 1):                      # full pages copy one of a few patterns
        src = lp % patterns
        pool.kc[s[lp * P:(lp + 1) * P]] = pool.kc[s[src * P:(src + 1) * P]]
    kmin, kmax = reference_summaries(pool)
    sm_scale = 1.0 / math.sqrt(d)
    q, k, v = pool.logical(0)
    lo, hi = prhs.page_summaries(k, P)
    ub, lb = prhs.page_bounds(q, lo, hi, sm_scale)
    page_lens = prhs.page_lengths(n, P, device=k.device)
    w = SparseDecodeWrapper(h_q, h_kv, d, P, max_batch_size=1, max_seq_len=n, device=device)
    for budget, delta in ((0.3, 0.0), (0.5, 0.0), (1.0, 0.3), (0.45, 0.6)):
        poison_wrapper(w)
        w.plan(pool.req_to_token, pool.rows, pool.seq_lens, pages=sel(budget, delta))
        out = w.run(pool.q, pool.kc, pool.vc, kmin, kmax)
        bud = _budget_pages(npg, budget, 1, 2)
        ref = prhs.select_pages(ub, lb, page_lens, delta, bud, 1, 2)
        tag = f"seed={seed} ties budget={budget} delta={delta}"
        for g in range(h_kv):
            kn, rn = int(w.num_selected[0, g]), int(ref.num_selected[g])
            if kn == rn:
                assert torch.equal(w.pages[0, g, :kn].long(), ref.pages[g, :rn]), \
                    f"{tag} g={g}: {w.pages[0, g, :kn].tolist()} vs {ref.pages[g, :rn].tolist()}"
        _assert_selection(w, 0, ref, ub, lb, page_lens, delta, bud, 1, 2, seed, tag)
        e = rel_err(out[0], prhs.sparse_attention(q, k, v, P, w.pages[0, :, :bud].long(),
                                                   w.num_selected[0].long(), sm_scale))
        assert e <= 1e-2, f"{tag}: out rel err {e:.3e}"


# ----------------------------------------------------------------------------- estimate mode (key codes)
def _unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """``[n, H_kv, D / 2]`` uint8 -> ``[n, H_kv, D]`` codes (low nibble: channels < D/2, high: the others)."""
    p = packed.long()
    return torch.cat([p & 15, p >> 4], dim=-1)


def reference_codes(pool: Pool, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Packed codes of every full page of the pool's requests from the reference (independent of the summary
    kernel); partial pages and unused slots hold random bytes."""
    P = pool.page_size
    n_slots, h_kv, d = pool.kc.shape
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 256, (n_slots, h_kv, d // 2), generator=gen, dtype=torch.uint8).to(pool.kc.device)
    for s in pool.slots:
        n_full = (s.numel() // P) * P
        if n_full == 0:
            continue
        phys = s[:n_full:P] // P
        c = prhs.quantise_page_keys(pool.kc[s[:n_full]], kmin[phys], kmax[phys], P).long()
        codes[s[:n_full]] = (c[..., : d // 2] | (c[..., d // 2:] << 4)).to(torch.uint8)
    return codes


def check_key_codes(lens, page_size, h_kv, d, device, seed, max_mismatch: float = 0.0):
    """Write requests through the summary kernel with key codes, as SGLang writes KV (extend chunks of random
    sizes, then decode tokens), over codes and summaries holding garbage; every full page's codes must be
    :func:`sglang_sparse.prhs.quantise_page_keys` of its keys in its final bf16 summary. ``max_mismatch``: share of
    codes allowed to differ by one (a compiled fp32 division may round a value sitting on a half step the other
    way), none by more."""
    from flashinfer_ext.summaries import update_page_summaries

    gen = torch.Generator().manual_seed(seed)
    P = page_size
    pool = make_pool(lens, P, h_kv, h_kv, d, d, device, gen)
    kmin = (torch.randn(pool.num_pages, h_kv, d, generator=gen) - 5).to(device, torch.bfloat16)
    kmax = (torch.randn(pool.num_pages, h_kv, d, generator=gen) + 5).to(device, torch.bfloat16)
    codes = torch.randint(0, 256, (pool.kc.shape[0], h_kv, d // 2), generator=gen, dtype=torch.uint8).to(device)
    stale = codes.clone()
    for loc in kv_write_batches(pool, lens, P, random.Random(seed)):
        update_page_summaries(kmin, kmax, pool.kc[loc], loc, P, k_cache=pool.kc, codes=codes)
    for b, s in enumerate(pool.slots):
        n_full = (s.numel() // P) * P
        lo, hi = prhs.page_summaries(pool.kc[s], P)
        ref = prhs.quantise_page_keys(pool.kc[s[:n_full]], lo, hi, P).long()
        got = _unpack_codes(codes[s[:n_full]])
        diff = (got - ref).abs()
        assert int(diff.max()) <= 1 if diff.numel() else True, f"seed={seed} request {b}: a code off by {int(diff.max())}"
        share = float((diff > 0).double().mean()) if diff.numel() else 0.0
        assert share <= max_mismatch, f"seed={seed} request {b}: {share:.2e} of the codes differ"
        # a partial page is not quantised yet: its slots keep what they held
        assert torch.equal(codes[s[n_full:]], stale[s[n_full:]]), f"seed={seed} request {b}: partial page coded"


def check_estimate_decode(lens, page_size, h_q, h_kv, d, device, seed, settings, tol=1e-2, est_tol=0.05,
                          mass_tol=2e-3, estimate_shape=None):
    """Estimate mode (``PageSelectParams(estimate=True)``) on a structured pool, codes from the reference:

    * the kernel's page log-masses match :func:`sglang_sparse.prhs.estimated_page_log_mass` (to ``mass_tol`` nats:
      fp32 products, summed in another order);
    * the forced prefix is the reference's; the appended pages come in non-increasing estimated mass;
    * the selection stops where the rule says: its estimated dropped mass (reference, on the kernel's list) is
      within delta (or the budget is full), the list one page shorter is not (to est_tol), and the reported
      ``delta_hat`` is that estimate;
    * the output is exact attention over the kernel's list."""
    from flashinfer_ext.decode import SparseDecodeWrapper

    gen = torch.Generator().manual_seed(seed)
    P = page_size
    pool = make_pool(lens, P, h_q, h_kv, d, d, device, gen, structured=True)
    kmin, kmax = reference_summaries(pool)
    codes = reference_codes(pool, kmin, kmax)
    sm_scale = 1.0 / math.sqrt(d)
    w = SparseDecodeWrapper(h_q, h_kv, d, P, max_batch_size=len(lens) + 1, max_seq_len=max(lens) + P,
                            device=device, estimate=True)
    if estimate_shape is not None:
        w.estimate_shape = estimate_shape
    threshold_lists = 0
    for cfg in settings:
        pages = cfg["pages"]
        assert pages.estimate
        poison_wrapper(w)
        w.est.fill_(float("nan"))
        w.plan(pool.req_to_token, pool.rows, pool.seq_lens, **cfg)
        out = w.run(pool.q, pool.kc, pool.vc, kmin, kmax, codes=codes)
        for b, n in enumerate(lens):
            tag = f"seed={seed} {cfg} b={b}"
            q, k, v = pool.logical(b)
            s = pool.slots[b]
            npg = -(-n // P)
            page_lens = prhs.page_lengths(n, P, device=k.device)
            lo, hi = prhs.page_summaries(pool.kc[s], P)
            k_est = prhs.dequantise_page_keys(_unpack_codes(codes[s]), lo, hi, P)
            est = prhs.estimated_page_log_mass(q, k_est.double(), k, P, sm_scale)           # [H_q, N]
            got = w.est[b, :, :npg].double()
            assert float((got - est).abs().max()) <= mass_tol, f"{tag}: estimates differ by {(got - est).abs().max()}"
            score = prhs.estimated_page_scores(est, h_kv)                                   # [H_kv, N]
            bud = _budget_pages(npg, pages.budget, pages.sink_pages, pages.recent_pages)
            ref = prhs.select_pages_estimated(est, page_lens, h_kv, pages.delta, bud, pages.sink_pages,
                                              pages.recent_pages)
            forced = prhs._forced_pages(npg, pages.sink_pages, pages.recent_pages)[:bud]
            # without ART, with delta > 0 and every page allowed, the kernel finds the set by a threshold search and
            # lists it in id order; otherwise in descending score
            ordered = cfg.get("art") is not None or pages.delta <= 0 or bud < npg
            threshold_lists += 0 if ordered else 1
            for g in range(h_kv):
                num = int(w.num_selected[b, g])
                lst = w.pages[b, g, :num].long()
                assert lst[: len(forced)].tolist() == forced, f"{tag} g={g}: forced pages {lst.tolist()}"
                assert int((w.pages[b, g, num:bud] != -1).sum()) == 0, f"{tag} g={g}: list not -1 padded"
                app = score[g, lst[len(forced):]]
                kept = torch.zeros(npg, dtype=torch.bool)
                kept[lst.cpu()] = True
                if ordered:
                    assert bool((app[1:] <= app[:-1] + est_tol * app[:-1]).all()), f"{tag} g={g}: not in mass order"
                else:
                    # the threshold search: the kept candidates in ascending id, each scored at least as high as
                    # every dropped candidate
                    app_ids = lst[len(forced):]
                    assert bool((app_ids[1:] > app_ids[:-1]).all()), f"{tag} g={g}: not in id order {app_ids.tolist()}"
                    cand = torch.ones(npg, dtype=torch.bool)
                    cand[forced] = False
                    out_c = score[g].cpu()[cand & ~kept]
                    if app.numel() and out_c.numel():
                        assert float(app.min()) >= float(out_c.max()) * (1 - est_tol), \
                            f"{tag} g={g}: a dropped page scores above a kept one"
                dropped = float(score[g].cpu()[~kept].sum())
                if pages.delta > 0 and num < bud:
                    assert dropped <= pages.delta * (1 + 4 * est_tol) + 1e-6, f"{tag} g={g}: stopped at {dropped}"
                if pages.delta > 0 and num > len(forced):
                    kept[int(lst[len(forced):][app.argmin()])] = False      # the lowest-scored page appended
                    shorter = float(score[g].cpu()[~kept].sum())
                    assert shorter > pages.delta * (1 - 4 * est_tol), f"{tag} g={g}: one page too many ({shorter})"
                assert abs(float(w.delta_hat[b, g]) - min(dropped, 1.0)) <= est_tol * max(dropped, 1e-3) + 1e-5, \
                    f"{tag} g={g}: delta_hat {float(w.delta_hat[b, g])} vs {dropped}"
                assert abs(num - int(ref.num_selected[g])) <= 1, f"{tag} g={g}: {num} pages, reference {ref.num_selected[g]}"
            order = w.pages[b, :, :bud].long()
            want = prhs.sparse_attention(q, k, v, P, order, w.num_selected[b].long(), sm_scale)
            e = rel_err(out[b], want)
            assert e <= tol, f"{tag}: out rel err {e:.3e}"
    return threshold_lists
