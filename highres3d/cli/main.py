"""Entry point of the ``highres3d`` command.

Each command group lives in its own module exposing ``register(subparsers)``,
which adds a parser whose ``func(args) -> int`` does the work.  Modules import
TensorFlow lazily inside ``func`` so that ``--help`` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from highres3d import __version__
from highres3d.errors import Highres3dError
from highres3d.signals import Terminated, sigterm_as_interrupt

# Order here is the order shown by ``highres3d --help``.
COMMAND_MODULES = [
    "highres3d.cli.demo",
    "highres3d.cli.synth",
    "highres3d.cli.config",
    "highres3d.cli.data",
    "highres3d.cli.show",
    "highres3d.cli.train",
    "highres3d.cli.status",
    "highres3d.cli.cluster",
    "highres3d.cli.experiment",
    "highres3d.cli.infer",
    "highres3d.cli.evaluate",
    "highres3d.cli.inspect",
    "highres3d.cli.models",
    "highres3d.cli.niftynet",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="highres3d",
        description="Patch-based 3D segmentation and transfer learning with HighRes3DNet (TensorFlow 2 / Keras 3).",
    )
    parser.add_argument("--version", action="version", version=f"highres3d {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if not args.verbose:
        # TensorFlow's C++ start-up chatter buries the messages users need.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        with sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except Highres3dError as err:
        if args.verbose:
            raise
        print(f"highres3d: error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        # 128 + SIGTERM, the status schedulers and shells expect of a terminated process.
        print("highres3d: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("highres3d: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
