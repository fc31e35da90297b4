"""Subject discovery (patterns, NiftyNet CSV, nnU-Net raw), splits and nested subsets."""
import json

import nibabel as nib
import numpy as np
import pytest

from highres3d.config import DatasetConfig, SplitConfig, config_from_dict
from highres3d.data.dataset import Dataset, discover_subjects, random_split, read_split_csv, write_split_csv
from highres3d.errors import ConfigError, DataError


def touch_nifti(path, shape=(4, 4, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(path))
    return path


def brats_tree(root, ids, skip_t2=()):
    for sid in ids:
        for mod in ("t1", "t1ce", "t2", "flair", "seg"):
            if mod == "t2" and sid in skip_t2:
                continue
            touch_nifti(root / sid / f"{sid}_{mod}.nii.gz")


BRATS_PATTERNS = {"T1": "{subject}/{subject}_t1.nii.gz", "T2": "{subject}/{subject}_t2.nii.gz",
                  "label": "{subject}/{subject}_seg.nii.gz"}


def test_brats_patterns_do_not_confuse_t1_and_t1ce(tmp_path):
    ids = ["Brats18_TCIA01_131_1", "Brats18_CBICA_AAB_1", "Brats18_2013_2_1"]
    brats_tree(tmp_path, ids, skip_t2={"Brats18_2013_2_1"})
    problems = []
    subjects = discover_subjects(tmp_path, BRATS_PATTERNS, ["T1", "T2"], problems)
    assert [s.id for s in subjects] == ["Brats18_CBICA_AAB_1", "Brats18_TCIA01_131_1"]
    s = subjects[1]
    assert s.images["T1"].name == "Brats18_TCIA01_131_1_t1.nii.gz"
    assert s.label.name == "Brats18_TCIA01_131_1_seg.nii.gz"
    assert len(problems) == 1 and "Brats18_2013_2_1" in problems[0] and "_t2.nii.gz" in problems[0]


def test_ixi_patterns(tmp_path):
    for sid in ["IXI002-Guys-0828", "IXI012-HH-1211"]:
        for suffix in ("T1", "T2", "aseg"):
            touch_nifti(tmp_path / f"{sid}-{suffix}.nii.gz")
    cfg = DatasetConfig(root=tmp_path, modalities=("T1", "T2"),
                        patterns={"T1": "{subject}-T1.nii.gz", "T2": "{subject}-T2.nii.gz", "label": "{subject}-aseg.nii.gz"},
                        split=SplitConfig(validation_fraction=0.0, inference_fraction=0.0))
    ds = Dataset.from_config(cfg)
    assert [s.id for s in ds.subjects] == ["IXI002-Guys-0828", "IXI012-HH-1211"]
    assert ds.counts() == {"training": 2, "validation": 0, "inference": 0}


def test_niftynet_csv_layout(tmp_path):
    for sid in ["a", "b", "c"]:
        for mod in ("t1", "t2", "seg"):
            touch_nifti(tmp_path / "img" / f"{sid}_{mod}.nii.gz")
    for mod, name in (("t1", "T1"), ("t2", "T2"), ("seg", "label")):
        rows = [f"{sid},img/{sid}_{mod}.nii.gz" for sid in ["a", "b", "c"] if not (mod == "t2" and sid == "c")]
        (tmp_path / f"{name}.csv").write_text("\n".join(rows) + "\n")
    cfg = config_from_dict({"dataset": {"layout": "niftynet_csv", "split": {"validation_fraction": 0, "inference_fraction": 0}, "csv_files": {
        "T1": str(tmp_path / "T1.csv"), "T2": str(tmp_path / "T2.csv"), "label": str(tmp_path / "label.csv")}}})
    ds = Dataset.from_config(cfg.dataset)
    assert [s.id for s in ds.subjects] == ["a", "b"]
    assert ds.subjects[0].images["T2"] == (tmp_path / "img" / "a_t2.nii.gz").resolve()
    assert any("c: no row in the CSV of T2" in p for p in ds.problems)


def test_nnunet_layout(tmp_path):
    root = tmp_path / "Dataset001_Brain"
    (root).mkdir()
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "T1"},
                                                   "labels": {"background": 0, "tumour": 1}, "file_ending": ".nii.gz"}))
    for case in ["case_001", "case_002"]:
        touch_nifti(root / "imagesTr" / f"{case}_0000.nii.gz")
        touch_nifti(root / "imagesTr" / f"{case}_0001.nii.gz")
        touch_nifti(root / "labelsTr" / f"{case}.nii.gz")
    touch_nifti(root / "imagesTs" / "case_101_0000.nii.gz")
    touch_nifti(root / "imagesTs" / "case_101_0001.nii.gz")
    cfg = DatasetConfig(root=root, layout="nnunet", modalities=("T1", "T2"),
                        split=SplitConfig(validation_fraction=0.0, inference_fraction=0.0))
    ds = Dataset.from_config(cfg)
    first = ds.subject("case_001")
    assert first.images["T1"].name == "case_001_0001.nii.gz"  # matched by channel name, not position
    assert first.images["T2"].name == "case_001_0000.nii.gz"
    assert first.label.name == "case_001.nii.gz"
    assert ds.splits["case_101"] == "inference" and ds.subject("case_101").label is None
    with pytest.raises(ConfigError, match="FLAIR not among the channels"):
        Dataset.from_config(DatasetConfig(root=root, layout="nnunet", modalities=("FLAIR",)))


