"""From a subject's files to a preprocessed :class:`Volume` in working space.

Steps, in order: load each modality into the working space (reorient,
resample), check that all files of the subject share one grid, optionally
standardise histograms (:mod:`highres3d.data.histogram`), z-score whiten
each modality over a foreground mask, and map raw label values to class
indices.  The same function serves training, inference and ``data check``, so
a model always sees its inputs preprocessed the same way.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from highres3d.config import PreprocessingConfig
from highres3d.data.dataset import Subject
from highres3d.errors import ConfigError, DataError
from highres3d.io.nifti import SpatialInfo, check_same_grid, load_image


@dataclass(eq=False)
class Volume:
    """A preprocessed subject in working space."""

    subject_id: str
    image: np.ndarray  # (X, Y, Z, C) float32, whitened
    label: Optional[np.ndarray]  # (X, Y, Z) uint8 class indices, or None
    info: SpatialInfo  # of the first modality: maps results back to its original grid

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape[:3])

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + (self.label.nbytes if self.label is not None else 0)


# --------------------------------------------------------------------------- intensity


def foreground_mask(channel: np.ndarray, kind: str) -> np.ndarray:
    """Boolean mask of the voxels whose statistics define the z-score.

    ``all``: every voxel; ``threshold_plus``: voxels above the volume mean;
    ``otsu``: voxels above Otsu's threshold.
    """
    if kind == "all":
        return np.ones(channel.shape, dtype=bool)
    if kind == "threshold_plus":
        return channel > channel.mean()
    if kind == "otsu":
        from skimage.filters import threshold_otsu

        if channel.min() == channel.max():
            return np.ones(channel.shape, dtype=bool)
        return channel > threshold_otsu(channel)
    raise ValueError(f"unknown foreground kind {kind!r}")


def whiten(image: np.ndarray, masks: Sequence[np.ndarray], foreground_only: bool = False) -> np.ndarray:
    """Z-score each channel of (X, Y, Z, C) ``image`` over its mask, in place on a float32 copy."""
    out = np.empty(image.shape, dtype=np.float32)
    for c in range(image.shape[-1]):
        channel = image[..., c]
        mask = masks[c]
        values = channel[mask] if not mask.all() else channel
        if values.size == 0:
            values = channel
        mean = float(values.mean(dtype=np.float64))
        std = float(values.std(dtype=np.float64))
        out[..., c] = (channel - mean) / max(std, 1e-5)
        if foreground_only:
            out[..., c][~mask] = 0.0
    return out


def clip_percentiles(image: np.ndarray, masks: Sequence[np.ndarray], low: float, high: float) -> np.ndarray:
    """Clip each channel of (X, Y, Z, C) ``image`` to the ``low``/``high`` percentiles of its masked voxels.

    Med3D's normalisation (Chen et al. 2019) clips to the 0.5 and 99.5
    percentiles before the z-score, so a few very bright or dark voxels
    (vessels, artefacts) do not set the scale of a whole volume.

    Args:
        image: the image, one channel per modality.
        masks: one boolean mask per channel; its voxels define the percentiles
            (an empty mask falls back to every voxel).
        low: the lower percentile, 0-100.
        high: the upper percentile, 0-100.

    Returns:
        A float32 copy of ``image`` with every channel clipped.
    """
    out = np.empty(image.shape, dtype=np.float32)
    for c in range(image.shape[-1]):
        channel = image[..., c]
        values = channel[masks[c]] if masks[c].any() else channel
        lo, hi = np.percentile(values, [low, high])
        out[..., c] = np.clip(channel, lo, hi)
    return out


# --------------------------------------------------------------------------- labels


def as_label_values(data: np.ndarray, source: str = "label") -> np.ndarray:
    """A label map's values as int64, or :class:`DataError` naming ``source``.

    Floating-point files are accepted when every value is a whole number
    (many tools store labels as float); fractional or negative values mean the
    file is not a label map.  Preprocessing, ``data check`` and evaluation
    all read labels through this one rule.
    """
    data = np.asarray(data)
    if data.dtype.kind == "f":
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise DataError(f"{source}: label values are not integers (is this an image rather than a label map?)")
        data = rounded
    data = data.astype(np.int64, copy=False)
    if data.size and int(data.min()) < 0:
        raise DataError(f"{source}: negative label value {int(data.min())}; labels must be non-negative integers")
    return data


def parse_label_map(text: Optional[str]) -> dict[int, int]:
    """Parse a label map written on the command line: ``"1:1,4:1,2:0"`` (raw value : class).

    ``"1+4:1"`` maps several values at once.  The result is what
    ``preprocessing.labels`` holds and :func:`map_labels` takes.
    """
    if not text:
        return {}
    mapping: dict[int, int] = {}
    for item in (part for part in text.replace(" ", "").split(",") if part):
        if ":" not in item:
            raise ConfigError(f"label map {text!r}: expected items 'value:class', e.g. '1:1,4:1,2:0'; got {item!r}")
        sources, target = item.rsplit(":", 1)
        try:
            cls = int(target)
            values = [int(v) for v in sources.split("+")]
        except ValueError:
            raise ConfigError(f"label map {text!r}: values and classes must be integers; got {item!r}") from None
        for v in values:
            if v in mapping and mapping[v] != cls:
                raise ConfigError(f"label map {text!r}: value {v} mapped to both {mapping[v]} and {cls}")
            mapping[v] = cls
    return mapping


def label_lookup(mapping: Mapping[int, int], other: Optional[int], max_value: int) -> np.ndarray:
    """A lookup table raw value -> class; -1 marks values that are not allowed."""
    table = np.full(max_value + 1, -1 if other is None else other, dtype=np.int16)
    for raw, cls in mapping.items():
        if 0 <= raw <= max_value:
            table[raw] = cls
    return table


def map_labels(
    label: np.ndarray,
    mapping: Mapping[int, int],
    other: Optional[int] = None,
    num_classes: Optional[int] = None,
    source: str = "label",
) -> np.ndarray:
    """Map raw integer label values to class indices (uint8).

    With an empty ``mapping`` the raw values must already be class indices
    (``< num_classes`` when given).  A value missing from the mapping is an
    error naming ``source`` unless ``other`` gives its class explicitly.
    """
    label = as_label_values(label, source)
    if label.size == 0:
        return label.astype(np.uint8)
    high = int(label.max())
    if not mapping:
        if (num_classes is not None and high >= num_classes) or high > np.iinfo(np.uint8).max:
            values = np.flatnonzero(np.bincount(label.ravel()))
            raise DataError(
                f"{source}: label values {values.tolist()[:20]} exceed the {num_classes or 256} classes; "
                "set preprocessing.labels to map raw values to classes (e.g. {1: 1, 4: 1, 2: 0})"
            )
        return label.astype(np.uint8)
    table = label_lookup(mapping, other, high)
    mapped = table[label]
    if other is None and (mapped < 0).any():
        counts = np.bincount(label.ravel(), minlength=high + 1)
        unmapped = [int(v) for v in np.flatnonzero(counts) if table[v] < 0]
        raise DataError(
            f"{source}: label values {unmapped} are not in preprocessing.labels {dict(mapping)}; "
            "add them, or set preprocessing.other_labels to the class they should get (e.g. 0)"
        )
    return mapped.astype(np.uint8)


# --------------------------------------------------------------------------- subjects


def load_volume(
    subject: Subject,
    cfg: PreprocessingConfig,
    modalities: Optional[Sequence[str]] = None,
    label_required: bool = False,
    num_classes: Optional[int] = None,
) -> Volume:
    """Load and preprocess one subject into working space.

    Args:
        subject: the subject's files.
        cfg: the preprocessing section of the config.
        modalities: channel order (default: the subject's order).
        label_required: raise DataError when the subject has no label file.
        num_classes: checks label values when ``cfg.labels`` is empty.

    With ``cfg.foreground == "mask"`` the z-score statistics come from the
    voxels inside ``subject.mask``.
    """
    modalities = list(modalities or subject.images)
    channels = []
    reference: Optional[SpatialInfo] = None
    for modality in modalities:
        if modality not in subject.images:
            raise DataError(f"subject {subject.id}: no {modality} image")
        order = cfg.modality_interpolation.get(modality, cfg.image_interpolation)
        data, info = load_image(subject.images[modality], cfg.orientation, cfg.spacing, order=order)
        if reference is None:
            reference = info
        else:
            check_same_grid(info.original_grid, reference.original_grid, cfg.affine_tolerance)
        channels.append(data)
    assert reference is not None
    image = np.stack(channels, axis=-1)

    if cfg.histogram.enabled:
        from highres3d.data.histogram import standardise_image

        # NiftyNet's order: histogram standardisation, then whitening.
        image = standardise_image(image, modalities, cfg)

    if cfg.normalisation in ("zscore", "percentile_zscore"):
        if cfg.foreground == "mask":
            if subject.mask is None:
                raise DataError(f"subject {subject.id}: preprocessing.foreground is 'mask' but the subject has no mask file")
            mask_data, mask_info = load_image(subject.mask, cfg.orientation, cfg.spacing, order=0, dtype=np.uint8)
            check_same_grid(mask_info.original_grid, reference.original_grid, cfg.affine_tolerance)
            masks = [mask_data > 0] * image.shape[-1]
        else:
            masks = [foreground_mask(image[..., c], cfg.foreground) for c in range(image.shape[-1])]
        if cfg.normalisation == "percentile_zscore":
            image = clip_percentiles(image, masks, *cfg.clip_percentiles)
        image = whiten(image, masks, cfg.normalise_foreground_only)
    else:
        image = image.astype(np.float32, copy=False)

    label = None
    if subject.label is not None:
        raw, label_info = load_image(subject.label, cfg.orientation, cfg.spacing, order=cfg.label_interpolation, dtype=np.float32)
        check_same_grid(label_info.original_grid, reference.original_grid, cfg.affine_tolerance)
        label = map_labels(raw, cfg.labels, cfg.other_labels, num_classes, source=str(subject.label))
    elif label_required:
        raise DataError(f"subject {subject.id}: no label file")
    return Volume(subject.id, np.ascontiguousarray(image), label, reference)
