"""bf16 decode under Triton's interpreter: what the kernels compute on a bf16 pool, and what the interpreted CPU server
(``SGLANG_SPARSE_INTERPRET=1``, :class:`sglang_sparse.backend.SparseTorchNativeDecodeBackend`) does about the
interpreter's bf16 arithmetic.

Triton 3.6's interpreter keeps bf16 values as their raw 16 bits; its ``tl.dot`` (and bf16 ``+``/``*``) work on
those integers, so a bf16 ``tl.dot`` is meaningless on CPU while the compiled GPU code is right. The kernel tests
fix the dot for themselves (conftest's ``triton_interpreter_bf16_dot``); a server has no such fixture, so its
interpreted decode runs the kernels on float32 copies. These tests check, at SmolLM2's shapes (9 query / 3 KV
heads, d 64, 32-token pages) with page bounds far below zero:

* with the interpreter's own ``tl.dot``, the interpreted backend's float32 detour gives the float64 attention (and
  the same bf16 run without the detour does not: the reason the detour exists);
* with the fixed dot, the kernel on the bf16 pool: ART that cannot stop (``tau_mag = tau_dir = 0``) gives the
  output of the same list read without ART, and both the float64 reference.
"""

import math

import pytest

from kernel_cases import art_p, every_page, fresh_seed, interpreter_device, make_pool, reference_summaries, rel_err, sel

DEVICE = interpreter_device("tests/test_kernels_cpu_bf16.py")   # before flashinfer_ext's kernels are defined

pytestmark = pytest.mark.usefixtures("triton_interpreter_bf16_dot", "interpreter_bounds_check")

H_Q, H_KV, D, P = 9, 3, 64, 32
NEVER = art_p(0.0, 0.0, patience=2, min_blocks=4)        # ART that cannot stop
# (name, plan keywords): dense, dense + ART (every page in bound order), PrHS 1/4, PrHS 1/4 + ART
PLANS = [("dense", dict()), ("dense", dict(pages=every_page(), art=NEVER)), ("prhs", dict(pages=sel(1 / 4, 0.0))),
         ("prhs", dict(pages=sel(1 / 4, 0.0), art=NEVER))]


@pytest.fixture
def triton_bf16_dot():
    """Triton's own interpreter ``tl.dot`` for one test (what a server process runs with), then the fixed one."""
    from triton.runtime import interpreter as interp

    fixed = interp.InterpreterBuilder.create_dot
    interp.InterpreterBuilder.create_dot = getattr(fixed, "_original", fixed)
    yield
    interp.InterpreterBuilder.create_dot = fixed


def _pool(seed):
    import torch

    return make_pool([900, 610], P, H_Q, H_KV, D, D, DEVICE, torch.Generator().manual_seed(seed), structured=True,
                     negative=True)


def _reference(pool, w, cfg):
    """Float64 attention over what ``w``'s last run listed (every page, or its selection), [bs, H_q, D]."""
    import torch

    from sglang_sparse import prhs

    outs = []
    for b in range(len(pool.slots)):
        q, k, v = pool.logical(b)
        if cfg.get("pages") is None:
            outs.append(prhs.dense_attention(q, k, v, 1 / math.sqrt(D)))
        else:
            outs.append(prhs.sparse_attention(q, k, v, P, w.pages[b].long(), w.num_selected[b].long(),
                                              1 / math.sqrt(D)))
    return torch.stack(outs)


def _wrapper(pool):
    from flashinfer_ext.decode import SparseDecodeWrapper

    w = SparseDecodeWrapper(H_Q, H_KV, D, P, max_batch_size=len(pool.slots), max_seq_len=1024, device=DEVICE)
    w.num_sms = 4            # a small GPU's launch shape: ART's sequential head takes the whole list
    return w


def _check_never_stops(w, tag):
    import torch

    assert bool((w.stop_reason == 0).all()), f"{tag}: ART stopped with tau 0: {w.stop_reason.tolist()}"
    n = w.num_selected.repeat_interleave(H_Q // H_KV, dim=1)
    assert torch.equal(w.blocks_read.long(), n.long()), f"{tag}: blocks_read {w.blocks_read.tolist()}"


def test_interpreted_server_decode_runs_bf16_in_float32(triton_bf16_dot):
    """The interpreted backend's decode on a bf16 pool, through Triton's own interpreter dot: float32 attention."""
    import types

    import torch

    from sglang_sparse.backend import _interpret_in_float32

    seed = fresh_seed()
    pool = _pool(seed)
    kmin, kmax = reference_summaries(pool)
    plain = _wrapper(pool)
    backend = types.SimpleNamespace(_q_dtype=torch.bfloat16, decode_wrapper=_wrapper(pool), decode_wrapper_kept=None,
                                    audit=None)
    _interpret_in_float32(backend)
    w = backend.decode_wrapper
    for mode, cfg in PLANS:
        tag = f"seed={seed} {mode} {cfg}"
        w.plan(pool.req_to_token, pool.rows, pool.seq_lens, q_dtype=backend._q_dtype, **cfg)
        out = w.run(pool.q, pool.kc, pool.vc, kmin, kmax)
        assert out.dtype == torch.bfloat16, f"{tag}: output dtype {out.dtype}"
        ref = _reference(pool, w, cfg)
        for b in range(len(pool.slots)):
            e = rel_err(out[b], ref[b])
            assert e <= 5e-3, f"{tag} b={b}: rel err {e:.2e} against float64 (bf16 output rounding only)"
        if cfg.get("art"):
            _check_never_stops(w, tag)
    # the same bf16 pool through the kernels as they are: what the detour avoids
    plain.plan(pool.req_to_token, pool.rows, pool.seq_lens)
    out = plain.run(pool.q, pool.kc, pool.vc)
    ref = _reference(pool, plain, dict())
    e = rel_err(out[0], ref[0])
    assert not e < 0.5, (f"seed={seed}: Triton's interpreter now computes a bf16 decode (rel err {e:.2e}); "
                         "the interpreted backend's float32 detour may be unnecessary")


def test_art_that_cannot_stop_equals_no_art_bf16():
    """The kernel on a bf16 pool (interpreter dot fixed): ART with tau 0 reads every listed page, one by one in its
    sequential head, and its output equals the same list read by the split kernel without ART (both within bf16
    rounding of the float64 reference)."""
    seed = fresh_seed()
    pool = _pool(seed)
    kmin, kmax = reference_summaries(pool)
    w = _wrapper(pool)
    outs = {}
    for mode, cfg in PLANS:
        tag = f"seed={seed} {mode} {cfg}"
        w.plan(pool.req_to_token, pool.rows, pool.seq_lens, **cfg)
        out = w.run(pool.q, pool.kc, pool.vc, kmin, kmax).clone()
        outs[(mode, cfg.get("art") is not None)] = out
        ref = _reference(pool, w, cfg)
        for b in range(len(pool.slots)):
            # the interpreter truncates fp32 -> bf16 casts (p before the PV product, the output)
            e = rel_err(out[b], ref[b])
            assert e <= 1e-2, f"{tag} b={b}: rel err {e:.2e} against float64"
        if cfg.get("art"):
            _check_never_stops(w, tag)
    for mode in ("dense", "prhs"):
        for b in range(len(pool.slots)):
            e = rel_err(outs[(mode, True)][b], outs[(mode, False)][b])
            assert e <= 5e-3, f"seed={seed} {mode} b={b}: ART (never stopping) vs no ART rel err {e:.2e}"
