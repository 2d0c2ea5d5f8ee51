"""Shared pytest fixtures."""

import os

import pytest


def patch_triton_interpreter_bf16_dot() -> bool:
    """Make ``tl.dot`` on bf16 operands correct under ``TRITON_INTERPRET=1``.

    Triton 3.6's interpreter keeps bf16 tensors as raw uint16 bits and its ``create_dot`` multiplies
    those bits as integers, so a bf16 ``tl.dot`` returns garbage on CPU (compiled GPU code is fine).
    The patch converts bf16 operands to fp32 (exact) before the product. Applied only when the
    interpreter is on; idempotent. Returns True when the patch is in place.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:
        return False
    builder = interp.InterpreterBuilder
    if getattr(builder.create_dot, "_bf16_upcast", False):
        return True
    original = builder.create_dot

    def _to_f32(handle):
        if handle.dtype.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(handle.data).astype(np.uint32) << np.uint32(16)   # exact widening
            return interp.TensorHandle(bits.view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, _to_f32(a), _to_f32(b), d, input_precision, max_num_imprecise_acc)

    create_dot._bf16_upcast = True
    create_dot._original = original      # Triton's own, for tests of code that must not rely on the patch
    builder.create_dot = create_dot
    return True


@pytest.fixture(scope="session")
def triton_interpreter_bf16_dot():
    """Session fixture for Triton-kernel tests: applies :func:`patch_triton_interpreter_bf16_dot`."""
    return patch_triton_interpreter_bf16_dot()


@pytest.fixture(scope="session")
def interpreter_bounds_check():
    """Interpreted kernels fail on any unmasked access outside their tensor arguments (tests/interp_bounds.py)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from interp_bounds import install

        install()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny-tensor tests (faster, and steady on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def seed():
    """A fresh random seed per test (torch is seeded with it); tests put it in their failure messages."""
    import torch

    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s
