"""Quick-look PNGs: three orthogonal slices of a volume with an optional label overlay.

Volumes are reoriented to RAS (``nibabel.as_closest_canonical``) and resampled
to square pixels, so every file looks the same whatever its storage order or
voxel size.  Panels, left to right: sagittal (anterior to the right), coronal
and axial (both with the subject's right on the image right, i.e.
neurological convention; superior / anterior up).  No matplotlib: the image
is composed with NumPy, titled and plotted with Pillow, and written with imageio.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from highres3d.errors import DataError
from highres3d.utils import atomic_path

# Colours of label values.  Two fixed palettes: tumour-style maps (values within
# 0..4, e.g. BraTS) get the customary 1 red / 2 green / 4 yellow; maps with
# FreeSurfer aseg values get FreeSurferColorLUT colours, except the hippocampi
# (17/53), drawn magenta/cyan so they stand out.  Any other value takes one of
# 20 distinct colours by value, so a value is always drawn the same way.
_DISTINCT = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
        (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
        (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
    ],
    dtype=np.uint8,
)
TUMOUR_COLOURS = {1: (230, 25, 75), 2: (60, 180, 75), 3: (0, 130, 200), 4: (255, 225, 25)}
ASEG_COLOURS = {
    2: (245, 245, 245), 3: (205, 62, 78), 4: (120, 18, 134), 5: (196, 58, 250), 7: (220, 248, 164),
    8: (230, 148, 34), 10: (0, 118, 14), 11: (122, 186, 220), 12: (236, 13, 176), 13: (12, 48, 255),
    14: (204, 182, 142), 15: (42, 204, 164), 16: (119, 159, 176), 17: (255, 0, 255), 18: (103, 255, 255),
    24: (60, 60, 60), 26: (255, 165, 0), 28: (165, 42, 42), 31: (0, 200, 200),
    41: (245, 245, 245), 42: (205, 62, 78), 43: (120, 18, 134), 44: (196, 58, 250), 46: (220, 248, 164),
    47: (230, 148, 34), 49: (0, 118, 14), 50: (122, 186, 220), 51: (236, 13, 176), 52: (13, 48, 255),
    53: (0, 255, 255), 54: (103, 255, 255), 58: (255, 165, 0), 60: (165, 42, 42), 63: (0, 200, 200),
}


def palette_for(values) -> dict[int, tuple[int, int, int]]:
    """The palette chosen for a label map holding ``values``: aseg colours if any value exceeds 4."""
    values = [int(v) for v in values]
    fixed = ASEG_COLOURS if any(v > 4 for v in values) else TUMOUR_COLOURS
    return {v: fixed.get(v, tuple(int(c) for c in _DISTINCT[v % len(_DISTINCT)])) for v in values if v != 0}


PANEL_MIN_PIXELS = 256


def _load_canonical(path):
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        img = nib.load(str(path))
        if len(img.shape) == 4 and img.shape[3] == 1:
            img = img.slicer[..., 0]
        if len(img.shape) != 3:
            raise DataError(f"{path}: expected a 3D volume, got shape {img.shape}")
        canonical = nib.as_closest_canonical(img)
        data = np.asanyarray(canonical.dataobj)
    except DataError:
        raise
    except Exception as err:  # nibabel raises many types for truncated or foreign files
        raise DataError(f"{path}: cannot read as NIfTI ({err})") from err
    return data, canonical.affine, img.affine


def _window(data: np.ndarray) -> np.ndarray:
    """Intensities scaled to [0, 1] between robust percentiles of the non-background voxels."""
    data = np.nan_to_num(data.astype(np.float32))
    lo = float(np.percentile(data, 0.5))
    # The upper end ignores the background, which fills most of a head volume.
    fg = data[data > lo]
    hi = float(np.percentile(fg, 99.5)) if fg.size else lo
    if hi <= lo:
        hi = float(data.max()) if data.max() > lo else lo + 1.0
    return np.clip((data - lo) / (hi - lo), 0, 1)


def _square_pixels(plane: np.ndarray, spacing_h: float, spacing_v: float, pixel: float, order: int):
    """Resample a 2-D plane (rows = horizontal axis, cols = vertical axis) to ``pixel`` mm pixels."""
    from scipy import ndimage

    zoom = (spacing_h / pixel, spacing_v / pixel)
    if np.allclose(zoom, 1.0):
        return plane
    out_shape = tuple(max(1, int(round(n * z))) for n, z in zip(plane.shape, zoom))
    # Sample at pixel centres so label boundaries do not shift by half a voxel.
    coords = [
        (np.arange(m) + 0.5) * (n / m) - 0.5 for n, m in zip(plane.shape, out_shape)
    ]
    grid = np.meshgrid(*coords, indexing="ij")
    return ndimage.map_coordinates(plane, grid, order=order, mode="nearest")


def render_slices(
    image_path,
    label_path=None,
    slice_index=None,
    alpha: float = 0.45,
    centre=None,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Compose the three orthogonal slices as an RGB uint8 array.

    ``slice_index`` is a voxel (i, j, k) of the image *file* (its storage order);
    by default the label's centre of mass when a label is given and not empty,
    else the volume centre.  ``centre`` gives the canonical (RAS) voxel
    directly, as returned by an earlier call, so several label maps are cut
    through the same point.  Returns the picture and the canonical voxel it
    cuts through.
    """
    data, affine, file_affine = _load_canonical(image_path)
    label = None
    if label_path is not None:
        label, label_affine, _ = _load_canonical(label_path)
        if label.shape != data.shape:
            raise DataError(
                f"{label_path}: label shape {label.shape} does not match image {image_path} shape {data.shape}"
            )
        if not np.allclose(label_affine, affine, atol=1e-3):
            raise DataError(f"{label_path}: label affine does not match image {image_path}; they are on different grids")
        label = np.rint(np.nan_to_num(label)).astype(np.int64)
        palette = palette_for(np.unique(label))

    shape = np.array(data.shape)
    if centre is not None:
        centre = np.asarray(centre, dtype=int)
    elif slice_index is not None:
        world = file_affine @ np.append(np.asarray(slice_index, dtype=float), 1.0)
        centre = np.rint(np.linalg.solve(affine, world)[:3]).astype(int)
        if np.any(centre < 0) or np.any(centre >= shape):
            raise DataError(f"{image_path}: slice {tuple(slice_index)} is outside the volume")
    elif label is not None and np.any(label != 0):
        centre = np.rint(np.argwhere(label != 0).mean(axis=0)).astype(int)
    else:
        centre = shape // 2

    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    pixel = float(spacing.min())
    extent_mm = shape * spacing
    # Small volumes (64³ test data) are enlarged so the panels stay readable.
    pixel = min(pixel, float(np.sort(extent_mm)[1]) / PANEL_MIN_PIXELS)
    grey = _window(data)

    panels = []
    i, j, k = centre
    for axes, cut in (((1, 2), (i, slice(None), slice(None))),
                      ((0, 2), (slice(None), j, slice(None))),
                      ((0, 1), (slice(None), slice(None), k))):
        h, v = axes
        g = _square_pixels(grey[cut], spacing[h], spacing[v], pixel, order=1)
        rgb = np.repeat(g[..., None], 3, axis=-1)
        if label is not None:
            lab = _square_pixels(label[cut], spacing[h], spacing[v], pixel, order=0)
            colours = np.zeros(lab.shape + (3,), dtype=np.float32)
            for value in np.unique(lab):
                if value != 0:
                    colours[lab == value] = np.asarray(palette[int(value)], dtype=np.float32) / 255.0
            drawn = (lab != 0)[..., None]
            rgb = np.where(drawn, (1 - alpha) * rgb + alpha * colours, rgb)
        # Array rows run along the horizontal RAS axis; the picture wants rows
        # top to bottom = superior (or anterior) first.
        panels.append(np.flip(np.transpose(rgb, (1, 0, 2)), axis=0))

    gap = 4
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = np.zeros((height, width, 3), dtype=np.float32)
    x = 0
    for p in panels:
        top = (height - p.shape[0]) // 2
        canvas[top : top + p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8), tuple(int(c) for c in centre)


