"""What runs in every SGLang process that serves with sglang_sparse.

SGLang starts its schedulers with ``multiprocessing`` in *spawn* mode: each is a fresh interpreter,
so registrations made only in the launching process are lost. :func:`register` is therefore
reached three ways, and is idempotent:

1. SGLang's plugin entry point (``[project.entry-points."sglang.srt.plugins"]`` in pyproject.toml),
   which ``sglang.srt.plugins.load_plugins()`` calls in the launcher and at the start of every
   scheduler process - this also makes ``--attention-backend sparse`` work from
   ``python -m sglang.launch_server`` once the package is installed;
2. :func:`run_scheduler_process`, the scheduler entry our launcher hands to SGLang, which covers
   an uninstalled checkout on ``PYTHONPATH``;
3. the launcher itself, before SGLang parses its flags.

Registering is inert for other backends: it adds the name ``sparse`` to SGLang's choices and
registry and installs the patches in :mod:`sglang_sparse.patches`, which change nothing unless ``sparse`` is
the backend in use.
"""

from __future__ import annotations

import logging

from sglang_sparse.config import BACKEND_NAME

logger = logging.getLogger(__name__)
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    from sglang_sparse import patches

    patches.install_all()
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    register_attention_backend(BACKEND_NAME)(_create_backend)
    _registered = True
    logger.debug("sglang_sparse registered the '%s' attention backend", BACKEND_NAME)


def _create_backend(model_runner):
    """Registry factory; imports the backend (and FlashInfer) only in processes that build one."""
    from sglang_sparse.backend import create_sparse_backend

    return create_sparse_backend(model_runner)


def is_registered() -> bool:
    return _registered


def run_scheduler_process(*args, **kwargs):
    """SGLang's scheduler entry, preceded by our registration (runs in the spawned process)."""
    register()
    from sglang.srt.managers.scheduler import run_scheduler_process as stock

    return stock(*args, **kwargs)
