"""Progress feedback for long commands: the one implementation every command uses.

On a terminal, :class:`Progress` redraws a one-line bar in place.  When
nobody watches a terminal (a scheduler's log file, ``nohup``, a pipe), a bar
would either be invisible or fill the log with carriage returns, so it prints
a plain line instead, at least every ``HIGHRES3D_PROGRESS_INTERVAL`` seconds
(default 20) whatever the command is doing, plus one when the work ends::

    train: 300/4000 (8%) loss 0.4312 · validating 6 subjects | 1.9 windows/s | 5m10s elapsed, ETA 58m

A background thread prints the line when no step came for an interval (a
validation, a checkpoint, the first step's compilation), and
:meth:`Progress.phase` names the blocking work in it.  ``enabled=False``
silences it (``--no-progress``).
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Optional, TextIO, TypeVar

T = TypeVar("T")

#: Seconds between plain progress lines when the output is not a terminal.
DEFAULT_INTERVAL = 20.0
_BAR_WIDTH = 24
_REDRAW_SECONDS = 0.1
#: Every live heartbeat, stopped at exit: a daemon thread writing while the interpreter
#: shuts down can abort it ("could not acquire lock for <stderr>").
_LIVE: weakref.WeakSet = weakref.WeakSet()


def count_noun(n: int, noun: str) -> str:
    """``3, "subject"`` -> ``"3 subjects"``; ``1, "subject"`` -> ``"1 subject"``."""
    return f"{n} {noun}{'s' if n != 1 else ''}"


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

    On plain output (not a terminal) a line is printed at least every
    ``interval`` seconds until :meth:`close`, also while the caller blocks
    between updates; use it as a context manager so that it is closed.

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
            ``$HIGHRES3D_PROGRESS_INTERVAL`` or 20); ``0`` prints a line at
            every update and starts no heartbeat.
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
        self.current_phase = ""
        self.started = time.perf_counter()
        self._last_line = self.started
        self._last_draw = 0.0
        self._closed = False
        # One lock for every write (update, note, phase, close and the heartbeat), so lines never interleave.
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if self.enabled and not self.terminal and self.interval > 0:
            # The thread holds only a weak reference, so a Progress nobody closed still goes away.
            self._thread = threading.Thread(target=_heartbeat, args=(weakref.ref(self), self._stop),
                                            name=f"highres3d-progress-{desc}", daemon=True)
            _LIVE.add(self)
            self._thread.start()

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
        shown = " · ".join(text for text in (self.status, self.current_phase) if text)
        if shown:
            parts[0] += f" {shown}"
        parts.append(f"{self.rate:.3g} {self.unit}/s")
        eta = self.eta
        parts.append(f"{format_duration(self.elapsed)} elapsed" + (f", ETA {format_duration(eta)}" if eta is not None else ""))
        return " | ".join(parts)

    # ---- updates
    def update(self, steps: int = 1, status: Optional[str] = None) -> None:
        """Record ``steps`` more steps; ``status`` (e.g. ``"loss 0.43"``) is shown until replaced."""
        with self._lock:
            self.count += steps
            if status is not None:
                self.status = status
            if not self.enabled or self._closed:
                return
            now = time.perf_counter()
            if self.terminal:
                if now - self._last_draw >= _REDRAW_SECONDS or (self.total and self.count >= self.total):
                    self._draw()
                    self._last_draw = now
            elif now - self._last_line >= self.interval:
                self._print_line()

    @contextmanager
    def phase(self, text: str) -> Iterator[Progress]:
        """Name the work done inside the ``with`` block (``"validating 6 subjects"``).

        Every line printed meanwhile (the heartbeat's too) shows it after the
        status; the previous phase comes back when the block ends, so phases nest.
        """
        with self._lock:
            previous, self.current_phase = self.current_phase, text
            if self.terminal and not self._closed:
                self._draw()
        try:
            yield self
        finally:
            with self._lock:
                self.current_phase = previous
                if self.terminal and not self._closed:
                    self._draw()

    def note(self, text: str) -> None:
        """Print a message without breaking the bar."""
        with self.cleared():
            self.stream.write(text + "\n")
            self.stream.flush()

    @contextmanager
    def cleared(self) -> Iterator[None]:
        """Lets the ``with`` block print its own lines (to any stream): the bar is erased, then redrawn below them."""
        with self._lock:
            if self.terminal and not self._closed:
                self.stream.write("\r\033[K")
                self.stream.flush()
            try:
                yield
            finally:
                if self.terminal and not self._closed:
                    self._draw()

    def close(self) -> None:
        """End the display: a final line (plain output) or a newline after the bar; stops the heartbeat."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            # The heartbeat sees _closed under the lock and returns: no line after close.
            self._thread.join()
        _LIVE.discard(self)
        if not self.enabled:
            return
        with self._lock:
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

    def __del__(self) -> None:
        # A display nobody closed must not keep a heartbeat alive.
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    def _beat(self) -> Optional[float]:
        """The heartbeat's turn: print a line if none came for an interval; seconds until the next turn."""
        with self._lock:
            if self._closed:
                return None
            wait = self._last_line + self.interval - time.perf_counter()
            if wait <= 0:
                self._print_line()
                wait = self.interval
            return wait

    def _print_line(self) -> None:
        # One write per line: a line is never split by another thread's output.
        self.stream.write(self.line() + "\n")
        self.stream.flush()
        self._last_line = time.perf_counter()

    def _draw(self) -> None:
        if self.total:
            done = int(_BAR_WIDTH * min(self.count, self.total) / self.total)
            bar = f"[{'#' * done}{'.' * (_BAR_WIDTH - done)}] "
        else:
            bar = ""
        self.stream.write(f"\r\033[K{bar}{self.line()}")
        self.stream.flush()


def _heartbeat(ref: weakref.ref, stop: threading.Event) -> None:
    """Print ``ref()``'s line whenever an interval passed without one, until ``stop`` is set."""
    wait = 0.0
    while not stop.wait(wait):
        progress = ref()
        if progress is None:
            return
        try:
            wait = progress._beat()
        except (OSError, ValueError):
            return  # the stream was closed under us (a test's captured stream, a closed pipe)
        del progress
        if wait is None:
            return


@atexit.register
def _stop_heartbeats() -> None:
    for progress in list(_LIVE):
        progress._stop.set()
        if progress._thread is not None:
            progress._thread.join(timeout=1.0)


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
