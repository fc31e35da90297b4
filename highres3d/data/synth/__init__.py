"""Synthetic stand-ins for IXI and BraTS 2018 in the real datasets' file layouts.

    from highres3d.data.synth import synthesize_ixi, synthesize_brats
    ids = synthesize_ixi("data/ixi", n_subjects=6, size="small", seed=0)
    ids = synthesize_brats("data/brats", n_subjects=6, size="small", seed=0)

See docs/synthetic_data.md for what the phantoms contain and how to switch
configs to the real datasets.
"""
from highres3d.data.synth.brats import synthesize_brats
from highres3d.data.synth.common import GENERATOR_VERSION, MANIFEST
from highres3d.data.synth.ixi import synthesize_ixi

__all__ = ["synthesize_ixi", "synthesize_brats", "GENERATOR_VERSION", "MANIFEST"]
