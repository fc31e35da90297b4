"""NiftyNet TF1 checkpoints: built here with tf.compat.v1 under NiftyNet's names, imported, and checked
weight by weight and against a NumPy forward pass that never sees the mapping."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from highres3d.cli.main import main
from highres3d.errors import DataError
from highres3d.models import named_weights
from highres3d.niftynet.checkpoint import find_checkpoint, import_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: helpers beside the tests
from niftynet_tf1 import (
    SCOPE,
    WIDTHS,
    niftynet_variables,
    reference_forward,
    save_tf1_checkpoint,
)


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
    save_tf1_checkpoint(tmp_path / "nn", variables, 4, extra_junk={f"{SCOPE}/res_1_0/dropout/keep": np.ones(1, np.float32)})
    with pytest.raises(DataError, match="inside HighRes3DNet that HighRes3DNet does not have: HighRes3DNet/res_1_0/dropout/keep"):
        import_checkpoint(tmp_path / "nn", 4)


def test_variables_outside_the_network_are_ignored_and_reported(tmp_path):
    save_tf1_checkpoint(tmp_path / "nn", niftynet_variables(), 9, extra_junk={"loss/moving_avg": np.float32(0.3)})
    _, report = import_checkpoint(tmp_path / "nn")
    assert report.ignored["outside_the_network"] == ["loss/moving_avg"]


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
    rep = transfer.load_weights(target, run, echo=None)
    assert not rep.missing and not rep.skipped_shape and len(rep.copied) == len(named_weights(target))
    # Never replaced silently.
    assert main(["import", "niftynet", str(tmp_path / "nn"), "-o", str(run)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("token, activation", [("leakyrelu", "leaky_relu"), ("prelu", "prelu")])
def test_freeze_regex_names_are_the_checkpoint_names(token, activation):
    # A vars_to_freeze regex is matched against niftynet_variable_name: it must produce the checkpoint's own names.
    from highres3d.models import HighResNet3D, named_weights, niftynet_variable_name

    checkpoint_names = set(niftynet_variables(token=token, in_channels=2, num_classes=3))
    model = HighResNet3D(2, 3, activation=activation, filters=WIDTHS)
    ours = {niftynet_variable_name(path, activation) for path in named_weights(model)}
    assert ours == checkpoint_names
