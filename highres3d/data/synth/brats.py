"""BraTS-like subjects: skull-stripped T1, T1ce, T2, FLAIR and a tumour label in the BraTS 2018 layout.

One folder per subject, named by the subject id::

    Brats18_TCIA01_123_1/Brats18_TCIA01_123_1_{t1,t1ce,t2,flair}.nii.gz   int16
    Brats18_TCIA01_123_1/Brats18_TCIA01_123_1_seg.nii.gz                  uint8

Labels: 0 background, 1 necrotic and non-enhancing tumour core, 2 edema,
4 enhancing tumour (tumour core = 1 ∪ 4, whole tumour = 1 ∪ 2 ∪ 4).  Full size
is 240×240×155 at 1 mm with the real files' LPS-stored affine
``diag(-1, -1, 1)`` and offset (0, 239, 0); small is 64×64×48 at 3 mm, also LPS.
"""
from __future__ import annotations

import string
from pathlib import Path

import numpy as np

from highres3d.data.synth import common
from highres3d.data.synth import phantom as ph

SIZES = {
    # storage shape, voxel size (mm), affine offset (world of voxel 0) or None to centre
    "full": ((240, 240, 155), (1.0, 1.0, 1.0), (0.0, 239.0, 0.0)),
    "small": ((64, 64, 48), (3.0, 3.0, 3.0), None),
}
BRAIN_CENTRE_VOXEL = {"full": (120.0, 128.0, 74.0), "small": (31.5, 32.5, 21.5)}
AXCODES = "LPS"
MODALITIES = ("t1", "t1ce", "t2", "flair")
PATTERNS = {
    **{m: "{subject}/{subject}_" + m + ".nii.gz" for m in MODALITIES},
    "label": "{subject}/{subject}_seg.nii.gz",
}
LABEL_NAMES = {0: "background", 1: "necrotic and non-enhancing tumour core", 2: "peritumoural edema",
               4: "enhancing tumour"}
TUMOUR_LABELS = {ph.NECRO: 1, ph.NET: 1, ph.EDEMA: 2, ph.ENH: 4}


def _contrast(**values) -> np.ndarray:
    table = np.zeros(ph.N_TISSUES, dtype=np.float32)
    for name, v in values.items():
        table[getattr(ph, name)] = v
    return table


_HEALTHY_T1 = dict(
    CSF=0.25, VENT=0.22, VENT3=0.22, CHOROID=0.5, GM=0.6, WM=0.85, CGM=0.58, CWM=0.8, STEM=0.75,
    THAL=0.7, CAUD=0.62, PUT=0.65, HIPPO=0.6, AMYG=0.6,
)
# Tumour core overlaps healthy tissue on every sequence: necrosis looks like CSF,
# the non-enhancing core like grey matter or edema; only the enhancing rim is
# bright on T1ce, and so are choroid plexus and vessels.
MEANS = {
    "t1": _contrast(**_HEALTHY_T1, NECRO=0.3, NET=0.55, ENH=0.62, EDEMA=0.6),
    "t1ce": _contrast(**dict(_HEALTHY_T1, CHOROID=1.15), NECRO=0.32, NET=0.6, ENH=1.2, EDEMA=0.62),
    "t2": _contrast(
        CSF=1.0, VENT=1.0, VENT3=1.0, CHOROID=0.6, GM=0.58, WM=0.38, CGM=0.58, CWM=0.4, STEM=0.45, THAL=0.48,
        CAUD=0.55, PUT=0.5, HIPPO=0.6, AMYG=0.58, NECRO=0.9, NET=0.68, ENH=0.62, EDEMA=0.78,
    ),
    "flair": _contrast(
        CSF=0.12, VENT=0.1, VENT3=0.1, CHOROID=0.45, GM=0.62, WM=0.48, CGM=0.6, CWM=0.48, STEM=0.52,
        THAL=0.55, CAUD=0.6, PUT=0.56, HIPPO=0.66, AMYG=0.64, NECRO=0.45, NET=0.8, ENH=0.72,
        EDEMA=0.95,
    ),
}
SCALE = {"t1": (350, 900), "t1ce": (500, 1600), "t2": (600, 2000), "flair": (300, 900)}


