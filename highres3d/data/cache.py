"""Preprocessed volumes on disk (``training.cache: disk``): preprocessed once, memory-mapped by every run.

With ``training.cache: ram`` every run preprocesses every subject again and
holds them all in RAM; with ``lazy`` it preprocesses a subject again at every
visit.  ``disk`` preprocesses each subject once into ``training.cache_dir``
and memory-maps it: runs start in seconds, resumed runs and the runs of an
experiment grid share the work, and a dataset larger than the job's memory
trains at RAM speed from the page cache (nnU-Net's preprocessed folder is the
same idea).

An entry is a folder named by a hash of everything its arrays depend on: the
cache format, the ``preprocessing`` section, the histogram landmarks when they
are used, the modalities, the number of classes, and each input file's
resolved path, size and modification time.  A changed file or setting is a
new entry; a stale one is never read.  Entries are written to a temporary
folder and renamed, so a killed job leaves no half entry, and two jobs
preprocessing the same subject at once both end with the same whole entry.
The entry holds ``image.npy`` (channel-major ``(C, X, Y, Z)`` float32),
``label.npy`` (uint8) and ``info.json`` + ``header.bin`` (the
:class:`~highres3d.io.nifti.SpatialInfo`); no pickle, so a shared cache folder
cannot run code.  An entry that cannot be read is preprocessed again.

Nothing is deleted by training: a run touches each entry it reads, and
:func:`prune` (``highres3d data cache CONFIG --prune-unused DAYS``) removes
the entries no run has read for that long, and the temporary folders of jobs
killed while writing.  An entry is renamed before it is deleted, so a run
reading the folder meanwhile finds it whole or not at all (and makes it again);
a run that has already mapped it keeps reading it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np

from highres3d.data.preprocess import Volume
from highres3d.errors import Highres3dError
from highres3d.io.nifti import SpatialInfo

#: Changes whenever the layout of an entry changes, so older entries are never read.
FORMAT = 1
#: A temporary folder this old was left by a killed job (preprocessing one subject takes seconds to minutes).
PARTIAL_STALE_S = 24 * 3600
_DAY_S = 24 * 3600


def entry_key(subject, cfg) -> str:
    """The hash that names ``subject``'s entry under ``cfg``'s preprocessing."""
    pre = cfg.preprocessing
    settings = dataclasses.asdict(pre)
    landmarks = None
    if pre.histogram.enabled:
        landmarks = hashlib.sha256(Path(pre.histogram.ref_file).read_bytes()).hexdigest()
        # What the landmarks are counts, not where the run keeps them: runs with the same landmarks share entries.
        settings["histogram"].pop("ref_file")
    files = []
    for path in subject.files:
        resolved = Path(path).resolve()
        stat = resolved.stat()
        files.append([str(resolved), stat.st_size, stat.st_mtime_ns])
    what = {"format": FORMAT, "preprocessing": settings, "landmarks": landmarks,
            "modalities": list(cfg.dataset.modalities), "num_classes": cfg.network.num_classes, "files": files,
            "id": subject.id}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def subject_keys(cfg) -> dict[str, str]:
    """Entry key -> subject id of the training and validation subjects of ``cfg`` (one dataset)."""
    from highres3d.data.dataset import Dataset

    hist = cfg.preprocessing.histogram
    if hist.enabled and not (hist.ref_file and Path(hist.ref_file).is_file()):
        raise Highres3dError(f"preprocessing.histogram.ref_file {hist.ref_file}: not there yet, and the entries "
                             "depend on its landmarks (a run learns them into its folder: name that file)")
    dataset = Dataset.from_config(cfg.dataset)
    return {entry_key(subject, cfg): subject.id
            for split in ("training", "validation") for subject in dataset.split(split)}


class VolumeCache:
    """The preprocessed training and validation volumes under one folder (see the module docstring).

    Args:
        folder: the cache folder, created when missing; any number of runs and jobs may share it.
        echo: where a rebuilt (unreadable) entry is reported (None: nowhere).
    """

    def __init__(self, folder: str | os.PathLike, echo: Optional[Callable[[str], None]] = print) -> None:
        self.folder = Path(folder)
        self.echo = echo or (lambda text: None)
        self.hits = 0
        self.misses = 0

    def volume(self, subject, cfg, preprocess: Callable[[], Volume]) -> Volume:
        """``subject``'s volume memory-mapped from its entry, made with ``preprocess()`` first when missing."""
        entry = self.folder / entry_key(subject, cfg)
        if entry.is_dir():
            try:
                volume = _read(entry, subject.id)
            except (OSError, ValueError, KeyError) as err:
                self.echo(f"{entry}: unreadable cache entry of {subject.id} ({err}); preprocessing it again")
                shutil.rmtree(entry, ignore_errors=True)
            else:
                self.hits += 1
                _touch(entry)
                return volume
        self._write(entry, preprocess())
        self.misses += 1
        return _read(entry, subject.id)

    def _write(self, entry: Path, volume: Volume) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise Highres3dError(f"training.cache_dir {self.folder}: cannot create it ({err})") from None
        temporary = self.folder / f".{entry.name}.{uuid.uuid4().hex[:8]}.part"
        try:
            temporary.mkdir()
            # (X, Y, Z, C) with channel-major memory is a view of a contiguous (C, X, Y, Z) array: saved as that.
            np.save(temporary / "image.npy", np.ascontiguousarray(np.moveaxis(volume.image, 3, 0)))
            if volume.label is not None:
                np.save(temporary / "label.npy", np.ascontiguousarray(volume.label))
            _write_info(temporary, volume.info)
            # Read only by the listing (highres3d data cache): which subject a hash-named folder holds.
            (temporary / "subject.txt").write_text(str(volume.subject_id))
            try:
                temporary.rename(entry)
            except OSError:
                if not entry.is_dir():
                    raise
                # Another job wrote the same entry first: the same arrays, so theirs is kept.
        except OSError as err:
            raise Highres3dError(f"training.cache_dir {self.folder}: cannot write the entry of "
                                 f"{volume.subject_id} ({err}); free space or choose another folder") from None
        finally:
            shutil.rmtree(temporary, ignore_errors=True)

    def describe(self) -> str:
        """What the loading did, for the log."""
        return f"{self.hits} from the cache, {self.misses} preprocessed into it ({self.folder})"


