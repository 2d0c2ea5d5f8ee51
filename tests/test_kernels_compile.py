"""Every Triton kernel launch of flashinfer_ext's wrappers compiles for the H100 (sm_90), without a GPU, and
branches only on values every warp of a program agrees on.

Triton's interpreter (tests/test_kernels_cpu.py) checks the math but not code generation: a kernel
can run interpreted and still fail to compile. Here the wrappers are driven with Llama-3.1-8B shapes
on CPU tensors while ``JITFunction.run`` is replaced by a recorder; each distinct launch (signature,
constexprs, launch options, 16-byte alignment as the JIT would specialise it) is then compiled to a
cubin for ``GPUTarget("cuda", 90, 32)`` with the ptxas bundled in the triton wheel. Runs in the
ordinary CPU test process (without TRITON_INTERPRET); skipped when the NVIDIA backend is missing.
"""

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="compiles kernels; run without TRITON_INTERPRET")

H_Q, H_KV, D = 32, 8, 128
_DT = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64", torch.int8: "i8",
       torch.float16: "fp16", torch.uint8: "u8"}


def _record_launches(drive):
    """Run ``drive()`` with kernel launches recorded instead of executed: {key: (fn, sig, consts, opts, attrs)}."""
    from triton.runtime.jit import JITFunction

    launches = {}

    def record(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        opts = {k: v for k, v in kwargs.items() if k not in names and k in ("num_warps", "num_stages")}
        sig, consts, attrs = {}, {}, {}
        for i, name in enumerate(names):
            v = bound.get(name)
            if self.params[i].is_constexpr or v is None:
                consts[name] = v
                sig[name] = "constexpr"
            elif isinstance(v, torch.Tensor):
                sig[name] = "*" + _DT[v.dtype]
                if v.data_ptr() % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, bool):
                sig[name] = "i1"
            elif isinstance(v, int):
                sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, float):
                sig[name] = "fp32"
            else:
                raise TypeError(f"{self.fn.__name__}.{name}: {type(v)}")
        key = (self.fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())),
               tuple(sorted(opts.items())), tuple(sorted(attrs)))
        launches.setdefault(key, (self, sig, consts, opts, attrs))

    saved = JITFunction.run
    JITFunction.run = record
    try:
        drive()
    finally:
        JITFunction.run = saved
    return launches


