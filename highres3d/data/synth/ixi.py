"""IXI-like subjects: T1, T2 and a FreeSurfer-aseg-style label map in the IXI file layout.

Files, all directly in the output folder (subject id ``IXI002-Guys-0828``)::

    IXI002-Guys-0828-T1.nii.gz     int16, T1-weighted (white matter bright, CSF dark)
    IXI002-Guys-0828-T2.nii.gz     int16, T2-weighted (CSF bright, grey > white matter)
    IXI002-Guys-0828-aseg.nii.gz   uint8, aseg values (17/53 = left/right hippocampus)

Full size is 256×256×150 at 0.9375×0.9375×1.2 mm stored PIR (sagittal slices
along the last axis), like the real IXI T1 files; small is 64×64×56 at 3.2 mm.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from highres3d.data.synth import common
from highres3d.data.synth import phantom as ph

SITES = ("Guys", "HH", "IOP")
SIZES = {
    # storage shape, voxel size (mm), brain centre relative to the volume centre (mm, RAS)
    "full": ((256, 256, 150), (0.9375, 0.9375, 1.2), (0.0, 5.0, 22.0)),
    "small": ((64, 64, 56), (3.2, 3.2, 3.2), (0.0, 0.0, 8.0)),
}
AXCODES = "PIR"
PATTERNS = {"T1": "{subject}-T1.nii.gz", "T2": "{subject}-T2.nii.gz", "label": "{subject}-aseg.nii.gz"}

ASEG_NAMES = {
    0: "Unknown", 2: "Left-Cerebral-White-Matter", 3: "Left-Cerebral-Cortex", 4: "Left-Lateral-Ventricle",
    7: "Left-Cerebellum-White-Matter", 8: "Left-Cerebellum-Cortex", 10: "Left-Thalamus", 11: "Left-Caudate",
    12: "Left-Putamen", 14: "3rd-Ventricle", 16: "Brain-Stem", 17: "Left-Hippocampus", 18: "Left-Amygdala",
    31: "Left-choroid-plexus", 41: "Right-Cerebral-White-Matter", 42: "Right-Cerebral-Cortex",
    43: "Right-Lateral-Ventricle", 46: "Right-Cerebellum-White-Matter", 47: "Right-Cerebellum-Cortex",
    49: "Right-Thalamus", 50: "Right-Caudate", 51: "Right-Putamen", 53: "Right-Hippocampus",
    54: "Right-Amygdala", 63: "Right-choroid-plexus",
}


def _contrast(**values) -> np.ndarray:
    table = np.zeros(ph.N_TISSUES, dtype=np.float32)
    for name, v in values.items():
        table[getattr(ph, name)] = v
    return table


# Relative tissue intensities.  The hippocampus and amygdala are as grey as the
# cortex: only their place and shape tell them apart, as in real scans.
T1_MEANS = _contrast(
    FAT=0.95, MUSCLE=0.38, BONE=0.05, MARROW=0.55, CSF=0.16, VENT=0.16, VENT3=0.16, CHOROID=0.45,
    GM=0.55, WM=0.82, CGM=0.53, CWM=0.78, STEM=0.72, THAL=0.68, CAUD=0.58, PUT=0.62, HIPPO=0.55,
    AMYG=0.56, CORD=0.7,
)
T2_MEANS = _contrast(
    FAT=0.7, MUSCLE=0.22, BONE=0.04, MARROW=0.4, CSF=1.0, VENT=1.0, VENT3=1.0, CHOROID=0.55,
    GM=0.56, WM=0.36, CGM=0.57, CWM=0.38, STEM=0.42, THAL=0.45, CAUD=0.52, PUT=0.46, HIPPO=0.57,
    AMYG=0.56, CORD=0.42,
)
# Site character: 3 T Hammersmith has the strongest bias field.
SITE_BIAS = {"Guys": 0.12, "HH": 0.22, "IOP": 0.15}


def subject_ids(n_subjects: int, seed: int = 0) -> list[str]:
    """The ids ``synthesize_ixi`` gives its first ``n_subjects`` subjects (IXI numbers increase)."""
    ids = []
    number = 1
    for i in range(n_subjects):
        rng = common.subject_rng("ixi-id", seed, i)
        number += 1 + int(rng.integers(0, 3))
        site = SITES[int(rng.integers(0, len(SITES)))]
        ids.append(f"IXI{number:03d}-{site}-{int(rng.integers(0, 10000)):04d}")
    return ids


def subject_files(out_dir, subject: str) -> dict[str, Path]:
    return {key: Path(out_dir) / pattern.format(subject=subject) for key, pattern in PATTERNS.items()}


def make_subject(index: int, seed: int = 0, size: str = "small", site: str = "Guys"):
    """Render one subject: returns (T1 int16, T2 int16, aseg uint8, affine), arrays in storage order."""
    shape, zooms, brain_offset = SIZES[size]
    grid = ph.make_grid(shape, zooms, AXCODES, centre_world=(0.0, 0.0, 0.0))
    rng = common.subject_rng("ixi", seed, index)
    head = ph.HeadPhantom(rng, brain_centre_world=brain_offset)
    tissue, left, _ = head.render(grid)
    xs, ys, zs = grid.axes()
    bias = ph.LatticeNoise(rng, [xs[0], ys[0], zs[0]], [xs[-1], ys[-1], zs[-1]], 70.0)
    images = []
    for means, scale in ((T1_MEANS, rng.uniform(500, 1100)), (T2_MEANS, rng.uniform(400, 900))):
        jitter = (1 + rng.normal(0, 0.04, ph.N_TISSUES)).astype(np.float32)
        img = ph.render_image(
            tissue, means * jitter, rng, grid, bias,
            bias_strength=SITE_BIAS.get(site, 0.15) * rng.uniform(0.7, 1.3),
            noise_sd=rng.uniform(0.015, 0.035),
        )
        images.append(grid.to_storage(common.to_int16(img, scale / 0.82)))
    aseg = grid.to_storage(ph.tissue_to_aseg(tissue, left))
    return images[0], images[1], aseg, grid.affine


def synthesize_ixi(out_dir, n_subjects: int, size: str = "small", seed: int = 0, overwrite: bool = False,
                   progress=None) -> list[str]:
    """Write ``n_subjects`` IXI-like subjects into ``out_dir``; returns their ids.

    Deterministic: the same ``seed`` gives byte-identical arrays, and subject
    ``i`` does not depend on how many subjects are requested.  Existing files
    are never replaced unless ``overwrite``; that is checked for every file
    before anything is written.  ``progress(i, n, subject_id, seconds)`` is
    called after each subject.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be at least 1, got {n_subjects}")
    ids = subject_ids(n_subjects, seed)

    def make(index: int, subject: str):
        t1, t2, aseg, affine = make_subject(index, seed, size, subject.split("-")[1])
        return {"T1": t1, "T2": t2, "label": aseg}, affine

    return common.write_dataset(out_dir, ids, manifest_payload(ids, size, seed), lambda s: subject_files(Path(out_dir), s),
                                make, "IXI-like", overwrite, progress)


def manifest_payload(ids, size, seed) -> dict:
    return common.manifest("ixi", ids, size, seed, SIZES, AXCODES, "flat", PATTERNS, ("T1", "T2"), ASEG_NAMES)
