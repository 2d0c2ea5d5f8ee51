"""Where a bf16 decode goes wrong under Triton's interpreter: the decode kernel (dense, dense + ART, PrHS + ART) on
bf16 and float32 pools, with the interpreter's own ``tl.dot`` and with the bf16-operand fix of tests/conftest.py,
against float64 attention over the same (rounded) inputs.

ART runs with ``tau_mag = tau_dir = 0`` (it can never stop: its output must equal the same list read without ART)
and at the server defaults (``1e-3`` / ``1e-6``, patience 2, 4 pages at least), where the stop rates of bf16 and
float32 pools are printed side by side.

Data: random SmolLM2-shaped requests (9 query / 3 KV heads, d 64, 32-token pages), and with ``--real N`` one decode
step of SmolLM2-135M-Instruct (``.models/SmolLM2-135M-Instruct``) at N prompt tokens, its first ``--layers`` layers
as requests. CPU only (it sets ``TRITON_INTERPRET=1``); minutes per configuration at the real sizes.

    PYTHONPATH=$PWD python -m benchmarks.interp_bf16_check [--real 2048 --layers 6]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"          # before flashinfer_ext's kernels are defined
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

from kernel_cases import make_pool, pool_from_kv, reference_summaries, rel_err  # noqa: E402
from sglang_sparse import prhs  # noqa: E402

NEVER = dict(art=True, tau_mag=0.0, tau_dir=0.0, patience=2, min_blocks=4)
DEFAULT = dict(art=True, tau_mag=1e-3, tau_dir=1e-6, patience=2, min_blocks=4)
SETTINGS = [("dense", dict(mode="dense")),
            ("dense+ART never", dict(mode="dense", **NEVER)),
            ("dense+ART default", dict(mode="dense", **DEFAULT)),
            ("prhs 1/4", dict(mode="prhs", budget=1 / 4, delta=0.0)),
            ("prhs 1/4+ART never", dict(mode="prhs", budget=1 / 4, delta=0.0, **NEVER))]


def _dot_switch():
    """(use_fix(bool)): toggles the interpreter's bf16 ``tl.dot`` between Triton's own and the fixed one."""
    from conftest import patch_triton_interpreter_bf16_dot
    from triton.runtime import interpreter as interp

    original = interp.InterpreterBuilder.create_dot
    patch_triton_interpreter_bf16_dot()
    fixed = interp.InterpreterBuilder.create_dot

    def use(fix: bool) -> None:
        interp.InterpreterBuilder.create_dot = fixed if fix else original
    return use


def interpreter_ops() -> None:
    """bf16 ``tl.dot``, ``+``, ``*``, ``maximum`` and the fp32 -> bf16 cast in one interpreted kernel, against torch."""
    import triton
    import triton.language as tl

    @triton.jit
    def _ops(A, B, Dot, Add, Mul, Mx, Cast, N: tl.constexpr):
        r = tl.arange(0, N)
        o = r[:, None] * N + r[None, :]
        a = tl.load(A + o)
        b = tl.load(B + o)
        tl.store(Dot + o, tl.dot(a, b))
        tl.store(Add + o, a + b)
        tl.store(Mul + o, a * b)
        tl.store(Mx + o, tl.maximum(a, b))
        tl.store(Cast + o, (a.to(tl.float32) * 1.37).to(tl.bfloat16))

    n = 16
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).bfloat16(), torch.randn(n, n, generator=g).bfloat16()
    outs = [torch.empty(n, n)] + [torch.empty(n, n, dtype=torch.bfloat16) for _ in range(4)]
    _ops[(1,)](a, b, *outs, N=n)
    refs = [a.float() @ b.float(), a + b, a * b, torch.maximum(a, b), (a.float() * 1.37).bfloat16()]
    for name, o, r in zip(("dot", "add", "mul", "maximum", "cast fp32->bf16"), outs, refs):
        diff = o.float() - r.float()
        print(f"interpreter bf16 {name:16} elements differing from torch {int((diff != 0).sum()):3d}/{n * n}  "
              f"rel err {float(diff.norm() / r.float().norm()):.2e}")


def _run(pool, cfg, P):
    """Kernel output [bs, H_q, D] (float64), stop rate, mean blocks read, and the page lists."""
    from flashinfer_ext.decode import SparseDecodeWrapper

    h_q, h_kv, d = pool.q.shape[1], pool.kc.shape[1], pool.kc.shape[2]
    kmin, kmax = reference_summaries(pool)
    w = SparseDecodeWrapper(h_q, h_kv, d, P, max_batch_size=len(pool.slots),
                            max_seq_len=int(pool.seq_lens.max()) + P, device="cpu")
    w.num_sms = 4            # a small GPU's launch shape: ART's sequential head takes the whole list
    w.plan(pool.req_to_token, pool.rows, pool.seq_lens, q_dtype=pool.q.dtype, **cfg)
    out = w.run(pool.q, pool.kc, pool.vc, kmin, kmax).double().clone()
    stop = float((w.stop_reason != 0).double().mean())
    pages = w.pages.clone() if w.select else None
    return out, stop, float(w.blocks_read.double().mean()), pages, w.num_selected.clone()


def _reference(pool, cfg, pages, num, P):
    """Float64 attention over what the plan lists (every page, or the selection), per request."""
    refs = []
    d = pool.kc.shape[2]
    for b in range(len(pool.slots)):
        q, k, v = pool.logical(b)
        if cfg["mode"] == "dense":
            refs.append(prhs.dense_attention(q, k, v, d ** -0.5))
        else:
            refs.append(prhs.sparse_attention(q, k, v, P, pages[b].long(), num[b].long(), d ** -0.5))
    return torch.stack(refs)


def check(name, make, P, use_fix, dtypes=(torch.bfloat16, torch.float32)):
    for dtype in dtypes:
        pool = make(dtype)
        for fix in ((False, True) if dtype == torch.bfloat16 else (False,)):
            use_fix(fix)
            outs = {}
            for tag, cfg in SETTINGS:
                t = time.time()
                out, stop, blocks, pages, num = _run(pool, cfg, P)
                ref = _reference(pool, cfg, pages, num, P)
                outs[tag] = out
                rel = max(rel_err(out[b], ref[b]) for b in range(out.shape[0]))
                vs = ""
                if tag.endswith("never"):
                    base = outs[tag.replace("+ART never", "")]
                    vs = f"  vs same list without ART {max(rel_err(out[b], base[b]) for b in range(out.shape[0])):.2e}"
                print(f"{name:>10} {str(dtype)[6:]:>8} dot={'fixed' if fix else 'triton':6} {tag:20} "
                      f"max rel err vs fp64 {rel:.2e}  stop rate {stop:.3f}  blocks {blocks:6.1f}{vs}  "
                      f"({time.time() - t:.0f}s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", type=int, default=0, help="SmolLM2 prompt tokens (0: random data only)")
    ap.add_argument("--layers", type=int, default=6, help="SmolLM2 layers used as requests")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    use_fix = _dot_switch()
    use_fix(False)
    interpreter_ops()
    P = 32
    lens = [1000, 700]

    def random_pool(dtype):
        return make_pool(lens, P, 9, 3, 64, 64, "cpu", torch.Generator().manual_seed(args.seed), structured=True,
                         negative=True, dtype=dtype)
    print(f"random data: lens {lens}, 9/3 heads, d 64, P {P}, seed {args.seed}")
    check("random", random_pool, P, use_fix)
    if args.real:
        from test_kernels_cpu_real_model import _decode_step_layers

        t = time.time()
        qs, ks, vs = _decode_step_layers(args.real)
        print(f"SmolLM2 decode step at {args.real} tokens: {len(qs)} layers in {time.time() - t:.0f}s; "
              f"using layers 0..{args.layers - 1}")
        qs, ks, vs = qs[:args.layers], ks[:args.layers], vs[:args.layers]

        def real_pool(dtype):
            return pool_from_kv(qs, ks, vs, P, "cpu", torch.Generator().manual_seed(args.seed), dtype=dtype,
                                max_ctx=max(k.shape[0] for k in ks) + P)
        check("smollm2", real_pool, P, use_fix)


if __name__ == "__main__":
    main()
