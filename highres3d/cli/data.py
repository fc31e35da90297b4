"""``highres3d data check|landmarks``: validate a dataset; learn histogram-standardisation landmarks."""
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
    landmarks = sub.add_parser(
        "landmarks",
        help="learn histogram-standardisation landmarks from the training subjects (NiftyNet histogram_ref_file format)",
    )
    add_config_arguments(landmarks, positional=True)
    landmarks.add_argument("-o", "--output", metavar="FILE",
                           help="landmark file to write (default: preprocessing.histogram.ref_file)")
    landmarks.add_argument("--overwrite", action="store_true", help="replace an existing landmark file")
    landmarks.set_defaults(func=run_landmarks)


def run_check(args) -> int:
    from highres3d.data.check import check_dataset

    cfg = load_config_from_args(args)
    if cfg.datasets:
        from highres3d.data.dataset import Dataset
        from highres3d.training.multidomain import domain_configs, resolve_spacings

        # Each dataset at the working spacing training will use (its median spacing unless given).
        resolved = resolve_spacings(cfg, [Dataset.from_config(c.dataset) for c in domain_configs(cfg)])
        ok = True
        for domain in domain_configs(resolved):
            report = check_dataset(domain, require_labels=not args.no_labels)
            print(f"== {domain.dataset.name} (spacing {list(domain.preprocessing.spacing)} mm)\n{report.summary()}")
            ok = ok and report.ok
        return 0 if ok else 1
    report = check_dataset(cfg, require_labels=not args.no_labels)
    print(report.summary())
    return 0 if report.ok else 1


def run_landmarks(args) -> int:
    from pathlib import Path

    from highres3d.data import histogram
    from highres3d.data.dataset import Dataset
    from highres3d.errors import ConfigError, DataError, Highres3dError

    cfg = load_config_from_args(args)
    target = Path(args.output) if args.output else cfg.preprocessing.histogram.ref_file
    if target is None:
        raise ConfigError("no output file: pass -o FILE or set preprocessing.histogram.ref_file")
    if target.exists() and not args.overwrite:
        raise Highres3dError(f"{target}: already exists; pass --overwrite to replace it")
    dataset = Dataset.from_config(cfg.dataset)
    for problem in dataset.problems:
        print(f"warning: {problem}")
    subjects = dataset.split("training")
    if not subjects:
        raise DataError(f"no training subjects to learn landmarks from (splits: {dataset.counts()})")
    learned = histogram.learn_from_subjects(subjects, cfg.preprocessing, list(cfg.dataset.modalities))
    # Keep what else the file holds (NiftyNet's label mapping, other modalities), as NiftyNet did.
    entries = histogram.read_ref_file(target) if target.is_file() else {}
    entries.update({m: tuple(v) for m, v in learned.items()})
    histogram.write_ref_file(target, entries, overwrite=True)
    print(f"landmarks of {len(subjects)} training subjects (cutoff {cfg.preprocessing.histogram.cutoff}):")
    print(histogram.format_landmarks(learned))
    print(f"written to {target}")
    return 0
