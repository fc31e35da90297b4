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


@pytest.fixture()
def default_interrupt_handlers():
    """Ctrl-C raises KeyboardInterrupt and SIGTERM raises Terminated here, whatever started this process."""
    from highres3d.signals import sigterm_as_interrupt

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])
    with sigterm_as_interrupt():
        yield
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_during_a_save_is_delivered_when_the_save_is_done(number, default_interrupt_handlers):
    from highres3d.signals import Terminated, interrupts_deferred

    done = []
    expected = Terminated if number == signal.SIGTERM else KeyboardInterrupt
    with pytest.raises(expected):
        with interrupts_deferred():
            signal.raise_signal(number)
            time.sleep(0.05)  # Python runs the handler here: without the deferral it raises now
            with interrupts_deferred():  # blocks nest
                signal.raise_signal(number)
                time.sleep(0.05)
            done.append("inner")
            done.append("saved")
    assert done == ["inner", "saved"]
    # the handlers are back: Ctrl-C's as it was, and after a SIGTERM further ones are ignored by design
    after = signal.default_int_handler if number == signal.SIGINT else signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is after


def test_an_ignored_interrupt_stays_ignored_through_a_save(default_interrupt_handlers):
    from highres3d.signals import ignore_further_interrupts, interrupts_deferred

    ignore_further_interrupts()  # what the trainer does once it is saving because of an interrupt
    with interrupts_deferred():
        signal.raise_signal(signal.SIGTERM)
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_a_checkpoint_save_holds_a_sigterm_until_it_is_whole(tmp_path, default_interrupt_handlers, monkeypatch):
    """The signal lands inside model.save (as in the CI run that hung); the checkpoint still completes."""
    import keras

    from highres3d.signals import Terminated
    from highres3d.training.run import RunFolder, RunState

    inputs = keras.Input((4, 4, 4, 1))
    model = keras.Model(inputs, keras.layers.Conv3D(2, 1)(inputs))
    save = model.save

    def save_hit_by_sigterm(path, *args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        time.sleep(0.05)
        return save(path, *args, **kwargs)

    monkeypatch.setattr(model, "save", save_hit_by_sigterm)
    run = RunFolder(tmp_path / "run")
    state = RunState(iteration=3)
    with pytest.raises(Terminated):
        run.save_checkpoint(model, [], state, keep=2)
    assert (run.checkpoint_dir / "iter_000003.keras").exists() and state.checkpoints == ["iter_000003.keras"]
    assert not list(tmp_path.rglob("*.part*"))
