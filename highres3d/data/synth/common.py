"""File writing shared by the IXI-like and BraTS-like generators."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np

from highres3d.utils import OutputExistsError, atomic_path

GENERATOR_VERSION = "1"
MANIFEST = "synth_manifest.json"


def subject_rng(kind: str, seed: int, index: int) -> np.random.Generator:
    """Independent stream per (dataset kind, seed, subject index): adding subjects never changes earlier ones."""
    digest = hashlib.sha256(f"highres3d-synth/{kind}/{GENERATOR_VERSION}".encode()).digest()
    return np.random.default_rng([int.from_bytes(digest[:8], "little"), int(seed), int(index)])


def to_int16(img: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.rint(img * scale), 0, np.iinfo(np.int16).max).astype(np.int16)


def nifti(data: np.ndarray, affine: np.ndarray, description: str) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = description[:79].encode()
    return img


def check_free(paths, overwrite: bool) -> None:
    """Fail before any work if an output exists, so a run never stops half-way for that reason."""
    if overwrite:
        return
    for path in paths:
        if Path(path).exists():
            raise OutputExistsError(f"{path}: already exists; pass overwrite=True (CLI: --overwrite) to replace it")


def write_nifti(img: nib.Nifti1Image, path, overwrite: bool) -> None:
    with atomic_path(path, overwrite=overwrite) as tmp:
        nib.save(img, str(tmp))


_SAME_RUN_KEYS = ("dataset", "generator_version", "seed", "size")


def _old_manifest(out_dir) -> dict | None:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def check_manifest(out_dir, payload: dict, overwrite: bool) -> None:
    """A manifest from another kind of run (other dataset, seed or size) is only replaced with ``overwrite``."""
    old = _old_manifest(out_dir)
    if old is None or overwrite:
        return
    if any(old.get(k) != payload.get(k) for k in _SAME_RUN_KEYS):
        raise OutputExistsError(
            f"{Path(out_dir) / MANIFEST}: describes another synthetic dataset "
            f"({', '.join(f'{k}={old.get(k)!r}' for k in _SAME_RUN_KEYS)}); "
            "choose another folder or pass overwrite=True (CLI: --overwrite)"
        )


def write_manifest(out_dir, payload: dict) -> Path:
    """Summary of the folder's synthetic dataset; subjects from earlier runs of the same kind are kept."""
    path = Path(out_dir) / MANIFEST
    old = _old_manifest(out_dir)
    if old and all(old.get(k) == payload.get(k) for k in _SAME_RUN_KEYS):
        merged = [s for s in old.get("subjects", []) if s not in payload["subjects"]]
        payload = dict(payload, subjects=sorted(merged + payload["subjects"]))
    with atomic_path(path, overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=2) + "\n")
    return path


def manifest(kind: str, ids, size: str, seed: int, sizes: dict, axcodes: str, layout: str, patterns: dict,
             modalities, label_names: dict) -> dict:
    """The ``synth_manifest.json`` payload describing one generator run."""
    shape, zooms, _ = sizes[size]
    return {
        "dataset": kind,
        "generator": f"highres3d.data.synth.{kind}",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "size": size,
        "shape": list(shape),
        "voxel_size_mm": list(zooms),
        "orientation": axcodes,
        "layout": layout,
        "patterns": patterns,
        "modalities": list(modalities),
        "label_values": {str(k): v for k, v in label_names.items()},
        "subjects": list(ids),
    }


def write_dataset(
    out_dir,
    ids: list[str],
    payload: dict,
    files_of: Callable[[str], dict],
    make: Callable[[int, str], tuple[dict, np.ndarray]],
    description: str,
    overwrite: bool,
    progress: Optional[Callable] = None,
) -> list[str]:
    """Write every subject's volumes, then the manifest.

    ``files_of(subject)`` names the file of each volume; ``make(index, subject)``
    returns ``({name: array}, affine)``.  Every output is checked before
    anything is written, so a run never stops half-way on an existing file.
    """
    out_dir = Path(out_dir)
    check_free([p for s in ids for p in files_of(s).values()], overwrite)
    check_manifest(out_dir, payload, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, subject in enumerate(ids):
        start = time.perf_counter()
        volumes, affine = make(i, subject)
        files = files_of(subject)
        for name, data in volumes.items():
            write_nifti(nifti(data, affine, f"highres3d synthetic {description} {subject} {name}"), files[name], overwrite)
        elapsed = time.perf_counter() - start
        logging.getLogger(__name__).debug("%s written in %.1f s", subject, elapsed)
        if progress is not None:
            progress(i, len(ids), subject, elapsed)
    write_manifest(out_dir, payload)
    return ids

