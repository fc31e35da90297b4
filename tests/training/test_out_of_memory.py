"""Out of memory: every backend's error is recognised, and training says what to lower and keeps what it can.

A GPU cannot be made to run out of memory here, so the backends' errors are raised where a real
one would come from: the training step, the whole-subject validation, the model call of ``infer``.
"""
import json

import numpy as np
import pytest
import tensorflow as tf

import highres3d.training.trainer as trainer_module
from highres3d.cli.main import main
from highres3d.config import load_config
from highres3d.data.dataset import Dataset
from highres3d.data.synth import synthesize_brats
from highres3d.memory import HostMemoryCheck, OutOfMemory, format_bytes, host_memory_available, out_of_memory, peak_memory
from highres3d.training import train

TF_OOM = ("Graph execution error:\n\nDetected at node gradient_tape/conv_1/Conv3D defined at (most recent call last):\n"
          "  File \"train.py\", line 1\n\nOOM when allocating tensor with shape[4,64,96,96,96] and type float on "
          "/job:localhost/replica:0/task:0/device:GPU:1 by allocator GPU_1_bfc\n\t [[{{node Conv3D}}]]\n"
          "Hint: If you want to see a list of allocated tensors when OOM happens, add report_tensor_allocations_upon_oom")


class XlaRuntimeError(RuntimeError):
    """JAX's error class, by name."""


class OutOfMemoryError(RuntimeError):
    """torch's error class, by name."""


def tf_oom(message=TF_OOM):
    return tf.errors.ResourceExhaustedError(None, None, message)


def test_every_backends_out_of_memory_error_is_recognised_and_nothing_else():
    allocator = ("OOM when allocating tensor with shape[4,64,96,96,96] and type float on "
                 "/job:localhost/replica:0/task:0/device:GPU:1 by allocator GPU_1_bfc")
    assert out_of_memory(tf_oom()) == ("GPU:1", allocator)
    try:  # wrapped, as Keras and tf.distribute sometimes re-raise
        try:
            raise tf_oom()
        except tf.errors.ResourceExhaustedError as err:
            raise RuntimeError("step failed") from err
    except RuntimeError as wrapped:
        assert out_of_memory(wrapped) == ("GPU:1", allocator)
    jax = XlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.50GiB.\nBufferAssignment ...")
    assert out_of_memory(jax) == ("the device", "Out of memory while trying to allocate 12.50GiB")
    torch = OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.78 GiB total capacity; "
                             "13.1 GiB already allocated)")
    assert out_of_memory(torch) == ("GPU:0", "CUDA out of memory. Tried to allocate 2.00 GiB")
    host = MemoryError("Unable to allocate 3.1 GiB for an array with shape (240, 240, 155, 96) and data type float32")
    assert out_of_memory(host) == ("host", str(host))
    for other in (ValueError("shape mismatch"), RuntimeError("CUDA error: device-side assert triggered"),
                  tf.errors.InvalidArgumentError(None, None, "Incompatible shapes"),
                  tf.errors.ResourceExhaustedError(None, None, "Received message larger than max (9 vs. 4)"),
                  XlaRuntimeError("RESOURCE_EXHAUSTED: Received message larger than max")):
        assert out_of_memory(other) is None


def test_no_gpu_reports_no_peak():
    assert peak_memory() == []  # this machine computes on its CPU


