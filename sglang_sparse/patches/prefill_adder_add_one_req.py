"""Patch of ``sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req`` (SGLang 0.5.17).

SGLang fills a prefill batch request by request up to ``--chunked-prefill-size`` tokens and splits the
request that does not fit into chunks, the first of them in this batch. CLAA filters only a prompt that is
prefilled whole (its scores need every prompt token in one forward), so a long prompt arriving behind
others ran dense whenever it landed on the batch's budget edge: with 32 requests of 4-7K tokens arriving
together, 2-7 of 10 were split. With ``--sparse-prefill claa`` this hook asks
``sglang_sparse.claa_prefill.defer_whole_prompt`` first; when it says so, the request is skipped
(``AddReqResult.CONTINUE``: it stays in the waiting queue and SGLang goes on with the next one) and a later
batch, whose budget it fits, prefills it whole. The hook returns the original's result unchanged otherwise,
and at once when CLAA is off.
"""

from sglang.srt.plugins.hook_registry import HookType

TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req"
HOOK_TYPE = HookType.AROUND

_cfg = None


def hook(original, self, req, *args, **kwargs):
    global _cfg
    if _cfg is None:
        from sglang.srt.runtime_context import get_server_args

        from sglang_sparse.config import from_server_args

        _cfg = from_server_args(get_server_args())
    if _cfg.claa.enabled:
        from sglang.srt.managers.schedule_policy import AddReqResult
        from sglang.srt.runtime_context import get_server_args

        from sglang_sparse.claa_prefill import defer_whole_prompt

        if defer_whole_prompt(req, _cfg.claa, len(self.can_run_list), self.rem_chunk_tokens, self.page_size,
                              get_server_args().chunked_prefill_size):
            return AddReqResult.CONTINUE
    return original(self, req, *args, **kwargs)
