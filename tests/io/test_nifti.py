"""NIfTI loading into working space and writing back onto the original grid."""
import gzip

import nibabel as nib
import numpy as np
import pytest

from highres3d.errors import DataError
from highres3d.io.nifti import load_image, save_like, save_working, to_original_grid
from highres3d.utils import OutputExistsError


def rotation_z(theta):
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


AFFINES = {
    "ras": np.diag([1.0, 1.0, 1.0, 1.0]),
    "lps": np.array([[-1.0, 0, 0, 120], [0, -1.0, 0, 110], [0, 0, 1.0, -70], [0, 0, 0, 1]]),
    "anisotropic_psr": np.array([[0, 0, 1.2, -90], [-0.9, 0, 0, 100], [0, -0.95, 0, 80], [0, 0, 0, 1]]),
    "oblique": np.vstack([np.hstack([rotation_z(0.3) @ np.diag([1.1, 0.8, 2.5]), [[5], [-3], [12]]]), [0, 0, 0, 1]]),
}


def write(path, data, affine, qcode=1, scode=1, header=None):
    img = nib.Nifti1Image(data, affine, header=header)
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_round_trip_identical_data_affine_header(tmp_path, name, suffix):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(13, 9, 7)).astype(np.float32)
    src = write(tmp_path / f"in{suffix}", data, AFFINES[name], qcode=2, scode=4)
    array, info = load_image(src, "RAS")
    assert nib.aff2axcodes(info.working_affine) == ("R", "A", "S")
    # the working array is the same voxels, permuted/flipped: world positions agree
    ijk = np.array([2, 3, 4, 1.0])
    world = info.working_affine @ ijk
    original_ijk = np.rint(np.linalg.inv(AFFINES[name]) @ world).astype(int)[:3]
    assert array[2, 3, 4] == data[tuple(original_ijk)]
    out = save_working(array, info, tmp_path / f"out{suffix}", order=0)
    back = nib.load(str(out))
    np.testing.assert_array_equal(back.get_fdata(dtype=np.float32), data)
    np.testing.assert_allclose(back.affine, AFFINES[name], atol=1e-6)
    assert int(back.header["qform_code"]) == 2 and int(back.header["sform_code"]) == 4
    again, info2 = load_image(out, "RAS")
    np.testing.assert_array_equal(again, array)
    np.testing.assert_allclose(info2.working_affine, info.working_affine, atol=1e-6)


