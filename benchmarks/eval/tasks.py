"""RULER-style retrieval tasks, deterministic from a seed, fitted to a token length with the model's tokenizer.

Tasks (see README.md next to this file for the prompts):

``single_needle``      one "special magic number" (7 digits) for one key, hidden in the haystack.
``multi_key``          the queried needle plus 3 needles with other keys and other numbers (distractors).
``multi_value``        4 numbers for the same key; the answer must contain all four.
``kv_retrieval``       a JSON-like object of UUID keys and UUID values (the object *is* the context); one key asked.
``variable_tracking``  a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... hidden in the haystack; the answer
                       must name every variable that ends up holding the value.

A sample is a pure function of ``(seed, task, length, index)`` (and the haystack and tokenizer): the same
arguments always give the same text. ``length`` is the token count of the task text (user prompt plus answer
prefix) plus ``reserve`` tokens for a chat template's wrapper; the context is grown until one more unit (a word,
or one key-value pair) would pass ``length``.

Scoring is exact match (:func:`score`): 1 if the model output holds the planted answer as described per task,
else 0.
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from .haystack import HAYSTACKS, haystack_fingerprint, haystack_words

TASKS = ("single_needle", "multi_key", "multi_value", "kv_retrieval", "variable_tracking")
DEFAULT_LENGTHS = (1024, 2048, 4096, 7168)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

NUM_DISTRACTOR_KEYS = 3      # multi_key
NUM_VALUES = 4               # multi_value
VT_HOPS = 4                  # variable_tracking: 1 + hops variables in the chain

_NUMBER_RE = re.compile(r"(?<!\d)\d{7}(?!\d)")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_VAR_RE = re.compile(r"(?<![A-Za-z])[A-Z]{5}(?![A-Za-z])")

_ADJECTIVES = [
    "amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lively",
    "mellow", "nimble", "odd", "pale", "quiet", "rapid", "silent", "tidy", "upper", "vivid", "wary", "young",
    "zesty", "bold", "crisp", "dim", "early", "fuzzy", "grand", "humble", "ivory", "lucky", "misty", "noble",
    "proud", "rusty", "shiny", "tall",
]
_NOUNS = [
    "anchor", "badger", "candle", "dolphin", "ember", "falcon", "garden", "harbor", "island", "jacket", "kettle",
    "lantern", "meadow", "needle", "orchid", "pebble", "quill", "raven", "saddle", "thimble", "umbrella", "valley",
    "walnut", "yarrow", "zephyr", "beacon", "canyon", "dagger", "engine", "fossil", "glacier", "hammock",
    "iceberg", "juniper", "kiosk", "ladder", "mosaic", "nectar", "otter", "parrot",
]


# ------------------------------------------------------------------------------------------------ tokenizer
def token_counter(tokenizer) -> Callable[[str], int]:
    """``text -> number of tokens`` for a Hugging Face tokenizer, a ``tokenizers.Tokenizer``, or a callable."""
    if callable(tokenizer) and not hasattr(tokenizer, "encode"):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)  # HF fast tokenizer: count with its Rust tokenizer
    if backend is not None:
        return lambda text: len(backend.encode(text, add_special_tokens=False).ids)
    try:  # Hugging Face (transformers) tokenizer
        tokenizer.encode("a", add_special_tokens=False)
        return lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        pass
    enc = tokenizer.encode("a")
    if hasattr(enc, "ids"):  # tokenizers.Tokenizer
        return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)
    return lambda text: len(tokenizer.encode(text))


# ------------------------------------------------------------------------------------------------ sample
@dataclass
class TaskSample:
    """One prompt. ``prompt`` is the user message; the model's turn starts with ``answer_prefix``."""

    task: str
    length: int                 # target tokens
    index: int
    seed: int
    depth: Optional[float]      # requested needle depth (fraction of the context), None if not applicable
    prompt: str
    answer_prefix: str
    answers: List[str]          # what the output must contain (see score())
    max_new_tokens: int
    num_tokens: int             # measured: tokens(prompt) + tokens(answer_prefix) + reserve
    haystack: str
    meta: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self, with_text: bool = True) -> Dict[str, Any]:
        d = asdict(self)
        if not with_text:
            d.pop("prompt")
        return d

    @property
    def sample_id(self) -> str:
        return f"{self.task}/{self.length}/{self.seed}/{self.index}"


