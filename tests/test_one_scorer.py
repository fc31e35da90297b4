"""The same pair of label maps gives the same numbers through evaluate, the experiment runner and validation."""
import math

import nibabel as nib
import numpy as np

from highres3d.evaluation import evaluate_folders, mean_foreground, score_files


def write(path, array, affine):
    nib.save(nib.Nifti1Image(array.astype(np.uint8), affine), path)
    return path


def test_evaluate_experiment_and_validation_agree(tmp_path):
    from highres3d.data.preprocess import Volume
    from highres3d.io.nifti import load_image
    from highres3d.training.trainer import volume_dice

    rng = np.random.default_rng(0)
    truth = np.zeros((12, 10, 8), np.uint8)
    truth[2:8, 2:7, 1:6] = 1
    prediction = truth.copy()
    prediction[rng.random(truth.shape) < 0.15] = 1
    prediction[5:8, 2:4, 1:3] = 0
    # Anisotropic voxels, so the distances depend on the spacing taken from the affine.
    affine = np.diag([1.5, 0.8, 3.0, 1.0])
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    pred_file = write(tmp_path / "pred" / "s1_seg.nii.gz", prediction, affine)
    truth_file = write(tmp_path / "truth" / "s1_seg.nii.gz", truth, affine)
    # Class 2 is absent from both: evaluate gives NaN and leaves it out of the foreground mean.
    evaluated = evaluate_folders(tmp_path / "pred", tmp_path / "truth", classes=[1, 2])
    by_class = {row["class"]: row for row in evaluated.rows}
    assert math.isnan(by_class[2]["dice"])

    experiment = score_files(pred_file, truth_file, classes=range(1, 3))  # what experiments.evaluate_run calls
    for metric in ("dice", "jaccard", "hd95_mm", "hausdorff_mm"):
        assert experiment[1][metric] == by_class[1][metric]
    assert math.isnan(experiment[2]["dice"])

    label, info = load_image(truth_file, orientation="RAS", order=0, dtype=np.uint8)
    volume = Volume("s1", label[..., None].astype(np.float32), label, info)
    validation = volume_dice(prediction, volume, num_classes=3)  # the trainer's whole-volume score
    assert validation == by_class[1]["dice"] == mean_foreground(experiment)


def test_raw_values_above_255_are_scored_as_they_are():
    from highres3d.evaluation import score_subject

    truth = np.zeros((6, 6, 6), np.int32)
    truth[1:3] = 2035  # a FreeSurfer cortical label
    prediction = truth.copy()
    prediction[1] = 0
    scores = score_subject(prediction, truth, classes=[2035, 2035 % 256])
    assert scores[2035]["dice"] == 2 * 36 / (36 + 72)
    assert math.isnan(scores[2035 % 256]["dice"])  # no wrap-around into class 243
