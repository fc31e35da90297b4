"""Subject discovery and data splits.

Four layouts find each subject's files:

* ``patterns``: a root folder and one filename pattern per modality (and
  ``label``) with a ``{subject}`` placeholder, e.g. BraTS
  ``{subject}/{subject}_t1.nii.gz`` or IXI ``{subject}-T1.nii.gz``;
* ``niftynet_csv``: NiftyNet's CSV files, one per modality, rows
  ``subject_id,path`` (no header; relative paths are relative to the CSV);
* ``niftynet_search``: NiftyNet 0.5's ``path_to_search`` / ``filename_contains``
  matching per input section (:mod:`highres3d.niftynet.matching`);
* ``nnunet``: nnU-Net's raw layout (``dataset.json``, ``imagesTr/<case>_0000.nii.gz``,
  ``labelsTr/<case>.nii.gz``, ``imagesTs/``), channels matched by name.

Splits come from a NiftyNet split CSV (``subject,training|validation|inference``)
or from fractions and a seed; nested training subsets S1 ⊂ S2 ⊂ … for
dataset-size studies come from sizes and a seed or from files.
"""
from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from highres3d.config import DatasetConfig, SplitConfig
from highres3d.errors import ConfigError, DataError

SPLITS = ("training", "validation", "inference")


@dataclass(frozen=True)
class Subject:
    """One subject: an id, one file per modality (in channel order) and an optional label."""

    id: str
    images: dict[str, Path]
    label: Optional[Path] = None
    mask: Optional[Path] = None  # foreground mask for whitening (preprocessing.foreground: mask)

    @property
    def files(self) -> list[Path]:
        extra = [p for p in (self.label, self.mask) if p is not None]
        return list(self.images.values()) + extra


# --------------------------------------------------------------------------- patterns


def _pattern_regex(pattern: str) -> re.Pattern:
    parts = pattern.split("{subject}")
    regex = re.escape(parts[0])
    for i, part in enumerate(parts[1:]):
        regex += r"(?P<subject>[^/]+?)" if i == 0 else r"(?P=subject)"
        regex += re.escape(part)
    return re.compile(regex + r"\Z")


def find_by_pattern(root: Path, pattern: str) -> dict[str, Path]:
    """All subject ids whose file matches ``pattern`` below ``root``, with their paths."""
    if "{subject}" not in pattern:
        raise ConfigError(f"pattern {pattern!r}: must contain '{{subject}}'")
    regex = _pattern_regex(pattern)
    found = {}
    for path in root.glob(pattern.replace("{subject}", "*")):
        match = regex.match(path.relative_to(root).as_posix())
        if match and path.is_file():
            found[match.group("subject")] = path
    return dict(sorted(found.items()))


