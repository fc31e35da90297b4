"""Whitening, foreground masks, label mapping and whole-subject loading."""
import nibabel as nib
import numpy as np
import pytest

from highres3d.config import PreprocessingConfig
from highres3d.data.dataset import Subject
from highres3d.data.preprocess import foreground_mask, load_volume, map_labels, whiten
from highres3d.errors import DataError


def test_whiten_over_mask():
    rng = np.random.default_rng(0)
    image = rng.normal(5, 3, size=(10, 10, 10, 2)).astype(np.float32)
    masks = [np.ones((10, 10, 10), bool), image[..., 1] > 5]
    out = whiten(image, masks)
    assert abs(out[..., 0].mean()) < 1e-5 and abs(out[..., 0].std() - 1) < 1e-4
    inside = out[..., 1][masks[1]]
    assert abs(inside.mean()) < 1e-5 and abs(inside.std() - 1) < 1e-4
    # order of voxels is preserved (monotonic per channel)
    assert np.array_equal(np.argsort(out[..., 0], axis=None), np.argsort(image[..., 0], axis=None))
    only = whiten(image, masks, foreground_only=True)
    assert (only[..., 1][~masks[1]] == 0).all()
    flat = whiten(np.ones((3, 3, 3, 1), np.float32), [np.ones((3, 3, 3), bool)])
    assert np.isfinite(flat).all()


def test_foreground_masks():
    image = np.zeros((10, 10, 10), np.float32)
    image[2:8, 2:8, 2:8] = 100
    image += np.random.default_rng(1).normal(0, 1, image.shape)
    assert foreground_mask(image, "all").all()
    assert foreground_mask(image, "threshold_plus").sum() == 216
    otsu = foreground_mask(image, "otsu")
    assert otsu[2:8, 2:8, 2:8].all() and otsu.sum() - 216 <= 3  # the gap between modes is flat for Otsu


def test_label_mapping():
    raw = np.array([[[0, 1, 2, 4]]])
    np.testing.assert_array_equal(map_labels(raw, {0: 0, 1: 1, 2: 0, 4: 1}), [[[0, 1, 0, 1]]])
    aseg = np.array([[[0, 2, 17, 53, 41]]])
    np.testing.assert_array_equal(map_labels(aseg, {17: 1, 53: 1}, other=0), [[[0, 0, 1, 1, 0]]])
    with pytest.raises(DataError, match=r"seg.nii.gz: label values \[0, 2, 41\] are not in preprocessing.labels"):
        map_labels(aseg, {17: 1, 53: 1}, source="seg.nii.gz")
    with pytest.raises(DataError, match="exceed the 2 classes"):
        map_labels(raw, {}, num_classes=2)
    assert map_labels(np.array([[[0, 1]]]), {}, num_classes=2).dtype == np.uint8


