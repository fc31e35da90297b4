"""NiftyNet 0.5's file matching (``path_to_search`` / ``filename_contains`` ...) as a dataset layout.

Contract: for each input section, the files found and the subject ids they get
are those NiftyNet 0.5 would have produced (``KeywordsMatching`` and
``match_and_write_filenames_to_csv``), so its split files keep working:

1. Every folder of ``path_to_search`` is listed (not recursively, sorted by
   name); a file is a candidate when its *file name* contains every string of
   ``filename_contains`` and none of ``filename_not_contains``.
2. The name without extension (``.nii.gz`` and ``.tar.gz`` count as one
   extension) is cut at every occurrence of the strings of
   ``filename_removefromid`` (default: ``filename_contains``); non-word
   characters (anything but letters, digits and ``_``) are deleted from each
   piece and empty pieces dropped. The pieces, plus their concatenation when
   there are several, are the file's candidate ids, in order.
3. A candidate id that occurs more than once among all candidates of the
   section is struck out everywhere; the file's id is its first remaining
   candidate, and a file with none left is not used.
4. Sections are joined on the subject id.

Where NiftyNet silently dropped or renamed files in step 3, this module reports
each such file as a problem naming the files it collided with, so ``data
check`` lists them. Two differences are deliberate: NiftyNet held the
substrings in a Python ``set`` (so the order of alternatives in the split was
arbitrary); here longer substrings are tried first, which is what a user
expects when one substring contains another. Sub-folders found in a search
folder are ignored (NiftyNet would have matched them as files and failed later).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from highres3d.errors import ConfigError, DataError

_DOUBLE_EXTENSIONS = (".nii.gz", ".tar.gz")


def strip_extension(filename: str) -> str:
    """The file name without its extension (``.nii.gz`` counts as one), as NiftyNet's ``split_filename``."""
    lower = filename.lower()
    for ext in _DOUBLE_EXTENSIONS:
        if lower.endswith(ext):
            return filename[: -len(ext)]
    dot = filename.rfind(".")
    # A leading dot is a hidden file's name, not an extension (as os.path.splitext).
    return filename[:dot] if dot > 0 else filename


def candidate_ids(filename: str, remove: Sequence[str]) -> list[str]:
    """The subject ids a file name may stand for, most likely first (step 2 of the module contract).

    Args:
        filename: the file name (no folder).
        remove: substrings cut out of the name.

    Returns:
        The cleaned pieces left to right, then their concatenation if there are several.
    """
    name = strip_extension(filename)
    if remove:
        # Longest first: with 'T1' and 'T1c' both listed, 'T1c' must be cut whole.
        delimiters = sorted(set(remove), key=lambda s: (-len(s), s))
        pieces = re.split("|".join(f"(?:{re.escape(d)})" for d in delimiters), name)
    else:
        pieces = [name]
    pieces = [p for p in (re.sub(r"\W+", "", piece) for piece in pieces) if p]
    if len(pieces) > 1:
        pieces.append("".join(pieces))
    return pieces


@dataclass
class SectionMatch:
    """What one input section matched.

    Attributes:
        files: subject id -> file.
        problems: files not used or renamed because their id was ambiguous,
            and folders that do not exist.
    """

    files: dict[str, Path] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _folders(section_name: str, paths: Sequence[str], root: Optional[Path]) -> list[Path]:
    folders, problems = [], []
    for text in paths:
        path = Path(text).expanduser()
        if not path.is_absolute():
            if root is None:
                problems.append(f"dataset.search.{section_name}.path_to_search: {text!r} is relative but dataset.root is not set")
                continue
            path = root / path
        if not path.is_dir():
            problems.append(f"dataset.search.{section_name}.path_to_search: folder {path} not found")
            continue
        folders.append(path.resolve())
    if problems:
        raise DataError("; ".join(problems) + " (fix the path, or set dataset.root to the folder relative paths start from)")
    # NiftyNet kept each folder once.
    return list(dict.fromkeys(folders))


