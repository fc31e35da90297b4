"""SIGTERM, what a scheduler sends at a job's time limit, on preemption or scancel, stops training like Ctrl-C.

In a file of its own so that pytest-xdist's --dist loadfile can run it beside the long trainer tests.
"""
import csv
import json
import signal
import subprocess
import sys
import time

import pytest

from highres3d.config import load_config
from highres3d.data.synth import synthesize_brats
from highres3d.training import train

# test_trainer.py's tiny run, with rare validation and a checkpoint every 3 iterations (metrics.csv
# reaches the disk with each checkpoint, so the signal lands mid-run).
OVERRIDES = [
    "sampler.window_size=[16,16,16]", "network.width_multiplier=0.25", "training.batch_size=2",
    "training.validation_windows=2", "inference.window_size=[32,32,32]", "augmentation.device=cpu",
    "training.max_iter=100000", "training.checkpoint_every=3", "training.max_checkpoints=2",
    "training.validation_every=1000",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    synthesize_brats(root, 5, size="small", seed=3)
    return root


def test_sigterm_saves_a_checkpoint_and_resume_continues(data, tmp_path):
    # What a scheduler does at a job's time limit, on preemption or scancel: SIGTERM, SIGKILL a while later.
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "highres3d", "train", "--config", "demo/brats.yaml", "--data-root", str(data),
               "--run-dir", str(run_dir), "--no-progress"] + [a for o in OVERRIDES for a in ("--set", o)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = run_dir / "metrics.csv", time.time() + 300
    while process.poll() is None and time.time() < deadline and not (
            metrics.exists() and len(metrics.read_text().splitlines()) > 3):
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 143, err[-3000:]
    assert "highres3d: terminated (SIGTERM)" in err
    state = json.loads((run_dir / "state.json").read_text())
    done = state["iteration"]
    assert done >= 3 and not state["finished"]
    assert f"terminated (SIGTERM) at iteration {done}; checkpoint saved, continue with --resume" in out + err
    assert (run_dir / "checkpoints" / f"iter_{done:06d}.keras").exists()
    assert not list(run_dir.rglob("*.part*"))
    resumed = load_config("demo/brats.yaml", overrides=OVERRIDES + [f"training.max_iter={done + 2}"], data_root=data)
    result = train(resumed, run_dir, resume=True, echo=lambda *_: None)
    assert result.iterations == done + 2
    with open(metrics, newline="") as handle:
        assert [int(row["iteration"]) for row in csv.DictReader(handle)][-2:] == [done + 1, done + 2]
