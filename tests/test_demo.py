"""``highres3d demo`` end to end, shrunk to seconds with ``--quick`` (16³ windows, 4 iterations, 1 seed)."""
import pytest

from highres3d.cli.main import main
from highres3d.experiments import read_results


def _rows(out):
    return read_results(out / "brats_experiment")


def test_demo_runs_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    # One process, and the two methods of the 3D source trained here (the 2D preset of inflated_center
    # is twice as wide as this narrow network: nothing of it would fit).
    args = ["demo", "-o", str(out), "--quick", "--train-source", "--ixi-subjects", "4", "--brats-subjects", "6",
            "--iterations", "2", "--no-progress", "--set", "network.width_multiplier=0.25",
            "--methods", "scratch,freeze2", "--workers", "1"]
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


def test_demo_compares_three_methods_from_the_shipped_presets_in_two_workers(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from highres3d.demo import METHODS
    from highres3d.visualize import compare_segmentations

    monkeypatch.setenv("HIGHRES3D_PROGRESS_INTERVAL", "0")  # a plain line at every update
    out = tmp_path / "demo"
    assert METHODS == ("scratch", "freeze2", "inflated_center")
    assert main(["demo", "-o", str(out), "--quick", "--iterations", "2", "--brats-subjects", "6",
                 "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert "the preset ixi_hippocampus_demo" in captured.out
    assert "2D source of inflated_center: the preset ixi_hippocampus_2d_demo" in captured.out
    # freeze2: every weight from the 3D preset (same width); inflated_center: the 2D preset's 21 kernels
    # inflated, its 84 other weights (BatchNorm, PReLU) copied.
    assert "[worker 0/2]   Transfer from " in captured.out and "105 of 105 weights copied" in captured.out
    assert "84 of 105 weights copied, 21 adapted, 0 re-initialised, 0 skipped for shape" in captured.out
    assert not (out / "data" / "ixi").exists() and not (out / "runs").exists()
    experiment = out / "brats_experiment"
    runs = {"S1_scratch", "S1_freeze2", "S1_inflated_center", "scratch", "freeze2", "inflated_center"}
    assert {r["run"] for r in _rows(out)} == runs
    assert sorted(p.name for p in experiment.glob("results*.csv")) == ["results.0of2.csv", "results.1of2.csv"]
    assert "source: preset:ixi_hippocampus_demo" in (experiment / "runs" / "freeze2" / "config.yaml").read_text()
    inflated = (experiment / "runs" / "S1_inflated_center" / "config.yaml").read_text()
    # Every training computes in the precision this CPU computes fastest.
    from highres3d.demo import training_precision

    expected = "bfloat16" if training_precision() == "bfloat16" else "false"
    assert f"mixed_precision: {expected}" in inflated
    assert f"training precision: {training_precision()}" in captured.out
    assert "source: preset:ixi_hippocampus_2d_demo" in inflated and "inflate: center" in inflated
    # The workers' output is not a terminal: plain progress lines, each whole and prefixed, no bar.
    assert any(line.startswith("[worker 1/2] train: 2/2 (100%) loss") for line in captured.err.splitlines())
    assert "\r" not in captured.err
    assert "[worker 0/2] [2/3] " in captured.out and "ETA" in captured.out
    table = (out / "results.md").read_text()
    assert table.count("| inflated_center |") == 2  # the small training subset and the whole split
    # Each overlay: the truth and the six models (three methods × two training sets), one panel each.
    subjects = sorted({r["subject"] for r in _rows(out)})
    assert subjects
    for subject in subjects:
        truth = out / "data" / "brats" / subject / f"{subject}_seg.nii.gz"
        image = next((out / "data" / "brats" / subject).glob("*t1.nii.gz"))
        one = compare_segmentations(image, [("truth", truth)], tmp_path / "one.png", overwrite=True)
        panel_height = Image.open(one).size[1]
        assert Image.open(out / "overlays" / f"{subject}.png").size[1] == 7 * panel_height + 6 * 4
    # The dot plot: a row per method and training set.
    assert Image.open(out / "overlays" / "test_dice.png").size[1] == 24 + 28 * 6 + 30


def test_demo_checks_its_methods_before_it_writes_anything(tmp_path):
    from highres3d.errors import ConfigError

    with pytest.raises(ConfigError, match="fine_tune"):
        from highres3d.demo import run_demo

        run_demo(tmp_path / "demo", methods=["scratch", "fine_tune"], quick=True)
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("native", [True, False])
def test_demo_trains_in_bfloat16_only_where_the_cpu_computes_it_natively(tmp_path, monkeypatch, native):
    import highres3d.inference
    from highres3d.demo import training_precision

    monkeypatch.setattr(highres3d.inference, "_cpu_has_bfloat16", lambda: native)
    assert training_precision() == ("bfloat16" if native else "float32")
