"""``highres3d data check``: validate every subject of a config's dataset before training."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import nibabel as nib
import numpy as np

from highres3d.config import Config
from highres3d.data.dataset import SPLITS, Dataset, Subject
from highres3d.data.preprocess import label_lookup
from highres3d.errors import DataError
from highres3d.io.nifti import orientation_transform, read_nifti
from highres3d.utils import progress


@dataclass
class CheckReport:
    """The outcome of a dataset check: problems (each naming a file) and a summary."""

    dataset: Optional[Dataset] = None
    problems: list[str] = field(default_factory=list)
    shapes: Counter = field(default_factory=Counter)
    spacings: Counter = field(default_factory=Counter)
    orientations: Counter = field(default_factory=Counter)
    label_counts: Counter = field(default_factory=Counter)
    class_counts: Counter = field(default_factory=Counter)
    subjects_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = []
        if self.dataset is not None:
            counts = self.dataset.counts()
            lines.append(f"dataset '{self.dataset.name}': {len(self.dataset.subjects)} subjects")
            lines.append("  splits: " + ", ".join(f"{name} {counts[name]}" for name in SPLITS))
            if self.dataset.subsets:
                lines.append("  training subsets: " + ", ".join(f"S{i + 1}={len(s)}" for i, s in enumerate(self.dataset.subsets)))
        lines.append(f"  checked: {self.subjects_checked} subjects")
        lines.append("  shapes: " + _fmt_counter(self.shapes, lambda s: "x".join(map(str, s))))
        lines.append("  spacings (mm): " + _fmt_counter(self.spacings, lambda s: "x".join(f"{v:g}" for v in s)))
        lines.append("  orientations: " + _fmt_counter(self.orientations, str))
        total = sum(self.label_counts.values())
        if total:
            lines.append("  label values (voxels, % of labelled volume):")
            for value in sorted(self.label_counts):
                n = self.label_counts[value]
                lines.append(f"    {value:>6}: {n:>12,}  {100 * n / total:7.3f} %")
            lines.append("  classes after mapping:")
            for cls in sorted(self.class_counts):
                n = self.class_counts[cls]
                lines.append(f"    {cls:>6}: {n:>12,}  {100 * n / total:7.3f} %")
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines.extend(f"  - {p}" for p in self.problems)
        else:
            lines.append("no problems found")
        return "\n".join(lines)


def _fmt_counter(counter: Counter, fmt) -> str:
    if not counter:
        return "-"
    return ", ".join(f"{fmt(k)} ({n})" for k, n in counter.most_common(6)) + (" …" if len(counter) > 6 else "")


def _working_shape(shape, affine, cfg: Config) -> tuple[int, ...]:
    transform = orientation_transform(affine, cfg.preprocessing.orientation)
    reoriented = [0, 0, 0]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    re_spacing = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(transform):
        reoriented[int(target)] = shape[axis]
        re_spacing[int(target)] = spacing[axis]
    if cfg.preprocessing.spacing is None:
        return tuple(reoriented)
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(reoriented, re_spacing, cfg.preprocessing.spacing))


def check_subject(subject: Subject, cfg: Config, report: CheckReport) -> None:
    """Check one subject's files, appending problems and statistics to ``report``."""
    pp = cfg.preprocessing
    reference = None
    for path in subject.files:
        try:
            data, img = read_nifti(path)
        except DataError as err:
            report.problems.append(str(err))
            continue
        affine = img.affine
        if reference is None:
            reference = (path, data.shape, affine)
            report.shapes[tuple(data.shape)] += 1
            report.spacings[tuple(round(float(v), 3) for v in np.linalg.norm(affine[:3, :3], axis=0))] += 1
            report.orientations["".join(nib.aff2axcodes(affine))] += 1
            working = _working_shape(data.shape, affine, cfg)
            window = cfg.sampler.window_size
            if cfg.sampler.edge_policy == "valid" and any(w > n for w, n in zip(window, working)):
                report.problems.append(
                    f"{path}: working-space shape {working} is smaller than the training window {tuple(window)}; "
                    "use sampler.edge_policy: pad or a smaller sampler.window_size"
                )
        else:
            ref_path, ref_shape, ref_affine = reference
            if tuple(data.shape) != tuple(ref_shape):
                report.problems.append(f"{path}: shape {tuple(data.shape)} differs from {tuple(ref_shape)} of {ref_path}")
            else:
                diff = float(np.abs(affine - ref_affine).max())
                if diff > pp.affine_tolerance:
                    report.problems.append(
                        f"{path}: affine differs from that of {ref_path} by {diff:.4g} mm "
                        f"(tolerance preprocessing.affine_tolerance = {pp.affine_tolerance:g})"
                    )
        if path == subject.label:
            _check_label(path, data, cfg, report)


def _check_label(path, data: np.ndarray, cfg: Config, report: CheckReport) -> None:
    pp = cfg.preprocessing
    if data.dtype.kind == "f":
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            report.problems.append(f"{path}: label values are not integers (is this an image rather than a label map?)")
            return
        data = rounded
    data = data.astype(np.int64, copy=False)
    low = int(data.min())
    if low < 0:
        report.problems.append(f"{path}: negative label value {low}")
        return
    counts = np.bincount(data.ravel())
    values = np.flatnonzero(counts)
    for v in values:
        report.label_counts[int(v)] += int(counts[v])
    if pp.labels:
        table = label_lookup(pp.labels, pp.other_labels, int(values.max()))
        unmapped = [int(v) for v in values if table[v] < 0]
        if unmapped:
            report.problems.append(
                f"{path}: label values {unmapped} are not covered by preprocessing.labels {dict(pp.labels)} "
                "(add them or set preprocessing.other_labels)"
            )
            return
        for v in values:
            report.class_counts[int(table[v])] += int(counts[v])
    else:
        too_big = [int(v) for v in values if v >= cfg.network.num_classes]
        if too_big:
            report.problems.append(
                f"{path}: label values {too_big} exceed network.num_classes={cfg.network.num_classes}; "
                "set preprocessing.labels to map raw values to classes"
            )
            return
        for v in values:
            report.class_counts[int(v)] += int(counts[v])


def check_dataset(cfg: Config, require_labels: bool = True, show_progress: Optional[bool] = None) -> CheckReport:
    """Validate every subject of ``cfg.dataset``; never raises for bad files, it lists them."""
    report = CheckReport()
    try:
        dataset = Dataset.from_config(cfg.dataset)
    except DataError as err:
        report.problems.append(str(err))
        return report
    report.dataset = dataset
    report.problems.extend(dataset.problems)
    for subject in progress(dataset.subjects, desc="checking", enabled=show_progress):
        if require_labels and subject.label is None and dataset.splits.get(subject.id) in ("training", "validation"):
            report.problems.append(f"{subject.id}: no label file (needed for {dataset.splits[subject.id]})")
        check_subject(subject, cfg, report)
        report.subjects_checked += 1
    return report
