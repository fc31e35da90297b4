"""Parallel worker processes on one machine: spawn, CPU threads, prefixed output, failures and Ctrl-C.

:func:`run_in_workers` runs one function in N fresh Python processes
(multiprocessing's ``spawn`` start method: a process that has TensorFlow loaded
must never be forked) and waits for them.  Each worker

- limits TensorFlow to its share of the CPUs (:func:`limit_cpu_threads`,
  when ``threads`` is given) before TensorFlow starts, so N workers do not
  fight over the cores;
- gets its share of the machine's NVIDIA GPUs (:func:`gpu_placement`:
  ``CUDA_VISIBLE_DEVICES`` set before TensorFlow starts): the GPUs are dealt
  out so that no two workers share one while there are enough, and workers
  that must share one grow their GPU memory as needed instead of each taking
  nearly all of it at start, which would end the second worker with an
  out-of-memory error;
- prints through :class:`LinePrefixStream`: every line it writes to standard
  output or standard error reaches the parent whole, prefixed with
  ``[worker i/N] ``, on the parent's standard output (through its ``echo``) or
  standard error.  The stream is not a terminal, so
  :class:`highres3d.progress.Progress` prints plain lines there, never a bar
  that would fight with the other workers' bars;
- on Ctrl-C stops its work the way the single-process command does (the
  trainer saves a checkpoint) and exits.

A failing worker does not stop the others; once all have ended, the parent
raises one :class:`~highres3d.errors.WorkerError` naming every failed worker,
its exit code and its last error message.  On Ctrl-C the parent makes sure
each worker gets exactly one interrupt (a terminal sends it to the whole
process group; a notebook's interrupt reaches the parent alone), waits for them
to save their work and re-raises :class:`KeyboardInterrupt`; a second Ctrl-C
stops the workers at once.
"""
from __future__ import annotations

import io
import os
import queue as queue_module
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Optional

from highres3d.errors import ConfigError, Highres3dError, WorkerError
from highres3d.memory import WORKERS_ENV
from highres3d.progress import count_noun
from highres3d.signals import Terminated, ignore_further_interrupts, sigterm_as_interrupt

