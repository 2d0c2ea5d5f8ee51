"""Quality evaluation: RULER-style retrieval tasks (:mod:`.tasks`), the SGLang frontend-language harness
(:mod:`.harness`, ``python -m benchmarks.eval``) and the CPU reference of the sparse mechanisms on a
transformers model (:mod:`.cpu_reference`). See README.md in this directory."""
