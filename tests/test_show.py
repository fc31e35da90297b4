"""``highres3d show``: orthogonal-slice PNGs with label overlays."""
from __future__ import annotations

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest

from highres3d.cli.main import main
from highres3d.errors import DataError
from highres3d.utils import OutputExistsError
from highres3d.visualize import render_slices, show

# Stored L-P-S with 3 mm slices, like BraTS but anisotropic: reorientation and aspect both matter.
AFFINE = np.array([[-1.0, 0, 0, 10], [0, -1.0, 0, 20], [0, 0, 3.0, -5], [0, 0, 0, 1]])


@pytest.fixture
def volume(tmp_path):
    shape = (20, 30, 10)
    data = np.fromfunction(lambda i, j, k: 100 + i + j + 5 * k, shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[8:11, 10:15, 4:7] = 17
    image_path, label_path = tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), str(image_path))
    nib.save(nib.Nifti1Image(label, AFFINE), str(label_path))
    return image_path, label_path


def _magenta(picture):
    r, g, b = (picture[..., c].astype(int) for c in range(3))
    return (r - g > 60) & (b - g > 60)


def test_png_size_follows_voxel_spacing_and_overlay_marks_the_label(volume, tmp_path):
    image_path, label_path = volume
    out = show(image_path, label_path, tmp_path / "out.png")
    picture = iio.imread(out)
    # Extents 20 x 30 x 30 mm; pixels of 30/256 mm: sagittal 256x256, coronal and axial 171 wide.
    assert picture.shape == (256, 256 + 171 + 171 + 2 * 4, 3)
    assert _magenta(picture).sum() > 1000
    plain, _ = render_slices(image_path)
    assert not _magenta(plain).any()


def test_default_cut_is_the_label_centre_of_mass(volume):
    image_path, label_path = volume
    _, centre = render_slices(image_path, label_path)
    # The block's centre is voxel (9, 12, 5) of the LPS file: x and y flip in RAS.
    assert centre == (20 - 1 - 9, 30 - 1 - 12, 5)


def test_right_and_anterior_are_right_and_up_in_the_axial_panel(tmp_path):
    shape = (20, 20, 8)
    data = np.full(shape, 10, np.int16)
    data[0:4, 0:4, :] = 1000  # LPS storage: i = 0 is the right-most column, j = 0 the most anterior row
    path = tmp_path / "marker.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0])), str(path))
    picture, _ = render_slices(path)
    axial = picture[:, -256:, 0]  # 20 x 20 mm drawn 256 x 256, the last panel
    rows, cols = np.nonzero(axial > 200)
    assert rows.mean() < axial.shape[0] / 2 and cols.mean() > axial.shape[1] / 2


def test_explicit_slice_outside_the_volume_is_refused(volume):
    image_path, _ = volume
    with pytest.raises(DataError, match="outside"):
        render_slices(image_path, slice_index=(0, 0, 99))


def test_errors_name_the_file(volume, tmp_path):
    image_path, _ = volume
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(DataError, match="nope.nii.gz"):
        show(missing)
    wrong = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), AFFINE), str(wrong))
    with pytest.raises(DataError, match="wrong.nii.gz.*shape"):
        show(image_path, wrong, tmp_path / "x.png")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(image_path.read_bytes()[:200])
    with pytest.raises(DataError, match="corrupt.nii.gz"):
        show(corrupt, out_path=tmp_path / "y.png")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_existing_png_is_kept_unless_overwrite(volume, tmp_path):
    image_path, label_path = volume
    out = tmp_path / "o.png"
    out.write_bytes(b"keep")
    with pytest.raises(OutputExistsError):
        show(image_path, label_path, out)
    assert out.read_bytes() == b"keep"
    show(image_path, label_path, out, overwrite=True)
    assert iio.imread(out).ndim == 3


def test_cli(volume, tmp_path, capsys):
    image_path, label_path = volume
    out = tmp_path / "cli.png"
    assert main(["show", str(image_path), "--label", str(label_path), "-o", str(out), "--slice", "5,5,5"]) == 0
    assert out.exists() and "Wrote" in capsys.readouterr().out
    assert main(["show", str(image_path), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_comparison_stacks_every_label_map_on_the_same_slices(volume, tmp_path):
    from highres3d.visualize import compare_segmentations

    image_path, label_path = volume
    shifted = np.zeros((20, 30, 10), np.uint8)
    shifted[2:5, 2:6, 1:3] = 17  # far from the truth's centre: must not move the cut
    shifted_path = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(shifted, AFFINE), str(shifted_path))
    out = compare_segmentations(image_path, [("truth", label_path), ("same", label_path), ("other", shifted_path)],
                                tmp_path / "cmp.png")
    picture = iio.imread(out)
    single, _ = render_slices(image_path, label_path)
    band, gap = 16, 4
    assert picture.shape == (3 * (band + single.shape[0]) + 2 * gap, single.shape[1], 3)
    rows = [picture[i * (band + single.shape[0] + gap) + band:][: single.shape[0]] for i in range(3)]
    np.testing.assert_array_equal(rows[0], single)
    np.testing.assert_array_equal(rows[1], rows[0])
    # The third map is cut through the truth's centre, where it has nothing: no label colour at all.
    assert not _magenta(rows[2]).any()
    assert (picture[:band] > 0).any()  # the title is drawn


def test_dot_plot_puts_the_mean_where_it_belongs(tmp_path):
    from highres3d.visualize import dot_plot

    out = dot_plot({"scratch": [0.2, 0.4], "freeze2": [0.8, float("nan")]}, tmp_path / "p.png", title="Dice")
    picture = iio.imread(out)
    red = (picture[..., 0] > 150) & (picture[..., 1] < 80) & (picture[..., 2] < 80)
    columns = np.flatnonzero(red.any(axis=0))
    left, span = 110, picture.shape[1] - 110 - 20
    assert {round((c - left) / span, 1) for c in columns} == {0.3, 0.8}
