"""Synthetic IXI-like and BraTS-like data: layout, grids, labels, determinism, and that it needs learning."""
from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from highres3d.cli.main import main
from highres3d.data.synth import MANIFEST, brats, ixi, synthesize_brats, synthesize_ixi
from highres3d.utils import OutputExistsError

N = 6
ASEG_VALUES = {0, 2, 3, 4, 7, 8, 10, 11, 12, 14, 16, 17, 18, 31, 41, 42, 43, 46, 47, 49, 50, 51, 53, 54, 63}


@pytest.fixture(scope="module")
def ixi_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ixi")
    ids = synthesize_ixi(out, N, size="small", seed=0)
    return out, ids


@pytest.fixture(scope="module")
def brats_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("brats")
    ids = synthesize_brats(out, N, size="small", seed=0)
    return out, ids


def _load(path):
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img


def test_ixi_layout_names_grid_and_labels(ixi_dir):
    out, ids = ixi_dir
    assert len(set(ids)) == N
    expected = set()
    for sid in ids:
        assert re.fullmatch(r"IXI\d{3}-(Guys|HH|IOP)-\d{4}", sid), sid
        expected |= {f"{sid}-T1.nii.gz", f"{sid}-T2.nii.gz", f"{sid}-aseg.nii.gz"}
    assert {p.name for p in out.iterdir()} == expected | {MANIFEST}
    for sid in ids:
        t1, img = _load(out / f"{sid}-T1.nii.gz")
        t2, img2 = _load(out / f"{sid}-T2.nii.gz")
        aseg, lab = _load(out / f"{sid}-aseg.nii.gz")
        assert t1.shape == t2.shape == aseg.shape == (64, 64, 56)
        assert t1.dtype == t2.dtype == np.int16 and aseg.dtype == np.uint8
        assert nib.aff2axcodes(img.affine) == ("P", "I", "R")
        np.testing.assert_allclose(img.header.get_zooms(), (3.2, 3.2, 3.2), rtol=1e-6)
        assert np.array_equal(img.affine, lab.affine) and np.array_equal(img.affine, img2.affine)
        assert set(np.unique(aseg).tolist()) == ASEG_VALUES
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["dataset"] == "ixi" and manifest["seed"] == 0 and manifest["size"] == "small"
    assert manifest["subjects"] == sorted(ids)
    assert manifest["patterns"]["T1"] == "{subject}-T1.nii.gz"


def test_brats_layout_names_grid_and_labels(brats_dir):
    out, ids = brats_dir
    assert len(set(ids)) == N
    assert {p.name for p in out.iterdir()} == set(ids) | {MANIFEST}
    for sid in ids:
        assert re.fullmatch(r"Brats18_(TCIA0\d_\d{3}|CBICA_[A-Z]{3}|2013_\d+)_1", sid), sid
        names = {p.name for p in (out / sid).iterdir()}
        assert names == {f"{sid}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")}
        seg, lab = _load(out / sid / f"{sid}_seg.nii.gz")
        assert seg.dtype == np.uint8 and seg.shape == (64, 64, 48)
        assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}
        assert nib.aff2axcodes(lab.affine) == ("L", "P", "S")
        for m in ("t1", "t1ce", "t2", "flair"):
            data, img = _load(out / sid / f"{sid}_{m}.nii.gz")
            assert data.dtype == np.int16 and data.shape == seg.shape
            assert np.array_equal(img.affine, lab.affine)
            # Skull-stripped like the real data: exact zeros outside the brain, tumour inside it.
            assert data[0, 0, 0] == 0 and (data == 0).mean() > 0.3
            assert np.all(data[seg > 0] > 0)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["patterns"]["t1"] == "{subject}/{subject}_t1.nii.gz"


