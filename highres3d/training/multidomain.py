"""Multi-domain pretraining (Chen et al. 2019, Med3D): one trunk, one head per source dataset.

A config with a ``datasets:`` list trains a
:class:`~highres3d.models.MultiDomainHighResNet3D`. Every iteration draws its
batch from one dataset, chosen with probability proportional to the
datasets' ``weight`` by a pure function of ``(training.seed, iteration)``
(:func:`dataset_schedule`); the batch's loss runs through the trunk and that
dataset's head only, and the optimizer updates exactly those variables, so a
step on dataset A leaves the head of dataset B untouched (weights, BN
statistics and optimizer slots).

Each dataset is preprocessed under its own config (:func:`domain_configs`):
its label map and class count, and its own working spacing, the median
spacing of its training subjects unless ``spacing`` is given
(:func:`resolve_spacings`; the resolved spacings are written to the run's
``config.yaml``). The intensity normalisation of Med3D (clip to the 0.5 and
99.5 percentiles, then z-score, per volume) is
``preprocessing.normalisation: percentile_zscore``.

The run folder is that of an ordinary run (checkpoints, ``metrics.csv``,
``best.keras``, resume); ``metrics.csv`` adds per-dataset columns
(``loss_<name>``, ``val_window_dice_<name>``, ``val_volume_dice_<name>``);
``val_volume_dice``, the best-model criterion, is their mean. The run folder or
its ``best.keras`` is a ``transfer.source`` like any other: the trunk is
copied by weight path and the target's ``conv_2`` keeps its fresh values.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from highres3d.config import Config, DatasetConfig
from highres3d.data.dataset import Dataset, write_split_csv
from highres3d.errors import DataError, Highres3dError
from highres3d.progress import count_noun
from highres3d.training.input_wait import InputWait
from highres3d.training.run import MetricsLog, RunState
from highres3d.training.stages import scheduled_lr
from highres3d.training.trainer import (
    FIRST_STEP_PHASE,
    Trainer,
    TrainResult,
    _loop_variables,
    _strategy,
    batch_data_format,
    build_loss,
    build_optimizer,
    build_sampler,
    host_memory_check,
    load_split,
    volume_dice,
)

#: Seed offset between the window streams of the datasets (dataset i draws with seed + (i + 1) * stride).
DATASET_SEED_STRIDE = 100_003
#: Stream key of the dataset choice, so it never coincides with a window stream.
_CHOICE_STREAM = 0x6D64  # "md"


def dataset_schedule(weights: Sequence[float], seed: int, iterations: int) -> np.ndarray:
    """The dataset (index) of each iteration 1..``iterations``, drawn with probabilities proportional to ``weights``.

    Iteration *i*'s choice is a pure function of ``(seed, i)``, so a resumed or
    lengthened run makes the same choices as an uninterrupted one.

    Args:
        weights: the datasets' positive sampling weights.
        seed: ``training.seed``.
        iterations: how many iterations to schedule.

    Returns:
        An int array; element ``i - 1`` is the dataset of iteration ``i``.
    """
    p = np.asarray(weights, dtype=np.float64)
    if p.ndim != 1 or not len(p) or (p <= 0).any():
        raise ValueError(f"weights: expected positive sampling weights, got {list(weights)}")
    cumulative = np.cumsum(p / p.sum())
    draws = np.array([np.random.default_rng([seed, _CHOICE_STREAM, i]).random() for i in range(1, iterations + 1)])
    return np.minimum(np.searchsorted(cumulative, draws, side="right"), len(p) - 1).astype(np.int64)


def domain_configs(cfg: Config) -> list[Config]:
    """One single-dataset config per entry of ``cfg.datasets``: what that dataset is loaded and scored with.

    Each takes its entry's files, split, ``labels``, ``other_labels``,
    ``num_classes`` and ``spacing`` (``None`` until :func:`resolve_spacings`),
    and everything else from ``cfg``.
    """
    out = []
    for d in cfg.datasets:
        dataset = DatasetConfig(**{f.name: getattr(d, f.name) for f in dataclasses.fields(DatasetConfig)})
        pp = dataclasses.replace(cfg.preprocessing, labels=dict(d.labels), other_labels=d.other_labels,
                                 spacing=d.spacing)
        out.append(dataclasses.replace(cfg, dataset=dataset, preprocessing=pp, datasets=(),
                                       network=dataclasses.replace(cfg.network, num_classes=d.num_classes)))
    return out


def resolve_spacings(cfg: Config, datasets: Sequence[Dataset]) -> Config:
    """``cfg`` with every unset ``datasets[i].spacing`` set to the median spacing of that dataset's training subjects.

    Read from the headers of the first modality (:func:`highres3d.io.nifti.median_spacing`),
    in the working orientation; deterministic, so a resumed run resolves the same spacing.
    """
    from highres3d.io.nifti import median_spacing

    entries = []
    for d, dataset in zip(cfg.datasets, datasets):
        if d.spacing is None:
            subjects = dataset.split("training")
            if not subjects:
                raise DataError(f"dataset {d.name} ({d.root}): no training subjects (splits: {dataset.counts()})")
            spacing = median_spacing([s.images[d.modalities[0]] for s in subjects], cfg.preprocessing.orientation)
            d = dataclasses.replace(d, spacing=tuple(round(v, 4) for v in spacing))
        entries.append(d)
    return dataclasses.replace(cfg, datasets=tuple(entries))


@dataclasses.dataclass
class _Domain:
    """One dataset of a multi-domain run: its config, volumes and compiled functions."""

    index: int
    name: str
    cfg: Config
    train_volumes: list
    val_volumes: list
    validation: Optional[tuple[np.ndarray, np.ndarray]] = None
    train_step: Any = None
    infer: Any = None
    iterator: Any = None


class MultiDomainTrainer(Trainer):
    """Trains one shared trunk with one head per dataset of ``cfg.datasets`` into a run folder.

    Takes the arguments of :class:`~highres3d.training.trainer.Trainer`
    (``subset`` is not supported). The run folder, checkpoints, resume,
    progress display and early stopping are those of the single-dataset
    trainer; validation is per dataset.
    """

    def _datasets(self) -> list[Dataset]:
        from highres3d.data.check import require_valid_data

        datasets = [Dataset.from_config(c.dataset) for c in domain_configs(self.cfg)]
        self.cfg = resolve_spacings(self.cfg, datasets)
        if self.check_data:
            datasets = [require_valid_data(c, show_progress=self.show_progress) for c in domain_configs(self.cfg)]
        for d, dataset in zip(self.cfg.datasets, datasets):
            for warning in dataset.warnings:
                self.echo(f"warning: {d.name}: {warning}")
        return datasets

    def _domains(self, datasets: Sequence[Dataset]) -> list[_Domain]:
        domains = []
        for i, (dcfg, dataset) in enumerate(zip(domain_configs(self.cfg), datasets)):
            name = dcfg.dataset.name
            train_subjects, val_subjects = dataset.split("training"), dataset.split("validation")
            if not train_subjects:
                raise DataError(f"{name} ({dcfg.dataset.root}): no training subjects (splits: {dataset.counts()})")
            split_file = self.run.path / f"split_{name}.csv"
            if not split_file.exists():
                write_split_csv(dict(dataset.splits), split_file, overwrite=True)
            self.echo(f"{name}: spacing {list(dcfg.preprocessing.spacing)} mm, {dcfg.network.num_classes} classes")
            # Per dataset: their volumes' sizes differ, and each dataset's first volume tells its own.
            check = host_memory_check(dcfg, train_subjects, val_subjects, name)
            train = load_split(train_subjects, dcfg, "training", f"{name} training", self.echo, self.show_progress,
                               check)
            val = load_split(val_subjects, dcfg, "validation", f"{name} validation", self.echo, self.show_progress,
                             check)
            domains.append(_Domain(i, name, dcfg, train, val))
        return domains

    def _multi_domain_model(self, state: RunState):
        import keras

        from highres3d import transfer
        from highres3d.models import build_multi_domain_model

        keras.utils.set_random_seed(self.cfg.training.seed)
        model = build_multi_domain_model(self.cfg)
        checkpoint = self.run.latest_checkpoint(state) if state.iteration > 0 else None
        if checkpoint is not None:
            model.load_weights(str(checkpoint))
            self.echo(f"resumed from {checkpoint} at iteration {state.iteration}")
        elif self.cfg.transfer.source is not None:
            transfer.load_weights(model, self.cfg.transfer.source, channel_init=self.cfg.transfer.channel_init,
                                  echo=self.echo)
        return model

    def _fit(self) -> TrainResult:
        import tensorflow as tf

        from highres3d.data.pipeline import make_validation_dataset, to_channels_last
        from highres3d.progress import Progress

        if self.subset is not None:
            raise Highres3dError("--subset: not supported by multi-domain pretraining (datasets:)")
        t = self.cfg.training
        datasets = self._datasets()
        cfg = self.cfg  # with the resolved spacings: the run's config.yaml records them
        state = self.run.prepare(cfg, resume=self.resume, overwrite=self.overwrite)
        if state.finished:
            self.echo(f"{self.run.path}: this run already finished ({state.iteration} iterations)")
            return self._result(state)
        domains = self._domains(datasets)
        strategy = _strategy(t.strategy)
        with strategy.scope():
            model = self._multi_domain_model(state)
            optimizer = build_optimizer(cfg, model)
            augment_layer = self._device_augmentation()
            loop_variables = _loop_variables(optimizer, augment_layer)
            if state.iteration > 0:
                self.run.restore_loop_variables(self.run.latest_checkpoint(state), loop_variables)

        def make_train_step(net, loss_fn, channels_first: bool):
            # The trunk and this dataset's head: the only variables the batch's loss may change.
            trainable = net.trainable_variables

            def step(images, labels):
                if channels_first:  # windows from channel-major volumes, turned to the model's layout on the device
                    images = to_channels_last(images)
                if augment_layer is not None:
                    images, labels = augment_layer((images, labels), training=True)
                with tf.GradientTape() as tape:
                    logits = net(images, training=True)
                    loss = loss_fn(labels, logits)
                    if net.losses:
                        loss = loss + tf.nn.scale_regularization_loss(tf.add_n(net.losses))
                    scaled = optimizer.scale_loss(loss)
                grads = tape.gradient(scaled, trainable)
                optimizer.apply_gradients(zip(grads, trainable))
                return loss

            @tf.function
            def train_step(images, labels):
                per_replica = strategy.run(step, args=(images, labels))
                return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

            return train_step

        weights = [d.weight for d in cfg.datasets]
        schedule = dataset_schedule(weights, t.seed, t.max_iter)
        done_before = np.bincount(schedule[:state.iteration], minlength=len(domains))
        for domain in domains:
            net = model.head(domain.name)
            domain.train_step = make_train_step(net, build_loss(domain.cfg),
                                                batch_data_format(domain.train_volumes) == "channels_first")
            domain.infer = tf.function(lambda x, net=net: net(x, training=False), reduce_retracing=True)
            seed = t.seed + DATASET_SEED_STRIDE * (domain.index + 1)
            # Each dataset's window stream resumes after the batches it already gave.
            batches = self._training_batches(strategy, build_sampler(domain.cfg), int(done_before[domain.index]),
                                             seed, volumes=domain.train_volumes)
            domain.iterator = iter(batches)
            if domain.val_volumes:
                per_volume = math.ceil(t.validation_windows / len(domain.val_volumes))
                windows = make_validation_dataset(domain.val_volumes, build_sampler(domain.cfg),
                                                  batch_size=t.batch_size, windows_per_volume=per_volume,
                                                  seed=t.seed + 7919)
                images, labels = zip(*windows.as_numpy_iterator())
                domain.validation = (np.concatenate(images)[:t.validation_windows],
                                     np.concatenate(labels)[:t.validation_windows])
        val_domains = [d for d in domains if d.val_volumes]
        validating = bool(val_domains)
        log = MetricsLog(self.run.metrics_path)
        log.truncate_after(state.iteration)
        writer = tf.summary.create_file_writer(str(self.run.tensorboard_dir))
        start_iter = state.iteration
        stop = t.max_iter if self.stop_after is None else min(t.max_iter, self.stop_after)
        self.echo(f"training {model.count_params():,} parameters ({len(domains)} heads: "
                  f"{', '.join(d.name for d in domains)}) for iterations {start_iter + 1}..{stop} -> {self.run.path}")
        clock = time.perf_counter()
        wall_before = state.wall_time
        bar = Progress(stop, "train", unit="windows", rate_scale=t.batch_size, start=start_iter,
                       enabled=self.show_progress)

        phase = "step"  # where the loop is, for the message of an out-of-memory error

        def checkpoint():
            nonlocal phase
            phase = "checkpoint"
            log.flush()
            with bar.phase("saving a checkpoint"):
                self.run.save_checkpoint(model, loop_variables, state, t.max_checkpoints)

        started = set()
        input_wait = InputWait()
        try:
            while state.iteration < stop:
                phase = "step"
                domain = domains[int(schedule[state.iteration])]
                lr = scheduled_lr(t.lr_schedule, t.lr, state.iteration, t.max_iter)
                optimizer.set_learning_rates(lr)
                # Each head's first step fills its window pipeline and traces its step.
                with (contextlib.nullcontext() if domain.name in started
                      else bar.phase(f"{domain.name}: {FIRST_STEP_PHASE}")):
                    before = time.perf_counter()
                    images, labels = next(domain.iterator)
                    fetched = time.perf_counter()
                    loss = float(domain.train_step(images, labels))
                timed = domain.name in started
                if timed:
                    input_wait.add(fetched - before, time.perf_counter() - fetched)
                if state.iteration == start_iter:
                    self._report_peak_memory()
                started.add(domain.name)
                phase = "after the step"
                if not math.isfinite(loss):
                    raise Highres3dError(
                        f"iteration {state.iteration + 1} ({domain.name}): the loss is {loss}; lower training.lr "
                        "or check the data (highres3d data check)"
                    )
                state.iteration += 1
                state.wall_time = wall_before + time.perf_counter() - clock
                row = {"loss": loss, "lr": lr, "dataset": domain.index + 1, f"loss_{domain.name}": loss,
                       "wall_time": state.wall_time}
                if timed:
                    row.update(input_wait_s=input_wait.waits[-1], step_s=input_wait.steps[-1])
                bar.update(status=" | ".join(text for text in (f"{domain.name} loss {loss:.4f}", input_wait.status())
                                             if text))
                if validating and state.iteration % t.validation_every == 0:
                    phase = "validation"
                    with bar.phase(f"validating the windows of {count_noun(len(val_domains), 'dataset')}"):
                        row.update(self._validate_windows(domains))
                scheduled = state.iteration % t.checkpoint_every == 0 or state.iteration == t.max_iter
                if scheduled and validating:
                    phase = "volume validation"
                    with bar.phase(f"validating {count_noun(sum(len(d.val_volumes) for d in val_domains), 'subject')} "
                                   f"of {count_noun(len(val_domains), 'dataset')}"):
                        row.update(self._validate_domain_volumes(domains))
                        self._update_best(model, state, row["val_volume_dice"])
                if self._record(state, row, log, writer, checkpoint, scheduled or state.iteration == stop,
                                what="mean validation Dice"):
                    break
            result = self._finish(model, state, best_saved=validating, bar=bar)
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
            for domain in domains:
                domain.iterator = None

    def _validate_windows(self, domains: Sequence[_Domain]) -> dict[str, float]:
        """Loss and window Dice of each dataset's fixed validation windows, through its own head."""
        from highres3d.metrics import MeanForegroundDice

        batch = self.cfg.training.batch_size
        row = {}
        for domain in domains:
            if domain.validation is None:
                continue
            images, labels = domain.validation
            loss_fn = build_loss(domain.cfg)
            dice = MeanForegroundDice(domain.cfg.network.num_classes)
            losses = []
            for first in range(0, len(images), batch):
                logits = domain.infer(images[first:first + batch])
                losses.append(float(loss_fn(labels[first:first + batch], logits)) * len(images[first:first + batch]))
                dice.update_state(labels[first:first + batch], logits)
            row[f"val_loss_{domain.name}"] = sum(losses) / len(images)
            row[f"val_window_dice_{domain.name}"] = float(dice.result())
        return row

    def _validate_domain_volumes(self, domains: Sequence[_Domain]) -> dict[str, float]:
        """Whole-volume Dice of each dataset's validation subjects, and their mean (the best-model criterion)."""
        from highres3d.inference import predict_volume

        inf = self.cfg.inference
        window = None if inf.mode == "whole_volume" else inf.window_size
        row = {}
        for domain in domains:
            if not domain.val_volumes:
                continue
            scores = [volume_dice(predict_volume(domain.infer, v.image, window, overlap=inf.overlap, blend=inf.blend,
                                                 batch_size=inf.batch_size), v, domain.cfg.network.num_classes)
                      for v in domain.val_volumes]
            scores = [s for s in scores if not math.isnan(s)]
            row[f"val_volume_dice_{domain.name}"] = float(np.mean(scores)) if scores else math.nan
        scored = [v for v in row.values() if not math.isnan(v)]
        row["val_volume_dice"] = float(np.mean(scored)) if scored else math.nan
        return row


def train_multi_domain(cfg: Config, run_dir=None, **options: Any) -> TrainResult:
    """Pretrain a multi-domain trunk: ``MultiDomainTrainer(cfg, run_dir, **options).fit()``.

    Args:
        cfg: a config with ``datasets``.
        run_dir: the run folder (default: ``<training.output_dir>/<config file name>``).
        **options: the keyword arguments of :class:`~highres3d.training.trainer.Trainer`.
    """
    if not cfg.datasets:
        raise Highres3dError("train_multi_domain: the config has no 'datasets' list")
    return MultiDomainTrainer(cfg, run_dir, **options).fit()
