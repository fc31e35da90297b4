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
import sys


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
    parser.add_argument("--tta-mirror", action="store_true",
                        help="mirroring test-time augmentation: average over the 8 flips (8x slower)")
    parser.add_argument("--whole-volume", action="store_true",
                        help="one pass over each whole volume (exact, fastest when it fits in memory)")
    parser.add_argument("--window", type=int, nargs=3, metavar=("X", "Y", "Z"), help="window size in voxels")
    parser.add_argument("--overlap", type=float, help="overlap between windows, a fraction of the window in [0, 1)")
    parser.add_argument("--blend", choices=("crop", "average", "gaussian"), help="how overlapping windows combine")
    parser.add_argument("--batch-size", type=int, help="windows per model call")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"),
                        help="compute precision (inference.precision; auto = bfloat16 where the CPU, or the GPU (compute capability 8.0+), has it natively)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    parser.add_argument("--shard", metavar="I/N",
                        help="process only shard I of N (0-based, subjects in sorted order), to split a folder across machines")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="segment in N worker processes on this machine, worker i taking shard i/N, each on its own "
                             "GPUs while there are enough (CUDA_VISIBLE_DEVICES or every GPU nvidia-smi lists) and "
                             "CPUs // N TensorFlow threads (default 1: this process)")
    parser.add_argument("--no-progress", action="store_true", help="no progress display")
    parser.set_defaults(func=run)


def run(args) -> int:
    from highres3d.errors import ConfigError
    from highres3d.inference import load_run, predict_folder, predict_folder_in_workers
    from highres3d.workers import check_workers

    check_workers(args.workers)
    if args.workers > 1 and args.shard:
        raise ConfigError(f"--workers {args.workers} with --shard {args.shard}: use one or the other (--shard splits a "
                          "folder over machines or jobs, --workers over processes of this one)")
    if args.workers > 1:
        def segment(**options):
            return predict_folder_in_workers(args.model, args.input, args.output, workers=args.workers,
                                             config=args.config, patterns=args.pattern, **options)
    else:
        model, cfg, model_file = load_run(args.model, args.config)
        print(f"model {model_file}")

        def segment(**options):
            return predict_folder(model, cfg, args.input, args.output, patterns=args.pattern, shard=args.shard, **options)
    result = segment(
        overwrite=args.overwrite,
        probabilities=args.probabilities,
        show_progress=False if args.no_progress else None,
        tta_mirror=True if args.tta_mirror else None,
        whole_volume=True if args.whole_volume else None,
        window_size=tuple(args.window) if args.window else None,
        overlap=args.overlap,
        blend=args.blend,
        batch_size=args.batch_size,
        precision=args.precision,
    )
    # Failures go to standard error, where schedulers and scripts look for them.
    print(result.summary(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1
