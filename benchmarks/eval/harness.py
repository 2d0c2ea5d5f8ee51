"""Run the tasks against a running SGLang server through the SGLang frontend language.

The program only talks to ``/generate`` through ``sglang.RuntimeEndpoint``, so it runs unchanged against plain
``python -m sglang.launch_server`` and against ``python -m sglang_sparse.launch_server``.

Prompt formats:
  ``chat``   ``sgl.user(prompt)``, then the assistant turn starts with the answer prefix and ``sgl.gen`` continues it
             (the frontend's chat template, e.g. ``chatml`` for SmolLM2-Instruct);
  ``plain``  ``prompt + "\\n" + answer_prefix`` then ``sgl.gen``.
``auto`` picks ``chat`` when the served tokenizer has a chat template, with the frontend template matched by the
model path, or ``chatml`` when that match is the frontend's generic default and the tokenizer's template uses
``<|im_start|>``.

:func:`render_prompt` returns exactly the text the frontend sends, for local runs (the CPU reference) and tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .tasks import TaskSample, make_samples, score

PROMPT_FORMATS = ("auto", "chat", "plain")


# ------------------------------------------------------------------------------------------------ prompts
@dataclass(frozen=True)
class PromptFormat:
    kind: str                          # "chat" or "plain"
    chat_template: Optional[str] = None  # frontend template name when kind == "chat"
    system_prompt: Optional[str] = None

    def describe(self) -> str:
        return f"chat:{self.chat_template}" if self.kind == "chat" else "plain"


def render_prompt(sample: TaskSample, fmt: PromptFormat, include_prefix: bool = True) -> str:
    """The text the frontend program below sends for ``sample`` (before generation)."""
    prefix = sample.answer_prefix if include_prefix else ""
    if fmt.kind == "plain":
        return sample.prompt + "\n" + prefix
    from sglang.lang.chat_template import get_chat_template

    tpl = get_chat_template(fmt.chat_template)
    messages: List[Dict[str, Any]] = []
    text = ""
    roles = []
    system = fmt.system_prompt if fmt.system_prompt is not None else tpl.default_system_prompt
    if system:
        roles.append(("system", system))
    roles.append(("user", sample.prompt))
    for role, content in roles:
        pre, suf = tpl.get_prefix_and_suffix(role, messages)
        text += pre + content + suf
        messages.append({"role": role, "content": content})
    pre, _ = tpl.get_prefix_and_suffix("assistant", messages)
    return text + pre + prefix


def template_overhead(fmt: PromptFormat, count) -> int:
    """Tokens the format adds around the user prompt and the answer prefix (the ``reserve`` of the tasks)."""
    empty = TaskSample(task="single_needle", length=0, index=0, seed=0, depth=None, prompt="", answer_prefix="",
                       answers=[""], max_new_tokens=0, num_tokens=0, haystack="none")
    return count(render_prompt(empty, fmt))


def resolve_prompt_format(kind: str, tokenizer, model_path: str, chat_template: Optional[str] = None,
                          system_prompt: Optional[str] = None) -> PromptFormat:
    if kind not in PROMPT_FORMATS:
        raise ValueError(f"prompt format must be one of {PROMPT_FORMATS}")
    hf_template = getattr(tokenizer, "chat_template", None)
    if kind == "plain" or (kind == "auto" and not hf_template and not chat_template):
        return PromptFormat("plain")
    if not chat_template:
        from sglang.lang.chat_template import get_chat_template_by_model_path

        chat_template = get_chat_template_by_model_path(model_path).name
        if chat_template == "default" and hf_template and "<|im_start|>" in str(hf_template):
            chat_template = "chatml"
    return PromptFormat("chat", chat_template, system_prompt)


# ------------------------------------------------------------------------------------------------ program
def _program():
    import sglang as sgl

    @sgl.function
    def task_program(s, prompt, answer_prefix, answer_tokens, chat, system_prompt):
        if chat:
            if system_prompt:
                s += sgl.system(system_prompt)
            s += sgl.user(prompt)
            s += sgl.assistant_begin()
            s += answer_prefix
        else:
            s += prompt + "\n" + answer_prefix
        s += sgl.gen("answer", max_tokens=answer_tokens, temperature=0.0)

    return task_program


# ------------------------------------------------------------------------------------------------ results
def summarize(records: Sequence[Dict[str, Any]], config: str, where: str) -> List[Dict[str, Any]]:
    """Rows (config, task, length, accuracy, samples, errors, where) from per-sample records."""
    groups: Dict[tuple, List[Dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["length"])].append(r)
    # a CLAA server reports the kept tokens of each request it filtered; a request it did not filter (a
    # cached prefix, a short prompt) reports nothing and ran dense, so the rows say how many were filtered
    claa = any("claa_kept_tokens" in r for r in records)
    rows = []
    for (task, length), rs in sorted(groups.items()):
        ok = sum(r["score"] for r in rs)
        row = {"config": config, "task": task, "length": length, "accuracy": ok / len(rs),
               "correct": ok, "samples": len(rs), "errors": sum(1 for r in rs if r.get("error")),
               "where": where}
        if claa:
            row["claa_filtered"] = sum(1 for r in rs if "claa_kept_tokens" in r)
            kept = claa_kept_fraction(rs)
            if kept is not None:
                row["claa_kept_fraction"] = kept
        rows.append(row)
    return rows


def claa_kept_fraction(records: Sequence[Dict[str, Any]]) -> Optional[float]:
    """Mean fraction of its prompt that CLAA kept, over the records of filtered requests (None if none)."""
    kept = [r["claa_kept_tokens"] / r["prompt_tokens"] for r in records
            if "claa_kept_tokens" in r and r.get("prompt_tokens")]
    return round(sum(kept) / len(kept), 4) if kept else None


def claa_kept_tokens(meta: Dict[str, Any]) -> Optional[int]:
    """The prompt tokens CLAA kept for a request, from its ``meta_info`` (SGLang returns the per-step
    custom info as a list; the prefill step's entry holds the count), or None if it was not filtered."""
    kept = meta.get("claa_kept_tokens")
    if isinstance(kept, (list, tuple)):
        kept = next((k for k in kept if k is not None), None)
    return None if kept is None else int(kept)


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Accuracy table: one line per (config, task), one column per length."""
    lengths = sorted({r["length"] for r in rows})
    keyed = {(r["config"], r["task"], r["length"]): r for r in rows}
    lines = []
    head = f"{'config':<24} {'task':<18} " + " ".join(f"{L:>9}" for L in lengths)
    lines.append(head)
    lines.append("-" * len(head))
    seen = []
    for r in rows:
        k = (r["config"], r["task"])
        if k not in seen:
            seen.append(k)
    for cfg, task in seen:
        cells = []
        for L in lengths:
            r = keyed.get((cfg, task, L))
            cells.append(f"{r['accuracy'] * 100:6.1f}/{r['samples']:<2d}" if r else f"{'-':>9}")
        lines.append(f"{cfg:<24} {task:<18} " + " ".join(cells))
    lines.append("(accuracy % / samples)")
    return "\n".join(lines)


def merge_rows(path: Path, rows: Sequence[Dict[str, Any]], meta_key: str, meta: Dict[str, Any]) -> None:
    """Add ``rows`` to the combined results file ``path`` (rows with the same config, task, length and where are
    replaced) and record ``meta`` under ``runs[meta_key]``."""
    data: Dict[str, Any] = {"rows": [], "runs": {}}
    if path.exists():
        data = json.loads(path.read_text())
        data.setdefault("rows", [])
        data.setdefault("runs", {})
    new_keys = {(r["config"], r["task"], r["length"], r["where"]) for r in rows}
    data["rows"] = [r for r in data["rows"]
                    if (r["config"], r["task"], r["length"], r["where"]) not in new_keys] + list(rows)
    data["rows"].sort(key=lambda r: (r["where"], r["config"], r["task"], r["length"]))
    data["runs"][meta_key] = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------ samples
def _lock_holder_alive(lock: Path) -> bool:
    """Whether the process named in ``lock`` (its pid) still runs; a lock still being written counts as held."""
    try:
        pid = int(Path(lock).read_text().strip())
    except (OSError, ValueError):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build_samples(tokenizer, fmt: PromptFormat, tasks: Sequence[str], lengths: Sequence[int], num_samples: int,
                  seed: int = 0, haystack: str = "essays", depths: Optional[Sequence[float]] = None,
                  cache: Optional[Path] = None, wait_s: float = 900.0) -> Tuple[List[TaskSample], int]:
    """The samples of a run and the template's token reserve.

    With ``cache`` (a JSON file), samples built once are reused by every run that asks for the same ones (same
    tokenizer, format, tasks, lengths, samples, seed, haystack, depths): building 32K-token prompts costs minutes
    of tokenizer time. Runs started together share one build: the first takes ``<cache>.lock`` and builds, the
    others wait for the file (at most ``wait_s`` seconds, then build themselves)."""
    from .tasks import DEFAULT_DEPTHS, token_counter

    count = token_counter(tokenizer)
    reserve = template_overhead(fmt, count)
    depths = tuple(depths) if depths else DEFAULT_DEPTHS
    try:
        vocab = len(tokenizer)
    except TypeError:
        vocab = None
    key = {"tokenizer": [type(tokenizer).__name__, vocab, count("The quick brown fox: 0123456789 {}[] <|x|>")],
           "format": fmt.describe(), "reserve": reserve, "tasks": list(tasks), "lengths": [int(L) for L in lengths],
           "samples": num_samples, "seed": seed, "haystack": haystack, "depths": list(depths)}

    def cached() -> Optional[List[TaskSample]]:
        try:
            data = json.loads(Path(cache).read_text())
        except (OSError, ValueError):
            return None
        return [TaskSample(**d) for d in data["samples"]] if data.get("key") == key else None

    owner = False
    if cache is not None:
        cache = Path(cache)
        cache.parent.mkdir(parents=True, exist_ok=True)
        lock = cache.with_name(cache.name + ".lock")
        deadline = time.time() + wait_s
        while True:
            hit = cached()
            if hit is not None:
                return hit, reserve
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                owner = True
                break
            except FileExistsError:
                if not _lock_holder_alive(lock):
                    with contextlib.suppress(OSError):
                        os.remove(lock)             # left by a process that died while building: take it over
                    continue
                if time.time() > deadline:
                    break
                time.sleep(2.0)
    try:
        samples = make_samples(tasks, lengths, num_samples, tokenizer, seed=seed, haystack=haystack, depths=depths,
                               reserve=reserve)
        if cache is not None:
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "samples": [x.to_dict() for x in samples]}))
            os.replace(tmp, cache)
    finally:
        if owner:
            with contextlib.suppress(OSError):
                os.remove(lock)
    return samples, reserve


# ------------------------------------------------------------------------------------------------ run
def run_eval(url: str, tasks: Sequence[str], lengths: Sequence[int], num_samples: int, seed: int = 0,
             tokenizer_path: Optional[str] = None, prompt_format: str = "auto",
             chat_template: Optional[str] = None, system_prompt: Optional[str] = None,
             haystack: str = "essays", depths: Optional[Sequence[float]] = None, num_threads: int = 16,
             config: str = "unnamed", where: str = "sglang-gpu", progress: bool = True,
             samples_cache: Optional[Path] = None) -> Dict[str, Any]:
    import sglang as sgl
    from transformers import AutoTokenizer

    from .tasks import DEFAULT_DEPTHS

    backend = sgl.RuntimeEndpoint(url)
    info = backend.model_info
    model_path = info.get("model_path", "")
    tok_path = tokenizer_path or info.get("tokenizer_path") or model_path
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    fmt = resolve_prompt_format(prompt_format, tokenizer, model_path, chat_template, system_prompt)
    if fmt.kind == "chat":
        backend = sgl.RuntimeEndpoint(url, chat_template_name=fmt.chat_template)
    sgl.set_default_backend(backend)
    depths = tuple(depths) if depths else DEFAULT_DEPTHS

    t0 = time.time()
    print(f"[eval] server {url}: model {model_path}; prompt format {fmt.describe()}; "
          f"building {len(tasks) * len(lengths) * num_samples} samples"
          + (f" (cache {samples_cache})" if samples_cache else ""), file=sys.stderr, flush=True)
    samples, reserve = build_samples(tokenizer, fmt, tasks, lengths, num_samples, seed=seed, haystack=haystack,
                                     depths=depths, cache=samples_cache)
    print(f"[eval] samples ready in {time.time() - t0:.1f}s (+{reserve} template tokens); generating",
          file=sys.stderr, flush=True)
    program = _program()
    args = [dict(prompt=s.prompt, answer_prefix=s.answer_prefix, answer_tokens=s.max_new_tokens,
                 chat=fmt.kind == "chat", system_prompt=fmt.system_prompt) for s in samples]
    t1 = time.time()
    states = program.run_batch(args, num_threads=num_threads, progress_bar=progress)
    gen_s = time.time() - t1

    records = []
    for s, st in zip(samples, states):
        rec: Dict[str, Any] = {"id": s.sample_id, "task": s.task, "length": s.length, "index": s.index,
                               "depth": s.depth, "num_tokens": s.num_tokens, "answers": s.answers}
        try:
            out = st["answer"]
            meta = st.get_meta_info("answer") or {}
            rec.update(output=out, score=score(s, out), prompt_tokens=meta.get("prompt_tokens"),
                       completion_tokens=meta.get("completion_tokens"))
            kept = claa_kept_tokens(meta)
            if kept is not None:
                rec["claa_kept_tokens"] = kept
        except Exception as e:  # a failed request counts as wrong and is reported
            rec.update(output=None, score=0, error=f"{type(e).__name__}: {e}")
        records.append(rec)
    rows = summarize(records, config, where)
    meta = {
        "url": url, "model_path": model_path, "tokenizer": str(tok_path), "config": config, "where": where,
        "tasks": list(tasks), "lengths": list(lengths), "samples_per_cell": num_samples, "seed": seed,
        "haystack": haystack, "depths": list(depths), "prompt_format": fmt.describe(),
        "system_prompt": fmt.system_prompt, "template_tokens": reserve, "generation": "greedy (temperature 0)",
        "generate_seconds": round(gen_s, 1), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(),
    }
    try:
        import sglang

        meta["sglang_version"] = sglang.__version__
    except Exception:
        pass
    return {"meta": meta, "rows": rows, "records": records}
