"""Progress: plain lines at least every interval, also while the caller blocks between updates."""
from __future__ import annotations

import io
import threading
import time

from highres3d.progress import Progress, track


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


def test_heartbeat_prints_the_phase_while_the_caller_blocks():
    stream = io.StringIO()
    threads = threading.active_count()
    progress = Progress(10, "train", unit="windows", rate_scale=2, stream=stream, interval=0.2)
    assert threading.active_count() == threads + 1
    progress.update(status="loss 0.5000")
    with progress.phase("validating 6 subjects"):
        time.sleep(0.75)  # no update: only the heartbeat can print
    during = _lines(stream)
    assert len(during) >= 2, during
    assert all(line.startswith("train: 1/10 (10%) loss 0.5000 · validating 6 subjects | ") for line in during)
    assert all("windows/s" in line and "ETA" in line for line in during)
    # The phase ends with its block; the status stays.
    assert progress.line().startswith("train: 1/10 (10%) loss 0.5000 | ")
    progress.close()
    closed = _lines(stream)
    assert len(closed) == len(during) + 1 and "validating" not in closed[-1]
    # The thread is gone, and nothing is printed after close.
    assert threading.active_count() == threads
    time.sleep(0.5)
    assert _lines(stream) == closed


def test_phases_nest_and_updates_reset_the_heartbeat():
    stream = io.StringIO()
    with Progress(None, "infer", stream=stream, interval=0.3) as progress:
        with progress.phase("segmenting s1"):
            with progress.phase("writing s1"):
                assert "writing s1" in progress.line() and "segmenting" not in progress.line()
            assert "segmenting s1" in progress.line()
        assert "s1" not in progress.line()
        # Steps every 0.1 s print a line per 0.3 s interval, whoever prints it: never one per step.
        for _ in range(8):
            time.sleep(0.1)
            progress.update()
        elapsed = progress.elapsed
    lines = _lines(stream)
    assert 2 <= len(lines) <= elapsed / 0.3 + 1, lines
    assert lines[-1].startswith("infer: 8 | ")


def test_no_heartbeat_on_a_terminal_and_silence_when_disabled():
    threads = threading.active_count()
    terminal = FakeTerminal()
    with Progress(4, "train", stream=terminal, interval=0.1) as progress:
        assert threading.active_count() == threads
        with progress.phase("validating"):
            time.sleep(0.3)
        progress.update()
    text = terminal.getvalue()
    # The bar is redrawn in place (it shows the phase while it lasts), never a heartbeat line.
    assert text.count("\n") == 1 and "\r\033[K[######" in text and "validating" in text

    quiet = io.StringIO()
    with Progress(4, "train", stream=quiet, interval=0.1, enabled=False) as progress:
        assert threading.active_count() == threads
        with progress.phase("validating"):
            time.sleep(0.3)
        progress.update()
        progress.note("a message")  # notes are messages, not progress: still printed
    assert quiet.getvalue() == "a message\n"


def test_interval_zero_prints_at_every_update_without_a_thread():
    stream = io.StringIO()
    threads = threading.active_count()
    with Progress(3, "train", stream=stream, interval=0) as progress:
        assert threading.active_count() == threads
        for _ in range(3):
            progress.update()
    assert len(_lines(stream)) == 4  # three updates and the final line


def test_lines_never_interleave_with_the_heartbeat():
    stream = io.StringIO()
    with Progress(2000, "train", stream=stream, interval=0.001) as progress:
        for i in range(2000):
            progress.update(status=f"loss {i}")
            if i % 100 == 0:
                progress.note(f"note {i}")
    for line in _lines(stream):
        assert line.startswith("train: ") or line.startswith("note "), line
        assert line.count("train: ") <= 1 and line.count("elapsed") <= 1, line


def test_an_abandoned_display_stops_its_heartbeat():
    threads = threading.active_count()
    stream = io.StringIO()
    progress = Progress(5, "train", stream=stream, interval=0.05)
    del progress  # never closed: the weakly held heartbeat must not outlive it
    deadline = time.monotonic() + 2
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == threads


def test_track_closes_its_display():
    threads = threading.active_count()
    stream = io.StringIO()
    assert list(track(range(3), "check", stream=stream)) == [0, 1, 2]
    assert threading.active_count() == threads
    assert _lines(stream)[-1].startswith("check: 3/3 (100%) | ")