def test_anatomy_sits_where_the_affine_says(ixi_dir):
    out, ids = ixi_dir
    aseg, img = _load(out / f"{ids[0]}-aseg.nii.gz")

    def world_centroid(values):
        ijk = np.argwhere(np.isin(aseg, values)).mean(axis=0)
        return img.affine[:3, :3] @ ijk + img.affine[:3, 3]

    left, right = world_centroid((17,)), world_centroid((53,))
    assert right[0] - left[0] > 30  # RAS x: the right hippocampus is on the right
    thalamus, cerebellum = world_centroid((10, 49)), world_centroid((8, 47))
    assert cerebellum[1] < thalamus[1] - 20 and cerebellum[2] < thalamus[2] - 20  # posterior and inferior


def test_full_size_grids_match_the_real_datasets():
    grid = brats.make_grid("full")
    assert grid.shape == (240, 240, 155)
    np.testing.assert_array_equal(grid.affine, [[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])
    shape, zooms, _ = ixi.SIZES["full"]
    assert shape == (256, 256, 150) and zooms == (0.9375, 0.9375, 1.2)


def test_same_seed_gives_identical_arrays_and_subjects_do_not_depend_on_count(ixi_dir, tmp_path):
    out, ids = ixi_dir
    again = synthesize_ixi(tmp_path, 2, size="small", seed=0)
    assert again == ids[:2]
    for sid in again:
        for suffix in ("T1", "T2", "aseg"):
            a, _ = _load(out / f"{sid}-{suffix}.nii.gz")
            b, _ = _load(tmp_path / f"{sid}-{suffix}.nii.gz")
            assert np.array_equal(a, b)
    images, seg, _ = brats.make_subject(1, seed=0)
    images2, seg2, _ = brats.make_subject(1, seed=0)
    assert np.array_equal(seg, seg2) and all(np.array_equal(images[m], images2[m]) for m in images)


def test_subjects_and_seeds_differ():
    _, _, a0, _ = ixi.make_subject(0, seed=0)
    _, _, a1, _ = ixi.make_subject(1, seed=0)
    _, _, b0, _ = ixi.make_subject(0, seed=1)
    hip = [np.isin(a, (17, 53)) for a in (a0, a1, b0)]
    assert (hip[0] != hip[1]).sum() > 20 and (hip[0] != hip[2]).sum() > 20
    assert ixi.subject_ids(3, seed=0) != ixi.subject_ids(3, seed=1)
    cores = [np.argwhere(np.isin(brats.make_subject(i, seed=0)[1], (1, 4))).mean(axis=0) for i in range(2)]
    assert np.linalg.norm(cores[0] - cores[1]) > 3  # voxels: the tumour moves between subjects


def test_existing_files_are_never_replaced_without_overwrite(ixi_dir, tmp_path):
    synthesize_ixi(tmp_path, 1, seed=0)
    target = next(tmp_path.glob("*-T1.nii.gz"))
    before = target.read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        synthesize_ixi(tmp_path, 1, seed=0)
    # Another dataset kind in the same folder would clobber the manifest.
    with pytest.raises(OutputExistsError, match=MANIFEST):
        synthesize_brats(tmp_path, 1, seed=0)
    assert target.read_bytes() == before
    assert synthesize_ixi(tmp_path, 1, seed=0, overwrite=True)
    assert not list(tmp_path.glob(".*part*")), "temporary files left behind"


def test_hippocampus_is_grey_matter_like_and_several_voxels_across(ixi_dir):
    out, ids = ixi_dir
    for sid in ids:
        t1, _ = _load(out / f"{sid}-T1.nii.gz")
        aseg, _ = _load(out / f"{sid}-aseg.nii.gz")
        for value in (17, 53):
            hip = aseg == value
            assert ndimage.binary_erosion(hip).sum() >= 3, f"{sid}: hippocampus {value} too thin"
        hip = np.isin(aseg, (17, 53))
        gm, wm, csf = np.isin(aseg, (3, 42)), np.isin(aseg, (2, 41)), np.isin(aseg, (4, 43))
        # Grey-matter-like on T1 (partial volume included): intensity alone does not single it out.
        m_hip, m_gm, m_wm, m_csf = (float(np.median(t1[m])) for m in (hip, gm, wm, csf))
        assert abs(m_hip - m_gm) < 0.5 * abs(m_wm - m_gm), (sid, m_hip, m_gm, m_wm)
        assert abs(m_hip - m_gm) < 0.5 * abs(m_hip - m_csf), (sid, m_hip, m_gm, m_csf)


def _best_global_threshold_dice(volumes, masks):
    """Best Dice over one threshold (grid in z-score units, both directions) shared by all subjects."""
    grid = np.linspace(-4.0, 8.0, 241)
    best = 0.0
    for direction in (">", "<"):
        tp = np.zeros(len(grid))
        predicted = np.zeros(len(grid))
        truth = 0
        for vol, mask in zip(volumes, masks):
            v = vol.astype(np.float64)
            z = ((v - v.mean()) / v.std()).ravel()
            m = mask.ravel()
            truth += int(m.sum())
            bins = np.searchsorted(grid, z)  # z > grid[i]  <=>  bins > i
            all_counts = np.bincount(bins, minlength=len(grid) + 1)
            fg_counts = np.bincount(bins[m], minlength=len(grid) + 1)
            if direction == ">":
                predicted += np.cumsum(all_counts[::-1])[::-1][1:]
                tp += np.cumsum(fg_counts[::-1])[::-1][1:]
            else:
                predicted += np.cumsum(all_counts)[:-1]
                tp += np.cumsum(fg_counts)[:-1]
        best = max(best, float(np.max(2 * tp / (predicted + truth))))
    return best


def test_threshold_helper_finds_an_easy_structure():
    rng = np.random.default_rng(0)
    vols, masks = [], []
    for _ in range(3):
        mask = np.zeros((20, 20, 20), bool)
        mask[5:12, 5:12, 5:12] = True
        vols.append(rng.normal(0, 1, mask.shape) + 6 * mask)
        masks.append(mask)
    assert _best_global_threshold_dice(vols, masks) > 0.95


def test_structures_need_learning_not_thresholding(ixi_dir, brats_dir):
    out, ids = ixi_dir
    hip = [np.isin(_load(out / f"{s}-aseg.nii.gz")[0], (17, 53)) for s in ids]
    dice = {m: _best_global_threshold_dice([_load(out / f"{s}-{m}.nii.gz")[0] for s in ids], hip)
            for m in ("T1", "T2")}
    out, ids = brats_dir
    core = [np.isin(_load(out / s / f"{s}_seg.nii.gz")[0], (1, 4)) for s in ids]
    for m in ("t1", "t1ce", "t2", "flair"):
        dice[m] = _best_global_threshold_dice([_load(out / s / f"{s}_{m}.nii.gz")[0] for s in ids], core)
    print("best single-threshold Dice:", {k: round(v, 3) for k, v in dice.items()})
    assert all(d < 0.5 for d in dice.values()), dice
    # The tumour is still visible: the enhancing rim stands out on T1ce.
    assert dice["t1ce"] > 0.1


def test_cli_writes_subjects_and_prints_how_to_use_them(tmp_path, capsys):
    assert main(["synth", "brats", str(tmp_path / "b"), "--subjects", "1", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert "[1/1] Brats18_" in text and "{subject}/{subject}_t1.nii.gz" in text
    assert f"highres3d data check demo/brats.yaml --data-root {tmp_path / 'b'}" in text
    assert main(["synth", "brats", str(tmp_path / "b"), "--subjects", "1", "--seed", "3"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["synth", "brats", str(tmp_path / "b"), "--subjects", "1", "--seed", "3", "--overwrite"]) == 0


def test_an_unknown_generator_is_a_config_error_naming_the_choices(tmp_path):
    from highres3d.data.synth import synthesize
    from highres3d.errors import ConfigError

    with pytest.raises(ConfigError, match="generator 'ct': expected 'ixi' or 'brats'"):
        synthesize("ct", tmp_path / "out", 1)
    assert not (tmp_path / "out").exists()
