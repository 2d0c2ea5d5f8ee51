"""CPU stand-in for ``sgl_kernel`` (CI only; copied into the CPU venv by ci/setup_cpu_venv.sh).

SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) imports a handful of ``*_cpu`` helpers from
``sgl_kernel`` at import time, and the PyPI wheel of ``sglang-kernel`` only ships CUDA binaries.
On a CPU without AMX every layer runs its ``forward_native`` path, so the only helper the serving
path calls is ``assign_req_to_token_pool_cpu``; the rest belong to speculative decoding and KV
moves, which this stand-in refuses with a clear error.
"""

__version__ = "0.0.0+cpu-standin"


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset,
                                 out_cache_loc, pool_len=None):
    """req_to_token[r, start:end] = the next (end - start) entries of out_cache_loc, per request."""
    cursor = 0
    rows = zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist())
    for row, start, end in rows:
        n = end - start
        if n > 0:
            req_to_token[row, start:end] = out_cache_loc[cursor:cursor + n].to(req_to_token.dtype)
        cursor += n


def _refuse(name):
    def refused(*args, **kwargs):
        raise NotImplementedError(f"{name} is not available in the CPU stand-in of sgl_kernel")
    refused.__name__ = name
    return refused


for _name in ("copy_all_layer_kv_cache_cpu", "assign_extend_cache_locs_cpu",
              "assign_draft_cache_locs_contiguous_cpu", "build_tree_kernel_efficient_cpu",
              "verify_tree_greedy_cpu", "rotate_input_ids_cpu", "fill_accept_out_cache_loc_cpu",
              "fill_bonus_tokens_cpu"):
    globals()[_name] = _refuse(_name)
