"""The transfer-methods grid: one config per method, the grid, and its table (issue 10)."""
import pytest

from highres3d import experiments
from highres3d.config import load_config
from highres3d.errors import ConfigError
from highres3d.training.stages import resolve_stages


@pytest.fixture(scope="module")
def base():
    return load_config("demo/transfer_methods.yaml", overrides=["transfer.freeze=2", "training.lr_decay=3", "training.max_iter=200"])


def test_each_method_sets_only_its_own_keys(base):
    configs = {m: experiments.method_config(base, m, source_2d="source2d.keras", source_multi_domain="md.keras")
               for m in experiments.TRANSFER_METHODS}
    assert configs["scratch"].transfer.source is None
    assert configs["finetune"].transfer.source == base.transfer.source
    # the base's transfer-method keys are reset for every method
    assert configs["finetune"].transfer.freeze == 0 and configs["finetune"].training.lr_decay is None
    assert [configs[f"freeze{k}"].transfer.freeze for k in range(1, 6)] == [1, 2, 3, 4, 5]
    assert configs["discriminative"].training.lr_decay == 2.6
    gradual = resolve_stages(configs["gradual_unfreezing"])
    assert [s.freeze for s in gradual] == [5, 4, 3, 2, 1, 0] and gradual[-1].last == base.training.max_iter
    assert [s.iterations for s in gradual] == [20, 20, 20, 20, 20, 100]
    assert configs["mean_var"].transfer.transfusion == 0 and configs["transfusion"].transfer.transfusion == 3
    for mode in ("center", "average", "scaled"):
        cfg = configs[f"inflated_{mode}"]
        assert cfg.transfer.inflate == mode and cfg.transfer.source.name == "source2d.keras"
    multi = configs["multi_domain"]
    assert multi.transfer.source.name == "md.keras" and multi.transfer.freeze == 0 and not multi.training.stages
    dual = resolve_stages(configs["dual_stage"])
    assert [(s.sampler.type, s.freeze, s.iterations) for s in dual] == [
        ("class_weighted", 0, 150), ("uniform", "all_but_last", 50)]
    assert dual[0].sampler.class_probabilities == (0.5, 0.5) and dual[1].lr == pytest.approx(base.training.lr / 10)


def test_grid_names_seeds_and_checks(base):
    specs = experiments.transfer_methods_grid(base, repeats=2)
    names = [s.name for s in specs]
    assert names[:2] == ["scratch_r0", "scratch_r1"] and "dual_stage_r1" in names
    assert not any(n.startswith("inflated") for n in names)  # no 2D source given
    assert not any(n.startswith("multi_domain") for n in names)  # no multi-domain trunk given
    assert len(specs) == 2 * (len(experiments.TRANSFER_METHODS) - 4)
    assert {s.seed for s in specs if s.method == "discriminative"} == {base.training.seed, base.training.seed + 1}
    assert specs[3].config(base).training.seed == base.training.seed + 1
    assert [s.name for s in experiments.select_runs(specs, shard="0/13")] == ["scratch_r0", "freeze5_r1"]
    with pytest.raises(ConfigError, match="--source-2d"):
        experiments.transfer_methods_grid(base, ["inflated_center"])
    with pytest.raises(ConfigError, match="--source-multi-domain"):
        experiments.transfer_methods_grid(base, ["multi_domain"])
    with_trunk = experiments.transfer_methods_grid(base, source_multi_domain="preset:some_trunk")
    cell = [s for s in with_trunk if s.method == "multi_domain"]
    assert len(cell) == 1 and str(cell[0].config(base).transfer.source) == "preset:some_trunk"
    with pytest.raises(ConfigError, match="expected one of"):
        experiments.transfer_methods_grid(base, ["fine_tune"])
    with pytest.raises(ConfigError, match="too small for six stages"):
        experiments.transfer_methods_grid(load_config("demo/transfer_methods.yaml", overrides=["training.max_iter=5"]),
                                          ["gradual_unfreezing"])


def test_cli_lists_the_grid(capsys):
    from highres3d.cli.main import main

    assert main(["experiment", "transfer-methods", "--config", "demo/transfer_methods.yaml", "--list",
                 "--methods", "scratch,dual_stage", "--repeats", "2"]) == 0
    assert capsys.readouterr().out.split() == ["scratch_r0", "scratch_r1", "dual_stage_r0", "dual_stage_r1"]


