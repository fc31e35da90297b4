"""NiftyNet TF1 checkpoints: built here with tf.compat.v1 under NiftyNet's names, imported, and checked
weight by weight and against a NumPy forward pass that never sees the mapping."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from highres3d.cli.main import main
from highres3d.errors import DataError
from highres3d.models import named_weights
from highres3d.niftynet.checkpoint import find_checkpoint, import_checkpoint

SCOPE = "HighRes3DNet"
WIDTHS = (2, 4, 6, 3)  # conv_0/res_1, res_2, res_3, conv_1: tiny, but every channel change is exercised


def niftynet_variables(token="leakyrelu", in_channels=2, num_classes=3, seed=0):
    """NiftyNet's HighRes3DNet variables by name, with random values (BN statistics included)."""
    rng = np.random.default_rng(seed)
    v = {}

    def bn(prefix, c):
        v[f"{prefix}/gamma"] = rng.uniform(0.5, 1.5, c)
        v[f"{prefix}/beta"] = rng.normal(0, 0.2, c)
        v[f"{prefix}/moving_mean"] = rng.normal(0, 0.3, c)
        v[f"{prefix}/moving_variance"] = rng.uniform(0.5, 2.0, c)

    def conv(prefix, k, cin, cout):
        # He-like scale keeps activations O(1), so float32 vs float64 differences stay ~1e-6.
        v[f"{prefix}/w"] = rng.normal(0, np.sqrt(2.0 / (k ** 3 * cin)), (k, k, k, cin, cout))

    def act(prefix, c):
        if token == "prelu":
            v[f"{prefix}/alpha"] = rng.uniform(0.0, 0.3, c)

    c0, c2, c3, c4 = WIDTHS
    block = f"{SCOPE}/conv_0_bn_{token}"
    conv(f"{block}/conv_", 3, in_channels, c0)
    bn(f"{block}/bn_", c0)
    act(f"{block}/{token}_acti_", c0)
    cin = c0
    for stage, width in ((1, c0), (2, c2), (3, c3)):
        for b in range(3):
            p = f"{SCOPE}/res_{stage}_{b}"
            bn(f"{p}/bn_0", cin)
            act(f"{p}/{token}_acti_0", cin)
            conv(f"{p}/conv_0", 3, cin, width)
            bn(f"{p}/bn_1", width)
            act(f"{p}/{token}_acti_1", width)
            conv(f"{p}/conv_1", 3, width, width)
            cin = width
    block = f"{SCOPE}/conv_1_bn_{token}"
    conv(f"{block}/conv_", 1, c3, c4)
    bn(f"{block}/bn_", c4)
    act(f"{block}/{token}_acti_", c4)
    conv(f"{SCOPE}/conv_2_bn/conv_", 1, c4, num_classes)
    bn(f"{SCOPE}/conv_2_bn/bn_", num_classes)
    return {k: np.asarray(a, np.float32) for k, a in v.items()}


def save_tf1_checkpoint(model_dir, variables, iteration, extra_junk=None):
    """Write model_dir/models/model.ckpt-<iteration> the way NiftyNet's tf.train.Saver did."""
    graph = tf.Graph()
    with graph.as_default():
        made = []
        for name, value in variables.items():
            var = tf.compat.v1.get_variable(name, initializer=tf.constant(value))
            made.append((name, var, value))
            if not name.endswith(("moving_mean", "moving_variance")):
                # Adam's two slots per trainable variable.
                tf.compat.v1.get_variable(f"{name}/Adam", initializer=tf.constant(value * 0 + 0.01))
                tf.compat.v1.get_variable(f"{name}/Adam_1", initializer=tf.constant(value * 0 + 0.02))
            else:
                # TF1's zero-debiased moving averages keep a biased copy and a step counter.
                base = name.rsplit("/", 1)[0]
                tf.compat.v1.get_variable(f"{base}/{name}/biased", initializer=tf.constant(value * 0.5))
                tf.compat.v1.get_variable(f"{base}/{name}/local_step", initializer=tf.constant(7.0))
        tf.compat.v1.get_variable("ApplyGradients/beta1_power", initializer=tf.constant(0.9 ** iteration))
        tf.compat.v1.get_variable("ApplyGradients/beta2_power", initializer=tf.constant(0.999 ** iteration))
        tf.compat.v1.get_variable("global_step", initializer=tf.constant(iteration, tf.int64), trainable=False)
        for name, value in (extra_junk or {}).items():
            tf.compat.v1.get_variable(name, initializer=tf.constant(value))
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            (model_dir / "models").mkdir(parents=True, exist_ok=True)
            saver.save(sess, str(model_dir / "models" / "model.ckpt"), global_step=iteration)
    return model_dir


