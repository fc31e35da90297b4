"""``highres3d infer``: segment every subject of a folder with a trained model.

Subjects are found with the dataset patterns saved with the model (or
``--pattern``), preprocessed exactly as in training, predicted, mapped back
onto each input's original grid and written as ``<subject>_seg.nii.gz``
(uint8 class indices, the first modality's header and affine); with
``--probabilities`` also ``<subject>_prob.nii.gz`` (float32, one volume per
class).  Files are written atomically: an interrupted run leaves no partial
file, and a rerun skips finished subjects unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from highres3d.utils import parse_shard

log = logging.getLogger("highres3d.infer")

SEG_SUFFIX = "_seg.nii.gz"
PROB_SUFFIX = "_prob.nii.gz"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "infer",
        help="segment a folder of NIfTI files with a trained model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="RUN_OR_MODEL",
                        help="a run folder (best.keras, else model.keras, + config.yaml) or a .keras file")
    parser.add_argument("--config", metavar="FILE",
                        help="the training config, when the .keras file has no config.yaml beside it")
    parser.add_argument("-i", "--input", required=True, metavar="DIR", help="folder with the subjects' images")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the segmentations")
    parser.add_argument("--pattern", action="append", default=[], metavar="[MODALITY=]PATTERN",
                        help="filename pattern with {subject} below --input, per modality, e.g. "
                             "--pattern T1={subject}_t1.nii.gz (repeatable; without MODALITY= for a "
                             "single-modality model). Default: the patterns saved with the model")
    parser.add_argument("--probabilities", action="store_true",
                        help="also write <subject>_prob.nii.gz with the class probabilities")
    parser.add_argument("--tta", action="store_true",
                        help="mirroring test-time augmentation: average over the 8 flips (8x slower)")
    parser.add_argument("--whole-volume", action="store_true",
                        help="one pass over each whole volume (exact, fastest when it fits in memory)")
    parser.add_argument("--window", type=int, nargs=3, metavar=("X", "Y", "Z"), help="window size in voxels")
    parser.add_argument("--overlap", type=float, help="overlap between windows, a fraction of the window in [0, 1)")
    parser.add_argument("--blend", choices=("crop", "average", "gaussian"), help="how overlapping windows combine")
    parser.add_argument("--batch-size", type=int, help="windows per model call")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    parser.add_argument("--shard", metavar="I/N",
                        help="process only shard I of N (0-based, subjects in sorted order), to split a folder across machines")
    parser.set_defaults(func=run)


def resolve_patterns(cfg, overrides: list[str]) -> dict[str, str]:
    """Image patterns per modality: ``--pattern`` values, else the run's config."""
    from highres3d.errors import ConfigError

    modalities = list(cfg.dataset.modalities)
    if overrides:
        patterns = {}
        for item in overrides:
            modality, sep, pattern = item.partition("=")
            if not sep:
                if len(modalities) != 1 or len(overrides) != 1:
                    raise ConfigError(
                        f"--pattern {item}: the model takes {len(modalities)} modalities ({', '.join(modalities)}); "
                        "give one --pattern MODALITY=PATTERN for each"
                    )
                modality, pattern = modalities[0], item
            if modality not in modalities:
                raise ConfigError(f"--pattern {item}: unknown modality {modality!r}; the model takes {', '.join(modalities)}")
            patterns[modality] = pattern
    elif cfg.dataset.layout == "nnunet":
        patterns = {m: f"{{subject}}_{i:04d}.nii.gz" for i, m in enumerate(modalities)}
    else:
        patterns = {m: p for m, p in cfg.dataset.patterns.items() if m in modalities}
    missing = [m for m in modalities if m not in patterns]
    if missing:
        raise ConfigError(
            f"no filename pattern for modality {', '.join(missing)}; pass --pattern {missing[0]}=... "
            "(e.g. {subject}_" + missing[0].lower() + ".nii.gz)"
        )
    for m, p in patterns.items():
        if "{subject}" not in p:
            raise ConfigError(f"pattern {p!r} for {m}: must contain {{subject}}")
    return patterns


def run(args) -> int:
    from highres3d.data.dataset import discover_subjects
    from highres3d.errors import DataError
    from highres3d.inference import load_run, predict_subject
    from highres3d.io.nifti import save_like
    from highres3d.utils import progress

    shard, shards = parse_shard(args.shard)
    input_dir, output_dir = Path(args.input), Path(args.output)
    if not input_dir.is_dir():
        raise DataError(f"{input_dir}: input folder not found")
    model, cfg, model_file = load_run(args.model, args.config)
    problems: list[str] = []
    if cfg.dataset.layout == "niftynet_search" and not args.pattern:
        # A NiftyNet model finds new data with the filename rules it was trained with.
        from highres3d.niftynet.matching import subjects_in_folder

        patterns = {m: dict(contains=list(cfg.dataset.search[m].filename_contains)) for m in cfg.dataset.modalities}
        subjects = subjects_in_folder(input_dir, cfg.dataset, problems)
    else:
        patterns = resolve_patterns(cfg, args.pattern)
        subjects = discover_subjects(input_dir, patterns, list(cfg.dataset.modalities), problems)
    for problem in problems:
        log.warning("skipped %s", problem)
    if not subjects:
        raise DataError(f"{input_dir}: no subjects match {patterns}; set --pattern")
    subjects = sorted(subjects, key=lambda s: s.id)[shard::shards]
    log.info("%s: %d subject(s)%s -> %s", model_file, len(subjects),
             f" (shard {shard}/{shards})" if shards > 1 else "", output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    failed: list[tuple[str, str]] = []
    done = skipped = 0
    started = time.perf_counter()
    for subject in progress(subjects, desc="subjects"):
        seg_path = output_dir / f"{subject.id}{SEG_SUFFIX}"
        prob_path = output_dir / f"{subject.id}{PROB_SUFFIX}"
        wanted = [seg_path] + ([prob_path] if args.probabilities else [])
        if not args.overwrite and all(p.exists() for p in wanted):
            skipped += 1
            continue
        try:
            t0 = time.perf_counter()
            result = predict_subject(
                model, subject, cfg,
                probabilities=args.probabilities,
                mirror_tta=True if args.tta else None,
                whole_volume=True if args.whole_volume else None,
                window_size=tuple(args.window) if args.window else None,
                overlap=args.overlap,
                blend=args.blend,
                batch_size=args.batch_size,
            )
            t1 = time.perf_counter()
            save_like(result.labels, result.info, seg_path, dtype=result.labels.dtype, overwrite=True)
            if result.probabilities is not None:
                save_like(result.probabilities, result.info, prob_path, dtype="float32", overwrite=True)
            t = result.seconds
            log.info("%s: %.1f s (load %.1f, predict %.1f, restore %.1f, write %.1f) -> %s", subject.id,
                     time.perf_counter() - t0, t["load"], t["predict"], t["restore"], time.perf_counter() - t1, seg_path)
            done += 1
        except Exception as err:
            # One bad subject (unreadable file, out of memory, ...) must not cost
            # the others their segmentations; Ctrl-C still stops the run.
            failed.append((subject.id, f"{err.__class__.__name__}: {err}"))
            log.error("%s: FAILED: %s", subject.id, failed[-1][1])
            if getattr(args, "verbose", False):
                log.exception("traceback")
    log.info("done in %.1f s: %d written, %d skipped (existing; --overwrite replaces them), %d failed",
             time.perf_counter() - started, done, skipped, len(failed))
    if failed:
        print("failed subjects:\n" + "\n".join(f"  {sid}: {msg}" for sid, msg in failed), file=sys.stderr)
        return 1
    return 0