def test_grid_over_training_subsets(base):
    cfg = load_config("demo/brats_fast.yaml")
    specs = experiments.transfer_methods_grid(cfg, ["scratch", "freeze2"], repeats=2, subsets=(1, None))
    assert [s.name for s in specs] == ["S1_scratch_r0", "S1_scratch_r1", "S1_freeze2_r0", "S1_freeze2_r1",
                                       "scratch_r0", "scratch_r1", "freeze2_r0", "freeze2_r1"]
    assert [s.subset for s in specs] == [1] * 4 + [None] * 4
    # seeds change the training only; the subset is a property of the run, not of the config
    assert specs[1].config(cfg).training.seed == cfg.training.seed + 1
    assert specs[2].config(cfg).transfer.freeze == 2 and specs[0].config(cfg).transfer.source is None
    with pytest.raises(ConfigError, match="subset S2 is not defined"):
        experiments.transfer_methods_grid(cfg, ["scratch"], subsets=(2,))
    with pytest.raises(ConfigError, match="subset S1 is not defined"):
        experiments.transfer_methods_grid(base, ["scratch"], subsets=(1,))


def _fake_run(folder, run, subset, size, method, test_dice, val_curve, best):
    """One run of a transfer-methods folder: its metrics.csv and its results rows (2 test subjects)."""
    run_dir = folder / "runs" / run
    run_dir.mkdir(parents=True)
    lines = ["iteration,loss,val_volume_dice"] + [f"{10 * (i + 1)},0.5,{v}" for i, v in enumerate(val_curve)]
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    return [{"run": run, "freeze": "", "subset": subset, "subset_size": size, "repeat": 0, "seed": 0,
             "split": "inference", "subject": f"s{i}", "class": 1, "dice": d, "jaccard": "", "hd95_mm": "",
             "hausdorff_mm": "", "iterations": 10 * len(val_curve), "best_iteration": best, "time_to_best_s": "",
             "wall_time_s": "", "method": method} for i, d in enumerate(test_dice)]


def test_table_per_training_set(tmp_path):
    """subset='all': a row per training set and method, each measured against its own scratch runs."""
    import csv

    from highres3d import reporting

    rows = (_fake_run(tmp_path, "S1_scratch_r0", "S1", 3, "scratch", [0.2, 0.4], [0.1, 0.2, 0.4], 30)
            + _fake_run(tmp_path, "S1_scratch_r1", "S1", 3, "scratch", [0.4, 0.6], [0.2, 0.6, 0.5], 20)
            + _fake_run(tmp_path, "S1_freeze2_r0", "S1", 3, "freeze2", [0.6, 0.6], [0.3, 0.5, 0.45], 20)
            + _fake_run(tmp_path, "scratch_r0", "", 14, "scratch", [0.7, 0.7], [0.1, 0.8, 0.9], 30)
            + _fake_run(tmp_path, "freeze2_r0", "", 14, "freeze2", [0.8, 0.6], [0.85, 0.7, 0.7], 10))
    with open(tmp_path / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=experiments.RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = reporting.transfer_methods_table(reporting.load_experiment(tmp_path), subset="all")
    assert [line[:2] for line in table.rows] == [["scratch", 3], ["freeze2", 3], ["scratch", 14], ["freeze2", 14]]
    assert table.header[1] == "training subjects"
    test = [line[2] for line in table.rows]
    assert [round(t.mean, 3) for t in test] == [0.4, 0.6, 0.7, 0.7] and test[0].n == 2
    # S1: scratch's best validation Dice is mean(0.4, 0.6) = 0.5, threshold 0.45: scratch_r0 never reaches it,
    # scratch_r1 and freeze2 at 20; whole split: best 0.9, threshold 0.81: scratch at 30, freeze2 at 10.
    reach = [line[4] for line in table.rows]
    assert [round(r.mean) for r in reach] == [20, 20, 30, 10] and reach[0].n == 1
    assert "1 run(s) never reached it (left out of that column)" in table.notes
    assert any("(S1)" in n and "0.450" in n for n in table.notes)
    assert any("(whole training split)" in n and "0.810" in n for n in table.notes)
    # without subset: the rows of the whole training split only, as before
    assert [line[0] for line in reporting.transfer_methods_table(reporting.load_experiment(tmp_path)).rows] == [
        "scratch", "freeze2"]
