"""NiftyNet 0.5 file matching: candidates, ids, ambiguity, and the niftynet_search layout end to end."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from highres3d.config import config_from_dict
from highres3d.data.check import check_dataset
from highres3d.data.dataset import Dataset
from highres3d.errors import ConfigError, DataError
from highres3d.niftynet.matching import candidate_ids, match_section, strip_extension


def touch(path, shape=(4, 4, 4), value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full(shape, value, np.float32), np.eye(4)), str(path))
    return path


def test_strip_extension():
    assert strip_extension("a.b.nii.gz") == "a.b"
    assert strip_extension("x.NII.GZ") == "x"
    assert strip_extension("x.nii") == "x"
    assert strip_extension("x.tar.gz") == "x"
    assert strip_extension("noext") == "noext"


def test_candidate_ids_follow_niftynet_rules():
    # Pieces lose non-word characters ('-'), empty pieces go, the concatenation comes last.
    assert candidate_ids("IXI002-Guys-0828-T1.nii.gz", ["T1"]) == ["IXI002Guys0828"]
    assert candidate_ids("T1_sub-01_run2.nii.gz", ["T1", "run"]) == ["_sub01_", "2", "_sub01_2"]
    assert candidate_ids("sub1.nii", []) == ["sub1"]
    # Longest substring first: 'T1c' is cut whole, not as 'T1' + 'c'.
    assert candidate_ids("p7_T1c.nii.gz", ["T1", "T1c"]) == ["p7_"]


def test_match_section_filters_and_ids(tmp_path):
    for name in ["Brats_A_t1.nii.gz", "Brats_A_t1ce.nii.gz", "Brats_B_t1.nii.gz", "notes.txt"]:
        touch(tmp_path / "d" / name) if name.endswith("gz") else (tmp_path / "d" / name).write_text("x")
    (tmp_path / "d" / "sub_t1_folder").mkdir()
    match = match_section("T1", ["d"], contains=["t1"], not_contains=["t1ce"], root=tmp_path)
    assert match.files == {"Brats_A_": tmp_path / "d" / "Brats_A_t1.nii.gz", "Brats_B_": tmp_path / "d" / "Brats_B_t1.nii.gz"}
    assert match.problems == []
    # filename_removefromid replaces filename_contains as the cut.
    match = match_section("T1", ["d"], contains=["t1"], not_contains=["t1ce"], remove_from_id=["_t1"], root=tmp_path)
    assert sorted(match.files) == ["Brats_A", "Brats_B"]


def test_ambiguous_ids_are_reported_with_niftynets_outcome(tmp_path):
    touch(tmp_path / "sub1_T1.nii.gz")
    touch(tmp_path / "sub1_T1_old.nii.gz")
    touch(tmp_path / "sub2_T1.nii.gz")
    match = match_section("T1", [str(tmp_path)], contains=["T1"])
    # 'sub1_' is struck out of both files: the first has nothing left, the second becomes '_old'.
    assert match.files == {"_old": tmp_path / "sub1_T1_old.nii.gz", "sub2_": tmp_path / "sub2_T1.nii.gz"}
    assert len(match.problems) == 2
    assert any("sub1_T1.nii.gz: ambiguous subject id 'sub1_'" in p and "skipped" in p for p in match.problems)
    assert any("sub1_T1_old.nii.gz" in p and "used '_old'" in p for p in match.problems)


def test_several_folders_and_missing_folder(tmp_path):
    touch(tmp_path / "a" / "s1_T1.nii.gz")
    touch(tmp_path / "b" / "s2_T1.nii.gz")
    match = match_section("T1", ["a", "b"], contains=["_T1"], root=tmp_path)
    assert sorted(match.files) == ["s1", "s2"]
    with pytest.raises(DataError, match=r"path_to_search: folder .*nowhere not found"):
        match_section("T1", ["a", "nowhere"], contains=["_T1"], root=tmp_path)


def search_config(tmp_path, **extra):
    raw = {
        "dataset": {
            "root": str(tmp_path),
            "layout": "niftynet_search",
            "modalities": ["T1", "T2"],
            "search": {
                "T1": {"path_to_search": ["images"], "filename_contains": ["-T1"]},
                "T2": {"path_to_search": ["images"], "filename_contains": ["-T2"]},
                "label": {"path_to_search": ["labels"], "filename_contains": ["-seg"]},
            },
            **extra,
        },
        "network": {"num_classes": 2},
    }
    return config_from_dict(raw)


def make_ixi(tmp_path, subjects=("IXI002-Guys", "IXI012-HH", "IXI013-HH")):
    for sid in subjects:
        touch(tmp_path / "images" / f"{sid}-T1.nii.gz", value=1)
        touch(tmp_path / "images" / f"{sid}-T2.nii.gz", value=2)
        touch(tmp_path / "labels" / f"{sid}-seg.nii.gz", value=1)


def test_layout_joins_sections_and_uses_split_file(tmp_path):
    make_ixi(tmp_path)
    split = tmp_path / "dataset_split.csv"
    split.write_text("IXI002Guys,training\nIXI012HH, validation\nIXI013HH,inference\n")
    cfg = search_config(tmp_path, split={"file": str(split)})
    ds = Dataset.from_config(cfg.dataset)
    assert [s.id for s in ds.subjects] == ["IXI002Guys", "IXI012HH", "IXI013HH"]
    s = ds.subject("IXI012HH")
    assert s.images["T2"].name == "IXI012-HH-T2.nii.gz" and s.label.name == "IXI012-HH-seg.nii.gz"
    assert ds.splits == {"IXI002Guys": "training", "IXI012HH": "validation", "IXI013HH": "inference"}
    assert ds.problems == []


def test_data_check_lists_unmatched_and_ambiguous_files(tmp_path):
    make_ixi(tmp_path, [f"IXI0{i}-HH" for i in range(10, 20)])
    touch(tmp_path / "images" / "IXI099-X-T1.nii.gz")  # no T2 for this subject
    touch(tmp_path / "images" / "IXI012-HH-T1-T1.nii.gz")  # clashes with IXI012-HH-T1
    report = check_dataset(search_config(tmp_path), show_progress=False)
    text = report.summary()
    assert "IXI099X: no file in section(s) T2" in text
    # Both IXI012-HH T1 files lose their only candidate: both are listed, and the subject then lacks T1.
    assert text.count("ambiguous subject id 'IXI012HH'") == 2
    assert "IXI012HH: no file in section(s) T1" in text
    assert not report.ok


def test_config_checks_name_every_missing_section(tmp_path):
    raw = {"dataset": {"layout": "niftynet_search", "modalities": ["T1", "T2"],
                       "search": {"T1": {"filename_contains": ["T1"]}, "flair": {"path_to_search": ["x"]}}}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    message = str(err.value)
    assert "dataset.search.T2: no input section" in message
    assert "dataset.search.flair: not a modality" in message
    assert "dataset.search.T1.path_to_search: required" in message
