"""``python -m sglang_sparse.launch_server``: SGLang's server with sparse attention.

Takes every flag of ``python -m sglang.launch_server`` plus sglang_sparse's group (see ``--help``).

    python -m sglang_sparse.launch_server --model-path DIR [sglang flags] \
        [--sparse-prefill claa ...] [--sparse-decode prhs ...] [--art on ...]

Steps, the cheap ones first so that a mistake is reported within a second, before SGLang (and torch)
are imported:

1. read the few SGLang flags we depend on from the command line (:func:`read_sglang_flags`); refuse a
   missing ``--model-path`` or a local-looking model path that does not exist;
2. split our flags from SGLang's and range-check ours; with ``--sparse-profile``, read the profile, check it
   against the model's config.json and ``--page-size``, and fill in the flags the command line does not give;
3. read ``<model-path>/config.json`` (a local directory) and check every rule that needs the model
   (depth against the CLAA filter layer, unsupported attention features) or the command line
   (KV-cache dtype, device, pipeline parallelism);
4. without ``--device`` (or with ``--device cuda``), make sure there is an accelerator (a CUDA GPU), else
   suggest ``--device cpu``;
5. fill in SGLang flags we depend on (``--attention-backend sparse`` unless one is given, ``--page-size``
   and ``--max-running-requests`` for the mechanisms, ``--chunked-prefill-size`` for CLAA's longest
   prompt; on a CPU a bounded ``--max-total-tokens``; in the interpreted developer mode
   ``--skip-server-warmup``);
6. import SGLang, register the ``sparse`` backend and the patches, let SGLang parse and resolve its
   flags, check the combination, attach the configuration to ``ServerArgs`` and start SGLang's HTTP
   server with a scheduler entry that registers us first.

Any bad value or combination exits with status 2 and one line ``python -m sglang_sparse.launch_server:
error: <flag>: <why>``, before a model is loaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, List, Mapping, NoReturn, Optional, Sequence, Tuple

from sglang_sparse import config as cfgmod

logger = logging.getLogger("sglang_sparse.launch_server")
PROG = "python -m sglang_sparse.launch_server"

# KV pool of a CPU server (--device cpu) when neither --max-total-tokens nor --mem-fraction-static is given:
# the model's context length, at most this many tokens and this many bytes of KV (README "Serve").
CPU_KV_MAX_TOKENS = 32768
CPU_KV_MAX_BYTES = 2 << 30
CPU_ENGINE_ENV = "SGLANG_USE_CPU_ENGINE"      # SGLang's own switch: 1 = serve on the host CPU

Notes = List[Tuple[int, str]]


@dataclass(frozen=True)
class SGLangFlags:
    """The SGLang flags the launcher reads itself, before SGLang is imported (all of them still go to SGLang).

    Values are kept as given; a malformed one is left for SGLang's own parser to report."""

    model_path: Optional[str] = None
    config_file: Optional[str] = None
    device: Optional[str] = None
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    context_length: Optional[str] = None
    max_total_tokens: Optional[str] = None
    mem_fraction_static: Optional[str] = None
    pp_size: str = "1"
    page_size: Optional[str] = None
    skip_server_warmup: bool = False
    json_model_override_args: Optional[str] = None
    attention_backend: Optional[str] = None
    prefill_attention_backend: Optional[str] = None
    decode_attention_backend: Optional[str] = None


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def read_sglang_flags(argv: Sequence[str]) -> Optional[SGLangFlags]:
    """The flags of :class:`SGLangFlags` found in ``argv`` (SGLang's spellings and aliases), or None when the
    command line cannot be read this way (then SGLang's parser reports the problem)."""
    p = _RaisingParser(add_help=False, allow_abbrev=False)
    p.add_argument("--model-path", "--model", dest="model_path")
    p.add_argument("--config", dest="config_file")
    for flag in ("--device", "--dtype", "--kv-cache-dtype", "--context-length", "--max-total-tokens",
                 "--mem-fraction-static", "--json-model-override-args", "--page-size", "--attention-backend",
                 "--prefill-attention-backend", "--decode-attention-backend"):
        p.add_argument(flag)
    p.add_argument("--pp-size", "--pipeline-parallel-size", dest="pp_size")
    p.add_argument("--skip-server-warmup", action="store_true")
    try:
        ns, _ = p.parse_known_args(list(argv))
    except ValueError:
        return None
    return SGLangFlags(**{k: v for k, v in vars(ns).items() if v is not None})