def _touch(entry: Path) -> None:
    # Its modification time is its last use, which prune() goes by; a read-only shared cache keeps the old one.
    try:
        os.utime(entry)
    except OSError:
        pass


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One folder of a cache: an entry (``partial`` False) or a job's temporary folder."""

    path: Path
    nbytes: int
    #: When a run last read it (seconds since the epoch); for a temporary folder, when it was started.
    last_used: float
    partial: bool
    #: The subject it holds ("?" where not recorded).
    subject_id: str = "?"

    def idle_days(self, now: float) -> float:
        return max(0.0, now - self.last_used) / _DAY_S

    def idle(self, now: float) -> str:
        """How long no run has read it, for a message."""
        days = self.idle_days(now)
        return f"{days * 24:.0f} h" if days < 1 else f"{days:.0f} days"


def list_entries(folder: str | os.PathLike) -> list[CacheEntry]:
    """The entries and temporary folders under ``folder``, least recently used first (none if it is missing)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        partial = path.name.startswith(".") and path.name.endswith((".part", ".removing"))
        if not path.is_dir() or not (partial or _is_key(path.name)):
            continue  # not the cache's: left alone
        try:
            nbytes = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            last_used = path.stat().st_mtime
            subject = (path / "subject.txt").read_text().strip() if (path / "subject.txt").is_file() else "?"
        except OSError:
            continue  # removed meanwhile by another job
        found.append(CacheEntry(path, nbytes, last_used, partial, subject))
    return sorted(found, key=lambda e: (e.last_used, e.path.name))


def count_entries(n: int) -> str:
    """``n`` entries, for a message."""
    return f"{n} {'entry' if n == 1 else 'entries'}"


def _is_key(name: str) -> bool:
    return len(name) == 32 and all(c in "0123456789abcdef" for c in name)


def prune(folder: str | os.PathLike, unused_days: float, dry_run: bool = False,
          now: Optional[float] = None) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Remove the entries no run has read for ``unused_days`` days, and stale temporary folders.

    A temporary folder is stale after :data:`PARTIAL_STALE_S` (a job still
    writing it is younger).  Returns ``(removed, kept)``; with ``dry_run``,
    what would be removed, and nothing is.
    """
    if not (unused_days >= 0):
        raise Highres3dError(f"--prune-unused: expected a number of days >= 0, got {unused_days}")
    now = time.time() if now is None else now
    removed, kept = [], []
    for entry in list_entries(folder):
        if entry.partial:
            # A folder being removed is nobody's; one being written is, until it is a day old.
            stale = entry.path.name.endswith(".removing") or now - entry.last_used >= PARTIAL_STALE_S
        else:
            stale = entry.idle_days(now) >= unused_days
        if not stale:
            kept.append(entry)
            continue
        if not dry_run:
            try:
                _remove(entry.path)
            except OSError as err:
                raise Highres3dError(f"{entry.path}: cannot remove it ({err}); "
                                     f"{len(removed)} removed before it") from None
        removed.append(entry)
    return removed, kept


