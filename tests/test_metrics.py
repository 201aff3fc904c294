"""Dice / HD95 on hand-computable cases, empty-mask conventions, multi-class cases and folders."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from fednnunet.evaluation import dice, evaluate_case, evaluate_folder, hd95, reader_from_dataset_json
from fednnunet.evaluation.metrics import image_diagonal


def square(shape=(40, 40), start=(10, 10), side=20):
    m = np.zeros(shape, dtype=bool)
    m[start[0] : start[0] + side, start[1] : start[1] + side] = True
    return m


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_shifted_squares_dice_and_hd95(k):
    a = square()
    b = square(start=(10, 10 + k))
    # overlap of two s x s squares shifted by k along one axis: s * (s - k)
    assert dice(a, b) == pytest.approx((20 - k) / 20)
    assert hd95(a, b) == pytest.approx(k)
    assert hd95(a, b, spacing=None) == pytest.approx(k)
    assert hd95(b, a) == pytest.approx(k)  # symmetric


def test_anisotropic_spacing_scales_hd95():
    a = square()
    along_1 = square(start=(10, 13))
    along_0 = square(start=(13, 10))
    assert hd95(a, along_1, spacing=(2.0, 0.5)) == pytest.approx(3 * 0.5)
    assert hd95(a, along_0, spacing=(2.0, 0.5)) == pytest.approx(3 * 2.0)
    # 3D: a cube shifted along the slice axis with 2.5 mm slices
    c = np.zeros((20, 20, 20), bool)
    c[5:15, 5:15, 5:15] = True
    d = np.roll(c, 2, axis=0)
    assert hd95(c, d, spacing=(2.5, 1.0, 1.0)) == pytest.approx(5.0)
    assert dice(c, d) == pytest.approx(0.8)


def test_identical_masks():
    a = square()
    assert dice(a, a) == 1.0
    assert hd95(a, a) == 0.0
    assert hd95(a, a, spacing=(3.0, 0.7)) == 0.0


def test_empty_prediction_and_empty_reference():
    a = square()
    empty = np.zeros_like(a)
    diag = math.sqrt(40**2 + 40**2)
    for p, r in ((empty, a), (a, empty)):
        assert dice(p, r) == 0.0
        assert hd95(p, r) == pytest.approx(diag)
    # the worst case is in physical units too and larger than any achievable HD95
    assert hd95(empty, a, spacing=(2.0, 0.5)) == pytest.approx(math.sqrt(80**2 + 20**2))
    corner = np.zeros_like(a)
    corner[0, 0] = True
    far = np.zeros_like(a)
    far[-1, -1] = True
    assert hd95(corner, far) < hd95(empty, a)


def test_both_empty():
    empty = np.zeros((16, 16), dtype=np.uint8)
    assert dice(empty, empty) == 1.0
    assert hd95(empty, empty) == 0.0


def test_nnunet_2d_layout_drops_singleton_axis_and_dummy_spacing():
    a = square()
    b = square(start=(10, 12))
    # nnU-Net stores 2D cases as (1, x, y) with spacing (999, sx, sy)
    assert hd95(a[None], b[None], spacing=(999.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert hd95(np.zeros_like(a)[None], b[None], spacing=(999.0, 1.0, 1.0)) == pytest.approx(math.sqrt(2) * 40)
    assert image_diagonal((1, 40, 40), (999.0, 1.0, 1.0)) == pytest.approx(math.sqrt(2) * 40)


def test_invalid_inputs():
    with pytest.raises(ValueError, match="shapes"):
        dice(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(square(), square(), spacing=(1.0,))
    with pytest.raises(ValueError, match="positive"):
        hd95(square(), square(), spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="labels"):
        evaluate_case(np.zeros((3, 3)), np.zeros((3, 3)), [])


def two_class_maps(k=2):
    ref = np.zeros((40, 40), dtype=np.uint8)
    ref[2:12, 2:12] = 1
    ref[20:36, 20:36] = 2
    pred = np.zeros_like(ref)
    pred[2:12, 2 + k : 12 + k] = 1  # class 1 shifted by k
    pred[20:36, 20:36] = 2  # class 2 exact
    return pred, ref


def test_evaluate_case_multi_class():
    pred, ref = two_class_maps(k=2)
    res = evaluate_case(pred, ref, labels=[1, 2, 3])
    pc = res["per_class"]
    assert pc["1"]["dsc"] == pytest.approx(8 / 10)
    assert pc["1"]["hd95"] == pytest.approx(2.0)
    assert pc["2"] == {"dsc": 1.0, "hd95": 0.0, "n_pred": 256, "n_ref": 256}
    assert pc["3"]["dsc"] == 1.0 and pc["3"]["hd95"] == 0.0  # absent from both
    assert res["mean"]["dsc"] == pytest.approx((0.8 + 1 + 1) / 3)
    assert res["mean"]["hd95"] == pytest.approx(2.0 / 3)
    json.dumps(res)  # JSON-ready


def write_nifti(path, arr, spacing_xyz):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing_xyz)
    sitk.WriteImage(img, str(path))


def test_evaluate_folder_nifti(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    # 3D volumes, 3 mm slices (array axis 0), shift of 1 slice for class 1 in case_a
    ref = np.zeros((12, 24, 24), np.uint8)
    ref[2:8, 4:12, 4:12] = 1
    ref[3:9, 14:22, 14:22] = 2
    pred_a = ref.copy()
    pred_a[pred_a == 1] = 0
    pred_a[3:9, 4:12, 4:12] = 1
    pred_b = ref.copy()
    pred_b[pred_b == 2] = 0  # class 2 missed entirely
    for name, p in (("case_a", pred_a), ("case_b", pred_b)):
        write_nifti(ref_dir / f"{name}.nii.gz", ref, (1.0, 1.0, 3.0))
        write_nifti(pred_dir / f"{name}.nii.gz", p, (1.0, 1.0, 3.0))
    # a reference without prediction (other fold) is ignored
    write_nifti(ref_dir / "case_c.nii.gz", ref, (1.0, 1.0, 3.0))

    res = evaluate_folder(pred_dir, ref_dir, labels=[1, 2], file_ending=".nii.gz")
    assert res["n_cases"] == 2 and set(res["per_case"]) == {"case_a", "case_b"}
    a = res["per_case"]["case_a"]["per_class"]
    assert a["1"]["dsc"] == pytest.approx(5 / 6)
    assert a["1"]["hd95"] == pytest.approx(3.0)  # one 3 mm slice
    assert a["2"]["dsc"] == 1.0
    b = res["per_case"]["case_b"]["per_class"]
    diag = math.sqrt(36**2 + 24**2 + 24**2)
    assert b["2"]["dsc"] == 0.0 and b["2"]["hd95"] == pytest.approx(diag)
    assert res["mean"]["per_class"]["2"]["hd95"] == pytest.approx(diag / 2)
    expected_mean_dsc = ((5 / 6 + 1) / 2 + (1 + 0) / 2) / 2
    assert res["mean"]["dsc"] == pytest.approx(expected_mean_dsc)
    json.dumps(res)

    # the reader nnU-Net would use for a dataset.json gives the same result
    (tmp_path / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    reader = reader_from_dataset_json(tmp_path)
    assert evaluate_folder(pred_dir, ref_dir, [1, 2], ".nii.gz", reader=reader) == res
    assert evaluate_folder(pred_dir, ref_dir, [1, 2], ".nii.gz", reader=type(reader)) == res


def test_evaluate_folder_png_2d(tmp_path):
    from skimage import io

    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    a = square().astype(np.uint8)
    b = square(start=(10, 13)).astype(np.uint8)
    io.imsave(ref_dir / "x.png", a, check_contrast=False)
    io.imsave(pred_dir / "x.png", b, check_contrast=False)
    res = evaluate_folder(pred_dir, ref_dir, [1], ".png")  # NaturalImage2DIO, spacing (999, 1, 1)
    assert res["per_case"]["x"]["per_class"]["1"]["dsc"] == pytest.approx(17 / 20)
    assert res["mean"]["hd95"] == pytest.approx(3.0)


def test_evaluate_folder_errors(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    with pytest.raises(ValueError, match="no predictions"):
        evaluate_folder(pred_dir, ref_dir, [1], ".nii.gz")
    write_nifti(pred_dir / "lonely.nii.gz", np.zeros((4, 4, 4), np.uint8), (1.0, 1.0, 1.0))
    with pytest.raises(FileNotFoundError, match="lonely"):
        evaluate_folder(pred_dir, ref_dir, [1], ".nii.gz")
    with pytest.raises(FileNotFoundError):
        evaluate_folder(tmp_path / "nope", ref_dir, [1], ".nii.gz")
