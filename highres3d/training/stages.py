"""Multi-stage training: ``training.stages`` resolved into the plan the trainer follows.

A stage overrides, for its number of iterations, any of: the freeze
specification, the sampler type and class probabilities, the base learning
rate, the per-group learning-rate multipliers (or decay) and the loss.  Unset
keys keep the run's values, so a config without stages is one stage covering
``max_iter``.  Two recipes of the literature are plain stage lists:

* **dual-stage training** (Havaei et al. 2017): class-balanced windows first,
  then the natural class distribution with ``freeze: all_but_last``;
* **gradual unfreezing** (Howard & Ruder 2018): ``freeze: 5``, ``4``, ... one
  more group trainable per stage.

Which stage an iteration belongs to follows from the iteration alone, so a
resumed run re-enters the stage it stopped in; its window stream (seeded per
stage) continues at the same element.  The plan is written to the run folder as
``stages.csv`` and every metrics row carries its stage number.
"""
from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from highres3d.config import Config, FreezeSpec, SamplerConfig
from highres3d.training.run import STAGES_FILE
from highres3d.utils import atomic_path

#: Each stage's window stream uses ``training.seed + STAGE_SEED_STRIDE * index``.
STAGE_SEED_STRIDE = 1000


@dataclasses.dataclass(frozen=True)
class Stage:
    """One resolved stage: every setting filled in from the run's config.

    Attributes:
        index: 0-based position.
        name: the stage's name (``stage1`` ... by default).
        first: the first iteration of the stage (1-based, as in metrics.csv).
        last: the last iteration of the stage.
        freeze: the freeze specification.
        sampler: the full sampler settings.
        lr: the base learning rate.
        multipliers: the learning-rate multiplier of every layer group.
        loss: the loss name.
    """

    index: int
    name: str
    first: int
    last: int
    freeze: Optional[FreezeSpec]
    sampler: SamplerConfig
    lr: float
    multipliers: dict[str, float]
    loss: str

    @property
    def iterations(self) -> int:
        return self.last - self.first + 1

    def describe(self) -> str:
        """One line: iterations, freeze, sampler, rate and loss."""
        probabilities = (f" {list(self.sampler.class_probabilities)}"
                         if self.sampler.type == "class_weighted" and self.sampler.class_probabilities else "")
        rates = ", ".join(f"{g} {m:.3g}" for g, m in self.multipliers.items() if m != 1.0)
        return (f"stage {self.index + 1} '{self.name}': iterations {self.first}..{self.last}, "
                f"freeze {self.freeze!r}, sampler {self.sampler.type}{probabilities}, lr {self.lr:g}"
                + (f" (multipliers: {rates})" if rates else "") + f", loss {self.loss}")


def resolve_stages(cfg: Config) -> list[Stage]:
    """The stages of a config, every unset key filled from the run's settings.

    Args:
        cfg: the config; without ``training.stages`` the result is one stage
            of ``training.max_iter`` iterations.

    Returns:
        The stages in order; their iterations cover ``1..max_iter``.
    """
    from highres3d.transfer import learning_rate_multipliers

    t = cfg.training
    entries = t.stages or (None,)
    stages = []
    first = 1
    for index, entry in enumerate(entries):
        if entry is None:
            length, name, freeze, sampler, lr, loss = t.max_iter, "stage1", cfg.transfer.freeze, cfg.sampler, t.lr, t.loss
            multipliers = learning_rate_multipliers(t.lr_multipliers, t.lr_decay)
        else:
            length = int(entry.iterations)
            name = entry.name or f"stage{index + 1}"
            freeze = cfg.transfer.freeze if entry.freeze is None else entry.freeze
            overrides = {k: v for k, v in dataclasses.asdict(entry.sampler).items() if v is not None}
            if overrides.get("type", cfg.sampler.type) != cfg.sampler.type and "class_probabilities" not in overrides:
                overrides["class_probabilities"] = None
            sampler = dataclasses.replace(cfg.sampler, **overrides)
            lr = t.lr if entry.lr is None else entry.lr
            loss = entry.loss or t.loss
            if entry.lr_multipliers is None and entry.lr_decay is None:
                multipliers = learning_rate_multipliers(t.lr_multipliers, t.lr_decay)
            else:
                multipliers = learning_rate_multipliers(entry.lr_multipliers, entry.lr_decay)
        last = t.max_iter if index == len(entries) - 1 else first + length - 1
        stages.append(Stage(index, name, first, last, freeze, sampler, lr, multipliers, loss))
        first = last + 1
    return stages


def uses_group_rates(cfg: Config) -> bool:
    """Whether any stage trains a group at a rate other than the base rate (one optimizer per group)."""
    return any(m != 1.0 for stage in resolve_stages(cfg) for m in stage.multipliers.values())


def stage_at(stages: Sequence[Stage], iteration: int) -> Stage:
    """The stage that runs iteration ``iteration + 1`` (``iteration`` = iterations done)."""
    for stage in stages:
        if iteration + 1 <= stage.last:
            return stage
    return stages[-1]