def _rng(seed: int, task: str, length: int, index: int) -> random.Random:
    # the label is part of every sample's seed: kept as it was so that the samples (and results) stay comparable
    return random.Random(f"sglang_sparse.eval:{seed}:{task}:{length}:{index}")


def _distinct(rng: random.Random, k: int, make: Callable[[random.Random], str]) -> List[str]:
    out: List[str] = []
    while len(out) < k:
        x = make(rng)
        if x not in out:
            out.append(x)
    return out


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _varname(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _depth_for(index: int, depths: Sequence[float]) -> float:
    return float(depths[index % len(depths)])


# ------------------------------------------------------------------------------------------------ contexts
def _snap_to_sentence(words: List[str], pos: int) -> int:
    """Nearest word boundary at or after a sentence end (so needles do not split sentences)."""
    n = len(words)
    if pos <= 0 or n == 0:
        return 0
    if pos >= n:
        return n
    for dist in range(0, 64):
        for p in (pos - dist, pos + dist):
            if 0 < p <= n and words[p - 1].endswith((".", "!", "?")):
                return p
    return pos


def _insert(words: List[str], items: List[tuple]) -> str:
    """``items``: (fraction in [0, 1], sentence); sentences go in at sentence ends, in the given order when equal."""
    n = len(words)
    placed = sorted(((_snap_to_sentence(words, round(f * n)), i, s) for i, (f, s) in enumerate(items)))
    out: List[str] = []
    cur = 0
    for pos, _, s in placed:
        out.extend(words[cur:pos])
        out.append(s)
        cur = max(cur, pos)
    out.extend(words[cur:])
    return " ".join(out)


def _fit(build: Callable[[int], tuple], count: Callable[[str], int], budget: int, hi: int) -> tuple:
    """Largest n in [0, hi] with count(text of build(n)) <= budget (binary search; build is monotone in n)."""
    lo_n, hi_n = 0, hi
    best = build(0)
    if count(best[0]) > budget:
        raise ValueError(f"the task text without any haystack already exceeds {budget} tokens")
    while lo_n < hi_n:
        mid = (lo_n + hi_n + 1) // 2
        cand = build(mid)
        if count(cand[0]) <= budget:
            lo_n, best = mid, cand
        else:
            hi_n = mid - 1
    return best


# ------------------------------------------------------------------------------------------------ tasks
_NIAH_INTRO_ONE = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                   "I will quiz you about the number afterwards.")
_NIAH_INTRO_MANY = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                    "I will quiz you about the numbers afterwards.")


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _make_niah(task: str, rng: random.Random, depth: float, words_for: Callable[[int], List[str]],
               count, budget: int, target: int) -> tuple:
    if task == "single_needle":
        keys = _distinct(rng, 1, _key)
        values = [_number(rng)]
        items = [(depth, _needle(keys[0], values[0]))]
        intro = _NIAH_INTRO_ONE
        question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
        prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"
        answers, meta, max_new = values, {"key": keys[0]}, 16
    elif task == "multi_key":
        keys = _distinct(rng, 1 + NUM_DISTRACTOR_KEYS, _key)
        values = _distinct(rng, len(keys), _number)
        items = [(depth, _needle(keys[0], values[0]))]
        items += [(rng.random(), _needle(k, v)) for k, v in zip(keys[1:], values[1:])]
        intro = _NIAH_INTRO_MANY
        question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
        prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"
        answers = values[:1]
        meta = {"key": keys[0], "distractor_keys": keys[1:], "distractor_values": values[1:]}
        max_new = 16
    elif task == "multi_value":
        keys = _distinct(rng, 1, _key)
        values = _distinct(rng, NUM_VALUES, _number)
        items = [(depth, _needle(keys[0], values[0]))] + [(rng.random(), _needle(keys[0], v)) for v in values[1:]]
        intro = _NIAH_INTRO_MANY
        question = f"What are all the special magic numbers for {keys[0]} mentioned in the provided text?"
        prefix = f"The special magic numbers for {keys[0]} mentioned in the provided text are"
        answers, meta, max_new = values, {"key": keys[0]}, 12 * NUM_VALUES
    else:
        raise AssertionError(task)

    def build(n: int) -> tuple:
        context = _insert(words_for(n), items)
        prompt = f"{intro}\n\n{context}\n\n{question}"
        return prompt + prefix, prompt

    _, prompt = _fit(build, count, budget, target)
    return prompt, prefix, answers, meta, max_new


