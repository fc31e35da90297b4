"""inference.precision: bfloat16 and float32 segmentations of a synthetic subject agree."""
import keras
import nibabel as nib
import numpy as np
import pytest

from highres3d.errors import ConfigError
from highres3d.evaluation import binary_metrics
from highres3d.inference import predict_volume, resolve_precision


def ball_subject(shape=(40, 36, 32)):
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    r = np.sqrt(sum((g - n / 2) ** 2 for g, n in zip(grid, shape)))
    truth = r < 10
    rng = np.random.default_rng(0)
    t = truth.astype(np.float32)
    image = np.stack([2 * t + rng.normal(0, 0.6, shape), -t + rng.normal(0, 0.6, shape)], -1)
    return image.astype(np.float32), truth


def dice_score(a, b) -> float:
    return binary_metrics(a, b, distances=False)["dice"]


def smoothing_model():
    """Three convolutions (a mean filter, then a contrast, then per-class logits): a small real network."""
    inputs = keras.Input((None, None, None, 2))
    x = keras.layers.Conv3D(8, 3, padding="same", kernel_initializer=keras.initializers.Constant(1 / 54))(inputs)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv3D(8, 3, padding="same", kernel_initializer=keras.initializers.Constant(1 / 216))(x)
    logits = keras.layers.Conv3D(2, 1, kernel_initializer=keras.initializers.Constant([[[[[-1.0, 1.0]] * 8]]]),
                                 bias_initializer=keras.initializers.Constant([1.0, -1.0]))(x)
    model = keras.Model(inputs, logits)
    w = model.layers[-1].get_weights()
    w[0] = np.tile(np.array([-1.0, 1.0], np.float32), (1, 1, 1, 8, 1))
    model.layers[-1].set_weights(w)
    return model


@pytest.mark.parametrize("window", [None, 16])
def test_bfloat16_and_float32_segmentations_agree(window):
    image, truth = ball_subject()
    model = smoothing_model()
    f32 = predict_volume(model, image, window, overlap=0.25, precision="float32")
    bf16 = predict_volume(model, image, window, overlap=0.25, precision="bfloat16")
    assert dice_score(f32 == 1, truth) > 0.8  # the model segments the ball
    assert dice_score(bf16 == 1, f32 == 1) >= 0.99  # the stated agreement (docs/inference.md)
    # the model is left in float32
    assert all(layer.dtype_policy.name == "float32" for layer in model.layers)
    np.testing.assert_array_equal(predict_volume(model, image, window, overlap=0.25), f32)


def test_precision_values():
    assert resolve_precision("float32") == "float32" and resolve_precision("bfloat16") == "bfloat16"
    with pytest.raises(ConfigError, match="inference.precision"):
        resolve_precision("float16")


@pytest.mark.parametrize("gpus, cpu_native, expected, reason", [
    ([], True, "bfloat16", "this CPU computes bfloat16 natively"),
    ([], False, "float32", "this CPU has no native bfloat16"),
    # The GPU computes, so the host CPU's flags do not count: a V100 emulates bfloat16 even beside an AMX CPU.
    ([("Tesla V100-SXM2-32GB", (7, 0))], True, "float32", "Tesla V100-SXM2-32GB (compute capability 7.0) has no native"),
    ([("NVIDIA H100 80GB HBM3", (9, 0))], False, "bfloat16", "NVIDIA H100 80GB HBM3 (compute capability 9.0) computes"),
    ([("NVIDIA A100", (8, 0)), ("Tesla T4", (7, 5))], True, "float32", "Tesla T4 (compute capability 7.5) has no"),
    ([("unknown GPU", None)], True, "float32", "unknown GPU (compute capability unknown) has no native"),
])
def test_auto_precision_follows_the_device_that_computes(monkeypatch, gpus, cpu_native, expected, reason):
    import highres3d.inference as inference

    monkeypatch.setattr(inference, "_backend_gpus", lambda: gpus)
    monkeypatch.setattr(inference, "_cpu_has_bfloat16", lambda: cpu_native)
    assert resolve_precision("auto") == expected
    native, why = inference.native_bfloat16()
    assert native == (expected == "bfloat16") and reason in why


def test_no_gpu_is_seen_on_a_machine_without_one():
    # The probe itself (TensorFlow backend here): the CI machines have no GPU, so auto follows the CPU's flags.
    import highres3d.inference as inference

    if inference._backend_gpus():
        pytest.skip("this machine has a GPU")
    assert resolve_precision("auto") == ("bfloat16" if inference._cpu_has_bfloat16() else "float32")


