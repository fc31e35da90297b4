"""TF1 checkpoints written under NiftyNet's names (tf.compat.v1), and a NumPy HighRes3DNet forward pass.

Shared by the checkpoint-import and INI tests; the reference forward pass reads
NiftyNet's variable names directly and never uses highres3d's mapping.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

SCOPE = "HighRes3DNet"
WIDTHS = (2, 4, 6, 3)  # conv_0/res_1, res_2, res_3, conv_1: tiny, but every channel change is exercised


def niftynet_variables(token="leakyrelu", in_channels=2, num_classes=3, seed=0, widths=None):
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

    c0, c2, c3, c4 = widths or WIDTHS
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