def match_section(
    name: str,
    paths: Sequence[str],
    contains: Sequence[str] = (),
    not_contains: Sequence[str] = (),
    remove_from_id: Sequence[str] = (),
    root: Optional[Path] = None,
) -> SectionMatch:
    """Match one NiftyNet input section (steps 1 to 3 of the module contract).

    Args:
        name: the section (modality) name, used in messages.
        paths: ``path_to_search`` folders; relative ones are relative to ``root``.
        contains: ``filename_contains``.
        not_contains: ``filename_not_contains``.
        remove_from_id: ``filename_removefromid`` (empty: ``contains`` is removed).
        root: folder that relative paths start from.

    Raises:
        DataError: when a folder does not exist.
    """
    result = SectionMatch()
    candidates: list[tuple[Path, list[str]]] = []
    for folder in _folders(name, paths, root):
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            fname = entry.name
            if not all(c in fname for c in contains) or any(c in fname for c in not_contains):
                continue
            if not entry.is_file():
                continue
            candidates.append((entry, candidate_ids(fname, remove_from_id or contains)))
    counts = Counter(c for _, ids in candidates for c in ids)
    owners: dict[str, list[Path]] = {}
    for path, ids in candidates:
        for c in ids:
            owners.setdefault(c, []).append(path)
    for path, ids in candidates:
        kept = [c for c in ids if counts[c] == 1]
        if not ids:
            result.problems.append(
                f"[{name}] {path}: nothing is left of the file name once {list(remove_from_id or contains)} is removed; not used"
            )
            continue
        preferred = ids[0]
        clash = ", ".join(str(p) for p in owners[preferred] if p != path)
        if not kept:
            result.problems.append(
                f"[{name}] {path}: ambiguous subject id {preferred!r} (also from {clash}); NiftyNet skipped this file. "
                "Add a filename_not_contains entry or move the extra file away"
            )
            continue
        if kept[0] != preferred:
            result.problems.append(
                f"[{name}] {path}: ambiguous subject id {preferred!r} (also from {clash}); NiftyNet used {kept[0]!r} instead"
            )
        result.files[kept[0]] = path
    return result


def match_sections(
    sections: Mapping[str, object],
    modalities: Sequence[str],
    root: Optional[Path] = None,
) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """Match every section and join them on the subject id (step 4).

    Args:
        sections: section name -> an object with ``path_to_search``,
            ``filename_contains``, ``filename_not_contains`` and
            ``filename_removefromid`` (a :class:`highres3d.config.SearchSection`).
        modalities: the image sections, in channel order.
        root: folder relative ``path_to_search`` entries start from.

    Returns:
        ``(tables, problems)``: section -> {subject id: file}, and every problem found.
    """
    missing = [m for m in modalities if m not in sections]
    if missing:
        raise ConfigError(f"dataset.search: no input section for {', '.join(missing)}")
    tables: dict[str, dict[str, Path]] = {}
    problems: list[str] = []
    for name, section in sections.items():
        match = match_section(
            name,
            tuple(section.path_to_search),
            tuple(section.filename_contains),
            tuple(section.filename_not_contains),
            tuple(section.filename_removefromid),
            root,
        )
        if not match.files:
            problems.append(
                f"[{name}] no file matched in {list(section.path_to_search)} with filename_contains="
                f"{list(section.filename_contains)} and filename_not_contains={list(section.filename_not_contains)}"
            )
        tables[name] = match.files
        problems.extend(match.problems)
    return tables, problems


def subjects_from_search(cfg, problems: list[str]) -> list:
    """The subjects of a ``niftynet_search`` dataset section, in id order.

    Args:
        cfg: a :class:`highres3d.config.DatasetConfig` with ``layout: niftynet_search``.
        problems: receives every matching problem and each subject that lacks a modality.

    Returns:
        :class:`highres3d.data.dataset.Subject` objects with a file for every modality.
    """
    # Imported here: dataset.py imports this module lazily, and a top-level import would be circular.
    from highres3d.data.dataset import Subject

    root = Path(cfg.root) if cfg.root is not None else None
    tables, found = match_sections(cfg.search, cfg.modalities, root)
    problems.extend(found)
    ids = sorted(set().union(*[set(tables[m]) for m in cfg.modalities]))
    subjects = []
    for sid in ids:
        absent = [m for m in cfg.modalities if sid not in tables[m]]
        if absent:
            problems.append(f"{sid}: no file in section(s) {', '.join(absent)} (files: "
                            + ", ".join(str(tables[m][sid]) for m in cfg.modalities if sid in tables[m]) + ")")
            continue
        subjects.append(Subject(sid, {m: tables[m][sid] for m in cfg.modalities},
                                tables.get("label", {}).get(sid), tables.get("mask", {}).get(sid)))
    return subjects


def subjects_in_folder(folder: Path, cfg, problems: list[str]) -> list:
    """The subjects of a new folder found with a dataset's NiftyNet matching rules (for ``infer``).

    Each modality's ``filename_contains`` / ``filename_not_contains`` /
    ``filename_removefromid`` apply to ``folder`` instead of ``path_to_search``;
    labels are not looked for.
    """
    from highres3d.data.dataset import Subject

    tables = {}
    for m in cfg.modalities:
        section = cfg.search[m]
        match = match_section(m, [str(folder)], section.filename_contains, section.filename_not_contains,
                              section.filename_removefromid)
        problems.extend(match.problems)
        tables[m] = match.files
    subjects = []
    for sid in sorted(set().union(*[set(t) for t in tables.values()])):
        absent = [m for m in cfg.modalities if sid not in tables[m]]
        if absent:
            problems.append(f"{sid}: no {', '.join(absent)} file in {folder}")
            continue
        subjects.append(Subject(sid, {m: tables[m][sid] for m in cfg.modalities}))
    return subjects
