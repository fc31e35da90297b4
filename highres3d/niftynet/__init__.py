"""Migration from NiftyNet 0.5: its file matching, INI configs and TensorFlow 1 checkpoints.

* :mod:`highres3d.niftynet.matching`: ``path_to_search`` / ``filename_contains``
  matching (dataset layout ``niftynet_search``);
* :mod:`highres3d.niftynet.ini`: a NiftyNet application INI -> a highres3d config;
* :mod:`highres3d.niftynet.checkpoint`: ``model.ckpt-N`` of HighRes3DNet -> a run folder.

Histogram standardisation lives with the rest of preprocessing in
:mod:`highres3d.data.histogram`. Nothing here imports TensorFlow at import time.
"""
