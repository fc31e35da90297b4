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


def test_config_and_run_specs_pickle_for_worker_processes():
    import pickle

    cfg = load_config("demo/brats_fast.yaml")
    specs = experiments.transfer_methods_grid(cfg, ["scratch", "inflated_center"], repeats=2, subsets=(1, None),
                                              source_2d="preset:ixi_hippocampus_2d_demo")
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    again = pickle.loads(pickle.dumps(specs))
    assert again == specs and str(again[-1].source_2d) == "preset:ixi_hippocampus_2d_demo"
    assert again[-1].config(cfg) == specs[-1].config(cfg)


def test_workers_are_checked_before_anything_runs(tmp_path):
    cfg = load_config("brats_freeze2.yaml")
    specs = experiments.freeze_level_grid(cfg)
    with pytest.raises(ConfigError, match="--workers 0"):
        experiments.run_experiment(cfg, specs, tmp_path / "exp", workers=0)
    with pytest.raises(ConfigError, match="use one or the other"):
        experiments.run_experiment(cfg, specs, tmp_path / "exp", workers=2, shard="0/2")
    assert not (tmp_path / "exp").exists()


TINY = ["sampler.window_size=[16,16,16]", "network.width_multiplier=0.25", "training.max_iter=2",
        "training.batch_size=2", "training.validation_every=2", "training.checkpoint_every=2",
        "training.max_checkpoints=1", "training.validation_windows=2", "inference.window_size=[32,32,32]",
        "augmentation.device=cpu", "evaluation.splits=[inference]"]


def test_workers_train_each_run_once_name_a_failed_worker_and_resume(tmp_path):
    """Two spawned workers share a grid; one run's source is missing, so its worker fails after its other run."""
    import csv

    from highres3d.data.synth import synthesize_brats
    from highres3d.errors import WorkerError
    from highres3d.workers import available_cpus

    synthesize_brats(tmp_path / "data", 5, size="small", seed=3)
    cfg = load_config("demo/brats.yaml", overrides=TINY, data_root=tmp_path / "data")
    good = [experiments.RunSpec(name, None, None, r, r, "scratch") for r, name in enumerate(["a", "b", "c"])]
    broken = experiments.RunSpec("broken", 0, None, 0, 0, "inflated_center", source_2d=tmp_path / "no_2d_source.keras")
    folder = tmp_path / "exp"
    lines = []
    # Round robin: worker 0 gets a and c, worker 1 gets b, then fails on broken.
    with pytest.raises(WorkerError) as caught:
        experiments.run_experiment(cfg, good + [broken], folder, workers=2, echo=lines.append, show_progress=False)
    message = str(caught.value)
    assert message.startswith("worker 1/2 failed (exit code 2): ") and "no_2d_source.keras" in message
    assert "The other 1 worker finished" in message and "Run the same command again to resume" in message
    assert "worker 0/2" not in message
    files = {}
    for path in sorted(folder.glob("results*.csv")):
        with open(path, newline="") as handle:
            files[path.name] = sorted({row["run"] for row in csv.DictReader(handle)})
    assert files == {"results.0of2.csv": ["a", "c"], "results.1of2.csv": ["b"]}
    for name in "abc":  # trained once, by its own worker, to the end
        assert sum(f"] {name}: training (" in line for line in lines) == 1
        with open(folder / "runs" / name / "metrics.csv", newline="") as handle:
            assert [int(row["iteration"]) for row in csv.DictReader(handle)] == [1, 2]
    threads = max(1, available_cpus() // 2)
    assert f"[worker 0/2] {threads} CPU thread{'s' if threads > 1 else ''} (TensorFlow intra-op and inter-op)" in lines
    assert any(line.startswith("[worker 1/2] [1/2] b: training (") for line in lines)
    # The same grid without the broken run: nothing left to train, no worker started.
    lines.clear()
    rows = experiments.run_experiment(cfg, good, folder, workers=2, echo=lines.append, show_progress=False)
    assert sorted({row["run"] for row in rows}) == ["a", "b", "c"]
    assert sum("already in the results, skipped" in line for line in lines) == 3
    assert not any("worker" in line or ": training (" in line for line in lines)
