"""Experiment grids, sharding and the results table (the training itself is tested in tests/training)."""
import pytest

from highres3d import experiments
from highres3d.config import load_config
from highres3d.errors import ConfigError


def test_freeze_level_grid_matches_table_6_2():
    cfg = load_config("brats_freeze2.yaml")
    specs = experiments.freeze_level_grid(cfg)
    assert [s.name for s in specs] == ["scratch", "freeze1", "freeze2", "freeze3", "freeze4", "freeze5"]
    scratch = specs[0].config(cfg)
    assert scratch.transfer.source is None and scratch.transfer.freeze == 0
    model3 = specs[3].config(cfg)
    assert model3.transfer.freeze == 3 and model3.transfer.source == cfg.transfer.source


def test_dataset_size_grid_and_repeats():
    cfg = load_config("brats_base.yaml")
    specs = experiments.dataset_size_grid(cfg, repeats=2)
    assert len(specs) == 4 * 4 * 2
    assert specs[0].name == "S1_scratch_r0" and specs[1].name == "S1_scratch_r1"
    assert {s.seed for s in specs} == {cfg.training.seed, cfg.training.seed + 1}
    assert {s.subset for s in specs} == {1, 2, 3, 4}
    no_subsets = load_config("demo/brats.yaml")
    with pytest.raises(ConfigError, match="subset_sizes"):
        experiments.dataset_size_grid(no_subsets)


def test_select_runs_only_and_shards():
    cfg = load_config("brats_freeze2.yaml")
    specs = experiments.freeze_level_grid(cfg)
    assert [s.name for s in experiments.select_runs(specs, only=["freeze2"])] == ["freeze2"]
    shards = [experiments.select_runs(specs, shard=f"{i}/3") for i in (0, 1, 2)]
    assert sorted(s.name for shard in shards for s in shard) == sorted(s.name for s in specs)
    assert [s.name for s in shards[0]] == ["scratch", "freeze3"]
    with pytest.raises(ConfigError, match="no such run"):
        experiments.select_runs(specs, only=["freeze9"])
    with pytest.raises(ConfigError, match="I/N"):
        experiments.select_runs(specs, shard="2")
    with pytest.raises(ConfigError, match="0 <= I < N"):
        experiments.select_runs(specs, shard="3/3")


def test_experiment_tables_mean_and_sd():
    from highres3d.reporting import experiment_tables

    rows = []
    for run, freeze, dices in (("scratch", "", [0.5, 0.7]), ("freeze2", "2", [0.8, 0.8]), ("freeze3", "3", [0.9])):
        for i, dice in enumerate(dices):
            rows.append({"run": run, "freeze": freeze, "subset": "", "split": "inference", "subject": f"s{i}",
                         "class": "1", "dice": str(dice)})
    (table,) = experiment_tables(rows)
    text = str(table)
    assert "0.600 ± 0.141" in next(line for line in text.splitlines() if line.startswith("scratch"))
    assert "0.800 ± 0.000" in next(line for line in text.splitlines() if line.startswith("freeze2"))
    # One convention for a single value: its mean alone, no standard deviation.
    assert next(line for line in text.splitlines() if line.startswith("freeze3")).split()[1:] == ["0.900"]
