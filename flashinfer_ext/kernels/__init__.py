"""Triton kernels behind :mod:`flashinfer_ext`'s wrappers, one kernel (family) per file.

Each module's docstring names the reference function in :mod:`sglang_sparse` that its output is
tested against (``tests/test_kernels_cpu.py`` under ``TRITON_INTERPRET=1``, ``tests/test_kernels_gpu.py``
on CUDA). The wrappers (``flashinfer_ext.decode``, ``.summaries``, ``.claa_score``) own all buffers;
the kernels never allocate.
"""
