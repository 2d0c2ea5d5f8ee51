"""Patch of ``sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size``
(SGLang 0.5.17).

SGLang sizes the KV pool from ``--mem-fraction-static`` and the bytes each cached token costs
(the "cell size"). With PrHS or ART on, every physical page of every layer also carries a key
summary (min and max key per KV head, ``2 * H_kv * D`` elements per page), allocated by the
``sparse`` backend beside the pool, and with ``--prhs-select estimate`` every key its 4-bit codes
(``H_kv * D / 2`` bytes per token and layer). Adding its per-token share to the cell size keeps the pool plus
summaries inside the memory fraction the user asked for. Unchanged when PrHS and ART are off or the
model uses MLA.
"""

from sglang.srt.plugins.hook_registry import HookType

TARGET = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size"
HOOK_TYPE = HookType.AFTER


def hook(cell_size, self, kvc, num_layers, *args, **kwargs):
    from sglang_sparse.config import from_server_args
    from sglang_sparse.sparse_decode import summary_bytes_per_token

    cfg = from_server_args(kvc.server_args)
    if not (cfg.prhs.enabled or cfg.art.enabled) or kvc.use_mla_backend or not cell_size:
        return cell_size
    import torch
    from sglang.srt.runtime_context import get_parallel

    model_config = kvc.model_config
    leaders = -(-num_layers // (cfg.prhs.layers_per_selection if cfg.prhs.enabled else 1))
    extra = summary_bytes_per_token(leaders, model_config.get_num_kv_heads(get_parallel().attn_tp_size),
                                    model_config.head_dim, torch._utils._element_size(kvc.kv_cache_dtype),
                                    kvc.server_args.page_size,
                                    key_codes=cfg.prhs.enabled and cfg.prhs.select == "estimate")
    return cell_size + extra