# --------------------------------------------------------------------------- NumPy reference


def conv3d(x, w, dilation=1):
    """'SAME' 3D convolution of (X, Y, Z, Cin) with (k, k, k, Cin, Cout), by explicit shifts."""
    k = w.shape[0]
    r = dilation * (k // 2)
    padded = np.pad(x, [(r, r)] * 3 + [(0, 0)])
    out = np.zeros(x.shape[:3] + (w.shape[4],), np.float64)
    X, Y, Z = x.shape[:3]
    for i in range(k):
        for j in range(k):
            for l in range(k):
                patch = padded[i * dilation:i * dilation + X, j * dilation:j * dilation + Y, l * dilation:l * dilation + Z]
                out += patch @ w[i, j, l]
    return out


def batch_norm(x, v, prefix):
    return (x - v[f"{prefix}/moving_mean"]) / np.sqrt(v[f"{prefix}/moving_variance"] + 1e-5) * v[f"{prefix}/gamma"] + v[f"{prefix}/beta"]


def activation(x, token, v, prefix):
    if token == "leakyrelu":
        return np.where(x >= 0, x, 0.02 * x)  # NiftyNet: 0.51 x + 0.49 |x|
    if token == "relu":
        return np.maximum(x, 0)
    alpha = v[f"{prefix}/alpha"]
    return np.maximum(x, 0) + alpha * (x - np.abs(x)) * 0.5


def reference_forward(image, v, token):
    """HighRes3DNet inference straight from NiftyNet's variables (no Keras, no name mapping)."""
    x = image.astype(np.float64)
    block = f"{SCOPE}/conv_0_bn_{token}"
    x = activation(batch_norm(conv3d(x, v[f"{block}/conv_/w"]), v, f"{block}/bn_"), token, v, f"{block}/{token}_acti_")
    for stage, dilation in ((1, 1), (2, 2), (3, 4)):
        for b in range(3):
            p = f"{SCOPE}/res_{stage}_{b}"
            y = activation(batch_norm(x, v, f"{p}/bn_0"), token, v, f"{p}/{token}_acti_0")
            y = conv3d(y, v[f"{p}/conv_0/w"], dilation)
            y = activation(batch_norm(y, v, f"{p}/bn_1"), token, v, f"{p}/{token}_acti_1")
            y = conv3d(y, v[f"{p}/conv_1/w"], dilation)
            extra = y.shape[-1] - x.shape[-1]
            x = y + np.pad(x, [(0, 0)] * 3 + [(extra // 2, extra - extra // 2)])
    block = f"{SCOPE}/conv_1_bn_{token}"
    x = activation(batch_norm(conv3d(x, v[f"{block}/conv_/w"]), v, f"{block}/bn_"), token, v, f"{block}/{token}_acti_")
    return batch_norm(conv3d(x, v[f"{SCOPE}/conv_2_bn/conv_/w"]), v, f"{SCOPE}/conv_2_bn/bn_")


@pytest.mark.parametrize("token", ["leakyrelu", "prelu"])
def test_import_matches_numpy_reference(tmp_path, token):
    variables = niftynet_variables(token)
    save_tf1_checkpoint(tmp_path / "nn", variables, 40)
    model, report = import_checkpoint(tmp_path / "nn")
    assert report.iteration == 40
    assert report.architecture["in_channels"] == 2 and report.architecture["num_classes"] == 3
    assert report.architecture["activation"] == {"leakyrelu": "leaky_relu", "prelu": "prelu"}[token]
    assert tuple(report.architecture["filters"]) == WIDTHS
    # Every NiftyNet variable is used exactly once and every Keras weight filled.
    assert set(report.mapped) == set(variables)
    assert sorted(report.mapped.values()) == sorted(named_weights(model))
    trainable = sum(1 for n in variables if not n.endswith(("moving_mean", "moving_variance")))
    assert len(report.ignored["optimiser_slot"]) == 2 * trainable + 2
    assert len(report.ignored["zero_debias"]) == 2 * sum(1 for n in variables if n.endswith(("moving_mean", "moving_variance")))
    assert report.ignored["global_step"] == ["global_step"]
    image = np.random.default_rng(3).normal(size=(1, 9, 8, 10, 2)).astype(np.float32)
    expected = reference_forward(image[0], variables, token)
    got = np.asarray(model(image, training=False))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_weights_land_in_their_places(tmp_path):
    variables = niftynet_variables("leakyrelu")
    save_tf1_checkpoint(tmp_path / "nn", variables, 5)
    model, _ = import_checkpoint(tmp_path / "nn")
    w = {k: v.numpy() for k, v in named_weights(model).items()}
    np.testing.assert_array_equal(w["conv_0/conv/kernel"], variables[f"{SCOPE}/conv_0_bn_leakyrelu/conv_/w"])
    np.testing.assert_array_equal(w["res_2_0/conv_1/kernel"], variables[f"{SCOPE}/res_2_0/conv_1/w"])
    np.testing.assert_array_equal(w["res_3_2/bn_0/moving_variance"], variables[f"{SCOPE}/res_3_2/bn_0/moving_variance"])
    np.testing.assert_array_equal(w["conv_2/bn/beta"], variables[f"{SCOPE}/conv_2_bn/bn_/beta"])
    # The de-biased statistics load, not the zero-debias 'biased' copies (0.5 x the value here).
    np.testing.assert_array_equal(w["conv_1/bn/moving_mean"], variables[f"{SCOPE}/conv_1_bn_leakyrelu/bn_/moving_mean"])


def test_latest_or_chosen_iteration(tmp_path):
    save_tf1_checkpoint(tmp_path / "nn", niftynet_variables(seed=1), 100)
    save_tf1_checkpoint(tmp_path / "nn", niftynet_variables(seed=2), 250)
    assert find_checkpoint(tmp_path / "nn")[1] == 250
    assert find_checkpoint(tmp_path / "nn", 100)[1] == 100
    with pytest.raises(DataError, match="no checkpoint for iteration 7; available: 100, 250"):
        find_checkpoint(tmp_path / "nn", 7)
    with pytest.raises(DataError, match="no NiftyNet checkpoint"):
        find_checkpoint(tmp_path)


def test_misfit_lists_missing_extra_and_wrong_shapes(tmp_path):
    variables = niftynet_variables("leakyrelu")
    del variables[f"{SCOPE}/res_1_1/bn_0/gamma"]
    variables[f"{SCOPE}/res_2_1/conv_0/w"] = np.zeros((3, 3, 3, 4, 5), np.float32)
    variables[f"{SCOPE}/res_4_0/conv_0/w"] = np.zeros((3, 3, 3, 6, 6), np.float32)
    save_tf1_checkpoint(tmp_path / "nn", variables, 3)
    with pytest.raises(DataError) as err:
        import_checkpoint(tmp_path / "nn")
    message = str(err.value)
    assert "1 missing: HighRes3DNet/res_1_1/bn_0/gamma" in message
    assert "HighRes3DNet/res_2_1/conv_0/w: shape (3, 3, 3, 4, 5), expected (3, 3, 3, 4, 4)" in message
    assert "1 extra (not part of HighRes3DNet): HighRes3DNet/res_4_0/conv_0/w" in message


def test_cli_import_writes_a_run_folder_infer_and_transfer_use(tmp_path, capsys):
    from highres3d import transfer
    from highres3d.inference import load_run
    from highres3d.models import HighResNet3D

    variables = niftynet_variables("leakyrelu", num_classes=2)
    save_tf1_checkpoint(tmp_path / "nn", variables, 12)
    run = tmp_path / "imported"
    assert main(["import", "niftynet", str(tmp_path / "nn"), "-o", str(run)]) == 0
    out = capsys.readouterr().out
    assert "ignored" in out and "optimiser slot" in out and "global step" in out
    report = json.loads((run / "niftynet_import.json").read_text())
    assert report["iteration"] == 12
    model, cfg, model_file = load_run(run)
    assert model_file.name == "model.keras" and cfg.network.num_classes == 2 and cfg.dataset.modalities == ("T1", "T2")
    image = np.random.default_rng(5).normal(size=(1, 8, 8, 8, 2)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model(image, training=False))[0], reference_forward(image[0], variables, "leakyrelu"),
                               rtol=1e-4, atol=1e-4)
    # transfer.source accepts the run folder like any other.
    target = HighResNet3D(2, 2, filters=WIDTHS)
    rep = transfer.load_weights(target, run, verbose=False)
    assert not rep.missing and not rep.skipped_shape and len(rep.copied) == len(named_weights(target))
    # Never replaced silently.
    assert main(["import", "niftynet", str(tmp_path / "nn"), "-o", str(run)]) == 2
    assert "already exists" in capsys.readouterr().err
