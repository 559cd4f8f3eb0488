"""The ``nezha-zoo`` command line.

nezha-zoo demo                 build a small Electra, load it in every backend, compare
nezha-zoo inspect DIR [--json] family, head, parameter count, dtypes, missing/unexpected tensors
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

__all__ = ["main"]


def _cmd_inspect(args: argparse.Namespace) -> int:
    from nezha_zoo.conversion.inspect import inspect_checkpoint

    info = inspect_checkpoint(args.path, head=args.head)
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        lines = [
            f"path        {info['path']}",
            f"format      {info['format']}",
            f"family      {info['family']} ({info['model_type']})",
            f"class       {info['class']}",
            f"parameters  {info['parameters']:,} declared, {info['parameters_in_checkpoint']:,} in the checkpoint",
            f"tensors     {info['tensors']}  dtypes {info['dtypes']}",
            f"missing     {', '.join(info['missing_keys']) or 'none'}",
            f"unexpected  {', '.join(info['unexpected_keys']) or 'none'}",
        ]
        sys.stdout.write("\n".join(lines) + "\n")
    return 1 if info["missing_keys"] or info["unexpected_keys"] else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from nezha_zoo.demo import main as demo_main

    return demo_main(["--out", args.out] if args.out else [])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nezha-zoo",
        description="Six transformer families for PyTorch, TensorFlow/Keras and Flax from one spec.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="describe a checkpoint directory against the spec")
    p.add_argument("path", help="directory with config.json and weights")
    p.add_argument("--head", help="head to check against (default: from config.json's architectures)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("demo", help="build a small Electra and compare PyTorch, TensorFlow and Flax on it")
    p.add_argument("--out", help="directory to save the demo checkpoint in (default: a temporary one)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        sys.stderr.write(f"nezha-zoo: error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
