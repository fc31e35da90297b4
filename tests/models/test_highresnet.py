"""HighResNet3D: NiftyNet's architecture, parameter counts, naming, serialisation, backends."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from highres3d.models import (
    GROUPS,
    HighResBlock,
    HighResNet3D,
    layer_group,
    named_layers,
    named_weights,
    niftynet_variable_name,
    parameter_table,
)
from highres3d.models.highresnet import SpaceToBatchConv2D, SpaceToBatchConv3D, pad_channels

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def full_model() -> HighResNet3D:
    return HighResNet3D(in_channels=2, num_classes=2)


@pytest.fixture(scope="module")
def narrow_model() -> HighResNet3D:
    keras.utils.set_random_seed(1)
    return HighResNet3D(in_channels=2, num_classes=3, width_multiplier=0.25)


# --------------------------------------------------------------------------- parameter counts


def test_trainable_parameters_per_group_match_niftynet(full_model):
    rows = {r.group: r for r in parameter_table(full_model)}
    expected = {"conv_0": 896, "res_1": 41_664, "res_2": 152_416, "res_3": 608_960, "conv_1": 5_280, "conv_2": 164}
    assert {g: rows[g].trainable for g in GROUPS} == expected
    assert rows["total"].trainable == 809_380
    assert rows["total"].non_trainable == 1_444
    assert rows["total"].frozen == 0
    assert full_model.count_params() == 809_380 + 1_444
    assert sum(int(np.prod(v.shape)) for v in full_model.trainable_weights) == 809_380


def test_niftynet_checkpoint_accounting_gives_thesis_table_6_1(full_model):
    rows = {r.group: r for r in parameter_table(full_model)}
    thesis = {"conv_0": 964, "res_1": 42_060, "res_2": 153_132, "res_3": 610_380, "conv_1": 5_602, "conv_2": 174}
    assert {g: rows[g].niftynet_checkpoint for g in GROUPS} == thesis
    assert rows["total"].niftynet_checkpoint == 812_312
    from highres3d.reporting import parameters_table

    table = str(parameters_table(full_model))
    assert "812,312" in table and "809,380" in table and table.splitlines()[3].startswith("conv_0")


# --------------------------------------------------------------------------- architecture


def test_layer_groups_names_and_niftynet_settings(full_model):
    top = [layer.name for layer in full_model.layers[1:]]
    assert top == ["conv_0"] + [f"res_{g}_{j}" for g in (1, 2, 3) for j in range(3)] + ["conv_1", "conv_2"]
    leaves = named_layers(full_model)
    convs = {p: l for p, l in leaves.items() if isinstance(l, keras.layers.Conv3D)}
    assert len(convs) == 21
    assert all(not l.use_bias and l.padding == "same" for l in convs.values())
    dilations = {p: l.dilation_rate[0] for p, l in convs.items() if p.startswith("res_")}
    assert {p: d for p, d in dilations.items() if p.startswith("res_1")} == {p: 1 for p in dilations if p.startswith("res_1")}
    assert {d for p, d in dilations.items() if p.startswith("res_2")} == {2}
    assert {d for p, d in dilations.items() if p.startswith("res_3")} == {4}
    assert convs["conv_0/conv"].kernel_size == (3, 3, 3) and convs["conv_1/conv"].kernel_size == (1, 1, 1)
    assert tuple(convs["conv_2/conv"].kernel.shape) == (1, 1, 1, 80, 2)
    bns = [l for l in leaves.values() if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bns) == 21
    assert all(b.momentum == pytest.approx(0.9) and b.epsilon == pytest.approx(1e-5) for b in bns)
    # conv_2 gives the logits: BN without activation.
    assert full_model.get_layer("conv_2").act is None and full_model.get_layer("conv_1").act is not None


def test_leaky_relu_has_niftynets_slope_0_02(narrow_model):
    act = narrow_model.get_layer("res_1_0").act_0
    out = keras.ops.convert_to_numpy(act(np.array([-1.0, 0.0, 2.0], dtype="float32")))
    np.testing.assert_allclose(out, [-0.02, 0.0, 2.0], rtol=1e-6)


def test_any_spatial_size_gives_same_size_output(narrow_model):
    # NiftyNet needed sizes divisible by 8; padding the space-to-batch sub-grids removes that constraint.
    x = np.random.default_rng(0).normal(size=(1, 13, 9, 10, 2)).astype("float32")
    y = keras.ops.convert_to_numpy(narrow_model(x, training=False))
    assert y.shape == (1, 13, 9, 10, 3)
    assert np.all(np.isfinite(y))


def test_channel_growth_zero_pads_the_skip_path_symmetrically():
    x = np.arange(2 * 16, dtype="float32").reshape(1, 1, 1, 2, 16)
    padded = keras.ops.convert_to_numpy(pad_channels(x, 32))
    np.testing.assert_array_equal(padded[..., 8:24], x)
    assert not padded[..., :8].any() and not padded[..., 24:].any()
    padded = keras.ops.convert_to_numpy(pad_channels(x[..., :5], 8))  # odd split: 1 before, 2 after
    np.testing.assert_array_equal(padded[..., 1:6], x[..., :5])
    assert not padded[..., [0, 6, 7]].any()


def _conv3d_same(x: np.ndarray, kernel: np.ndarray, dilation: int) -> np.ndarray:
    """Direct dilated 'same' convolution of one (X, Y, Z, C) volume."""
    k = kernel.shape[0]
    half = (k - 1) // 2 * dilation
    padded = np.pad(x, [(half, half)] * 3 + [(0, 0)])
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
    for i in range(k):
        for j in range(k):
            for l in range(k):
                patch = padded[
                    i * dilation : i * dilation + x.shape[0],
                    j * dilation : j * dilation + x.shape[1],
                    l * dilation : l * dilation + x.shape[2],
                ]
                out += patch @ kernel[i, j, l]
    return out


def test_residual_block_matches_a_numpy_reference_with_dilation_and_padding():
    rng = np.random.default_rng(3)
    block = HighResBlock(filters=6, dilation=2, activation="leaky_relu", name="res_2_0")
    x = rng.normal(size=(1, 7, 6, 5, 4)).astype("float32")
    block(x)  # build
    for bn in (block.bn_0, block.bn_1):
        bn.gamma.assign(rng.uniform(0.5, 1.5, bn.gamma.shape))
        bn.beta.assign(rng.normal(size=bn.beta.shape))
        bn.moving_mean.assign(rng.normal(size=bn.moving_mean.shape))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, bn.moving_variance.shape))
    got = keras.ops.convert_to_numpy(block(x, training=False))[0]

    def bn(layer, v):
        mean, var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
        return (v - mean) / np.sqrt(var + 1e-5) * layer.gamma.numpy() + layer.beta.numpy()

    def act(v):
        return np.where(v >= 0, v, 0.02 * v)

    h = _conv3d_same(act(bn(block.bn_0, x[0])), block.conv_0.kernel.numpy(), 2)
    h = _conv3d_same(act(bn(block.bn_1, h)), block.conv_1.kernel.numpy(), 2)
    skip = np.concatenate([np.zeros(x.shape[1:4] + (1,)), x[0], np.zeros(x.shape[1:4] + (1,))], axis=-1)
    np.testing.assert_allclose(got, h + skip, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize(
    "shape, dilation, kernel",
    [((2, 12, 8, 16, 3), 2, 3), ((1, 13, 9, 11, 3), 4, 3), ((1, 7, 10, 5, 2), (1, 2, 3), 3), ((3, 11, 6, 2), 3, 3),
     ((1, 9, 8, 7, 2), 2, 5), ((1, 9, 8, 7, 2), 2, 2)],
    ids=["divisible", "padded", "per-axis", "2d", "kernel-5", "even-kernel"],
)
def test_space_to_batch_dilation_equals_keras_dilation_rate_values_and_gradients(shape, dilation, kernel):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    conv, fast = (keras.layers.Conv3D, SpaceToBatchConv3D) if len(shape) == 5 else (keras.layers.Conv2D, SpaceToBatchConv2D)
    reference = conv(4, kernel, padding="same", dilation_rate=dilation, use_bias=False)
    layer = fast(4, kernel, padding="same", dilation_rate=dilation, use_bias=False)
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    reference.build(shape)
    layer.build(shape)
    layer.set_weights(reference.get_weights())

    def value_and_grads(lay, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = lay(x)
            loss = tf.reduce_sum(y * y)
        return (y,) + tuple(tape.gradient(loss, [x, lay.kernel]))

    for want, got in zip(value_and_grads(reference, x), value_and_grads(layer, x)):
        # float32 sums in another order: the kernel's gradient adds up hundreds of terms
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5 * np.abs(want.numpy()).max())
    # Unknown spatial sizes (a TensorFlow graph traced once for every window size) take the same path.
    dynamic = tf.function(layer, input_signature=[tf.TensorSpec((None,) * (len(shape) - 1) + (shape[-1],))])
    np.testing.assert_allclose(dynamic(x).numpy(), reference(x).numpy(), rtol=1e-5, atol=1e-5)


def test_dilated_blocks_use_space_to_batch_and_keep_niftynet_weight_paths(narrow_model):
    block = narrow_model.get_layer("res_3_0")
    assert isinstance(block.conv_0, SpaceToBatchConv3D) and block.conv_0.dilation_rate == (4, 4, 4)
    assert [w.path for w in block.conv_0.weights] == ["res_3_0/conv_0/kernel"]


def test_block_rejects_fewer_output_channels():
    with pytest.raises(ValueError, match="zero-padded, never projected"):
        HighResBlock(filters=4)(np.zeros((1, 4, 4, 4, 8), "float32"))


def test_activation_variants_and_errors():
    prelu = HighResNet3D(1, 2, activation="prelu", width_multiplier=0.25)
    leaky = HighResNet3D(1, 2, activation="leakyrelu", width_multiplier=0.25)  # NiftyNet spelling
    assert leaky.activation == "leaky_relu"
    # One PReLU slope per channel of every activation; the first block of res_2 / res_3
    # activates its narrower input (4 / 8 channels) before the first convolution.
    res_1, res_2, res_3 = 3 * (4 + 4), (4 + 8) + 2 * (8 + 8), (8 + 16) + 2 * (16 + 16)
    assert prelu.count_params() - leaky.count_params() == 4 + res_1 + res_2 + res_3 + 20
    assert HighResNet3D(1, 2, activation="elu", width_multiplier=0.25).count_params() == leaky.count_params()
    with pytest.raises(ValueError, match="Unknown activation 'swish'"):
        HighResNet3D(1, 2, activation="swish")
    with pytest.raises(ValueError, match="width_multiplier"):
        HighResNet3D(1, 2, width_multiplier=0)


def test_l2_follows_niftynets_decay_convention():
    model = HighResNet3D(2, 2, width_multiplier=0.25, l2_decay=0.1)
    model(np.zeros((1, 4, 4, 4, 2), "float32"))
    kernels = [v.numpy() for p, v in named_weights(model).items() if p.endswith("kernel")]
    expected = 0.1 * sum(float(np.sum(k.astype("float64") ** 2)) for k in kernels) / 2  # decay * tf.nn.l2_loss
    got = float(sum(keras.ops.convert_to_numpy(loss) for loss in model.losses))
    assert len(model.losses) == 21
    assert got == pytest.approx(expected, rel=1e-5)


def test_softmax_option_outputs_probabilities():
    model = HighResNet3D(2, 3, width_multiplier=0.25, softmax=True)
    y = keras.ops.convert_to_numpy(model(np.random.default_rng(0).normal(size=(2, 8, 8, 8, 2)).astype("float32")))
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-5)
    assert y.min() >= 0


# --------------------------------------------------------------------------- serialisation


def test_config_round_trip_and_keras_file_give_identical_outputs(narrow_model, tmp_path):
    config = narrow_model.get_config()
    assert config["in_channels"] == 2 and config["num_classes"] == 3 and config["width_multiplier"] == 0.25
    json.dumps(config)  # plain JSON
    clone = HighResNet3D.from_config(config)
    assert [w.shape for w in clone.weights] == [w.shape for w in narrow_model.weights]

    x = np.random.default_rng(5).normal(size=(2, 16, 16, 16, 2)).astype("float32")
    # Non-trivial BN statistics, so that the saved moving averages matter.
    for path, variable in named_weights(narrow_model).items():
        if path.endswith("moving_mean"):
            variable.assign(np.full(variable.shape, 0.1, "float32"))
    expected = keras.ops.convert_to_numpy(narrow_model(x, training=False))
    path = tmp_path / "model.keras"
    narrow_model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is HighResNet3D and loaded.name == "HighRes3DNet"
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x, training=False)), expected)


# --------------------------------------------------------------------------- NiftyNet names


def test_niftynet_variable_names(full_model):
    names = {p: niftynet_variable_name(p, "leaky_relu") for p in named_weights(full_model)}
    assert names["conv_0/conv/kernel"] == "HighRes3DNet/conv_0_bn_leakyrelu/conv_/w"
    assert names["conv_0/bn/moving_mean"] == "HighRes3DNet/conv_0_bn_leakyrelu/bn_/moving_mean"
    assert names["res_2_0/conv_1/kernel"] == "HighRes3DNet/res_2_0/conv_1/w"
    assert names["res_3_2/bn_0/gamma"] == "HighRes3DNet/res_3_2/bn_0/gamma"
    assert names["conv_1/bn/beta"] == "HighRes3DNet/conv_1_bn_leakyrelu/bn_/beta"
    assert names["conv_2/conv/kernel"] == "HighRes3DNet/conv_2_bn/conv_/w"
    # Every trainable variable of NiftyNet's checkpoint listing (niftynet.md 1.7) is produced once.
    assert len(set(names.values())) == len(names) == 21 + 21 * 4
    assert {layer_group(p) for p in names} == set(GROUPS)
    assert layer_group("res_2_1/conv_0/kernel") == "res_2" and layer_group("softmax") is None


# --------------------------------------------------------------------------- backends


BACKEND_AGNOSTIC = ["highres3d/models/__init__.py", "highres3d/models/highresnet.py", "highres3d/losses.py", "highres3d/metrics.py"]


@pytest.mark.parametrize("relative", BACKEND_AGNOSTIC)
def test_backend_agnostic_modules_never_import_tensorflow(relative):
    tree = ast.parse((REPO / relative).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "tensorflow" not in imported and "tf_keras" not in imported
    assert imported <= {"__future__", "keras", "numpy", "highres3d", "dataclasses", "re", "typing", "difflib", "collections"}


JAX_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    sys.modules["tensorflow"] = None  # importing TensorFlow now fails: the code must not need it
    import keras
    assert keras.backend.backend() == "jax"
    from highres3d.models import HighResNet3D
    from highres3d.losses import DiceLoss
    from highres3d.metrics import MeanForegroundDice
    model = HighResNet3D(2, 2, width_multiplier=0.25)
    model.compile(optimizer="adam", loss=DiceLoss(), metrics=[MeanForegroundDice(2)])
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 16, 2)).astype("float32")
    y = (x[..., 0] > 0.5).astype("int32")
    history = model.fit(x, y, epochs=2, verbose=0)
    out = np.asarray(model.predict(x, verbose=0))
    assert out.shape == (2, 16, 16, 16, 2) and np.isfinite(out).all()
    print("JAX_OK", history.history["loss"][-1])
    """
)


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_model_loss_and_metric_train_on_the_jax_backend():
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", JAX_SCRIPT], env=env, capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "JAX_OK" in result.stdout
