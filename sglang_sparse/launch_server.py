"""``python -m sglang_sparse.launch_server``: SGLang's server with sparse attention.

Takes every flag of ``python -m sglang.launch_server`` plus sglang_sparse's group (see ``--help``).

    python -m sglang_sparse.launch_server --model-path DIR [sglang flags] \
        [--sparse-prefill claa ...] [--sparse-decode prhs ...] [--art on ...]

Steps: split our flags from SGLang's; range-check ours; register the ``sparse`` backend and the
patches; fill in SGLang flags we depend on (``--attention-backend sparse`` unless one is given,
``--page-size`` for PrHS/ART, ``--chunked-prefill-size`` for CLAA's longest prompt); let SGLang
parse and resolve its own flags; check the combination; publish the config to the environment
and to ``ServerArgs``; start SGLang's HTTP server with a scheduler entry that registers us first.
Any bad value or combination exits with status 2 and one line naming the flag, before a model
is loaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from sglang_sparse import config as cfgmod

logger = logging.getLogger("sglang_sparse.launch_server")
PROG = "python -m sglang_sparse.launch_server"


def build_help_parser() -> argparse.ArgumentParser:
    """SGLang's full parser with sglang_sparse's group added (used for ``--help``)."""
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ServerArgs.add_cli_args(parser)
    cfgmod.add_cli_args(parser)
    return parser


def _fail(message: str) -> "NoReturn":  # noqa: F821
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def prepare(argv: Sequence[str]):
    """Parse and validate; returns (SparseConfig, ServerArgs). Exits 2 on a bad flag."""
    try:
        cfg, rest = cfgmod.parse_known_args(argv)
    except cfgmod.ConfigError as e:
        _fail(str(e))

    from sglang_sparse.plugin import register

    register()
    sglang_argv = cfgmod.adjust_sglang_argv(cfg, rest)

    from sglang.srt.server_args import prepare_server_args

    # SGLang's own parser reports its errors (usage + one line) and exits 2 itself.
    server_args = prepare_server_args(sglang_argv)
    try:
        cfgmod.validate_with_server_args(cfg, server_args)
    except cfgmod.ConfigError as e:
        _fail(str(e))
    cfg.export()
    object.__setattr__(server_args, cfgmod.SERVER_ARGS_ATTR, cfg.to_json())
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
