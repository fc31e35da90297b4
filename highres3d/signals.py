"""SIGTERM handled like Ctrl-C: what a batch scheduler sends before it kills a job.

SLURM (like most schedulers) sends SIGTERM at a job's time limit, on
preemption and on ``scancel``, then SIGKILL after a grace period (SLURM's
``KillWait``, 30 s by default; ``#SBATCH --signal=TERM@120`` asks for the
signal 120 s before the limit).  Python's default for SIGTERM is to die on the
spot, losing every iteration since the last scheduled checkpoint.

Inside :func:`sigterm_as_interrupt` (the CLI's ``main`` and every worker
process) a SIGTERM instead raises :class:`Terminated`, a
:class:`KeyboardInterrupt`, so whatever saves its work on Ctrl-C does so here
too: training writes a resumable checkpoint, worker pools stop the same way,
atomic writes leave no partial file.  After the first SIGTERM or Ctrl-C,
further ones are ignored, so the checkpoint being saved is not cut short (the
scheduler may deliver the signal to every process of a job more than once).
The library itself installs no handler: a notebook keeps its own.

:func:`interrupts_deferred` holds SIGINT and SIGTERM back for the length of a
block (a checkpoint or model save) and delivers them when it ends: an
interrupt raised inside Keras' zip and HDF5 writing can leave the writer
half-done, and the save that the interrupt itself asks for then hung (seen
in a CI run, where the signal landed while the scheduled checkpoint of that
iteration was being written).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Terminated", "sigterm_as_interrupt", "ignore_further_interrupts", "interrupts_deferred"]


class Terminated(KeyboardInterrupt):
    """A SIGTERM, raised where the main thread was, as Ctrl-C raises KeyboardInterrupt."""


def ignore_further_interrupts() -> None:
    """From now on ignore SIGINT and SIGTERM (a first one is being handled: a checkpoint is being saved)."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)


def _raise_terminated(signum, frame) -> None:
    ignore_further_interrupts()
    raise Terminated("SIGTERM")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, a SIGTERM raises :class:`Terminated`; the previous handlers come back after it.

    Only the main thread may set signal handlers; elsewhere the block changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive within the block are delivered when it ends, as its previous handlers would.

    An ignored signal stays ignored. Blocks nest. Only the main thread receives
    signals; elsewhere the block changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum, frame) -> None:
        caught.append(signum)

    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    for number, handler in previous.items():
        # None: a handler installed outside Python, which cannot be restored from here.
        if handler not in (signal.SIG_IGN, None):
            signal.signal(number, hold)
    try:
        yield
    finally:
        for number, handler in previous.items():
            if signal.getsignal(number) is hold:
                signal.signal(number, handler)
        for number in dict.fromkeys(caught):
            signal.raise_signal(number)
