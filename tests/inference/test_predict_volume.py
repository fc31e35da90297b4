"""predict_volume with Keras models: batching, mirroring, whole-volume pass, outputs."""
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from highres3d.aggregators import softmax  # noqa: E402
from highres3d.inference import mirror_axes, predict_volume  # noqa: E402


@pytest.fixture(scope="module")
def identity():
    inputs = keras.Input((None, None, None, 3))
    return keras.Model(inputs, keras.layers.Identity()(inputs))


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).normal(size=(21, 17, 13, 3)).astype(np.float32)


@pytest.mark.parametrize("blend", ["crop", "average", "gaussian"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_identity_keras_model_through_every_blend(identity, image, blend, batch_size):
    out = predict_volume(identity, image, (8, 10, 8), overlap=0.5, blend=blend, batch_size=batch_size, output="logits")
    np.testing.assert_allclose(out, image, rtol=2e-6, atol=2e-6)
    labels = predict_volume(identity, image, 8, overlap=2, blend=blend, batch_size=batch_size)
    np.testing.assert_array_equal(labels, image.argmax(-1))


def test_whole_volume_window_larger_than_volume_and_tta(identity, image):
    np.testing.assert_array_equal(predict_volume(identity, image, None, output="logits"), image)
    np.testing.assert_array_equal(predict_volume(identity, image, 32, output="logits", blend="gaussian"), image)
    # flipping input and output back is the identity for a pointwise model
    tta = predict_volume(identity, image, 8, overlap=0.25, blend="crop", output="logits", tta_mirror=True)
    np.testing.assert_allclose(tta, image, rtol=1e-6, atol=1e-6)
    probs = predict_volume(identity, image, 8, overlap=0.25, output="probabilities", tta_mirror=(0,))
    np.testing.assert_allclose(probs, softmax(image), rtol=1e-5, atol=1e-6)


def test_tta_averages_over_flips():
    # A model that is not flip-equivariant: output = x-coordinate ramp of the window.
    def ramp(batch):
        x = np.arange(batch.shape[1], dtype=np.float32)[None, :, None, None, None]
        return np.broadcast_to(x, batch.shape[:4] + (1,)).copy()

    image = np.zeros((6, 3, 3, 1), np.float32)
    plain = predict_volume(ramp, image, None, output="logits")
    flipped = predict_volume(ramp, image, None, output="logits", tta_mirror=(0,))
    assert plain[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    np.testing.assert_allclose(flipped[..., 0], 2.5)
    assert len(mirror_axes(True)) == 8 and mirror_axes(False) == [()]


def test_model_ending_in_softmax_is_not_softmaxed_twice(image):
    inputs = keras.Input((None, None, None, 3))
    model = keras.Model(inputs, keras.layers.Softmax()(inputs))
    probs = predict_volume(model, image, 8, overlap=0.25, output="probabilities", from_logits=False)
    np.testing.assert_allclose(probs, softmax(image), rtol=1e-5, atol=1e-6)


def test_model_that_changes_the_window_size_is_reported(image):
    def valid_conv(batch):
        return batch[:, 1:-1, 1:-1, 1:-1]

    with pytest.raises(ValueError, match="same"):
        predict_volume(valid_conv, image, 8)


@pytest.mark.parametrize("blend", ["crop", "average", "gaussian"])
def test_two_class_labels_come_from_the_margin_computed_in_the_model_call(blend):
    """A two-class Keras model hands predict_volume l1 - l0 (half the bytes); the labels are those of both channels."""
    from highres3d import inference

    rng = np.random.default_rng(4)
    image = rng.normal(size=(23, 19, 14, 2)).astype(np.float32)
    keras.utils.set_random_seed(4)  # weights that give both labels
    inputs = keras.Input((None, None, None, 2))
    hidden = keras.layers.Conv3D(4, 3, padding="same", activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Conv3D(2, 1)(hidden))
    for window, overlap, batch_size, tta in [(8, 0.5, 1, False), ((8, 10, 6), 0.25, 3, False), (8, 2, 2, (0, 2)),
                                             (None, 0.25, 1, False)]:
        kwargs = dict(overlap=overlap, blend=blend, batch_size=batch_size, tta_mirror=tta)
        got = predict_volume(model, image, window, **kwargs)
        # a plain callable gets the old path: both channels out of the model, the difference taken in NumPy
        want = predict_volume(lambda batch: model.predict_on_batch(batch), image, window, **kwargs)
        logits = predict_volume(model, image, window, output="logits", **kwargs)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.uint8 and got.any() and not got.all()
        assert np.mean(got == logits.argmax(-1)) > 0.999  # float32 rounding of the blend apart
    margin = inference.two_class_margin_fn(model)
    assert margin(image[None, :8, :8, :8]).shape == (1, 8, 8, 8)  # the path taken: one channel out of the model
    # nothing to gain or not applicable: other outputs, other class counts, plain callables
    three = keras.Model(inputs, keras.layers.Conv3D(3, 1)(inputs))
    assert inference.two_class_margin_fn(three) is None and inference.two_class_margin_fn(lambda b: b) is None
