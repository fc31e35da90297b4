"""Window-level augmentation: CPU resampling and the on-device Keras layer.

:class:`AffineAugmentation` (NumPy/SciPy-free, no TensorFlow) samples a
rotated, scaled, flipped window straight from the volume.
:class:`RandomAffine3D` (Keras 3, imported lazily) does the same inside the
training step from a crop that is :func:`affine_margin` voxels larger per side,
so the input pipeline only crops.
"""
from highres3d.augment.affine import AffineAugmentation, AffineDraw, affine_margin, resample_window, rotation_matrix

__all__ = [
    "AffineAugmentation",
    "AffineDraw",
    "RandomAffine3D",
    "affine_margin",
    "resample_window",
    "rotation_matrix",
]


def __getattr__(name):
    # Keras (and TensorFlow) load only when the layer is actually used.
    if name == "RandomAffine3D":
        from highres3d.augment.layer import RandomAffine3D

        return RandomAffine3D
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
