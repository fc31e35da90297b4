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
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
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
