"""``highres3d models list|make-preset``: the pretrained models (presets) highres3d knows.

``list`` shows every preset: name, task, inputs, classes, parameters, test
Dice on held-out synthetic subjects and how it was made.  Use one anywhere a
model is accepted as ``preset:NAME`` (``transfer.source``, ``infer --model``).
Folders listed in ``$HIGHRES3D_PRESETS`` add a lab's own presets.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list the pretrained models (presets) or make one",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="every preset with its task, inputs, scores and origin")
    listing.add_argument("--commands", action="store_true", help="also print the command that made each preset")
    listing.set_defaults(func=run_list)
    make = sub.add_parser("make-preset", help="synthesise data, train, evaluate and write a preset folder")
    make.add_argument("name", help="the preset's name")
    make.add_argument("--config", required=True, help="training config (path or shipped name)")
    make.add_argument("--task", required=True, help="one line: what the model segments from what")
    make.add_argument("--generator", choices=("ixi", "brats"), default="ixi", help="synthetic data set (default ixi)")
    make.add_argument("--subjects", type=int, default=40, help="synthetic subjects (default 40)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("-o", "--output", default=".", help="folder to create the preset folder in (default: here)")
    make.add_argument("--workdir", help="keep data and the run here (default: a temporary folder)")
    make.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    make.add_argument("--no-progress", action="store_true", help="no progress display")
    make.set_defaults(func=run_make)


def run_list(args) -> int:
    from highres3d.presets import list_presets, preset_folders
    from highres3d.reporting import Table

    presets = list_presets()
    table = Table("presets (use as preset:NAME)",
                  ["name", "task", "inputs", "classes", "parameters", "test Dice (held-out synthetic)", "made"],
                  [p.summary_row() for p in presets],
                  [f"looked up in: {', '.join(str(f) for f in preset_folders())}"])
    print(table)
    if args.commands:
        for p in presets:
            print(f"{p.name}: {p.info.get('made', {}).get('command', '?')}")
    return 0


def run_make(args) -> int:
    from highres3d.presets import make_preset

    make_preset(args.name, args.config, args.output, task=args.task, generator=args.generator,
                subjects=args.subjects, seed=args.seed, overrides=args.overrides, workdir=args.workdir,
                show_progress=False if args.no_progress else None)
    return 0
