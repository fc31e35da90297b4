"""``highres3d synth ixi|brats OUT``: write synthetic subjects in the real datasets' layouts."""
from __future__ import annotations

import time

HINTS = {
    "ixi": (
        "The shipped configs find these files with dataset.patterns\n"
        "  T1: \"{{subject}}-T1.nii.gz\", T2: \"{{subject}}-T2.nii.gz\", label: \"{{subject}}-aseg.nii.gz\"\n"
        "(hippocampus = aseg 17 + 53).  Check them with:\n"
        "  highres3d data check {config} --data-root {out}"
    ),
    "brats": (
        "The shipped configs find these files with dataset.patterns\n"
        "  T1: \"{{subject}}/{{subject}}_t1.nii.gz\", T2: \"{{subject}}/{{subject}}_t2.nii.gz\", "
        "label: \"{{subject}}/{{subject}}_seg.nii.gz\"\n"
        "(tumour core = labels 1 + 4).  Check them with:\n"
        "  highres3d data check {config} --data-root {out}"
    ),
}
CONFIGS = {("ixi", "small"): "demo/ixi.yaml", ("ixi", "full"): "ixi_hippocampus.yaml",
           ("brats", "small"): "demo/brats.yaml", ("brats", "full"): "brats_base.yaml"}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="generate synthetic IXI-like or BraTS-like subjects",
        description="Write synthetic subjects with the real IXI / BraTS 2018 file names, layouts and label "
        "values, so configs written for them run unchanged on the real datasets.",
    )
    sub = parser.add_subparsers(dest="synth_kind", metavar="DATASET", required=True)
    for kind, text in (
        ("ixi", "IXI-like T1, T2 and FreeSurfer-aseg-style labels (hippocampus 17/53), flat folder"),
        ("brats", "BraTS-like t1, t1ce, t2, flair and tumour labels 0/1/2/4, one folder per subject"),
    ):
        p = sub.add_parser(kind, help=text, description=text)
        p.add_argument("out", metavar="OUT", help="output folder (created if missing)")
        p.add_argument("--subjects", "-n", type=_positive_int, default=6, help="number of subjects (default 6)")
        p.add_argument(
            "--size", choices=("small", "full"), default="small",
            help="small: about 64³ at ~3 mm, seconds per subject (default); full: the real datasets' grids",
        )
        p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical data")
        p.add_argument("--overwrite", action="store_true", help="replace existing files of the same names")
        p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
        p.set_defaults(func=run, synth_kind=kind)


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def run(args) -> int:
    from pathlib import Path

    from highres3d.data.synth import MANIFEST, synthesize
    from highres3d.errors import DataError
    from highres3d.utils import OutputExistsError

    start = time.perf_counter()
    try:
        ids = synthesize(args.synth_kind, args.out, args.subjects, size=args.size, seed=args.seed,
                         overwrite=args.overwrite, show_progress=False if args.no_progress else None,
                         echo=lambda text: print(text, flush=True))
    except OutputExistsError as err:
        raise DataError(f"{err}") from err
    out = Path(args.out)
    files_per_subject = 3 if args.synth_kind == "ixi" else 5
    print(
        f"Wrote {len(ids)} {args.synth_kind.upper()}-like subjects ({len(ids) * files_per_subject} NIfTI files, "
        f"size {args.size}, seed {args.seed}) to {out} in {time.perf_counter() - start:.1f} s; "
        f"summary in {out / MANIFEST}."
    )
    print(HINTS[args.synth_kind].format(out=out, config=CONFIGS[args.synth_kind, args.size]))
    return 0
