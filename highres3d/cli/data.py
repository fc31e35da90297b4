"""``highres3d data check``: validate every subject of a dataset and summarise it."""
from __future__ import annotations

from highres3d.cli.common import add_config_arguments, load_config_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="check and summarise a dataset", description=__doc__)
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = sub.add_parser(
        "check",
        help="validate every subject (files read, grids agree, labels mapped, no NaN) and print a summary",
    )
    add_config_arguments(check, positional=True)
    check.add_argument("--no-labels", action="store_true", help="do not require label files (inference-only data)")
    check.set_defaults(func=run_check)


def run_check(args) -> int:
    from highres3d.data.check import check_dataset

    cfg = load_config_from_args(args)
    report = check_dataset(cfg, require_labels=not args.no_labels)
    print(report.summary())
    return 0 if report.ok else 1
