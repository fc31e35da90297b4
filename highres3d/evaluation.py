"""Per-subject, per-class segmentation metrics in millimetres, and their summary.

Metrics for a class c with prediction P = (pred == c) and truth G = (truth == c):

* ``dice`` = 2TP / (2TP + FP + FN), ``jaccard`` = TP / (TP + FP + FN);
* ``tp``, ``fp``, ``fn``, ``tn`` voxel counts, ``pred_ml`` / ``truth_ml`` volumes;
* surface distances in mm, from the voxel spacing of the truth file's header
  (``scipy.ndimage.distance_transform_edt(sampling=spacing)``).  The surface of
  a mask is its voxels with at least one of their 6 face neighbours outside
  the mask (the image border counts as outside), as NiftyNet and MONAI define
  it.  ``hausdorff_mm`` is the largest distance from a surface voxel of one
  mask to the surface of the other, in either direction; ``hd95_mm`` takes the
  95th percentile of each direction and then the larger of the two (MONAI,
  NiftyNet); ``assd_mm`` is the mean over both surfaces' distances pooled
  together (NiftyNet's ``average_distance``, MONAI's symmetric ASD).

Empty masks (see :class:`EmptyPolicy`, recorded in every summary):

* truth empty, prediction not (or the reverse): ``dice`` = ``jaccard`` = 0,
  as nnU-Net does (MONAI's default ``ignore_empty`` would hide the false
  positives).  There is no surface to measure a distance to, so distances get
  ``missing_distance``: by default the diagonal of the image in mm (the worst
  possible error, which keeps means finite, as BraTS-style challenges do), or
  NaN or inf;
* both empty: nothing to score.  Default ``nan`` (nnU-Net): the case is left
  out of that class's mean, and the summary counts such cases; ``perfect``
  scores it Dice 1, distances 0 (BraTS convention).

Summaries use NaN-aware statistics: ``mean``, ``sd`` (sample standard
deviation, ddof = 1; NiftyNet wrote ddof = 0), ``median`` and ``n`` (values
that entered them).  In JSON a NaN is written as ``null`` and an infinite value
as the string ``"inf"``.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np
from scipy import ndimage

from highres3d.errors import ConfigError, DataError
from highres3d.io.nifti import Grid, check_same_grid, read_nifti, spacing_of
from highres3d.utils import atomic_path

__all__ = [
    "EmptyPolicy", "METRICS", "surface", "surface_distances", "binary_metrics", "evaluate_labels",
    "score_subject", "score_files", "read_label_file", "mean_foreground", "summarise", "evaluate_folders",
    "EvaluationResult", "write_csv", "write_summary", "summary_table",
]

#: Per-class columns, in CSV order.
METRICS = (
    "dice", "jaccard", "hausdorff_mm", "hd95_mm", "assd_mm",
    "tp", "fp", "fn", "tn", "pred_voxels", "truth_voxels", "pred_ml", "truth_ml",
)
_DISTANCES = ("hausdorff_mm", "hd95_mm", "assd_mm")
#: Metrics summarised per class (counts are summed by anyone who needs them from the CSV).
SUMMARY_METRICS = ("dice", "jaccard", "hausdorff_mm", "hd95_mm", "assd_mm", "pred_ml", "truth_ml")


@dataclass(frozen=True)
class EmptyPolicy:
    """What a metric is when a mask is empty.

    Attributes:
        both_empty: ``"nan"`` (nnU-Net: no score; left out of means) or
            ``"perfect"`` (Dice/Jaccard 1, distances 0: BraTS).
        missing_distance: distances when exactly one mask is empty:
            ``"diagonal"`` (image diagonal in mm), ``"nan"`` or ``"inf"``.
    """

    both_empty: str = "nan"
    missing_distance: str = "diagonal"

    def __post_init__(self):
        if self.both_empty not in ("nan", "perfect"):
            raise ConfigError(f"empty policy both_empty: expected 'nan' or 'perfect', got {self.both_empty!r}")
        if self.missing_distance not in ("diagonal", "nan", "inf"):
            raise ConfigError(
                f"empty policy missing_distance: expected 'diagonal', 'nan' or 'inf', got {self.missing_distance!r}"
            )


# --------------------------------------------------------------------------- surfaces


_FACES = ndimage.generate_binary_structure(3, 1)


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (outside the image counts)."""
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        lo = max(int(present[0]) - margin, 0)
        hi = min(int(present[-1]) + margin + 1, mask.shape[axis])
        slices.append(slice(lo, hi))
    return tuple(slices)


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``pred`` to the surface of ``truth``, and back.

    Both masks must be non-empty.  The work is confined to the bounding box of
    their union (plus one voxel), which contains every surface voxel, so the
    distances are the same as on the full image.
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    # Every surface voxel lies in the box and is at least one voxel from its
    # edge unless that edge is the image's, so erosion inside the box (edge =
    # outside) finds the same surfaces as on the whole image.
    box = _bounding_box(pred | truth)
    pred_surface = surface(pred[box])
    truth_surface = surface(truth[box])
    sampling = np.asarray(spacing, dtype=float)
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)
    return to_truth[pred_surface], to_pred[truth_surface]


