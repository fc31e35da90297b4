"""Arguments shared by several commands."""
from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    """``CONFIG`` (a path or the bare name of a shipped config), ``--data-root`` and ``--set``."""
    help_text = ("a YAML config file, the name of a config shipped with highres3d (e.g. brats_freeze2.yaml), "
                 "or a NiftyNet .ini (converted on the fly)")
    if positional:
        parser.add_argument("config", metavar="CONFIG", help=help_text)
    else:
        parser.add_argument("-c", "--config", required=True, help=help_text)
    parser.add_argument(
        "--data-root",
        help="dataset folder, replacing dataset.root; with datasets: a folder holding one folder per dataset name "
             "(default: $HIGHRES3D_DATA_ROOT, else the config's)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set training.lr=1e-4 (repeatable)",
    )


def load_config_from_args(args):
    from highres3d.config import load_config
    from highres3d.niftynet.ini import is_ini, load_ini_config

    if is_ini(args.config):
        # A NiftyNet .ini is converted on the fly (highres3d config from-niftynet shows the result).
        return load_ini_config(args.config, overrides=args.overrides, data_root=args.data_root)[0]
    return load_config(args.config, overrides=args.overrides, data_root=args.data_root)
