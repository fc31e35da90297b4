"""Networks of highres3d (Keras 3, backend-agnostic: importable without TensorFlow)."""
from highres3d.models.highresnet import (
    BASE_FILTERS,
    GROUPS,
    ConvBNActivation,
    GroupParameters,
    HighResBlock,
    HighResNet3D,
    format_parameter_table,
    is_state_variable,
    layer_group,
    named_layers,
    named_weights,
    niftynet_variable_name,
    parameter_table,
)

__all__ = [
    "BASE_FILTERS",
    "GROUPS",
    "ConvBNActivation",
    "GroupParameters",
    "HighResBlock",
    "HighResNet3D",
    "format_parameter_table",
    "is_state_variable",
    "layer_group",
    "named_layers",
    "named_weights",
    "niftynet_variable_name",
    "parameter_table",
]
