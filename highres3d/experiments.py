"""Experiment grids: freeze levels (Table 6.2), training-set sizes (Tables 6.3-6.6), transfer methods.

An experiment is a grid of training runs derived from one config.  Each run
trains (resuming if it was interrupted), keeps its best checkpoint by
whole-volume validation Dice, then segments every training, validation and
test subject on its original grid and evaluates it.  One row per subject and
foreground class goes to ``results.csv``::

    run, freeze, subset, subset_size, repeat, seed, split, subject, class,
    dice, jaccard, hd95_mm, hausdorff_mm, iterations, best_iteration,
    time_to_best_s, wall_time_s, method

(``method`` is set by the transfer-methods grid, :func:`transfer_methods_grid`.)

A grid that is interrupted resumes where it stopped: finished runs are skipped
(their rows are already in ``results.csv``) and a half-trained run continues
from its newest checkpoint.  Each run's segmentations stay in ``predictions/<run>/<split>/``.  ``--list``, ``--only RUN`` and ``--shard i/n``
spread a grid over a cluster's job array; every shard writes its own
``results.<i>of<n>.csv`` (shards numbered from 0) so that shards never write the same file, and
:func:`read_results` reads them all.  ``workers=N`` (``--workers N``) runs N such shards as
worker processes of one call on one machine (:mod:`highres3d.workers`).
"""
from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from highres3d.config import Config
from highres3d.data.dataset import SPLITS
from highres3d.errors import ConfigError, DataError
from highres3d.progress import count_noun
from highres3d.utils import atomic_path, parse_shard

RESULT_COLUMNS = [
    "run", "freeze", "subset", "subset_size", "repeat", "seed", "split", "subject", "class",
    "dice", "jaccard", "hd95_mm", "hausdorff_mm", "iterations", "best_iteration", "time_to_best_s", "wall_time_s",
    "method",
]
SCRATCH = "scratch"
#: Table 6.2: from scratch, then the first 1..5 layer groups frozen.
FREEZE_LEVELS = (SCRATCH, 1, 2, 3, 4, 5)
#: Tables 6.3-6.6: from scratch and freeze 1, 2, 3 for each training-set size.
DATASET_SIZE_LEVELS = (SCRATCH, 1, 2, 3)
#: The transfer-methods comparison, in table order (docs/transfer.md describes each).
TRANSFER_METHODS: tuple[str, ...] = (
    SCRATCH, "finetune", "freeze1", "freeze2", "freeze3", "freeze4", "freeze5", "discriminative",
    "gradual_unfreezing", "mean_var", "transfusion", "inflated_center", "inflated_average", "inflated_scaled",
    "multi_domain", "dual_stage",
)
#: Methods that need a 2D source model (``--source-2d``).
INFLATED_METHODS: tuple[str, ...] = ("inflated_center", "inflated_average", "inflated_scaled")
#: The method that fine-tunes a multi-domain pretrained trunk (``--source-multi-domain``; Chen et al. 2019, Med3D).
MULTI_DOMAIN = "multi_domain"
#: ULMFiT's discriminative decay factor, used by ``discriminative`` and ``gradual_unfreezing``.
ULMFIT_DECAY = 2.6
#: Transfusion's copied groups in the grid: conv_0, res_1, res_2 (Mean-Var for res_3, conv_1, conv_2).
TRANSFUSION_KEEP = 3


@dataclass(frozen=True)
class RunSpec:
    """One cell (and repeat) of an experiment grid."""

    name: str
    freeze: Optional[int]  # None = from scratch (no transfer)
    subset: Optional[int]  # 1-based training subset S_k, or None for the whole training split
    repeat: int
    seed: int
    method: Optional[str] = None  # a TRANSFER_METHODS name; then ``freeze`` is only informative
    source_2d: Optional[Path] = None  # the 2D source of the inflated methods
    source_multi_domain: Optional[Path] = None  # the multi-domain trunk of the multi_domain method

    def config(self, base: Config) -> Config:
        if self.method is not None:
            cfg = method_config(base, self.method, source_2d=self.source_2d,
                                source_multi_domain=self.source_multi_domain)
            return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, seed=self.seed))
        transfer = base.transfer
        if self.freeze is None:
            transfer = dataclasses.replace(transfer, source=None, freeze=0)
        else:
            transfer = dataclasses.replace(transfer, freeze=self.freeze)
        training = dataclasses.replace(base.training, seed=self.seed)
        return dataclasses.replace(base, transfer=transfer, training=training)