def test_compute_precision_reaches_every_layer_and_restores_them():
    from highres3d.inference import compute_precision
    from highres3d.models import HighResNet3D, all_layers

    model = HighResNet3D(2, 2, width_multiplier=0.125)
    layers = all_layers(model)
    # The top-level layers + 3 + 3 + 2 sub-layers of conv_0/conv_1/conv_2 + 6 per residual block.
    assert len(layers) == len(model.layers) + 3 + 3 + 2 + 9 * 6
    with compute_precision(model, "bfloat16"):
        assert all(layer.dtype_policy.name == "mixed_bfloat16" for layer in layers)
    assert all(layer.dtype_policy.name == "float32" for layer in layers)


def test_compiled_predict_functions_are_kept_per_precision():
    # Tracing the full network costs as much as a 64³ pass: bfloat16 must not retrace at every subject.
    from highres3d.inference import _MARGIN_MODELS, compute_precision

    image, _ = ball_subject((24, 24, 24))
    model = smoothing_model()
    predict_volume(model, image, 16, precision="float32", output="logits")
    float32_fn = model.predict_function
    predict_volume(model, image, 16, precision="bfloat16", output="logits")
    assert model.predict_function is float32_fn  # the float32 function is back, not retraced
    with compute_precision(model, "bfloat16"):
        bfloat16_fn = model.predict_function
    assert bfloat16_fn is not None and bfloat16_fn is not float32_fn
    again = predict_volume(model, image, 16, precision="bfloat16", output="logits")
    with compute_precision(model, "bfloat16"):
        assert model.predict_function is bfloat16_fn
    # ... and the kept function still computes in bfloat16 (values on bfloat16's coarser grid).
    float32_logits = predict_volume(model, image, 16, precision="float32", output="logits")
    assert not np.array_equal(again, float32_logits)
    np.testing.assert_allclose(again, float32_logits, rtol=0.05, atol=0.05)
    # Two-class labels come from the model extended by its margin (one per precision, each traced once).
    labels = {p: predict_volume(model, image, 16, precision=p) for p in ("float32", "bfloat16")}
    margins = dict(_MARGIN_MODELS[model])
    functions = {p: m.predict_function for p, m in margins.items()}
    assert set(margins) == {"float32", "bfloat16"} and all(functions.values())
    for p in ("bfloat16", "float32"):
        np.testing.assert_array_equal(predict_volume(model, image, 16, precision=p), labels[p])
    assert dict(_MARGIN_MODELS[model]) == margins and {p: m.predict_function for p, m in margins.items()} == functions
    assert np.mean(labels["float32"] == labels["bfloat16"]) > 0.99
    assert np.mean(labels["bfloat16"] == (again[..., 1] > again[..., 0])) > 0.999  # computed in bfloat16 too


def test_trained_highresnet_segments_a_synthetic_subject_alike_in_both_precisions(tmp_path):
    """The shipped preset (a trained HighResNet3D) on its synthetic check subject: the stated agreement."""
    from highres3d.config import load_config
    from highres3d.data.dataset import discover_subjects
    from highres3d.data.synth import synthesize_ixi
    from highres3d.inference import predict_subject
    from highres3d.presets import get_preset
    from highres3d.transfer import load_model

    preset = get_preset("ixi_hippocampus_demo")
    cfg = load_config(preset.config_path)
    synthesize_ixi(tmp_path, 1, size="small", seed=preset.info["scores"]["check"]["seed"])
    subject = discover_subjects(tmp_path, cfg.dataset.patterns, list(cfg.dataset.modalities))[0]
    model = load_model(preset.verify())
    f32 = predict_subject(model, subject, cfg, precision="float32").labels
    bf16 = predict_subject(model, subject, cfg, precision="bfloat16").labels
    truth = np.isin(np.asarray(nib.load(subject.label).dataobj), list(cfg.preprocessing.labels))
    f32_dice, bf16_dice = dice_score(f32 == 1, truth), dice_score(bf16 == 1, truth)
    assert f32_dice > 0.8  # a real segmentation (preset.json records 0.875)
    assert dice_score(bf16 == 1, f32 == 1) >= 0.98  # the stated agreement (docs/inference.md)
    assert abs(bf16_dice - f32_dice) <= 0.01, (f32_dice, bf16_dice)