TINY = [
    "sampler.window_size=[16,16,16]", "network.width_multiplier=0.25", "training.max_iter=6", "training.batch_size=2",
    "training.validation_every=100", "training.checkpoint_every=2", "training.max_checkpoints=3",
    "training.validation_windows=2", "inference.window_size=[32,32,32]", "augmentation.device=cpu",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    synthesize_brats(root, 4, size="small", seed=5)
    return root


def test_a_step_out_of_memory_names_the_settings_and_leaves_no_checkpoint(data, tmp_path, monkeypatch, capsys):
    real_build_loss = trainer_module.build_loss

    def build_loss(cfg, name=None):
        loss = real_build_loss(cfg, name)

        def too_big(labels, logits):
            if not tf.executing_eagerly():  # the compiled training step, not validation
                raise tf_oom()
            return loss(labels, logits)
        return too_big

    monkeypatch.setattr(trainer_module, "build_loss", build_loss)
    run_dir = tmp_path / "run"
    with pytest.raises(OutOfMemory) as caught:
        train(load_config("demo/brats.yaml", overrides=TINY, data_root=data), run_dir, echo=lambda *_: None)
    message = str(caught.value)
    assert message.startswith("out of memory on GPU:1 in the training step of iteration 1 (OOM when allocating "
                              "tensor with shape[4,64,96,96,96]")
    # The command says it in its own words, without the backend's pages, and fails.
    capsys.readouterr()
    assert main(["train", "--config", "demo/brats.yaml", "--data-root", str(data), "--run-dir", str(tmp_path / "cli"),
                 "--no-progress"] + [a for o in TINY for a in ("--set", o)]) == 2
    err = capsys.readouterr().err
    assert f"highres3d: error: {message.replace(str(run_dir), str(tmp_path / 'cli'))}" in err
    assert "Hint:" not in err and "Graph execution error" not in err
    for setting in ("training.batch_size (2;", "sampler.window_size (16x16x16;", "training.mixed_precision: bfloat16"):
        assert setting in message
    assert "training.cache: device" not in message and "fitted" not in message
    assert f"No iteration of {run_dir} was saved" in message
    assert isinstance(caught.value.__cause__, tf.errors.ResourceExhaustedError)  # -v shows the backend's own error
    assert not list(run_dir.glob("checkpoints/*"))
    assert json.loads((run_dir / "state.json").read_text())["iteration"] == 0


# The demo validates each subject in one pass; a cluster's config validates with windows.
WINDOWS = TINY + ["inference.mode=windows"]


def test_a_validation_out_of_memory_saves_the_iteration_and_a_smaller_window_resumes(data, tmp_path, monkeypatch):
    real_validate = trainer_module.Trainer._validate_volumes
    calls = []

    def validate(self, model):
        calls.append(self.cfg.inference.window_size)
        if len(calls) == 2 and self.cfg.inference.window_size == (32, 32, 32):
            raise RuntimeError("whole-subject validation failed") from tf_oom()
        return real_validate(self, model)

    monkeypatch.setattr(trainer_module.Trainer, "_validate_volumes", validate)
    monkeypatch.setattr(trainer_module, "peak_memory", lambda: [("GPU:0", 3 * 2**30), ("GPU:1", 2**29)])
    run_dir, said = tmp_path / "run", []
    with pytest.raises(OutOfMemory) as caught:
        train(load_config("demo/brats.yaml", overrides=WINDOWS, data_root=data), run_dir, echo=said.append)
    message = str(caught.value)
    # Iteration 4's step was done: its checkpoint is kept although the scheduled save came after the validation.
    assert message.startswith("out of memory on GPU:1 in the whole-subject validation of iteration 4")
    assert "inference.window_size (32x32x32;" in message and "training.batch_size" not in message
    assert f"saved up to iteration 4 ({run_dir / 'checkpoints' / 'iter_000004.keras'})" in message
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.keras")) == ["iter_000002.keras",
                                                                                   "iter_000004.keras"]
    assert not list(run_dir.rglob("*.part*"))
    # After the first step, once: how much the GPUs held at the peak.
    assert [line for line in said if "GPU memory" in line] == [
        "GPU memory at the peak of the first step: GPU:0 3.00 GiB, GPU:1 0.50 GiB"]
    # The fix the message names: smaller inference windows, which a resumed run may change.
    smaller = load_config("demo/brats.yaml", overrides=WINDOWS + ["inference.window_size=[24,24,24]"], data_root=data)
    result = train(smaller, run_dir, resume=True, echo=lambda *_: None)
    # Iteration 4's validation is not repeated: the resumed run goes on from iteration 5 and validates at 6.
    assert result.iterations == 6 and calls[2:] == [(24, 24, 24)]
    assert np.isfinite(result.best_score)


GIB = 2**30


def write_files(root, files):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_host_memory_counts_the_jobs_cgroup_limit_and_not_its_page_cache(tmp_path):
    meminfo = {"proc/meminfo": f"MemTotal: {64 * GIB // 1024} kB\nMemAvailable:   {16 * GIB // 1024} kB\n"}
    # cgroup v2, as SLURM's --mem=8G sets it on the job (the step below it has no limit of its own).
    job = "sys/fs/cgroup/system.slice/slurmstepd.scope/job_42"
    v2 = tmp_path / "v2"
    write_files(v2, {**meminfo, "proc/self/cgroup": "0::/system.slice/slurmstepd.scope/job_42/step_0\n",
                     f"{job}/memory.max": f"{8 * GIB}\n", f"{job}/memory.current": f"{3 * GIB}\n",
                     f"{job}/memory.stat": f"anon {2 * GIB}\ninactive_file {GIB}\n",
                     f"{job}/step_0/memory.max": "max\n", f"{job}/step_0/memory.current": f"{3 * GIB}\n"})
    assert host_memory_available(v2) == (6 * GIB, "the memory limit of this job's cgroup, 8.0 GiB (memory.max)")
    # cgroup v1: the job's limit, under a root whose "no limit" is 2^63 rounded to pages.
    v1 = tmp_path / "v1"
    limits = "sys/fs/cgroup/memory"
    write_files(v1, {**meminfo, "proc/self/cgroup": "5:cpuset:/slurm\n4:memory:/slurm/uid_1/job_7\n",
                     f"{limits}/memory.limit_in_bytes": "9223372036854771712\n",
                     f"{limits}/slurm/uid_1/job_7/memory.limit_in_bytes": f"{4 * GIB}\n",
                     f"{limits}/slurm/uid_1/job_7/memory.usage_in_bytes": f"{GIB}\n"})
    assert host_memory_available(v1) == (3 * GIB, "the memory limit of this job's cgroup, 4.0 GiB "
                                                  "(memory.limit_in_bytes)")
    # No limit below the machine's: its available memory; nothing readable (not Linux): unknown.
    free = tmp_path / "free"
    write_files(free, {**meminfo, "proc/self/cgroup": "0::/\n", "sys/fs/cgroup/memory.max": "max\n"})
    assert host_memory_available(free) == (16 * GIB, "the machine's available memory (MemAvailable)")
    assert host_memory_available(tmp_path / "nothing") is None