def subject_ids(n_subjects: int, seed: int = 0) -> list[str]:
    """The ids ``synthesize_brats`` gives its first ``n_subjects`` subjects (unique, like the real sites')."""
    ids: list[str] = []
    for i in range(n_subjects):
        rng = common.subject_rng("brats-id", seed, i)
        while True:
            kind = rng.choice(["TCIA", "CBICA", "2013"], p=[0.45, 0.4, 0.15])
            if kind == "TCIA":
                sid = f"Brats18_TCIA0{rng.integers(1, 9)}_{rng.integers(100, 700):03d}_1"
            elif kind == "CBICA":
                letters = "".join(rng.choice(list(string.ascii_uppercase), 3))
                sid = f"Brats18_CBICA_{letters}_1"
            else:
                sid = f"Brats18_2013_{rng.integers(0, 40)}_1"
            if sid not in ids:
                ids.append(sid)
                break
    return ids


def subject_files(out_dir, subject: str) -> dict[str, Path]:
    return {key: Path(out_dir) / pattern.format(subject=subject) for key, pattern in PATTERNS.items()}


def make_grid(size: str) -> ph.Grid:
    shape, zooms, offset = SIZES[size]
    return ph.make_grid(shape, zooms, AXCODES, offset=offset)


def make_subject(index: int, seed: int = 0, size: str = "small"):
    """Render one subject: returns ({modality: int16 array}, seg uint8, affine), arrays in storage order."""
    grid = make_grid(size)
    centre = (grid.affine @ np.append(BRAIN_CENTRE_VOXEL[size], 1.0))[:3]
    rng = common.subject_rng("brats", seed, index)
    head = ph.HeadPhantom(rng, brain_centre_world=centre, tumour=True)
    tissue, left, icv = head.render(grid)
    # Skull stripping keeps the brain and most of the CSF around it, and cuts the brainstem low.
    mask = np.isin(tissue, ph.BRAIN_TISSUES) & (icv < -0.5)
    mask &= grid.axes()[2][None, None, :] > head.to_world((0, 0, -62))[2]
    xs, ys, zs = grid.axes()
    bias = ph.LatticeNoise(rng, [xs[0], ys[0], zs[0]], [xs[-1], ys[-1], zs[-1]], 70.0)
    images = {}
    for modality in MODALITIES:
        jitter = (1 + rng.normal(0, 0.04, ph.N_TISSUES)).astype(np.float32)
        img = ph.render_image(
            tissue, MEANS[modality] * jitter, rng, grid, bias,
            bias_strength=rng.uniform(0.08, 0.2), noise_sd=rng.uniform(0.015, 0.035),
        )
        img[~mask] = 0
        scale = rng.uniform(*SCALE[modality]) / 0.85
        images[modality] = grid.to_storage(common.to_int16(img, scale))
    lut = np.zeros(ph.N_TISSUES, dtype=np.uint8)
    for t, v in TUMOUR_LABELS.items():
        lut[t] = v
    seg = np.where(mask, lut[tissue], 0).astype(np.uint8)
    return images, grid.to_storage(seg), grid.affine


def synthesize_brats(out_dir, n_subjects: int, size: str = "small", seed: int = 0, overwrite: bool = False,
                     progress=None) -> list[str]:
    """Write ``n_subjects`` BraTS-like subject folders into ``out_dir``; returns their ids.

    Same guarantees as :func:`highres3d.data.synth.synthesize_ixi`: deterministic
    by seed, subject ``i`` independent of ``n_subjects``, nothing replaced unless
    ``overwrite``, every file written atomically.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be at least 1, got {n_subjects}")
    ids = subject_ids(n_subjects, seed)

    def make(index: int, subject: str):
        images, seg, affine = make_subject(index, seed, size)
        return {**images, "label": seg}, affine

    return common.write_dataset(out_dir, ids, manifest_payload(ids, size, seed), lambda s: subject_files(Path(out_dir), s),
                                make, "BraTS-like", overwrite, progress)


def manifest_payload(ids, size, seed) -> dict:
    return common.manifest("brats", ids, size, seed, SIZES, AXCODES, "folder per subject", PATTERNS, MODALITIES, LABEL_NAMES)
