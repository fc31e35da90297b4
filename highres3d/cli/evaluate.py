"""``highres3d evaluate``: score a folder of segmentations against the ground truth.

Per subject and class: Dice, Jaccard, Hausdorff distance, HD95 and average
symmetric surface distance in mm (spacing from the truth file's header),
volumes in mL, and TP/FP/FN/TN voxel counts.  Writes ``evaluation.csv`` (one
row per subject and class) and ``evaluation_summary.json`` (mean, sd, median
and n per class, the empty-mask policy and the label maps used), and prints a
table.

Empty masks: by default a class absent from both prediction and truth has no
score (NaN, left out of the means, counted as "both empty"); a prediction on
an empty truth, or an empty prediction, scores Dice 0 and distances equal to
the image diagonal.  --both-empty and --missing-distance change that.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("highres3d.evaluate")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="Dice, Jaccard, HD95, ASSD and volumes of segmentations against the ground truth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pred", required=True, metavar="DIR", help="folder of predicted label maps")
    parser.add_argument("--truth", required=True, metavar="DIR", help="folder of ground-truth label maps")
    parser.add_argument("--pred-pattern", default="{subject}_seg.nii.gz",
                        help="prediction filenames below --pred (default: %(default)s, as written by infer)")
    parser.add_argument("--truth-pattern",
                        help="truth filenames below --truth, e.g. {subject}/{subject}_seg.nii.gz "
                             "(default: the label pattern of --config, else {subject}_seg.nii.gz)")
    parser.add_argument("--config", metavar="RUN_OR_FILE",
                        help="a run folder or config file: its label mapping (evaluation.truth_labels, else "
                             "preprocessing.labels) and label pattern apply to the truth")
    parser.add_argument("--truth-map", metavar="MAP",
                        help="raw truth value -> class, e.g. BraTS tumour core '1+4:1,2:0' (values not listed are "
                             "an error)")
    parser.add_argument("--pred-map", metavar="MAP", help="the same for predictions, e.g. NiftyNet's '2:0,4:1'")
    parser.add_argument("--classes", metavar="LIST",
                        help="classes to score, e.g. '1,2' (default: every non-zero class found; 0 = background)")
    parser.add_argument("--both-empty", choices=("nan", "perfect"), default="nan",
                        help="class absent from prediction and truth: no score (nan, default) or Dice 1 / distance 0")
    parser.add_argument("--missing-distance", choices=("diagonal", "nan", "inf"), default="diagonal",
                        help="surface distances when exactly one mask is empty (default: image diagonal in mm)")
    parser.add_argument("-o", "--output", metavar="DIR", help="where to write the CSV and JSON (default: --pred)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing evaluation files")
    parser.set_defaults(func=run)


def _config_for(path: str):
    from highres3d.config import load_config

    p = Path(path)
    return load_config(p / "config.yaml" if p.is_dir() else p)


def run(args) -> int:
    from highres3d.data.preprocess import parse_label_map
    from highres3d.errors import ConfigError
    from highres3d.evaluation import EmptyPolicy, evaluate_folders, summary_table, write_csv, write_summary
    from highres3d.progress import track

    truth_map = parse_label_map(args.truth_map)
    truth_other = None
    truth_pattern = args.truth_pattern
    if args.config:
        cfg = _config_for(args.config)
        if not truth_map:
            truth_map = dict(cfg.evaluation.truth_labels or cfg.preprocessing.labels)
            truth_other = cfg.preprocessing.other_labels
        if truth_pattern is None and cfg.dataset.layout == "patterns" and "label" in cfg.dataset.patterns:
            truth_pattern = cfg.dataset.patterns["label"]
    classes = None
    if args.classes:
        try:
            classes = [int(c) for c in args.classes.split(",") if c.strip()]
        except ValueError:
            raise ConfigError(f"--classes {args.classes}: expected integers, e.g. 1,2") from None
    output = Path(args.output or args.pred)
    csv_path, json_path = output / "evaluation.csv", output / "evaluation_summary.json"
    if not args.overwrite:
        for path in (csv_path, json_path):
            if path.exists():
                raise ConfigError(f"{path}: already exists; pass --overwrite to replace it")
    result = evaluate_folders(
        args.pred, args.truth,
        pred_pattern=args.pred_pattern,
        truth_pattern=truth_pattern or "{subject}_seg.nii.gz",
        classes=classes,
        truth_map=truth_map,
        pred_map=parse_label_map(args.pred_map),
        truth_other=truth_other,
        policy=EmptyPolicy(both_empty=args.both_empty, missing_distance=args.missing_distance),
        progress=lambda items: track(items, "evaluate", unit="subjects"),
    )
    write_csv(result.rows, csv_path, overwrite=True)
    write_summary(result.summary, json_path, overwrite=True)
    print(summary_table(result.summary))
    if result.missing_predictions:
        log.warning("%d truth file(s) have no prediction and were not scored: %s", len(result.missing_predictions),
                    ", ".join(result.missing_predictions[:10]) + (" ..." if len(result.missing_predictions) > 10 else ""))
    log.info("%d subject(s) -> %s, %s", result.summary["subjects"], csv_path, json_path)
    return 0
