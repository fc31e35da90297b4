"""highres3d: patch-based 3D medical image segmentation with HighRes3DNet on Keras 3.

The public API is small and importable without TensorFlow for the NumPy parts
(I/O, datasets, preprocessing, samplers, aggregators, evaluation):

    from highres3d.config import load_config
    from highres3d.data.dataset import Dataset
    from highres3d.data.preprocess import load_volume
    from highres3d.io.nifti import load_image, save_like
"""

__version__ = "0.1.0"
