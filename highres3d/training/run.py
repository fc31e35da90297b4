"""The run folder: everything a training run writes, self-contained for ``highres3d infer``.

::

    runs/<name>/
      config.yaml          the resolved config (every default filled in)
      split.csv            the subjects of each split (NiftyNet format)
      state.json           iteration, best score, checkpoints (rewritten atomically)
      sessions.json        each start and resume: when, command, host and job, CPUs, GPUs, versions
      metrics.csv          every logged scalar, one row per logged iteration (with its stage)
      stages.csv           the training stages: iterations, freeze, sampler, rates, loss of each
      checkpoints/iter_000150.keras   model + optimizer state, last ``max_checkpoints`` kept
      best.keras           the model with the best validation Dice (used by infer and transfer)
      model.keras          the final model (used when there is no best.keras)
      tensorboard/         TensorBoard event files

Every file is written to a temporary name and renamed, so an interrupted run
never leaves a half-written checkpoint; ``--resume`` continues from the newest
complete checkpoint.

In multi-worker training only the chief writes here; every other worker is
given a :class:`WorkerRunFolder`, a scratch copy that reads the chief's state
and checkpoints and is removed at the end.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from highres3d.config import Config, dump_config
from highres3d.errors import Highres3dError
from highres3d.signals import interrupts_deferred
from highres3d.utils import atomic_path

CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.csv"
BEST_MODEL = "best.keras"
FINAL_MODEL = "model.keras"
SPLIT_FILE = "split.csv"
CHECKPOINT_DIR = "checkpoints"
STAGES_FILE = "stages.csv"
SESSIONS_FILE = "sessions.json"


class RunExistsError(Highres3dError):
    """The run folder already holds a run and neither resume nor overwrite was asked."""


@dataclass
class RunState:
    """What a run needs to continue exactly where it stopped."""

    iteration: int = 0
    best_score: Optional[float] = None
    best_iteration: Optional[int] = None
    validations_since_best: int = 0
    checkpoints: list[str] = field(default_factory=list)
    wall_time: float = 0.0
    finished: bool = False
    stopped_early: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> RunState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(text)


#: Config keys a run may be resumed with changed: they do not touch the window stream or the weights
#: (where the volumes are held gives the same windows; the inference windows only decide how much
#: memory the whole-subject validation needs).
RESUMABLE_CHANGES = ("training.max_iter", "training.strategy", "evaluation.splits", "inference.window_size",
                     "inference.batch_size", "training.cache", "training.cache_dir")


class RunFolder:
    """Creates, reads and updates one run folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def shared_path(self) -> Path:
        """The run folder the results land in (a worker's scratch folder reports the chief's)."""
        return self.path

    # ---- paths
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def best_model_path(self) -> Path:
        return self.path / BEST_MODEL

    @property
    def final_model_path(self) -> Path:
        return self.path / FINAL_MODEL

    @property
    def stages_path(self) -> Path:
        return self.path / STAGES_FILE

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    def checkpoint_path(self, iteration: int) -> Path:
        return self.checkpoint_dir / f"iter_{iteration:06d}.keras"

    # ---- lifecycle
    def exists(self) -> bool:
        return self.state_path.exists()

    def prepare(self, cfg: Config, resume: bool, overwrite: bool) -> RunState:
        """Create a new run folder, or open an existing one to resume it."""
        if self.exists():
            if resume:
                self._check_same_config(cfg)
                state = self.load_state()
                self.record_session(state)
                return state
            if not overwrite:
                raise RunExistsError(
                    f"{self.path}: a run already exists here; pass --resume to continue it, "
                    "--overwrite to replace it, or --run-dir for another folder"
                )
            shutil.rmtree(self.path)
        elif resume and self.path.exists() and any(self.path.iterdir()):
            raise Highres3dError(f"{self.path}: no {STATE_FILE} here, so there is nothing to resume")
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir.mkdir(exist_ok=True)
        write_text_atomic(self.config_path, f"# resolved config of this run (from {cfg.source_file})\n"
                          + dump_config(cfg, relative_to=self.path))
        state = RunState()
        self.save_state(state)
        self.record_session(state)
        return state

    def status(self) -> RunStatus:
        """Where this run stands: its state, its config's ``max_iter``, its last session, its lock."""
        import yaml

        from highres3d.training.lock import lock_path, read_holder, stale_reason

        state = self.load_state()
        try:
            max_iter = int(yaml.safe_load(self.config_path.read_text())["training"]["max_iter"])
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
            max_iter = None
        try:
            sessions = self.sessions()
        except (OSError, ValueError):
            sessions = []
        holder = read_holder(lock_path(self.path))
        return RunStatus(self.path, state.iteration, max_iter, state.finished, state.stopped_early, state.best_score,
                         state.best_iteration, state.wall_time, sessions[-1] if sessions else None, holder,
                         stale_reason(holder) if holder else None)

    def sessions(self) -> list[dict[str, Any]]:
        """The sessions recorded in ``sessions.json``, oldest first (see :mod:`highres3d.environment`)."""
        path = self.path / SESSIONS_FILE
        if not path.exists():
            return []
        return json.loads(path.read_text())

    def record_session(self, state: RunState) -> None:
        """Append this process's session, starting at ``state.iteration``, to ``sessions.json``."""
        from highres3d import environment

        path = self.path / SESSIONS_FILE
        try:
            sessions = self.sessions()
            if not isinstance(sessions, list):
                raise ValueError("not a list")
        except (OSError, ValueError) as err:
            # A damaged record must not stop a run; it is kept beside the new one, never overwritten.
            kept = path.with_name(f"{SESSIONS_FILE}.unreadable-{uuid.uuid4().hex[:8]}")
            path.rename(kept)
            print(f"warning: {path}: unreadable ({err}); kept as {kept.name}, a new record started", file=sys.stderr)
            sessions = []
        sessions.append(environment.describe(state.iteration))
        write_text_atomic(path, json.dumps(sessions, indent=1) + "\n")

    def _check_same_config(self, cfg: Config) -> None:
        """A run may only be resumed with its own config, up to the keys of :data:`RESUMABLE_CHANGES`."""
        import yaml

        try:
            saved = yaml.safe_load(self.config_path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise Highres3dError(f"{self.config_path}: cannot read the run's config ({err})") from None
        differences = _differences(saved, yaml.safe_load(dump_config(cfg, relative_to=self.path)))
        # A longer max_iter continues a run, another strategy resumes it on other hardware, and what is
        # evaluated after training, or the windows validation segments subjects with, does not touch the
        # training (smaller inference windows are the fix when that validation runs out of memory).
        differences = [key for key in differences if key not in RESUMABLE_CHANGES]
        if differences:
            raise Highres3dError(
                f"{self.path}: cannot resume with a different config (changed: {', '.join(differences[:8])}); "
                "use the run's own config.yaml, or --run-dir for a new run"
            )

    def load_state(self) -> RunState:
        try:
            return RunState.from_dict(json.loads(self.state_path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise Highres3dError(f"{self.state_path}: cannot read the run state ({err})") from None

    def save_state(self, state: RunState) -> None:
        write_text_atomic(self.state_path, json.dumps(asdict(state), indent=2) + "\n")

    # ---- models
    def save_model(self, model: Any, path: Path) -> Path:
        # Ctrl-C or SIGTERM waits for the save (see highres3d.signals.interrupts_deferred).
        with interrupts_deferred(), atomic_path(path, overwrite=True) as tmp:
            model.save(str(tmp))
        return path

    @staticmethod
    def loop_state_path(checkpoint: Path) -> Path:
        """The optimizer/RNG state saved beside a checkpoint's model file."""
        return checkpoint.with_name(checkpoint.name.replace(".keras", ".state.npz"))

    def save_checkpoint(self, model: Any, loop_variables: Sequence[Any], state: RunState, keep: int) -> Path:
        """Save the model and the loop's variables (optimizer slots, RNG states) at ``state.iteration``.

        Only the newest ``keep`` checkpoints stay.  The model file holds no
        optimizer because the training loop, not ``model.fit``, owns it.
        A Ctrl-C or SIGTERM that arrives meanwhile is delivered once the
        checkpoint is whole.
        """
        with interrupts_deferred():
            return self._save_checkpoint(model, loop_variables, state, keep)

    def _save_checkpoint(self, model: Any, loop_variables: Sequence[Any], state: RunState, keep: int) -> Path:
        path = self.save_model(model, self.checkpoint_path(state.iteration))
        values = {f"v{i:05d}": np.asarray(v) for i, v in enumerate(loop_variables)}
        with atomic_path(self.loop_state_path(path), overwrite=True) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **values)
        if path.name not in state.checkpoints:
            state.checkpoints.append(path.name)
        retired = state.checkpoints[:-keep] if len(state.checkpoints) > keep else []
        state.checkpoints = state.checkpoints[len(retired):]
        # The state names only files that exist before any old file goes away.
        self.save_state(state)
        for name in retired:
            old = self.checkpoint_dir / name
            old.unlink(missing_ok=True)
            self.loop_state_path(old).unlink(missing_ok=True)
        return path

    @staticmethod
    def checkpoint_iterations(state: RunState) -> list[int]:
        return [int(name.split("_")[1].split(".")[0]) for name in state.checkpoints]

    def restore_loop_variables(self, checkpoint: Path, loop_variables: Sequence[Any]) -> None:
        """Assign the values saved by :meth:`save_checkpoint` to the same list of variables."""
        path = self.loop_state_path(checkpoint)
        if not path.exists():
            raise Highres3dError(f"{path}: the optimizer state of checkpoint {checkpoint.name} is missing")
        with np.load(path) as data:
            values = [data[k] for k in sorted(data.files)]
        if len(values) != len(loop_variables):
            raise Highres3dError(
                f"{path}: holds {len(values)} optimizer/RNG variables, the run has {len(loop_variables)} "
                "(were the freeze or augmentation settings changed since the checkpoint?)"
            )
        for variable, value in zip(loop_variables, values):
            variable.assign(value)

    def latest_checkpoint(self, state: RunState) -> Optional[Path]:
        """The checkpoint of ``state.iteration`` (the run state is saved with each checkpoint)."""
        if not state.checkpoints:
            return None
        path = self.checkpoint_dir / state.checkpoints[-1]
        if not path.exists():
            raise Highres3dError(f"{path}: the run's newest checkpoint is missing; the run cannot be resumed")
        return path


@dataclass(frozen=True)
class RunStatus:
    """Where one run stands, for ``highres3d status`` (see :meth:`RunFolder.status`)."""

    path: Path
    iteration: int
    max_iter: Optional[int]
    finished: bool
    stopped_early: bool
    best_score: Optional[float]
    best_iteration: Optional[int]
    wall_time: float
    #: The newest record of ``sessions.json`` (None for runs from before it existed).
    last_session: Optional[dict]
    #: The lock's record (``{}`` when nobody holds it) and, when its holder is gone, why.
    lock: dict
    lock_stale: Optional[str]

    @property
    def training_now(self) -> bool:
        return bool(self.lock) and self.lock_stale is None

    def describe(self) -> str:
        """One line: what the run is doing or how it ended, and what to do next."""
        from highres3d.training.lock import describe_holder

        if self.training_now:
            idle = time.time() - self.lock.get("touched", 0.0)
            return f"training now: {describe_holder(self.lock)}, alive {idle:.0f} s ago"
        if self.finished:
            return "stopped early (patience)" if self.stopped_early else "finished"
        text = f"stopped at iteration {self.iteration}; --resume continues it"
        if self.lock:
            text += f" (its lock is stale: {self.lock_stale})"
        return text


def find_runs(root: str | os.PathLike) -> list[Path]:
    """The run folders at or under ``root`` (folders with a run state), sorted."""
    root = Path(root)
    if (root / STATE_FILE).is_file():
        return [root]
    return sorted(p.parent for p in root.rglob(STATE_FILE) if CHECKPOINT_DIR not in p.relative_to(root).parts)


class WorkerRunFolder(RunFolder):
    """The run folder of a non-chief worker: writes go to a private scratch folder, reads to the chief's.

    ``MultiWorkerMirroredStrategy`` wants every worker to take part in every
    save, so a non-chief worker saves its checkpoints and models like the chief
    does, into a scratch folder under the system's temporary directory
    (``$TMPDIR``) that :meth:`cleanup` removes.  The run state and checkpoints
    it resumes from are the chief's (:meth:`chief_state`, :meth:`latest_checkpoint`).

    Args:
        chief_path: the run folder the chief writes.
        index: this worker's index (names the scratch folder).
    """

    def __init__(self, chief_path: str | os.PathLike, index: int):
        self.chief = RunFolder(chief_path)
        super().__init__(Path(tempfile.gettempdir()) / f"highres3d-worker{index}-{uuid.uuid4().hex[:12]}")

    @property
    def shared_path(self) -> Path:
        return self.chief.path

    def prepare(self, cfg: Config, resume: bool, overwrite: bool) -> RunState:
        """Create the scratch folder; the state comes from the chief's folder (:meth:`chief_state`)."""
        return super().prepare(cfg, resume=False, overwrite=True)

    def chief_state(self) -> RunState:
        """The chief's run state, read once the chief has prepared its folder."""
        state = self.chief.load_state()
        self.save_state(state)
        return state

    def latest_checkpoint(self, state: RunState) -> Optional[Path]:
        return self.chief.latest_checkpoint(state)

    def cleanup(self) -> None:
        """Remove the scratch folder."""
        shutil.rmtree(self.path, ignore_errors=True)


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out.extend(_differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key)))
        return out
    return [] if a == b else [prefix]


class MetricsLog:
    """Appends rows of scalars to ``metrics.csv``; the header grows as new scalars appear."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.exists():
            with open(path, newline="") as handle:
                self.rows = [dict(row) for row in csv.DictReader(handle)]

    def truncate_after(self, iteration: int) -> None:
        """Drop rows logged after ``iteration`` (a resumed run logs them again)."""
        self.rows = [row for row in self.rows if int(float(row["iteration"])) <= iteration]
        self.flush()

    def log(self, iteration: int, values: dict[str, float]) -> None:
        row = {"iteration": iteration}
        row.update(values)
        if self.rows and int(float(self.rows[-1]["iteration"])) == iteration:
            self.rows[-1].update(row)
        else:
            self.rows.append(row)

    def flush(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            for key in row:
                if key not in columns:
                    columns.append(key)
        with atomic_path(self.path, overwrite=True) as tmp:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns or ["iteration"])
                writer.writeheader()
                writer.writerows(self.rows)

    def column(self, name: str) -> list[tuple[int, float]]:
        out = []
        for row in self.rows:
            value = row.get(name)
            if value not in (None, ""):
                out.append((int(float(row["iteration"])), float(value)))
        return out