#: Seconds between checks that the workers are still alive while their output is quiet.
_POLL_SECONDS = 0.2


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a scheduler's allocation), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def check_workers(workers: int) -> None:
    """Raise a :class:`ConfigError` unless ``workers`` is a whole number of processes, 1 or more."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers {workers}: expected a whole number of worker processes, 1 or more "
                          "(1 runs everything in this process)")


def visible_gpus() -> list[str]:
    """The NVIDIA GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries; ``[]`` without any.

    ``CUDA_VISIBLE_DEVICES`` itself when it is set (a scheduler's allocation:
    SLURM and most batch systems set it), up to its first invalid entry as CUDA
    reads it (``-1`` or an empty value hide every GPU); otherwise every GPU
    ``nvidia-smi -L`` lists, without starting TensorFlow in this process.
    """
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        ids = []
        for entry in (part.strip() for part in value.split(",")):
            if not entry or entry.startswith("-"):
                break
            ids.append(entry)
        return ids
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if listing.returncode != 0:
        return []
    return [str(i) for i, _ in enumerate(line for line in listing.stdout.splitlines() if line.startswith("GPU "))]


def gpu_placement(count: int, gpus: Sequence[str]) -> list[dict[str, str]]:
    """The environment variables that place each of ``count`` workers on ``gpus``.

    With at least as many GPUs as workers, worker ``i`` gets ``gpus[i::count]``
    (disjoint, every GPU used: ``training.strategy: mirrored`` spreads a run
    over its worker's share).  With fewer, worker ``i`` shares
    ``gpus[i % len(gpus)]`` and gets ``TF_FORCE_GPU_ALLOW_GROWTH=true``:
    TensorFlow otherwise reserves nearly all of a GPU's memory in the first
    process that uses it.  No GPUs: no variables.
    """
    if not gpus:
        return [{} for _ in range(count)]
    if count <= len(gpus):
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i::count])} for i in range(count)]
    return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)], "TF_FORCE_GPU_ALLOW_GROWTH": "true"} for i in range(count)]


def limit_cpu_threads(threads: int) -> None:
    """Limit TensorFlow's intra-op and inter-op thread pools to ``threads`` each.

    Must run before TensorFlow executes its first operation (a worker calls it
    first thing); later, TensorFlow refuses to change its pools.
    """
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


class LinePrefixStream(io.TextIOBase):
    """A text stream that hands every complete line, prefixed, to ``emit``; never a terminal.

    A partial line waits for its newline (or :meth:`close`), so lines from
    several workers interleave whole.  A carriage return ends a line too: a
    redrawn bar becomes a series of plain lines instead of garbage.

    Args:
        prefix: put before every line (e.g. ``"[worker 0/2] "``).
        emit: receives each prefixed line, without its newline.
    """

    def __init__(self, prefix: str, emit: Callable[[str], None]) -> None:
        super().__init__()
        self.prefix = prefix
        self._emit = emit
        self._pending = ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if self.closed:
            raise ValueError("write to a closed LinePrefixStream")
        data = (self._pending + text).replace("\r\n", "\n").replace("\r", "\n")
        *lines, self._pending = data.split("\n")
        for line in lines:
            if line:
                self._emit(self.prefix + line)
        return len(text)

    def close(self) -> None:
        """Emit a last partial line, then close."""
        if not self.closed and self._pending:
            pending, self._pending = self._pending, ""
            self._emit(self.prefix + pending)
        super().close()


def run_in_workers(
    target: Callable[..., Any],
    kwargs: Sequence[dict],
    *,
    threads: Optional[int] = None,
    gpus: Optional[Sequence[str]] = None,
    echo: Callable[[str], None] = print,
    hint: str = "",
) -> None:
    """Run ``target(**kwargs[i])`` in worker process ``i`` for every ``i``, all at once; wait for all.

    Args:
        target: a module-level function (it is pickled by name); its return
            value is ignored, what it writes goes to the parent prefixed
            ``[worker i/N] ``.
        kwargs: one dict of (picklable) keyword arguments per worker.
        threads: TensorFlow threads per worker (intra-op and inter-op), set
            before ``target`` runs; ``None`` leaves TensorFlow alone (it is not
            even imported).  A worker that trains should get
            ``max(1, available_cpus() // N)``.
        gpus: the GPUs to deal out (``CUDA_VISIBLE_DEVICES`` entries, see
            :func:`gpu_placement`); ``None``: :func:`visible_gpus`.
        echo: receives the workers' standard-output lines (their standard error
            goes to this process's standard error).
        hint: appended to the error raised when workers fail (how to resume).

    Raises:
        WorkerError: once every worker has ended, if any failed.
        KeyboardInterrupt: after Ctrl-C, once every worker has stopped.
    """
    import multiprocessing

    count = len(kwargs)
    if count < 1:
        return
    placement = gpu_placement(count, visible_gpus() if gpus is None else list(gpus))
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    processes = [context.Process(target=_worker_main,
                                 args=(target, i, count, threads, placement[i], messages, kwargs[i]),
                                 name=f"highres3d-worker-{i}") for i in range(count)]
    last_error: dict[int, str] = {}

    def deliver(message: tuple[str, int, str]) -> None:
        kind, index, text = message
        if kind == "error":
            last_error[index] = text
        elif kind == "out":
            echo(text)
        else:
            print(text, file=sys.stderr, flush=True)

    interrupted: Optional[KeyboardInterrupt] = None
    try:
        for process in processes:
            process.start()
        while True:
            try:
                deliver(messages.get(timeout=_POLL_SECONDS))
            except queue_module.Empty:
                if not any(process.is_alive() for process in processes):
                    break
            except KeyboardInterrupt as interrupt:
                if interrupted is not None:
                    raise
                interrupted = interrupt
                # A worker interrupts itself once and ignores any later SIGINT or SIGTERM, so this second
                # copy is harmless where the terminal (or the scheduler) already signalled every process.
                for process in processes:
                    if process.is_alive() and process.pid is not None:
                        os.kill(process.pid, signal.SIGINT)
                how = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
                print(f"{how}: waiting for {count} workers to save their work"
                      + ("" if isinstance(interrupt, Terminated) else " (Ctrl-C again stops them now)"),
                      file=sys.stderr, flush=True)
    except KeyboardInterrupt as interrupt:
        interrupted = interrupted or interrupt
        for process in processes:
            if process.is_alive():
                process.terminate()
    finally:
        for process in processes:
            if process.pid is not None:
                process.join()
        while True:
            try:
                deliver(messages.get_nowait())
            except (queue_module.Empty, OSError, ValueError):
                break
        messages.close()
    if interrupted is not None:
        raise interrupted
    failed = [(i, process.exitcode) for i, process in enumerate(processes) if process.exitcode != 0]
    if failed:
        parts = []
        for index, code in failed:
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            why = f": {last_error[index]}" if index in last_error else ""
            parts.append(f"worker {index}/{count} failed ({how}){why}")
        others = count - len(failed)
        summary = "; ".join(parts)
        if others:
            summary += f". The other {count_noun(others, 'worker')} finished their work"
        raise WorkerError(summary + (f". {hint}" if hint else ""), failed=failed)


def _interrupt_once(signum, frame) -> None:
    # Later SIGINTs or SIGTERMs (the parent forwards one; the terminal or the scheduler may have
    # sent one too) must not interrupt the checkpoint a first KeyboardInterrupt is saving.
    ignore_further_interrupts()
    raise KeyboardInterrupt


def _worker_main(target: Callable[..., Any], index: int, count: int, threads: Optional[int], environment: dict,
                 messages, kwargs: dict) -> None:
    """The body of worker ``index``: prefixed output, GPUs, thread limit, ``target``, an exit code for the parent."""
    signal.signal(signal.SIGINT, _interrupt_once)
    prefix = f"[worker {index}/{count}] "
    out = LinePrefixStream(prefix, lambda line: messages.put(("out", index, line)))
    err = LinePrefixStream(prefix, lambda line: messages.put(("err", index, line)))
    sys.stdout, sys.stderr = out, err
    code = 0
    try:
        # Before TensorFlow initialises CUDA, which reads both once; a user's own memory-growth choice stands.
        for name, value in environment.items():
            if name == "CUDA_VISIBLE_DEVICES" or name not in os.environ:
                os.environ[name] = value
        if "CUDA_VISIBLE_DEVICES" in environment:
            shared = "TF_FORCE_GPU_ALLOW_GROWTH" in environment
            growth = os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH") == "true"
            print(f"GPU {os.environ['CUDA_VISIBLE_DEVICES']}"
                  + (f" (shared with other workers; memory {'grows as needed' if growth else 'not grown'})"
                     if shared else ""))
        os.environ[WORKERS_ENV] = str(count)  # each worker counts on its share of the host's memory
        if threads is not None:
            limit_cpu_threads(threads)
            print(f"{count_noun(threads, 'CPU thread')} (TensorFlow intra-op and inter-op)")
        with sigterm_as_interrupt():
            target(**kwargs)
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        code = 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Highres3dError as error:
        messages.put(("error", index, str(error).splitlines()[0]))
        print(f"highres3d: error: {error}", file=sys.stderr)
        code = 2
    except BaseException as error:  # noqa: BLE001 - any failure becomes an exit code and a message for the parent
        traceback.print_exc()
        messages.put(("error", index, f"{type(error).__name__}: {error}"))
        code = 1
    finally:
        out.close()
        err.close()
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        messages.close()
        messages.join_thread()  # every line reaches the pipe before the process ends
    if code:
        sys.exit(code)