def write(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture
def subject(tmp_path):
    rng = np.random.default_rng(0)
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    t1 = rng.normal(100, 10, (12, 10, 6)).astype(np.float32)
    t2 = rng.normal(50, 5, (12, 10, 6)).astype(np.float32)
    seg = np.zeros((12, 10, 6), np.uint8)
    seg[3:6, 3:6, 2:4] = 4
    seg[6:8, 3:6, 2:4] = 2
    return Subject("s1", {"T1": write(tmp_path / "t1.nii.gz", t1, affine), "T2": write(tmp_path / "t2.nii.gz", t2, affine)},
                   write(tmp_path / "seg.nii.gz", seg, affine)), t1, seg


def test_load_volume(subject):
    subj, t1, seg = subject
    cfg = PreprocessingConfig(labels={0: 0, 1: 1, 2: 0, 4: 1})
    vol = load_volume(subj, cfg, ["T1", "T2"])
    assert vol.image.shape == (12, 10, 6, 2) and vol.image.dtype == np.float32
    assert vol.label.dtype == np.uint8 and vol.label.sum() == 18
    assert abs(vol.image[..., 0].mean()) < 1e-5
    # RAS working space: first axis flipped relative to the LPS file
    np.testing.assert_allclose(vol.image[0, 0, 0, 0], (t1[11, 9, 0] - t1.mean()) / t1.std(), rtol=1e-4)
    resampled = load_volume(subj, PreprocessingConfig(labels={0: 0, 1: 1, 2: 0, 4: 1}, spacing=(1, 1, 1)), ["T1", "T2"])
    assert resampled.image.shape == (12, 10, 12, 2) and resampled.label.shape == (12, 10, 12)


def test_load_volume_rejects_mismatched_grids(tmp_path, subject):
    subj, t1, seg = subject
    shifted = write(tmp_path / "t2_shift.nii.gz", t1, np.diag([-1.0, -1.0, 2.0, 1.0]) + np.array([[0, 0, 0, 0.5], [0] * 4, [0] * 4, [0] * 4]))
    bad = Subject("s1", {"T1": subj.images["T1"], "T2": shifted}, subj.label)
    with pytest.raises(DataError, match="t2_shift.nii.gz: affine differs from that of .*t1.nii.gz by 0.5"):
        load_volume(bad, PreprocessingConfig(labels={0: 0, 1: 1, 2: 0, 4: 1}))
    small = write(tmp_path / "small.nii.gz", t1[:5], np.diag([-1.0, -1.0, 2.0, 1.0]))
    bad = Subject("s1", {"T1": subj.images["T1"], "T2": small}, subj.label)
    with pytest.raises(DataError, match=r"small.nii.gz: shape \(5, 10, 6\) differs"):
        load_volume(bad, PreprocessingConfig(labels={0: 0, 1: 1, 2: 0, 4: 1}))


def test_load_volume_label_errors(tmp_path, subject):
    subj, t1, seg = subject
    with pytest.raises(DataError, match=r"seg.nii.gz: label values \[2, 4\] are not in"):
        load_volume(subj, PreprocessingConfig(labels={0: 0, 1: 1}))
    float_label = write(tmp_path / "float.nii.gz", t1, np.diag([-1.0, -1.0, 2.0, 1.0]))
    with pytest.raises(DataError, match="float.nii.gz: label values are not integers"):
        load_volume(Subject("s1", subj.images, float_label), PreprocessingConfig())
    with pytest.raises(DataError, match="no label file"):
        load_volume(Subject("s1", subj.images, None), PreprocessingConfig(), label_required=True)


def test_whitening_over_a_mask_file_from_the_dataset(tmp_path):
    from highres3d.config import config_from_dict
    from highres3d.data.dataset import Dataset
    from highres3d.errors import ConfigError

    rng = np.random.default_rng(0)
    image = rng.normal(10, 1, (8, 8, 8)).astype(np.float32)
    image[2:6, 2:6, 2:6] = rng.normal(100, 5, (4, 4, 4))
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[2:6, 2:6, 2:6] = 1
    for sid in ("a", "b"):
        write(tmp_path / f"{sid}_t1.nii.gz", image)
        write(tmp_path / f"{sid}_brain.nii.gz", mask)
    raw = {"dataset": {"root": str(tmp_path), "modalities": ["T1"],
                       "patterns": {"T1": "{subject}_t1.nii.gz", "mask": "{subject}_brain.nii.gz"},
                       "split": {"validation_fraction": 0, "inference_fraction": 0}},
           "preprocessing": {"foreground": "mask"}}
    cfg = config_from_dict(raw)
    subject = Dataset.from_config(cfg.dataset).subjects[0]
    assert subject.mask.name == "a_brain.nii.gz"
    vol = load_volume(subject, cfg.preprocessing, ["T1"])
    inside = vol.image[..., 0][mask.astype(bool)]
    assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-3
    del raw["dataset"]["patterns"]["mask"]
    with pytest.raises(ConfigError, match="dataset.patterns.mask: required"):
        config_from_dict(raw)
