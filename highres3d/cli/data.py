"""``highres3d data check|landmarks|cache``: validate a dataset; learn histogram-standardisation landmarks;
show and prune the preprocessed volumes of ``training.cache: disk``."""
from __future__ import annotations

import time

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
    cache = sub.add_parser(
        "cache",
        help="show the preprocessed volumes of training.cache: disk (training.cache_dir) and remove those no run uses",
    )
    add_config_arguments(cache, positional=True)
    cache.add_argument("--prune-unused", type=float, metavar="DAYS",
                       help="remove the entries no run has read for DAYS days (0: all), and temporary folders "
                            "of killed jobs a day old")
    cache.add_argument("--dry-run", action="store_true", help="with --prune-unused: list what would go, remove nothing")
    cache.set_defaults(func=run_cache)


def _domain_configs(cfg):
    """``cfg``, or with ``datasets:`` one config per dataset at the working spacing training will use."""
    if not cfg.datasets:
        return [cfg]
    from highres3d.data.dataset import Dataset
    from highres3d.training.multidomain import domain_configs, resolve_spacings

    # Each dataset's median spacing unless given, as training resolves it.
    return domain_configs(resolve_spacings(cfg, [Dataset.from_config(c.dataset) for c in domain_configs(cfg)]))


def run_check(args) -> int:
    from highres3d.data.check import check_dataset

    cfg = load_config_from_args(args)
    if cfg.datasets:
        ok = True
        for domain in _domain_configs(cfg):
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


def run_cache(args) -> int:
    from highres3d.data import cache
    from highres3d.errors import ConfigError, Highres3dError
    from highres3d.memory import format_bytes

    cfg = load_config_from_args(args)
    folder = cfg.training.preprocessed_dir
    if args.prune_unused is not None:
        removed, kept = cache.prune(folder, args.prune_unused, dry_run=args.dry_run)
        gone = [e for e in removed if not e.partial]
        verb = "would remove" if args.dry_run else "removed"
        print(f"{folder}: {verb} {cache.count_entries(len(gone))} "
              f"({format_bytes(sum(e.nbytes for e in gone))}) not read for {args.prune_unused:g} days"
              f"{f' and {len(removed) - len(gone)} temporary folder(s)' if len(removed) > len(gone) else ''}; "
              f"kept {len(kept)} ({format_bytes(sum(e.nbytes for e in kept))})")
        for entry in removed if args.dry_run else []:
            what = "temporary folder" if entry.partial else f"subject {entry.subject_id}"
            print(f"  {entry.path.name}  {what}, {format_bytes(entry.nbytes)}, last read {entry.idle(time.time())} ago")
        if args.dry_run:
            print("nothing was removed (--dry-run)")
        return 0
    if args.dry_run:
        raise ConfigError("--dry-run goes with --prune-unused DAYS")
    wanted, note = {}, None
    try:
        for domain in _domain_configs(cfg):
            wanted.update(cache.subject_keys(domain))
    except Highres3dError as err:
        wanted, note = None, f"  which subjects of this config are cached: unknown ({err})"
    print(cache.summary(folder, wanted))
    if note:
        print(note)
    if cfg.training.cache != "disk":
        print(f"  (this config has training.cache: {cfg.training.cache}; --set training.cache=disk uses this folder)")
    return 0
