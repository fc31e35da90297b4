"""``highres3d train``: iteration-based training of HighResNet3D from a config.

The loop is explicit rather than ``model.fit`` because the thesis' protocol is
iteration-based (``max_iter``, validation and checkpoints every *n*
iterations) and a resumed run must continue bit-for-bit: every training window
is a pure function of ``(seed, element index)``, so resuming at iteration *i*
restarts the window stream at element ``i * batch_size`` and, with the
restored weights and optimizer state, reproduces the uninterrupted loss curve.

A run is a sequence of stages (``training.stages``; one stage without it):
each stage freezes its layer groups, compiles its own training step and draws
from its own window stream, and the learning rate of every layer group is set
before each step (:mod:`highres3d.training.stages`,
:mod:`highres3d.training.optimizers`).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from highres3d.config import Config, SamplerConfig
from highres3d.data import histogram
from highres3d.data.cache import VolumeCache
from highres3d.data.dataset import Dataset, write_split_csv
from highres3d.data.preprocess import Volume, load_volume
from highres3d.errors import DataError, Highres3dError
from highres3d.memory import (
    HostMemoryCheck,
    OutOfMemory,
    describe_peak,
    format_bytes,
    host_memory_fix,
    out_of_memory,
    out_of_memory_error,
    peak_memory,
    training_advice,
    volumes_in_ram,
)
from highres3d.progress import count_noun
from highres3d.training import cluster
from highres3d.training.input_wait import InputWait
from highres3d.training.lock import RunLock
from highres3d.training.run import MetricsLog, RunFolder, RunState, WorkerRunFolder
from highres3d.training.stages import STAGE_SEED_STRIDE, resolve_stages, scheduled_lr, stage_at, write_stage_plan

#: What the progress line says while the first step of a run (or of a stage) fills the pipeline and compiles.
FIRST_STEP_PHASE = "first batch, compiling the training step"


@dataclass
class TrainResult:
    """What a finished (or early-stopped) run produced."""

    run_dir: Path
    iterations: int
    best_score: Optional[float]
    best_iteration: Optional[int]
    wall_time: float
    stopped_early: bool


# --------------------------------------------------------------------------- building blocks


def build_optimizer(cfg: Config, model: Any):
    """The optimizer of a run: one per layer group when any stage uses per-group rates, else one.

    Args:
        cfg: the config (``training.optimizer``, ``lr``, ``mixed_precision``,
            ``lr_multipliers``, ``lr_decay``, ``stages``).
        model: the built model whose parameters it updates.

    Returns:
        A :class:`~highres3d.training.optimizers.GroupOptimizer`; its learning
        rates are set every iteration by the trainer.
    """
    from highres3d.training.optimizers import GroupOptimizer
    from highres3d.training.stages import uses_group_rates

    t = cfg.training
    # Only float16 needs loss scaling; bfloat16 has float32's exponent range.
    return GroupOptimizer(model, t.optimizer, t.lr, per_group=uses_group_rates(cfg),
                          mixed_precision=t.compute_dtype == "float16")


def build_loss(cfg: Config, name: Optional[str] = None):
    """The training loss of a config (or the loss ``name`` of a stage, with the config's class weights)."""
    from highres3d.losses import get_loss

    kwargs = {}
    if cfg.training.class_weights is not None:
        kwargs["class_weights"] = list(cfg.training.class_weights)
    return get_loss(name or cfg.training.loss, **kwargs)


def build_sampler(cfg: Config, settings: Optional[SamplerConfig] = None):
    """The training window sampler of a config (or of a stage's sampler ``settings``)."""
    from highres3d import samplers

    s = settings or cfg.sampler
    common = dict(edge_policy=s.edge_policy, pad_value=s.pad_value, label_pad_value=s.label_pad_value)
    if s.type == "uniform":
        return samplers.UniformSampler(s.window_size, **common)
    if s.type == "label":
        return samplers.WeightedSampler(s.window_size, "label", **common)
    return samplers.ClassWeightedSampler(s.window_size, s.class_probabilities, **common)


def labelled_volume(subject, cfg: Config) -> Volume:
    """One subject preprocessed as ``cfg`` says, its label map required (training and validation)."""
    return load_volume(subject, cfg.preprocessing, cfg.dataset.modalities, label_required=True,
                       num_classes=cfg.network.num_classes)


def training_volume(subject, cfg: Config, layout: str = "channel_major") -> Volume:
    """:func:`labelled_volume` with the image in ``layout`` memory (:func:`~highres3d.samplers.in_layout`).

    The training pipeline copies its windows from it; it reads as ``(X, Y, Z, C)`` either way.
    Volumes loaded lazily and those of the disk cache are channel-major; those kept in RAM take
    the layout :func:`~highres3d.samplers.fastest_layout` finds faster (:func:`load_volumes`).
    (``training.cache: device`` needs neither: its volumes are copied to the accelerator once.)
    """
    from highres3d.samplers import in_layout

    volume = labelled_volume(subject, cfg)
    volume.image = in_layout(volume.image, layout)
    return volume


def batch_data_format(volumes) -> str:
    """``data_format`` of the training batches drawn from ``volumes``: the one that copies fastest from them.

    ``"channels_first"`` from channel-major memory (the training step turns
    the batches to the model's layout on the device,
    :func:`~highres3d.data.pipeline.to_channels_last`), ``"channels_last"``
    from interleaved memory.  Loaders (``training.cache: lazy``) give
    channel-major volumes (:func:`training_volume`).
    """
    from highres3d.samplers import is_channel_major

    image = getattr(volumes[0], "image", None) if len(volumes) else None
    return "channels_last" if image is not None and not is_channel_major(image) else "channels_first"


def load_volumes(subjects, cfg: Config, what: str, echo: Callable[[str], None],
                 show_progress: Optional[bool] = None, layout: Optional[str] = None,
                 check: Optional[HostMemoryCheck] = None, cache: Optional[VolumeCache] = None) -> list[Volume]:
    """Preprocess subjects into RAM, reporting progress and the memory they take.

    ``layout``: each in that memory layout, as :func:`training_volume` gives it, for the
    training pipeline; ``"auto"``: the layout windows copy out of the first volume fastest
    on this machine (:func:`~highres3d.samplers.fastest_layout`), for all of them; None: as loaded.
    ``check``: told of every volume, it stops the loading as soon as the rest cannot fit.
    ``cache``: the volumes come memory-mapped from it (``training.cache: disk``; channel-major),
    preprocessed into it first where missing.
    """
    from highres3d.progress import track
    from highres3d.samplers import fastest_layout, in_layout

    volumes = []
    start = time.perf_counter()
    chosen = ""
    for subject in track(subjects, f"preprocess {what}", unit="subjects", enabled=show_progress):
        if cache is not None:
            volumes.append(cache.volume(subject, cfg, functools.partial(training_volume, subject, cfg)))
            continue
        if layout is None:
            volume = labelled_volume(subject, cfg)
        elif layout == "auto":  # the first volume, as loaded, decides the layout of all
            volume = training_volume(subject, cfg, "interleaved")
            layout, rates = fastest_layout(volume.image, cfg.sampler.window_size)
            volume.image = in_layout(volume.image, layout)
            if rates:
                measured = ", ".join(f"{name.replace('_', '-')} {rate:,.0f}/s" for name, rate in rates.items())
                chosen = f"; {layout.replace('_', '-')} memory, which windows copy out of fastest here ({measured})"
        else:
            volume = training_volume(subject, cfg, layout)
        volumes.append(volume)
        if check is not None:
            check.loaded(volumes[-1].nbytes)
    total = sum(v.nbytes for v in volumes)
    where = f"memory-mapped ({cache.describe()})" if cache is not None else "in RAM"
    echo(f"{what}: {count_noun(len(volumes), 'subject')} preprocessed in {time.perf_counter() - start:.1f} s, "
         f"{total / 2**20:.1f} MiB {where}{chosen}")
    return volumes


def host_memory_check(cfg: Config, train_subjects, val_subjects, name: str = "") -> HostMemoryCheck:
    """The check of the volumes :func:`load_split` will hold in RAM (``name``: a dataset's, for multi-domain)."""
    held = [split for split, subjects in (("training", train_subjects), ("validation", val_subjects))
            if subjects and volumes_in_ram(cfg.training.cache, split)]
    return HostMemoryCheck(f"{name} {' and '.join(held)}".strip(),
                           len(val_subjects) * ("validation" in held) + len(train_subjects) * ("training" in held),
                           host_memory_fix(cfg.training.cache))


def load_split(subjects, cfg: Config, split: str, what: str, echo: Callable[[str], None],
               show_progress: Optional[bool] = None, check: Optional[HostMemoryCheck] = None) -> list:
    """The volumes of one split (``training`` or ``validation``), kept where ``training.cache`` says.

    ``disk``: memory-mapped from ``training.cache_dir``; ``lazy`` training:
    zero-argument loaders the pipeline calls at each visit; otherwise in RAM
    (training volumes in the layout windows copy out of fastest, see :func:`load_volumes`), ``check``
    told of each one.  See :func:`highres3d.memory.volumes_in_ram`.
    """
    cache = cfg.training.cache
    if not subjects:
        return []
    if cache == "disk":
        return load_volumes(subjects, cfg, what, echo, show_progress,
                            cache=VolumeCache(cfg.training.preprocessed_dir, echo))
    if cache == "lazy" and split == "training":
        echo(f"{what}: {count_noun(len(subjects), 'subject')}, loaded lazily")
        return [functools.partial(training_volume, s, cfg, "channel_major") for s in subjects]
    return load_volumes(subjects, cfg, what, echo, show_progress,
                        layout="auto" if split == "training" and cache == "ram" else None, check=check)


def volume_dice(prediction: np.ndarray, volume: Volume, num_classes: int) -> float:
    """Mean foreground Dice of a working-space prediction: whole-volume validation's score.

    Scored by :func:`highres3d.evaluation.score_subject` (spacing from the
    working affine, absent classes left out), so it equals what ``evaluate``
    reports for the same label maps.
    """
    from highres3d.evaluation import mean_foreground, score_subject

    scores = score_subject(prediction, volume.label, affine=volume.info.working_affine,
                           classes=range(1, num_classes), distances=False)
    return mean_foreground(scores)


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Runs one training run described by a config into a run folder.

    Args:
        cfg: the config.
        run_dir: the run folder (default: ``<training.output_dir>/<config file name>``).
        resume: continue from the newest checkpoint of ``run_dir``.
        overwrite: replace an existing run in ``run_dir``.
        subset: train on the nested training subset S_k only.
        stop_after: stop (resumably) after this iteration, before ``max_iter``.
        show_progress: progress display (``None``: a bar on a terminal, plain
            lines otherwise; ``False``: none).
        echo: where messages go.
        check_data: check every training and validation subject before
            creating anything (``False`` when the caller did).
        on_step: called after every iteration as ``on_step(iteration, model,
            images, labels)`` with this worker's share of the batch as NumPy
            arrays (a hook for tests and notebooks: weight digests, window checks).

    With ``training.strategy: multi_worker`` the worker is read from ``$TF_CONFIG``
    (:mod:`highres3d.training.cluster`); a worker other than the chief writes
    into a scratch folder instead of the run folder, prefixes its messages with
    ``[worker I/N]`` and shows no progress.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: Optional[str | os.PathLike] = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        subset: Optional[int] = None,
        stop_after: Optional[int] = None,
        show_progress: Optional[bool] = None,
        echo: Callable[[str], None] = print,
        check_data: bool = True,
        on_step: Optional[Callable[[int, Any, np.ndarray, np.ndarray], None]] = None,
    ):
        self.cfg = cfg
        # One folder per config file, so brats_scratch and brats_freeze2 never collide.
        base = cfg.source_file.stem if cfg.source_file is not None else cfg.dataset.name
        name = base + (f"_S{subset}" if subset else "")
        path = run_dir if run_dir is not None else Path(cfg.training.output_dir) / name
        self.worker = (cluster.worker_from_tf_config() if cfg.training.strategy == "multi_worker"
                       else cluster.SINGLE)
        if self.worker.is_chief:
            self.run = RunFolder(path)
        else:
            self.run = WorkerRunFolder(path, self.worker.index)
            show_progress = False
            echo = functools.partial(_prefixed, echo, f"[{self.worker.label}]")
        # Histogram landmarks live in the run folder, so infer/evaluate use the ones trained with.
        self._landmark_source = cfg.preprocessing.histogram.ref_file
        self.cfg = cfg = histogram.run_config(cfg, self.run.path)
        self.resume = resume
        self.overwrite = overwrite
        self.subset = subset
        self.stop_after = stop_after
        self.show_progress = show_progress
        self.echo = echo
        self.check_data = check_data
        self.on_step = on_step
        self._state: Optional[RunState] = None

    # ---- setup
    def _dataset(self) -> Dataset:
        """The dataset, checked first (unless the caller did) so that bad data never creates a run folder."""
        from highres3d.data.check import require_valid_data

        if self.check_data:
            dataset = require_valid_data(self.cfg, subset=self.subset, show_progress=self.show_progress)
        else:
            dataset = Dataset.from_config(self.cfg.dataset)
        for warning in dataset.warnings:
            self.echo(f"warning: {warning}")
        return dataset

    def _data(self, dataset: Dataset):
        cfg = self.cfg
        train_subjects = dataset.split("training", subset=self.subset)
        val_subjects = dataset.split("validation")
        if not train_subjects:
            raise DataError(f"{cfg.dataset.root}: no training subjects (splits: {dataset.counts()})")
        histogram.ensure_run_landmarks(self._landmark_source, cfg, train_subjects, self.echo, self.show_progress)
        if not self.run.path.joinpath("split.csv").exists():
            chosen = {s.id: "training" for s in train_subjects}
            chosen.update({sid: split for sid, split in dataset.splits.items() if split != "training"})
            write_split_csv(chosen, self.run.path / "split.csv", overwrite=True)
        check = host_memory_check(cfg, train_subjects, val_subjects)
        self.train_volumes = load_split(train_subjects, cfg, "training", "training", self.echo, self.show_progress, check)
        self.val_volumes = load_split(val_subjects, cfg, "validation", "validation", self.echo, self.show_progress, check)

    def _model(self, state: RunState):
        import keras

        from highres3d import transfer
        from highres3d.models import build_model

        cfg = self.cfg
        keras.utils.set_random_seed(cfg.training.seed)
        if cfg.training.compute_dtype != "float32":
            keras.mixed_precision.set_global_policy(f"mixed_{cfg.training.compute_dtype}")
        model = build_model(cfg)
        checkpoint = self.run.latest_checkpoint(state) if state.iteration > 0 else None
        if checkpoint is not None:
            model.load_weights(str(checkpoint))
            self.echo(f"resumed from {checkpoint} at iteration {state.iteration}")
        elif cfg.transfer.source is not None:
            transfer.load_weights(model, cfg.transfer.source, channel_init=cfg.transfer.channel_init,
                                  inflate=cfg.transfer.inflate, inflate_alpha=cfg.transfer.inflate_alpha,
                                  inflate_sigma=cfg.transfer.inflate_sigma, echo=self.echo)
            groups = (transfer.transfusion_groups(cfg.transfer.transfusion) if cfg.transfer.transfusion is not None
                      else list(cfg.transfer.mean_var))
            if groups:
                transfer.mean_var_reinit(model, groups, source=cfg.transfer.source, seed=cfg.training.seed,
                                         echo=self.echo)
        return model

    def _enter_stage(self, model, stage):
        """Freezes what ``stage`` freezes; returns the variables it trains."""
        from highres3d import transfer

        report = transfer.freeze(model, stage.freeze or None, bn_policy=self.cfg.transfer.bn_policy)
        if report.frozen:
            self.echo(report.summary())
        return model.trainable_variables

    # ---- run
    def fit(self) -> TrainResult:
        import keras

        from highres3d.environment import require_usable_gpus

        # Before the data check and preprocessing: a job that booked GPUs must not find out hours later.
        require_usable_gpus(f"train {self.run.shared_path}")
        previous_policy = keras.mixed_precision.global_policy()
        # The chief alone writes the run folder, so it alone holds its lock.
        lock = contextlib.nullcontext() if isinstance(self.run, WorkerRunFolder) else RunLock(self.run.path, self.echo)
        try:
            with lock:
                return self._fit()
        except Exception as err:
            if self.cfg.training.strategy != "multi_worker" or not cluster.is_worker_failure(err):
                raise
            state = self._state
            done = self.run.checkpoint_iterations(state) if state is not None else []
            raise cluster.worker_failure(err, state.iteration + 1 if state is not None else None,
                                         done[-1] if done else None, self.run.shared_path) from None
        finally:
            # Mixed precision is a process-wide setting: later runs and models must not inherit it.
            keras.mixed_precision.set_global_policy(previous_policy)
            if isinstance(self.run, WorkerRunFolder):
                self.run.cleanup()

    def _fit(self) -> TrainResult:
        import tensorflow as tf

        from highres3d.data.pipeline import to_channels_last
        from highres3d.metrics import MeanForegroundDice
        from highres3d.progress import Progress

        cfg = self.cfg
        t = cfg.training
        # Created first: MultiWorkerMirroredStrategy must connect before any other TensorFlow op.
        strategy = _strategy(t.strategy)
        if t.strategy == "multi_worker":
            self.echo(self.worker.describe())
            # The chief's folder is ready (or every worker stops) before any other worker reads it.
            dataset, state = cluster.together(strategy, self.worker, lambda: (
                self._dataset(), self.run.prepare(cfg, resume=self.resume, overwrite=self.overwrite)))
            if isinstance(self.run, WorkerRunFolder):
                state = self.run.chief_state()
        else:
            dataset = self._dataset()
            state = self.run.prepare(cfg, resume=self.resume, overwrite=self.overwrite)
        self._state = state
        if state.finished:
            self.echo(f"{self.run.shared_path}: this run already finished ({state.iteration} iterations)")
            return self._result(state)
        self._data(dataset)
        stages = resolve_stages(cfg)
        # Rewritten on resume too: a longer max_iter lengthens the last stage.
        write_stage_plan(stages, self.run.stages_path)
        with strategy.scope():
            model = self._model(state)
            optimizer = build_optimizer(cfg, model)
            augment_layer = self._device_augmentation()
            loop_variables = _loop_variables(optimizer, augment_layer)
            if state.iteration > 0:
                self.run.restore_loop_variables(self.run.latest_checkpoint(state), loop_variables)

        # Outside the strategy's scope: one copy of the volumes per machine, not one per replica.
        try:
            resident = self._resident_volumes()
        except Exception as err:
            found = out_of_memory(err)
            if found is None:
                raise
            raise out_of_memory_error("placing the training volumes on the device", found,
                                      training_advice(cfg, "device cache", found[0])) from err

        channels_first = batch_data_format(self.train_volumes) == "channels_first"

        def make_train_step(trainable, loss_fn):
            def step(batch):
                if resident is not None:
                    # training.cache 'device': the batch is window positions; the windows are cut here, on the device.
                    images, labels = resident.cut(batch)
                else:
                    # Channel-first windows (from channel-major volumes) turned to the model's layout on the device.
                    images, labels = (to_channels_last(batch[0]) if channels_first else batch[0]), batch[1]
                if augment_layer is not None:
                    images, labels = augment_layer((images, labels), training=True)
                with tf.GradientTape() as tape:
                    logits = model(images, training=True)
                    # Keras losses already divide by the number of replicas; the
                    # regulariser must be scaled the same way, so that the gradients
                    # summed over replicas equal those of the whole batch.
                    loss = loss_fn(labels, logits)
                    if model.losses:
                        loss = loss + tf.nn.scale_regularization_loss(tf.add_n(model.losses))
                    scaled = optimizer.scale_loss(loss)
                grads = tape.gradient(scaled, trainable)
                optimizer.apply_gradients(zip(grads, trainable))
                return loss

            # One compiled step per stage: freezing changes the variables and the BN modes it traces.
            @tf.function
            def train_step(batch):
                per_replica = strategy.run(step, args=(batch,))
                return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

            return train_step

        validation = self._validation_windows() if self.val_volumes else None
        validation_loss = build_loss(cfg)
        self._window_dice = MeanForegroundDice(cfg.network.num_classes)
        # A plain compiled call: Keras' predict_on_batch would split batches across replicas.
        self._infer = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        log = MetricsLog(self.run.metrics_path)
        log.truncate_after(state.iteration)
        writer = tf.summary.create_file_writer(str(self.run.tensorboard_dir))
        start_iter = state.iteration
        stop = t.max_iter if self.stop_after is None else min(t.max_iter, self.stop_after)
        stage, iterator, batches, train_step = None, None, None, None
        self.echo(f"training {model.count_params():,} parameters for iterations {start_iter + 1}..{stop} "
                  f"in {count_noun(len(stages), 'stage')} -> {self.run.path}")
        clock = time.perf_counter()
        wall_before = state.wall_time
        bar = Progress(stop, "train", unit="windows", rate_scale=t.batch_size, start=start_iter,
                       enabled=self.show_progress)

        # Workers see different windows, so their BatchNorm statistics differ: averaged before they are used.
        average_statistics = (cluster.averager(strategy, model.non_trainable_weights)
                              if t.strategy == "multi_worker" else lambda: None)

        # Where the loop is, for the message of an out-of-memory error (memory.training_advice).
        phase = "step"
        input_wait = InputWait()

        def checkpoint():
            nonlocal phase
            phase = "checkpoint"
            log.flush()
            with bar.phase("saving a checkpoint"):
                self.run.save_checkpoint(model, loop_variables, state, t.max_checkpoints)

        try:
            while state.iteration < stop:
                # A stage's first step builds its window pipeline and traces its step: often the longest wait.
                first_step = contextlib.ExitStack()
                timed = True  # the input wait of every step but these first ones
                if stage is None or state.iteration + 1 > stage.last:
                    timed = False
                    stage = stage_at(stages, state.iteration)
                    first_step.enter_context(bar.phase(
                        (f"stage {stage.index + 1}: " if len(stages) > 1 else "") + FIRST_STEP_PHASE))
                    del iterator, batches
                    trainable = self._enter_stage(model, stage)
                    train_step = make_train_step(trainable, build_loss(cfg, stage.loss))
                    # The window stream of a stage depends on the stage and the position in it only,
                    # so a run resumed mid-stage draws the windows the uninterrupted run drew.
                    batches = self._training_batches(strategy, build_sampler(cfg, stage.sampler),
                                                     start_batch=state.iteration - stage.first + 1,
                                                     seed=t.seed + STAGE_SEED_STRIDE * stage.index,
                                                     positions_only=resident is not None)
                    iterator = iter(batches)
                    where = "starts" if state.iteration + 1 == stage.first else "resumes"
                    self.echo(f"{stage.describe()} {where} at iteration {state.iteration + 1}; "
                              f"{sum(int(np.prod(v.shape)) for v in trainable):,} parameters trainable")
                lr = scheduled_lr(t.lr_schedule, stage.lr, state.iteration + 1 - stage.first, stage.iterations)
                optimizer.set_learning_rates(lr, stage.multipliers)
                phase = "step"
                with first_step:
                    before = time.perf_counter()
                    batch = next(iterator)
                    fetched = time.perf_counter()
                    loss = float(train_step(batch))
                if timed:
                    input_wait.add(fetched - before, time.perf_counter() - fetched)
                if state.iteration == start_iter:
                    self._report_peak_memory()
                phase = "after the step"
                if not math.isfinite(loss):
                    raise Highres3dError(
                        f"iteration {state.iteration + 1}: the loss is {loss}; lower training.lr or check the data "
                        "(highres3d data check)"
                    )
                state.iteration += 1
                state.wall_time = wall_before + time.perf_counter() - clock
                row = {"loss": loss, "lr": lr, "stage": stage.index + 1, "wall_time": state.wall_time}
                if timed:
                    row.update(input_wait_s=input_wait.waits[-1], step_s=input_wait.steps[-1])
                bar.update(status=" | ".join(text for text in (f"loss {loss:.4f}", input_wait.status()) if text))
                validate = validation is not None and state.iteration % t.validation_every == 0
                scheduled = state.iteration % t.checkpoint_every == 0 or state.iteration == t.max_iter
                if validate or scheduled or state.iteration == stop:
                    average_statistics()
                if self.on_step is not None:
                    if resident is not None:
                        images, labels = (t.numpy() for t in resident.cut(_local(strategy, batch)))
                    else:
                        images, labels = (_local(strategy, part) for part in batch)
                        if channels_first:
                            images = np.moveaxis(images, 1, 4)
                    self.on_step(state.iteration, model, images, labels)
                if validate:
                    phase = "validation"
                    with bar.phase(f"validating {count_noun(len(validation[0]), 'window')}"):
                        row.update(self._validate(model, validation_loss, validation))
                if scheduled and self.val_volumes:
                    phase = "volume validation"
                    with bar.phase(f"validating {count_noun(len(self.val_volumes), 'subject')}"):
                        row["val_volume_dice"] = self._validate_volumes(model)
                        self._update_best(model, state, row["val_volume_dice"])
                if self._record(state, row, log, writer, checkpoint, scheduled or state.iteration == stop):
                    break
            result = self._finish(model, state, best_saved=bool(self.val_volumes), bar=bar)
            self._report_input_wait(input_wait, bar)
            return result
        except KeyboardInterrupt as interrupt:
            self._interrupted(state, bar, start_iter, checkpoint, interrupt)
            raise
        except Exception as err:
            self._raise_if_out_of_memory(err, state, bar, start_iter, checkpoint, phase)
            raise
        finally:
            bar.close()
            writer.flush()
            # A live iterator over numpy_function stages can hang the interpreter at exit.
            del iterator, batches

    def _record(self, state: RunState, row: dict, log, writer, checkpoint: Callable[[], None],
                save: bool, what: str = "validation Dice") -> bool:
        """Log one iteration's row, checkpoint when ``save``; True when ``patience`` says stop."""
        import tensorflow as tf

        log.log(state.iteration, row)
        with writer.as_default(step=state.iteration):
            for key, value in row.items():
                tf.summary.scalar(key, value)
        # The run state never runs ahead of a checkpoint, so a resumed run
        # continues exactly from what is on disk.
        if save:
            checkpoint()
        patience = self.cfg.training.patience
        if patience and state.validations_since_best >= patience:
            state.stopped_early = True
            self.echo(f"early stop at iteration {state.iteration}: no better {what} "
                      f"in {patience} whole-volume validations (best {state.best_score:.4f} "
                      f"at {state.best_iteration})")
            return True
        return False

    def _interrupted(self, state: RunState, bar, start_iter: int, checkpoint: Callable[[], None],
                     interrupt: KeyboardInterrupt) -> None:
        """Ctrl-C or SIGTERM: checkpoint what is not on disk yet, say how to continue (the caller re-raises)."""
        from highres3d.signals import Terminated

        bar.close()
        if state.iteration > start_iter and state.iteration not in self.run.checkpoint_iterations(state):
            checkpoint()
        how = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
        self.echo(f"{how} at iteration {state.iteration}; checkpoint saved, continue with --resume")

    def _raise_if_out_of_memory(self, err: Exception, state: RunState, bar, start_iter: int,
                                checkpoint: Callable[[], None], phase: str) -> None:
        """When ``err`` is an out-of-memory error: raise the :class:`OutOfMemory` that says what to lower.

        ``phase`` is where the loop was (see :func:`highres3d.memory.training_advice`).  What a checkpoint
        can keep is saved first.
        """
        found = out_of_memory(err)
        if found is not None:
            raise self._out_of_memory(state, bar, start_iter, checkpoint, found, phase) from err

    def _out_of_memory(self, state: RunState, bar, start_iter: int, checkpoint: Callable[[], None],
                       found: tuple[str, str], phase: str) -> OutOfMemory:
        """The error that says what ran out of memory and what to lower; saves what a checkpoint can keep.

        A step that failed may have updated some weights before the allocation that failed (TensorFlow
        applies each variable's update as soon as its gradient exists), so only a failure after the
        step, in validation, leaves weights that a checkpoint may keep.
        """
        bar.close()
        what = {"step": f"the training step of iteration {state.iteration + 1}",
                "validation": f"the window validation of iteration {state.iteration}",
                "volume validation": f"the whole-subject validation of iteration {state.iteration}",
                "checkpoint": f"saving the checkpoint of iteration {state.iteration}"}.get(
                    phase, f"iteration {state.iteration}")
        saved = self.run.checkpoint_iterations(state)
        if phase not in ("step", "checkpoint") and state.iteration > start_iter and state.iteration not in saved:
            checkpoint()
            saved = self.run.checkpoint_iterations(state)
        advice = training_advice(self.cfg, phase, found[0])
        if phase == "step" and state.iteration > start_iter and found[0] != "host":
            advice.append(f"iterations {start_iter + 1}..{state.iteration} fitted: another process may be using "
                          "the GPU (nvidia-smi), or its memory fragmented (TF_GPU_ALLOCATOR=cuda_malloc_async)")
        if saved:
            after = (f"The run is saved up to iteration {saved[-1]} ({self.run.checkpoint_path(saved[-1])}); "
                     "--resume continues it with its own config (inference.window_size, inference.batch_size and "
                     "training.cache may change), a smaller batch or window is a new run (--run-dir).")
        else:
            after = (f"No iteration of {self.run.shared_path} was saved; after the change start again "
                     "(--overwrite reuses that folder).")
        return out_of_memory_error(what, found, advice, after)

    def _report_input_wait(self, input_wait: InputWait, bar) -> None:
        """At the end of the run, after the progress line: how long the steps waited for input, and the fixes."""
        bar.close()
        said = input_wait.summary(self.cfg)
        if said:
            self.echo(said)

    def _report_peak_memory(self) -> None:
        """After the run's first step: how much each GPU held at the peak, the room a larger batch has."""
        peaks = describe_peak(peak_memory())
        if peaks:
            self.echo(f"GPU memory at the peak of the first step: {peaks}")

    def _finish(self, model, state: RunState, best_saved: bool, bar) -> TrainResult:
        """At the end of the run: the final model (and the best one, when no validation chose it).

        ``bar`` is the run's :class:`~highres3d.progress.Progress`, still open, so that the save is announced.
        """
        if state.iteration >= self.cfg.training.max_iter or state.stopped_early:
            state.finished = True
            with bar.phase("saving the final model"):
                self.run.save_model(model, self.run.final_model_path)
                if not best_saved:
                    self.run.save_model(model, self.run.best_model_path)
                self.run.save_state(state)
        return self._result(state)

    def _result(self, state: RunState) -> TrainResult:
        return TrainResult(self.run.shared_path, state.iteration, state.best_score, state.best_iteration,
                           state.wall_time, state.stopped_early)

    # ---- data
    def _augmentation(self):
        from highres3d.augment import AffineAugmentation

        augmentation = AffineAugmentation.from_config(self.cfg.augmentation)
        return None if augmentation.is_identity else augmentation

    def _training_batches(self, strategy, sampler, start_batch: int, seed: int, volumes=None,
                          positions_only: bool = False):
        """The window stream of ``seed``, positioned at batch ``start_batch`` (a resumed run continues it).

        ``volumes`` (default: the training volumes) lets the multi-domain trainer draw one stream per dataset;
        ``positions_only`` streams window positions for :meth:`_resident_volumes` to cut.
        """
        from highres3d.data.pipeline import make_training_dataset

        cfg = self.cfg
        augmentation = self._augmentation()
        volumes = self.train_volumes if volumes is None else volumes

        data_format = batch_data_format(volumes)

        def dataset_fn(input_context):
            dataset = make_training_dataset(
                volumes,
                sampler,
                batch_size=cfg.training.batch_size,
                windows_per_volume=cfg.sampler.windows_per_volume,
                shuffle_buffer=cfg.training.shuffle_buffer,
                augmentation=augmentation,
                augment_on="device" if cfg.augmentation.device == "accelerator" else "cpu",
                seed=seed,
                input_context=input_context,
                echo=None,
                positions_only=positions_only,
                data_format=data_format,
            )
            return dataset.skip(start_batch)

        return strategy.distribute_datasets_from_function(dataset_fn)

    def _resident_volumes(self):
        """``training.cache: device``: the training volumes, copied to the accelerator once (else None)."""
        if self.cfg.training.cache != "device":
            return None
        from highres3d.data.pipeline import crop_geometry
        from highres3d.data.resident import ResidentVolumes

        cfg = self.cfg
        sampler = build_sampler(cfg)
        crop_size, margin = crop_geometry(sampler, self._augmentation(), "device")
        resident = ResidentVolumes(self.train_volumes, crop_size, margin, sampler.pad_value, sampler.label_pad_value)
        self.echo(f"training: {count_noun(len(self.train_volumes), 'volume')} held on the device "
                  f"({format_bytes(resident.nbytes)} on its first device); the pipeline sends window positions only")
        return resident

    def _device_augmentation(self):
        """The on-device resampling layer, when augmentation runs inside the training step."""
        augmentation = self._augmentation()
        if augmentation is None or self.cfg.augmentation.device != "accelerator":
            return None
        from highres3d.augment import RandomAffine3D

        return RandomAffine3D.from_augmentation(augmentation, self.cfg.sampler.window_size, seed=self.cfg.training.seed)

    def _validation_windows(self) -> tuple[np.ndarray, np.ndarray]:
        """A fixed set of validation windows, drawn once, so scores are comparable across iterations."""
        from highres3d.data.pipeline import make_validation_dataset

        cfg = self.cfg
        per_volume = math.ceil(cfg.training.validation_windows / len(self.val_volumes))
        batches = make_validation_dataset(self.val_volumes, build_sampler(cfg), batch_size=cfg.training.batch_size,
                                          windows_per_volume=per_volume, seed=cfg.training.seed + 7919)
        images, labels = zip(*batches.as_numpy_iterator())
        n = cfg.training.validation_windows
        return np.concatenate(images)[:n], np.concatenate(labels)[:n]

    def _validate(self, model, loss_fn, validation) -> dict[str, float]:
        images, labels = validation
        batch = self.cfg.training.batch_size
        losses = []
        self._window_dice.reset_state()
        for first in range(0, len(images), batch):
            logits = self._infer(images[first:first + batch])
            losses.append(float(loss_fn(labels[first:first + batch], logits)) * len(images[first:first + batch]))
            self._window_dice.update_state(labels[first:first + batch], logits)
        return {"val_loss": sum(losses) / len(images), "val_window_dice": float(self._window_dice.result())}

    def _validate_volumes(self, model) -> float:
        from highres3d.inference import predict_volume

        inf = self.cfg.inference
        scores = []
        for volume in self.val_volumes:
            window = None if inf.mode == "whole_volume" else inf.window_size
            prediction = predict_volume(self._infer, volume.image, window, overlap=inf.overlap, blend=inf.blend,
                                        batch_size=inf.batch_size)
            scores.append(volume_dice(prediction, volume, self.cfg.network.num_classes))
        # A volume without any foreground class has no score; the mean is over those that have one.
        scores = [v for v in scores if not math.isnan(v)]
        return float(np.mean(scores)) if scores else math.nan

    def _update_best(self, model, state: RunState, score: float) -> None:
        if not math.isnan(score) and (state.best_score is None or score > state.best_score):
            state.best_score = score
            state.best_iteration = state.iteration
            state.validations_since_best = 0
            self.run.save_model(model, self.run.best_model_path)
        else:
            state.validations_since_best += 1


