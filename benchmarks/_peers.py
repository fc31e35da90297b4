"""Which interpreter runs the peers (MONAI, TorchIO on torch): one flag, one environment variable.

The peers live in a virtual environment of their own (``benchmarks/README.md``
creates it in one command).  Every benchmark takes its interpreter from
``--peers-python PATH``, whose default is the environment variable
``HIGHRES3D_PEERS_PYTHON``; there is no built-in path.  With neither, the
peers are skipped with one line on stderr; a path that does not exist is an
error.  ``--no-peers`` skips them on purpose.

The scripts run as ``python benchmarks/X.py``, so this folder is
``sys.path[0]`` and ``import _peers`` finds this module.
"""
from __future__ import annotations

import argparse
import os
import sys

ENV_VAR = "HIGHRES3D_PEERS_PYTHON"
HOW_TO = f"set {ENV_VAR} or pass --peers-python PATH (see benchmarks/README.md)"


def add_arguments(parser: argparse.ArgumentParser, peers: str = "MONAI / TorchIO") -> None:
    """Adds ``--peers-python`` (default: ``$HIGHRES3D_PEERS_PYTHON``) and ``--no-peers``."""
    default = os.environ.get(ENV_VAR) or None
    now = (default or "unset").replace("%", "%%")  # argparse %-formats help strings
    parser.add_argument(
        "--peers-python", metavar="PATH", default=default,
        help=f"Python interpreter with the peers installed (default: ${ENV_VAR}, now {now})",
    )
    parser.add_argument("--no-peers", action="store_true", help=f"skip {peers}")


def resolve(args: argparse.Namespace) -> str | None:
    """The peers' interpreter, or None when they are skipped; exits when the given path does not exist.

    The path is made absolute but symlinks are kept: a virtual environment's
    ``bin/python`` is a symlink, and following it would leave the environment.
    """
    if args.no_peers:
        return None
    if not args.peers_python:
        print(f"peers skipped: no interpreter for them; {HOW_TO}", file=sys.stderr, flush=True)
        return None
    path = os.path.abspath(os.path.expanduser(args.peers_python))
    if not os.path.isfile(path):
        sys.exit(f"error: peers interpreter {path} does not exist (from --peers-python or {ENV_VAR}); "
                 f"create it as benchmarks/README.md says, or pass --no-peers")
    return path