def _make_kv(rng: random.Random, depth: float, count, budget: int, target: int) -> tuple:
    # Pairs are drawn lazily from one stream so that growing the object never changes the earlier pairs.
    pair_rng = random.Random(rng.getrandbits(64))
    pool: List[tuple] = []

    def pairs(n: int) -> List[tuple]:
        while len(pool) < n:
            pool.append((_uuid(pair_rng), _uuid(pair_rng)))
        return pool[:n]

    query = (_uuid(rng), _uuid(rng))
    intro = "Extract the value corresponding to the specified key in the JSON object below."

    def build(n: int) -> tuple:
        body = list(pairs(n))
        body.insert(min(n, round(depth * n)), query)
        lines = ",\n".join(f'  "{k}": "{v}"' for k, v in body)
        prompt = f"{intro}\n\nJSON data:\n{{\n{lines}\n}}\n\nKey: \"{query[0]}\"\nWhat is the value of this key?"
        return prompt + prefix, prompt

    prefix = f'The value associated with the key "{query[0]}" is "'
    _, prompt = _fit(build, count, budget, max(1, target // 20))
    return prompt, prefix, [query[1]], {"key": query[0]}, 48


def _make_vt(rng: random.Random, words_for: Callable[[int], List[str]], count, budget: int, target: int) -> tuple:
    names = _distinct(rng, VT_HOPS + 1, _varname)
    value = str(rng.randint(10_000, 99_999))
    stmts = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    fracs = sorted(rng.random() for _ in stmts)
    items = list(zip(fracs, stmts))
    intro = ("Memorize and track the chain of variable assignments hidden in the following text. "
             "I will ask you about them afterwards.")
    question = f"Find all variables that are assigned the value {value} in the text above."
    prefix = (f"According to the chain of variable assignments in the text above, {len(names)} variables are "
              f"assigned the value {value}, they are:")

    def build(n: int) -> tuple:
        context = _insert(words_for(n), items)
        prompt = f"{intro}\n\n{context}\n\n{question}"
        return prompt + prefix, prompt

    _, prompt = _fit(build, count, budget, target)
    return prompt, prefix, names, {"value": value, "variables": names, "positions": fracs}, 8 * len(names)


def make_sample(task: str, length: int, index: int, tokenizer, seed: int = 0, haystack: str = "essays",
                depths: Sequence[float] = DEFAULT_DEPTHS, reserve: int = 0) -> TaskSample:
    """Build sample ``index`` of ``task`` at ``length`` tokens (see the module docstring).

    ``tokenizer``: the served model's tokenizer (or a ``text -> token count`` callable). ``reserve``: tokens
    kept free for a chat template's wrapper. ``depths``: needle depths, cycled over ``index``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; choose from {HAYSTACKS}")
    count = token_counter(tokenizer)
    rng = _rng(seed, task, length, index)
    hay_seed = rng.getrandbits(32)
    budget = length - reserve
    depth: Optional[float] = _depth_for(index, depths)

    def words_for(n: int) -> List[str]:
        return haystack_words(haystack, hay_seed, n)

    if task in ("single_needle", "multi_key", "multi_value"):
        prompt, prefix, answers, meta, max_new = _make_niah(task, rng, depth, words_for, count, budget, length)
    elif task == "kv_retrieval":
        prompt, prefix, answers, meta, max_new = _make_kv(rng, depth, count, budget, length)
    else:
        prompt, prefix, answers, meta, max_new = _make_vt(rng, words_for, count, budget, length)
        depth = None
    meta["haystack_version"] = haystack_fingerprint(haystack) if task != "kv_retrieval" else "none"
    num_tokens = count(prompt + prefix) + reserve
    return TaskSample(task=task, length=length, index=index, seed=seed, depth=depth, prompt=prompt,
                      answer_prefix=prefix, answers=answers, max_new_tokens=max_new, num_tokens=num_tokens,
                      haystack=haystack if task != "kv_retrieval" else "none", meta=meta)


def make_samples(tasks: Sequence[str], lengths: Sequence[int], num_samples: int, tokenizer, seed: int = 0,
                 haystack: str = "essays", depths: Sequence[float] = DEFAULT_DEPTHS,
                 reserve: int = 0) -> List[TaskSample]:
    return [make_sample(t, L, i, tokenizer, seed=seed, haystack=haystack, depths=depths, reserve=reserve)
            for t in tasks for L in lengths for i in range(num_samples)]


# ------------------------------------------------------------------------------------------------ scoring
def score(sample: TaskSample, output: str) -> int:
    """Exact-match score of a model output (the text generated after the answer prefix): 1 or 0.

    single_needle / multi_key: the first 7-digit number in the output is the planted value.
    multi_value: every planted value appears as a 7-digit number in the output.
    kv_retrieval: the first UUID in the output (lower-cased) is the planted value.
    variable_tracking: the planted variable names found in the output are exactly the chain.
    """
    task = sample.task if isinstance(sample, TaskSample) else sample["task"]
    answers = sample.answers if isinstance(sample, TaskSample) else sample["answers"]
    meta = sample.meta if isinstance(sample, TaskSample) else sample.get("meta", {})
    output = output or ""
    if task in ("single_needle", "multi_key"):
        m = _NUMBER_RE.search(output)
        return int(m is not None and m.group(0) == answers[0])
    if task == "multi_value":
        found = set(_NUMBER_RE.findall(output))
        return int(set(answers) <= found)
    if task == "kv_retrieval":
        m = _UUID_RE.search(output.lower())
        return int(m is not None and m.group(0) == answers[0])
    if task == "variable_tracking":
        planted = set(meta.get("variables", answers))
        found = set(_VAR_RE.findall(output)) & planted
        return int(found == set(answers))
    raise ValueError(f"unknown task {task!r}")


def score_is_final(sample: TaskSample, output: str) -> bool:
    """True once more generated text can no longer change :func:`score` (lets a local generator stop early)."""
    output = output or ""
    if sample.task in ("single_needle", "multi_key"):
        return re.search(r"(?<!\d)\d{7}(?=\D)", output) is not None   # a complete 7-digit number
    if sample.task == "multi_value":
        return set(sample.answers) <= set(_NUMBER_RE.findall(output))
    if sample.task == "kv_retrieval":
        return _UUID_RE.search(output.lower()) is not None
    if sample.task == "variable_tracking":
        planted = set(sample.meta.get("variables", sample.answers))
        return planted <= set(sample.answers) and set(sample.answers) <= set(_VAR_RE.findall(output))
    return False


def planted_output(sample: TaskSample) -> str:
    """An output that answers correctly (for tests and sanity checks)."""
    if sample.task == "multi_value":
        return " " + ", ".join(sample.answers) + "."
    if sample.task == "kv_retrieval":
        return sample.answers[0] + '".'
    if sample.task == "variable_tracking":
        return " " + ", ".join(sample.answers) + "."
    return " " + sample.answers[0] + "."
