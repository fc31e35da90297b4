"""``highres3d demo``: the transfer-learning study in miniature, on synthetic data, on a CPU, in minutes.

1. synthesize a small BraTS-like (target) set;
2. take the 3D source model (hippocampus, T1+T2) from the shipped preset
   ``ixi_hippocampus_demo`` (``highres3d models list``), or with
   ``train_source`` pretrain one here on a small IXI-like set; the 2D source
   of ``inflated_center`` is always the shipped preset
   ``ixi_hippocampus_2d_demo`` (the same task learnt slice by slice), also
   with ``train_source``: a second source training would not fit the
   demo's time budget;
3. on the target (tumour core, T1+T2), train every method of :data:`METHODS`
   (from scratch; fine-tuned with the first two layer groups frozen; and the
   best method of the transfer-methods experiment, docs/transfer.md:
   fine-tuning a 3D network inflated from the 2D source, each 2D kernel put
   in the centre slice of its 3D kernel) on a small training subset and on the
   whole training split, with :data:`SEEDS` training seeds each (same data
   split): 18 trainings, dealt to ``workers`` processes (two on a machine with
   two or more CPUs);
4. segment the test subjects on their original grid, score them, and print one
   table: mean ± sd test Dice per cell, the best-checkpoint iteration and the
   iterations each run needed to reach 90 % of scratch's best validation Dice;
   write one overlay PNG per test subject (truth and every model on the same
   slices through the tumour centre) and a dot plot of the Dice per method and seed.

The grid is :func:`highres3d.experiments.transfer_methods_grid` run by
:func:`highres3d.experiments.run_experiment`, so everything goes below one
output folder and a second run resumes what is missing (finished runs are
reused, whatever options the second run has, ``workers`` included).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from highres3d.config import Config, load_config
from highres3d.progress import count_noun

#: The preset the demo fine-tunes from unless it is asked to train its own source.
SOURCE_PRESET = "ixi_hippocampus_demo"
#: The 2D preset the inflated methods start from (with ``train_source`` too).
SOURCE_2D_PRESET = "ixi_hippocampus_2d_demo"
#: The methods the demo compares (names of :data:`highres3d.experiments.TRANSFER_METHODS`), in table
#: order: from scratch; fine-tuning with conv_0 and res_1 frozen (the thesis' best freeze level);
#: and ``inflated_center``, the best of the transfer-methods grid of docs/transfer.md (0.488 ± 0.083
#: test Dice against scratch's 0.241).  Add a method here (or pass ``--methods``) to put it in the demo.
METHODS: tuple[str, ...] = ("scratch", "freeze2", "inflated_center")
#: Training seeds per cell of the grid (``training.seed``, ``+1``, ...); the data split stays the same.
SEEDS = 3
#: The target config: demo/brats.yaml cut to the demo's time budget (window, iterations, early stopping).
TARGET_CONFIG = "demo/brats_fast.yaml"
#: ``quick``: a smoke run of the whole pipeline in about a minute; the figures mean nothing.
QUICK_OVERRIDES: tuple[str, ...] = (
    "sampler.window_size=[16,16,16]",
    "training.max_iter=4",
    "training.validation_every=2",
    "training.checkpoint_every=2",
    "training.patience=0",
    "dataset.split.subset_sizes=[2]",
)
QUICK_SUBJECTS = 8


def training_precision() -> str:
    """The demo's training precision: ``"bfloat16"`` where the compute device has native bfloat16, else ``"float32"``.

    The rule is :func:`highres3d.inference.resolve_precision`'s ``"auto"``
    (a CPU with AVX512_BF16 or AMX; with a GPU, compute capability 8.0+).  On
    such a CPU a demo training step took 0.34 s in bfloat16 against 0.52 s in
    float32 (two workers of one thread each), which is what brings 18
    trainings within the demo's ten minutes; elsewhere bfloat16 is emulated
    and slower.  ``--set training.mixed_precision=false`` trains in float32
    anyway.
    """
    from highres3d.inference import resolve_precision

    return resolve_precision("auto")


@dataclass
class DemoResult:
    """What :func:`run_demo` made.

    Attributes:
        output: the demo folder.
        table: the comparison table (:func:`highres3d.reporting.transfer_methods_table`).
        rows: the result rows of the demo's runs (``results*.csv``, one file per worker).
        seconds: wall time of this call.
        overlays: the PNGs written (one per test subject, then the dot plot).
    """

    output: Path
    table: object
    rows: list
    seconds: float
    overlays: list


def _configs(output: Path, common: list[str], source: str) -> tuple[Config, Config]:
    source_cfg = load_config("demo/ixi.yaml", overrides=common, data_root=output / "data" / "ixi")
    target = load_config(TARGET_CONFIG, overrides=[f"transfer.source={source}"] + common,
                         data_root=output / "data" / "brats")
    return source_cfg, target


def run_demo(
    output: str | Path = "demo_output",
    *,
    ixi_subjects: int = 8,
    brats_subjects: Optional[int] = None,
    iterations: Optional[int] = None,
    seed: int = 0,
    seeds: Optional[int] = None,
    methods: Sequence[str] = METHODS,
    overrides: Optional[list[str]] = None,
    echo: Callable[[str], None] = print,
    show_progress: Optional[bool] = None,
    train_source: bool = False,
    quick: bool = False,
    workers: Optional[int] = None,
) -> DemoResult:
    """Run the demo into ``output``; returns the comparison table and where things are.

    Args:
        output: the demo folder (data, runs, results, overlays).
        ixi_subjects: synthetic IXI-like subjects for ``train_source``.
        brats_subjects: synthetic BraTS-like subjects (default 20; 8 with ``quick``).
        iterations: ``training.max_iter`` of every training (default: the configs').
        seed: seed of the synthesis and the first training seed.
        seeds: training seeds per cell (default :data:`SEEDS`; 1 with ``quick``).
        methods: the methods compared (default :data:`METHODS`).
        overrides: further ``key=value`` settings of both configs.
        echo: where the messages go.
        show_progress: progress display (``None``: a bar on a terminal, plain
            lines elsewhere; ``False``: none).
        train_source: train the 3D source model here instead of using
            :data:`SOURCE_PRESET` (the inflated methods keep :data:`SOURCE_2D_PRESET`).
        quick: a smoke run (:data:`QUICK_OVERRIDES`, fewer subjects, one seed).
        workers: trainings run at a time, in worker processes
            (:func:`highres3d.experiments.run_experiment`); default
            :func:`default_workers`.

    Raises:
        ConfigError: for an unknown method, a bad override or ``workers`` below 1.
    """
    from highres3d import experiments, reporting
    from highres3d.data.synth import synthesize
    from highres3d.inference import native_bfloat16
    from highres3d.presets import get_preset
    from highres3d.training import train
    from highres3d.training.run import RunFolder
    from highres3d.workers import check_workers

    start = time.perf_counter()
    workers = default_workers() if workers is None else workers
    check_workers(workers)
    output = Path(output).resolve()
    precision = training_precision()
    # Later settings win: the explicit options and --set over --quick's and the precision's.
    common = ((list(QUICK_OVERRIDES) if quick else [])
              + [f"training.mixed_precision={'bfloat16' if precision == 'bfloat16' else 'false'}", f"training.seed={seed}"]
              + ([f"training.max_iter={iterations}"] if iterations else []) + list(overrides or []))
    seeds = seeds or (1 if quick else SEEDS)
    brats_subjects = brats_subjects or (QUICK_SUBJECTS if quick else 20)
    source_dir = output / "runs" / "ixi_source"
    source = str(source_dir) if train_source else f"preset:{SOURCE_PRESET}"
    inflated = [m for m in methods if m in experiments.INFLATED_METHODS]
    # Fail now, not after the synthesis.
    for name in ([] if train_source else [SOURCE_PRESET]) + ([SOURCE_2D_PRESET] if inflated else []):
        get_preset(name).verify()
    source_cfg, target_cfg = _configs(output, common, source)
    # Checked before anything is written: unknown methods and a missing subset stop here.
    specs = experiments.transfer_methods_grid(target_cfg, list(methods), repeats=seeds, subsets=(1, None),
                                              source_2d=f"preset:{SOURCE_2D_PRESET}" if inflated else None)

    dtype = target_cfg.training.compute_dtype
    echo(f"training precision: {dtype}" + (
        f" ({native_bfloat16()[1]}; --set training.mixed_precision=false trains in float32)"
        if dtype == "bfloat16" else ""))
    echo(f"== 1/4 synthetic data -> {output / 'data'}")
    sets = [("brats", brats_subjects)] + ([("ixi", ixi_subjects)] if train_source else [])
    for kind, n in sets:
        folder = output / "data" / kind
        if (folder / "synth_manifest.json").exists():
            echo(f"   {kind}: already there")
        else:
            synthesize(kind, folder, n, size="small", seed=seed, show_progress=show_progress)
            echo(f"   {kind}: {n} subjects")

    if train_source:
        echo("== 2/4 source model: hippocampus on IXI-like T1+T2, trained here")
        train(source_cfg, source_dir, resume=RunFolder(source_dir).exists(), show_progress=show_progress,
              echo=lambda text: echo("   " + text))
    else:
        echo(f"== 2/4 source model: the preset {SOURCE_PRESET} (hippocampus on IXI-like T1+T2; "
             "highres3d models list; --train-source trains one here instead)")
    if inflated:
        echo(f"   2D source of {', '.join(inflated)}: the preset {SOURCE_2D_PRESET} (the same task on axial "
             "slices" + ("; --train-source trains the 3D source only" if train_source else "") + ")")

    small = target_cfg.dataset.split.subset_sizes[0]
    echo(f"== 3/4 target: tumour core on BraTS-like T1+T2; {', '.join(methods)} on {small} training subjects "
         f"and on all of them, {count_noun(seeds, 'seed')} each ({len(specs)} trainings, "
         f"{workers} at a time)")
    folder = output / "brats_experiment"
    rows = experiments.run_experiment(target_cfg, specs, folder, workers=workers, echo=lambda text: echo("   " + text),
                                      show_progress=show_progress)

    echo(f"== 4/4 comparison and overlays -> {output / 'overlays'}")
    names = {spec.name for spec in specs}
    exp = reporting.Experiment(folder, [reporting.parse_row(r) for r in rows if r["run"] in names])
    table = reporting.transfer_methods_table(
        exp, subset="all",
        title="tumour-core test Dice (mean ± sd over seeds) and the iterations each run needed")
    table.notes.append(f"best iteration: chosen by whole-volume validation Dice every "
                       f"{target_cfg.training.checkpoint_every} iterations; training stops after "
                       f"{target_cfg.training.patience or 'no'} validations without a better one "
                       f"(at most {target_cfg.training.max_iter} iterations)")
    overlays = _overlays(target_cfg, specs, exp, folder, output / "overlays", show_progress)
    _write_table(table, output / "results.md")
    seconds = time.perf_counter() - start
    echo("")
    echo(table.to_text())
    echo(f"\ntable: {output / 'results.md'}; results: {folder}/results*.csv; overlays and "
         f"test_dice.png: {output / 'overlays'}; {seconds / 60:.1f} min in all")
    return DemoResult(output, table, exp.rows, seconds, overlays)


def default_workers() -> int:
    """Two worker processes where two or more CPUs are available, else one.

    Measured on a 2-core machine: two processes with one thread each train
    about 1.3× as many steps per second as one process with two threads, and
    the single-threaded parts of each run (tracing, preprocessing, scoring,
    saving) overlap.
    """
    from highres3d.workers import available_cpus

    return 2 if available_cpus() >= 2 else 1


def _label(size: int, method: str) -> str:
    return f"{method}, {size} training subjects"


def _overlays(cfg: Config, specs, exp, folder: Path, out: Path, show_progress: Optional[bool] = None) -> list[Path]:
    """One PNG per test subject (truth, then each cell's first seed) and the dot plot of test Dice."""
    from highres3d.data.dataset import Dataset
    from highres3d.progress import track
    from highres3d.reporting import Summary
    from highres3d.visualize import compare_segmentations, dot_plot

    size = {row["run"]: row["subset_size"] for row in exp.rows}
    first_seed = [spec for spec in specs if spec.repeat == 0 and spec.name in size]
    # The whole training split first: its models are the ones a reader compares with the truth.
    first_seed.sort(key=lambda spec: spec.subset is not None)
    written = []
    dataset = Dataset.from_config(cfg.dataset)
    for subject in track(dataset.split("inference"), "overlays", unit="subjects", enabled=show_progress):
        if subject.label is None:
            continue
        panels = [("truth", subject.label)] + [
            (_label(size[spec.name], spec.method), folder / "predictions" / spec.name / "inference" / f"{subject.id}_seg.nii.gz")
            for spec in first_seed
        ]
        panels = [(title, path) for title, path in panels if Path(path).exists()]
        # Every row is cut through the same voxel, the centre of the true tumour.
        written.append(compare_segmentations(subject.images[cfg.dataset.modalities[0]], panels,
                                             out / f"{subject.id}.png", overwrite=True))
    dots: dict[str, list[float]] = {}
    for spec in specs:
        scores = [float(r["dice"]) for r in exp.rows if r["run"] == spec.name and r["split"] == "inference"]
        if scores:
            # One dot per seed: the run's mean over the test subjects, as in the table.
            dots.setdefault(f"{spec.method} ({size[spec.name]})", []).append(Summary.of(scores).mean)
    written.append(dot_plot(dots, out / "test_dice.png", overwrite=True,
                            title="mean test Dice per seed (red: mean over seeds); (n) = training subjects"))
    return written


def _write_table(table, path: Path) -> None:
    from highres3d.utils import atomic_path

    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(table.to_markdown())
