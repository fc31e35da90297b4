"""``highres3d demo`` end to end, shrunk to seconds (tiny windows, a narrow net, 2 iterations)."""
import csv

from highres3d.cli.main import main

QUICK = [
    "--set", "sampler.window_size=[16,16,16]",
    "--set", "network.width_multiplier=0.25",
    "--set", "training.validation_every=2",
    "--set", "training.checkpoint_every=2",
    "--set", "inference.window_size=[32,32,32]",
]


def test_demo_runs_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "-o", str(out), "--iterations", "2", "--train-source", "--ixi-subjects", "4", "--brats-subjects", "6",
            "--no-progress"] + QUICK
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "scratch" in printed and "freeze2" in printed and "dice per subject" in printed
    with open(out / "brats_experiment" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["run"] for r in rows} == {"scratch", "freeze2"}
    assert {r["split"] for r in rows} == {"training", "validation", "inference"}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows if r["dice"] != "nan")
    test_subjects = {r["subject"] for r in rows if r["split"] == "inference"}
    for subject in test_subjects:
        assert (out / "brats_experiment" / "predictions" / "freeze2" / "inference" / f"{subject}_seg.nii.gz").exists()
        assert (out / "overlays" / f"{subject}.png").exists()  # truth, scratch, freeze2 on the same slices
    assert (out / "overlays" / "test_dice.png").exists()
    # the fine-tuned run started from the source model and froze conv_0 + res_1
    assert (out / "runs" / "ixi_source" / "best.keras").exists()
    config = (out / "brats_experiment" / "runs" / "freeze2" / "config.yaml").read_text()
    assert "freeze: 2" in config and "ixi_source" in config
    # a second run reuses everything
    assert main(args) == 0
    assert "already in the results, skipped" in capsys.readouterr().out


def test_demo_fine_tunes_from_the_shipped_preset(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "-o", str(out), "--iterations", "2", "--brats-subjects", "6", "--no-progress",
            "--set", "sampler.window_size=[16,16,16]", "--set", "training.validation_every=2",
            "--set", "training.checkpoint_every=2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "the preset ixi_hippocampus_demo" in printed
    # Every weight came from the preset (same width), and no IXI-like data or source run was made.
    assert "105 of 105 weights copied" in printed
    assert not (out / "data" / "ixi").exists() and not (out / "runs").exists()
    config = (out / "brats_experiment" / "runs" / "freeze2" / "config.yaml").read_text()
    assert "source: preset:ixi_hippocampus_demo" in config
