"""Version-guarded patches of SGLang functions.

Everything sglang_sparse changes inside SGLang that SGLang's own extension points (the attention
backend registry, ``add_attention_backend_choices``, the plugin entry point) do not cover lives
here: one small module per patched symbol, named after it. Each module states the symbol and the
SGLang version it was written against, and :func:`install_all` refuses to patch any other
version, so that an upgrade of SGLang fails at start-up instead of misbehaving later.

Patches go through SGLang's ``HookRegistry``, which also rebinds stale ``from X import Y`` copies.
"""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger(__name__)

SGLANG_VERSION = "0.5.17"

# Module names under sglang_sparse/patches/, in installation order.
PATCHES = ("support_triton", "pool_configurator_cell_size", "schedule_batch_prepare_for_extend",
           "prefill_adder_add_one_req", "forward_batch_init_new")

_installed = False


class SGLangVersionError(RuntimeError):
    pass


def check_sglang_version(symbol: str) -> None:
    import sglang

    found = getattr(sglang, "__version__", "unknown")
    if found != SGLANG_VERSION:
        raise SGLangVersionError(
            f"sglang_sparse patches {symbol} of SGLang {SGLANG_VERSION}, but SGLang {found} is installed; "
            f"install sglang=={SGLANG_VERSION} or update sglang_sparse/patches/")


def install_all() -> list[str]:
    """Register every patch with SGLang's HookRegistry and apply it (idempotent)."""
    global _installed
    from sglang.srt.plugins.hook_registry import HookRegistry

    targets = []
    for name in PATCHES:
        module = importlib.import_module(f"{__name__}.{name}")
        check_sglang_version(module.TARGET)
        targets.append(module.TARGET)
        if not _installed:
            HookRegistry.register(module.TARGET, module.hook, module.HOOK_TYPE)
    _installed = True
    HookRegistry.apply_hooks()
    return targets
