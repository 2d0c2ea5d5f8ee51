"""Configuration of the three sparse-attention mechanisms: flags, validation, transport.

This module is the only parser of sglang_sparse's command-line flags and the only reader of the
configuration inside SGLang's processes. It is imported by the launcher before SGLang is, and by
the ``sparse`` attention backend and the scheduler patches, so it depends on nothing heavier than
the standard library.

Flow (``python -m sglang_sparse.launch_server``):

    argv --(parse_known_args: add_cli_args + validate_values)--> SparseConfig
         --(validate_launch: SGLang flags read from argv; validate_model: <model-path>/config.json)-->
         [SGLang is imported and parses its own flags]
         --(validate_with_server_args)--> attach(server_args, cfg): ServerArgs._sglang_sparse (JSON)
         --(ServerArgs is pickled into every spawned scheduler)--> from_server_args() there.

``ServerArgs._sglang_sparse`` is the one transport: ``python -m sglang.launch_server --attention-backend
sparse`` (no launcher, so no attribute) serves with every mechanism off. Every validation failure raises
:class:`ConfigError`, whose message starts with the offending flag; the launcher prints it as one line
and exits with status 2 before SGLang loads anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

from flashinfer_ext.params import ArtParams, PageSelectParams, key_codes_supported, page_budget

SERVER_ARGS_ATTR = "_sglang_sparse"
BACKEND_NAME = "sparse"
# Concurrent requests the launcher allows by default with PrHS/ART (decode buffers scale with it).
DEFAULT_MAX_RUNNING_REQUESTS = 64

# Speculative algorithms SGLang accepts; any of them conflicts with a sparse mechanism.
_NO_SPECULATION = (None, "", "none", "NONE")

# ---------------------------------------------------------------------- environment
INTERPRET_ENV = "SGLANG_SPARSE_INTERPRET"
CHECK_ENV = "SGLANG_SPARSE_CHECK"
HAYSTACK_ENV = "SGLANG_SPARSE_HAYSTACK"
# Carried the configuration into SGLang's processes before ServerArgs did; set, it is ignored (with a warning).
RETIRED_CONFIG_ENV = "SGLANG_SPARSE_CONFIG"

# Every environment variable the project reads: (name, read by, meaning). "server" rows change what a
# running server does and are logged at start-up when set; the others belong to the tools named.
ENVIRONMENT: Tuple[Tuple[str, str, str], ...] = (
    (INTERPRET_ENV, "server",
     "with TRITON_INTERPRET=1: developer mode, a --device cpu server runs the PrHS / ART decode kernels in "
     "Triton's interpreter (minutes per decode step)"),
    ("TRITON_INTERPRET", "server",
     "Triton's own switch (every Triton kernel runs in its interpreter); read here to recognise the developer mode"),
    (CHECK_ENV, "server",
     "1 = every decode attention call synchronises and checks its page lists and outputs (debugging; slow)"),
    (RETIRED_CONFIG_ENV, "server",
     "no longer read: the configuration travels on ServerArgs; a warning says so when it is set"),
    (HAYSTACK_ENV, "eval", "text file used as the needle-in-a-haystack filler by benchmarks.eval"),
    ("XDG_CACHE_HOME", "eval", "base of the cache folder searched for the haystack text (default ~/.cache)"),
    ("OUT", "benchmarks", "folder the GPU benchmark scripts also copy their results and plots into"),
    ("LLAMA8B_SHAPE", "benchmarks", "default --model of the serving benchmarks (a Llama-3.1-8B-shaped model dir)"),
    ("SGLANG_SPARSE_SMOLLM2_TEST", "tests", "0 skips the tests on the real SmolLM2 model"),
    ("SGLANG_SPARSE_SMOLLM2_DIR", "tests", "where the converted SmolLM2 model lives (default .models/)"),
    ("SGLANG_SPARSE_REAL_LENGTH", "tests", "context length of the real-model decode kernel test (default 7168)"),
    ("SGLANG_SPARSE_REAL_LAYERS", "tests",
     "layers of SmolLM2 the interpreted real-model decode test runs (default 4; 0 = all 30)"),
    ("SGLANG_SPARSE_QWEN_MODEL", "tests", "a converted Qwen checkpoint for the GPU real-model decode test"),
    ("GPU_TESTS", "tests", "comma-separated name parts: tests/test_kernels_gpu.py runs only matching tests"),
    ("SGLANG_SPARSE_VENV", "ci", "the CPU virtual environment ci/run_tests.sh builds and uses (default .venv-cpu)"),
)


def environment_notes(environ: Mapping[str, str] = os.environ) -> list[tuple[int, str]]:
    """(log level, line) for each server-side variable of :data:`ENVIRONMENT` that is set."""
    notes = []
    for name, scope, meaning in ENVIRONMENT:
        if scope != "server" or name not in environ:
            continue
        if name == RETIRED_CONFIG_ENV:
            notes.append((logging.WARNING,
                          f"sglang_sparse: {name} is set and ignored: the configuration comes only from "
                          f"python -m sglang_sparse.launch_server's flags"))
        else:
            notes.append((logging.INFO, f"sglang_sparse: environment {name}={environ[name]}: {meaning}"))
    return notes


def interpreted_decode() -> bool:
    """True when the decode kernels are to run interpreted on CPU (``SGLANG_SPARSE_INTERPRET=1`` and
    ``TRITON_INTERPRET=1``)."""
    return os.environ.get(INTERPRET_ENV) == "1" and os.environ.get("TRITON_INTERPRET") == "1"


class ConfigError(ValueError):
    """A flag value or a combination of flags that sglang_sparse cannot serve."""

    def __init__(self, flag: str, message: str):
        self.flag = flag
        super().__init__(f"{flag}: {message}")


# ---------------------------------------------------------------------- CLAA defaults
# The published CLAA setting filters at layer 15 of a 32-layer model; other depths scale it.
AUTHORS_NUM_LAYERS = 32
AUTHORS_FILTER_LAYER = 15

# Model classes whose decoder layers CLAA's hooks know how to drive: layer(positions, hidden, forward_batch,
# residual) on ``model.model.layers``.
CLAA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def scaled_layer(authors_layer: int, num_layers: int) -> int:
    """``round_half_up(authors_layer * L / 32)`` clamped into ``[1, L - 1]``: a layer index chosen for 32 layers,
    moved to a model of ``L = num_layers``."""
    if num_layers < 2:
        raise ValueError(f"need at least 2 layers, got {num_layers}")
    idx = int(math.floor(authors_layer * num_layers / AUTHORS_NUM_LAYERS + 0.5))
    return max(1, min(num_layers - 1, idx))


def default_filter_layer(num_layers: int) -> int:
    """Filter layer (first layer that processes only the kept tokens) for a model of ``num_layers``.

    The authors use 15 for 32 layers; other depths scale proportionally:
    ``round_half_up(15 * L / 32)`` clamped into ``[1, L - 1]``. E.g. L = 24 -> 11, 28 -> 13,
    32 -> 15, 36 -> 17, 40 -> 19, 48 -> 23, 64 -> 30, 80 -> 38.
    """
    return scaled_layer(AUTHORS_FILTER_LAYER, num_layers)


@dataclass(frozen=True)
class ClaaConfig:
    """CLAA prefill token filtering (see :mod:`sglang_sparse.claa`).

    keep_ratio      fraction of prompt tokens the layers after the filter layer process.
    filter_layer    index of the first layer that sees only kept tokens; None = scaled with depth
                    (:func:`default_filter_layer`).
    window          observation window: the last ``window`` prompt tokens score the rest.
    num_layers      how many layers before the filter layer are aggregated (element-wise max).
    pool_kernel     length of the 1-D pooling applied to the scores along the sequence.
    min_prompt_len  shorter prompts are prefilled densely.
    max_prompt_len  longest prompt that must arrive in one prefill chunk; the launcher raises
                    --chunked-prefill-size to at least this (0 = leave SGLang's setting).
    """

    mode: str = "off"
    keep_ratio: float = 0.2
    filter_layer: Optional[int] = None
    window: int = 8
    num_layers: int = 4
    pool_kernel: int = 7
    min_prompt_len: int = 2048
    max_prompt_len: int = 0

    @property
    def enabled(self) -> bool:
        return self.mode == "claa"




# --prhs-budget when --prhs-select bounds is given without it: the bound does not stop the selection on real models,
# so the budget must (1/2: the largest measured cut that kept the Qwen2.5-Coder 0.5B/1.5B answers within ~2 points)
BOUNDS_DEFAULT_BUDGET = 1 / 2


@dataclass(frozen=True)
class PrhsConfig:
    """PrHS pre-hoc page selection for decode (see :mod:`sglang_sparse.prhs`).

    page_size        tokens per page; equals SGLang's --page-size (the physical KV page), >= 16.
                     None = take SGLang's --page-size, or 32 if that was not given.
    delta            target on the dropped attention mass per (request, KV head) (0 = fill the budget). With
                     ``select="bounds"`` on the upper bound the selector computes from the pages' key min/max (loose
                     on real models, where the budget decides); with ``select="estimate"`` on the mass estimated
                     from 4-bit key codes (an estimate: ``audit_interval`` measures the real one).
    select           how pages are ranked and delta applied: ``bounds`` (Quest min/max upper bounds, a bound on the
                     dropped mass) or ``estimate`` (each page's attention mass estimated from its keys quantised to
                     4 bits inside the page's min/max, D / 2 bytes per key and KV head beside the KV cache;
                     ``sglang_sparse.prhs.select_pages_estimated``).
    budget           at most this many pages per (request, KV head): a fraction of the request's
                     pages when <= 1, else an absolute page count. None (the default) follows ``select``: every
                     page for ``estimate`` (delta decides; with delta 0.1 the setting that kept the answers of
                     Qwen2.5-Coder 0.5B/1.5B), ``BOUNDS_DEFAULT_BUDGET`` for ``bounds`` (the bound does not stop
                     the selection on real models, so the budget must).
    reselect_interval  R: select every R decode steps, reuse the selection in between (``delta`` holds for the
                     fresh selections only: the next queries attend elsewhere; README, *Quality on 32K models*).
    dilation         r: a reused selection is widened by +-r pages around each kept page.
    layers_per_selection  g: consecutive layers that share one selection.
    sink_pages / recent_pages  always-selected pages at the start / end of the context.
    min_context_len  requests with a shorter context decode densely.
    audit_interval   N: a request's first decode step (after each (re)start) and every step where its length + 1
                     is a multiple of N (with ``reselect_interval`` R dividing N: the last step that reuses a
                     selection, not a fresh one) also measure, at every layer, the exact attention mass the step dropped
                     (PrHS's pages and ART's stop together), by reading the request's keys of every page once
                     (``flashinfer_ext.audit``); 0 = off.
    audit_measure    what the audit compares with ``delta`` (feedback, over-delta counters): ``mass``, the dropped
                     attention mass of the worst query head; ``output-error``, the relative error of the layer's
                     attention output over all its query heads, ``||o_read - o_all|| / ||o_all||`` with the heads'
                     outputs concatenated, against the exact output over every token (reads the values too: about
                     one dense decode of the audited request per audited step instead of half of one). The
                     dropped mass is measured and reported either way.
    audit_max_scale  feedback of the audit into PrHS's budget (a power of two, 1..64; 1 = the audit only
                     reports): a (request, selection group) whose audited measure exceeds ``delta`` at any
                     of the group's layers has its page budget doubled for its later fresh selections, up to
                     this factor; it is reset when the request (re)starts (to the profile's shift, see
                     ``layer_budget_shift``) and never lowered before. Needs ``audit_interval`` and a budget
                     below every page. A measurement on sampled steps, not a
                     guarantee: the first audited step of a request runs at its starting budget, the steps
                     between audits are not measured, and a budget at its cap may still drop more than delta.
    layer_budget_shift  per layer l, the log2 scale of the page budget a request starts from at that layer
                     (``budget << s``, at most the request's pages), from a calibration profile
                     (``--sparse-profile``); empty = 0 at every layer. A selection group starts from the largest
                     shift of its layers; the audit's feedback raises it from there.
    """

    mode: str = "off"
    page_size: Optional[int] = None
    delta: float = 0.1
    budget: Optional[float] = None
    reselect_interval: int = 1
    dilation: int = 0
    layers_per_selection: int = 1
    sink_pages: int = 1
    recent_pages: int = 2
    min_context_len: int = 4096
    audit_interval: int = 0
    audit_max_scale: int = 8
    layer_budget_shift: Tuple[int, ...] = ()
    audit_measure: str = "mass"
    select: str = "estimate"

    def __post_init__(self):
        object.__setattr__(self, "layer_budget_shift", tuple(self.layer_budget_shift))   # a list from JSON
        if self.budget is None:         # the default follows the ranking
            object.__setattr__(self, "budget", 1.0 if self.select == "estimate" else BOUNDS_DEFAULT_BUDGET)

    @property
    def enabled(self) -> bool:
        return self.mode == "prhs"

    def budget_pages(self, num_pages: int) -> int:
        """Page budget for a request holding ``num_pages`` pages (at least sink + recent, at most all)."""
        return page_budget(num_pages, self.budget, self.sink_pages, self.recent_pages)

    def audit_max_shift(self) -> int:
        """log2 of the largest budget scale the audit's feedback may reach; 0 when it has nothing to scale (PrHS
        off or reading every page, the audit off, or ``audit_max_scale`` 1)."""
        if not (self.enabled and self.audit_interval > 0 and self.budget != 1.0):
            return 0
        return max(0, int(self.audit_max_scale).bit_length() - 1)

    def group_budget_shifts(self, layers: Sequence[int]) -> list[int]:
        """The profile's initial budget shift of each selection group, for a stage holding the model's layers
        ``layers`` (global indices, in order): the largest shift of each run of ``layers_per_selection`` layers;
        all 0 without a profile, or when the budget is every page."""
        g = self.layers_per_selection
        groups = [layers[i:i + g] for i in range(0, len(layers), g)]
        shifts = self.layer_budget_shift
        if not shifts or self.budget == 1.0:
            return [0] * len(groups)
        return [max(shifts[l] if l < len(shifts) else 0 for l in grp) for grp in groups]

    def select_params(self, page_size: int) -> PageSelectParams:
        """The decode wrapper's page-selection parameters for pages of ``page_size`` tokens
        (``--prhs-min-context-len``: shorter contexts read every page)."""
        return PageSelectParams(budget=self.budget, delta=self.delta, sink_pages=self.sink_pages,
                                recent_pages=self.recent_pages,
                                dense_below_len=self.min_context_len, dilation=self.dilation,
                                estimate=self.select == "estimate")


@dataclass(frozen=True)
class ArtConfig:
    """ART run-time termination of the decode attention loop (see :mod:`sglang_sparse.art`).

    tau_mag / tau_dir  stop once the relative change of the running output (magnitude) and
                       1 - cos between consecutive outputs (direction) stay below these ...
    patience           ... for this many consecutive KV blocks.
    eps_cert           optional certified mode: also stop once the bounded remaining mass <= eps.
    min_blocks         never stop before this many blocks have been read.

    The default thresholds and their measured effect on answers are discussed in
    benchmarks/eval/README.md.
    """

    mode: str = "off"
    tau_mag: float = 1e-3
    tau_dir: float = 1e-6
    patience: int = 2
    eps_cert: Optional[float] = None
    min_blocks: int = 4

    @property
    def enabled(self) -> bool:
        return self.mode == "on"

    def art_params(self) -> ArtParams:
        """The decode wrapper's ART parameters."""
        return ArtParams(tau_mag=self.tau_mag, tau_dir=self.tau_dir, patience=self.patience,
                         eps_cert=self.eps_cert, min_blocks=self.min_blocks)