def test_other_working_orientation(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    src = write(tmp_path / "a.nii.gz", data, AFFINES["lps"])
    array, info = load_image(src, "ARS")
    assert nib.aff2axcodes(info.working_affine) == ("A", "R", "S")
    assert array.shape == (5, 4, 6)
    np.testing.assert_array_equal(to_original_grid(array, info), data)


def test_resampling_linear_ramp_is_exact(tmp_path):
    # A linear function of world position is reproduced exactly by linear interpolation.
    shape = (20, 16, 10)
    affine = np.diag([2.0, 1.5, 3.0, 1.0])
    ijk = np.indices(shape).astype(np.float64)
    world = [affine[a, a] * ijk[a] for a in range(3)]
    data = (0.5 * world[0] - 0.25 * world[1] + world[2]).astype(np.float32)
    src = write(tmp_path / "ramp.nii.gz", data, affine)
    array, info = load_image(src, "RAS", spacing=(1.0, 1.0, 1.0), order=1)
    assert array.shape == (40, 24, 30)
    assert info.spacing == pytest.approx((1.0, 1.0, 1.0))
    grid = np.indices(array.shape).reshape(3, -1)
    pos = info.working_affine[:3, :3] @ grid + info.working_affine[:3, 3:4]
    expected = (0.5 * pos[0] - 0.25 * pos[1] + pos[2]).reshape(array.shape)
    inner = (slice(2, -2),) * 3  # edges clamp (mode 'nearest')
    np.testing.assert_allclose(array[inner], expected[inner], atol=1e-4)
    back = to_original_grid(array, info, order=1)
    assert back.shape == shape
    np.testing.assert_allclose(back[1:-1, 1:-1, 1:-1], data[1:-1, 1:-1, 1:-1], atol=1e-3)


def test_resampling_labels_nearest_keeps_values_and_volume(tmp_path):
    label = np.zeros((30, 30, 12), np.uint8)
    label[8:22, 10:20, 3:9] = 4
    label[12:16, 12:16, 4:7] = 1
    src = write(tmp_path / "seg.nii.gz", label, np.diag([1.0, 1.0, 2.5, 1]))
    array, info = load_image(src, "LPS", spacing=(1, 1, 1), order=0, dtype=np.uint8)
    assert set(np.unique(array)) == {0, 1, 4}
    volume_mm3 = (array == 4).sum() * np.prod(info.spacing)
    assert volume_mm3 == pytest.approx((label == 4).sum() * 2.5, rel=0.1)
    back = to_original_grid(array, info, order=0)
    assert (back != label).mean() < 0.02


def test_int16_with_scl_slope_and_trailing_singleton(tmp_path):
    raw = np.arange(60, dtype=np.int16).reshape(3, 4, 5, 1)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    array, info = load_image(tmp_path / "s.nii.gz")
    assert array.shape == (3, 4, 5)
    np.testing.assert_allclose(array, raw[..., 0] * 0.5 + 10.0)


def test_label_output_dtype_and_no_silent_overwrite(tmp_path):
    src = write(tmp_path / "a.nii.gz", np.zeros((4, 4, 4), np.float32), AFFINES["lps"])
    _, info = load_image(src)
    seg = np.zeros((4, 4, 4), np.int64)
    seg[1, 1, 1] = 3
    out = save_like(seg, info, tmp_path / "seg.nii.gz")
    assert nib.load(str(out)).get_data_dtype() == np.uint8
    with pytest.raises(OutputExistsError):
        save_like(seg, info, out)
    save_like(seg * 0, info, out, overwrite=True)
    assert nib.load(str(out)).get_fdata().max() == 0
    big = seg * 1000
    assert nib.load(str(save_like(big, info, tmp_path / "big.nii.gz"))).get_data_dtype() == np.uint16
    probs = np.zeros((4, 4, 4, 2), np.float32)
    assert nib.load(str(save_like(probs, info, tmp_path / "p.nii.gz"))).shape == (4, 4, 4, 2)
    # no temporary files left behind
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    src = write(tmp_path / "a.nii.gz", np.zeros((4, 4, 4), np.float32), np.eye(4))
    _, info = load_image(src)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(RuntimeError):
        save_like(np.zeros((4, 4, 4)), info, tmp_path / "out.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]


def test_truncated_file(tmp_path):
    src = write(tmp_path / "a.nii.gz", np.random.rand(20, 20, 20).astype(np.float32), np.eye(4))
    blob = src.read_bytes()
    (tmp_path / "t.nii.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"t\.nii\.gz: truncated or corrupt"):
        load_image(tmp_path / "t.nii.gz")


def test_corrupt_and_missing_files(tmp_path):
    (tmp_path / "junk.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 10))
    with pytest.raises(DataError, match="junk.nii.gz"):
        load_image(tmp_path / "junk.nii.gz")
    with pytest.raises(DataError, match="file not found"):
        load_image(tmp_path / "absent.nii.gz")
    (tmp_path / "x.mha").write_bytes(b"")
    with pytest.raises(DataError, match="expected a .nii or .nii.gz"):
        load_image(tmp_path / "x.mha")


def test_multi_volume_4d_is_rejected(tmp_path):
    src = write(tmp_path / "four.nii.gz", np.zeros((4, 4, 4, 3), np.float32), np.eye(4))
    with pytest.raises(DataError, match="four.nii.gz: expected a 3-D volume.*3 volumes"):
        load_image(src)


def test_singular_affine(tmp_path):
    affine = np.eye(4)
    affine[2, 2] = 0
    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 4))
    header.set_data_dtype(np.float32)
    header.set_sform(affine, code=1)
    header["qform_code"] = 0
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), None, header=header)
    nib.save(img, str(tmp_path / "sing.nii.gz"))
    with pytest.raises(DataError, match="sing.nii.gz: the affine is singular"):
        load_image(tmp_path / "sing.nii.gz")


def test_nan_is_rejected_unless_allowed(tmp_path):
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    src = write(tmp_path / "nan.nii.gz", data, np.eye(4))
    with pytest.raises(DataError, match="nan.nii.gz: 1 voxels are NaN or Inf"):
        load_image(src)
    array, _ = load_image(src, allow_nonfinite=True)
    assert np.isnan(array).sum() == 1
