"""Pretrained models by name: the presets shipped with highres3d and those a lab registers.

A preset is a folder holding

* ``model.keras`` — the model (architecture and weights);
* ``config.yaml`` — the config it was trained with (its preprocessing is what
  ``infer`` applies), with no paths of the machine that trained it;
* ``metrics.csv`` — its training curves;
* ``preset.json`` — what it is and how it was made: task, inputs, classes,
  parameters, the command, seed and wall time that produced it, its scores on
  held-out subjects, and the SHA-256 of ``model.keras``.

Presets are found in the package (``highres3d/presets/<name>/``) and in every
folder listed in ``$HIGHRES3D_PRESETS`` (separated like ``PATH``), so a lab can
share its own.  Anywhere a model is accepted, ``preset:NAME`` names one:
``transfer.source: preset:NAME``, ``highres3d infer --model preset:NAME``,
``HighResNet3D.from_preset("NAME")``.  Loading checks the recorded SHA-256 and
says so clearly when a file is corrupt.

:func:`make_preset` is the one reproducible command behind a shipped preset:
it synthesises the subjects, trains, evaluates on held-out subjects and writes
the folder (``highres3d models make-preset``).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from highres3d.config import PRESET_SCHEME as SCHEME
from highres3d.errors import ConfigError, DataError
from highres3d.utils import current_umask

#: Environment variable listing extra preset folders.
ENV_VAR = "HIGHRES3D_PRESETS"
INFO_FILE = "preset.json"
MODEL_FILE = "model.keras"
CONFIG_FILE = "config.yaml"
CURVES_FILE = "metrics.csv"
#: Largest Dice difference accepted when a preset is re-scored on its check subject (CPU float round-off).
CHECK_TOLERANCE = 0.02


def packaged_folder() -> Path:
    """The folder of the presets shipped inside the package."""
    return Path(__file__).resolve().parent


def preset_folders() -> list[Path]:
    """Where presets are looked up, in order: the package, then ``$HIGHRES3D_PRESETS``."""
    extra = [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    return [packaged_folder(), *extra]


@dataclasses.dataclass(frozen=True)
class Preset:
    """One preset folder and its ``preset.json``."""

    name: str
    folder: Path
    info: dict

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_FILE

    def verify(self) -> Path:
        """The model file, after checking it against the recorded SHA-256.

        Raises:
            DataError: the file is missing or its content differs from what was recorded.
        """
        if not self.model_path.is_file():
            raise DataError(f"preset {self.name}: {self.model_path} is missing; reinstall highres3d or re-create the preset")
        digest = sha256(self.model_path)
        if digest != self.info.get("sha256"):
            raise DataError(
                f"preset {self.name}: {self.model_path} is corrupt (SHA-256 {digest[:12]}…, recorded "
                f"{str(self.info.get('sha256'))[:12]}…); reinstall highres3d or re-create the preset with "
                f"{self.info.get('made', {}).get('command', 'highres3d models make-preset')}"
            )
        return self.model_path

    def summary_row(self) -> list:
        """The row ``highres3d models list`` prints."""
        made = self.info.get("made", {})
        classes = self.info.get("num_classes", "")
        by_head = self.info.get("scores", {}).get("datasets")
        if isinstance(classes, dict):  # a multi-domain trunk: one head per source dataset
            classes = " / ".join(f"{head} {n}" for head, n in classes.items())
        if by_head:
            score = "; ".join(f"{head} {_dice_text(s)}" for head, s in by_head.items())
        else:
            score = _dice_text(self.info.get("scores", {}).get("test", {}))
        return [
            self.name, self.info.get("task", ""), "+".join(self.info.get("inputs", [])), classes,
            self.info.get("parameters", ""), score,
            f"{made.get('iterations', '?')} it, {made.get('wall_time_s', 0) / 60:.0f} min",
        ]


def _dice_text(scores: dict) -> str:
    dice = scores.get("dice_mean")
    if dice is None:
        return "–"
    sd = f" ± {scores['dice_sd']:.3f}" if scores.get("dice_sd") is not None else ""
    return f"{dice:.3f}{sd} (n={scores.get('n')})"


def sha256(path: Path) -> str:
    """The SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_presets() -> list[Preset]:
    """Every preset found, the package's first; a name found twice keeps its first folder."""
    found: dict[str, Preset] = {}
    for root in preset_folders():
        if not root.is_dir():
            continue
        for info_path in sorted(root.glob(f"*/{INFO_FILE}")):
            try:
                info = json.loads(info_path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise DataError(f"{info_path}: unreadable preset description ({err})") from None
            name = info.get("name", info_path.parent.name)
            found.setdefault(name, Preset(name, info_path.parent, info))
    return list(found.values())


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (with or without the ``preset:`` prefix).

    Raises:
        ConfigError: no such preset; the message lists the known ones.
    """
    name = name.removeprefix(SCHEME)
    presets = {p.name: p for p in list_presets()}
    if name in presets:
        return presets[name]
    close = difflib.get_close_matches(name, list(presets), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    known = ", ".join(presets) or "none"
    raise ConfigError(f"preset {name!r} not found{hint} Known presets: {known} (see 'highres3d models list'; "
                      f"register a folder of your own with ${ENV_VAR})")


def is_preset(source: Any) -> bool:
    """True for a ``preset:NAME`` string or path."""
    return str(source).startswith(SCHEME)


# --------------------------------------------------------------------------- making one


def write_preset(
    output: str | os.PathLike,
    name: str,
    model_file: str | os.PathLike,
    config,
    info: dict,
    curves: Optional[str | os.PathLike] = None,
) -> Preset:
    """Write the preset folder ``output/name`` from a ``.keras`` model, its config and a description.

    The folder is assembled under a temporary name and renamed into place, so
    a preset is either complete or absent; an existing one is never replaced.
    ``info["sha256"]`` and ``info["name"]`` are filled in.

    Args:
        output: the folder to create the preset folder in.
        name: the preset's name (and folder name).
        model_file: the ``.keras`` model.
        config: the :class:`highres3d.config.Config` it was trained with
            (written without the training machine's paths).
        info: the rest of ``preset.json`` (task, inputs, scores, how it was made).
        curves: the run's ``metrics.csv``, if any.
    """
    output = Path(output)
    target = output / name
    if target.exists():
        raise DataError(f"{target}: already exists; remove it or choose another name")
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=output))
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it private; a preset is meant to be shared
    try:
        shutil.copyfile(model_file, staging / MODEL_FILE)
        if curves is not None:
            shutil.copyfile(curves, staging / CURVES_FILE)
        (staging / CONFIG_FILE).write_text(f"# the config preset {name} was trained with\n" + _portable_config(config))
        info = {**info, "name": name, "sha256": sha256(staging / MODEL_FILE)}
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2, allow_nan=False) + "\n")
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Preset(name, target, info)


def _portable_config(cfg) -> str:
    """The config as YAML without the training machine's paths (they mean nothing elsewhere)."""
    from highres3d.config import dump_config

    dataset = dataclasses.replace(cfg.dataset, root=None, csv_files={},
                                  split=dataclasses.replace(cfg.dataset.split, file=None, subset_files=()))
    training = dataclasses.replace(cfg.training, output_dir=Path("runs"))
    transfer = dataclasses.replace(cfg.transfer, source=None)
    datasets = tuple(dataclasses.replace(d, root=None, csv_files={},
                                         split=dataclasses.replace(d.split, file=None, subset_files=()))
                     for d in cfg.datasets)
    return dump_config(dataclasses.replace(cfg, dataset=dataset, datasets=datasets, training=training,
                                           transfer=transfer))


def _synthesizer(generator: str, show_progress: Optional[bool] = False) -> Callable:
    """The synthetic-data writer of ``generator`` (``"ixi"`` or ``"brats"``): ``make(folder, n, size=, seed=)``."""
    from highres3d.data import synth

    synth.generator(generator)  # an unknown generator stops here, before any work
    return functools.partial(synth.synthesize, generator, show_progress=show_progress)


def _dice_summary(scores: list[float]) -> dict:
    """Mean, sd and count of per-subject Dice scores, as ``preset.json`` records them."""
    import numpy as np

    return {"dice_mean": float(np.nanmean(scores)),
            "dice_sd": float(np.nanstd(scores, ddof=1)) if len(scores) > 1 else None, "n": len(scores)}


def _command(name, config, task, generator, subjects, seed, overrides) -> str:
    return (f"highres3d models make-preset {name} --config {config} --task {task!r} "
            f"--generator {generator} --subjects {subjects} --seed {seed}"
            + "".join(f" --set {o}" for o in overrides or []))


def _make_multi_domain_preset(name, config, probe, target: Path, work: Path, *, task, generator, subjects, seed,
                              overrides, command, echo, show_progress, started) -> Preset:
    """:func:`make_preset` for a ``datasets:`` config: a multi-domain trunk with one head per dataset.

    Dataset ``i`` (config order) gets ``subjects`` synthetic subjects of seed
    ``seed + i`` in ``data/<its name>``; each head is scored on its dataset's
    held-out subjects and on one check subject of its own.  ``scores.test`` is
    the first dataset's (what ``models list`` shows); ``scores.datasets`` has
    every head's, ``scores.checks`` every head's check subject.  ``probe`` is
    the config loaded without a data root (it names the datasets).
    """
    import numpy as np

    from highres3d.config import load_config
    from highres3d.data.dataset import Dataset
    from highres3d.models import named_weights
    from highres3d.training import train
    from highres3d.training.multidomain import domain_configs
    from highres3d.training.run import MetricsLog
    from highres3d.transfer import load_model

    make = _synthesizer(generator, show_progress)
    data = work / "data"
    for i, entry in enumerate(probe.datasets):
        folder = data / entry.name
        if not (folder / "synth_manifest.json").exists():
            echo(f"synthesising {subjects} {generator}-like subjects (seed {seed + i}) for dataset {entry.name} -> {folder}")
            make(folder, subjects, size="small", seed=seed + i)
    cfg = load_config(config, overrides=[f"training.seed={seed}", *(overrides or [])], data_root=data)
    run_dir = work / "run"
    result = train(cfg, run_dir, resume=(run_dir / "state.json").exists(), show_progress=show_progress, echo=echo)
    # The run folder's config has every dataset's working spacing resolved: score with it.
    run_cfg = load_config(run_dir / "config.yaml")
    model = load_model(run_dir)
    curves = MetricsLog(run_dir / "metrics.csv")
    per_dataset, checks, training_subjects = {}, {}, {}
    for i, domain_cfg in enumerate(domain_configs(run_cfg)):
        head_name_ = run_cfg.datasets[i].name
        head = model.head(head_name_)
        dataset = Dataset.from_config(domain_cfg.dataset)
        training_subjects[head_name_] = len(dataset.split("training"))
        test = dataset.split("inference")
        echo(f"scoring head {head_name_} on {len(test)} held-out subjects")
        scores = _score_subjects(head, domain_cfg, test, work / "test" / head_name_, show_progress)
        # Each head's own validation Dice at the best checkpoint (chosen by the mean over heads).
        best = dict(curves.column(f"val_volume_dice_{head_name_}")).get(result.best_iteration)
        per_dataset[head_name_] = {**_dice_summary(scores), "best_validation_dice": best}
        check_seed = seed + 1000 + i
        subject = _synthetic_subject(domain_cfg, generator, check_seed, work / "check_data" / head_name_)
        checks[head_name_] = {"generator": generator, "seed": check_seed, "subject": subject.id, "dataset": head_name_,
                              "dice": _score_subjects(head, domain_cfg, [subject], work / "check" / head_name_)[0],
                              "tolerance": CHECK_TOLERANCE}
    first = run_cfg.datasets[0].name
    wall = time.perf_counter() - started
    info = {
        "task": task,
        "inputs": list(run_cfg.datasets[0].modalities),
        "num_classes": {d.name: d.num_classes for d in run_cfg.datasets},
        "labels": {d.name: {str(k): v for k, v in d.labels.items()} for d in run_cfg.datasets},
        "network": {"width_multiplier": run_cfg.network.width_multiplier, "activation": run_cfg.network.activation,
                    "dims": run_cfg.network.dims},
        "heads": [d.name for d in run_cfg.datasets],
        "parameters": int(sum(int(np.prod(v.shape)) for v in model.trainable_weights)),
        "weights": len(named_weights(model)),
        "made": {
            "command": command or _command(name, config, task, generator, subjects, seed, overrides),
            "seed": seed,
            "subjects": subjects,
            "training_subjects": training_subjects,
            "iterations": result.iterations,
            "best_iteration": result.best_iteration,
            "stopped_early": result.stopped_early,
            "wall_time_s": round(wall, 1),
        },
        "scores": {
            "test": {**per_dataset[first], "dataset": first, "best_validation_dice_mean_of_heads": result.best_score},
            "datasets": per_dataset,
            "check": checks[first],
            "checks": checks,
        },
    }
    preset = write_preset(target.parent, name, run_dir / "best.keras", run_cfg, info, curves=run_dir / "metrics.csv")
    echo(f"preset {name}: test Dice " + ", ".join(f"{k} {v['dice_mean']:.3f} (n={v['n']})" for k, v in per_dataset.items())
         + f"; {result.iterations} iterations, {wall / 60:.1f} min -> {target}")
    return preset


def _score_subjects(model, cfg, subjects, folder: Path, show_progress: Optional[bool] = False) -> list[float]:
    from highres3d.evaluation import mean_foreground, score_files
    from highres3d.inference import predict_subjects
    from highres3d.progress import track

    done = predict_subjects(model, cfg, subjects, folder, echo=None, show_progress=show_progress)
    if done.failed:
        raise DataError(f"segmenting held-out subjects failed: {done.failed}")
    truth_map = cfg.evaluation.truth_labels or cfg.preprocessing.labels
    return [
        mean_foreground(score_files(done.segmentation(s.id), s.label, classes=range(1, cfg.network.num_classes),
                                    truth_map=truth_map, truth_other=cfg.preprocessing.other_labels, distances=False))
        for s in track(subjects, "score", unit="subjects", enabled=show_progress)
    ]


def _synthetic_subject(cfg, generator: str, seed: int, folder: Path):
    """Synthesise subject 0 of ``seed`` into ``folder`` and find it with the config's patterns."""
    from highres3d.data.dataset import discover_subjects

    if not (folder / "synth_manifest.json").exists():
        _synthesizer(generator)(folder, 1, size="small", seed=seed)
    return discover_subjects(folder, cfg.dataset.patterns, list(cfg.dataset.modalities))[0]


def check_subject_score(preset: Preset, workdir: Path, check: Optional[dict] = None) -> float:
    """Re-score a preset on a check subject recorded in its ``preset.json`` (synthesised afresh).

    Args:
        preset: the preset.
        workdir: where the subject and its segmentation are written.
        check: one of its recorded checks (default ``scores.check``; a
            multi-domain trunk records one per head in ``scores.checks``).
    """
    from highres3d.config import load_config
    from highres3d.transfer import load_model

    check = check or preset.info["scores"]["check"]
    cfg = load_config(preset.config_path)
    model = load_model(preset.verify())
    if cfg.datasets:  # a multi-domain trunk: the check subject belongs to one head's dataset
        from highres3d.training.multidomain import domain_configs

        cfg = domain_configs(cfg)[[d.name for d in cfg.datasets].index(check["dataset"])]
        model = model.head(check["dataset"])
    subject = _synthetic_subject(cfg, check["generator"], check["seed"], Path(workdir) / "data")
    return _score_subjects(model, cfg, [subject], Path(workdir) / "check")[0]


def make_preset(
    name: str,
    config: str | os.PathLike,
    output: str | os.PathLike,
    *,
    task: str,
    generator: str = "ixi",
    subjects: int = 40,
    seed: int = 0,
    overrides: Optional[list[str]] = None,
    workdir: Optional[str | os.PathLike] = None,
    command: Optional[str] = None,
    echo: Callable[[str], None] = print,
    show_progress: Optional[bool] = None,
) -> Preset:
    """Synthesise subjects, train, evaluate on held-out subjects, and write the preset folder ``output/name``.

    Args:
        name: the preset's name.
        config: the training config (a path or a shipped config name).
        output: the folder the preset folder is created in (never overwritten).
        task: one line saying what the model segments from what.
        generator: ``"ixi"`` or ``"brats"``: which synthetic set to train on.
        subjects: how many subjects to synthesise (split by the config's fractions).
        seed: seed of the synthetic subjects and of training.
        overrides: ``key=value`` config overrides.
        workdir: where data and the run go (default: a temporary folder, removed afterwards).
        command: the command line to record (default: built from the arguments).
        echo: where messages go.
        show_progress: progress display (see :class:`highres3d.progress.Progress`).
    """
    from highres3d.config import load_config
    from highres3d.data.dataset import Dataset
    from highres3d.models import named_weights
    from highres3d.training import train
    from highres3d.transfer import load_model

    target = Path(output) / name
    if target.exists():
        raise DataError(f"{target}: already exists; remove it or choose another name")
    make = _synthesizer(generator, show_progress)
    started = time.perf_counter()
    own_workdir = workdir is None
    work = Path(tempfile.mkdtemp(prefix=f"preset-{name}-")) if own_workdir else Path(workdir)
    try:
        data = work / "data"
        settings = [f"training.seed={seed}", *(overrides or [])]
        probe = load_config(config, overrides=settings)
        if probe.datasets:
            return _make_multi_domain_preset(name, config, probe, target, work, task=task, generator=generator,
                                             subjects=subjects, seed=seed, overrides=overrides, command=command,
                                             echo=echo, show_progress=show_progress, started=started)
        if not (data / "synth_manifest.json").exists():
            echo(f"synthesising {subjects} {generator}-like subjects -> {data}")
            make(data, subjects, size="small", seed=seed)
        cfg = load_config(config, overrides=settings, data_root=data)
        run_dir = work / "run"
        result = train(cfg, run_dir, resume=(run_dir / "state.json").exists(), show_progress=show_progress, echo=echo)
        model = load_model(run_dir)
        dataset = Dataset.from_config(cfg.dataset)
        test = dataset.split("inference")
        echo(f"scoring {len(test)} held-out subjects")
        scores = _score_subjects(model, cfg, test, work / "test", show_progress)
        # The check subject: one more synthetic subject, never seen in training, that a test re-creates.
        check_seed = seed + 1000
        check_subject = _synthetic_subject(cfg, generator, check_seed, work / "check_data")
        check_dice = _score_subjects(model, cfg, [check_subject], work / "check")[0]

        import numpy as np

        parameters = int(sum(int(np.prod(v.shape)) for v in model.trainable_weights))
        wall = time.perf_counter() - started
        info = {
            "name": name,
            "task": task,
            "inputs": list(cfg.dataset.modalities),
            "num_classes": cfg.network.num_classes,
            "labels": {str(k): v for k, v in cfg.preprocessing.labels.items()},
            "network": {"width_multiplier": cfg.network.width_multiplier, "activation": cfg.network.activation,
                        "dims": cfg.network.dims},
            "parameters": parameters,
            "weights": len(named_weights(model)),
            "made": {
                "command": command or _command(name, config, task, generator, subjects, seed, overrides),
                "seed": seed,
                "subjects": subjects,
                "training_subjects": len(dataset.split("training")),
                "iterations": result.iterations,
                "best_iteration": result.best_iteration,
                "stopped_early": result.stopped_early,
                "wall_time_s": round(wall, 1),
            },
            "scores": {
                "test": {**_dice_summary(scores), "best_validation_dice": result.best_score},
                "check": {"generator": generator, "seed": check_seed, "subject": check_subject.id,
                          "dice": check_dice, "tolerance": CHECK_TOLERANCE},
            },
        }
        preset = write_preset(output, name, run_dir / "best.keras", cfg, info, curves=run_dir / "metrics.csv")
        echo(f"preset {name}: test Dice {info['scores']['test']['dice_mean']:.3f} (n={len(scores)}), "
             f"{result.iterations} iterations, {wall / 60:.1f} min -> {target}")
        return preset
    finally:
        if own_workdir:
            shutil.rmtree(work, ignore_errors=True)