def _level_name(freeze: Optional[int]) -> str:
    return SCRATCH if freeze is None else f"freeze{freeze}"


def _parse_levels(levels: Sequence) -> list[Optional[int]]:
    out = []
    for level in levels:
        if level in (None, SCRATCH):
            out.append(None)
        else:
            value = int(level)
            if not 0 <= value <= 5:
                raise ConfigError(f"freeze level {level!r}: expected 'scratch' or 0-5")
            out.append(value)
    return out


def freeze_level_grid(cfg: Config, levels: Sequence = FREEZE_LEVELS, repeats: int = 1) -> list[RunSpec]:
    """Table 6.2: scratch and each freeze level, on the whole training split."""
    return [
        RunSpec(f"{_level_name(level)}_r{r}" if repeats > 1 else _level_name(level), level, None, r, cfg.training.seed + r)
        for level in _parse_levels(levels)
        for r in range(repeats)
    ]


def dataset_size_grid(
    cfg: Config, levels: Sequence = DATASET_SIZE_LEVELS, subsets: Optional[Sequence[int]] = None, repeats: int = 1
) -> list[RunSpec]:
    """Tables 6.3-6.6: every nested training subset S_k × scratch and freeze levels."""
    n_subsets = len(cfg.dataset.split.subset_sizes) or len(cfg.dataset.split.subset_files)
    if not n_subsets:
        raise ConfigError(
            "dataset.split.subset_sizes: the dataset-size experiment needs nested training subsets "
            "(subset_sizes: [26, 52, 78, 105] or subset_files)"
        )
    subsets = list(subsets or range(1, n_subsets + 1))
    return [
        RunSpec(f"S{k}_{_level_name(level)}" + (f"_r{r}" if repeats > 1 else ""), level, k, r, cfg.training.seed + r)
        for k in subsets
        for level in _parse_levels(levels)
        for r in range(repeats)
    ]


