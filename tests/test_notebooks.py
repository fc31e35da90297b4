"""The notebooks in notebooks/ run end to end on the results of a tiny real experiment.

The session fixture synthesizes small IXI-like and BraTS-like sets, pretrains a
source model on IXI and runs a freeze-level grid (scratch, freeze 1) and a
dataset-size grid (S1, S2 × scratch, freeze 1) through the real trainer,
inference and evaluation, with 2 iterations per run: only the plumbing from
results to tables and figures is under test, not the Dice values.
"""
import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

TINY = [
    "network.width_multiplier=0.25",
    "sampler.window_size=[16,16,16]",
    "inference.mode=whole_volume",  # one pass per volume: the cheapest whole-volume evaluation
    "training.max_iter=2",
    "training.validation_every=2",
    "training.checkpoint_every=2",
    "training.validation_windows=2",
    "augmentation.rotation_degrees=0",
    "augmentation.scaling_percent=0",
]


@pytest.fixture(scope="session")
def tiny_experiments(tmp_path_factory):
    from highres3d import experiments
    from highres3d.config import load_config
    from highres3d.data.synth import synthesize_brats, synthesize_ixi
    from highres3d.training import train

    root = tmp_path_factory.mktemp("tiny_experiment")
    synthesize_brats(root / "brats", 6, size="small", seed=0)
    synthesize_ixi(root / "ixi", 4, size="small", seed=0)
    quiet = dict(show_progress=False, echo=lambda text: None)
    ixi = load_config("demo/ixi.yaml", overrides=TINY + [f"training.output_dir={root / 'runs'}"], data_root=root / "ixi")
    train(ixi, root / "source", **quiet)
    cfg = load_config(
        "demo/brats.yaml",
        overrides=TINY + [f"transfer.source={root / 'source'}", "transfer.freeze=1", "dataset.split.subset_sizes=[1,2]",
                          f"training.output_dir={root / 'runs'}"],
        data_root=root / "brats",
    )
    freeze = root / "freeze_levels"
    size = root / "dataset_size"
    experiments.run_experiment(cfg, experiments.freeze_level_grid(cfg, levels=("scratch", 1)), freeze, **quiet)
    experiments.run_experiment(cfg, experiments.dataset_size_grid(cfg, levels=("scratch", 1)), size, **quiet)
    return {"freeze-levels": freeze, "dataset-size": size, "root": root}


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory):
    """A ``python3`` kernelspec that starts this interpreter, whatever the machine's default spec says."""
    path = tmp_path_factory.mktemp("kernels")
    spec = path / "python3"
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (highres3d tests)",
        "language": "python",
    }))
    return path