def scheduled_lr(schedule: str, base_lr: float, step: int, length: int) -> float:
    """The learning rate of step ``step`` (0-based) of a stage of ``length`` steps.

    The formulas are those of the Keras schedules the trainer used before
    (``CosineDecay`` with ``alpha=0.01``; ``PiecewiseConstantDecay`` dropping
    ×0.1 after half and ×0.01 after three quarters of the stage).

    Args:
        schedule: ``"constant"``, ``"cosine"`` or ``"step"``.
        base_lr: the stage's base rate.
        step: the step within the stage.
        length: the stage's iterations.
    """
    if schedule == "cosine":
        progress = min(step, length) / length
        return base_lr * (0.99 * 0.5 * (1 + math.cos(math.pi * progress)) + 0.01)
    if schedule == "step":
        if step <= int(length * 0.5):
            return base_lr
        return base_lr * (0.1 if step <= int(length * 0.75) else 0.01)
    return base_lr


def write_stage_plan(stages: Sequence[Stage], path: Path) -> None:
    """Writes ``stages.csv``: one row per stage with its iterations and settings."""
    with atomic_path(path, overwrite=True) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["stage", "name", "first_iteration", "last_iteration", "freeze", "sampler",
                             "class_probabilities", "lr", "lr_multipliers", "loss"])
            for s in stages:
                probabilities = "" if s.sampler.class_probabilities is None else " ".join(
                    f"{p:g}" for p in s.sampler.class_probabilities)
                freeze: Any = s.freeze if not isinstance(s.freeze, tuple) else " ".join(s.freeze)
                rates = " ".join(f"{g}={m:.6g}" for g, m in s.multipliers.items())
                writer.writerow([s.index + 1, s.name, s.first, s.last, freeze, s.sampler.type, probabilities,
                                 f"{s.lr:g}", rates, s.loss])


def gradual_unfreezing(iterations: int, last_stage: Optional[int] = None) -> list[dict[str, Any]]:
    """``training.stages`` for gradual unfreezing: the classifier alone, then one more group per stage.

    Args:
        iterations: iterations of each of the first five stages (``freeze: 5 ... 1``).
        last_stage: iterations of the final stage with every group trainable
            (default: ``iterations``).

    Returns:
        Six stage mappings, as written under ``training.stages``.
    """
    from highres3d.config import LAYER_GROUPS

    stages: list[dict[str, Any]] = [
        {"name": f"up_to_{LAYER_GROUPS[k]}", "iterations": iterations, "freeze": k}
        for k in range(len(LAYER_GROUPS) - 1, 0, -1)
    ]
    stages.append({"name": "all", "iterations": last_stage or iterations, "freeze": 0})
    return stages


def dual_stage(balanced: int, natural: int, class_probabilities: Sequence[float],
               natural_lr: Optional[float] = None) -> list[dict[str, Any]]:
    """``training.stages`` for dual-stage training (Havaei et al. 2017).

    Args:
        balanced: iterations of stage 1 (class-weighted windows, every group trained).
        natural: iterations of stage 2 (uniform windows, all but ``conv_2`` frozen).
        class_probabilities: stage 1's probability of a window centred on each class.
        natural_lr: stage 2's learning rate (default: ``training.lr``).
    """
    second: dict[str, Any] = {"name": "natural", "iterations": natural, "freeze": "all_but_last",
                              "sampler": {"type": "uniform"}}
    if natural_lr is not None:
        second["lr"] = natural_lr
    return [{"name": "balanced", "iterations": balanced,
             "sampler": {"type": "class_weighted", "class_probabilities": list(class_probabilities)}}, second]


def with_stages(cfg: Config, stages: Sequence[Mapping[str, Any]]) -> Config:
    """A copy of ``cfg`` with ``training.stages`` replaced and ``max_iter`` set to their total, checked.

    Args:
        cfg: the config.
        stages: stage mappings (e.g. from :func:`gradual_unfreezing`); an empty list removes the stages.

    Raises:
        ConfigError: for an invalid stage, naming ``training.stages[i]`` and the key.
    """
    from highres3d.config import config_from_dict, to_dict

    raw = to_dict(cfg)
    raw["training"]["stages"] = [dict(stage) for stage in stages]
    if stages:
        raw["training"]["max_iter"] = sum(int(stage["iterations"]) for stage in stages)
    return config_from_dict(raw, source=cfg.source_file)


def read_stage_plan(path: Path) -> list[dict[str, str]]:
    """The rows of a run's ``stages.csv``."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


__all__ = [
    "STAGES_FILE",
    "Stage",
    "dual_stage",
    "gradual_unfreezing",
    "read_stage_plan",
    "resolve_stages",
    "scheduled_lr",
    "stage_at",
    "uses_group_rates",
    "with_stages",
    "write_stage_plan",
]