def save_png(picture: np.ndarray, out_path, overwrite: bool = False) -> Path:
    """Write an RGB uint8 array as PNG, atomically; refuses to replace a file unless ``overwrite``."""
    import imageio.v3 as iio

    out_path = Path(out_path)
    with atomic_path(out_path, overwrite=overwrite) as tmp:
        iio.imwrite(tmp, picture, extension=".png")
    return out_path


def show(image_path, label_path=None, out_path=None, slice_index=None, overwrite: bool = False,
         alpha: float = 0.45) -> Path:
    """Render ``image_path`` (and ``label_path``) to a PNG; returns where it was written.

    The default output is the image's name with ``.png`` in place of ``.nii[.gz]``.
    """
    if out_path is None:
        name = os.path.basename(str(image_path))
        for ext in (".nii.gz", ".nii"):
            if name.endswith(ext):
                name = name[: -len(ext)]
                break
        out_path = Path(image_path).with_name(name + ".png")
    picture, _ = render_slices(image_path, label_path, slice_index=slice_index, alpha=alpha)
    return save_png(picture, out_path, overwrite=overwrite)


# --------------------------------------------------------------------------- comparisons and plots


def _titled(picture: np.ndarray, title: str, height: int = 16) -> np.ndarray:
    """``picture`` with a black band above it holding ``title`` (Pillow's built-in font)."""
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (picture.shape[1], height))
    ImageDraw.Draw(band).text((4, 2), title, fill=(255, 255, 255))
    return np.concatenate([np.asarray(band, dtype=np.uint8), picture], axis=0)


