"""Patch of ``sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new`` (SGLang 0.5.17).

CLAA decides per request in the scheduler (``ScheduleBatch.prepare_for_extend``, patched in
``schedule_batch_prepare_for_extend.py``) and stores the kept count on the request
(``sglang_sparse.claa_prefill.KEPT_ATTR``); the model runner sees only the ForwardBatch, which carries no
per-request field for it. ``ForwardBatch.init_new`` is where both meet: it builds the ForwardBatch from the
ScheduleBatch for the model runner whose attention backend will run it. After it, this hook starts the
``sparse`` backend's per-forward metadata with the kept counts of the batch's requests (in batch order).
It returns at once unless CLAA is on, the batch is a prefill and the model runner's backend is ours.
"""

from sglang.srt.plugins.hook_registry import HookType

TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"
HOOK_TYPE = HookType.AFTER


def hook(forward_batch, cls, batch, model_runner, *args, **kwargs):
    from sglang_sparse.backend import SparseBackendMixin

    backend = getattr(model_runner, "attn_backend", None)
    if isinstance(backend, SparseBackendMixin) and backend.claa is not None \
            and forward_batch.forward_mode.is_extend():
        from sglang_sparse.claa_prefill import kept_counts

        backend.start_forward(forward_batch, claa_kept=kept_counts(batch))
    return forward_batch
