"""``highres3d demo`` end to end, shrunk to seconds with ``--quick`` (16³ windows, 4 iterations, 1 seed)."""
import csv

import pytest

from highres3d.cli.main import main


def _rows(out):
    with open(out / "brats_experiment" / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_demo_runs_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "-o", str(out), "--quick", "--train-source", "--ixi-subjects", "4", "--brats-subjects", "6",
            "--iterations", "2", "--no-progress", "--set", "network.width_multiplier=0.25"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "the iterations each run needed" in printed and "iterations to 90% of scratch" in printed
    rows = _rows(out)
    # the grid: the small training subset S1 and the whole training split × scratch, freeze2 (one seed with --quick)
    assert {r["run"] for r in rows} == {"S1_scratch", "S1_freeze2", "scratch", "freeze2"}
    sizes = {r["run"]: int(r["subset_size"]) for r in rows}
    assert sizes["S1_scratch"] == sizes["S1_freeze2"] == 2 < sizes["scratch"] == sizes["freeze2"]
    assert {r["split"] for r in rows} == {"inference"}  # only the test subjects are segmented and scored
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows if r["dice"] != "nan")
    for subject in {r["subject"] for r in rows}:
        for run in ("S1_scratch", "S1_freeze2", "scratch", "freeze2"):
            assert (out / "brats_experiment" / "predictions" / run / "inference" / f"{subject}_seg.nii.gz").exists()
        assert (out / "overlays" / f"{subject}.png").exists()  # truth and the four models on the same slices
    assert (out / "overlays" / "test_dice.png").exists()
    table = (out / "results.md").read_text()
    assert "| scratch | 2 |" in table and "| freeze2 |" in table
    # the fine-tuned runs started from the source trained here
    assert (out / "runs" / "ixi_source" / "best.keras").exists()
    config = (out / "brats_experiment" / "runs" / "S1_freeze2" / "config.yaml").read_text()
    assert "freeze: 2" in config and "ixi_source" in config
    # a second run reuses everything
    assert main(args) == 0
    assert capsys.readouterr().out.count("already in the results, skipped") == 4


def test_demo_fine_tunes_from_the_shipped_preset_with_progress_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HIGHRES3D_PROGRESS_INTERVAL", "0")  # a plain line at every update
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--quick", "--methods", "freeze2", "--iterations", "2",
                 "--brats-subjects", "6"]) == 0
    captured = capsys.readouterr()
    assert "the preset ixi_hippocampus_demo" in captured.out
    # Every weight came from the preset (same width), and no IXI-like data or source run was made.
    assert "105 of 105 weights copied" in captured.out
    assert not (out / "data" / "ixi").exists() and not (out / "runs").exists()
    assert {r["run"] for r in _rows(out)} == {"S1_freeze2", "freeze2"}
    config = (out / "brats_experiment" / "runs" / "freeze2" / "config.yaml").read_text()
    assert "source: preset:ixi_hippocampus_demo" in config
    # Captured output is not a terminal: training reports plain progress lines, no bar.
    assert "train: 2/2 (100%) loss" in captured.err and "\r" not in captured.err
    assert "[2/2] freeze2: training (" in captured.out and "ETA" in captured.out


def test_demo_checks_its_methods_before_it_writes_anything(tmp_path):
    from highres3d.errors import ConfigError

    with pytest.raises(ConfigError, match="fine_tune"):
        from highres3d.demo import run_demo

        run_demo(tmp_path / "demo", methods=["scratch", "fine_tune"], quick=True)
    assert not (tmp_path / "demo").exists()
