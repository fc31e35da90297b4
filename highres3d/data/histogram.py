"""Histogram standardisation (Nyúl, Udupa & Zhang 2000) as NiftyNet 0.5 implements it.

Contract (NiftyNet's ``normalisation = True`` with ``histogram_ref_file``,
``norm_type`` and ``cutoff``):

* **Landmarks of one image**: the percentiles ``[c0, 10, 20, 25, 30, 40, 50,
  60, 70, 75, 80, 90, c1]`` of its voxels inside the mask (NumPy's linear
  interpolation), ``(c0, c1)`` being the cutoff fractions times 100.
* **Learning** (:func:`learn_landmarks`): each training image's landmarks are
  mapped linearly so that ``c0 -> 0`` and ``c1 -> 100``, then averaged over the
  images: 13 reference values per modality. The cutoff is used as given.
* **Applying** (:func:`standardise`): the image's own landmarks (with the
  cutoff widened to ``c0 <= 0.09``, ``c1 >= 0.91``, or ``0.24`` / ``0.76`` for
  ``quartile``, as NiftyNet does at this step only) are mapped piece-wise
  linearly onto the reference values; ``percentile`` uses 11 of the 13
  landmarks, ``quartile`` 5 and ``median`` 3. Intensities outside
  ``[c0, c1]`` follow the first / last piece (no clipping); a piece of zero
  width in the image gets slope 0. A channel that is all zero (a missing
  modality) is left unchanged.
* **File format** (NiftyNet's ``histogram_ref_file``): one line per modality,
  ``NAME v1 ... v13`` separated by spaces; NiftyNet also keeps its label
  mapping there (``label_label-from`` / ``label_label-to``), which is read
  and written back untouched.

Standardisation runs after reorientation and resampling and before whitening
(:func:`highres3d.data.preprocess.load_volume`). ``train`` learns the
landmarks of the training subjects into ``histogram_ref_file.txt`` in the run
folder (or copies ``preprocessing.histogram.ref_file`` there and learns only
the modalities it lacks, as NiftyNet did), and the run's ``config.yaml`` points
at that copy, so ``infer`` and ``evaluate`` apply the same landmarks.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from highres3d.errors import ConfigError, DataError
from highres3d.utils import atomic_path

#: Inner landmark fractions; the first and last come from the cutoff.
INNER_FRACTIONS: tuple[float, ...] = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
#: Landmarks used by each ``norm_type`` (indices into the 13).
PIECES: dict[str, tuple[int, ...]] = {
    "percentile": (0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12),
    "quartile": (0, 3, 6, 9, 12),
    "median": (0, 6, 12),
}
STANDARD_RANGE: tuple[float, float] = (0.0, 100.0)
RUN_FILE = "histogram_ref_file.txt"
NUM_LANDMARKS = 13


def landmark_fractions(cutoff: Sequence[float]) -> np.ndarray:
    """The 13 landmark fractions for a cutoff ``(c0, c1)``."""
    return np.array([cutoff[0], *INNER_FRACTIONS, cutoff[1]], dtype=np.float64)


def image_landmarks(values: np.ndarray, cutoff: Sequence[float]) -> np.ndarray:
    """The 13 percentile landmarks of the given voxel values."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise DataError("histogram standardisation: the mask selects no voxel")
    return np.percentile(values, 100.0 * landmark_fractions(cutoff))


def widened_cutoff(cutoff: Sequence[float], norm_type: str) -> tuple[float, float]:
    """The cutoff NiftyNet applies when standardising (never narrower than the first / last piece)."""
    low, high = sorted((float(cutoff[0]), float(cutoff[1])))
    low, high = max(0.0, low), min(1.0, high)
    if norm_type == "quartile":
        return min(low, 0.24), max(high, 0.76)
    return min(low, 0.09), max(high, 0.91)


def learn_landmarks(images: Iterable[tuple[str, np.ndarray]], cutoff: Sequence[float]) -> np.ndarray:
    """The reference landmarks of a modality: the mean of each image's landmarks mapped onto [0, 100].

    Args:
        images: ``(name, voxel values inside the mask)`` per training image;
            the name is used in messages.
        cutoff: ``(c0, c1)`` fractions.

    Raises:
        DataError: for an image whose intensities between the cutoffs are
            constant (it has no range to map), naming it.
    """
    s1, s2 = STANDARD_RANGE
    mapped = []
    for name, values in images:
        p = image_landmarks(values, cutoff)
        if p[-1] == p[0]:
            raise DataError(
                f"{name}: intensities between the {100 * cutoff[0]:g}th and {100 * cutoff[1]:g}th percentiles are "
                f"constant ({p[0]:g}); check the file, or widen preprocessing.histogram.cutoff"
            )
        mapped.append(s1 + (p - p[0]) * (s2 - s1) / (p[-1] - p[0]))
    if not mapped:
        raise DataError("histogram standardisation: no training image to learn landmarks from")
    return np.mean(mapped, axis=0)