def discover_subjects(
    root: str | Path,
    patterns: dict[str, str],
    modalities: Sequence[str],
    problems: Optional[list[str]] = None,
) -> list[Subject]:
    """Subjects under ``root`` with a file for every modality (labels optional).

    A subject that lacks one of its modalities is left out and reported in
    ``problems`` (when given), naming the missing file.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    first = find_by_pattern(root, patterns[modalities[0]])
    ids = set(first)
    for modality in modalities[1:]:
        ids |= set(find_by_pattern(root, patterns[modality]))
    subjects = []
    for sid in sorted(ids):
        images = {m: root / patterns[m].format(subject=sid) for m in modalities}
        missing = [str(p) for p in images.values() if not p.is_file()]
        if missing:
            if problems is not None:
                problems.append(f"{sid}: missing {', '.join(missing)}")
            continue
        optional = {}
        for key in ("label", "mask"):
            if key in patterns:
                candidate = root / patterns[key].format(subject=sid)
                optional[key] = candidate if candidate.is_file() else None
        subjects.append(Subject(sid, images, **optional))
    return subjects


# --------------------------------------------------------------------------- NiftyNet CSV


def _csv_pairs(path: Path, what: str, second: str) -> Iterator[tuple[int, str, str]]:
    """``(line number, first, second)`` of each non-blank row of a two-column NiftyNet CSV."""
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    with open(path, newline="") as handle:
        for line_no, row in enumerate(csv.reader(handle, skipinitialspace=True), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise DataError(f"{path}:{line_no}: expected 'subject_id,{second}', got {','.join(row)!r}")
            yield line_no, row[0].strip(), row[1].strip()


def read_subject_csv(path: Path) -> dict[str, Path]:
    """Read a NiftyNet ``subject_id,path`` CSV; relative paths resolve against the CSV."""
    rows: dict[str, Path] = {}
    for line_no, sid, file in _csv_pairs(path, "CSV file", "path"):
        if line_no == 1 and sid.lower() in ("subject_id", "subject", "id"):
            continue  # a header row
        file_path = Path(file)
        rows[sid] = file_path if file_path.is_absolute() else (path.parent / file_path).resolve()
    return rows


def _subjects_from_csv(cfg: DatasetConfig, problems: list[str]) -> list[Subject]:
    tables = {m: read_subject_csv(Path(cfg.csv_files[m])) for m in cfg.modalities}
    labels = read_subject_csv(Path(cfg.csv_files["label"])) if "label" in cfg.csv_files else {}
    masks = read_subject_csv(Path(cfg.csv_files["mask"])) if "mask" in cfg.csv_files else {}
    ids = sorted(set().union(*[set(t) for t in tables.values()]))
    subjects = []
    for sid in ids:
        missing = [m for m in cfg.modalities if sid not in tables[m]]
        if missing:
            problems.append(f"{sid}: no row in the CSV of {', '.join(missing)}")
            continue
        subjects.append(Subject(sid, {m: tables[m][sid] for m in cfg.modalities}, labels.get(sid), masks.get(sid)))
    return subjects


# --------------------------------------------------------------------------- nnU-Net raw


def read_nnunet_channels(meta_path: Path, modalities: Sequence[str]) -> tuple[dict[str, int], str]:
    """The channel index of each modality, matched by name in an nnU-Net ``dataset.json``, and its file ending.

    Names match case-insensitively; file ``<case>_0001.nii.gz`` holds the
    channel that ``channel_names`` calls ``"1"``, whatever order the config
    lists its modalities in.
    """
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: not found; an nnU-Net raw dataset folder needs dataset.json")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{meta_path}: invalid JSON ({err})") from None
    channels = meta.get("channel_names") or meta.get("modality")
    if not isinstance(channels, dict):
        raise DataError(f"{meta_path}: expected 'channel_names' mapping channel indices to names")
    by_name = {str(name).lower(): int(index) for index, name in channels.items()}
    missing = [m for m in modalities if m.lower() not in by_name]
    if missing:
        raise ConfigError(
            f"dataset.modalities: {', '.join(missing)} not among the channels of {meta_path} ({', '.join(map(str, channels.values()))})"
        )
    return {m: by_name[m.lower()] for m in modalities}, str(meta.get("file_ending", ".nii.gz"))


def _subjects_from_nnunet(root: Path, modalities: Sequence[str], problems: list[str]) -> tuple[list[Subject], list[str]]:
    index, ending = read_nnunet_channels(root / "dataset.json", modalities)
    subjects: list[Subject] = []
    test_ids: list[str] = []
    for folder, label_folder in (("imagesTr", "labelsTr"), ("imagesTs", None)):
        image_dir = root / folder
        if not image_dir.is_dir():
            continue
        cases = sorted({p.name[: -len(ending) - 5] for p in image_dir.glob(f"*_0000{ending}")})
        for case in cases:
            images = {m: image_dir / f"{case}_{index[m]:04d}{ending}" for m in modalities}
            absent = [str(p) for p in images.values() if not p.is_file()]
            if absent:
                problems.append(f"{case}: missing {', '.join(absent)}")
                continue
            label = root / label_folder / f"{case}{ending}" if label_folder else None
            if label is not None and not label.is_file():
                label = None  # Dataset.from_config reports labels that training needs
            subjects.append(Subject(case, images, label))
            if label_folder is None:
                test_ids.append(case)
    if not subjects:
        raise DataError(f"{root}: no cases found in imagesTr/ or imagesTs/ (expected files like <case>_0000{ending})")
    return subjects, test_ids


# --------------------------------------------------------------------------- splits


def read_split_csv(path: Path) -> dict[str, str]:
    """Read a NiftyNet split file: rows ``subject_id,training|validation|inference``."""
    out: dict[str, str] = {}
    for line_no, sid, raw in _csv_pairs(path, "split file", "split"):
        split = raw.lower()
        if line_no == 1 and split in ("split", "phase"):
            continue
        if split not in SPLITS:
            raise DataError(f"{path}:{line_no}: split {raw!r} is not one of {', '.join(SPLITS)}")
        if sid in out and out[sid] != split:
            raise DataError(f"{path}:{line_no}: subject {sid} is listed as both {out[sid]} and {split}")
        out[sid] = split
    return out


def random_split(ids: Sequence[str], validation_fraction: float, inference_fraction: float, seed: int) -> dict[str, str]:
    """NiftyNet's rule (ceil of each fraction) with a seeded, reproducible permutation."""
    ids = sorted(ids)
    n = len(ids)
    n_val = math.ceil(n * validation_fraction) if validation_fraction > 0 else 0
    n_inf = math.ceil(n * inference_fraction) if inference_fraction > 0 else 0
    if n and n_val + n_inf >= n:
        raise ConfigError(
            f"dataset.split: {n} subjects leave none for training with validation_fraction={validation_fraction} "
            f"and inference_fraction={inference_fraction}"
        )
    order = np.random.default_rng(seed).permutation(n)
    out = {}
    for rank, index in enumerate(order):
        out[ids[index]] = "validation" if rank < n_val else "inference" if rank < n_val + n_inf else "training"
    return out