def _drive_wrappers():
    from flashinfer_ext.audit import DroppedMassAudit
    from flashinfer_ext.claa_score import ClaaWindowScorer
    from flashinfer_ext.decode import SparseDecodeWrapper
    from flashinfer_ext.summaries import update_page_summaries
    from kernel_cases import art_p, every_page, sel, tune

    P, ctx, bs = 32, 32768, 8
    num_pages = bs * ctx // P + 2
    kc = torch.empty(num_pages * P, H_KV, D, dtype=torch.bfloat16)
    vc = torch.empty_like(kc)
    kmin = torch.empty(num_pages, H_KV, D, dtype=torch.bfloat16)
    kmax = torch.empty_like(kmin)
    r2t = torch.zeros(bs + 1, ctx, dtype=torch.int32)
    rows = torch.arange(1, bs + 1)
    lens = torch.full((bs,), ctx)
    q = torch.empty(bs, H_Q, D, dtype=torch.bfloat16)
    w = SparseDecodeWrapper(H_Q, H_KV, D, P, max_batch_size=bs, max_seq_len=ctx, device="cpu",
                            reuse_slots=1, max_reqs=bs + 1)
    a = art_p(0.01, 1e-4, patience=2, min_blocks=4)
    for cfg in (dict(), dict(pages=sel(1 / 16, 0.05)),
                dict(pages=sel(1 / 16, 0.0, dilation=1), reselect=True),
                dict(pages=sel(1 / 16, 0.05), tuning=tune(bounds_block_p=64, bounds_iters=4)),
                dict(pages=sel(1 / 16, 0.05), tuning=tune(bounds_block_p=128, bounds_iters=2, select_warps=8)),
                dict(pages=sel(1 / 16, 0.05), art=art_p(0.01, 1e-4, 2, 4, eps_cert=0.01)),
                dict(pages=sel(1 / 16, 0.05), art=a, tuning=tune(art_head_pages=8)),
                dict(pages=every_page(), art=a), dict(art=a)):
        w.plan(r2t, rows, lens, **cfg)
        w.run(q, kc, vc, kmin, kmax)
        w.run(q, kc, vc, kmin, kmax, select=False)
    shift = torch.zeros(bs + 1, 4, dtype=torch.int32)         # the audit feedback's budget scale, one group's column
    w.plan(r2t, rows, lens, pages=sel(1 / 16, 0.05), budget_max_shift=3)
    w.run(q, kc, vc, kmin, kmax, budget_shift=shift[:, 1])
    audit = DroppedMassAudit(H_Q, H_KV, D, P, max_batch_size=bs, max_seq_len=ctx, device="cpu", num_sms=132)
    audit.plan(bs, True)
    audit.run(w, q, kc)
    audit = DroppedMassAudit(H_Q, H_KV, D, P, max_batch_size=bs, max_seq_len=ctx, device="cpu", num_sms=132,
                             measure="output-error")
    for n in (1, bs):
        w.plan(r2t, rows[:n], lens[:n], pages=sel(1 / 16, 0.05))
        out = w.run(q[:n], kc, vc, kmin, kmax)
        audit.plan(n, True)
        audit.run(w, q[:n], kc, vc, out)
    update_page_summaries(kmin, kmax, kc[:100], torch.arange(100), P)
    # estimate mode (--prhs-select estimate): key codes written with the summaries, the page-mass estimate, the
    # selector's estimate path, with and without ART (a head_dim of 64 too, SmolLM2 / Qwen 0.5B)
    codes = torch.empty(num_pages * P, H_KV, D // 2, dtype=torch.uint8)
    update_page_summaries(kmin, kmax, kc[:100], torch.arange(100), P, k_cache=kc, codes=codes)
    we = SparseDecodeWrapper(H_Q, H_KV, D, P, max_batch_size=bs, max_seq_len=ctx, device="cpu", estimate=True)
    for cfg in (dict(pages=sel(1.0, 0.05, estimate=True)), dict(pages=sel(1 / 2, 0.1, estimate=True), art=a)):
        we.plan(r2t, rows, lens, **cfg)
        we.run(q, kc, vc, kmin, kmax, codes=codes)
    for shape in ((2, 8, 3, 1), (8, 4, 2, 4)):             # other launches (benchmarks' --estimate-shapes)
        we.estimate_shape = shape
        we.run(q, kc, vc, kmin, kmax, codes=codes)
    d64 = 64
    w64 = SparseDecodeWrapper(14, 2, d64, 64, max_batch_size=2, max_seq_len=4096, device="cpu", estimate=True)
    kc64 = torch.empty(64 * 64, 2, d64, dtype=torch.bfloat16)
    km64 = torch.empty(64, 2, d64, dtype=torch.bfloat16)
    cd64 = torch.empty(64 * 64, 2, d64 // 2, dtype=torch.uint8)
    w64.plan(torch.zeros(3, 4096, dtype=torch.int32), torch.arange(1, 3), torch.full((2,), 4000),
             pages=sel(1.0, 0.05, estimate=True))
    w64.run(torch.empty(2, 14, d64, dtype=torch.bfloat16), kc64, torch.empty_like(kc64), km64, km64, codes=cd64)
    update_page_summaries(km64, km64.clone(), kc64[:100], torch.arange(100), 64, k_cache=kc64, codes=cd64)
    # Qwen2.5-Coder-1.5B's heads (12 / 2, G 6: 2 pages per tl.dot) at a 32K context of 16-token pages: the selection
    # sorts 2048 pages with 16 warps
    n15 = 2048 * 16
    w15 = SparseDecodeWrapper(12, 2, D, 16, max_batch_size=1, max_seq_len=n15, device="cpu", estimate=True)
    kc15 = torch.empty(n15 + 16, 2, D, dtype=torch.bfloat16)
    km15 = torch.empty(n15 // 16 + 1, 2, D, dtype=torch.bfloat16)
    w15.plan(torch.zeros(2, n15, dtype=torch.int32), torch.arange(1, 2), torch.full((1,), n15 - 5),
             pages=sel(1.0, 0.1, estimate=True))
    assert w15.estimate_shape[3] == 2 and w15.launch.select_warps == 16
    w15.run(torch.empty(1, 12, D, dtype=torch.bfloat16), kc15, torch.empty_like(kc15), km15, km15,
            codes=torch.empty(n15 + 16, 2, D // 2, dtype=torch.uint8))
    n = 4096
    for pool in ("avg", "max"):
        sc = ClaaWindowScorer(H_Q, H_KV, D, 8, max_len=n, pool=pool, device="cpu")
        sc.score(torch.empty(n, H_Q, D, dtype=torch.bfloat16), torch.empty(n, H_KV, D, dtype=torch.bfloat16),
                 torch.empty(n), torch.empty(H_KV, n))


def test_all_launches_compile_for_sm90():
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "ptxas")):
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    launches = _record_launches(_drive_wrappers)
    names = {k[0] for k in launches}
    assert {"_page_table_kernel", "_page_bounds_kernel", "_page_select_kernel", "_page_dilate_kernel",
            "_decode_split_kernel", "_merge_splits_kernel", "_page_summary_kernel", "_claa_tile_stats_kernel",
            "_claa_row_stats_kernel", "_claa_colsum_kernel", "_claa_pool_max_kernel", "_kv_split_kernel",
            "_audit_merge_kernel", "_page_estimate_kernel"} <= names, names
    failures = []
    for key, (fn, sig, consts, opts, attrs) in launches.items():
        try:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                               target=GPUTarget("cuda", 90, 32), options=dict(opts))
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{key[0]} {dict(key[2])} {opts}: {type(exc).__name__}: {str(exc)[:500]}")
            continue
        racy = _branches_on_racy_loads(k.asm["ttir"])     # see test_art_decode_branches_agree_across_warps
        if racy:
            failures.append(f"{key[0]} {dict(key[2])}: branches on per-thread volatile loads: {racy}")
    assert not failures, "\n".join(failures)


def _branches_on_racy_loads(ttir: str):
    """Control flow that depends on a value each thread loads for itself with ``volatile=True`` (memory that other
    programs write while this one runs), in a kernel's TTIR: ``scf.if`` conditions, ``scf.for`` bounds and
    ``cf.cond_br`` conditions reached from such a load through SSA data flow. Returns the offending lines.

    On a GPU every thread of a program executes such a load at its own time, so the warps of one program can read
    different values and split at the branch; a barrier inside the branch then pairs with a barrier elsewhere and
    the warps read shared memory that the others never filled. The interpreter runs a program as one thread and
    cannot show it. A value every warp agrees on comes from a reduction over the program or from a scalar atomic
    (one thread performs it and Triton broadcasts its result through shared memory)."""
    import re

    tainted = set()
    lines = ttir.splitlines()
    ident = re.compile(r"%[\w.$-]+")
    changed = True
    while changed:
        changed = False
        for line in lines:
            s = line.strip()
            m = re.match(r"(%[\w.$-]+)(?::\d+)?\s*=\s*(.*)", s)
            if m:
                lhs, rhs = m.group(1), m.group(2)
                src = "tt.load" in rhs.split("(")[0] and "isVolatile = true" in rhs
                if lhs not in tainted and (src or any(t.split("#")[0] in tainted for t in ident.findall(rhs))):
                    tainted.add(lhs)
                    changed = True
            for a, b in re.findall(r"(%[\w.$-]+) = (%[\w.$-]+)", s.split("iter_args(", 1)[1] if "iter_args(" in s
                                   else ""):
                if b.split("#")[0] in tainted and a not in tainted:
                    tainted.add(a)
                    changed = True
    bad = []
    for line in lines:
        s = line.strip()
        ctrl = re.search(r"\b(scf\.if|cf\.cond_br)\s+(%[\w.$-]+)", s)
        loop = re.search(r"\bscf\.for\s+%[\w.$-]+\s*=\s*(%[\w.$-]+)\s+to\s+(%[\w.$-]+)\s+step\s+(%[\w.$-]+)", s)
        used = [ctrl.group(2)] if ctrl else list(loop.groups()) if loop else []
        if any(u.split("#")[0] in tainted for u in used):
            bad.append(s.split(" loc(")[0][:160])
    return bad


def _drive_server_decode(h_q: int, h_kv: int, d: int, P: int):
    """The decode wrapper as an SGLang server with --art on drives it: a wrapper as wide as SGLang's req_to_token
    (context 32768 + 4 slots), the H200's 132 SMs, 16 requests of 4K-32K tokens; dense + ART in bound order and
    PrHS + ART at the configuration's defaults."""
    from flashinfer_ext.decode import SparseDecodeWrapper
    from kernel_cases import art_p, every_page, sel

    ctx, bs = 32768 + 4, 16
    lens = torch.tensor([4096 + (ctx - 4096 - 8) * i // (bs - 1) for i in range(bs)])
    num_pages = int(sum(-(-int(n) // P) for n in lens)) + 2
    kc = torch.empty(num_pages * P, h_kv, d, dtype=torch.bfloat16)
    kmin = torch.empty(num_pages, h_kv, d, dtype=torch.bfloat16)
    r2t = torch.zeros(bs + 1, ctx, dtype=torch.int32)
    q = torch.empty(bs, h_q, d, dtype=torch.bfloat16)
    w = SparseDecodeWrapper(h_q, h_kv, d, P, max_batch_size=32, max_seq_len=ctx, device="cpu")
    w.num_sms = 132
    a = art_p(1e-3, 1e-6, patience=2, min_blocks=4)
    for cfg in (dict(pages=every_page(), art=a), dict(pages=sel(1 / 16, 0.05), art=a)):
        w.plan(r2t, torch.arange(1, bs + 1), lens, **cfg)
        w.run(q, kc, torch.empty_like(kc), kmin, torch.empty_like(kmin))


def test_branch_check_finds_a_branch_on_a_racy_load():
    """The check of the next test is not vacuous: it flags a kernel that branches on a volatile load, and passes the
    same kernel reading the value through a scalar atomic."""
    triton = pytest.importorskip("triton")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def _racy(Flag, Out, ATOMIC: tl.constexpr):
        if ATOMIC:
            go = tl.atomic_add(Flag, 0, sem="relaxed") == 0
        else:
            go = tl.load(Flag, volatile=True) == 0
        if go:
            tl.store(Out + tl.arange(0, 128), tl.arange(0, 128))

    for atomic in (False, True):
        k = triton.compile(ASTSource(fn=_racy, signature={"Flag": "*i32", "Out": "*i32", "ATOMIC": "constexpr"},
                                     constexprs={"ATOMIC": atomic}),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
        found = _branches_on_racy_loads(k.asm["ttir"])
        assert bool(found) != atomic, (atomic, found, k.asm["ttir"])


@pytest.mark.parametrize("h_q,h_kv,d,P", [(14, 2, 64, 32), (14, 2, 64, 64), (12, 2, 128, 32)])
def test_art_decode_branches_agree_across_warps(h_q, h_kv, d, P):
    """The decode launches of a Qwen2.5-Coder-0.5B / 1.5B server with --art on at 32K context (the shapes and
    settings of the illegal memory accesses seen on an H200) take no branch on a value the threads of a program may
    read differently: ART's tail programs decide whether to read their next sub-range from the stop flag that the
    head program of the same group sets while they run. Read with a plain load per thread, two warps of one tail
    program could take different sides of that branch when the head stopped between their reads; the warp that
    read on then waited at barriers the other never reached, and took K/V page ids from shared memory that the
    other warp's copies never filled."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "ptxas")):
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    launches = _record_launches(lambda: _drive_server_decode(h_q, h_kv, d, P))
    decode = [v for k, v in launches.items() if k[0] in ("_decode_split_kernel", "_merge_splits_kernel")]
    assert any(v[2].get("ART") for v in decode)
    bad = {}
    for fn, sig, consts, opts, attrs in decode:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=dict(opts))
        found = _branches_on_racy_loads(k.asm["ttir"])
        if found:
            bad[f"{fn.fn.__name__} {dict((n, consts[n]) for n in ('ART', 'SPARSE') if n in consts)}"] = found
    assert not bad, f"branches on values each thread reads for itself from concurrently written memory: {bad}"
