"""Networks of highres3d (Keras 3, backend-agnostic: importable without TensorFlow)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from highres3d.models.highresnet import (
    BASE_FILTERS,
    GROUPS,
    ConvBNActivation,
    FromSlices,
    GroupParameters,
    HighResBlock,
    HighResNet3D,
    ToSlices,
    all_layers,
    is_state_variable,
    layer_group,
    named_layers,
    named_weights,
    niftynet_variable_name,
    parameter_table,
)
from highres3d.models.multidomain import MultiDomainHighResNet3D, head_name

__all__ = [
    "build_model",
    "build_multi_domain_model",
    "MultiDomainHighResNet3D",
    "head_name",
    "BASE_FILTERS",
    "GROUPS",
    "ConvBNActivation",
    "FromSlices",
    "GroupParameters",
    "HighResBlock",
    "HighResNet3D",
    "all_layers",
    "is_state_variable",
    "layer_group",
    "named_layers",
    "named_weights",
    "niftynet_variable_name",
    "parameter_table",
    "ToSlices",
]

if TYPE_CHECKING:
    from highres3d.config import Config


def build_model(config: Config) -> HighResNet3D:
    """The network a config describes (logits output): the one constructor training and ``inspect`` share.

    Args:
        config: a :class:`highres3d.config.Config`; its ``network`` section and
            the number of ``dataset.modalities`` (input channels) are used.
    """
    net = config.network
    return HighResNet3D(
        in_channels=config.in_channels,
        num_classes=net.num_classes,
        activation=net.activation,
        width_multiplier=net.width_multiplier,
        l2_decay=net.l2_decay,
        dims=net.dims,
        slice_axis=net.slice_axis,
    )


def build_multi_domain_model(config: Config) -> MultiDomainHighResNet3D:
    """The multi-domain network of a config with ``datasets``: one trunk, one head per dataset (logits).

    Args:
        config: a :class:`highres3d.config.Config` with ``datasets``; its
            ``network`` section (but ``num_classes``) and each dataset's
            ``num_classes`` and modalities are used.
    """
    net = config.network
    return MultiDomainHighResNet3D(
        in_channels=len(config.datasets[0].modalities),
        heads={d.name: d.num_classes for d in config.datasets},
        activation=net.activation,
        width_multiplier=net.width_multiplier,
        l2_decay=net.l2_decay,
    )
