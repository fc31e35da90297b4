"""One trainer per run folder: a lock beside the folder, held for the whole run.

Two processes training the same folder interleave their checkpoints, metrics
and best model, and ``--overwrite`` in one deletes the folder under the other.
It happens on clusters: a job submitted twice, a job-array with one run
folder for several tasks, a requeued job started while the old one is still
saving, a notebook and a terminal.  So :class:`RunLock` claims the file
``.<run name>.lock`` beside the run folder (beside, so ``--overwrite``, which
replaces the folder, cannot delete it) before anything is read or written,
and the second process stops with a message that names the holder.

The lock records the host, the process id, the scheduler's job id and when it
was taken, and a background thread touches it every :data:`HEARTBEAT_S`
seconds.  A lock is stale, and is taken over with a message, when

* its process is gone (same host, no such process id);
* it belongs to an earlier attempt of this process's scheduler job (a
  requeued SLURM job keeps its id and counts ``SLURM_RESTART_COUNT`` up);
* nobody touched it for :data:`STALE_S` seconds (a process killed on another
  host cannot be asked).
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from highres3d.environment import JOB_VARIABLES
from highres3d.errors import Highres3dError

#: Seconds between two touches of a held lock.
HEARTBEAT_S = 30.0
#: A lock nobody touched for this long belongs to a process that is gone.
STALE_S = 300.0


class RunLocked(Highres3dError):
    """Another live process trains this run folder."""


def lock_path(run_path: str | os.PathLike) -> Path:
    """The lock file of a run folder: beside it, so replacing the folder keeps the lock."""
    run_path = Path(run_path)
    return run_path.with_name(f".{run_path.name}.lock")


def _job() -> Optional[str]:
    return next((os.environ[name] for name in JOB_VARIABLES if os.environ.get(name)), None)


def _attempt() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class RunLock:
    """The lock of one run folder (a context manager; see the module docstring).

    Args:
        run_path: the run folder.
        echo: where taking over a stale lock is reported.
    """

    def __init__(self, run_path: str | os.PathLike, echo: Optional[Callable[[str], None]] = print) -> None:
        self.run_path = Path(run_path)
        self.path = lock_path(run_path)
        self.echo = echo or (lambda text: None)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._mine = ""

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raise :class:`RunLocked` when a live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "job": _job(), "attempt": _attempt(),
                  "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        self._mine = json.dumps(record)
        for _ in range(3):  # another process may take over the same stale lock at the same moment
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = read_holder(self.path)
                if not holder:
                    continue  # released meanwhile
                stale = stale_reason(holder)
                if stale is None:
                    raise self._locked(holder) from None
                if read_holder(self.path) != holder:
                    continue  # touched or replaced meanwhile: judged again
                self.echo(f"{self.run_path}: taking over the lock of {describe_holder(holder)} ({stale})")
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(self._mine + "\n")
            break
        else:
            raise self._locked(read_holder(self.path))
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="highres3d-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            if self.path.read_text().strip() == self._mine:
                self.path.unlink()
        except OSError:
            pass

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # removed by hand: nothing to keep alive

    def _locked(self, holder: dict) -> RunLocked:
        idle = time.time() - holder.get("touched", 0.0)
        return RunLocked(
            f"{self.run_path}: {describe_holder(holder)} is training this run (lock {self.path}, touched {idle:.0f} s ago); "
            f"two trainers in one folder would mix their checkpoints. Wait for it, stop it, or train elsewhere "
            f"(--run-dir). If it is gone, the lock goes stale {STALE_S / 60:.0f} minutes after its last touch, or "
            "remove the file.")


def read_holder(path: Path) -> dict:
    """The record in lock file ``path``, with ``touched`` (its modification time); ``{}`` without a lock."""
    try:
        holder = json.loads(path.read_text())
        if not isinstance(holder, dict):
            raise ValueError("not a lock record")
        holder["touched"] = path.stat().st_mtime
        return holder
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        # Unreadable (being written, or damaged): judged by its age alone.
        try:
            return {"touched": path.stat().st_mtime}
        except OSError:
            return {}


def stale_reason(holder: dict) -> Optional[str]:
    """Why a lock's holder is gone, or None while it may still be training (see the module docstring)."""
    idle = time.time() - holder.get("touched", 0.0)
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
            and not _alive(holder["pid"]):
        return "that process is gone"
    if holder.get("job") and holder.get("job") == _job() and holder.get("attempt", 0) < _attempt():
        return f"an earlier attempt of this job {holder['job']}, requeued"
    if idle >= STALE_S:
        return f"not touched for {idle / 60:.0f} minutes"
    return None


def describe_holder(holder: dict) -> str:
    """``process 4711 on node17 (job 88123) since ...``, for a message."""
    what = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
    if holder.get("job"):
        what += f" (job {holder['job']})"
    if holder.get("since"):
        what += f" since {holder['since']}"
    return what
