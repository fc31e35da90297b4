"""One HighRes3DNet trunk with one classifier head per source dataset (Chen et al. 2019, Med3D).

The trunk is HighRes3DNet's ``conv_0`` ... ``conv_1`` built by the same
function as :class:`~highres3d.models.HighResNet3D`'s
(:func:`~highres3d.models.highresnet.trunk`), so its weight paths
(``res_2_0/conv_1/kernel``) are those of an ordinary HighResNet3D and
:func:`highres3d.transfer.load_weights` copies the trunk into one by path.
Each dataset's head is a ``conv_2``-like ``1^3 conv -> BN`` layer named
``conv_2_<dataset>``; a target model's own ``conv_2`` shares no path with
them and keeps its fresh initialisation.

The model's output is a mapping ``{dataset: logits}``. Training calls
:meth:`MultiDomainHighResNet3D.head` instead, a model of the trunk and one
head only, so that a batch of dataset A never runs (nor updates the batch
statistics of) the head of dataset B.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras

from highres3d.models.highresnet import PACKAGE, ConvBNActivation, canonical_activation, scaled_filters, trunk

#: Prefix of a head's layer name: the head of dataset ``ixi`` is the layer ``conv_2_ixi``.
HEAD_PREFIX = "conv_2_"


def head_name(dataset: str) -> str:
    """The layer name of a dataset's head (``conv_2_<dataset>``)."""
    return f"{HEAD_PREFIX}{dataset}"


@keras.saving.register_keras_serializable(package=PACKAGE)
class MultiDomainHighResNet3D(keras.Model):
    """HighRes3DNet's trunk shared by several datasets, each with its own classifier head.

    Args:
        in_channels: input channels, the same for every dataset (one ``conv_0``).
        heads: ``{dataset name: number of classes}`` (or a list of
            ``[name, classes]`` pairs), in the order of the config's ``datasets``.
        activation: as :class:`~highres3d.models.HighResNet3D`.
        width_multiplier: as :class:`~highres3d.models.HighResNet3D`.
        l2_decay: as :class:`~highres3d.models.HighResNet3D`.
        filters: explicit widths; overrides ``width_multiplier``.
        kernel_initializer: initializer of every kernel.
        name: model name.

    Example:
        >>> model = MultiDomainHighResNet3D(2, {"hippocampus": 2, "tissue": 4}, width_multiplier=0.25)
        >>> sorted(model.head_names)
        ['hippocampus', 'tissue']
    """

    def __init__(
        self,
        in_channels: int,
        heads: Mapping[str, int] | Sequence[Sequence[Any]],
        activation: str = "leaky_relu",
        width_multiplier: float = 1.0,
        l2_decay: float = 0.0,
        filters: Sequence[int] | None = None,
        kernel_initializer: Any = "he_normal",
        name: str = "MultiDomainHighRes3DNet",
        **kwargs: Any,
    ) -> None:
        pairs = [(str(k), int(v)) for k, v in (heads.items() if isinstance(heads, Mapping) else heads)]
        if not pairs:
            raise ValueError("heads: expected at least one dataset")
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError(f"heads: dataset names must be unique, got {[k for k, _ in pairs]}")
        if min(v for _, v in pairs) < 1:
            raise ValueError(f"heads: every dataset needs at least one class, got {dict(pairs)}")
        activation = canonical_activation(activation)
        widths = scaled_filters(width_multiplier) if filters is None else tuple(int(f) for f in filters)
        initializer = keras.initializers.get(kernel_initializer)
        common = dict(l2_decay=float(l2_decay), kernel_initializer=initializer, dims=3)

        inputs = keras.Input(shape=(None, None, None, int(in_channels)), name="images")
        features = trunk(inputs, widths, activation, **common)
        outputs = {k: ConvBNActivation(n, 1, None, name=head_name(k), **common)(features) for k, n in pairs}
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)

        self.in_channels = int(in_channels)
        self.heads = dict(pairs)
        self.activation = activation
        self.width_multiplier = float(width_multiplier)
        self.l2_decay = float(l2_decay)
        self.filters = widths if filters is not None else None
        self.kernel_initializer = initializer
        # What transfer.load_weights reads from a source model: a 3D network.
        self.dims = 3
        self.slice_axis = 2
        self._head_models: dict[str, keras.Model] = {}

    @property
    def head_names(self) -> list[str]:
        """The datasets, in order."""
        return list(self.heads)

    def head(self, dataset: str) -> keras.Model:
        """The trunk and the head of ``dataset`` as one model with logits output (its layers are shared).

        Raises:
            KeyError: for a dataset without a head.
        """
        if dataset not in self.heads:
            raise KeyError(f"no head for dataset {dataset!r}; heads: {', '.join(self.heads)}")
        if dataset not in self._head_models:
            self._head_models[dataset] = keras.Model(self.input, self.get_layer(head_name(dataset)).output,
                                                     name=f"{self.name}_{dataset}")
        return self._head_models[dataset]

    def trunk_weights(self) -> list[Any]:
        """The trunk's variables (every weight outside the heads)."""
        return [v for v in self.weights if not v.path.startswith(HEAD_PREFIX)]

    def head_weights(self, dataset: str) -> list[Any]:
        """The variables of one dataset's head."""
        prefix = head_name(dataset) + "/"
        return [v for v in self.weights if v.path.startswith(prefix)]

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "in_channels": self.in_channels,
            "heads": [[k, v] for k, v in self.heads.items()],
            "activation": self.activation,
            "width_multiplier": self.width_multiplier,
            "l2_decay": self.l2_decay,
            "filters": None if self.filters is None else list(self.filters),
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MultiDomainHighResNet3D:
        config = dict(config)
        config["kernel_initializer"] = keras.initializers.deserialize(config.get("kernel_initializer", "he_normal"))
        return cls(**config)
