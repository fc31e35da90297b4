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
        scores = self.info.get("scores", {}).get("test", {})
        dice = scores.get("dice_mean")
        made = self.info.get("made", {})
        return [
            self.name, self.info.get("task", ""), "+".join(self.info.get("inputs", [])), self.info.get("num_classes", ""),
            self.info.get("parameters", ""),
            "–" if dice is None else f"{dice:.3f}" + (f" ± {scores['dice_sd']:.3f}" if scores.get("dice_sd") is not None else "")
            + f" (n={scores.get('n')})",
            f"{made.get('iterations', '?')} it, {made.get('wall_time_s', 0) / 60:.0f} min",
        ]


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
    return dump_config(dataclasses.replace(cfg, dataset=dataset, training=training, transfer=transfer))


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
    from highres3d.data.synth import synthesize_brats, synthesize_ixi

    make = {"ixi": synthesize_ixi, "brats": synthesize_brats}[generator]
    if not (folder / "synth_manifest.json").exists():
        make(folder, 1, size="small", seed=seed)
    return discover_subjects(folder, cfg.dataset.patterns, list(cfg.dataset.modalities))[0]


def check_subject_score(preset: Preset, workdir: Path) -> float:
    """Re-score a preset on the check subject recorded in its ``preset.json`` (synthesised afresh)."""
    from highres3d.config import load_config
    from highres3d.transfer import load_model

    check = preset.info["scores"]["check"]
    cfg = load_config(preset.config_path)
    subject = _synthetic_subject(cfg, check["generator"], check["seed"], Path(workdir) / "data")
    model = load_model(preset.verify())
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
    from highres3d.data.synth import synthesize
    from highres3d.models import named_weights
    from highres3d.training import train
    from highres3d.transfer import load_model

    target = Path(output) / name
    if target.exists():
        raise DataError(f"{target}: already exists; remove it or choose another name")
    if generator not in ("ixi", "brats"):
        raise ConfigError(f"generator {generator!r}: expected 'ixi' or 'brats'")
    started = time.perf_counter()
    own_workdir = workdir is None
    work = Path(tempfile.mkdtemp(prefix=f"preset-{name}-")) if own_workdir else Path(workdir)
    try:
        data = work / "data"
        if not (data / "synth_manifest.json").exists():
            echo(f"synthesising {subjects} {generator}-like subjects -> {data}")
            synthesize(generator, data, subjects, seed=seed, show_progress=show_progress)
        cfg = load_config(config, overrides=[f"training.seed={seed}", *(overrides or [])], data_root=data)
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
                "command": command or (f"highres3d models make-preset {name} --config {config} --task {task!r} "
                                       f"--generator {generator} --subjects {subjects} --seed {seed}"
                                       + "".join(f" --set {o}" for o in overrides or [])),
                "seed": seed,
                "subjects": subjects,
                "training_subjects": len(dataset.split("training")),
                "iterations": result.iterations,
                "best_iteration": result.best_iteration,
                "stopped_early": result.stopped_early,
                "wall_time_s": round(wall, 1),
            },
            "scores": {
                "test": {"dice_mean": float(np.nanmean(scores)), "dice_sd": float(np.nanstd(scores, ddof=1)) if len(scores) > 1 else None,
                         "n": len(scores), "best_validation_dice": result.best_score},
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
