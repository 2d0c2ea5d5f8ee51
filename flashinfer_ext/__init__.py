"""FlashInfer-style wrappers around Triton kernels for sglang_sparse's mechanisms.

* :mod:`flashinfer_ext.decode`: ``SparseDecodeWrapper`` (PrHS page selection + split-KV paged decode
  + ART; ``plan()`` outside CUDA graphs, graph-capturable ``run()``).
* :mod:`flashinfer_ext.params`: what ``plan()`` takes (``PageSelectParams``, ``ArtParams``,
  ``LaunchTuning``) and ``page_budget``; standard library only.
* :mod:`flashinfer_ext.summaries`: per-physical-page key min/max (``PageSummaries``,
  ``update_page_summaries``), updated after every KV write.
* :mod:`flashinfer_ext.claa_score`: ``ClaaWindowScorer``, CLAA's window scoring of one layer into the
  cross-layer max.
* :mod:`flashinfer_ext.kernels`: the Triton kernels, one file each, each naming its reference in
  ``sglang_sparse`` (claa / prhs / art).

Nothing is imported here, so that importing the package does not define the kernels (tests choose
Triton's interpreter before the kernels are defined).
"""
