"""Every Triton kernel launch of flashinfer_ext's wrappers compiles for the H100 (sm_90), without a GPU.

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
       torch.float16: "fp16"}


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
    update_page_summaries(kmin, kmax, kc[:100], torch.arange(100), P)
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
            "_claa_row_stats_kernel", "_claa_colsum_kernel", "_claa_pool_max_kernel"} <= names, names
    failures = []
    for key, (fn, sig, consts, opts, attrs) in launches.items():
        try:
            triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=dict(opts))
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{key[0]} {dict(key[2])} {opts}: {type(exc).__name__}: {str(exc)[:500]}")
    assert not failures, "\n".join(failures)
