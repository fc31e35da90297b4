"""``highres3d demo``: the whole transfer-learning study in miniature, on synthetic data, on a CPU.

1. synthesize a small BraTS-like (target) set;
2. take the source model (hippocampus, T1+T2) from the shipped preset
   ``ixi_hippocampus_demo`` (trained on 40 synthetic IXI-like subjects until its
   validation Dice stopped improving; ``highres3d models list``), or with
   ``train_source`` pretrain one on a small IXI-like set as before;
3. on the target (tumour core, T1+T2), train from scratch and fine-tune the
   source model with its first two layer groups frozen (the thesis' Model 2);
4. segment the held-out test subjects on their original grid, evaluate, print
   the comparison table and write overlay PNGs.

Everything goes below one output folder; a second run resumes what is missing
(finished trainings and evaluations are reused).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from highres3d.config import Config, load_config


@dataclass
class DemoResult:
    output: Path
    table: str
    rows: list
    seconds: float
    overlays: list


#: The preset the demo fine-tunes from unless it is asked to train its own source.
SOURCE_PRESET = "ixi_hippocampus_demo"


def _configs(output: Path, iterations: Optional[int], seed: int, extra: list[str], source: str) -> tuple[Config, Config]:
    common = [f"training.seed={seed}"] + ([f"training.max_iter={iterations}"] if iterations else []) + extra
    source_cfg = load_config("demo/ixi.yaml", overrides=common, data_root=output / "data" / "ixi")
    target = load_config(
        "demo/brats.yaml",
        overrides=common + [f"transfer.source={source}", "transfer.freeze=2"],
        data_root=output / "data" / "brats",
    )
    return source_cfg, target


def run_demo(
    output: str | Path = "demo_output",
    *,
    ixi_subjects: int = 8,
    brats_subjects: int = 20,
    iterations: Optional[int] = None,
    seed: int = 0,
    overrides: Optional[list[str]] = None,
    echo: Callable[[str], None] = print,
    show_progress: Optional[bool] = None,
    train_source: bool = False,
) -> DemoResult:
    """Run the demo into ``output``; returns the comparison table and where things are.

    ``iterations`` overrides the demo configs' ``training.max_iter`` for every
    training; ``overrides`` are further ``key=value`` settings (e.g. a smaller
    window for a quick smoke run).  The source model is the preset
    :data:`SOURCE_PRESET`, or with ``train_source`` one trained here on
    ``ixi_subjects`` synthetic IXI-like subjects.
    """
    from highres3d import experiments, reporting
    from highres3d.data.synth import synthesize_brats, synthesize_ixi
    from highres3d.training import train
    from highres3d.training.run import RunFolder

    start = time.perf_counter()
    output = Path(output).resolve()
    extra = list(overrides or [])
    source_dir = output / "runs" / "ixi_source"
    source = str(source_dir) if train_source else f"preset:{SOURCE_PRESET}"
    if not train_source:
        from highres3d.presets import get_preset

        get_preset(SOURCE_PRESET).verify()  # fail now, not after the synthesis
    source_cfg, target_cfg = _configs(output, iterations, seed, extra, source)

    echo(f"== 1/4 synthetic data -> {output / 'data'}")
    sets = [("brats", synthesize_brats, brats_subjects)] + ([("ixi", synthesize_ixi, ixi_subjects)] if train_source else [])
    for kind, make, n in sets:
        folder = output / "data" / kind
        if (folder / "synth_manifest.json").exists():
            echo(f"   {kind}: already there")
        else:
            make(folder, n, size="small", seed=seed)
            echo(f"   {kind}: {n} subjects")

    if train_source:
        echo("== 2/4 source model: hippocampus on IXI-like T1+T2, trained here")
        train(source_cfg, source_dir, resume=RunFolder(source_dir).exists(), show_progress=show_progress,
              echo=lambda text: echo("   " + text))
    else:
        echo(f"== 2/4 source model: the preset {SOURCE_PRESET} (hippocampus on IXI-like T1+T2; "
             "highres3d models list; --train-source trains one here instead)")

    echo("== 3/4 target: tumour core on BraTS-like T1+T2, from scratch and fine-tuned with 2 groups frozen")
    folder = output / "brats_experiment"
    specs = experiments.freeze_level_grid(target_cfg, levels=("scratch", 2))
    results = experiments.run_experiment(target_cfg, specs, folder, echo=lambda text: echo("   " + text),
                                      show_progress=show_progress)

    echo(f"== 4/4 overlays -> {output / 'overlays'}")
    from highres3d.data.dataset import Dataset
    from highres3d.visualize import compare_segmentations, dot_plot

    overlays = []
    dataset = Dataset.from_config(target_cfg.dataset)
    for subject in dataset.split("inference"):
        panels = [("truth", subject.label)] + [
            (spec.name, folder / "predictions" / spec.name / "inference" / f"{subject.id}_seg.nii.gz") for spec in specs
        ]
        panels = [(name, path) for name, path in panels if path is not None and Path(path).exists()]
        # One picture per test subject: truth and each model on the same slices through the tumour centre.
        overlays.append(compare_segmentations(subject.images[target_cfg.dataset.modalities[0]], panels,
                                              output / "overlays" / f"{subject.id}.png", overwrite=True))
    mine = [r for r in results if r["run"] in {s.name for s in specs}]
    test_dice = {spec.name: [float(r["dice"]) for r in mine if r["run"] == spec.name and r["split"] == "inference"]
                 for spec in specs}
    overlays.append(dot_plot(test_dice, output / "overlays" / "test_dice.png", overwrite=True,
                             title="tumour-core test Dice per subject (red: mean)"))
    table = "\n".join(str(t) for t in reporting.experiment_tables(mine))
    seconds = time.perf_counter() - start
    echo("")
    echo("Tumour-core Dice on the synthetic BraTS-like subjects (scratch vs. fine-tuned from the IXI-like model):")
    echo(table)
    echo(f"\nresults: {folder / 'results.csv'}; overlays: {output / 'overlays'}; {seconds / 60:.1f} min in all")
    echo("notebooks: notebooks/freeze_levels.ipynb reads these results by default")
    return DemoResult(output, table, mine, seconds, overlays)
