"""How long the training steps wait for their windows: is the accelerator starved by the input pipeline?

The pipeline prepares batches in background threads while a step runs, so the
time ``next()`` blocks before a step is time the accelerator stood idle for
input.  :class:`InputWait` keeps both times of every step (the first step of
each stage is left out: it builds the pipeline and traces the step), the
trainer logs them (``input_wait_s`` and ``step_s`` in ``metrics.csv`` and
TensorBoard), shows the recent share in the progress line when it exceeds
:data:`SHOW_FRACTION`, and ends the run with :meth:`InputWait.summary`, which
names what shortens the wait when it exceeds :data:`ADVISE_FRACTION`.
"""
from __future__ import annotations

import statistics
from typing import Optional

#: Steps the progress line's share is taken over.
RECENT_STEPS = 20
#: Above this share of the recent steps' time spent waiting, the progress line shows it.
SHOW_FRACTION = 0.10
#: Above this share of the run's step time spent waiting, the run's last line names the fixes.
ADVISE_FRACTION = 0.20


class InputWait:
    """The wait for input and the step time of each training step."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.steps: list[float] = []

    def add(self, wait_s: float, step_s: float) -> None:
        """One step: ``wait_s`` blocked on the pipeline, then ``step_s`` computing."""
        self.waits.append(max(0.0, wait_s))
        self.steps.append(max(0.0, step_s))

    @staticmethod
    def _fraction(waits: list[float], steps: list[float]) -> Optional[float]:
        total = sum(waits) + sum(steps)
        return sum(waits) / total if total > 0 else None

    def fraction(self) -> Optional[float]:
        """The share of the measured steps' time spent waiting for input (None before any step)."""
        return self._fraction(self.waits, self.steps)

    def recent(self) -> Optional[float]:
        """:meth:`fraction` over the last :data:`RECENT_STEPS` steps."""
        return self._fraction(self.waits[-RECENT_STEPS:], self.steps[-RECENT_STEPS:])

    def status(self) -> str:
        """For the progress line: the recent share when it is worth seeing, else nothing."""
        recent = self.recent()
        return f"input wait {100 * recent:.0f} %" if recent is not None and recent > SHOW_FRACTION else ""

    def summary(self, cfg) -> Optional[str]:
        """The run's last word on its input: the share waited, the median times, and the fixes when input-bound."""
        fraction = self.fraction()
        if fraction is None:
            return None
        line = (f"input: the steps waited {100 * fraction:.0f} % of their time for windows (median per step: "
                f"{1e3 * statistics.median(self.waits):.0f} ms waiting, {1e3 * statistics.median(self.steps):.0f} ms "
                f"computing, over {len(self.steps)} steps)")
        if fraction <= ADVISE_FRACTION:
            return line
        return line + "; the accelerator waits for the input pipeline. To shorten the wait:\n" + "\n".join(
            f"  - {fix}" for fix in input_fixes(cfg))


def input_fixes(cfg) -> list[str]:
    """What shortens the input pipeline's time per batch, for a run with ``cfg``, most effective first."""
    from highres3d.augment import AffineAugmentation
    from highres3d.config import device_cache_problem

    t, aug = cfg.training, cfg.augmentation
    fixes = []
    resamples = not AffineAugmentation.from_config(aug).is_identity
    if resamples and aug.device == "cpu":
        fixes.append("augmentation.device: accelerator (rotation and scaling resample each window on the CPU now, "
                     "tens of windows/s per core)")
    if t.cache == "lazy":
        fixes.append("training.cache: disk (lazy preprocesses a volume again at every visit; disk preprocesses "
                     "each once and memory-maps it)")
    if t.cache == "disk":
        fixes.append("training.cache_dir on the node's local disk (windows read from a network file system wait "
                     "for it whenever the page cache misses)")
    if t.cache in ("ram", "disk") and device_cache_problem(cfg) is None:
        fixes.append("training.cache: device (the training volumes on the accelerator; the pipeline then sends "
                     "window positions only)")
    fixes.append("more CPU cores for the job (the pipeline cuts windows in one thread per core it sees; "
                 "SLURM: --cpus-per-task)")
    return fixes
