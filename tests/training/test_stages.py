"""Multi-stage training (training.stages): plan, freezing per stage, run folder records, resume mid-stage."""
import csv

import keras
import numpy as np
import pytest

from highres3d.config import load_config
from highres3d.data.synth import synthesize_brats
from highres3d.errors import ConfigError
from highres3d.models import GROUPS, build_model, layer_group
from highres3d.training import train
from highres3d.training.stages import (
    dual_stage,
    gradual_unfreezing,
    read_stage_plan,
    resolve_stages,
    scheduled_lr,
    stage_at,
    with_stages,
)

TINY = [
    "sampler.window_size=[16,16,16]",
    "network.width_multiplier=0.25",
    "training.max_iter=6",
    "training.batch_size=2",
    "training.validation_every=3",
    "training.checkpoint_every=3",
    "training.max_checkpoints=3",
    "training.validation_windows=2",
    "inference.window_size=[32,32,32]",
    "augmentation.device=cpu",
]

# Dual-stage training (Havaei et al. 2017) with discriminative rates in stage 1.
DUAL = [
    "training.lr_decay=2.6",
    "training.stages=[{name: balanced, iterations: 3, sampler: {type: class_weighted, class_probabilities: [0.5, 0.5]}},"
    " {name: natural, iterations: 3, freeze: all_but_last, sampler: {type: uniform}, lr: 0.01, loss: cross_entropy}]",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    synthesize_brats(root, 5, size="small", seed=3)
    return root


def tiny_config(data, *extra):
    return load_config("demo/brats.yaml", overrides=TINY + list(extra), data_root=data)


def metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def parameters(path):
    model = keras.models.load_model(str(path), compile=False)
    return {w.path: np.asarray(w) for w in model.weights if "moving" not in w.path}


def test_stages_fill_unset_keys_from_the_run(data):
    cfg = tiny_config(data, *DUAL)
    first, second = resolve_stages(cfg)
    assert (first.name, first.first, first.last, second.first, second.last) == ("balanced", 1, 3, 4, 6)
    assert first.freeze == cfg.transfer.freeze and second.freeze == "all_but_last"
    assert first.sampler.type == "class_weighted" and first.sampler.window_size == (16, 16, 16)
    assert second.sampler.type == "uniform" and second.sampler.class_probabilities is None
    assert first.lr == cfg.training.lr and second.lr == 0.01
    assert first.loss == cfg.training.loss and second.loss == "cross_entropy"
    assert first.multipliers["conv_0"] == pytest.approx(2.6 ** -5) and second.multipliers == first.multipliers
    assert stage_at([first, second], 2) is first and stage_at([first, second], 3) is second
    # no stages: one stage over max_iter with the run's settings
    (only,) = resolve_stages(tiny_config(data))
    assert (only.first, only.last, only.multipliers) == (1, 6, {g: 1.0 for g in GROUPS})


def test_gradual_unfreezing_trains_one_more_group_per_stage(data):
    from highres3d import transfer

    cfg = with_stages(tiny_config(data), gradual_unfreezing(2, last_stage=4))
    stages = resolve_stages(cfg)
    assert cfg.training.max_iter == 14 and [s.freeze for s in stages] == [5, 4, 3, 2, 1, 0]
    model = build_model(cfg)
    trainable = []
    for stage in stages:
        report = transfer.freeze(model, stage.freeze)
        trainable.append([g for g in GROUPS if g not in report.frozen_groups])
    assert trainable == [list(GROUPS[k:]) for k in (5, 4, 3, 2, 1, 0)]
    dual = resolve_stages(with_stages(cfg, dual_stage(4, 2, [0.3, 0.7], natural_lr=1e-5)))
    assert [(s.sampler.type, s.freeze, s.lr) for s in dual] == [
        ("class_weighted", 0, cfg.training.lr), ("uniform", "all_but_last", 1e-5)]
    assert dual[0].sampler.class_probabilities == (0.3, 0.7)


@pytest.mark.parametrize("override, message", [
    ("training.stages=[{iterations: 2}]", "sum to 2 but training.max_iter is 6"),
    ("training.stages=[{iterations: 6, freeze: [res1]}]", r"training.stages\[0\].freeze: unknown layer group 'res1'"),
    ("training.stages=[{freeze: 2}]", r"training.stages\[0\].iterations: required"),
    ("training.stages=[{iterations: 6, sampler: {class_probabilities: [1, 1, 1]}}]", "expected 2 values"),
    ("training.stages=[{iterations: 6, lr_decay: 2.6, lr_multipliers: {conv_2: 1}}]", "not both"),
    ("training.lr_multipliers={conv2: 0.5}", "unknown layer group 'conv2', did you mean 'conv_2'"),
    ("training.stages=[{iterations: 6, loss: dise}]", r"training.stages\[0\].loss: expected one of 'dice'"),
])
def test_bad_stages_name_the_key(data, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(data, override)


def test_scheduled_lr_matches_keras_schedules():
    cosine = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=40, alpha=0.01)
    step = keras.optimizers.schedules.PiecewiseConstantDecay([20, 30], [0.1, 0.01, 0.001])
    for i in (0, 1, 19, 20, 21, 30, 31, 39, 40):
        assert scheduled_lr("cosine", 0.1, i, 40) == pytest.approx(float(cosine(i)), rel=1e-5)
        assert scheduled_lr("step", 0.1, i, 40) == pytest.approx(float(step(i)), rel=1e-6)
        assert scheduled_lr("constant", 0.1, i, 40) == 0.1


def test_dual_stage_run_freezes_per_stage_records_boundaries_and_resumes_mid_stage(data, tmp_path):
    cfg = tiny_config(data, *DUAL)
    full = tmp_path / "full"
    lines = []
    train(cfg, full, echo=lines.append)
    plan = read_stage_plan(full / "stages.csv")
    assert [(r["name"], r["first_iteration"], r["last_iteration"], r["freeze"], r["sampler"]) for r in plan] == [
        ("balanced", "1", "3", "0", "class_weighted"), ("natural", "4", "6", "all_but_last", "uniform")]
    assert any("stage 2 'natural'" in line and "starts at iteration 4" in line for line in lines)
    rows = metrics(full)
    assert [int(r["stage"]) for r in rows] == [1, 1, 1, 2, 2, 2]
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-3] * 3 + [0.01] * 3)
    # Stage 2 trains only the classifier: everything else is as stage 1 left it.
    end_1, end_2 = parameters(full / "checkpoints/iter_000003.keras"), parameters(full / "model.keras")
    for path in end_1:
        same = np.array_equal(end_1[path], end_2[path])
        assert same == (layer_group(path) != "conv_2"), path

    # Stopped in the middle of stage 2, then resumed: the same losses and the same final weights,
    # which needs every group's optimizer state and the stage's window stream restored.
    split = tmp_path / "split"
    assert train(cfg, split, stop_after=4, echo=lambda *_: None).iterations == 4
    resumed = []
    train(cfg, split, resume=True, echo=resumed.append)
    assert any("stage 2 'natural'" in line and "resumes at iteration 5" in line for line in resumed)
    np.testing.assert_allclose([float(r["loss"]) for r in metrics(split)], [float(r["loss"]) for r in rows],
                               rtol=1e-4, atol=1e-6)
    final_full, final_split = parameters(full / "model.keras"), parameters(split / "model.keras")
    for path in final_full:
        np.testing.assert_allclose(final_split[path], final_full[path], rtol=1e-4, atol=1e-6, err_msg=path)


def test_resume_restores_every_group_optimizer(data, tmp_path):
    cfg = tiny_config(data, "training.lr_decay=2.6", "training.max_iter=4")
    run = tmp_path / "run"
    train(cfg, run, stop_after=3, echo=lambda *_: None)
    state = np.load(run / "checkpoints/iter_000003.state.npz")
    # six optimizers, each: iterations, learning rate, then Adam's two moments per parameter
    parameter_count = sum(1 for w in build_model(cfg).weights if "moving" not in w.path)
    assert len(state.files) == 6 * 2 + 2 * parameter_count
    iterations = [int(state[k]) for k in sorted(state.files) if state[k].shape == () and state[k].dtype.kind == "i"]
    assert iterations == [3] * 6