def execute(name, kernel_dir, cwd, monkeypatch, results):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    monkeypatch.setenv("HIGHRES3D_RESULTS", str(results))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the inline backend turns figures into image outputs
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    client = nbclient.NotebookClient(notebook, km=km, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    assert km.kernel_spec.argv[0] == sys.executable
    return notebook


def texts(notebook):
    out = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                out.append(output.text)
            elif output.output_type in ("display_data", "execute_result"):
                out.append(output.data.get("text/plain", ""))
    return "\n".join(out)


def images(notebook):
    return sum("image/png" in o.get("data", {}) for cell in notebook.cells for o in cell.get("outputs", []))


@pytest.mark.parametrize("name", ["table_6_1_parameters", "freeze_levels", "dataset_size", "transfer_methods"])
def test_notebooks_are_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs before committing"


def test_table_6_1_notebook(kernel_dir, tmp_path, monkeypatch):
    notebook = execute("table_6_1_parameters", kernel_dir, tmp_path, monkeypatch, tmp_path / "unused")
    text = texts(notebook)
    assert "Table 6.1 reproduced: NiftyNet checkpoint total 812,312" in text
    for figure in ("964", "42,060", "153,132", "610,380", "5,602", "174", "809,380", "809,216"):
        assert figure in text


def test_freeze_levels_notebook(tiny_experiments, kernel_dir, tmp_path, monkeypatch):
    from highres3d import reporting

    folder = tiny_experiments["freeze-levels"]
    notebook = execute("freeze_levels", kernel_dir, tmp_path, monkeypatch, folder)
    text = texts(notebook)
    expected = reporting.dice_table(reporting.load_experiment(folder).rows)
    assert "Table 6.2" in text
    for model in ("scratch", "freeze1"):
        line = next(l for l in text.splitlines() if l.startswith(model + " "))
        assert str(expected.cell(model, "test")) in line
    assert "best iteration" in text
    assert images(notebook) == 2
    report = folder / "report"
    for name in ("table_6_2.md", "table_6_2.csv", "fig_6_8_loss_curves.png", "fig_6_9_dice_boxplots.png",
                 "best_iteration.md"):
        assert (report / name).stat().st_size > 0, name
    assert "| scratch |" in (report / "table_6_2.md").read_text()


def test_dataset_size_notebook(tiny_experiments, kernel_dir, tmp_path, monkeypatch):
    folder = tiny_experiments["dataset-size"]
    notebook = execute("dataset_size", kernel_dir, tmp_path, monkeypatch, folder)
    text = texts(notebook)
    assert "Table 6.3" in text and "S1, 1 training subject(s)" in text
    assert "Table 6.4" in text and "S2, 2 training subject(s)" in text
    assert "Table 6.5" not in text
    assert "S1 freeze1" in text and "S2 scratch" in text
    assert images(notebook) == 2
    for name in ("table_6_3.md", "table_6_4.csv", "dice_vs_training_size.png", "time_to_best_by_size.png"):
        assert (folder / "report" / name).stat().st_size > 0, name


@pytest.mark.parametrize("name,command", [("freeze_levels", "highres3d demo"),
                                          ("dataset_size", "highres3d experiment dataset-size")])
def test_notebooks_explain_missing_results(name, command, kernel_dir, tmp_path, monkeypatch):
    notebook = execute(name, kernel_dir, tmp_path, monkeypatch, tmp_path / "no_experiment_here")
    text = texts(notebook)
    assert "No experiment results" in text and command in text
    assert images(notebook) == 0
    assert not (tmp_path / "no_experiment_here").exists()


def test_dataset_size_notebook_needs_subsets(tiny_experiments, kernel_dir, tmp_path, monkeypatch):
    notebook = execute("dataset_size", kernel_dir, tmp_path, monkeypatch, tiny_experiments["freeze-levels"])
    text = texts(notebook)
    assert "not a dataset-size experiment" in text and "highres3d experiment dataset-size" in text
    assert images(notebook) == 0 and "Table 6.3" not in text


@pytest.fixture(scope="session")
def tiny_transfer_methods(tmp_path_factory):
    """A transfer-methods grid (scratch, discriminative, dual-stage) x 2 seeds, 2 iterations each."""
    from highres3d import experiments
    from highres3d.config import load_config
    from highres3d.data.synth import synthesize_brats, synthesize_ixi
    from highres3d.training import train

    root = tmp_path_factory.mktemp("tiny_transfer_methods")
    synthesize_brats(root / "brats", 5, size="small", seed=0)
    synthesize_ixi(root / "ixi", 3, size="small", seed=0)
    quiet = dict(show_progress=False, echo=lambda text: None)
    tiny = TINY + ["training.checkpoint_every=1", f"training.output_dir={root / 'runs'}"]
    train(load_config("demo/ixi.yaml", overrides=tiny, data_root=root / "ixi"), root / "source", **quiet)
    cfg = load_config("demo/transfer_methods.yaml", overrides=tiny + [f"transfer.source={root / 'source'}"],
                      data_root=root / "brats")
    folder = root / "transfer_methods"
    grid = experiments.transfer_methods_grid(cfg, ["scratch", "discriminative", "dual_stage"], repeats=2)
    experiments.run_experiment(cfg, grid, folder, **quiet)
    return folder


def test_transfer_methods_notebook(tiny_transfer_methods, kernel_dir, tmp_path, monkeypatch):
    from highres3d import experiments, reporting

    folder = tiny_transfer_methods
    exp = reporting.load_experiment(folder)
    assert exp.models == ["scratch", "discriminative", "dual_stage"] and len(exp.runs) == 6
    # demo/transfer_methods.yaml has evaluation.splits [inference]: only the test subjects were segmented
    rows = experiments.read_results(folder)
    assert {row["split"] for row in rows} == {"inference"} and all(row["subset_size"] == "3" for row in rows)
    assert not (folder / "predictions" / "scratch_r0" / "training").exists()
    table = reporting.transfer_methods_table(exp)
    assert [line[0] for line in table.rows] == ["scratch", "discriminative", "dual_stage"]
    assert all(line[-1] == 2 for line in table.rows) and table.cell("scratch", "test Dice").n == 2
    curves = reporting.method_curves(exp)
    assert list(curves["dual_stage"].iteration) == [1, 2] and curves["dual_stage"].runs == 2
    notebook = execute("transfer_methods", kernel_dir, tmp_path, monkeypatch, folder)
    text = texts(notebook)
    assert "transfer methods: test Dice and convergence" in text and "dual_stage" in text
    assert images(notebook) == 1
    for name in ("transfer_methods.md", "transfer_methods.csv", "transfer_methods_curves.png"):
        assert (folder / "report" / name).stat().st_size > 0, name