#: The age buckets of :func:`summary`: (upper bound in days, label).
_AGES = ((1, "within a day"), (7, "1-7 days ago"), (30, "7-30 days ago"), (float("inf"), "over 30 days ago"))


def summary(folder: str | os.PathLike, wanted: Optional[dict[str, str]] = None, now: Optional[float] = None) -> str:
    """What ``folder`` holds, for ``highres3d data cache``.

    ``wanted``: entry key -> subject id of the subjects a config trains and
    validates on; the summary says how many of them are cached.
    """
    from highres3d.memory import format_bytes
    from highres3d.progress import count_noun

    now = time.time() if now is None else now
    found = list_entries(folder)
    entries = [e for e in found if not e.partial]
    partial = [e for e in found if e.partial]
    lines = [f"{folder}: {count_entries(len(entries))}, "
             f"{format_bytes(sum(e.nbytes for e in entries))}"]
    if entries:
        counts, start = [], 0.0
        for limit, label in _AGES:
            n = sum(start <= e.idle_days(now) < limit for e in entries)
            if n:
                counts.append(f"{n} {label}")
            start = limit
        lines.append(f"  last read by a run: {', '.join(counts)} (least recently {entries[0].idle(now)} ago)")
    if wanted is not None:
        by_key = {e.path.name: e for e in entries}
        cached = [by_key[key] for key in wanted if key in by_key]
        missing = sorted(sid for key, sid in wanted.items() if key not in by_key)
        line = (f"  this config's subjects: {len(cached)} of {len(wanted)} cached "
                f"({format_bytes(sum(e.nbytes for e in cached))})")
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            line += f"; not yet preprocessed: {shown} (the next run with training.cache: disk makes them)"
        lines.append(line)
    if partial:
        lines.append(f"  {count_noun(len(partial), 'temporary folder')} of jobs writing or killed while writing "
                     f"({format_bytes(sum(e.nbytes for e in partial))}; --prune-unused removes those a day old)")
    return "\n".join(lines)


def _remove(path: Path) -> None:
    # Renamed first: a run looking for the entry meanwhile finds it whole or not at all.
    if not path.name.startswith("."):
        doomed = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.removing")
        path.rename(doomed)
        path = doomed
    shutil.rmtree(path)


def _write_info(folder: Path, info: SpatialInfo) -> None:
    fields = {}
    for field in dataclasses.fields(info):
        value = getattr(info, field.name)
        if field.name == "header":
            (folder / "header.bin").write_bytes(value.binaryblock)
            fields["header"] = type(value).__name__
        else:
            fields[field.name] = value.tolist() if isinstance(value, np.ndarray) else value
    # Shapes may hold NumPy integers, which json does not take as they are.
    (folder / "info.json").write_text(json.dumps(fields, default=lambda value: value.item()))


def _read_info(folder: Path) -> SpatialInfo:
    import nibabel as nib

    fields = json.loads((folder / "info.json").read_text())
    header_type = {"Nifti1Header": nib.Nifti1Header, "Nifti2Header": nib.Nifti2Header}[fields["header"]]
    fields["header"] = header_type.from_fileobj(io.BytesIO((folder / "header.bin").read_bytes()))
    for name in ("original_affine", "working_affine", "transform"):
        fields[name] = np.asarray(fields[name], dtype=np.float64)
    for name in ("original_shape", "working_shape", "zoom"):
        fields[name] = tuple(fields[name])
    return SpatialInfo(**fields)


def _read(entry: Path, subject_id: str) -> Volume:
    # Read-only maps: a window copies out of the page cache, and nothing may write into an entry.
    image = np.load(entry / "image.npy", mmap_mode="r")
    label: Optional[np.ndarray] = None
    if (entry / "label.npy").exists():
        label = np.load(entry / "label.npy", mmap_mode="r")
        if label.shape != image.shape[1:]:
            raise ValueError(f"label {label.shape} and image {image.shape[1:]} differ")
    info = _read_info(entry)
    if tuple(info.working_shape) != image.shape[1:]:
        raise ValueError(f"info says {info.working_shape}, the image is {image.shape[1:]}")
    return Volume(subject_id, np.moveaxis(image, 0, 3), label, info)


def on_disk(array: np.ndarray) -> bool:
    """Whether ``array`` (or the array it views) is memory-mapped from a file rather than held in RAM."""
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = array.base if isinstance(array.base, np.ndarray) else None
    return False