@dataclass(frozen=True)
class SparseConfig:
    claa: ClaaConfig = field(default_factory=ClaaConfig)
    prhs: PrhsConfig = field(default_factory=PrhsConfig)
    art: ArtConfig = field(default_factory=ArtConfig)
    # the calibration profile whose settings were applied (its path), or None; its values are in the sections
    profile: Optional[str] = None

    @property
    def any_enabled(self) -> bool:
        return self.claa.enabled or self.prhs.enabled or self.art.enabled

    # ------------------------------------------------------------------ transport
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SparseConfig":
        def build(sub_cls, values):
            names = {f.name for f in dataclasses.fields(sub_cls)}
            unknown = set(values) - names
            if unknown:
                raise ConfigError(_TRANSPORT, f"unknown {sub_cls.__name__} fields {sorted(unknown)}")
            return sub_cls(**values)

        unknown = set(data) - {"claa", "prhs", "art", "profile"}
        if unknown:
            raise ConfigError(_TRANSPORT, f"unknown sections {sorted(unknown)}")
        cfg = cls(
            claa=build(ClaaConfig, data.get("claa", {})),
            prhs=build(PrhsConfig, data.get("prhs", {})),
            art=build(ArtConfig, data.get("art", {})),
            profile=data.get("profile"),
        )
        validate_values(cfg)
        return cfg

    @classmethod
    def from_json(cls, text: str) -> "SparseConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(_TRANSPORT, f"not valid JSON ({e})") from None
        return cls.from_dict(data)


