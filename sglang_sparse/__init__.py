"""sglang_sparse: sparse attention for long-context serving in SGLang 0.5.17.

Three mechanisms, one module each:
  * :mod:`sglang_sparse.claa` - CLAA prefill token filtering (cross-layer attention aggregation),
  * :mod:`sglang_sparse.prhs` - PrHS pre-hoc page selection for decode (page budget, and an upper bound on the dropped mass from
    per-page key min/max),
  * :mod:`sglang_sparse.art`  - ART run-time termination of the decode attention loop.

SGLang wiring: :mod:`sglang_sparse.config` (flags), :mod:`sglang_sparse.launch_server` (entry point),
:mod:`sglang_sparse.plugin` (registration in every SGLang process), :mod:`sglang_sparse.backend`
(the ``sparse`` attention backend).
"""

__version__ = "0.1.0"