def test_split_file_niftynet_format(tmp_path):
    brats_tree(tmp_path / "d", ["s1", "s2", "s3", "s4"])
    split = tmp_path / "split.csv"
    split.write_text("s1,training\ns2, validation\ns3,inference\nghost,training\n")
    cfg = DatasetConfig(root=tmp_path / "d", patterns=BRATS_PATTERNS, split=SplitConfig(file=split))
    ds = Dataset.from_config(cfg)
    assert ds.counts() == {"training": 1, "validation": 1, "inference": 1}
    # A subject the split file names but the dataset lacks is an error; one it leaves out is only unused.
    assert any("ghost" in p for p in ds.problems) and any("s4" in w for w in ds.warnings)
    bad = tmp_path / "bad.csv"
    bad.write_text("s1,train\n")
    with pytest.raises(DataError, match=r"bad.csv:1: split 'train' is not one of"):
        read_split_csv(bad)


def test_random_split_is_seeded_and_follows_niftynet_rounding():
    ids = [f"s{i:03d}" for i in range(434)]
    a = random_split(ids, 0.1, 0.1, seed=3)
    assert sum(v == "validation" for v in a.values()) == 44
    assert sum(v == "inference" for v in a.values()) == 44
    assert sum(v == "training" for v in a.values()) == 346
    assert a == random_split(list(reversed(ids)), 0.1, 0.1, seed=3)
    assert a != random_split(ids, 0.1, 0.1, seed=4)
    brats = random_split([f"b{i}" for i in range(210)], 0.3, 0.2, seed=0)
    assert [sum(v == k for v in brats.values()) for k in ("training", "validation", "inference")] == [105, 63, 42]


def test_nested_subsets_from_sizes(tmp_path):
    ids = [f"s{i:02d}" for i in range(20)]
    brats_tree(tmp_path, ids)
    cfg = DatasetConfig(root=tmp_path, patterns=BRATS_PATTERNS,
                        split=SplitConfig(validation_fraction=0.2, inference_fraction=0.2, subset_sizes=(3, 6, 12)))
    ds = Dataset.from_config(cfg)
    s1, s2, s3 = (set(x) for x in ds.subsets)
    assert (len(s1), len(s2), len(s3)) == (3, 6, 12)
    assert s1 < s2 < s3 <= set(ds.ids("training"))
    assert {s.id for s in ds.split("training", subset=2)} == s2
    too_big = DatasetConfig(root=tmp_path, patterns=BRATS_PATTERNS,
                            split=SplitConfig(validation_fraction=0.2, inference_fraction=0.2, subset_sizes=(50,)))
    with pytest.raises(ConfigError, match="exceeds"):
        Dataset.from_config(too_big)


def test_nested_subsets_from_files_must_nest(tmp_path):
    ids = ["a", "b", "c", "d"]
    brats_tree(tmp_path / "d", ids)
    (tmp_path / "s1.txt").write_text("a\n")
    (tmp_path / "s2.csv").write_text("a,training\nb,training\nc,validation\n")  # a NiftyNet split file
    (tmp_path / "bad.txt").write_text("b\n")
    split = SplitConfig(validation_fraction=0.0, inference_fraction=0.0, subset_files=(tmp_path / "s1.txt", tmp_path / "s2.csv"))
    ds = Dataset.from_config(DatasetConfig(root=tmp_path / "d", patterns=BRATS_PATTERNS, split=split))
    assert ds.subsets == [["a"], ["a", "b"]]
    split = SplitConfig(validation_fraction=0.0, inference_fraction=0.0, subset_files=(tmp_path / "s2.csv", tmp_path / "bad.txt"))
    with pytest.raises(DataError, match="not contained"):
        Dataset.from_config(DatasetConfig(root=tmp_path / "d", patterns=BRATS_PATTERNS, split=split))


def test_no_subjects_explains_how_to_get_data(tmp_path):
    with pytest.raises(DataError, match="highres3d synth brats"):
        Dataset.from_config(DatasetConfig(root=tmp_path, patterns=BRATS_PATTERNS))
    with pytest.raises(DataError, match="dataset folder not found"):
        Dataset.from_config(DatasetConfig(root=tmp_path / "nope", patterns=BRATS_PATTERNS))


def test_write_split_csv_round_trip(tmp_path):
    splits = {"a": "training", "b": "validation", "c": "inference"}
    path = write_split_csv(splits, tmp_path / "split.csv")
    assert read_split_csv(path) == splits