def binary_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    policy: EmptyPolicy = EmptyPolicy(),
    distances: bool = True,
) -> dict[str, float]:
    """All metrics of :data:`METRICS` for two boolean masks of one shape.

    With ``distances=False`` the surface distances (the costly part) are NaN.
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    spacing = tuple(float(s) for s in spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    tp = int(np.count_nonzero(pred & truth))
    n_pred = int(np.count_nonzero(pred))
    n_truth = int(np.count_nonzero(truth))
    fp, fn = n_pred - tp, n_truth - tp
    out = {
        "tp": tp, "fp": fp, "fn": fn, "tn": int(pred.size - tp - fp - fn),
        "pred_voxels": n_pred, "truth_voxels": n_truth,
        "pred_ml": n_pred * voxel_ml, "truth_ml": n_truth * voxel_ml,
    }
    if n_pred == 0 and n_truth == 0:
        value = math.nan if policy.both_empty == "nan" else 1.0
        distance = math.nan if policy.both_empty == "nan" else 0.0
        out.update(dice=value, jaccard=value, **{k: distance for k in _DISTANCES})
        return out
    out["dice"] = 2.0 * tp / (2 * tp + fp + fn)
    out["jaccard"] = tp / (tp + fp + fn)
    if not distances:
        out.update({k: math.nan for k in _DISTANCES})
        return out
    if n_pred == 0 or n_truth == 0:
        if policy.missing_distance == "diagonal":
            distance = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing))))
        else:
            distance = math.nan if policy.missing_distance == "nan" else math.inf
        out.update({k: distance for k in _DISTANCES})
        return out
    to_truth, to_pred = surface_distances(pred, truth, spacing)
    out["hausdorff_mm"] = float(max(to_truth.max(), to_pred.max()))
    out["hd95_mm"] = float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))
    out["assd_mm"] = float((to_truth.sum() + to_pred.sum()) / (to_truth.size + to_pred.size))
    return out


def evaluate_labels(
    pred: np.ndarray,
    truth: np.ndarray,
    classes: Iterable[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    policy: EmptyPolicy = EmptyPolicy(),
) -> dict[int, dict[str, float]]:
    """:func:`binary_metrics` for each class of two integer label maps."""
    return {int(c): binary_metrics(pred == c, truth == c, spacing, policy) for c in classes}


# --------------------------------------------------------------------------- one subject


def score_subject(
    prediction: np.ndarray,
    truth: np.ndarray,
    *,
    affine: Optional[np.ndarray] = None,
    classes: Optional[Iterable[int]] = None,
    truth_map: Optional[Mapping[int, int]] = None,
    truth_other: Optional[int] = None,
    pred_map: Optional[Mapping[int, int]] = None,
    policy: EmptyPolicy = EmptyPolicy(),
    distances: bool = True,
    pred_source: str = "prediction",
    truth_source: str = "truth",
) -> dict[int, dict[str, float]]:
    """Score one subject: the only scorer of highres3d.

    ``evaluate``, the experiment runner and the trainer's whole-volume
    validation all call this, so one pair of label maps gives the same
    numbers everywhere.

    Args:
        prediction: integer label map (any shape; values are class indices, or
            raw values mapped by ``pred_map``).
        truth: integer label map of the same shape.
        affine: the truth's voxel-to-mm affine; the spacing of the surface
            distances and volumes comes from it (``None``: 1 mm voxels).
        classes: classes to score; ``None`` = every non-zero class present
            in either map.
        truth_map: raw truth value -> class, as
            :func:`highres3d.data.preprocess.map_labels`.
        truth_other: class of raw truth values missing from a non-empty
            ``truth_map`` (``None``: such values are an error).
        pred_map: the same as ``truth_map`` for the prediction.
        policy: what a metric is when a mask is empty.
        distances: compute the surface distances (the costly part); without
            them the distance metrics are NaN.
        pred_source: name of the prediction in error messages.
        truth_source: name of the truth in error messages.

    Returns:
        ``{class: {metric: value}}`` with the metrics of :data:`METRICS`.

    Raises:
        DataError: shapes differ, values are not non-negative integers, or a
            value is missing from a label map.
    """
    from highres3d.data.preprocess import as_label_values, map_labels

    prediction = np.asarray(prediction)
    truth = np.asarray(truth)
    if prediction.shape != truth.shape:
        raise DataError(f"{pred_source}: shape {prediction.shape} differs from {truth.shape} of {truth_source}")
    # Without a map the raw values are the classes (any integer, e.g. FreeSurfer's 2035).
    truth = map_labels(truth, truth_map, truth_other, source=truth_source) if truth_map else as_label_values(truth, truth_source)
    prediction = map_labels(prediction, pred_map, source=pred_source) if pred_map else as_label_values(prediction, pred_source)
    spacing = spacing_of(affine) if affine is not None else (1.0,) * truth.ndim
    if classes is None:
        present = set(np.flatnonzero(np.bincount(prediction.ravel()))) | set(np.flatnonzero(np.bincount(truth.ravel())))
        classes = sorted(int(c) for c in present if c != 0)
    return {int(c): binary_metrics(prediction == c, truth == c, spacing, policy, distances=distances) for c in classes}


def mean_foreground(scores: Mapping[int, Mapping[str, float]], metric: str = "dice") -> float:
    """Mean of ``metric`` over the non-zero classes of :func:`score_subject`, undefined values left out (NaN if none)."""
    values = [float(m[metric]) for c, m in scores.items() if c != 0 and not math.isnan(float(m[metric]))]
    return float(np.mean(values)) if values else math.nan


def read_label_file(path: str | Path) -> tuple[np.ndarray, Grid]:
    """A label map file as int64 values and its grid (see :func:`highres3d.data.preprocess.as_label_values`)."""
    from highres3d.data.preprocess import as_label_values

    data, img = read_nifti(path)
    return as_label_values(data, str(path)), Grid.of(path, data, img)


def score_files(
    pred_path: str | Path,
    truth_path: str | Path,
    *,
    affine_tolerance: float = 1e-3,
    **options,
) -> dict[int, dict[str, float]]:
    """:func:`score_subject` for a prediction file and a truth file on the same grid.

    The prediction must be on the truth's grid (shape, and affine within
    ``affine_tolerance`` mm); the spacing comes from the truth's affine.
    ``options`` are those of :func:`score_subject`.
    """
    pred, pred_grid = read_label_file(pred_path)
    truth, truth_grid = read_label_file(truth_path)
    check_same_grid(pred_grid, truth_grid, affine_tolerance,
                    hint="predictions must be on the truth's grid (highres3d infer writes them on the input's grid)")
    return score_subject(pred, truth, affine=truth_grid.affine, pred_source=str(pred_path),
                         truth_source=str(truth_path), **options)


# --------------------------------------------------------------------------- summaries


def _stats(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return {"mean": math.nan, "sd": math.nan, "median": math.nan, "n": 0}
    with np.errstate(invalid="ignore"):
        return {
            "mean": float(arr.mean()),
            "sd": float(arr.std(ddof=1)) if arr.size > 1 else math.nan,
            "median": float(np.median(arr)),
            "n": int(arr.size),
        }


def summarise(rows: Sequence[Mapping], classes: Optional[Sequence[int]] = None) -> dict:
    """Per-class mean / sd / median / n of each metric over subjects, NaN-aware.

    ``rows`` are the per-subject, per-class records (``subject``, ``class`` and
    :data:`METRICS`).  ``foreground_mean`` is the mean of the class means of the
    non-zero classes (nnU-Net's).
    """
    classes = sorted({int(r["class"]) for r in rows}) if classes is None else list(classes)
    per_class = {}
    for c in classes:
        mine = [r for r in rows if int(r["class"]) == c]
        entry = {m: _stats([float(r[m]) for r in mine]) for m in SUMMARY_METRICS}
        entry["cases"] = len(mine)
        entry["both_empty"] = sum(1 for r in mine if r["pred_voxels"] == 0 and r["truth_voxels"] == 0)
        entry["false_positive_cases"] = sum(1 for r in mine if r["truth_voxels"] == 0 and r["pred_voxels"] > 0)
        entry["missed_cases"] = sum(1 for r in mine if r["truth_voxels"] > 0 and r["pred_voxels"] == 0)
        per_class[str(c)] = entry
    foreground = [c for c in classes if c != 0]
    fg_mean = {}
    for m in SUMMARY_METRICS:
        means = [per_class[str(c)][m]["mean"] for c in foreground]
        means = [v for v in means if not math.isnan(v)]
        fg_mean[m] = float(np.mean(means)) if means else math.nan
    return {"classes": per_class, "foreground_mean": fg_mean}


def _json_safe(value):
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def write_csv(rows: Sequence[Mapping], path: str | Path, overwrite: bool = False) -> Path:
    """One row per subject and class, columns ``subject, class`` + :data:`METRICS`, atomically."""
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["subject", "class", *METRICS])
            for r in rows:
                cells = []
                for m in METRICS:
                    v = r[m]
                    cells.append(v if isinstance(v, int) else ("nan" if math.isnan(v) else repr(float(v))))
                writer.writerow([r["subject"], r["class"], *cells])
    return path


def write_summary(summary: Mapping, path: str | Path, overwrite: bool = False) -> Path:
    """Write the summary as strict JSON (NaN → null, inf → "inf"), atomically."""
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(_json_safe(dict(summary)), indent=2, allow_nan=False) + "\n")
    return path


def summary_table(summary: Mapping):
    """The per-class summary as a :class:`highres3d.reporting.Table`: mean ± sd [median] per metric."""
    from highres3d.reporting import Table

    def cell(stat):
        if stat["n"] == 0:
            return "–"
        sd = "" if math.isnan(stat["sd"]) else f" ± {stat['sd']:.3g}"
        return f"{stat['mean']:.4g}{sd} [{stat['median']:.4g}]"

    header = ["class", "cases", "dice", "jaccard", "hd95 mm", "hausdorff mm", "assd mm", "both empty"]
    rows = [
        [c, str(entry["cases"]), cell(entry["dice"]), cell(entry["jaccard"]), cell(entry["hd95_mm"]),
         cell(entry["hausdorff_mm"]), cell(entry["assd_mm"]), str(entry["both_empty"])]
        for c, entry in summary["classes"].items()
    ]
    return Table("per-class metrics over subjects", header, rows,
                 ["values: mean ± sd [median] over subjects with a defined value (no sd for a single value)"])


# --------------------------------------------------------------------------- folders


@dataclass
class EvaluationResult:
    """Rows per subject and class, their summary, and what could not be paired."""

    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    missing_predictions: list[str] = field(default_factory=list)


def evaluate_folders(
    pred_dir: str | Path,
    truth_dir: str | Path,
    pred_pattern: str = "{subject}_seg.nii.gz",
    truth_pattern: str = "{subject}_seg.nii.gz",
    classes: Optional[Sequence[int]] = None,
    truth_map: Optional[Mapping[int, int]] = None,
    pred_map: Optional[Mapping[int, int]] = None,
    truth_other: Optional[int] = None,
    policy: EmptyPolicy = EmptyPolicy(),
    affine_tolerance: float = 1e-3,
    progress=None,
) -> EvaluationResult:
    """Evaluate every prediction in ``pred_dir`` against its truth in ``truth_dir``.

    Subjects are paired by the ``{subject}`` part of the two patterns
    (:func:`highres3d.data.dataset.find_by_pattern`).  A prediction without a
    truth file is an error; truth files without a prediction are listed in
    ``missing_predictions``.  Prediction and truth must share shape and affine
    (within ``affine_tolerance`` mm); the spacing comes from the truth's affine.
    ``classes`` defaults to every non-zero class found in any prediction or
    (mapped) truth; a class absent from a subject is scored as both-empty.
    ``truth_map`` maps raw truth values to classes (values it lacks get
    ``truth_other``, or are an error); ``pred_map`` does the same for predictions.
    """
    from highres3d.data.dataset import find_by_pattern

    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    for d, what in ((pred_dir, "--pred"), (truth_dir, "--truth")):
        if not d.is_dir():
            raise DataError(f"{d}: {what} folder not found")
    preds = find_by_pattern(pred_dir, pred_pattern)
    truths = find_by_pattern(truth_dir, truth_pattern)
    if not preds:
        raise DataError(f"{pred_dir}: no predictions match {pred_pattern!r}")
    unpaired = [s for s in preds if s not in truths]
    if unpaired:
        raise DataError(
            f"{truth_dir}: no truth file matching {truth_pattern!r} for {len(unpaired)} prediction(s), e.g. "
            f"{preds[unpaired[0]]}; set --truth-pattern"
        )
    result = EvaluationResult(missing_predictions=sorted(s for s in truths if s not in preds))
    per_subject: dict[str, tuple[dict[int, dict], int]] = {}
    seen: set[int] = set()
    subjects = list(preds)
    iterator = progress(subjects) if progress is not None else subjects
    for sid in iterator:
        scores = score_files(preds[sid], truths[sid], affine_tolerance=affine_tolerance, classes=classes,
                             truth_map=truth_map, truth_other=truth_other, pred_map=pred_map, policy=policy)
        seen.update(scores)
        per_subject[sid] = (scores, int(np.prod(nib.load(str(truths[sid])).shape[:3])))
    all_classes = sorted(seen) if classes is None else [int(c) for c in classes]
    for sid, (metrics, voxels) in per_subject.items():
        for c in all_classes:
            if c not in metrics:
                # A class found in other subjects only: both masks empty here.
                empty = np.zeros((1, 1, 1), dtype=bool)
                metrics[c] = {**binary_metrics(empty, empty, policy=policy), "tn": voxels}
            result.rows.append({"subject": sid, "class": c, **metrics[c]})
    summary = summarise(result.rows, all_classes)
    summary.update(
        subjects=len(per_subject),
        missing_predictions=result.missing_predictions,
        policy=asdict(policy),
        truth_map={str(k): v for k, v in (truth_map or {}).items()},
        pred_map={str(k): v for k, v in (pred_map or {}).items()},
        pred_dir=str(pred_dir),
        truth_dir=str(truth_dir),
        spacing_source="truth file affine (mm)",
    )
    result.summary = summary
    return result
