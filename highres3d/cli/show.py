"""``highres3d show FILE``: a PNG of three orthogonal slices, with a label map overlaid."""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "show",
        help="write a PNG of orthogonal slices of a volume (with a label overlay)",
        description="Write a PNG of the sagittal, coronal and axial slices through a voxel of FILE, reoriented "
        "to RAS with square pixels (subject's right on the image right), with --label overlaid in colour.",
    )
    parser.add_argument("file", metavar="FILE", help="a NIfTI volume (.nii or .nii.gz)")
    parser.add_argument("--label", metavar="FILE", help="a label map on the same grid, drawn in colour")
    parser.add_argument("-o", "--output", metavar="PNG", help="output file (default: FILE with .png)")
    parser.add_argument(
        "--slice", metavar="I,J,K", type=_voxel,
        help="voxel of FILE to cut through (default: the label's centre of mass, else the volume centre)",
    )
    parser.add_argument("--alpha", type=float, default=0.45, help="label opacity, 0..1 (default 0.45)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    parser.set_defaults(func=run)


def _voxel(text: str) -> tuple[int, int, int]:
    import argparse

    parts = text.replace(" ", "").split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three integers I,J,K, got {text!r}")
    return values


def run(args) -> int:
    from highres3d.errors import DataError
    from highres3d.utils import OutputExistsError
    from highres3d.visualize import show

    if not 0.0 <= args.alpha <= 1.0:
        raise DataError(f"--alpha: expected a number between 0 and 1, got {args.alpha}")
    try:
        path = show(args.file, args.label, args.output, slice_index=args.slice, overwrite=args.overwrite,
                    alpha=args.alpha)
    except OutputExistsError as err:
        raise DataError(str(err)) from err
    print(f"Wrote {path}")
    return 0
