"""``training.mixed_precision``: bfloat16 training, with per-group learning rates, next to float32."""
import csv

import numpy as np
import pytest

from highres3d.config import load_config
from highres3d.data.synth import synthesize_brats
from highres3d.training import train

TINY = [
    "sampler.window_size=[16,16,16]",
    "network.width_multiplier=0.25",
    "training.max_iter=2",
    "training.batch_size=2",
    "training.validation_every=100",
    "training.checkpoint_every=2",
    "training.validation_windows=1",
    "inference.window_size=[32,32,32]",
    "augmentation.device=cpu",
    # One optimizer per layer group: refused with float16's loss scale, allowed with bfloat16.
    "training.lr_decay=2.6",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    synthesize_brats(root, 3, size="small", seed=5)
    return root


def first_loss(run_dir):
    with open(run_dir / "metrics.csv", newline="") as handle:
        return float(next(csv.DictReader(handle))["loss"])


def test_bfloat16_training_with_per_group_rates(data, tmp_path):
    import keras

    runs = {}
    for dtype in ("false", "bfloat16"):
        cfg = load_config("demo/brats.yaml", overrides=TINY + [f"training.mixed_precision={dtype}"], data_root=data)
        result = train(cfg, tmp_path / dtype, echo=lambda *_: None)
        assert result.iterations == 2
        runs[dtype] = first_loss(tmp_path / dtype)
    # The process-wide policy is restored after the run.
    assert keras.mixed_precision.global_policy().name == "float32"
    # Same seed, same initial weights, same first batch: the first loss differs only by the
    # compute precision, which shows the run really computed in bfloat16, and only a little.
    f32, bf16 = runs["false"], runs["bfloat16"]
    assert np.isfinite(bf16) and bf16 != f32
    assert abs(bf16 - f32) < 0.02 * abs(f32), (f32, bf16)
    # Weights stay float32, and the saved model computes in float32 until inference.precision says otherwise.
    from highres3d.models import all_layers

    model = keras.models.load_model(str(tmp_path / "bfloat16" / "model.keras"), compile=False)
    assert {w.dtype for w in model.weights} == {"float32"}
    assert {layer.dtype_policy.name for layer in all_layers(model)} == {"float32"}
