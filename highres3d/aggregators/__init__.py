"""Stitching window predictions into whole volumes (see :mod:`highres3d.aggregators.grid`)."""
from highres3d.aggregators.grid import (
    BLEND_MODES,
    OUTPUTS,
    GridAggregator,
    argmax_channels,
    default_blend_threads,
    gaussian_profile,
    softmax,
)

__all__ = ["GridAggregator", "BLEND_MODES", "OUTPUTS", "argmax_channels", "default_blend_threads", "gaussian_profile",
           "softmax"]