def _strategy(name: str):
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def _local(strategy, value) -> np.ndarray:
    """This worker's share of a distributed batch, as one NumPy array."""
    return np.concatenate([np.asarray(v) for v in strategy.experimental_local_results(value)])


def _prefixed(echo: Callable[[str], None], prefix: str, message: str) -> None:
    echo(f"{prefix} {message}")


def _loop_variables(optimizer, augment_layer) -> list:
    """Everything besides the weights that a resumed run needs: every optimizer's state and RNG states."""
    variables = list(optimizer.variables)
    if augment_layer is not None:
        variables.append(augment_layer.seed_generator.state)
    return variables


def train(cfg: Config, run_dir: Optional[str | os.PathLike] = None, **options: Any) -> TrainResult:
    """Train the model a config describes: ``Trainer(cfg, run_dir, **options).fit()``.

    Args:
        cfg: the config.
        run_dir: the run folder (default: ``<training.output_dir>/<config file name>``).
        **options: the keyword arguments of :class:`Trainer` (``resume``,
            ``overwrite``, ``subset``, ``stop_after``, ``show_progress``,
            ``echo``, ``check_data``, ``on_step``).  Unless ``check_data=False`` (a caller
            that checked already), every subject of the training and validation
            splits is checked first (:func:`highres3d.data.check.require_valid_data`):
            a problem stops training with the full list before the run folder
            is created.  A config with ``datasets`` trains a multi-domain
            trunk (:class:`~highres3d.training.multidomain.MultiDomainTrainer`).
    """
    if cfg.datasets:
        from highres3d.training.multidomain import MultiDomainTrainer

        return MultiDomainTrainer(cfg, run_dir, **options).fit()
    return Trainer(cfg, run_dir, **options).fit()
