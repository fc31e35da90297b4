"""highres3d.reporting: the thesis tables and figure data from hand-made result files."""
import csv
import math

import numpy as np
import pytest

from highres3d import reporting
from highres3d.experiments import RESULT_COLUMNS
from highres3d.training.run import MetricsLog


def result_row(run, split, subject, dice, *, freeze="", subset="", subset_size=4, repeat=0, cls=1,
               iterations=100, best_iteration=60, time_to_best_s=30.0, wall_time_s=50.0):
    return {"run": run, "freeze": freeze, "subset": subset, "subset_size": subset_size, "repeat": repeat,
            "seed": repeat, "split": split, "subject": subject, "class": cls, "dice": dice, "jaccard": "",
            "hd95_mm": "", "hausdorff_mm": "", "iterations": iterations, "best_iteration": best_iteration,
            "time_to_best_s": time_to_best_s, "wall_time_s": wall_time_s}


def write_results(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def typed(rows):
    return [reporting.parse_row({k: str(v) for k, v in row.items()}) for row in rows]


@pytest.fixture
def freeze_rows():
    """scratch: one run; freeze2: two repeats whose test subjects are pooled; freeze1 listed last on purpose."""
    rows = []
    for i, dice in enumerate((0.5, 0.7)):
        rows.append(result_row("scratch", "inference", f"t{i}", dice))
    for i, dice in enumerate((0.9, 0.8, 0.7)):
        rows.append(result_row("scratch", "training", f"s{i}", dice))
    for repeat, dices in ((0, (0.8, 0.6)), (1, (0.7, 0.9))):
        for i, dice in enumerate(dices):
            rows.append(result_row(f"freeze2_r{repeat}", "inference", f"t{i}", dice, freeze=2, repeat=repeat,
                                   best_iteration=40 + 20 * repeat, time_to_best_s=10.0 + 10 * repeat))
    rows.append(result_row("freeze1", "inference", "t0", 0.4, freeze=1))
    rows.append(result_row("freeze1", "inference", "t1", "nan", freeze=1))
    return typed(rows)


def test_parse_row_types_values_and_names_the_model():
    row = reporting.parse_row({k: str(v) for k, v in result_row("freeze3", "validation", "a", "0.25", freeze=3).items()})
    assert row["freeze"] == 3 and row["model"] == "freeze3"
    assert row["dice"] == 0.25 and row["class"] == 1 and row["best_iteration"] == 60
    assert math.isnan(row["jaccard"])
    scratch = reporting.parse_row({k: str(v) for k, v in result_row("scratch", "training", "a", "nan").items()})
    assert scratch["freeze"] is None and scratch["model"] == "scratch" and math.isnan(scratch["dice"])


def test_load_experiment_reads_every_shard(tmp_path):
    write_results(tmp_path / "results.1of2.csv", [result_row("scratch", "inference", "a", 0.5)])
    write_results(tmp_path / "results.2of2.csv", [result_row("freeze1", "inference", "a", 0.75, freeze=1)])
    exp = reporting.load_experiment(tmp_path)
    assert sorted(exp.runs) == ["freeze1", "scratch"]
    assert exp.models == ["scratch", "freeze1"]
    assert exp.subsets == []
    assert sorted(r["dice"] for r in exp.rows) == [0.5, 0.75]


def test_missing_results_raise_and_notebooks_get_a_message(tmp_path, capsys):
    with pytest.raises(reporting.ResultsNotFound, match="no such experiment folder"):
        reporting.load_experiment(tmp_path / "absent")
    write_results(tmp_path / "results.csv", [])
    with pytest.raises(reporting.ResultsNotFound, match="no results"):
        reporting.load_experiment(tmp_path)
    assert reporting.open_experiment(tmp_path / "absent", "freeze-levels") is None
    message = capsys.readouterr().out
    assert "highres3d demo" in message and "highres3d experiment freeze-levels" in message
    assert reporting.open_experiment(tmp_path / "absent", "dataset-size") is None
    assert "highres3d experiment dataset-size" in capsys.readouterr().out


def test_relative_results_are_found_from_the_notebooks_folder(tmp_path, monkeypatch):
    (tmp_path / "demo_output" / "exp").mkdir(parents=True)
    (tmp_path / "notebooks").mkdir()
    write_results(tmp_path / "demo_output" / "exp" / "results.csv", [result_row("scratch", "inference", "a", 0.5)])
    monkeypatch.chdir(tmp_path / "notebooks")
    exp = reporting.load_experiment("demo_output/exp")
    assert exp.folder.resolve() == (tmp_path / "demo_output" / "exp").resolve()
    monkeypatch.chdir(tmp_path)
    assert reporting.load_experiment("demo_output/exp").folder == reporting.resolve_results("demo_output/exp")


def test_summary_mean_sd_and_missing_values():
    s = reporting.Summary.of([0.5, 0.7, math.nan, math.inf])
    assert s.n == 2 and s.missing == 2
    assert s.mean == pytest.approx(0.6) and s.sd == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert str(s) == "0.600 ± 0.141"
    one = reporting.Summary.of([0.25])
    assert one.n == 1 and math.isnan(one.sd) and str(one) == "0.250"
    assert str(reporting.Summary.of([math.nan])) == "–"
    assert reporting.Summary.of([1234.4, 1236.6], digits=0).format() == "1236 ± 2"


def test_dice_table_pools_repeats_orders_models_and_skips_nan(freeze_rows):
    table = reporting.dice_table(freeze_rows)
    assert [line[0] for line in table.rows] == ["scratch", "freeze1", "freeze2"]
    assert table.header == ["model", "training (n=0–3)", "test (n=1–4)"]
    assert str(table.rows[0][2]) == "0.600 ± 0.141"
    assert str(table.rows[0][1]) == "0.800 ± 0.100"
    pooled = table.rows[2][2]
    assert pooled.n == 4 and pooled.mean == pytest.approx(0.75)
    assert pooled.sd == pytest.approx(np.std([0.8, 0.6, 0.7, 0.9], ddof=1))
    assert str(table.rows[1][2]) == "0.400" and table.rows[1][2].missing == 1
    assert str(table.rows[1][1]) == "–"
    assert any("1 undefined value" in note for note in table.notes)
    assert table.cell("freeze2", "test") is pooled and table.cell("freeze2", "test (n=1–4)") is pooled
    text = table.to_text()
    assert "0.750 ± 0.129" in text and "test (n=1–4)" in text


def test_dice_table_and_box_plot_values_per_subset_and_class():
    rows = typed([
        result_row("scratch", "inference", "a", 0.2),
        result_row("S1_scratch", "inference", "a", 0.4, subset="S1", subset_size=2),
        result_row("S1_scratch", "inference", "b", 0.6, subset="S1", subset_size=2),
        result_row("S2_scratch", "inference", "a", 0.9, subset="S2", subset_size=4),
    ])
    assert str(reporting.dice_table(rows).rows[0][1]) == "0.200"
    assert str(reporting.dice_table(rows, subset="S1").rows[0][1]) == "0.500 ± 0.141"
    assert "subset S2" in reporting.dice_table(rows, subset="S2").title
    # Without rows lacking a subset, everything is pooled rather than showing nothing.
    only_subsets = [r for r in rows if r["subset"]]
    assert reporting.dice_table(only_subsets).rows[0][1].n == 3
    values = reporting.metric_values(rows, split="inference", subset="S1")
    np.testing.assert_allclose(values["scratch"], [0.4, 0.6])

    two_classes = typed([result_row("scratch", "inference", "a", 0.2, cls=1),
                         result_row("scratch", "inference", "a", 0.8, cls=2)])
    with pytest.raises(ValueError, match="cls="):
        reporting.dice_table(two_classes)
    assert str(reporting.dice_table(two_classes, cls=2).rows[0][1]) == "0.800"


def test_best_iteration_table_is_per_run(freeze_rows):
    table = reporting.best_iteration_table(freeze_rows)
    assert table.cell("freeze2", "runs") == 2
    best = table.cell("freeze2", "best iteration")
    assert best.mean == 50 and best.n == 2 and str(best) == "50 ± 14"
    assert str(table.cell("freeze2", "time to best (s)")) == "15.0 ± 7.1"
    assert str(table.cell("scratch", "iterations")) == "100"


def test_dice_and_run_columns_by_training_set_size():
    rows = []
    for subset, size, dices, best in (("S1", 2, (0.3, 0.5), 20), ("S2", 4, (0.6, 0.8), 80)):
        for model, freeze in (("scratch", ""), ("freeze1", 1)):
            for i, dice in enumerate(dices):
                rows.append(result_row(f"{subset}_{model}", "inference", f"t{i}", dice + (0.1 if freeze else 0),
                                       freeze=freeze, subset=subset, subset_size=size, best_iteration=best))
            rows.append(result_row(f"{subset}_{model}", "validation", "v", 0.0, freeze=freeze, subset=subset,
                                   subset_size=size, best_iteration=best))
    rows = typed(rows)
    curves = reporting.dice_by_size(rows, split="inference")
    assert list(curves) == ["scratch", "freeze1"]
    scratch = curves["scratch"]
    assert scratch.subsets == ["S1", "S2"] and scratch.sizes.tolist() == [2, 4]
    np.testing.assert_allclose(scratch.mean, [0.4, 0.7])
    np.testing.assert_allclose(scratch.sd, [np.std([0.3, 0.5], ddof=1)] * 2)
    np.testing.assert_allclose(curves["freeze1"].mean, [0.5, 0.8])
    assert scratch.n.tolist() == [2, 2]
    best = reporting.runs_by_size(rows, "best_iteration")["freeze1"]
    assert best.mean.tolist() == [20, 80] and best.n.tolist() == [1, 1]


def write_metrics(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(path)
    for iteration, values in rows:
        log.log(iteration, values)
    log.flush()


def test_loss_curves_read_every_run_in_results_order(tmp_path):
    write_results(tmp_path / "results.csv", [result_row("scratch", "inference", "a", 0.5),
                                             result_row("freeze1", "inference", "a", 0.5, freeze=1)])
    write_metrics(tmp_path / "runs" / "freeze1" / "metrics.csv", [
        (1, {"loss": 0.9, "lr": 1e-4, "wall_time": 1.0}),
        (2, {"loss": 0.8, "lr": 1e-4, "wall_time": 2.0, "val_loss": 0.85, "val_window_dice": 0.1}),
        (3, {"loss": 0.7, "lr": 1e-4, "wall_time": 3.0}),
        (4, {"loss": 0.6, "lr": 1e-4, "wall_time": 4.0, "val_loss": 0.65, "val_window_dice": 0.3,
             "val_volume_dice": 0.25}),
    ])
    write_metrics(tmp_path / "runs" / "scratch" / "metrics.csv", [(1, {"loss": 1.0, "lr": 1e-4, "wall_time": 1.0})])
    curves = reporting.loss_curves(tmp_path)
    assert list(curves) == ["scratch", "freeze1"]
    run = curves["freeze1"]
    assert run["loss"].iteration.tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(run["val_loss"].value, [0.85, 0.65])
    assert run["val_volume_dice"].iteration.tolist() == [4]
    assert "val_loss" not in curves["scratch"] and len(curves["scratch"]["val_loss"]) == 0
    exp = reporting.load_experiment(tmp_path)
    assert list(exp.loss_curves()) == ["scratch", "freeze1"]


def test_smooth_is_tensorboards_debiased_moving_average():
    values = np.array([1.0, 0.0, 0.0])
    np.testing.assert_allclose(reporting.smooth(values, 0.0), values)
    np.testing.assert_allclose(reporting.smooth([2.0] * 5, 0.9), [2.0] * 5)
    smoothed = reporting.smooth(values, 0.5)
    # EMA 0.5, 0.25, 0.125 debiased by 1 - 0.5^t
    np.testing.assert_allclose(smoothed, [1.0, 0.25 / 0.75, 0.125 / 0.875])
    with pytest.raises(ValueError):
        reporting.smooth(values, 1.0)


def test_table_renders_as_text_markdown_csv_and_html(tmp_path):
    table = reporting.Table("T <1>", ["model", "test"], [["scratch", reporting.Summary.of([0.5, 0.7])]], ["a note"])
    assert table.cell("scratch", "test").n == 2
    with pytest.raises(KeyError):
        table.cell("freeze9", "test")
    assert "| scratch | 0.600 ± 0.141 |" in table.to_markdown()
    assert "|---|---:|" in table.to_markdown()
    assert table.to_text().splitlines()[-1] == "a note"
    assert "&lt;1&gt;" in table._repr_html_() and "<td>0.600 ± 0.141</td>" in table._repr_html_()
    with open(table.to_csv(tmp_path / "t.csv"), newline="") as handle:
        assert list(csv.reader(handle)) == [["model", "test"], ["scratch", "0.600 ± 0.141"]]


def test_table_6_1_and_frozen_parameters_per_level():
    from highres3d.models import HighResNet3D

    model = HighResNet3D(2, 2)
    table = reporting.parameters_table(model)
    groups = [line[0] for line in table.rows]
    checkpoint = [table.cell(g, "NiftyNet checkpoint") for g in groups]
    assert checkpoint == [964, 42_060, 153_132, 610_380, 5_602, 174, 812_312]
    assert checkpoint == [table.cell(g, "thesis Table 6.1") for g in groups]
    assert table.cell("total", "trainable") == 809_380
    levels = reporting.frozen_by_level(model)
    assert [line[2] for line in levels.rows] == [896, 42_560, 194_976, 803_936, 809_216]
    assert levels.cell("L5", "still trainable") == 164
    assert sum(int(np.prod(v.shape)) for v in model.trainable_weights) == 809_380
