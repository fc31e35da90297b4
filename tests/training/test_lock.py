"""One trainer per run folder: a second one stops with the holder's name; stale locks are taken over."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

import highres3d.training.lock as lock_module
from highres3d.cli.main import main
from highres3d.config import load_config
from highres3d.data.synth import synthesize_brats
from highres3d.training import train
from highres3d.training.lock import RunLock, RunLocked, lock_path

TINY = ["sampler.window_size=[16,16,16]", "network.width_multiplier=0.25", "training.max_iter=1",
        "training.validation_every=100", "inference.window_size=[32,32,32]", "augmentation.rotation_degrees=0",
        "augmentation.scaling_percent=0"]


def hold(run_path, pid, host=None, job=None, attempt=0, age_s=0.0):
    """A lock file as another process would have left it."""
    path = lock_path(run_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "job": job, "attempt": attempt,
                                "since": "2026-12-03T10:00:00+00:00"}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


@pytest.fixture
def other_process():
    """A live process that is not this one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_live_holder_stops_a_second_trainer_before_anything_is_touched(tmp_path, other_process, capsys):
    synthesize_brats(tmp_path / "brats", 3, size="small", seed=2)
    cfg = load_config("demo/brats.yaml", overrides=TINY, data_root=tmp_path / "brats")
    run_dir = tmp_path / "runs" / "brats"
    run_dir.mkdir(parents=True)
    holders = json.dumps({"iteration": 3, "checkpoints": []})
    (run_dir / "state.json").write_text(holders)
    hold(run_dir, other_process, job="77")
    # highres3d status names who trains it.
    assert main(["status", str(tmp_path / "runs")]) == 0
    assert capsys.readouterr().out.startswith(
        f"brats: iteration 3, no validation yet; training now: process {other_process} on {socket.gethostname()} "
        "(job 77) since 2026-12-03T10:00:00+00:00, alive ")
    for options in (dict(resume=True), dict(overwrite=True)):
        with pytest.raises(RunLocked) as caught:
            train(cfg, run_dir, echo=lambda *_: None, **options)
        message = str(caught.value)
        assert message.startswith(f"{run_dir}: process {other_process} on {socket.gethostname()} (job 77) since "
                                  "2026-12-03T10:00:00+00:00 is training this run")
        assert "--run-dir" in message and str(lock_path(run_dir)) in message
    # --overwrite did not delete the folder from under the holder.
    assert (run_dir / "state.json").read_text() == holders
    # Once the holder is gone, the next trainer takes the lock over and says so.
    os.kill(other_process, 9)
    os.waitpid(other_process, 0)
    assert main(["status", str(run_dir)]) == 0
    assert capsys.readouterr().out == (f"{run_dir}: iteration 3, no validation yet; stopped at iteration 3; --resume "
                                       "continues it (its lock is stale: that process is gone)\n")
    said = []
    train(cfg, run_dir, overwrite=True, echo=said.append)
    assert any(f"taking over the lock of process {other_process}" in line and "that process is gone" in line
               for line in said)
    assert not lock_path(run_dir).exists()  # released at the end
    assert json.loads((run_dir / "state.json").read_text())["finished"]
    assert main(["status", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("runs/brats: iteration 1/1, ") and f"; finished; last on {socket.gethostname()}" in shown
    assert main(["status", str(tmp_path / "nothing")]) == 2
    assert "nothing: no such folder" in capsys.readouterr().err


def test_stale_locks(tmp_path, other_process, monkeypatch):
    run = tmp_path / "run"
    # On another host a process cannot be asked: stale once nobody has touched the lock for STALE_S.
    hold(run, 123, host="elsewhere", age_s=lock_module.STALE_S - 60)
    with pytest.raises(RunLocked, match="process 123 on elsewhere"):
        RunLock(run, echo=None).acquire()
    hold(run, 123, host="elsewhere", age_s=lock_module.STALE_S + 60)
    said = []
    with RunLock(run, echo=said.append):
        assert json.loads(lock_path(run).read_text())["pid"] == os.getpid()
        assert "not touched for 6 minutes" in said[0]
    assert not lock_path(run).exists()
    # A requeued SLURM job keeps its id and counts its restarts: the earlier attempt is over.
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    hold(run, other_process, job="42", attempt=0)
    with RunLock(run, echo=said.append):
        assert "an earlier attempt of this job 42, requeued" in said[-1]
    # The same attempt of the same job (two trainers in one allocation) is a live holder.
    hold(run, other_process, job="42", attempt=1)
    with pytest.raises(RunLocked):
        RunLock(run, echo=None).acquire()


def test_the_heartbeat_keeps_a_long_run_fresh_and_release_leaves_a_taken_over_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "HEARTBEAT_S", 0.05)
    run = tmp_path / "run"
    with RunLock(run, echo=None):
        old = time.time() - 3600
        os.utime(lock_path(run), (old, old))
        time.sleep(0.3)
        assert time.time() - lock_path(run).stat().st_mtime < 5
        # Taken over by another process (say, after a long freeze): releasing must not remove its lock.
        lock_path(run).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    assert json.loads(lock_path(run).read_text())["host"] == "elsewhere"