def method_config(cfg: Config, method: str, *, source_2d: Optional[str | Path] = None,
                  source_multi_domain: Optional[str | Path] = None) -> Config:
    """The config of one transfer method, derived from a base config with a (3D) ``transfer.source``.

    Every method starts from the base with all transfer-method keys reset
    (no freezing, stages, per-group rates, Mean-Var or inflation), then sets:

    ``scratch``: no source; ``finetune``: the source, nothing frozen;
    ``freeze1`` ... ``freeze5``: the first k groups frozen; ``discriminative``:
    ``lr_decay`` 2.6; ``gradual_unfreezing``: six stages (five of a tenth of
    ``max_iter`` each with 5, 4, ... 1 groups frozen, then everything) with
    ``lr_decay`` 2.6; ``mean_var``: ``transfusion: 0``; ``transfusion``:
    ``transfusion: 3``; ``inflated_<mode>``: the 2D source, ``inflate: <mode>``;
    ``multi_domain``: the multi-domain pretrained trunk as the source (its
    ``conv_2`` fresh), nothing frozen, as ``finetune``;
    ``dual_stage``: three quarters of ``max_iter`` on class-balanced windows,
    then a quarter on uniform windows with all but ``conv_2`` frozen at a
    tenth of the rate.

    Args:
        cfg: the base config (its ``transfer.source`` is the 3D source).
        method: one of :data:`TRANSFER_METHODS`.
        source_2d: the 2D source model (run folder or ``.keras``) of the inflated methods.
        source_multi_domain: the multi-domain pretrained model (run folder of a
            ``datasets:`` config, its ``.keras`` or ``preset:NAME``) of ``multi_domain``.

    Raises:
        ConfigError: for an unknown method, a missing source, or a ``max_iter``
            too small for the method's stages.
    """
    from highres3d.config import config_from_dict, to_dict
    from highres3d.training.stages import dual_stage, gradual_unfreezing

    if method not in TRANSFER_METHODS:
        raise ConfigError(f"transfer method {method!r}: expected one of {', '.join(TRANSFER_METHODS)}")
    raw = to_dict(cfg)
    t, tr = raw["training"], raw["transfer"]
    t.update(stages=[], lr_decay=None, lr_multipliers={})
    tr.update(freeze=0, mean_var=[], transfusion=None, inflate=None, inflate_alpha=None)
    max_iter = cfg.training.max_iter
    if method == SCRATCH:
        tr["source"] = None
    elif method in INFLATED_METHODS:
        if source_2d is None:
            raise ConfigError(f"{method}: needs a 2D source model (--source-2d, e.g. a run of ixi_hippocampus_2d.yaml)")
        tr.update(source=str(source_2d), inflate=method.split("_", 1)[1])
    elif method == MULTI_DOMAIN:
        if source_multi_domain is None:
            raise ConfigError(f"{method}: needs a multi-domain pretrained trunk (--source-multi-domain, e.g. a run "
                              "of demo/multi_domain.yaml)")
        tr["source"] = str(source_multi_domain)
    elif method.startswith("freeze"):
        tr["freeze"] = int(method[len("freeze"):])
    elif method == "discriminative":
        t["lr_decay"] = ULMFIT_DECAY
    elif method == "gradual_unfreezing":
        per = max_iter // 10
        if per < 1:
            raise ConfigError(f"gradual_unfreezing: training.max_iter {max_iter} is too small for six stages (10 or more)")
        stages = gradual_unfreezing(per, last_stage=max_iter - 5 * per)
        t.update(stages=stages, lr_decay=ULMFIT_DECAY)
    elif method == "mean_var":
        tr["transfusion"] = 0
    elif method == "transfusion":
        tr["transfusion"] = TRANSFUSION_KEEP
    elif method == "dual_stage":
        if max_iter < 2:
            raise ConfigError("dual_stage: training.max_iter must be at least 2 (two stages)")
        natural = max(1, max_iter // 4)
        classes = cfg.network.num_classes
        t["stages"] = dual_stage(max_iter - natural, natural, [1.0 / classes] * classes,
                                 natural_lr=cfg.training.lr * 0.1)
    if method != SCRATCH and tr["source"] is None:
        raise ConfigError(f"transfer.source: the {method} method needs a pretrained source model; set transfer.source")
    return config_from_dict(raw, source=cfg.source_file)


def transfer_methods_grid(cfg: Config, methods: Sequence[str] = TRANSFER_METHODS, repeats: int = 1,
                          source_2d: Optional[str | Path] = None,
                          source_multi_domain: Optional[str | Path] = None,
                          subsets: Sequence[Optional[int]] = (None,)) -> list[RunSpec]:
    """The transfer-methods comparison: every training subset × method × ``repeats`` seeds on the same split.

    Args:
        cfg: the base config (a BraTS-like target with a 3D ``transfer.source``).
        methods: the methods to run (default: all of :data:`TRANSFER_METHODS`;
            the inflated ones only when ``source_2d`` is given).
        repeats: seeds per method (``training.seed + r``).
        source_2d: the 2D source model of the inflated methods.
        source_multi_domain: the multi-domain trunk of ``multi_domain`` (the
            default grid leaves the cell out without it).
        subsets: the training sets: ``None`` for the whole training split, ``k``
            for the nested subset S_k of ``dataset.split.subset_sizes``; runs of
            a subset are named ``S<k>_<method>``.

    Raises:
        ConfigError: for an unknown method, an inflated method asked for without
            ``source_2d`` (``multi_domain`` without ``source_multi_domain``), or a
            subset the config does not define.
    """
    chosen = list(methods)
    if methods is TRANSFER_METHODS and source_2d is None:
        chosen = [m for m in chosen if m not in INFLATED_METHODS]
    if methods is TRANSFER_METHODS and source_multi_domain is None:
        chosen = [m for m in chosen if m != MULTI_DOMAIN]
    n_subsets = len(cfg.dataset.split.subset_sizes) or len(cfg.dataset.split.subset_files)
    for k in subsets:
        if k is not None and not 1 <= k <= n_subsets:
            raise ConfigError(f"dataset.split.subset_sizes: training subset S{k} is not defined "
                              f"(the config defines {n_subsets}); add its size, e.g. subset_sizes: [3]")
    for method in chosen:
        # every method is checked before anything runs
        method_config(cfg, method, source_2d=source_2d, source_multi_domain=source_multi_domain)
    specs = []
    for k in subsets:
        for method in chosen:
            freeze = int(method[len("freeze"):]) if method.startswith("freeze") else (None if method == SCRATCH else 0)
            for r in range(repeats):
                name = (f"S{k}_" if k is not None else "") + (f"{method}_r{r}" if repeats > 1 else method)
                specs.append(RunSpec(name, freeze, k, r, cfg.training.seed + r, method,
                                     Path(source_2d) if source_2d is not None else None,
                                     Path(source_multi_domain) if source_multi_domain is not None else None))
    return specs


def select_runs(specs: Sequence[RunSpec], only: Optional[Sequence[str]] = None, shard: Optional[str] = None) -> list[RunSpec]:
    """Filter a grid by run names and/or an ``I/N`` shard (0-based, round robin)."""
    specs = list(specs)
    if only:
        names = {s.name for s in specs}
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ConfigError(f"--only {unknown[0]}: no such run; the grid has {', '.join(sorted(names))}")
        specs = [s for s in specs if s.name in set(only)]
    if shard:
        index, count = parse_shard(shard)
        specs = specs[index::count]
    return specs


# --------------------------------------------------------------------------- results


def results_path(folder: Path, shard: Optional[str] = None) -> Path:
    if shard:
        index, count = parse_shard(shard)
        return folder / f"results.{index}of{count}.csv"
    return folder / "results.csv"


def read_results(folder: Path) -> list[dict]:
    """All result rows of an experiment folder (every shard's file)."""
    rows = []
    for path in sorted(folder.glob("results*.csv")):
        with open(path, newline="") as handle:
            rows.extend(csv.DictReader(handle))
    return rows


def _write_rows(path: Path, rows: list[dict]) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


# --------------------------------------------------------------------------- running


def evaluate_run(
    cfg: Config,
    run_dir: Path,
    subjects_by_split: dict[str, list],
    predictions_dir: Path,
    echo: Callable[[str], None],
    show_progress: Optional[bool] = None,
) -> list[dict]:
    """Segment every subject of every split with a run's best model, then score the written files.

    Segmentations go to ``<predictions_dir>/<split>/<subject>_seg.nii.gz`` on
    each subject's original grid (:func:`highres3d.inference.predict_subjects`,
    the loop behind ``infer``) and are scored against the truth files by
    :func:`highres3d.evaluation.score_files` (the scorer behind ``evaluate``),
    so ``highres3d evaluate`` on that folder gives the same numbers.
    """
    from highres3d.evaluation import score_files
    from highres3d.inference import predict_subjects
    from highres3d.progress import track
    from highres3d.transfer import load_model

    model = load_model(run_dir)
    truth_map = cfg.evaluation.truth_labels or cfg.preprocessing.labels
    classes = range(1, cfg.network.num_classes)
    rows = []
    for split, subjects in subjects_by_split.items():
        # The run's model may be newer than segmentations left by an interrupted evaluation: always rewrite.
        done = predict_subjects(model, cfg, subjects, predictions_dir / split, overwrite=True, echo=None,
                                show_progress=show_progress)
        if done.failed:
            raise DataError(f"{run_dir}: segmenting the {split} subjects failed:\n"
                            + "\n".join(f"  {sid}: {msg}" for sid, msg in done.failed))
        # Surface distances on original grids take seconds a subject: reported like the segmentation.
        for subject in track(subjects, f"score {split}", unit="subjects", enabled=show_progress):
            scores = score_files(done.segmentation(subject.id), subject.label, classes=classes, truth_map=truth_map,
                                 truth_other=cfg.preprocessing.other_labels,
                                 affine_tolerance=cfg.preprocessing.affine_tolerance)
            for cls, m in scores.items():
                rows.append({"split": split, "subject": subject.id, "class": cls, "dice": m["dice"],
                             "jaccard": m["jaccard"], "hd95_mm": m["hd95_mm"], "hausdorff_mm": m["hausdorff_mm"]})
        echo(f"evaluated {len(subjects)} {split} subjects")
    return rows


def run_experiment(
    cfg: Config,
    specs: Sequence[RunSpec],
    folder: str | Path,
    *,
    shard: Optional[str] = None,
    workers: int = 1,
    check_data: bool = True,
    echo: Callable[[str], None] = print,
    show_progress: Optional[bool] = None,
) -> list[dict]:
    """Train and evaluate every run of ``specs`` not yet in the results; return all result rows.

    Before anything is created, every subject of the training, validation and
    test splits is checked (:func:`highres3d.data.check.require_valid_data`);
    a problem stops the experiment with the full list.  Each run's
    segmentations stay in ``<folder>/predictions/<run>/<split>/``; the splits
    segmented and scored are ``evaluation.splits`` (all three by default).

    With ``workers`` N > 1 the runs still to do are dealt round robin to N
    worker processes (:func:`highres3d.workers.run_in_workers`), each with
    its share of the CPUs, worker ``i`` running its runs as shard ``i/N``
    (results in ``results.<i>of<N>.csv``); their messages come back prefixed
    ``[worker i/N]``.  On one machine two workers give about 1.3× the training
    throughput of one process using both cores, and the single-threaded parts
    of a run (tracing, preprocessing, scoring, saving) overlap.  A failing
    worker does not stop the others; rerunning the same call resumes.

    Args:
        cfg: the base config of the grid.
        specs: the runs (a grid function's result, perhaps :func:`select_runs`' choice).
        folder: the experiment folder (``results.csv``, ``runs/``, ``predictions/``).
        shard: this job's ``I/N`` shard: its results go to ``results.<I>of<N>.csv``.
        workers: worker processes on this machine (1: train in this process).
        check_data: check every subject first (``False``: the caller did).
        echo: where the one-line messages go; each run's line gives the time
            elapsed and an estimate of the time left for the grid.
        show_progress: progress display of training and segmentation (``None``:
            a bar on a terminal, plain lines elsewhere; ``False``: none).

    Raises:
        ConfigError: for ``workers`` below 1, ``workers`` > 1 together with
            ``shard``, or freeze levels without ``transfer.source``.
        DataError: for problems in the data (all listed).
        WorkerError: when workers failed (after the others finished).
    """
    import time

    from highres3d.data.check import require_valid_data
    from highres3d.data.dataset import Dataset
    from highres3d.progress import format_duration
    from highres3d.workers import check_workers

    check_workers(workers)
    if workers > 1 and shard:
        raise ConfigError(f"--workers {workers} with --shard {shard}: use one or the other (--shard splits a grid "
                          "over separate jobs, --workers over processes of this one)")
    if any(s.freeze is not None and s.method is None for s in specs) and cfg.transfer.source is None:
        raise ConfigError(
            "transfer.source: the freeze levels need a pretrained source model; train it first "
            "(e.g. highres3d train --config ixi_hippocampus.yaml) and set transfer.source to its run folder"
        )
    if check_data:
        dataset = require_valid_data(cfg, splits=SPLITS, show_progress=show_progress)
    else:
        dataset = Dataset.from_config(cfg.dataset, require_labels=True)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    done = {row["run"] for row in read_results(folder)}
    if workers > 1:
        _run_in_workers(cfg, specs, folder, done, workers, echo, show_progress)
        return read_results(folder)

    from highres3d.training import train
    from highres3d.training.run import RunFolder

    out_path = results_path(folder, shard)
    own_rows = []
    if out_path.exists():
        with open(out_path, newline="") as handle:
            own_rows = list(csv.DictReader(handle))
    started, trained = time.perf_counter(), 0
    todo = sum(spec.name not in done for spec in specs)
    for i, spec in enumerate(specs, 1):
        if spec.name in done:
            echo(f"[{i}/{len(specs)}] {spec.name}: already in the results, skipped")
            continue
        elapsed = time.perf_counter() - started
        # The estimate assumes the runs still to do take as long as those done in this call.
        eta = f", ETA {format_duration(elapsed / trained * (todo - trained))}" if trained else ""
        echo(f"[{i}/{len(specs)}] {spec.name}: training ({format_duration(elapsed)} elapsed{eta})")
        trained += 1
        run_cfg = spec.config(cfg)
        run_dir = folder / "runs" / spec.name
        result = train(run_cfg, run_dir, resume=RunFolder(run_dir).exists(), subset=spec.subset,
                       show_progress=show_progress, echo=lambda text: echo("  " + text), check_data=False)
        state = RunFolder(run_dir).load_state()
        subjects = {
            "training": dataset.split("training", subset=spec.subset),
            "validation": dataset.split("validation"),
            "inference": [s for s in dataset.split("inference") if s.label is not None],
        }
        time_to_best = _time_at_iteration(RunFolder(run_dir), state.best_iteration)
        common = {
            "run": spec.name, "freeze": "" if spec.freeze is None else spec.freeze,
            "subset": "" if spec.subset is None else f"S{spec.subset}",
            "subset_size": len(subjects["training"]), "repeat": spec.repeat, "seed": spec.seed,
            "iterations": result.iterations, "best_iteration": state.best_iteration or result.iterations,
            "time_to_best_s": time_to_best, "wall_time_s": round(result.wall_time, 2),
            "method": spec.method or "",
        }
        scored = {split: subjects[split] for split in SPLITS if split in cfg.evaluation.splits}
        for row in evaluate_run(run_cfg, run_dir, scored, folder / "predictions" / spec.name,
                                lambda text: echo("  " + text), show_progress):
            own_rows.append({**common, **row})
        _write_rows(out_path, own_rows)
    return read_results(folder)


def _run_in_workers(cfg: Config, specs: Sequence[RunSpec], folder: Path, done: set, workers: int,
                    echo: Callable[[str], None], show_progress: Optional[bool]) -> None:
    """Deal the runs not yet done to worker processes, each running :func:`run_experiment` on its shard."""
    from highres3d.workers import available_cpus, run_in_workers

    for i, spec in enumerate(specs, 1):
        if spec.name in done:
            echo(f"[{i}/{len(specs)}] {spec.name}: already in the results, skipped")
    todo = [spec for spec in specs if spec.name not in done]
    if not todo:
        return
    # Fewer runs than workers: no idle process, and each one gets more threads.
    count = min(workers, len(todo))
    threads = max(1, available_cpus() // count)
    shards = [f"{i}/{count}" for i in range(count)]
    jobs = [{"cfg": cfg, "specs": select_runs(todo, shard=shard), "folder": str(folder), "shard": shard,
             "show_progress": show_progress} for shard in shards]
    echo(f"{len(todo)} runs in {count} worker processes, {count_noun(threads, 'CPU thread')} each: "
         + "; ".join(f"worker {shard}: {', '.join(s.name for s in job['specs'])}" for shard, job in zip(shards, jobs)))
    run_in_workers(_experiment_worker, jobs, threads=threads, echo=echo,
                   hint="Run the same command again to resume: finished runs are reused, interrupted ones continue "
                        "from their last checkpoint")


def _experiment_worker(cfg: Config, specs: list[RunSpec], folder: str, shard: str,
                       show_progress: Optional[bool]) -> None:
    """One worker process's share of a grid (the data were checked by the parent)."""
    run_experiment(cfg, specs, folder, shard=shard, check_data=False, show_progress=show_progress)


def _time_at_iteration(run, iteration: Optional[int]) -> float:
    from highres3d.training.run import MetricsLog

    if iteration is None:
        return math.nan
    for it, seconds in MetricsLog(run.metrics_path).column("wall_time"):
        if it == iteration:
            return round(seconds, 2)
    return math.nan
