"""NIfTI reading into a working space, and writing back onto the original grid.

The working space is the file's voxel grid reoriented to fixed axis codes
(default RAS, a pure permutation/flip: no interpolation) and optionally
resampled to a fixed voxel spacing.  :class:`SpatialInfo` keeps everything
needed to map a working-space array back onto the exact original grid, so a
prediction can be written with the input's header, shape and affine.

Resampling keeps the field of view: voxel ``i`` of the new grid is centred at
``(i + 0.5) * new_spacing - 0.5 * old_spacing`` along each axis of the old
grid, so the first and last voxel edges coincide (like ``scipy.ndimage.zoom``
with ``grid_mode=True``).  Oblique affines stay oblique: reorientation picks
the closest axes and resampling is done along the file's own axes.
"""
from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage

from highres3d.errors import DataError
from highres3d.utils import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing in mm along each array axis: the lengths of the affine's columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


@dataclass(frozen=True, eq=False)
class Grid:
    """A file's voxel grid: its shape and affine, with the file it came from (for messages)."""

    path: str
    shape: tuple[int, ...]
    affine: np.ndarray

    @classmethod
    def of(cls, path: str | Path, data: np.ndarray, img: nib.Nifti1Image) -> Grid:
        """The grid of an array read by :func:`read_nifti`."""
        return cls(str(path), tuple(int(n) for n in data.shape[:3]), np.asarray(img.affine))


def check_same_grid(grid: Grid, reference: Grid, tolerance: float = 1e-3, hint: str = "") -> None:
    """Raise :class:`DataError` unless two files share one voxel grid.

    The shapes must be equal and the affines agree within ``tolerance`` mm.
    This is the only place the rule lives: preprocessing, ``data check`` and
    evaluation all call it.

    Args:
        grid: the file being checked.
        reference: the file it must agree with.
        tolerance: largest allowed difference of any affine entry, in mm.
        hint: appended to the message (how to fix it in the caller's context).
    """
    hint = f"; {hint}" if hint else ""
    if tuple(grid.shape) != tuple(reference.shape):
        raise DataError(f"{grid.path}: shape {tuple(grid.shape)} differs from {tuple(reference.shape)} of {reference.path}{hint}")
    diff = float(np.abs(np.asarray(grid.affine) - np.asarray(reference.affine)).max())
    if diff > tolerance:
        raise DataError(
            f"{grid.path}: affine differs from that of {reference.path} by {diff:.4g} mm "
            f"(tolerance preprocessing.affine_tolerance = {tolerance:g}){hint}"
        )


@dataclass(frozen=True, eq=False)
class SpatialInfo:
    """What maps a working-space array back onto the original file's grid."""

    path: str
    original_shape: tuple[int, int, int]
    original_affine: np.ndarray
    header: nib.Nifti1Header
    orientation: str
    working_shape: tuple[int, int, int]
    working_affine: np.ndarray
    #: (3, 2) nibabel orientation transform from the file's axes to the working axes
    transform: np.ndarray
    #: working spacing / reoriented original spacing, per working axis (1.0 = not resampled)
    zoom: tuple[float, float, float]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Working-space voxel spacing in mm."""
        return spacing_of(self.working_affine)

    @property
    def original_spacing(self) -> tuple[float, float, float]:
        return spacing_of(self.original_affine)

    @property
    def original_grid(self) -> Grid:
        """The grid of the file as it is on disk."""
        return Grid(self.path, tuple(self.original_shape), self.original_affine)

    @property
    def original_axcodes(self) -> str:
        return "".join(nib.aff2axcodes(self.original_affine))

    @property
    def reoriented_shape(self) -> tuple[int, int, int]:
        """The original shape with its axes in working order."""
        return tuple(int(self.original_shape[int(axis)]) for axis in _inverse_axes(self.transform))

    @property
    def resampled(self) -> bool:
        return not np.allclose(self.zoom, 1.0)


def _inverse_axes(transform: np.ndarray) -> list[int]:
    """For each working axis, the original axis it came from."""
    out = [0, 0, 0]
    for original_axis, (working_axis, _flip) in enumerate(transform):
        out[int(working_axis)] = original_axis
    return out


def _describe_read_error(path: Path, err: Exception) -> str:
    if isinstance(err, (EOFError, zlib.error, gzip.BadGzipFile)) or "truncat" in str(err).lower() or "EOF" in str(err):
        return f"{path}: truncated or corrupt file ({err.__class__.__name__}: {err})"
    return f"{path}: cannot read as NIfTI ({err.__class__.__name__}: {err})"


def read_nifti(path: str | Path, allow_nonfinite: bool = False) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read a 3-D NIfTI file (a trailing singleton 4th/5th dimension is dropped).

    Returns the data array in file order (scaled by scl_slope/scl_inter when
    set) and the image (for its header and affine).  Raises :class:`DataError`
    naming the file for missing, truncated or corrupt files, multi-volume
    images, singular affines and (unless allowed) NaN/Inf voxels.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not any(path.name.endswith(s) for s in NIFTI_SUFFIXES):
        raise DataError(f"{path}: expected a .nii or .nii.gz file")
    try:
        img = nib.load(str(path))
        raw = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for bad files
        raise DataError(_describe_read_error(path, err)) from None
    if raw.ndim > 3:
        extra = raw.shape[3:]
        if any(n != 1 for n in extra):
            raise DataError(
                f"{path}: expected a 3-D volume, got shape {raw.shape} ({int(np.prod(extra))} volumes); "
                "split multi-volume files into one file per modality"
            )
        raw = raw.reshape(raw.shape[:3])
    if raw.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {raw.shape}")
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{path}: the affine is singular or not finite; the file's header is broken:\n{affine}")
    if not allow_nonfinite and raw.dtype.kind == "f" and not np.all(np.isfinite(raw)):
        n_bad = int(np.size(raw) - np.count_nonzero(np.isfinite(raw)))
        raise DataError(f"{path}: {n_bad} voxels are NaN or Inf")
    return raw, img


def orientation_transform(affine: np.ndarray, orientation: str) -> np.ndarray:
    """The nibabel orientation transform from a file's axes to ``orientation``."""
    return ornt_transform(io_orientation(affine), axcodes2ornt(tuple(orientation.upper())))


