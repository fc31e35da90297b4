"""Segmentation metrics: hand-computed cases, NiftyNet's test values, scipy references, files."""
import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.spatial.distance import directed_hausdorff

from highres3d.data.preprocess import map_labels, parse_label_map
from highres3d.errors import ConfigError, DataError
from highres3d.evaluation import (
    EmptyPolicy,
    binary_metrics,
    evaluate_folders,
    evaluate_labels,
    summarise,
    summary_table,
    surface,
    write_csv,
    write_summary,
)


def test_niftynet_confusion_counts_4_voxels():
    m = binary_metrics(np.array([1, 0, 1, 0]), np.array([1, 0, 0, 0]), spacing=(1,))
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 1, 0, 2)
    assert m["jaccard"] == 0.5 and m["dice"] == pytest.approx(2 / 3)
    assert binary_metrics(np.array([1, 0, 0, 0]), np.array([1, 0, 0, 0]), spacing=(1,))["dice"] == 1.0


def test_niftynet_distance_values_2x2x2():
    seg = np.reshape([1, 1, 1, 0, 0, 0, 0, 0], [2, 2, 2])
    ref = np.reshape([0, 0, 0, 0, 0, 0, 1, 1], [2, 2, 2])
    m = binary_metrics(seg, ref)
    assert m["assd_mm"] == pytest.approx(1.2485, abs=1e-3)  # NiftyNet average_distance
    assert m["hausdorff_mm"] == pytest.approx(1.414, abs=1e-3)
    assert m["hd95_mm"] == pytest.approx(1.414, abs=1e-3)


def test_surface_of_a_single_voxel_and_a_cube():
    img = np.zeros((10, 10, 10), bool)
    img[5, 5, 5] = True
    np.testing.assert_array_equal(surface(img), img)  # NiftyNet MorphologyOps 3-D case
    cube = np.zeros((7, 7, 7), bool)
    cube[1:6, 1:6, 1:6] = True
    assert surface(cube).sum() == 5 ** 3 - 3 ** 3
    assert surface(np.ones((3, 3, 3), bool)).sum() == 26  # the image edge counts as outside


def test_distances_in_mm_hand_computed():
    a = np.zeros((5, 5, 9), bool)
    b = np.zeros((5, 5, 9), bool)
    a[2, 2, 1] = True
    b[2, 2, 6] = True
    m = binary_metrics(a, b, spacing=(1.0, 1.0, 3.0))
    assert m["hausdorff_mm"] == pytest.approx(15.0) and m["assd_mm"] == pytest.approx(15.0)
    assert m["pred_ml"] == pytest.approx(0.003) and m["dice"] == 0.0


def scipy_reference(pred, truth, spacing):
    sp = np.asarray(spacing)
    p = np.argwhere(surface(pred)) * sp
    t = np.argwhere(surface(truth)) * sp
    hd = max(directed_hausdorff(p, t)[0], directed_hausdorff(t, p)[0])
    d_pt, _ = cKDTree(t).query(p)
    d_tp, _ = cKDTree(p).query(t)
    hd95 = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
    assd = (d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size)
    return hd, hd95, assd


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distances_match_scipy_point_set_references(seed):
    rng = np.random.default_rng(seed)
    shape = (24, 20, 16)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    spacing = (0.8, 1.3, 2.0)

    def blob():
        c = rng.uniform(5, 12, 3)
        r = rng.uniform(3, 6, 3)
        return (((grid - c) / r) ** 2).sum(-1) < 1

    pred, truth = blob(), blob()
    m = binary_metrics(pred, truth, spacing)
    hd, hd95, assd = scipy_reference(pred, truth, spacing)
    assert m["hausdorff_mm"] == pytest.approx(hd, rel=1e-6)
    assert m["hd95_mm"] == pytest.approx(hd95, rel=1e-6)
    assert m["assd_mm"] == pytest.approx(assd, rel=1e-6)
    inter = (pred & truth).sum()
    assert m["dice"] == pytest.approx(2 * inter / (pred.sum() + truth.sum()))
    assert m["jaccard"] == pytest.approx(inter / (pred | truth).sum())


def test_empty_mask_policies():
    empty = np.zeros((4, 5, 6), bool)
    some = empty.copy()
    some[1:3, 1:3, 1:3] = True
    spacing = (1.0, 2.0, 3.0)
    diagonal = math.sqrt(4 ** 2 + 10 ** 2 + 18 ** 2)
    both = binary_metrics(empty, empty, spacing)
    assert math.isnan(both["dice"]) and math.isnan(both["hd95_mm"]) and both["tn"] == empty.size
    perfect = binary_metrics(empty, empty, spacing, EmptyPolicy(both_empty="perfect"))
    assert perfect["dice"] == 1.0 and perfect["hausdorff_mm"] == 0.0
    for pred, truth in ((some, empty), (empty, some)):  # false positive on empty truth; missed structure
        m = binary_metrics(pred, truth, spacing)
        assert m["dice"] == 0.0 and m["jaccard"] == 0.0
        assert m["hausdorff_mm"] == m["hd95_mm"] == m["assd_mm"] == pytest.approx(diagonal)
        assert math.isinf(binary_metrics(pred, truth, spacing, EmptyPolicy(missing_distance="inf"))["hd95_mm"])
        assert math.isnan(binary_metrics(pred, truth, spacing, EmptyPolicy(missing_distance="nan"))["assd_mm"])
    with pytest.raises(ConfigError):
        EmptyPolicy(both_empty="one")