def standardise(
    image: np.ndarray,
    mask: Optional[np.ndarray],
    reference: Sequence[float],
    cutoff: Sequence[float] = (0.01, 0.99),
    norm_type: str = "percentile",
) -> np.ndarray:
    """Map one channel's intensities onto the reference landmarks (float32).

    Args:
        image: a 3D channel.
        mask: voxels whose histogram defines the image's landmarks (None: all).
        reference: the 13 reference landmarks of the modality.
        cutoff: the configured cutoff (widened as NiftyNet does).
        norm_type: ``percentile``, ``quartile`` or ``median``.
    """
    if norm_type not in PIECES:
        raise ConfigError(f"preprocessing.histogram.norm_type: expected one of {', '.join(PIECES)}, got {norm_type!r}")
    reference = np.asarray(reference, dtype=np.float64)
    if reference.shape != (NUM_LANDMARKS,):
        raise DataError(f"histogram landmarks: expected {NUM_LANDMARKS} values, got {reference.size}")
    data = np.asarray(image, dtype=np.float64)
    values = data[mask] if mask is not None else data
    own = image_landmarks(values, widened_cutoff(cutoff, norm_type))
    idx = list(PIECES[norm_type])
    x, y = own[idx], reference[idx]
    dx = np.diff(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        # A zero-width piece (e.g. a background plateau) gets slope 0: its voxels map to the piece's start.
        slope = np.where(dx == 0, 0.0, np.diff(y) / np.where(dx == 0, 1.0, dx))
    intercept = y[:-1] - slope * x[:-1]
    piece = np.digitize(data, x[1:-1], right=False)
    return (slope[piece] * data + intercept[piece]).astype(np.float32)


# --------------------------------------------------------------------------- the reference file


def read_ref_file(path: str | os.PathLike) -> dict[str, tuple[float, ...]]:
    """Read a NiftyNet ``histogram_ref_file``: ``NAME v1 v2 ...`` per line.

    Raises:
        DataError: when the file is missing or a line has a non-number, naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: histogram reference file not found")
    out: dict[str, tuple[float, ...]] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if len(parts) < 2:
            continue  # NiftyNet skips blank and one-word lines too
        try:
            out[parts[0]] = tuple(float(v) for v in parts[1:])
        except ValueError:
            raise DataError(f"{path}:{line_no}: expected 'NAME value value ...', got {line.strip()!r}") from None
    return out


def write_ref_file(path: str | os.PathLike, mapping: Mapping[str, Sequence[float]], overwrite: bool = False) -> Path:
    """Write landmarks (and any other entries, such as NiftyNet's label mapping) in NiftyNet's format, atomically."""
    path = Path(path)
    lines = [f"{name} " + " ".join(repr(float(v)) for v in values) for name, values in mapping.items()]
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def label_mapping(entries: Mapping[str, Sequence[float]], section: str = "label") -> Optional[dict[int, int]]:
    """NiftyNet's label normalisation (``<section>_<section>-from`` / ``-to``) from a ref file, or None."""
    source = entries.get(f"{section}_{section}-from")
    target = entries.get(f"{section}_{section}-to")
    if source is None or target is None:
        return None
    if len(source) != len(target):
        raise DataError(f"histogram_ref_file: {section}-from and {section}-to have different lengths")
    return {round(a): round(b) for a, b in zip(source, target)}


def reference_landmarks(path: str | os.PathLike, modalities: Sequence[str]) -> dict[str, np.ndarray]:
    """The landmarks of each modality from a ref file; every modality must be there."""
    entries = _cached(Path(path))
    missing = [m for m in modalities if m not in entries]
    bad = [m for m in modalities if m in entries and len(entries[m]) != NUM_LANDMARKS]
    if missing or bad:
        problems = [f"no landmarks for {', '.join(missing)}"] if missing else []
        problems += [f"{m} has {len(entries[m])} values, expected {NUM_LANDMARKS}" for m in bad]
        raise DataError(
            f"{path}: {'; '.join(problems)}; learn them with 'highres3d data landmarks CONFIG -o FILE'"
        )
    return {m: np.asarray(entries[m], dtype=np.float64) for m in modalities}


_CACHE: dict[tuple[str, float], dict[str, tuple[float, ...]]] = {}


def _cached(path: Path) -> dict[str, tuple[float, ...]]:
    # load_volume runs once per subject; the file is re-read only when it changes.
    try:
        key = (str(path.resolve()), path.stat().st_mtime)
    except FileNotFoundError:
        raise DataError(
            f"{path}: histogram reference file not found; learn it with 'highres3d data landmarks CONFIG', "
            "or let 'highres3d train' learn it into the run folder"
        ) from None
    if key not in _CACHE:
        _CACHE[key] = read_ref_file(path)
    return _CACHE[key]


# --------------------------------------------------------------------------- preprocessing


def _mask(channel: np.ndarray, cfg) -> Optional[np.ndarray]:
    # NiftyNet masks the histogram only with normalise_foreground_only; otherwise every voxel counts.
    if not cfg.normalise_foreground_only or cfg.foreground in ("all", "mask"):
        return None
    from highres3d.data.preprocess import foreground_mask

    return foreground_mask(channel, cfg.foreground)


def standardise_image(image: np.ndarray, modalities: Sequence[str], cfg) -> np.ndarray:
    """Standardise each channel of an ``(X, Y, Z, C)`` image with the landmarks of ``cfg.histogram.ref_file``.

    Args:
        image: the raw image in working space, channels in ``modalities`` order.
        modalities: the channel names (the names in the ref file).
        cfg: the preprocessing section.
    """
    hist = cfg.histogram
    if hist.ref_file is None:
        raise ConfigError(
            "preprocessing.histogram.ref_file: not set; learn landmarks with 'highres3d data landmarks CONFIG -o FILE' "
            "and set it, or train (which learns them into the run folder)"
        )
    reference = reference_landmarks(hist.ref_file, modalities)
    out = np.empty(image.shape, dtype=np.float32)
    for c, modality in enumerate(modalities):
        channel = image[..., c]
        if not np.any(channel):
            out[..., c] = channel  # a missing modality stays zero, as in NiftyNet
            continue
        out[..., c] = standardise(channel, _mask(channel, cfg), reference[modality], hist.cutoff, hist.norm_type)
    return out


def learn_from_subjects(
    subjects: Sequence,
    cfg,
    modalities: Sequence[str],
    show_progress: Optional[bool] = None,
) -> dict[str, np.ndarray]:
    """Learn the landmarks of ``modalities`` from subjects' images in working space.

    Args:
        subjects: :class:`~highres3d.data.dataset.Subject` objects (the training split).
        cfg: the preprocessing section (orientation, spacing, cutoff, mask).
        modalities: which modalities to learn.
        show_progress: progress display over the subjects read (see :class:`highres3d.progress.Progress`).
    """
    from highres3d.io.nifti import load_image
    from highres3d.progress import track

    per_modality: dict[str, list[tuple[str, np.ndarray]]] = {m: [] for m in modalities}
    for subject in track(subjects, "landmarks", unit="subjects", enabled=show_progress):
        for m in modalities:
            order = cfg.modality_interpolation.get(m, cfg.image_interpolation)
            data, _ = load_image(subject.images[m], cfg.orientation, cfg.spacing, order=order)
            if not np.any(data):
                continue  # NiftyNet skips missing (all-zero) modalities
            mask = _mask(data, cfg)
            per_modality[m].append((str(subject.images[m]), data[mask] if mask is not None else data))
    return {m: learn_landmarks(per_modality[m], cfg.histogram.cutoff) for m in modalities}


def run_config(cfg, run_dir: str | os.PathLike):
    """``cfg`` with ``preprocessing.histogram.ref_file`` pointing into the run folder (no I/O).

    Deterministic, so a resumed run's config compares equal to the saved one.
    """
    if not cfg.preprocessing.histogram.enabled:
        return cfg
    hist = dataclasses.replace(cfg.preprocessing.histogram, ref_file=(Path(run_dir) / RUN_FILE).resolve())
    return dataclasses.replace(cfg, preprocessing=dataclasses.replace(cfg.preprocessing, histogram=hist))


def ensure_run_landmarks(
    source_ref_file: Optional[Path],
    run_cfg,
    subjects: Sequence,
    echo: Callable[[str], None] = print,
    show_progress: Optional[bool] = None,
) -> Optional[Path]:
    """Make sure the run folder's landmark file exists and covers every modality.

    Existing entries of ``source_ref_file`` (the config's own file, if any) are
    kept; modalities it lacks are learned from ``subjects`` (with a progress
    display unless ``show_progress`` is False). Nothing is
    rewritten when the run's file is already complete (a resumed run).

    Returns:
        The run's landmark file, or None when standardisation is off.
    """
    hist = run_cfg.preprocessing.histogram
    if not hist.enabled:
        return None
    target = Path(hist.ref_file)
    modalities = list(run_cfg.dataset.modalities)
    entries: dict[str, tuple[float, ...]] = {}
    if target.is_file():
        entries = read_ref_file(target)
    elif source_ref_file is not None and Path(source_ref_file).is_file():
        entries = read_ref_file(source_ref_file)
        echo(f"histogram landmarks: from {source_ref_file}")
    todo = [m for m in modalities if m not in entries]
    if not todo and target.is_file():
        return target
    if todo:
        echo(f"histogram landmarks: learning {', '.join(todo)} from {len(subjects)} training subjects")
        learned = learn_from_subjects(subjects, run_cfg.preprocessing, todo, show_progress)
        entries.update({m: tuple(v) for m, v in learned.items()})
    write_ref_file(target, entries, overwrite=True)
    return target


def format_landmarks(mapping: Mapping[str, Sequence[float]]) -> str:
    """A readable table of landmarks, one modality per line."""
    lines = []
    for name, values in mapping.items():
        shown = " ".join(f"{v:7.2f}" if math.isfinite(v) else str(v) for v in values)
        lines.append(f"{name:>10}: {shown}")
    return "\n".join(lines)
