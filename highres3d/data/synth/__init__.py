"""Synthetic stand-ins for IXI and BraTS 2018 in the real datasets' file layouts.

    from highres3d.data.synth import synthesize_ixi, synthesize_brats
    ids = synthesize_ixi("data/ixi", n_subjects=6, size="small", seed=0)
    ids = synthesize_brats("data/brats", n_subjects=6, size="small", seed=0)

See docs/synthetic_data.md for what the phantoms contain and how to switch
configs to the real datasets.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from highres3d.data.synth.brats import synthesize_brats
from highres3d.data.synth.common import GENERATOR_VERSION, MANIFEST
from highres3d.data.synth.ixi import synthesize_ixi

__all__ = ["synthesize", "generator", "synthesize_ixi", "synthesize_brats", "GENERATOR_VERSION", "MANIFEST"]


def generator(kind: str) -> Callable:
    """The writer of ``kind``, ``"ixi"`` (:func:`synthesize_ixi`) or ``"brats"`` (:func:`synthesize_brats`).

    Raises:
        ConfigError: for any other kind.
    """
    from highres3d.errors import ConfigError

    make = {"ixi": synthesize_ixi, "brats": synthesize_brats}.get(kind)
    if make is None:
        raise ConfigError(f"generator {kind!r}: expected 'ixi' or 'brats'")
    return make


def synthesize(kind: str, out_dir, n_subjects: int, *, size: str = "small", seed: int = 0, overwrite: bool = False,
               show_progress: Optional[bool] = None, echo: Optional[Callable[[str], None]] = None) -> list[str]:
    """Write ``n_subjects`` subjects of ``kind`` with a progress display: what ``highres3d synth`` does.

    Args:
        kind: ``"ixi"`` or ``"brats"`` (:func:`synthesize_ixi`, :func:`synthesize_brats`).
        out_dir: the output folder.
        n_subjects: how many subjects.
        size: ``"small"`` or ``"full"``.
        seed: the seed; the same seed gives identical data.
        overwrite: replace existing files of the same names.
        show_progress: progress display (see :class:`highres3d.progress.Progress`).
        echo: when given, gets one line per subject written (``[2/6] IXI002-Guys-0828  (1.4 s)``).

    Returns:
        The subject ids.

    Raises:
        ConfigError: for an unknown ``kind``.
    """
    from highres3d.progress import Progress

    make = generator(kind)
    width = len(str(n_subjects))
    with Progress(n_subjects, f"synth {kind}", unit="subjects", enabled=show_progress) as progress:

        def report(i: int, n: int, subject: str, seconds: float) -> None:
            if echo is not None:
                with progress.cleared():
                    echo(f"[{i + 1:>{width}}/{n}] {subject}  ({seconds:.1f} s)")
            progress.update()

        return make(out_dir, n_subjects, size=size, seed=seed, overwrite=overwrite, progress=report)