def _looks_local(path: str) -> bool:
    """A path meant as a local file or directory rather than a hub id ``org/name``: absolute, starting with
    ``./`` or ``../``, or inside a directory that exists."""
    if os.path.isabs(path) or path in (".", "..") or path.startswith(("./", "../")):
        return True
    parent = os.path.dirname(path)
    return bool(parent) and os.path.isdir(parent)


def check_model_path(flags: SGLangFlags) -> None:
    if flags.model_path is None:
        if flags.config_file is None:       # a --config file may name the model; SGLang reads it
            raise cfgmod.ConfigError("--model-path", "missing; give the model to serve: a local model directory "
                                                     "or a Hugging Face model id (org/name)")
        return
    path = flags.model_path
    if _looks_local(path) and not os.path.exists(path):
        raise cfgmod.ConfigError("--model-path", f"{path} does not exist (a local path; a Hugging Face model id "
                                                 f"has the form org/name)")


def model_config_with_overrides(flags: SGLangFlags) -> Optional[Mapping[str, Any]]:
    """``config.json`` of a local model with ``--json-model-override-args`` applied, as SGLang will see it."""
    model_config = cfgmod.read_model_config(flags.model_path)
    if model_config is not None and flags.json_model_override_args:
        import json

        try:
            overrides = json.loads(flags.json_model_override_args)
        except ValueError as e:
            raise cfgmod.ConfigError("--json-model-override-args", f"not valid JSON ({e})") from None
        if isinstance(overrides, dict):
            model_config = {**model_config, **overrides}
    return model_config