def compare_segmentations(image_path, rows, out_path, overwrite: bool = False, alpha: float = 0.45) -> Path:
    """One PNG with a row per label map (e.g. truth, scratch, fine-tuned), all cut through the same voxel.

    The cut is the centre of mass of the first label map (the truth), so the
    rows show the same slices through the structure.

    Args:
        image_path: the image drawn under every label map.
        rows: ``(title, label_path)`` pairs, top to bottom.
        out_path: the PNG to write.
        overwrite: replace an existing file.
        alpha: opacity of the label colours.
    """
    rows = list(rows)
    if not rows:
        raise DataError(f"{out_path}: nothing to compare")
    pictures, centre = [], None
    for title, label_path in rows:
        picture, centre = render_slices(image_path, label_path, alpha=alpha, centre=centre)
        pictures.append(_titled(picture, title))
    gap = np.zeros((4, pictures[0].shape[1], 3), dtype=np.uint8)
    stacked = np.concatenate([part for p in pictures for part in (p, gap)][:-1], axis=0)
    return save_png(stacked, out_path, overwrite=overwrite)


def dot_plot(values, out_path, title: str = "", overwrite: bool = False, width: int = 480, row_height: int = 28) -> Path:
    """A dot plot of scores in [0, 1]: one row per method, one dot per value, the mean as a bar.

    Args:
        values: ``{method: [score, ...]}`` in display order (NaN values are skipped).
        out_path: the PNG to write.
        title: printed above the plot.
        overwrite: replace an existing file.
        width: picture width in pixels.
        row_height: pixels per method.
    """
    from PIL import Image, ImageDraw

    names = list(values)
    # Pillow's built-in font is 6 pixels per character: the names decide the left margin.
    left, right, top = max(110, 12 + 6 * max((len(str(n)) for n in names), default=0)), 20, 24
    width = max(width, left + right + 200)
    height = top + row_height * len(names) + 30
    picture = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    draw.text((4, 4), title, fill=(0, 0, 0))
    span = width - left - right

    def x_of(v: float) -> int:
        return left + int(round(min(max(v, 0.0), 1.0) * span))

    axis_y = top + row_height * len(names) + 4
    draw.line([(left, axis_y), (left + span, axis_y)], fill=(0, 0, 0))
    for tick in np.linspace(0, 1, 6):
        x = x_of(tick)
        draw.line([(x, top), (x, axis_y + 3)], fill=(220, 220, 220) if 0 < tick < 1 else (0, 0, 0))
        draw.text((x - 8, axis_y + 6), f"{tick:.1f}", fill=(0, 0, 0))
    for row, name in enumerate(names):
        y = top + row_height * row + row_height // 2
        draw.text((4, y - 6), str(name), fill=(0, 0, 0))
        scores = [float(v) for v in values[name] if not np.isnan(float(v))]
        for v in scores:
            draw.ellipse([x_of(v) - 4, y - 4, x_of(v) + 4, y + 4], outline=(0, 90, 180), width=2)
        if scores:
            mean = x_of(float(np.mean(scores)))
            draw.line([(mean, y - 9), (mean, y + 9)], fill=(200, 30, 30), width=3)
    return save_png(np.asarray(picture, dtype=np.uint8), out_path, overwrite=overwrite)
