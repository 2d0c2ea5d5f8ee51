#!/usr/bin/env bash
# Build a CPU-only Python environment that can import and serve SGLang 0.5.17 and run this
# project's tests. Used by CI (.ci/run) and by developers on machines without a GPU.
#
#   bash ci/setup_cpu_venv.sh [VENV]        (default: $SGLANG_SPARSE_VENV or .venv-cpu)
#
# What it does, in order:
#   1. a venv with the CPU build of torch (pip finds the local torch 2.13.0+cpu file; a constraints
#      file keeps every later install from swapping in a CUDA torch, another triton or nvidia-* wheels);
#   2. the pure-Python packages SGLang's server, engine and frontend import;
#   3. sglang and torchvision with --no-deps (their declared deps are CUDA wheels);
#   4. two CPU-only adaptations that live in the venv, never in the project:
#        - torchvision's PyPI wheel is a CUDA build whose fake-op registration crashes on CPU torch;
#          one decorator is guarded;
#        - SGLang's CPU engine imports a few helpers from sgl_kernel, whose PyPI wheel is CUDA-only;
#          ci/sgl_kernel_cpu/ is a pure-torch stand-in, copied into the venv;
#   5. this project in editable mode (registers the sglang.srt.plugins entry point).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(realpath -m "${1:-${SGLANG_SPARSE_VENV:-$ROOT/.venv-cpu}}")"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
T0=$(date +%s); step() { echo "[setup $(( $(date +%s) - T0 ))s] $*"; }

if [ -f "$VENV/.ready" ] && [ "$(cat "$VENV/.ready")" = "$(sha1sum "$0" ci/sgl_kernel_cpu/__init__.py pyproject.toml 2>/dev/null | sha1sum)" ]; then
  step "reusing $VENV"; exit 0
fi
cd "$ROOT"
step "venv at $VENV with $($PY --version)"
rm -rf "$VENV"; "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
CONS="$VENV/constraints.txt"
printf 'torch==2.13.0\ntriton==3.6.0\nnumpy<2.4\n' > "$CONS"
"${PIP[@]}" install torch==2.13.0

step "pure-Python dependencies"
"${PIP[@]}" install -c "$CONS" \
  triton==3.6.0 numpy==2.3.5 transformers==5.12.1 openai==2.6.1 xgrammar==0.2.1 soundfile==0.13.1 \
  orjson==3.13.0 psutil==7.2.2 pybase64==1.5.1 requests==2.34.2 packaging==26.3 pillow==13.0.0 tqdm==4.70.1 \
  ipython==9.18.1 pydantic==2.14.3 aiohttp==3.14.5 msgspec==0.22.0 pyzmq==27.3.0 einops==0.8.2 uvloop==0.23.0 \
  uvicorn==0.54.0 fastapi==0.165.0 setproctitle==1.3.8 jsonschema==4.26.0 python-multipart==0.0.34 \
  partial-json-parser==0.2.1.1.post7 sentencepiece==0.2.3 compressed-tensors==0.20.0 gguf==0.19.0 dill==0.4.1 \
  pytest==8.4.2 matplotlib==3.10.7 setuptools wheel

step "sglang 0.5.17 and torchvision without their CUDA dependencies"
"${PIP[@]}" install --no-deps sglang==0.5.17 torchvision==0.28.0 2>&1 | { grep -v "dependency resolver\|requires\|incompatible" || true; }
SP=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' \
  "$SP/torchvision/_meta_registrations.py"
rm -rf "$SP/sgl_kernel"; cp -r ci/sgl_kernel_cpu "$SP/sgl_kernel"

step "sglang_sparse (editable)"
"${PIP[@]}" install --no-deps --no-build-isolation -e .
if "$VENV/bin/python" -m pip list 2>/dev/null | grep -qiE '^(nvidia-|sglang-kernel|flashinfer)'; then
  echo "[setup] a CUDA package was installed; refusing to continue" >&2; exit 1
fi
"$VENV/bin/python" -c "import torch, sglang, sglang_sparse; print('torch', torch.__version__, '| sglang', sglang.__version__, '| sglang_sparse', sglang_sparse.__version__)"
sha1sum "$0" ci/sgl_kernel_cpu/__init__.py pyproject.toml | sha1sum > "$VENV/.ready"
step "done"