def requested_device(flags: SGLangFlags, environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The device named by ``--device``, or ``cpu`` when SGLang's CPU engine is switched on, else None (SGLang
    picks an accelerator)."""
    if flags.device:
        return flags.device.split(":")[0]
    return "cpu" if environ.get(CPU_ENGINE_ENV) == "1" else None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def accelerator_available() -> bool:
    """Whether SGLang will find an accelerator when no ``--device`` is given (CUDA first, as SGLang looks)."""
    import torch

    if cuda_available():
        return True
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True
    if torch.backends.mps.is_available():
        return True
    # NPU, HPU and MUSA come with their own torch extensions; SGLang probes those itself.
    return any(importlib.util.find_spec(m) is not None for m in ("torch_npu", "habana_frameworks", "torchada"))


def _as_int(text: Optional[str]) -> Optional[int]:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def cpu_kv_tokens(flags: SGLangFlags, model_config: Optional[Mapping[str, Any]]) -> int:
    """KV pool size (tokens) of a CPU server: room for one request of the model's full context (``--context-length``
    if given, else ``max_position_embeddings``), at most :data:`CPU_KV_MAX_TOKENS` tokens and
    :data:`CPU_KV_MAX_BYTES` bytes of K and V."""
    get = (lambda key: cfgmod.model_field(model_config, key)) if model_config is not None else (lambda key: None)
    context = _as_int(flags.context_length) or get("max_position_embeddings")
    tokens = min(context, CPU_KV_MAX_TOKENS) if isinstance(context, int) and context > 0 else CPU_KV_MAX_TOKENS
    layers, heads = get("num_hidden_layers"), get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or (get("hidden_size") // heads if get("hidden_size") and heads else None)
    if all(isinstance(x, int) and x > 0 for x in (layers, kv_heads, head_dim)):
        elem = 4 if flags.dtype in ("float", "float32") else 2
        per_token = 2 * layers * kv_heads * head_dim * elem
        tokens = min(tokens, max(1, CPU_KV_MAX_BYTES // per_token))
    return max(tokens, 2)


def launcher_defaults(cfg: cfgmod.SparseConfig, flags: SGLangFlags, device: Optional[str],
                      model_config: Optional[Mapping[str, Any]]) -> Tuple[List[str], Notes]:
    """SGLang flags the launcher adds for a CPU server, with the lines it logs about them."""
    extra: List[str] = []
    notes: Notes = []
    if device != "cpu":
        return extra, notes
    if flags.max_total_tokens is None and flags.mem_fraction_static is None:
        tokens = cpu_kv_tokens(flags, model_config)
        extra += ["--max-total-tokens", str(tokens)]
        notes.append((logging.INFO, f"sglang_sparse: --device cpu: KV cache of --max-total-tokens {tokens} (the "
                                    f"model's context, at most {CPU_KV_MAX_TOKENS} tokens and "
                                    f"{CPU_KV_MAX_BYTES >> 30} GiB); pass --max-total-tokens or "
                                    f"--mem-fraction-static to size it yourself"))
    if cfgmod.interpreted_decode() and (cfg.prhs.enabled or cfg.art.enabled):
        skip = "" if flags.skip_server_warmup else "; server warm-up skipped (--skip-server-warmup)"
        if not flags.skip_server_warmup:
            extra.append("--skip-server-warmup")
        notes.append((logging.WARNING, f"sglang_sparse: decode kernels run in Triton's interpreter "
                                       f"({cfgmod.INTERPRET_ENV}=1, TRITON_INTERPRET=1): a decode step takes "
                                       f"minutes{skip}"))
    return extra, notes


def check_before_sglang(argv: Sequence[str]) -> Tuple[cfgmod.SparseConfig, List[str], Notes]:
    """Everything that can be checked without SGLang, cheapest first. Returns our config, the argument list for
    SGLang and the lines to log once logging is set up; raises :class:`ConfigError` naming the flag at fault."""
    flags = read_sglang_flags(argv)
    if flags is not None:
        check_model_path(flags)
    cfg, rest = cfgmod.parse_known_args(argv)
    if flags is None:
        if cfg.profile is not None:
            raise cfgmod.ConfigError(cfgmod.PROFILE_FLAG, "cannot read --model-path from the command line to check "
                                                          "the profile against")
        return cfg, cfgmod.adjust_sglang_argv(cfg, rest), []
    profile_notes: Notes = []
    if cfg.profile is not None:
        cfg, profile_notes = cfgmod.apply_profile(cfg, argv, flags.model_path, model_config_with_overrides(flags),
                                                  page_size=_as_int(flags.page_size))
    sglang_argv = cfgmod.adjust_sglang_argv(cfg, rest)
    device = requested_device(flags)
    cfgmod.validate_launch(cfg, device=device, kv_cache_dtype=flags.kv_cache_dtype, pp_size=_as_int(flags.pp_size),
                           backends={"--attention-backend": flags.attention_backend,
                                     "--prefill-attention-backend": flags.prefill_attention_backend,
                                     "--decode-attention-backend": flags.decode_attention_backend})
    model_config = model_config_with_overrides(flags)
    backends = read_sglang_flags(sglang_argv)
    sparse_backend = cfgmod.BACKEND_NAME in (backends.attention_backend, backends.prefill_attention_backend,
                                             backends.decode_attention_backend) if backends else True
    cfgmod.validate_model(cfg, model_config, kv_cache_dtype=flags.kv_cache_dtype, sparse_backend=sparse_backend)
    if device is None and not accelerator_available():
        raise cfgmod.ConfigError("--device", "no GPU or other accelerator found; to serve on the CPU pass "
                                             f"--device cpu (with {CPU_ENGINE_ENV}=1)")
    if device == "cuda" and not cuda_available():
        raise cfgmod.ConfigError("--device", "cuda: no CUDA GPU found; to serve on the CPU pass "
                                             f"--device cpu (with {CPU_ENGINE_ENV}=1)")
    extra, notes = launcher_defaults(cfg, flags, device, model_config)
    return cfg, sglang_argv + extra, profile_notes + notes


def build_help_parser() -> argparse.ArgumentParser:
    """SGLang's full parser with sglang_sparse's group added (used for ``--help``)."""
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ServerArgs.add_cli_args(parser)
    cfgmod.add_cli_args(parser)
    return parser


def _fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def prepare(argv: Sequence[str]):
    """Check, then parse with SGLang; returns (SparseConfig, ServerArgs). Exits 2 on a bad flag."""
    try:
        cfg, sglang_argv, notes = check_before_sglang(argv)
    except cfgmod.ConfigError as e:
        _fail(str(e))

    from sglang_sparse.plugin import register

    register()

    from sglang.srt.server_args import prepare_server_args

    # SGLang's own parser reports its errors (usage + one line) and exits 2 itself.
    server_args = prepare_server_args(sglang_argv)
    try:
        cfgmod.validate_with_server_args(cfg, server_args)
    except cfgmod.ConfigError as e:
        _fail(str(e))
    cfgmod.attach(server_args, cfg)
    for level, line in notes + cfgmod.environment_notes():
        logger.log(level, "%s", line)
    return cfg, server_args


def serve(server_args) -> None:
    from sglang_sparse.plugin import run_scheduler_process

    if server_args.encoder_only or server_args.smg_grpc_mode or server_args.use_ray:
        # Other serving modes start their schedulers themselves; the plugin entry point
        # (installed package) registers the backend there.
        from sglang.launch_server import run_server

        run_server(server_args)
        return
    from sglang.srt.entrypoints.http_server import launch_server

    launch_server(server_args, run_scheduler_process_func=run_scheduler_process)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        build_help_parser().print_help()
        return
    cfg, server_args = prepare(argv)
    logger.info("sglang_sparse config: %s", cfg.to_json())
    from sglang.srt.utils import kill_process_tree

    try:
        serve(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