_TRANSPORT = f"ServerArgs.{SERVER_ARGS_ATTR}"
# JSON text on ServerArgs (or "" when absent) -> the config read from it, once per process.
_READ: Dict[str, SparseConfig] = {}


def attach(server_args: Any, cfg: SparseConfig) -> None:
    """Store ``cfg`` on SGLang's ServerArgs (the launcher, after validation). ServerArgs is read-only for its
    own fields once resolved; an attribute starting with ``_`` is allowed, and pickling (how SGLang hands
    ServerArgs to its spawned schedulers) carries it along."""
    object.__setattr__(server_args, SERVER_ARGS_ATTR, cfg.to_json())


def from_server_args(server_args: Any) -> SparseConfig:
    """The configuration of this server: the one the launcher attached to ``server_args``, or every mechanism
    off when there is none (SGLang's own launcher with ``--attention-backend sparse``). The one reading
    function of every process; read once per process, and the all-off case is logged then, with the
    server-side environment variables that are set."""
    text = getattr(server_args, SERVER_ARGS_ATTR, None) or ""
    cfg = _READ.get(text)
    if cfg is None:
        if text:
            cfg = SparseConfig.from_json(text)
        else:
            cfg = SparseConfig()
            logger.info("sglang_sparse: no configuration on ServerArgs (the server was not started by "
                        "python -m sglang_sparse.launch_server): every sparse mechanism is off")
            for level, line in environment_notes():
                logger.log(level, "%s", line)
        _READ[text] = cfg
    return cfg