def _read_subset_file(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: subset file not found")
    ids = []
    with open(path, newline="") as handle:
        for row in csv.reader(handle, skipinitialspace=True):
            if not row or not row[0].strip():
                continue
            if len(row) >= 2 and row[1].strip().lower() not in ("training",):
                continue  # NiftyNet split file: the subset is its training rows
            ids.append(row[0].strip())
    return ids


def write_split_csv(splits: dict[str, str], path: Path, overwrite: bool = False) -> Path:
    """Write a NiftyNet-compatible split file (no header)."""
    from highres3d.utils import atomic_path

    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            for sid, split in sorted(splits.items()):
                writer.writerow([sid, split])
    return path


# --------------------------------------------------------------------------- dataset


@dataclass
class Dataset:
    """The subjects of a config's dataset section, with their split and training subsets."""

    subjects: list[Subject]
    splits: dict[str, str]
    subsets: list[list[str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    name: str = "dataset"
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg: DatasetConfig, require_labels: bool = True) -> Dataset:
        """Find every subject and assign splits; raises DataError if there are none.

        Subjects with a missing file (an image, or with ``require_labels`` the
        label of a training or validation subject) are left out of the splits.
        With ``dataset.missing: error`` (the default) each is listed in
        :attr:`problems`, which stops training before it starts; with ``skip``
        they are listed in :attr:`warnings` instead.
        """
        problems: list[str] = []
        test_ids: list[str] = []
        if cfg.layout == "patterns":
            if cfg.root is None:
                raise ConfigError("dataset.root: required for layout 'patterns' (or pass --data-root)")
            if not cfg.patterns:
                raise ConfigError("dataset.patterns: required for layout 'patterns'")
            subjects = discover_subjects(Path(cfg.root), cfg.patterns, cfg.modalities, problems)
        elif cfg.layout == "niftynet_csv":
            subjects = _subjects_from_csv(cfg, problems)
        elif cfg.layout == "niftynet_search":
            from highres3d.niftynet.matching import subjects_from_search

            subjects = subjects_from_search(cfg, problems)
        else:
            if cfg.root is None:
                raise ConfigError("dataset.root: required for layout 'nnunet' (the Dataset<ID>_<Name> folder)")
            subjects, test_ids = _subjects_from_nnunet(Path(cfg.root), cfg.modalities, problems)
        if not subjects:
            where = cfg.root if cfg.root is not None else ", ".join(map(str, cfg.csv_files.values()))
            raise DataError(
                f"{where}: no subjects found for modalities {', '.join(cfg.modalities)}"
                + (f" with patterns {cfg.patterns}" if cfg.layout == "patterns" else "")
                + ". To try highres3d without real data, create a synthetic stand-in with "
                "'highres3d synth brats DIR' or 'highres3d synth ixi DIR' and point dataset.root (or --data-root) at it."
            )
        warnings: list[str] = []
        splits = cls._assign_splits(subjects, cfg.split, test_ids, problems, warnings)
        if require_labels:
            for subject in subjects:
                split = splits.get(subject.id)
                if subject.label is None and split in ("training", "validation"):
                    problems.append(f"{subject.id}: no label file (needed for {split})")
                    del splits[subject.id]
        if cfg.missing == "skip":
            warnings.extend(f"skipped {p}" for p in problems)
            problems = []
        dataset = cls(subjects, splits, [], problems, cfg.name, warnings)
        dataset.subsets = dataset._make_subsets(cfg.split)
        return dataset

    @staticmethod
    def _assign_splits(
        subjects: list[Subject], cfg: SplitConfig, test_ids: list[str], problems: list[str], warnings: list[str]
    ) -> dict[str, str]:
        ids = [s.id for s in subjects]
        if cfg.file is not None:
            listed = read_split_csv(Path(cfg.file))
            unknown = sorted(set(listed) - set(ids))
            if unknown:
                problems.append(
                    f"{cfg.file}: {len(unknown)} subject(s) listed but not found in the dataset: {', '.join(unknown[:5])}"
                    + (" …" if len(unknown) > 5 else "")
                )
            unlisted = [sid for sid in ids if sid not in listed]
            if unlisted:
                warnings.append(
                    f"{cfg.file}: {len(unlisted)} subject(s) of the dataset are not in the split file and are not used: "
                    + ", ".join(unlisted[:5]) + (" …" if len(unlisted) > 5 else "")
                )
            return {sid: listed[sid] for sid in ids if sid in listed}
        labelled = [s.id for s in subjects if s.id not in test_ids]
        splits = random_split(labelled, cfg.validation_fraction, cfg.inference_fraction, cfg.seed) if labelled else {}
        splits.update({sid: "inference" for sid in test_ids})
        return splits

    def _make_subsets(self, cfg: SplitConfig) -> list[list[str]]:
        training = self.ids("training")
        if cfg.subset_files:
            subsets = [_read_subset_file(Path(p)) for p in cfg.subset_files]
            for path, subset in zip(cfg.subset_files, subsets):
                outside = [sid for sid in subset if self.splits.get(sid) != "training"]
                if outside:
                    raise DataError(f"{path}: subjects not in the training split: {', '.join(outside[:5])}")
            for (small_path, small), (big_path, big) in zip(
                zip(cfg.subset_files, subsets), zip(cfg.subset_files[1:], subsets[1:])
            ):
                if not set(small) <= set(big):
                    raise DataError(f"{small_path}: subset is not contained in the next subset {big_path}")
            return subsets
        if cfg.subset_sizes:
            if cfg.subset_sizes[-1] > len(training):
                raise ConfigError(
                    f"dataset.split.subset_sizes: the largest subset ({cfg.subset_sizes[-1]}) exceeds "
                    f"the {len(training)} training subjects"
                )
            order = [training[i] for i in np.random.default_rng(cfg.seed + 1).permutation(len(training))]
            return [sorted(order[:size]) for size in cfg.subset_sizes]
        return []

    # ---- queries

    def ids(self, split: str) -> list[str]:
        if split not in SPLITS and split != "all":
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS + ('all',)}")
        return [s.id for s in self.subjects if split == "all" or self.splits.get(s.id) == split]

    def split(self, name: str, subset: Optional[int] = None) -> list[Subject]:
        """Subjects of a split; ``subset=k`` (1-based) restricts training to S_k."""
        ids = set(self.ids(name))
        if subset is not None:
            if name != "training":
                raise ValueError("subsets apply to the training split only")
            if not 1 <= subset <= len(self.subsets):
                raise ConfigError(f"training subset S{subset} is not defined (there are {len(self.subsets)})")
            ids &= set(self.subsets[subset - 1])
        return [s for s in self.subjects if s.id in ids]

    def subject(self, sid: str) -> Subject:
        for s in self.subjects:
            if s.id == sid:
                return s
        raise KeyError(sid)

    def counts(self) -> dict[str, int]:
        return {name: len(self.ids(name)) for name in SPLITS}
