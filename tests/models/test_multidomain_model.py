"""MultiDomainHighResNet3D: HighResNet3D's trunk paths, one head per dataset, .keras round trip."""
import keras
import numpy as np
import pytest

from highres3d.models import HighResNet3D, MultiDomainHighResNet3D, named_weights


def test_trunk_paths_heads_and_round_trip(tmp_path):
    net = MultiDomainHighResNet3D(2, {"a": 2, "b": 4}, width_multiplier=0.25)
    plain = HighResNet3D(2, 2, width_multiplier=0.25)
    trunk = {p for p in named_weights(plain) if not p.startswith("conv_2/")}
    assert trunk == {v.path for v in net.trunk_weights()}
    assert {v.path.split("/")[0] for v in net.head_weights("b")} == {"conv_2_b"}
    x = np.random.default_rng(0).normal(size=(1, 12, 12, 12, 2)).astype("float32")
    outputs = net(x)
    assert outputs["a"].shape[-1] == 2 and outputs["b"].shape[-1] == 4
    np.testing.assert_allclose(net.head("b")(x), outputs["b"], atol=1e-6)  # the head model shares the layers
    path = tmp_path / "md.keras"
    net.save(path)
    again = keras.saving.load_model(path, compile=False)
    assert isinstance(again, MultiDomainHighResNet3D) and again.heads == {"a": 2, "b": 4}
    np.testing.assert_allclose(again.head("a")(x), net.head("a")(x), atol=1e-6)
    with pytest.raises(KeyError, match="heads: a, b"):
        net.head("c")
    with pytest.raises(ValueError, match="unique"):
        MultiDomainHighResNet3D(2, [["a", 2], ["a", 3]])
