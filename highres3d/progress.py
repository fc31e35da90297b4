"""Progress feedback for long commands: the one implementation every command uses.

On a terminal, :class:`Progress` redraws a one-line bar in place.  When
nobody watches a terminal (a scheduler's log file, ``nohup``, a pipe), a bar
would either be invisible or fill the log with carriage returns, so it prints
a plain line instead, at a steady interval (``HIGHRES3D_PROGRESS_INTERVAL``
seconds, default 20), plus one when the work ends::

    train: 120/400 (30%) loss 0.4312 | 5.2 windows/s | 1m20s elapsed, ETA 3m07s

``enabled=False`` silences it (``--no-progress``).
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Optional, TextIO, TypeVar

T = TypeVar("T")

#: Seconds between plain progress lines when the output is not a terminal.
DEFAULT_INTERVAL = 20.0
_BAR_WIDTH = 24
_REDRAW_SECONDS = 0.1


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1m15s"``, ``3725`` -> ``"1h02m"``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _interval() -> float:
    text = os.environ.get("HIGHRES3D_PROGRESS_INTERVAL")
    try:
        return float(text) if text else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


class Progress:
    """A progress display for ``total`` steps of work.

    Args:
        total: number of steps, or ``None`` when unknown (no percentage or ETA).
        desc: what is being done, printed first (``"train"``, ``"infer"``).
        unit: what :attr:`rate` counts per second (``"windows"``, ``"subjects"``).
        rate_scale: units per step (e.g. the batch size when a step is one
            iteration and the rate is in windows).
        stream: where to write (default: standard error).
        enabled: ``None`` = a bar on a terminal and plain lines otherwise;
            ``True`` the same; ``False`` = silent.
        interval: seconds between plain lines (default
            ``$HIGHRES3D_PROGRESS_INTERVAL`` or 20).
        start: steps already done (a resumed run), excluded from the rate.
    """

    def __init__(
        self,
        total: Optional[int],
        desc: str,
        *,
        unit: str = "it",
        rate_scale: float = 1.0,
        stream: Optional[TextIO] = None,
        enabled: Optional[bool] = None,
        interval: Optional[float] = None,
        start: int = 0,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.rate_scale = rate_scale
        self.stream = stream or sys.stderr
        self.enabled = enabled is not False
        self.terminal = self.enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = _interval() if interval is None else interval
        self.count = start
        self.start_count = start
        self.status = ""
        self.started = time.perf_counter()
        self._last_line = self.started
        self._last_draw = 0.0
        self._closed = False

    # ---- figures
    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def rate(self) -> float:
        """Units per second since the display started."""
        done = self.count - self.start_count
        return done * self.rate_scale / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> Optional[float]:
        done = self.count - self.start_count
        if self.total is None or done <= 0:
            return None
        return self.elapsed / done * max(self.total - self.count, 0)

    def line(self) -> str:
        """The plain progress line as it would be printed now."""
        parts = [f"{self.desc}: {self.count}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            parts[0] += f" ({100 * self.count / self.total:.0f}%)"
        if self.status:
            parts[0] += f" {self.status}"
        parts.append(f"{self.rate:.3g} {self.unit}/s")
        eta = self.eta
        parts.append(f"{format_duration(self.elapsed)} elapsed" + (f", ETA {format_duration(eta)}" if eta is not None else ""))
        return " | ".join(parts)

    # ---- updates
    def update(self, steps: int = 1, status: Optional[str] = None) -> None:
        """Record ``steps`` more steps; ``status`` (e.g. ``"loss 0.43"``) is shown until replaced."""
        self.count += steps
        if status is not None:
            self.status = status
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.terminal:
            if now - self._last_draw >= _REDRAW_SECONDS or (self.total and self.count >= self.total):
                self._draw()
                self._last_draw = now
        elif now - self._last_line >= self.interval:
            self._print_line()

    def note(self, text: str) -> None:
        """Print a message without breaking the bar."""
        if self.terminal:
            self.stream.write("\r\033[K")
        print(text, file=self.stream, flush=True)
        if self.terminal:
            self._draw()

    def close(self) -> None:
        """End the display: a final line (plain output) or a newline after the bar."""
        if self._closed or not self.enabled:
            self._closed = True
            return
        self._closed = True
        if self.terminal:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
        else:
            self._print_line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _print_line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._last_line = time.perf_counter()

    def _draw(self) -> None:
        if self.total:
            done = int(_BAR_WIDTH * min(self.count, self.total) / self.total)
            bar = f"[{'#' * done}{'.' * (_BAR_WIDTH - done)}] "
        else:
            bar = ""
        self.stream.write(f"\r\033[K{bar}{self.line()}")
        self.stream.flush()


def track(
    iterable: Iterable[T],
    desc: str,
    *,
    total: Optional[int] = None,
    unit: str = "items",
    enabled: Optional[bool] = None,
    stream: Optional[TextIO] = None,
) -> Iterator[T]:
    """Iterate with a :class:`Progress` display (one step per item)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(total, desc, unit=unit, enabled=enabled, stream=stream) as progress:
        for item in iterable:
            yield item
            progress.update()
