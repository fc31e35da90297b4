"""``highres3d train --config FILE``: train HighResNet3D end to end into a run folder.

``FILE`` may be a NiftyNet ``.ini``: it is converted (as ``highres3d config
from-niftynet`` does), a ``starting_iter`` checkpoint is imported first, and
the converted YAML is kept in the run folder as ``niftynet_config.yaml``.
"""
from __future__ import annotations

from highres3d.cli.common import add_config_arguments, load_config_from_args
from highres3d.niftynet.ini import is_ini


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model from a config (checkpoints, validation, best model, resume)",
        description=__doc__ + "\n\nExample: highres3d train --config brats_freeze2.yaml --data-root /data/BraTS18/HGG",
    )
    add_config_arguments(parser)
    parser.add_argument("--run-dir", help="run folder (default: <training.output_dir>/<config file name>)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its newest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in the run folder")
    parser.add_argument("--subset", type=int, metavar="K", help="train on the nested training subset S_K only")
    parser.add_argument("--max-iter", type=int, help="override training.max_iter")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from highres3d.training import train

    if args.max_iter is not None:
        args.overrides.append(f"training.max_iter={args.max_iter}")
    cfg = load_config_from_args(args)
    conversion = None
    if is_ini(args.config):
        from highres3d.niftynet.ini import convert_ini, import_pending

        conversion = convert_ini(args.config)
        import_pending(conversion)  # starting_iter: the NiftyNet checkpoint becomes transfer.source
    result = train(cfg, args.run_dir, resume=args.resume, overwrite=args.overwrite, subset=args.subset,
                   show_progress=False if args.no_progress else None)
    if conversion is not None:
        from highres3d.niftynet.ini import save_conversion

        save_conversion(conversion, result.run_dir)
    best = f"{result.best_score:.4f} at iteration {result.best_iteration}" if result.best_score is not None else "n/a"
    print(f"done: {result.iterations} iterations in {result.wall_time:.0f} s; best validation Dice {best}; "
          f"run folder {result.run_dir}")
    return 0