def working_spacing(affine: np.ndarray, orientation: str = "RAS") -> tuple[float, float, float]:
    """The voxel spacing (mm) of a file of ``affine`` along the working-space axes of ``orientation``."""
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(orientation_transform(affine, orientation)):
        spacing[int(target)] = spacing_of(affine)[axis]
    return tuple(spacing)


def median_spacing(paths: Sequence[str | Path], orientation: str = "RAS") -> tuple[float, float, float]:
    """The per-axis median working-space spacing of files, read from their headers only.

    Med3D resamples every dataset to its own median spacing; this is that spacing.

    Args:
        paths: NIfTI files (one per subject).
        orientation: the working-space axis codes.

    Raises:
        DataError: when ``paths`` is empty or a header cannot be read.
    """
    if not paths:
        raise DataError("median spacing: no files to read the spacing from")
    spacings = []
    for path in paths:
        try:
            affine = nib.load(str(path)).affine
        except Exception as err:  # nibabel raises many types for a foreign or corrupt file
            raise DataError(f"{path}: cannot read the NIfTI header ({err})") from None
        spacings.append(working_spacing(affine, orientation))
    return tuple(float(v) for v in np.median(np.asarray(spacings), axis=0))


def working_shape(
    shape: Sequence[int], affine: np.ndarray, orientation: str = "RAS", spacing: Optional[Sequence[float]] = None
) -> tuple[int, int, int]:
    """The shape a file of ``shape`` and ``affine`` has in the working space.

    Reorientation permutes the axes; resampling to ``spacing`` (mm) rounds the
    voxel count per axis (at least 1) and keeps the field of view.  :func:`load_image`
    and ``data check`` both use this, so a window-size check never disagrees
    with what training sees.
    """
    transform = orientation_transform(affine, orientation)
    reoriented = [0, 0, 0]
    for axis, (target, _flip) in enumerate(transform):
        reoriented[int(target)] = int(shape[axis])
    reoriented_spacing = working_spacing(affine, orientation)
    if spacing is None:
        return tuple(reoriented)
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(reoriented, reoriented_spacing, spacing))


