"""Out-of-bounds detection for Triton kernels run in the interpreter (``TRITON_INTERPRET=1``).

On a GPU an unmasked load or store outside every tensor is an illegal memory access that surfaces
later, somewhere else (a cuBLAS call failing, say); in the interpreter it reads or writes host memory
silently. :func:`install` wraps the interpreter so that every launch records the byte ranges of the
storages of its tensor arguments, and every load, store and atomic checks that each address it
touches with its mask on lies inside one of them; otherwise it raises ``AssertionError`` naming the
access and the kernel.
"""

from __future__ import annotations

import numpy as np

_state = {"ranges": None, "kernel": "?"}
_installed = False


def _collect(args) -> np.ndarray:
    spans = []

    def visit(a):
        if isinstance(a, (tuple, list)):
            for x in a:
                visit(x)
            return
        base = getattr(a, "base", None)       # triton's TensorWrapper
        t = a if hasattr(a, "untyped_storage") else base if hasattr(base, "untyped_storage") else None
        if t is not None:
            st = t.untyped_storage()
            spans.append((st.data_ptr(), st.data_ptr() + st.nbytes()))

    visit(args)
    return np.array(sorted(spans), dtype=np.uint64).reshape(-1, 2)


def _check(ptrs, mask, what: str) -> None:
    from triton.runtime import interpreter as ti

    ranges = _state["ranges"]
    if ranges is None:
        return
    addr = np.asarray(ptrs.data, dtype=np.uint64)
    if mask is not None:
        addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)]
    addr = addr.reshape(-1)
    if addr.size == 0:
        return
    size = np.uint64(ti._get_np_dtype(ptrs.get_element_ty()).itemsize)
    if ranges.shape[0] == 0:
        bad = addr
    else:
        i = np.searchsorted(ranges[:, 0], addr, side="right").astype(np.int64) - 1
        ok = i >= 0
        j = np.clip(i, 0, None)
        ok &= (addr >= ranges[j, 0]) & (addr + size <= ranges[j, 1])
        bad = addr[~ok]
    if bad.size:
        raise AssertionError(f"{_state['kernel']}: {what} of {bad.size} element(s) outside every tensor "
                             f"argument (first address {int(bad[0]):#x})")


def install() -> None:
    """Patch the interpreter once per process (inert when kernels are compiled for a GPU)."""
    global _installed
    if _installed:
        return
    from triton.runtime import interpreter as ti

    grid_init = ti.GridExecutor._init_args_hst

    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = grid_init(self, args_dev, kwargs)
        _state["ranges"] = _collect([list(args_hst), list(kwargs_hst.values())])
        _state["kernel"] = getattr(self.fn, "__name__", "?")
        return args_hst, kwargs_hst

    B = ti.InterpreterBuilder
    load, store = B.create_masked_load, B.create_masked_store
    rmw, cas = B.create_atomic_rmw, B.create_atomic_cas

    def masked_load(self, ptrs, mask, other, *a):
        _check(ptrs, mask, "load")
        return load(self, ptrs, mask, other, *a)

    def masked_store(self, ptrs, value, mask, *a):
        _check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, *a)

    def atomic_rmw(self, op, ptr, val, mask, *a):
        _check(ptr, mask, "atomic")
        return rmw(self, op, ptr, val, mask, *a)

    def atomic_cas(self, ptr, cmp, val, *a):
        _check(ptr, None, "atomic_cas")
        return cas(self, ptr, cmp, val, *a)

    ti.GridExecutor._init_args_hst = init_args_hst
    B.create_masked_load, B.create_masked_store = masked_load, masked_store
    B.create_atomic_rmw, B.create_atomic_cas = atomic_rmw, atomic_cas
    _installed = True
