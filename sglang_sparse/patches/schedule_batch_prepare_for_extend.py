"""Patch of ``sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend`` (SGLang 0.5.17).

After SGLang has built a prefill batch, CLAA decides which of its requests are filtered
(``sglang_sparse.claa_prefill.mark_batch``): those get ``req.skip_radix_cache_insert = True``, so
SGLang frees their KV at the end instead of inserting it into the radix tree, and their kept
counts are stored on the requests (read when the ForwardBatch is built: ``forward_batch_init_new.py``).
This is the one place where the scheduler's view of a request (prefix match, chunking, sampling
parameters, logprob requests) is available. The hook returns at once unless ``--sparse-prefill claa``
is on.
"""

from sglang.srt.plugins.hook_registry import HookType

TARGET = "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend"
HOOK_TYPE = HookType.AFTER

_cfg = None


def hook(result, self, *args, **kwargs):
    global _cfg
    if _cfg is None:
        from sglang.srt.runtime_context import get_server_args

        from sglang_sparse.config import from_server_args

        _cfg = from_server_args(get_server_args())
    if not _cfg.claa.enabled:
        return result
    from sglang.srt.runtime_context import get_server_args

    from sglang_sparse.claa_prefill import mark_batch

    mark_batch(self, _cfg.claa, get_server_args().page_size or 1)
    return result