def _resample_matrix(zoom: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Index map new -> old for a field-of-view-preserving resampling by ``zoom``."""
    scale = np.asarray(zoom, dtype=float)
    return scale, 0.5 * scale - 0.5


def _resample(data: np.ndarray, zoom: Sequence[float], out_shape: Sequence[int], order: int) -> np.ndarray:
    scale, offset = _resample_matrix(zoom)
    prefilter = order > 1
    src = data.astype(np.float32, copy=False) if order > 0 else data
    return ndimage.affine_transform(
        src, scale, offset=offset, output_shape=tuple(int(s) for s in out_shape), order=order, mode="nearest", prefilter=prefilter
    )


def load_image(
    path: str | Path,
    orientation: str = "RAS",
    spacing: Optional[Sequence[float]] = None,
    order: int = 3,
    dtype=np.float32,
    allow_nonfinite: bool = False,
) -> tuple[np.ndarray, SpatialInfo]:
    """Load a NIfTI file into the working space.

    Args:
        path: a .nii or .nii.gz file.
        orientation: working axis codes, e.g. ``"RAS"`` (NiftyNet's thesis configs used ``"ARS"``).
        spacing: working voxel spacing in mm, or None to keep the file's.
        order: spline order for resampling (3 for images, 0 for labels).
        dtype: output dtype (labels: an integer type keeps exact values).
        allow_nonfinite: accept NaN/Inf voxels instead of raising.

    Returns:
        ``(array, info)`` with the array in working space, shape ``info.working_shape``.
    """
    path = Path(path)
    raw, img = read_nifti(path, allow_nonfinite=allow_nonfinite)
    affine = img.affine.copy()
    transform = orientation_transform(affine, orientation)
    data = apply_orientation(raw, transform)
    reoriented_affine = affine @ inv_ornt_aff(transform, raw.shape)
    # The voxel count is rounded; the zoom then follows from it so the field of view is kept exactly.
    new_shape = working_shape(raw.shape, affine, orientation, spacing)
    zoom = np.array([n / m for n, m in zip(data.shape, new_shape)], dtype=float)
    if np.allclose(zoom, 1.0):
        zoom = np.ones(3)
        working_affine = reoriented_affine
    else:
        data = _resample(data, zoom, new_shape, order)
        scale, offset = _resample_matrix(zoom)
        index_map = np.eye(4)
        index_map[:3, :3] = np.diag(scale)
        index_map[:3, 3] = offset
        working_affine = reoriented_affine @ index_map
    if np.issubdtype(np.dtype(dtype), np.integer) and data.dtype.kind == "f":
        data = np.rint(data)
    data = np.ascontiguousarray(data, dtype=dtype)
    info = SpatialInfo(
        path=str(path),
        original_shape=tuple(int(s) for s in raw.shape),
        original_affine=affine,
        header=img.header.copy(),
        orientation=orientation.upper(),
        working_shape=tuple(int(s) for s in data.shape),
        working_affine=working_affine,
        transform=transform,
        zoom=tuple(float(z) for z in zoom),
    )
    return data, info


def to_original_grid(array: np.ndarray, info: SpatialInfo, order: int = 0) -> np.ndarray:
    """Map a working-space array (X, Y, Z) or (X, Y, Z, C) onto the original file's grid.

    Use ``order=0`` for labels and ``order=1`` for probabilities.
    """
    array = np.asarray(array)
    if tuple(array.shape[:3]) != tuple(info.working_shape):
        raise DataError(
            f"{info.path}: array of shape {array.shape[:3]} does not match the working shape {info.working_shape}"
        )
    if info.resampled:
        target = info.reoriented_shape
        inverse_zoom = [1.0 / z for z in info.zoom]
        if array.ndim == 4:
            channels = [_resample(array[..., c], inverse_zoom, target, order) for c in range(array.shape[3])]
            array = np.stack(channels, axis=-1)
        else:
            array = _resample(array, inverse_zoom, target, order)
    inverse = ornt_transform(axcodes2ornt(tuple(info.orientation)), io_orientation(info.original_affine))
    out = apply_orientation(array, inverse)
    assert tuple(out.shape[:3]) == tuple(info.original_shape), (out.shape, info.original_shape)
    return np.ascontiguousarray(out)


def _default_dtype(array: np.ndarray) -> np.dtype:
    if array.dtype.kind in "iub":
        top = int(array.max()) if array.size else 0
        low = int(array.min()) if array.size else 0
        if low >= 0 and top <= np.iinfo(np.uint8).max:
            return np.dtype(np.uint8)
        if low >= 0 and top <= np.iinfo(np.uint16).max:
            return np.dtype(np.uint16)
        return np.dtype(np.int32)
    return np.dtype(np.float32)


def save_like(
    array: np.ndarray,
    info: SpatialInfo,
    path: str | Path,
    dtype=None,
    overwrite: bool = False,
) -> Path:
    """Write an original-grid array with the original file's header and affine, atomically.

    ``array`` has shape ``info.original_shape`` (labels, images) or
    ``info.original_shape + (C,)`` (e.g. class probabilities).  Integer arrays
    default to uint8/uint16, floats to float32; intensity scaling (scl_slope) is
    reset so values are stored as given.  Refuses to replace an existing file
    unless ``overwrite``.
    """
    array = np.asarray(array)
    if tuple(array.shape[:3]) != tuple(info.original_shape):
        raise DataError(
            f"{path}: array of shape {array.shape} is not on the original grid {info.original_shape} of {info.path}"
        )
    dtype = np.dtype(dtype) if dtype is not None else _default_dtype(array)
    header = info.header.copy()
    header.set_data_dtype(dtype)
    data = array.astype(dtype, copy=False)
    img = nib.Nifti1Image(data, info.original_affine, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(info.header.get_qform(), code=int(info.header["qform_code"]))
    img.set_sform(info.header.get_sform(), code=int(info.header["sform_code"]))
    if data.ndim == 4:
        img.header.set_xyzt_units(*info.header.get_xyzt_units())
    path = Path(path)
    if not any(path.name.endswith(s) for s in NIFTI_SUFFIXES):
        raise DataError(f"{path}: output must end in .nii or .nii.gz")
    with atomic_path(path, overwrite=overwrite) as tmp:
        nib.save(img, str(tmp))
    return path


def save_working(
    array: np.ndarray,
    info: SpatialInfo,
    path: str | Path,
    order: int = 0,
    dtype=None,
    overwrite: bool = False,
) -> Path:
    """Map a working-space array back onto the original grid and write it (see :func:`save_like`)."""
    return save_like(to_original_grid(array, info, order=order), info, path, dtype=dtype, overwrite=overwrite)
