"""Patch of ``sglang.srt.utils.common.support_triton`` (SGLang 0.5.17).

SGLang decides by the attention backend's *name* whether to compute extend positions and to fill
``req_to_token`` with Triton kernels: every name except ``torch_native`` and ``intel_amx`` gets
Triton. On a CPU-only host (``SGLANG_USE_CPU_ENGINE=1``) the ``sparse`` backend is built on the
torch-native backend, and Triton has no CPU driver, so it must answer like ``torch_native`` there.
On GPUs the answer is unchanged.
"""

from sglang.srt.plugins.hook_registry import HookType

TARGET = "sglang.srt.utils.common.support_triton"
HOOK_TYPE = HookType.AROUND


def hook(original, backend, *args, **kwargs):
    if backend == "sparse":
        from sglang.srt.utils import is_cpu

        if is_cpu():
            return False
    return original(backend, *args, **kwargs)
