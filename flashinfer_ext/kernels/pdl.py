"""Programmatic dependent launch (PDL, Hopper and later) for the kernels of one decode step.

Launched with ``launch_pdl=True``, a kernel may start while the kernel before it in the stream is
still running. Each of our kernels therefore calls :func:`_pdl_wait` (``griddepcontrol.wait``: the
previous kernel has finished and its writes are visible) before it reads anything that kernel may
have written; what it does before (its prologue: loading the query and what ``plan()`` wrote before
the step) overlaps the previous kernel's tail and the launch latency. A kernel that calls
:func:`_pdl_trigger` (``griddepcontrol.launch_dependents``) lets the next kernel's programs start their
prologues early. Since every kernel waits before it finishes, waiting on the previous kernel means
waiting on all earlier ones. ``PDL=False`` compiles neither instruction (the Triton interpreter knows
neither), and a launch without ``launch_pdl`` is ordered as usual.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    if PDL:
        gdc_wait()


@triton.jit
def _pdl_trigger(PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