def test_loading_stops_at_the_first_volume_when_the_rest_cannot_fit(data, tmp_path, monkeypatch):
    import highres3d.memory as memory

    check = HostMemoryCheck("training", 30, "use less", available=lambda: (10 * GIB, "test"))
    for _ in range(30):
        check.loaded(300 * 2**20)  # 30 x 300 MiB fit in 10 GiB
    # Worker processes of one command (experiment --workers 2) each count on their share.
    monkeypatch.setenv("HIGHRES3D_WORKER_PROCESSES", "2")
    check = HostMemoryCheck("training", 30, "use less", available=lambda: (10 * GIB, "MemAvailable"))
    with pytest.raises(OutOfMemory, match=r"may use 5.0 GiB more \(a 1/2 share, for 2 worker processes, of MemAvailable\)"):
        check.loaded(300 * 2**20)
    monkeypatch.delenv("HIGHRES3D_WORKER_PROCESSES")
    check = HostMemoryCheck("training", 100, "use less", available=lambda: (10 * GIB, "the test's limit"))
    with pytest.raises(OutOfMemory, match=r"^training: 100 preprocessed volumes need about 29.3 GiB in RAM \(300.0 MiB "
                                          r"each, from the 1 loaded\); the 99 still to load need 29.0 GiB and this "
                                          r"process may use 10.0 GiB more \(the test's limit\)\. Stopped .*; use less$"):
        check.loaded(300 * 2**20)

    # A run whose volumes fit one and a half at a time.
    real_volume, loads = trainer_module.training_volume, []

    def training_volume(subject, cfg, *layout):
        loads.append(subject.id)
        return real_volume(subject, cfg, *layout)

    cfg = load_config("demo/brats.yaml", overrides=TINY, data_root=data)
    each = real_volume(Dataset.from_config(cfg.dataset).split("training")[0], cfg).nbytes
    monkeypatch.setattr(trainer_module, "training_volume", training_volume)
    monkeypatch.setattr(memory, "host_memory_available", lambda: (int(each * 1.5), "the test's limit"))
    # The data check, from the files' headers, stops it before anything is created.
    with pytest.raises(OutOfMemory) as caught:
        train(cfg, tmp_path / "ram", echo=lambda *_: None)
    assert not loads and not (tmp_path / "ram").exists()
    message = str(caught.value)
    assert message.startswith(f"training and validation: 3 preprocessed volumes (working-space shapes from the files' "
                              f"headers) need {format_bytes(3 * each)} and this process may use")
    assert "training.cache: disk memory-maps the training and validation volumes" in message
    assert "validation_fraction" in message
    # Without the check, loading stops after the first volume: the rest is reckoned from it.
    with pytest.raises(OutOfMemory) as caught:
        train(cfg, tmp_path / "unchecked", check_data=False, echo=lambda *_: None)
    assert len(loads) == 1
    assert str(caught.value).startswith(f"training and validation: 3 preprocessed volumes need about "
                                        f"{format_bytes(3 * each)} in RAM ({format_bytes(each)} each, from the 1 loaded)")
    # The fix it names: volumes memory-mapped from the disk cache leave none in RAM, even with room for one.
    monkeypatch.setattr(memory, "host_memory_available", lambda: (int(each * 0.5), "the test's limit"))
    cached = train(load_config("demo/brats.yaml", overrides=TINY + ["training.cache=disk", "training.max_iter=1",
                                                                      f"training.cache_dir={tmp_path / 'cache'}"],
                               data_root=data), tmp_path / "disk", echo=lambda *_: None)
    assert cached.iterations == 1