# ---------------------------------------------------------------------- flags
def _budget(text: str) -> float:
    """'1/16', '0.0625' (fractions of the pages) or '256' (pages)."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a fraction like 1/16 or a page count, got {text!r}")
    return value


def _optional_int(text: str) -> Optional[int]:
    return None if text.lower() in ("auto", "none") else int(text)


def _optional_float(text: str) -> Optional[float]:
    return None if text.lower() in ("off", "none") else float(text)


def _profile_arg(text: str) -> Optional[str]:
    return None if text.lower() in ("off", "none") else text


# (flag, dest, type, section, field, help); section None = a field of SparseConfig itself. Defaults come from the
# dataclasses above.
_FLAGS = (
    ("--sparse-profile", "sparse_profile", _profile_arg, None, "profile",
     "Per-model settings measured by python -m sglang_sparse.calibrate: a profile JSON file, or 'auto' (a "
     "profile shipped in sglang_sparse/profiles/ for this model, if any). Its values are defaults; flags given "
     "explicitly win."),
    ("--sparse-prefill", "sparse_prefill", str, "claa", "mode",
     "Prefill token filtering: 'claa' keeps the top tokens after the filter layer."),
    ("--claa-keep-ratio", "claa_keep_ratio", float, "claa", "keep_ratio",
     "Fraction of prompt tokens kept after the filter layer, in (0, 1]."),
    ("--claa-filter-layer", "claa_filter_layer", _optional_int, "claa", "filter_layer",
     "First layer that sees only the kept tokens ('auto' = 15/32 of the depth)."),
    ("--claa-window", "claa_window", int, "claa", "window",
     "Observation window: number of last prompt tokens whose attention scores the prompt."),
    ("--claa-num-layers", "claa_num_layers", int, "claa", "num_layers",
     "Number of layers before the filter layer whose scores are aggregated (max)."),
    ("--claa-pool-kernel", "claa_pool_kernel", int, "claa", "pool_kernel",
     "Length of the pooling applied to the scores along the sequence (odd)."),
    ("--claa-min-prompt-len", "claa_min_prompt_len", int, "claa", "min_prompt_len",
     "Prompts shorter than this are prefilled densely."),
    ("--claa-max-prompt-len", "claa_max_prompt_len", int, "claa", "max_prompt_len",
     "Longest prompt that must be prefilled in one chunk (raises --chunked-prefill-size; 0 = keep it)."),
    ("--sparse-decode", "sparse_decode", str, "prhs", "mode",
     "Decode page selection: 'prhs' reads only the pages chosen from per-page key bounds."),
    ("--prhs-page-size", "prhs_page_size", _optional_int, "prhs", "page_size",
     "Tokens per PrHS page; equals SGLang's --page-size (>= 16; 'auto' = --page-size, or 32)."),
    ("--prhs-delta", "prhs_delta", float, "prhs", "delta",
     "Target on the dropped attention mass per (request, KV head), in [0, 1): pages are added until it is <= delta "
     "or the budget is spent. With --prhs-select bounds the key-min/max upper bound (loose on real models: the "
     "budget decides); with --prhs-select estimate the mass estimated from 4-bit key codes (--prhs-audit-interval "
     "measures the real dropped mass)."),
    ("--prhs-select", "prhs_select", str, "prhs", "select",
     "How pages are ranked and --prhs-delta applied: 'bounds' (per-page key min/max upper bounds) or 'estimate' "
     "(each page's attention mass estimated from its keys quantised to 4 bits, D/2 bytes per key and KV head kept "
     "beside the KV cache, about 1/8 of it; needs a power-of-two head_dim >= 32)."),
    ("--prhs-budget", "prhs_budget", _budget, "prhs", "budget",
     "Page budget: a fraction of the request's pages (e.g. 1/2) or, if > 1, a page count. With --prhs-select "
     "bounds the bound does not stop the selection on real models, so the budget decides: 1/2 was the largest "
     "measured cut that kept the answers of the Qwen2.5-Coder 0.5B/1.5B runs within about 2 points on average "
     "(benchmarks/eval/README.md)."),
    ("--prhs-reselect-interval", "prhs_reselect_interval", int, "prhs", "reselect_interval",
     "Select pages every R decode steps and reuse the selection in between (delta holds for the fresh selections "
     "only: reused lists dropped 0.2 of the mass on average at delta 0.1 on Qwen2.5-Coder-0.5B)."),
    ("--prhs-dilation", "prhs_dilation", int, "prhs", "dilation",
     "Widen a reused selection by this many pages on each side of every kept page."),
    ("--prhs-layers-per-selection", "prhs_layers_per_selection", int, "prhs", "layers_per_selection",
     "Number of consecutive layers sharing one page selection (delta holds for the selecting layer only: the "
     "others dropped more than 0.1 in 46 %% of the audits at delta 0.1 on Qwen2.5-Coder-1.5B)."),
    ("--prhs-sink-pages", "prhs_sink_pages", int, "prhs", "sink_pages",
     "Pages at the start of the context that are always read."),
    ("--prhs-recent-pages", "prhs_recent_pages", int, "prhs", "recent_pages",
     "Pages at the end of the context that are always read."),
    ("--prhs-min-context-len", "prhs_min_context_len", int, "prhs", "min_context_len",
     "Requests with a shorter context decode densely."),
    ("--prhs-audit-interval", "prhs_audit_interval", int, "prhs", "audit_interval",
     "On a request's first decode step and every N steps, measure at every layer the exact attention mass "
     "PrHS / ART dropped (logged and on /metrics; 0 = off)."),
    ("--prhs-audit-measure", "prhs_audit_measure", str, "prhs", "audit_measure",
     "What the audit compares with --prhs-delta: 'mass' (the dropped attention mass, keys only) or 'output-error' "
     "(the relative error of the layer's attention output over all its query heads against the exact one over every "
     "token; reads the values too)."),
    ("--prhs-audit-max-scale", "prhs_audit_max_scale", int, "prhs", "audit_max_scale",
     "Audit feedback: a request whose audited dropped mass (or output error, see --prhs-audit-measure) exceeds "
     "--prhs-delta in a selection group gets that group's page budget doubled, up to this factor (a power of two, "
     "1..64; 1 = report only)."),
    ("--art", "art", str, "art", "mode",
     "Run-time termination of decode attention once the running output stops changing."),
    ("--art-tau-mag", "art_tau_mag", float, "art", "tau_mag",
     "Threshold on the relative change of the output's magnitude between KV blocks."),
    ("--art-tau-dir", "art_tau_dir", float, "art", "tau_dir",
     "Threshold on 1 - cos(o_b, o_b-1) between KV blocks."),
    ("--art-patience", "art_patience", int, "art", "patience",
     "Consecutive blocks that must satisfy both thresholds before stopping."),
    ("--art-eps-cert", "art_eps_cert", _optional_float, "art", "eps_cert",
     "Certified mode: also stop when the bounded remaining mass is <= this ('off' = disabled)."),
    ("--art-min-blocks", "art_min_blocks", int, "art", "min_blocks",
     "Never stop before this many KV blocks have been read."),
)
_CHOICES = {"--sparse-prefill": ("off", "claa"), "--sparse-decode": ("off", "prhs"), "--art": ("off", "on"),
            "--prhs-audit-measure": ("mass", "output-error"), "--prhs-select": ("bounds", "estimate")}
_SECTIONS = {"claa": ClaaConfig, "prhs": PrhsConfig, "art": ArtConfig}
# How --help shows a default of None: the word the flag itself accepts for it.
_NONE_SHOWN_AS = {_optional_int: "auto", _optional_float: "off", _profile_arg: "none",
                  _budget: "every page with --prhs-select estimate, 1/2 with bounds"}
FLAG_NAMES = tuple(f[0] for f in _FLAGS)


def add_cli_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add sglang_sparse's flags, as one argument group, to ``parser``."""
    group = parser.add_argument_group(
        "sglang_sparse", "Sparse attention (CLAA prefill, PrHS decode, ART). Everything is off by default.")
    for flag, dest, typ, section, name, text in _FLAGS:
        cls = _SECTIONS[section] if section else SparseConfig
        default = next(f.default for f in dataclasses.fields(cls) if f.name == name)    # as declared (None = auto)
        shown = _NONE_SHOWN_AS[typ] if default is None else default
        kwargs = dict(dest=dest, type=typ, default=default, help=f"{text} (default: {shown})")
        if flag in _CHOICES:
            kwargs["choices"] = _CHOICES[flag]
        group.add_argument(flag, **kwargs)
    return group


def from_cli_args(ns: argparse.Namespace) -> SparseConfig:
    values: dict[str, dict[str, Any]] = {"claa": {}, "prhs": {}, "art": {}, None: {}}
    for _flag, dest, _typ, section, name, _text in _FLAGS:
        values[section][name] = getattr(ns, dest)
    cfg = SparseConfig(**{k: _SECTIONS[k](**v) for k, v in values.items() if k}, **values[None])
    validate_values(cfg)
    return cfg


def parse_known_args(argv: Sequence[str]) -> tuple[SparseConfig, list[str]]:
    """Split ``argv`` into our config and the arguments meant for SGLang."""

    class _Parser(argparse.ArgumentParser):
        def error(self, message):  # one line naming the flag, raised instead of printed
            raise ConfigError("sglang_sparse", message)

    parser = _Parser(add_help=False, allow_abbrev=False)
    add_cli_args(parser)
    ns, rest = parser.parse_known_args(list(argv))
    return from_cli_args(ns), rest


