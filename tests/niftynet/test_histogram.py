"""Histogram standardisation: landmarks and mapping checked against values worked out by hand."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from highres3d.cli.main import main
from highres3d.config import config_from_dict
from highres3d.data import histogram
from highres3d.data.dataset import Subject
from highres3d.data.preprocess import load_volume
from highres3d.errors import DataError

# Landmark fractions with cutoff (0.1, 0.9): 0.1 .1 .2 .25 .3 .4 .5 .6 .7 .75 .8 .9 0.9
# On the values 0..10 the percentiles are 10 x those fractions; mapped by (p - 1) / 8 x 100:
HAND_LANDMARKS = [0, 0, 12.5, 18.75, 25, 37.5, 50, 62.5, 75, 81.25, 87.5, 100, 100]


def test_landmarks_of_one_volume_by_hand():
    volume = np.arange(11, dtype=np.float32).reshape(11, 1, 1)
    learned = histogram.learn_landmarks([("v", volume)], (0.1, 0.9))
    np.testing.assert_allclose(learned, HAND_LANDMARKS, atol=1e-12)


def test_landmarks_are_the_mean_over_images_and_affine_invariant():
    a = np.arange(11, dtype=np.float64)
    b = 3 * a + 7  # an affine copy has the same mapped landmarks
    c = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 20], dtype=np.float64)
    np.testing.assert_allclose(histogram.learn_landmarks([("b", b)], (0.1, 0.9)), HAND_LANDMARKS, atol=1e-9)
    # With cutoff (0.1, 0.95) the top landmark of c is at position 9.5: 9 + 0.5 x 11 = 14.5,
    # so c's landmarks map by (p - 1) / 13.5 x 100 while a's top is 9.5 -> (p - 1) / 8.5 x 100.
    fractions = np.array([0.1, .1, .2, .25, .3, .4, .5, .6, .7, .75, .8, .9, 0.95])
    pa = 10 * fractions
    pc = pa.copy()
    pc[-1] = 14.5
    expected = ((pa - 1) / 8.5 * 100 + (pc - 1) / 13.5 * 100) / 2
    np.testing.assert_allclose(histogram.learn_landmarks([("a", a), ("c", c)], (0.1, 0.95)), expected, atol=1e-9)


def test_constant_image_is_named():
    with pytest.raises(DataError, match="flat.nii.gz: intensities between"):
        histogram.learn_landmarks([("flat.nii.gz", np.ones(20))], (0.01, 0.99))


def test_standardise_median_by_hand():
    image = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 20], dtype=np.float32).reshape(11, 1, 1)
    # median: landmarks 0, 6, 12. Cutoff (0.1, 0.9) is widened to (0.09, 0.91): the image's
    # landmarks are 0.9, 5 and 9 + 0.1 x 11 = 10.1; the reference's are 0, 50, 100.
    out = histogram.standardise(image, None, HAND_LANDMARKS, (0.1, 0.9), "median").ravel()
    low, high = 50 / 4.1, 50 / 5.1
    expected = [(v - 0.9) * low if v < 5 else 50 + (v - 5) * high for v in image.ravel()]
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert out[-1] == pytest.approx(50 + 15 * high, rel=1e-6)  # above the top landmark: extrapolated, not clipped


def test_zero_width_piece_has_slope_zero():
    image = np.array([0] * 8 + [1, 2, 3, -1], dtype=np.float32)
    mask = np.arange(12) < 11  # the landmarks come from the first 11 voxels only
    # Their landmarks: 0 (position 0.9), 0 (position 5) and 2 + 0.1 x 1 = 2.1. The first piece has
    # zero width, so -1 maps to its start (0); 0 itself belongs to [0, 2.1] -> [50, 100], as in NiftyNet.
    out = histogram.standardise(image, mask, HAND_LANDMARKS, (0.1, 0.9), "median")
    assert out[-1] == pytest.approx(0.0)
    np.testing.assert_allclose(out[:8], 50.0)
    assert out[10] == pytest.approx(50 + 3 * 50 / 2.1, rel=1e-6)


def test_percentile_and_quartile_use_their_landmarks():
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 10.0, size=(8, 8, 8)).astype(np.float32)
    reference = np.array(HAND_LANDMARKS) * 1.5
    for norm_type, idx in (("percentile", [0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12]), ("quartile", [0, 3, 6, 9, 12])):
        out = histogram.standardise(image, None, reference, (0.01, 0.99), norm_type)
        low, high = histogram.widened_cutoff((0.01, 0.99), norm_type)
        fractions = np.array([low, .1, .2, .25, .3, .4, .5, .6, .7, .75, .8, .9, high])[idx]
        own = np.percentile(image, 100 * fractions)
        # Each landmark of the image lands exactly on the reference value.
        inside = (image >= own[0]) & (image <= own[-1])
        np.testing.assert_allclose(out[inside], np.interp(image[inside], own, reference[idx]), rtol=1e-4, atol=1e-3)


def test_ref_file_round_trip_keeps_label_mapping(tmp_path):
    path = tmp_path / "histogram_ref_file.txt"
    path.write_text("T1 0.0 8.1 15.2 20 25 33 41 50 60 66 72 85 100.0\n\nlabel_label-from 0.0 1.0 4.0\nlabel_label-to 0.0 1.0 2.0\n")
    entries = histogram.read_ref_file(path)
    assert entries["T1"][1] == 8.1 and len(entries["T1"]) == 13
    assert histogram.label_mapping(entries) == {0: 0, 1: 1, 4: 2}
    out = tmp_path / "copy.txt"
    histogram.write_ref_file(out, entries)
    assert histogram.read_ref_file(out) == entries
    with pytest.raises(Exception, match="already exists"):
        histogram.write_ref_file(out, entries)
    bad = tmp_path / "bad.txt"
    bad.write_text("T1 0 1 x\n")
    with pytest.raises(DataError, match=r"bad.txt:1: expected"):
        histogram.read_ref_file(bad)
    with pytest.raises(DataError, match="no landmarks for T2"):
        histogram.reference_landmarks(path, ["T1", "T2"])


def save(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4)), str(path))
    return path


@pytest.fixture()
def three_subjects(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3):
        scale = 1 + i  # different scanners: the landmarks undo the scale
        save(tmp_path / f"s{i}_t1.nii.gz", scale * rng.gamma(2.0, 5.0, (6, 6, 6)))
        save(tmp_path / f"s{i}_seg.nii.gz", np.zeros((6, 6, 6)))
    return tmp_path


def test_cli_landmarks_and_preprocessing(three_subjects, tmp_path, capsys):
    root = three_subjects
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        "dataset: {root: " + str(root) + ", modalities: [T1], patterns: {T1: '{subject}_t1.nii.gz', label: '{subject}_seg.nii.gz'},"
        " split: {validation_fraction: 0.0, inference_fraction: 0.0}}\n"
        "preprocessing: {normalisation: none, histogram: {enabled: true, ref_file: lm.txt, cutoff: [0.01, 0.99]}}\n"
    )
    assert main(["data", "landmarks", str(cfg_path)]) == 0
    written = histogram.read_ref_file(tmp_path / "lm.txt")["T1"]
    # Independently: each subject's 13 percentiles mapped onto [0, 100], averaged.
    fractions = 100 * np.array([0.01, .1, .2, .25, .3, .4, .5, .6, .7, .75, .8, .9, 0.99])
    per = []
    for i in range(3):
        p = np.percentile(nib.load(str(root / f"s{i}_t1.nii.gz")).get_fdata(), fractions)
        per.append((p - p[0]) / (p[-1] - p[0]) * 100)
    np.testing.assert_allclose(written, np.mean(per, axis=0), rtol=1e-6)
    assert main(["data", "landmarks", str(cfg_path)]) == 2  # never overwritten silently
    assert "already exists" in capsys.readouterr().err
    cfg = config_from_dict({"dataset": {"modalities": ["T1"]},
                            "preprocessing": {"normalisation": "none",
                                              "histogram": {"enabled": True, "ref_file": str(tmp_path / "lm.txt")}}})
    subject = Subject("s1", {"T1": root / "s1_t1.nii.gz"})
    volume = load_volume(subject, cfg.preprocessing)
    raw = nib.load(str(root / "s1_t1.nii.gz")).get_fdata()
    expected = histogram.standardise(raw, None, written, (0.01, 0.99), "percentile")
    np.testing.assert_allclose(volume.image[..., 0], expected, rtol=1e-5, atol=1e-4)
    # Histogram landmarks of the standardised image are (almost) the reference at the landmarks used.
    own = np.percentile(volume.image, fractions[[1, 6, 11]])
    np.testing.assert_allclose(own, np.asarray(written)[[1, 6, 11]], atol=0.1)  # order statistics straddle the breakpoints
