"""The trainer measures how long its steps wait for input, logs it, and names the fixes when input-bound."""
import csv
import time

import pytest

from highres3d.config import load_config
from highres3d.data.synth import synthesize_brats
from highres3d.training import train
from highres3d.training.input_wait import ADVISE_FRACTION, InputWait, input_fixes
from highres3d.training.trainer import Trainer

TINY = [
    "sampler.window_size=[16,16,16]", "network.width_multiplier=0.25", "training.max_iter=8", "training.batch_size=2",
    "training.validation_every=100", "training.checkpoint_every=100", "inference.window_size=[32,32,32]",
    "augmentation.device=cpu", "augmentation.rotation_degrees=10",
]


def config(*extra, data_root=None):
    return load_config("demo/brats.yaml", overrides=TINY + list(extra), data_root=data_root)


def test_the_share_waited_and_when_it_is_shown_or_advised():
    wait = InputWait()
    assert wait.fraction() is None and wait.status() == "" and wait.summary(config()) is None
    for _ in range(30):
        wait.add(0.001, 0.099)
    assert wait.fraction() == pytest.approx(0.01) and wait.status() == ""
    said = wait.summary(config())
    assert said.startswith("input: the steps waited 1 % of their time for windows (median per step: 1 ms waiting, "
                           "99 ms computing, over 30 steps)") and "To shorten" not in said
    # The progress line follows the recent steps; the summary, the whole run.
    for _ in range(20):
        wait.add(0.3, 0.1)
    assert wait.status() == "input wait 75 %"
    assert wait.fraction() > ADVISE_FRACTION and "the accelerator waits for the input pipeline" in wait.summary(config())


def test_the_fixes_fit_the_run():
    cpu = input_fixes(config())
    assert cpu[0].startswith("augmentation.device: accelerator") and cpu[-1].startswith("more CPU cores")
    # training.cache: device needs the augmentation on the accelerator, so it is offered only then.
    assert not any(f.startswith("training.cache: device") for f in cpu)
    assert any(f.startswith("training.cache: device") for f in input_fixes(config("augmentation.device=accelerator")))
    assert input_fixes(config("training.cache=lazy"))[1].startswith("training.cache: disk")
    assert any(f.startswith("training.cache_dir on the node's local disk")
               for f in input_fixes(config("training.cache=disk")))
    plain = input_fixes(config("augmentation.rotation_degrees=0", "augmentation.scaling_percent=0"))
    assert not any(f.startswith("augmentation.device") for f in plain)


def test_a_starved_run_logs_its_waits_and_names_the_fixes(tmp_path, monkeypatch):
    synthesize_brats(tmp_path / "brats", 3, size="small", seed=5)
    real = Trainer._training_batches

    def slow(self, *args, **kwargs):
        batches = real(self, *args, **kwargs)

        def starved():
            for batch in batches:
                time.sleep(0.3)  # an input pipeline far slower than the step, whatever the machine's load
                yield batch

        return starved()

    monkeypatch.setattr(Trainer, "_training_batches", slow)
    said = []
    train(config("training.max_iter=6", data_root=tmp_path / "brats"), tmp_path / "run", echo=said.append)
    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # The first step builds the pipeline and traces the step: not counted; every later one is.
    assert rows[0]["input_wait_s"] == rows[0]["step_s"] == ""
    waits = [float(r["input_wait_s"]) for r in rows[1:]]
    assert len(waits) == 5 and all(w >= 0.3 for w in waits) and all(float(r["step_s"]) > 0 for r in rows[1:])
    summary = next(line for line in said if line.startswith("input: "))
    waited = int(summary.split("waited ")[1].split(" %")[0])
    assert waited > 20 and "over 5 steps" in summary
    assert "the accelerator waits for the input pipeline" in summary
    assert "  - augmentation.device: accelerator" in summary and "  - more CPU cores" in summary