# ---------------------------------------------------------------------- validation
def _check(cond: bool, flag: str, message: str) -> None:
    if not cond:
        raise ConfigError(flag, message)


def validate_values(cfg: SparseConfig) -> None:
    """Range checks of every knob (no SGLang needed)."""
    c, p, a = cfg.claa, cfg.prhs, cfg.art
    _check(c.mode in _CHOICES["--sparse-prefill"], "--sparse-prefill", f"must be off or claa, got {c.mode!r}")
    _check(0.0 < c.keep_ratio <= 1.0, "--claa-keep-ratio", f"must be in (0, 1], got {c.keep_ratio}")
    _check(c.window >= 1, "--claa-window", f"must be >= 1, got {c.window}")
    _check(c.num_layers >= 1, "--claa-num-layers", f"must be >= 1, got {c.num_layers}")
    _check(c.filter_layer is None or c.filter_layer >= c.num_layers, "--claa-filter-layer",
           f"must be >= --claa-num-layers ({c.num_layers}) so that enough layers precede it, got {c.filter_layer}")
    _check(c.pool_kernel >= 1 and c.pool_kernel % 2 == 1, "--claa-pool-kernel",
           f"must be a positive odd number, got {c.pool_kernel}")
    _check(c.min_prompt_len > c.window, "--claa-min-prompt-len",
           f"must exceed --claa-window ({c.window}), got {c.min_prompt_len}")
    _check(c.max_prompt_len >= 0, "--claa-max-prompt-len", f"must be >= 0, got {c.max_prompt_len}")

    _check(p.mode in _CHOICES["--sparse-decode"], "--sparse-decode", f"must be off or prhs, got {p.mode!r}")
    _check(p.page_size is None or p.page_size >= 16, "--prhs-page-size", f"must be >= 16, got {p.page_size}")
    _check(p.page_size is None or p.page_size & (p.page_size - 1) == 0, "--prhs-page-size",
           f"must be a power of two, got {p.page_size}")
    _check(0.0 <= p.delta < 1.0, "--prhs-delta", f"must be in [0, 1), got {p.delta}")
    _check(p.budget > 0 and (p.budget <= 1 or float(p.budget).is_integer()), "--prhs-budget",
           f"must be a fraction in (0, 1] or a whole page count, got {p.budget}")
    _check(p.reselect_interval >= 1, "--prhs-reselect-interval", f"must be >= 1, got {p.reselect_interval}")
    _check(p.dilation >= 0, "--prhs-dilation", f"must be >= 0, got {p.dilation}")
    _check(p.layers_per_selection >= 1, "--prhs-layers-per-selection",
           f"must be >= 1, got {p.layers_per_selection}")
    _check(p.sink_pages >= 0, "--prhs-sink-pages", f"must be >= 0, got {p.sink_pages}")
    _check(p.recent_pages >= 1, "--prhs-recent-pages",
           f"must be >= 1 (the page being written is always read), got {p.recent_pages}")
    _check(p.budget <= 1 or p.budget >= p.sink_pages + p.recent_pages, "--prhs-budget",
           f"a page count must cover the {p.sink_pages} sink + {p.recent_pages} recent pages, got {p.budget:g}")
    _check(p.min_context_len >= 0, "--prhs-min-context-len", f"must be >= 0, got {p.min_context_len}")
    _check(p.audit_interval >= 0, "--prhs-audit-interval", f"must be >= 0, got {p.audit_interval}")
    _check(p.audit_measure in _CHOICES["--prhs-audit-measure"], "--prhs-audit-measure",
           f"must be mass or output-error, got {p.audit_measure!r}")
    _check(p.select in _CHOICES["--prhs-select"], "--prhs-select", f"must be bounds or estimate, got {p.select!r}")
    _check(not (p.enabled and p.select == "estimate" and a.eps_cert is not None), "--art-eps-cert",
           "ART's certified stop needs page bounds; with --prhs-select estimate (the default) the page masses are "
           "estimates (pass --prhs-select bounds, or leave --art-eps-cert off)")
    _check(1 <= p.audit_max_scale <= 64 and p.audit_max_scale & (p.audit_max_scale - 1) == 0,
           "--prhs-audit-max-scale", f"must be a power of two in [1, 64], got {p.audit_max_scale}")
    _check(all(_is_int(x) and 0 <= x <= MAX_PROFILE_SHIFT for x in p.layer_budget_shift), "--sparse-profile",
           f"layer_budget_shift values must be integers in [0, {MAX_PROFILE_SHIFT}], got {list(p.layer_budget_shift)}")

    _check(a.mode in _CHOICES["--art"], "--art", f"must be off or on, got {a.mode!r}")
    _check(a.tau_mag >= 0, "--art-tau-mag", f"must be >= 0, got {a.tau_mag}")
    _check(0 <= a.tau_dir <= 2, "--art-tau-dir", f"must be in [0, 2] (1 - cos), got {a.tau_dir}")
    _check(a.patience >= 1, "--art-patience", f"must be >= 1, got {a.patience}")
    _check(a.eps_cert is None or 0 < a.eps_cert < 1, "--art-eps-cert", f"must be in (0, 1), got {a.eps_cert}")
    _check(a.min_blocks >= 1, "--art-min-blocks", f"must be >= 1, got {a.min_blocks}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _flag_given(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


# KV cache element types the decode kernels and page summaries read (16-bit; SGLang's "auto" = the model's dtype).
SUPPORTED_KV_CACHE_DTYPES = ("auto", "bf16", "bfloat16", "fp16", "float16")


def _mechanisms(cfg: SparseConfig) -> Tuple[str, str]:
    """(flag of the first mechanism switched on, names of all that are on) for messages about the model."""
    on = [(flag, name) for flag, name, enabled in (("--sparse-prefill", "CLAA", cfg.claa.enabled),
                                                   ("--sparse-decode", "PrHS", cfg.prhs.enabled),
                                                   ("--art", "ART", cfg.art.enabled)) if enabled]
    return on[0][0], " / ".join(name for _, name in on)


def _check_device(cfg: SparseConfig, device: str) -> None:
    _check(device.startswith("cuda") or (interpreted_decode() and not cfg.claa.enabled), "--device",
           f"--sparse-prefill claa / --sparse-decode prhs / --art on run Triton kernels on CUDA GPUs, "
           f"got --device {device}")


def _check_backends(backends: Mapping[str, Optional[str]]) -> None:
    for flag, value in backends.items():
        _check(value in (None, BACKEND_NAME), flag,
               f"sparse attention runs only in the '{BACKEND_NAME}' backend, got {value!r}")


def validate_launch(cfg: SparseConfig, *, device: Optional[str] = None, kv_cache_dtype: str = "auto",
                    pp_size: Optional[int] = 1, backends: Mapping[str, Optional[str]] = {}) -> None:
    """Combinations with SGLang flags that the launcher reads from the command line, before SGLang is imported.

    ``device`` is the device the server will use, None when SGLang is to pick an accelerator itself;
    ``backends`` maps the attention-backend flags given to their values."""
    if not cfg.any_enabled:
        return
    _check_backends(backends)
    if device is not None:
        _check_device(cfg, str(device))
    flag, names = _mechanisms(cfg)
    _check(str(kv_cache_dtype) in SUPPORTED_KV_CACHE_DTYPES, "--kv-cache-dtype",
           f"{names} read 16-bit KV pages (auto, bf16 or fp16), got {kv_cache_dtype}")
    if cfg.claa.enabled:
        _check(int(pp_size or 1) == 1, "--pp-size",
               f"CLAA filters inside one model replica; pipeline parallelism cannot be combined with "
               f"--sparse-prefill claa, got {pp_size}")


def read_model_config(model_path: Optional[str]) -> Optional[Dict[str, Any]]:
    """``<model_path>/config.json`` as a dict when ``model_path`` is a local directory holding one, else None
    (a hub id, or a checkpoint in another format: SGLang resolves those and the backend checks what it can)."""
    if not model_path or not os.path.isdir(model_path):
        return None
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError("--model-path", f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("--model-path", f"{path} does not hold a JSON object")
    return data


def model_field(model_config: Mapping[str, Any], key: str) -> Any:
    """A field of the model's config, looked up at the top and then in a multimodal model's ``text_config``."""
    if key in model_config:
        return model_config[key]
    text = model_config.get("text_config")
    return text.get(key) if isinstance(text, Mapping) else None


def model_num_layers(model_config: Mapping[str, Any]) -> Optional[int]:
    n = model_field(model_config, "num_hidden_layers")
    return int(n) if isinstance(n, int) else None


def _unsupported_feature(model_config: Mapping[str, Any], kv_cache_dtype: str) -> Optional[str]:
    """The first attention feature of the model that the sparse kernels do not implement, described, or None."""
    get = lambda key: model_field(model_config, key)  # noqa: E731
    heads, hidden = get("num_attention_heads"), get("hidden_size")
    head_dim = get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads
                                   else None)
    scalar = get("query_pre_attn_scalar")
    if scalar is not None and scalar != head_dim:
        return (f"attention scaling 1/sqrt(query_pre_attn_scalar={scalar}) instead of 1/sqrt(head_dim={head_dim}) "
                f"(config.json query_pre_attn_scalar)")
    multiplier = get("attention_multiplier")
    if multiplier is not None and not (head_dim and math.isclose(float(multiplier), head_dim ** -0.5, rel_tol=1e-6)):
        return (f"attention scaling {multiplier} instead of 1/sqrt(head_dim) "
                f"(config.json attention_multiplier={multiplier})")
    cap = get("attn_logit_softcapping")
    if cap:
        return f"attention logit soft-capping (config.json attn_logit_softcapping={cap})"
    if get("use_sliding_window") is not False:
        types = get("layer_types")
        if isinstance(types, list):
            sliding = sum("sliding" in str(t) for t in types)
            if sliding:
                return f"sliding-window attention layers (config.json layer_types: {sliding} of {len(types)} sliding)"
        elif get("sliding_window") is not None:
            return f"sliding-window attention (config.json sliding_window={get('sliding_window')})"
    quant = get("quantization_config")
    if isinstance(quant, Mapping) and str(kv_cache_dtype) == "auto":
        inner = quant.get("quantization") if isinstance(quant.get("quantization"), Mapping) else quant
        algo = inner.get("kv_cache_quant_algo")
        if isinstance(algo, str) and algo.upper() == "FP8":
            return (f"an FP8 KV cache (config.json quantization_config kv_cache_quant_algo={algo}, which "
                    f"--kv-cache-dtype auto follows; pass --kv-cache-dtype bf16)")
    return None


def validate_model(cfg: SparseConfig, model_config: Optional[Mapping[str, Any]], *, kv_cache_dtype: str = "auto",
                   sparse_backend: bool = True) -> None:
    """Rules that need the model's ``config.json`` (checked by the launcher before SGLang loads anything).

    ``sparse_backend``: the server will run the ``sparse`` attention backend (the launcher's default), which
    serves multi-head and grouped-query attention only. Nothing is checked without a model config."""
    if model_config is None:
        return
    lora_rank = model_field(model_config, "kv_lora_rank")
    if lora_rank is not None and (sparse_backend or cfg.any_enabled):
        flag = _mechanisms(cfg)[0] if cfg.any_enabled else "--attention-backend"
        raise ConfigError(flag, f"the '{BACKEND_NAME}' backend serves multi-head / grouped-query attention, not "
                                f"multi-head latent attention (config.json kv_lora_rank={lora_rank}); "
                                f"use another --attention-backend with every sparse mechanism off")
    if not cfg.any_enabled:
        return
    flag, names = _mechanisms(cfg)
    feature = _unsupported_feature(model_config, kv_cache_dtype)
    _check(feature is None, flag, f"{names} cannot serve this model: {feature}")
    layers = model_num_layers(model_config)
    if cfg.prhs.enabled and cfg.prhs.select == "estimate":
        head_dim = model_shape(model_config)["head_dim"]
        _check(head_dim is None or key_codes_supported(head_dim), "--prhs-select",
               f"estimate (the default) needs a power-of-two head_dim >= 32, this model has {head_dim}; "
               f"pass --prhs-select bounds")
    if cfg.claa.enabled:
        archs = model_field(model_config, "architectures") or []
        arch = archs[0] if archs else None
        _check(arch in CLAA_ARCHITECTURES, "--sparse-prefill",
               f"CLAA supports {', '.join(CLAA_ARCHITECTURES)} models, got {arch or 'no architectures in config.json'}")
        if layers is not None:
            _check(layers >= 2, "--sparse-prefill", f"CLAA needs a model of at least 2 layers, got {layers}")
            given = cfg.claa.filter_layer
            _check(given is None or given < layers, "--claa-filter-layer",
                   f"must be below the model's {layers} layers, got {given}")
            filter_layer = default_filter_layer(layers) if given is None else given
            if cfg.prhs.enabled:
                g = cfg.prhs.layers_per_selection
                _check(filter_layer % g == 0, "--prhs-layers-per-selection",
                       f"must divide the CLAA filter layer ({filter_layer}) so that no selection group spans it, "
                       f"got {g}")


def validate_with_server_args(cfg: SparseConfig, server_args: Any) -> None:
    """Combinations of our flags with SGLang's resolved flags that cannot be served (checked after SGLang parsed
    its flags, before it loads the model)."""
    if not cfg.any_enabled:
        return
    _check_backends({"--attention-backend": server_args.attention_backend,
                     "--prefill-attention-backend": server_args.prefill_attention_backend,
                     "--decode-attention-backend": server_args.decode_attention_backend})
    spec = getattr(server_args, "speculative_algorithm", None)
    _check(spec in _NO_SPECULATION, "--speculative-algorithm",
           f"speculative decoding cannot be combined with sparse attention, got {spec!r}")
    if cfg.prhs.enabled or cfg.art.enabled or cfg.claa.enabled:
        _check_device(cfg, str(getattr(server_args, "device", None) or "cuda"))
        page = server_args.page_size or 1
        _check(page >= 16, "--page-size",
               f"--sparse-prefill claa / --sparse-decode prhs / --art on decode from KV pages of 16+ tokens "
               f"(--page-size >= 16), got {page}")
        if cfg.prhs.enabled and cfg.prhs.page_size is not None:
            _check(cfg.prhs.page_size == page, "--prhs-page-size",
                   f"must equal --page-size ({page}), got {cfg.prhs.page_size}")
    if cfg.claa.enabled:
        _check(not getattr(server_args, "enable_mixed_chunk", False), "--enable-mixed-chunk",
               "CLAA filters whole prompts; mixed chunked prefill cannot be combined with --sparse-prefill claa")
        chunk = getattr(server_args, "chunked_prefill_size", None)
        if cfg.claa.max_prompt_len and chunk is not None and chunk > 0:
            _check(chunk >= cfg.claa.max_prompt_len, "--chunked-prefill-size",
                   f"must be >= --claa-max-prompt-len ({cfg.claa.max_prompt_len}) so such prompts arrive whole, "
                   f"got {chunk}")
        graph = getattr(server_args, "cuda_graph_backend_prefill", None)
        graph_off = graph == "disabled" or bool(getattr(server_args, "disable_prefill_cuda_graph", False)) \
            or bool(getattr(server_args, "disable_cuda_graph", False))
        _check(graph_off, "--cuda-graph-backend-prefill",
               f"CLAA changes the token count inside the model; prefill CUDA graphs must be off "
               f"(--disable-prefill-cuda-graph), got {graph or 'the default (on)'}")


def adjust_sglang_argv(cfg: SparseConfig, argv: Sequence[str]) -> list[str]:
    """SGLang flags the launcher fills in when the user did not give them.

    * ``--attention-backend sparse`` (our backend; it delegates to FlashInfer when all is off);
    * with PrHS, ART or CLAA: ``--page-size`` = the PrHS page size (default 32), and
      ``--max-running-requests`` 64 (the decode kernels' buffers are sized for it);
    * with CLAA: ``--disable-prefill-cuda-graph`` (filtered batches must run eager), and with
      ``--claa-max-prompt-len N`` a ``--chunked-prefill-size`` >= N so prompts up to N arrive in one chunk.
    """
    out = list(argv)
    if not any(_flag_given(out, f) for f in ("--attention-backend", "--prefill-attention-backend",
                                               "--decode-attention-backend")):
        out += ["--attention-backend", BACKEND_NAME]
    ours = cfg.prhs.enabled or cfg.art.enabled or cfg.claa.enabled
    if ours and not _flag_given(out, "--page-size"):
        out += ["--page-size", str(cfg.prhs.page_size or 32)]
    if ours and not _flag_given(out, "--max-running-requests"):
        out += ["--max-running-requests", str(DEFAULT_MAX_RUNNING_REQUESTS)]
    if cfg.claa.enabled and cfg.claa.max_prompt_len and not _flag_given(out, "--chunked-prefill-size"):
        out += ["--chunked-prefill-size", str(cfg.claa.max_prompt_len)]
    if cfg.claa.enabled and not any(_flag_given(out, f) for f in (
            "--disable-prefill-cuda-graph", "--cuda-graph-backend-prefill", "--disable-cuda-graph")):
        out += ["--disable-prefill-cuda-graph"]
    return out


# ---------------------------------------------------------------------- calibration profiles
# A profile (``python -m sglang_sparse.calibrate``) holds settings measured on one model: PrHS's budget, delta and
# per-layer budget shifts, optionally CLAA's filter layer and keep ratio. It supplies defaults: a flag given on the
# command line wins. It is checked against the model's config.json before SGLang loads anything.
PROFILE_FORMAT = 1
PROFILES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")
MAX_PROFILE_SHIFT = 10
PROFILE_FLAG = "--sparse-profile"
# (profile section, key, flag it is the default of, config section, field)
_PROFILE_DEFAULTS = (("prhs", "budget", "--prhs-budget", "prhs", "budget"),
                     ("prhs", "delta", "--prhs-delta", "prhs", "delta"),
                     ("claa", "filter_layer", "--claa-filter-layer", "claa", "filter_layer"),
                     ("claa", "keep_ratio", "--claa-keep-ratio", "claa", "keep_ratio"))


def model_shape(model_config: Mapping[str, Any]) -> Dict[str, Optional[int]]:
    """The model's layers, KV heads and head dimension from its config.json (None where it does not say)."""
    get = lambda key: model_field(model_config, key)  # noqa: E731
    heads, hidden = get("num_attention_heads"), get("hidden_size")
    head_dim = get("head_dim") or (hidden // heads if _is_int(hidden) and _is_int(heads) and heads else None)
    return {"num_layers": model_num_layers(model_config), "num_kv_heads": get("num_key_value_heads") or heads,
            "head_dim": head_dim}


def read_profile(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(PROFILE_FLAG, f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(PROFILE_FLAG, f"{path} does not hold a JSON object")
    return data


def check_profile(profile: Mapping[str, Any], path: str, model_config: Mapping[str, Any],
                  page_size: Optional[int], page_flag: str = "--page-size") -> None:
    """The profile's format and values, and its model shape against ``model_config``; ``page_size``: the page
    size the command line gives (``page_flag``), or None (the profile's is taken)."""
    def need(cond: bool, message: str) -> None:
        _check(cond, PROFILE_FLAG, f"{path}: {message}")

    need(profile.get("format") == PROFILE_FORMAT,
         f"format must be {PROFILE_FORMAT}, got {profile.get('format')!r}")
    shape = model_shape(model_config)
    keys = {"num_layers": "num_hidden_layers", "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim"}
    for key, model_key in keys.items():
        value = profile.get(key)
        need(_is_int(value) and value > 0, f"{key} must be a positive integer, got {value!r}")
        want = shape[key]
        need(want is None or value == want,
             f"measured on a model with {key} {value}, but this model has {want} (config.json {model_key})")
    num_layers = profile["num_layers"]
    ps = profile.get("page_size")
    need(_is_int(ps) and ps >= 16 and ps & (ps - 1) == 0, f"page_size must be a power of two >= 16, got {ps!r}")
    need(page_size is None or page_size == ps,
         f"measured with pages of {ps} tokens, but the server uses {page_flag} {page_size}")
    prhs = profile.get("prhs")
    need(isinstance(prhs, dict), f"prhs must be an object, got {prhs!r}")
    budget, delta, quantile = prhs.get("budget"), prhs.get("delta"), prhs.get("quantile")
    need(_is_number(budget) and budget > 0 and (budget <= 1 or float(budget).is_integer()),
         f"prhs.budget must be a fraction in (0, 1] or a whole page count, got {budget!r}")
    need(_is_number(delta) and 0 <= delta < 1, f"prhs.delta must be in [0, 1), got {delta!r}")
    need(_is_number(quantile) and 0 <= quantile <= 1, f"prhs.quantile must be in [0, 1], got {quantile!r}")
    shifts = prhs.get("layer_budget_shift")
    need(isinstance(shifts, list) and len(shifts) == num_layers,
         f"prhs.layer_budget_shift must list one shift per layer ({num_layers}), got "
         f"{len(shifts) if isinstance(shifts, list) else repr(shifts)}")
    bad = [x for x in shifts if not (_is_int(x) and 0 <= x <= MAX_PROFILE_SHIFT)]
    need(not bad, f"prhs.layer_budget_shift values must be integers in [0, {MAX_PROFILE_SHIFT}], got {bad[:3]!r}")
    claa = profile.get("claa")
    need(claa is None or isinstance(claa, dict), f"claa must be null or an object, got {claa!r}")
    if claa is not None:
        fl, keep = claa.get("filter_layer"), claa.get("keep_ratio")
        need(_is_int(fl) and 1 <= fl < num_layers, f"claa.filter_layer must be in [1, {num_layers}), got {fl!r}")
        need(_is_number(keep) and 0 < keep <= 1, f"claa.keep_ratio must be in (0, 1], got {keep!r}")


def _model_names(model_path: Optional[str], model_config: Mapping[str, Any]) -> set:
    names = set()
    for name in (model_config.get("_name_or_path"), model_path):
        if isinstance(name, str) and name.strip("/"):
            names |= {name, os.path.basename(os.path.normpath(name))}
    return names


def find_profile(model_path: Optional[str], model_config: Mapping[str, Any],
                 directory: Optional[str] = None) -> Tuple[Optional[str], list[tuple[int, str]]]:
    """``--sparse-profile auto``: the shipped profile (in ``directory``, default :data:`PROFILES_DIR`) whose
    ``model`` is the model's config.json ``_name_or_path`` or the model directory's name (or ends in it); the
    first by file name when several do. Returns (its path or None, lines to log)."""
    directory = PROFILES_DIR if directory is None else directory
    names = _model_names(model_path, model_config)
    files = sorted(f for f in os.listdir(directory) if f.endswith(".json")) if os.path.isdir(directory) else []
    found, notes = [], []
    for f in files:
        path = os.path.join(directory, f)
        try:
            model = read_profile(path).get("model")
        except ConfigError as e:
            notes.append((logging.WARNING, f"sglang_sparse: {e} (skipped)"))
            continue
        if isinstance(model, str) and model and (model in names or os.path.basename(model.rstrip("/")) in names):
            found.append(path)
    if not found:
        notes.append((logging.INFO, f"sglang_sparse: {PROFILE_FLAG} auto: no profile in {directory} matches "
                                    f"{' or '.join(sorted(names)) or 'this model'}; no profile is used"))
        return None, notes
    if len(found) > 1:
        notes.append((logging.WARNING, f"sglang_sparse: {PROFILE_FLAG} auto: {len(found)} profiles match "
                                       f"({', '.join(os.path.basename(x) for x in found)}); using the first"))
    notes.append((logging.INFO, f"sglang_sparse: {PROFILE_FLAG} auto: using {found[0]}"))
    return found[0], notes


def apply_profile(cfg: SparseConfig, argv: Sequence[str], model_path: Optional[str],
                  model_config: Optional[Mapping[str, Any]],
                  page_size: Optional[int] = None) -> Tuple[SparseConfig, list[tuple[int, str]]]:
    """``cfg`` with the defaults of its ``--sparse-profile`` (``cfg.profile``: a path or ``auto``) filled in where
    ``argv`` (the command line) does not give the flag, and the lines to log. ``page_size``: SGLang's
    ``--page-size`` when given; without it (and without ``--prhs-page-size``) the profile's page size is used.
    Raises :class:`ConfigError` naming ``--sparse-profile`` for a profile that cannot be read, is malformed or
    was measured on another model shape or page size."""
    if cfg.profile is None:
        return cfg, []
    notes: list[tuple[int, str]] = []
    if model_config is None:
        if cfg.profile == "auto":
            notes.append((logging.INFO, f"sglang_sparse: {PROFILE_FLAG} auto: --model-path is not a local model "
                                        f"directory with a config.json; no profile is used"))
            return dataclasses.replace(cfg, profile=None), notes
        raise ConfigError(PROFILE_FLAG, f"a profile is checked against the model's config.json; --model-path "
                                        f"{model_path} is not a local model directory holding one")
    path = cfg.profile
    if path == "auto":
        path, notes = find_profile(model_path, model_config)
        if path is None:
            return dataclasses.replace(cfg, profile=None), notes
    profile = read_profile(path)
    given_page = page_size if page_size is not None else cfg.prhs.page_size
    check_profile(profile, path, model_config, given_page,
                  "--page-size" if page_size is not None else "--prhs-page-size")

    values: Dict[str, Dict[str, Any]] = {"prhs": {}, "claa": {}}
    kept, set_ = [], []
    for psec, key, flag, section, name in _PROFILE_DEFAULTS:
        part = profile.get(psec)
        if part is None:
            continue
        if _flag_given(argv, flag):
            kept.append(flag)
        else:
            values[section][name] = part[key]
            set_.append(f"{flag} {part[key]:g}")
    shifts = tuple(profile["prhs"]["layer_budget_shift"])
    values["prhs"]["layer_budget_shift"] = shifts
    if _flag_given(argv, "--prhs-select"):
        kept.append("--prhs-select")
    else:               # the calibration measured the key-bound ranking: its budget and shifts are for that ranking
        values["prhs"]["select"] = "bounds"
        set_.append("--prhs-select bounds")
    if given_page is None:
        values["prhs"]["page_size"] = profile["page_size"]
        set_.append(f"--page-size {profile['page_size']}")
    set_.append(f"per-layer PrHS budget shifts {list(shifts)}")
    try:
        new = dataclasses.replace(cfg, profile=path, prhs=dataclasses.replace(cfg.prhs, **values["prhs"]),
                                  claa=dataclasses.replace(cfg.claa, **values["claa"]))
        validate_values(new)
    except ConfigError as e:
        raise ConfigError(PROFILE_FLAG, f"{path}: with the profile's settings, {e}") from None
    about = ", ".join(f"{k} {profile[k]}" for k in ("model", "created_by", "device") if profile.get(k) is not None)
    notes.append((logging.INFO, f"sglang_sparse: profile {path} ({about}) sets {'; '.join(set_)}"
                                + (f"; the command line's {', '.join(kept)} kept" if kept else "")))
    if "--prhs-budget" in kept and any(shifts) and new.prhs.budget != profile["prhs"]["budget"]:
        notes.append((logging.WARNING, f"sglang_sparse: the profile's budget shifts were measured at --prhs-budget "
                                       f"{profile['prhs']['budget']:g}, the command line gives {new.prhs.budget:g}"))
    if not (new.prhs.enabled or new.claa.enabled):
        notes.append((logging.INFO, "sglang_sparse: the profile's settings take effect with --sparse-decode prhs "
                                    "(budget, delta, shifts) and --sparse-prefill claa (filter layer, keep ratio)"))
    return new, notes
