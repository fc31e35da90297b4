"""``data check`` lists every bad file with its problem and exits non-zero."""
import nibabel as nib
import numpy as np
import pytest

from highres3d.cli.main import main
from highres3d.config import load_config
from highres3d.data.check import check_dataset

CONFIG = """
dataset:
  root: data
  modalities: [T1, T2]
  patterns: {{T1: "{{subject}}/{{subject}}_t1.nii.gz", T2: "{{subject}}/{{subject}}_t2.nii.gz", label: "{{subject}}/{{subject}}_seg.nii.gz"}}
  split: {{validation_fraction: 0.0, inference_fraction: 0.0}}
preprocessing:
  labels: {{0: 0, 1: 1, 2: 0, 4: 1}}
sampler:
  window_size: [16, 16, 16]
  edge_policy: {edge}
"""


def write(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def good_subject(root, sid, shape=(20, 20, 20)):
    rng = np.random.default_rng(0)
    for mod in ("t1", "t2"):
        write(root / sid / f"{sid}_{mod}.nii.gz", rng.normal(size=shape).astype(np.float32))
    seg = np.zeros(shape, np.uint8)
    seg[5:9, 5:9, 5:9] = 4
    seg[9:12, 5:9, 5:9] = 2
    write(root / sid / f"{sid}_seg.nii.gz", seg)


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    for sid in ["ok_1", "ok_2", "nan", "truncated", "shape", "affine", "labels", "four_d", "small", "missing"]:
        good_subject(root, sid)
    bad = np.random.default_rng(1).normal(size=(20, 20, 20)).astype(np.float32)
    bad[1, 1, 1] = np.nan
    write(root / "nan" / "nan_t2.nii.gz", bad)
    blob = (root / "truncated" / "truncated_t1.nii.gz").read_bytes()
    (root / "truncated" / "truncated_t1.nii.gz").write_bytes(blob[: len(blob) // 3])
    write(root / "shape" / "shape_t2.nii.gz", np.zeros((20, 20, 19), np.float32))
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    write(root / "affine" / "affine_seg.nii.gz", np.zeros((20, 20, 20), np.uint8), shifted)
    seg = np.zeros((20, 20, 20), np.uint8)
    seg[1, 1, 1] = 3
    write(root / "labels" / "labels_seg.nii.gz", seg)
    write(root / "four_d" / "four_d_t1.nii.gz", np.zeros((20, 20, 20, 2), np.float32))
    for mod in ("t1", "t2", "seg"):
        write(root / "small" / f"small_{mod}.nii.gz", np.zeros((20, 20, 10), np.uint8 if mod == "seg" else np.float32))
    (root / "missing" / "missing_t2.nii.gz").unlink()
    return tmp_path


def make_config(tmp_path, edge="valid"):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(edge=edge))
    return path


def test_every_problem_is_listed_with_its_file(dataset):
    report = check_dataset(load_config(make_config(dataset)))
    text = "\n".join(report.problems)
    assert not report.ok
    assert "nan_t2.nii.gz: 1 voxels are NaN or Inf" in text
    assert "truncated_t1.nii.gz: truncated or corrupt file" in text
    assert "shape_t2.nii.gz: shape (20, 20, 19) differs from (20, 20, 20)" in text
    assert "affine_seg.nii.gz: affine differs" in text
    assert "labels_seg.nii.gz: label values [3] are not in preprocessing.labels" in text
    assert "four_d_t1.nii.gz: expected a 3-D volume" in text
    assert "small_t1.nii.gz: working-space shape (20, 20, 10) is smaller than the training window (16, 16, 16)" in text
    assert "missing: missing" in text and "missing_t2.nii.gz" in text
    assert not any("ok_1" in p or "ok_2" in p for p in report.problems)
    assert len(report.problems) == 8
    summary = report.summary()
    assert "8 problem(s)" in summary and "label values" in summary and "20x20x20" in summary


def test_padding_allows_small_volumes(dataset):
    report = check_dataset(load_config(make_config(dataset, edge="pad")))
    assert not any("smaller than the training window" in p for p in report.problems)


def test_cli_exit_codes_and_summary(dataset, tmp_path, capsys):
    config = make_config(dataset)
    assert main(["data", "check", str(config)]) == 1
    out = capsys.readouterr().out
    assert "splits: training 9" in out and "nan_t2.nii.gz" in out
    clean = tmp_path / "clean"
    good_subject(clean / "data", "a")
    good_subject(clean / "data", "b")
    assert main(["data", "check", str(make_config(clean))]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out and "classes after mapping" in out
    # What training will hold in RAM: 20³ voxels x (2 float32 channels + a uint8 label) a subject.
    assert "preprocessed, in RAM (float32 images, uint8 labels): training 0.1 MiB (2)\n" in out


def test_cli_config_commands(tmp_path, capsys):
    assert main(["config", "check", "brats_freeze2.yaml"]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["config", "show", "brats_freeze2.yaml"]) == 0
    shown = capsys.readouterr().out
    assert "freeze: 2" in shown and "window_size: [96, 96, 96]" in shown and "max_checkpoints: 40" in shown
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {lr: fast}\n")
    assert main(["config", "check", str(bad)]) == 2
    assert "training.lr: expected a positive number, got 'fast'" in capsys.readouterr().err