def test_label_maps_brats_tumour_core():
    assert parse_label_map("1+4:1,2:0,0:0") == {0: 0, 1: 1, 2: 0, 4: 1}
    raw = np.array([0, 1, 2, 4, 4])
    np.testing.assert_array_equal(map_labels(raw, parse_label_map("0:0,1:1,2:0,4:1"), source="t"), [0, 1, 0, 1, 1])
    np.testing.assert_array_equal(map_labels(raw, {1: 1, 4: 1}, 0, source="t"), [0, 1, 0, 1, 1])
    with pytest.raises(DataError, match=r"\[0, 2\]"):
        map_labels(raw, {1: 1, 4: 1}, source="truth.nii.gz")
    with pytest.raises(ConfigError):
        parse_label_map("1=1")
    with pytest.raises(ConfigError):
        parse_label_map("1:1,1:2")


def test_summary_statistics_skip_nan_and_count_empty_cases():
    rows = []
    for sid, dice in (("a", 0.8), ("b", 0.6), ("c", math.nan)):
        m = {"dice": dice, "jaccard": dice, "hausdorff_mm": 1.0, "hd95_mm": 1.0, "assd_mm": 1.0,
             "pred_ml": 1.0, "truth_ml": 1.0, "pred_voxels": 0 if math.isnan(dice) else 5,
             "truth_voxels": 0 if math.isnan(dice) else 5}
        rows.append({"subject": sid, "class": 1, **m})
    s = summarise(rows)
    d = s["classes"]["1"]["dice"]
    assert d["n"] == 2 and d["mean"] == pytest.approx(0.7) and d["median"] == pytest.approx(0.7)
    assert d["sd"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert s["classes"]["1"]["both_empty"] == 1 and s["foreground_mean"]["dice"] == pytest.approx(0.7)
    assert "0.7" in str(summary_table(s))


def write_label(path, data, affine=np.diag([1.0, 2.0, 1.5, 1.0])):
    nib.save(nib.Nifti1Image(np.asarray(data, np.uint8), affine), str(path))


def test_evaluate_folders_csv_json(tmp_path):
    pred_dir, truth_dir = tmp_path / "pred", tmp_path / "truth"
    pred_dir.mkdir()
    (truth_dir / "s2").mkdir(parents=True)
    (truth_dir / "s1").mkdir()
    truth = np.zeros((8, 8, 8), np.uint8)
    truth[2:5, 2:5, 2:5] = 4
    truth[5:7, 5:7, 5:7] = 2
    pred = np.where(truth == 4, 1, 0)
    write_label(truth_dir / "s1" / "s1_seg.nii.gz", truth)
    write_label(pred_dir / "s1_seg.nii.gz", pred)
    write_label(truth_dir / "s2" / "s2_seg.nii.gz", np.zeros_like(truth))  # empty truth, false positive
    write_label(pred_dir / "s2_seg.nii.gz", pred)
    write_label(truth_dir / "s3_seg.nii.gz", truth)  # no prediction: listed, not scored
    result = evaluate_folders(pred_dir, truth_dir, truth_pattern="{subject}/{subject}_seg.nii.gz",
                              truth_map=parse_label_map("0:0,2:0,4:1"))
    by_subject = {r["subject"]: r for r in result.rows}
    assert by_subject["s1"]["dice"] == 1.0 and by_subject["s1"]["hd95_mm"] == 0.0
    assert by_subject["s1"]["truth_ml"] == pytest.approx(27 * 3.0 / 1000)
    assert by_subject["s2"]["dice"] == 0.0 and by_subject["s2"]["fp"] == 27
    summary = result.summary
    assert summary["classes"]["1"]["false_positive_cases"] == 1 and summary["subjects"] == 2
    csv_path = write_csv(result.rows, tmp_path / "e.csv")
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("subject,class,dice,jaccard,hausdorff_mm,hd95_mm,assd_mm,tp,fp,fn,tn")
    assert len(lines) == 3
    json_path = write_summary(summary, tmp_path / "e.json")
    loaded = json.loads(json_path.read_text())
    assert loaded["policy"] == {"both_empty": "nan", "missing_distance": "diagonal"}
    assert loaded["classes"]["1"]["dice"]["mean"] == pytest.approx(0.5)

    # geometry and pairing errors name the files
    write_label(pred_dir / "s1_seg.nii.gz", pred, affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(DataError, match="s1_seg.nii.gz: affine differs"):
        evaluate_folders(pred_dir, truth_dir, truth_pattern="{subject}/{subject}_seg.nii.gz",
                         truth_map={0: 0, 2: 0, 4: 1})
    with pytest.raises(DataError, match="no truth file"):
        evaluate_folders(pred_dir, truth_dir)


def test_classes_absent_from_a_subject_are_both_empty():
    pred = np.zeros((6, 6, 6), int)
    truth = pred.copy()
    pred[1:3, 1:3, 1:3] = 1
    truth[1:3, 1:3, 1:3] = 1
    out = evaluate_labels(pred, truth, [1, 2])
    assert out[1]["dice"] == 1.0 and math.isnan(out[2]["dice"]) and out[2]["tn"] == 216
