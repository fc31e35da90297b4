"""``highres3d data check``: validate every subject of a config's dataset before training."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import nibabel as nib
import numpy as np

from highres3d.config import Config
from highres3d.data.dataset import SPLITS, Dataset, Subject
from highres3d.data.preprocess import as_label_values, map_labels
from highres3d.errors import DataError, Highres3dError
from highres3d.io.nifti import Grid, check_same_grid, read_nifti, spacing_of, working_shape
from highres3d.memory import format_bytes, host_memory_fix, require_host_memory, volumes_in_ram
from highres3d.progress import track


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
    #: Bytes each checked subject will take in RAM once preprocessed (float32 channels, uint8 label).
    working_bytes: dict[str, int] = field(default_factory=dict)

    def bytes_in(self, splits: Sequence[str]) -> tuple[int, int]:
        """(subjects, bytes) of the checked subjects of ``splits`` once preprocessed."""
        chosen = [n for sid, n in self.working_bytes.items()
                  if self.dataset is not None and self.dataset.splits.get(sid, "training") in splits]
        return len(chosen), sum(chosen)

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
        if self.working_bytes and self.dataset is not None:
            parts = []
            for name in SPLITS:
                count, nbytes = self.bytes_in((name,))
                if count:
                    parts.append(f"{name} {format_bytes(nbytes)} ({count})")
            lines.append("  preprocessed, in RAM (float32 images, uint8 labels): " + ", ".join(parts))
        total = sum(self.label_counts.values())
        if total:
            from highres3d.reporting import Table

            for title, column, counts in (("label values", "value", self.label_counts),
                                          ("classes after mapping", "class", self.class_counts)):
                rows = [[str(k), counts[k], f"{100 * counts[k] / total:.3f}"] for k in sorted(counts)]
                lines.append(Table(f"{title} (voxels, % of the labelled volume)", [column, "voxels", "%"], rows).to_text())
        if self.dataset is not None and self.dataset.warnings:
            lines.append(f"{len(self.dataset.warnings)} warning(s):")
            lines.extend(f"  - {w}" for w in self.dataset.warnings)
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


def check_subject(subject: Subject, cfg: Config, report: CheckReport) -> None:
    """Check one subject's files, appending problems and statistics to ``report``.

    Every rule is the one training applies, called from the module that owns
    it: reading (:func:`~highres3d.io.nifti.read_nifti`), one grid per subject
    (:func:`~highres3d.io.nifti.check_same_grid`), the working shape
    (:func:`~highres3d.io.nifti.working_shape`), label values and their mapping
    (:func:`~highres3d.data.preprocess.map_labels`).
    """
    pp = cfg.preprocessing
    reference: Optional[Grid] = None
    for path in subject.files:
        try:
            data, img = read_nifti(path)
            grid = Grid.of(path, data, img)
            if reference is None:
                reference = grid
                working = _record_grid(grid, cfg, report)
                report.working_bytes[subject.id] = int(np.prod(working)) * (4 * len(cfg.dataset.modalities) + 1)
            else:
                check_same_grid(grid, reference, pp.affine_tolerance)
            if path == subject.label:
                _check_label(path, data, cfg, report)
        except DataError as err:
            report.problems.append(str(err))


def _record_grid(grid: Grid, cfg: Config, report: CheckReport) -> tuple[int, int, int]:
    report.shapes[tuple(grid.shape)] += 1
    report.spacings[tuple(round(v, 3) for v in spacing_of(grid.affine))] += 1
    report.orientations["".join(nib.aff2axcodes(grid.affine))] += 1
    working = working_shape(grid.shape, grid.affine, cfg.preprocessing.orientation, cfg.preprocessing.spacing)
    window = cfg.sampler.window_size
    if cfg.sampler.edge_policy == "valid" and any(w > n for w, n in zip(window, working)):
        raise DataError(
            f"{grid.path}: working-space shape {working} is smaller than the training window {tuple(window)}; "
            "use sampler.edge_policy: pad or a smaller sampler.window_size"
        )
    return working


def _check_label(path, data: np.ndarray, cfg: Config, report: CheckReport) -> None:
    pp = cfg.preprocessing
    values = as_label_values(data, str(path))
    counts = np.bincount(values.ravel())
    for v in np.flatnonzero(counts):
        report.label_counts[int(v)] += int(counts[v])
    mapped = map_labels(values, pp.labels, pp.other_labels, cfg.network.num_classes, source=str(path))
    mapped_counts = np.bincount(mapped.ravel())
    for c in np.flatnonzero(mapped_counts):
        report.class_counts[int(c)] += int(mapped_counts[c])


def check_dataset(
    cfg: Config,
    require_labels: bool = True,
    show_progress: Optional[bool] = None,
    splits: Optional[Sequence[str]] = None,
    subset: Optional[int] = None,
) -> CheckReport:
    """Validate the subjects of ``cfg.dataset``; never raises for bad files, it lists them.

    Args:
        cfg: the config whose dataset, preprocessing and sampler rules apply.
        require_labels: training and validation subjects must have a label.
        show_progress: progress display (``None``: automatic, ``False``: none).
        splits: check only the subjects of these splits (default: every subject).
        subset: with ``splits`` containing ``training``, only the training subset S_k.
    """
    report = CheckReport()
    try:
        dataset = Dataset.from_config(cfg.dataset, require_labels=require_labels)
    except Highres3dError as err:
        report.problems.append(str(err))
        return report
    report.dataset = dataset
    report.problems.extend(dataset.problems)
    if splits is None:
        subjects = dataset.subjects
    else:
        subjects = [s for name in splits for s in dataset.split(name, subset=subset if name == "training" else None)]
    for subject in track(subjects, "data check", unit="subjects", enabled=show_progress):
        check_subject(subject, cfg, report)
        report.subjects_checked += 1
    return report


def require_valid_data(cfg: Config, *, subset: Optional[int] = None, splits: Sequence[str] = ("training", "validation"),
                       show_progress: Optional[bool] = None) -> Dataset:
    """Run :func:`check_dataset` on the subjects training uses; raise one error listing every problem.

    ``train`` and ``experiment`` call this before they create anything, so a
    bad file never leaves a half-made run folder behind.
    """
    report = check_dataset(cfg, show_progress=show_progress, splits=splits, subset=subset)
    if not report.ok:
        listed = "\n".join(f"  - {p}" for p in report.problems)
        raise DataError(
            f"{len(report.problems)} problem(s) in the data of {cfg.source_file or 'the config'}; nothing was created:\n"
            f"{listed}\nFix them (or set dataset.missing: skip to leave out subjects with missing files) and run again; "
            "'highres3d data check CONFIG' prints the full report."
        )
    # The volumes training will hold in RAM, from the headers: a job that cannot hold them stops here,
    # before anything is created, instead of being killed by the system after preprocessing for minutes.
    held = [s for s in splits if volumes_in_ram(cfg.training.cache, s)]
    count, need = report.bytes_in(held)
    if held:
        require_host_memory(f"{' and '.join(held)}: {count} preprocessed volumes (working-space shapes from the files' "
                            "headers) need", need, host_memory_fix(cfg.training.cache))
    return report.dataset
