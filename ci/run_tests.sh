#!/usr/bin/env bash
# The project's test command (README "Testing"): build/reuse the CPU venv, then run every test.
#   bash ci/run_tests.sh [pytest args]
# CPU tests run as they are; Triton kernel tests run in their own process under TRITON_INTERPRET=1
# (the interpreter must be chosen before triton is imported); GPU tests are skipped without CUDA.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${SGLANG_SPARSE_VENV:-$ROOT/.venv-cpu}"
T0=$(date +%s)
bash ci/setup_cpu_venv.sh "$VENV"
PY="$VENV/bin/python"
export SGLANG_USE_CPU_ENGINE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# SmolLM2 (the quality model): converted from its PyPI wheel into .models/ (git-ignored) by
# tests/test_eval_tasks.py, which then answers one 1K needle sample with it; the interpreter run below then
# finds it for tests/test_kernels_cpu_real_model.py (the decode kernels on its data, ~3.5 min).
# SGLANG_SPARSE_SMOLLM2_TEST=0 skips both.
export SGLANG_SPARSE_SMOLLM2_TEST="${SGLANG_SPARSE_SMOLLM2_TEST:-1}"
# The Triton-interpreter tests are collected separately (see above).
INTERP=$(ls tests/test_kernels_cpu*.py 2>/dev/null || true)
IGNORE=(); for f in $INTERP; do IGNORE+=(--ignore "$f"); done
echo "[tests] pytest (CPU)"
"$PY" -m pytest -q -ra --durations=8 "${IGNORE[@]}" "$@" tests
if [ -n "$INTERP" ]; then
  echo "[tests] pytest (Triton kernels under TRITON_INTERPRET=1)"
  TRITON_INTERPRET=1 "$PY" -m pytest -q -ra --durations=8 "$@" $INTERP
fi
echo "[tests] all passed in $(( $(date +%s) - T0 ))s"
