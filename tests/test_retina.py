"""Conversion of the four retinal-vessel collections into nnU-Net v2 raw datasets.

Most tests build a tiny fake source tree with the real layout; one test converts the real data from
``shared/data/retina-vessels`` beside the repository when it is there (skipped otherwise).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from fednnunet.data.retina import CHANNEL_NAMES, FILE_ENDING, LABELS, convert_retina_vessels

REAL_SOURCE = Path(
    os.environ.get("FEDNNUNET_RETINA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "retina-vessels")
)

# (collection folder, image dir, label dir, [(image stem, label stem)])
FAKE_LAYOUT = [
    ("drive", "train/img", "train/label", [("21_training", "21_manual1"), ("22_training", "22_manual1")]),
    ("drive", "test/img", "test/label", [("01_test", "01_manual1")]),
    ("stare", "test/image", "test/label", [("im0162", "im0162"), ("im0163", "im0163")]),
    ("chase_db1", "test/img", "test/label", [("Image_11L", "Image_11L_1stHO")]),
    ("rc-slo", "test/img", "test/label", [("32_ODC_Merged_Patch1", "32_ODC_Merged_Patch1")]),
]
EXPECTED_IDS = {
    "DRIVE": {"DRIVE_21", "DRIVE_22", "DRIVE_01"},
    "STARE": {"STARE_im0162", "STARE_im0163"},
    "CHASEDB1": {"CHASEDB1_Image_11L"},
    "RCSLO": {"RCSLO_32_ODC_Merged_Patch1"},
}


def make_fake_source(root: Path, shape=(18, 21), vessel_value=1, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for folder, img_dir, lab_dir, pairs in FAKE_LAYOUT:
        (root / folder / img_dir).mkdir(parents=True, exist_ok=True)
        (root / folder / lab_dir).mkdir(parents=True, exist_ok=True)
        for img_stem, lab_stem in pairs:
            img = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
            lab = np.zeros(shape, np.uint8)
            lab[4:10, 3:5] = vessel_value
            tifffile.imwrite(root / folder / img_dir / f"{img_stem}.tif", img)
            tifffile.imwrite(root / folder / lab_dir / f"{lab_stem}.tif", lab)
    return root


def read_png(path):
    from skimage import io

    return io.imread(path)


def test_fake_source_converts_with_identical_metadata(tmp_path):
    src = make_fake_source(tmp_path / "src", vessel_value=255)  # 0/255 masks are normalised to 0/1
    out = convert_retina_vessels(src, tmp_path / "raw", first_id=7)
    assert [p.name for p in out] == ["Dataset007_DRIVE", "Dataset008_STARE", "Dataset009_CHASEDB1", "Dataset010_RCSLO"]
    metas = []
    for folder, (site, ids) in zip(out, EXPECTED_IDS.items()):
        meta = json.loads((folder / "dataset.json").read_text())
        assert meta["numTraining"] == len(ids)
        assert meta["fednnunet_source"] == {"site": site, "collection": meta["fednnunet_source"]["collection"],
                                            "downsample": 1}
        metas.append((meta["channel_names"], meta["labels"], meta["file_ending"]))
        assert {p.name[: -len("_0000.png")] for p in (folder / "imagesTr").iterdir()} == ids
        assert {p.name[: -len(".png")] for p in (folder / "labelsTr").iterdir()} == ids
        for case_id in ids:
            lab = read_png(folder / "labelsTr" / f"{case_id}.png")
            assert lab.shape == (18, 21) and set(np.unique(lab).tolist()) == {0, 1}
    assert all(m == (CHANNEL_NAMES, LABELS, FILE_ENDING) for m in metas)
    # lossless: images round-trip exactly
    src_img = tifffile.imread(src / "stare/test/image/im0162.tif")
    assert np.array_equal(read_png(out[1] / "imagesTr" / "STARE_im0162_0000.png"), src_img)
    # nothing else left in out_dir (no temporary folders)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [p.name for p in out]


def test_nnunet_reader_sees_three_channels(tmp_path):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    out = convert_retina_vessels(make_fake_source(tmp_path / "src"), tmp_path / "raw", first_id=1)
    img, props = NaturalImage2DIO().read_images([str(out[0] / "imagesTr" / "DRIVE_21_0000.png")])
    seg, _ = NaturalImage2DIO().read_seg(str(out[0] / "labelsTr" / "DRIVE_21.png"))
    assert img.shape == (3, 1, 18, 21) and seg.shape == (1, 1, 18, 21)
    assert len(props["spacing"]) == 3


def test_downsample_area_average_and_majority(tmp_path):
    src = make_fake_source(tmp_path / "src", shape=(18, 21))
    img = np.zeros((18, 21, 3), np.uint8)
    img[:2, :2] = [[[0, 10, 100], [2, 10, 100]], [[4, 10, 100], [6, 10, 101]]]
    lab = np.zeros((18, 21), np.uint8)
    lab[0, 2:5] = 1  # block (0,1): 2 of 4 -> tie -> vessel; block (0,2): 1 of 4 -> background
    lab[2:4, 0] = 1  # block (1,0): 2 of 4 -> vessel
    lab[4, 4] = 1  # block (2,2): 1 of 4 -> background
    tifffile.imwrite(src / "rc-slo/test/img/32_ODC_Merged_Patch1.tif", img)
    tifffile.imwrite(src / "rc-slo/test/label/32_ODC_Merged_Patch1.tif", lab)
    out = convert_retina_vessels(src, tmp_path / "raw", first_id=20, downsample=2)
    small_img = read_png(out[3] / "imagesTr" / "RCSLO_32_ODC_Merged_Patch1_0000.png")
    small_lab = read_png(out[3] / "labelsTr" / "RCSLO_32_ODC_Merged_Patch1.png")
    assert small_img.shape == (9, 10, 3) and small_lab.shape == (9, 10)  # 21 -> cropped to 20 -> 10
    assert small_img[0, 0].tolist() == [3, 10, 100]  # means 3, 10, 100.25
    expected = np.zeros((9, 10), np.uint8)
    expected[0, 1] = 1
    expected[1, 0] = 1
    assert np.array_equal(small_lab, expected)
    assert json.loads((out[3] / "dataset.json").read_text())["fednnunet_source"]["downsample"] == 2


@pytest.mark.parametrize(
    "breakage, match",
    [
        (lambda s: (s / "stare").rename(s / "stare_old"), "'stare'"),
        (lambda s: (s / "drive/test/label").rename(s / "drive/test/labels"), "test/label"),
        (lambda s: (s / "chase_db1/test/label/Image_11L_1stHO.tif").unlink(), "Image_11L_1stHO.tif"),
        (lambda s: (s / "drive/train/img/21_training.tif").rename(s / "drive/train/img/21_train.tif"), "21_train.tif"),
        (lambda s: [p.unlink() for p in (s / "rc-slo/test/img").iterdir()], "no .tif images"),
    ],
)
def test_unexpected_layout_is_refused_before_writing(tmp_path, breakage, match):
    src = make_fake_source(tmp_path / "src")
    breakage(src)
    with pytest.raises(ValueError, match=match):
        convert_retina_vessels(src, tmp_path / "raw", first_id=1)
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


def test_bad_files_and_arguments(tmp_path):
    src = make_fake_source(tmp_path / "src")
    bad = np.zeros((18, 21), np.uint8)
    bad[0, 0] = 2
    tifffile.imwrite(src / "stare/test/label/im0163.tif", bad)
    with pytest.raises(ValueError, match="mask values"):
        convert_retina_vessels(src, tmp_path / "raw", first_id=1)
    # a failure while writing leaves no dataset and no temporary folder behind
    assert list((tmp_path / "raw").iterdir()) == []

    src2 = make_fake_source(tmp_path / "src2")
    tifffile.imwrite(src2 / "drive/test/img/01_test.tif", np.zeros((18, 21), np.uint8))  # grey, not RGB
    with pytest.raises(ValueError, match="RGB"):
        convert_retina_vessels(src2, tmp_path / "raw2", first_id=1)

    ok = make_fake_source(tmp_path / "src3")
    for kwargs in ({"downsample": 0}, {"downsample": 1.5}, {"first_id": 0}, {"first_id": 997}):
        args = {"first_id": 1, **kwargs}
        with pytest.raises(ValueError):
            convert_retina_vessels(ok, tmp_path / "raw3", **args)
    with pytest.raises(ValueError, match="does not exist"):
        convert_retina_vessels(tmp_path / "missing", tmp_path / "raw3", first_id=1)

    (tmp_path / "raw4" / "Dataset003_Other").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="Dataset003_Other"):
        convert_retina_vessels(ok, tmp_path / "raw4", first_id=2)


@pytest.mark.skipif(not REAL_SOURCE.is_dir(), reason=f"real retina-vessels data not found at {REAL_SOURCE}")
def test_real_data_downsampled_passes_nnunet_integrity_check(tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    out = convert_retina_vessels(REAL_SOURCE, tmp_path / "raw", first_id=501, downsample=4)
    counts = {"DRIVE": 40, "STARE": 10, "CHASEDB1": 8, "RCSLO": 10}
    assert [p.name for p in out] == [f"Dataset{501 + i}_{s}" for i, s in enumerate(counts)]
    for folder, (site, n) in zip(out, counts.items()):
        meta = json.loads((folder / "dataset.json").read_text())
        assert meta["numTraining"] == n
        assert (meta["channel_names"], meta["labels"], meta["file_ending"]) == (CHANNEL_NAMES, LABELS, FILE_ENDING)
        labels = sorted((folder / "labelsTr").iterdir())
        assert len(labels) == n and len(list((folder / "imagesTr").iterdir())) == n
        fractions = []
        for f in labels:
            lab = read_png(f)
            assert set(np.unique(lab).tolist()) == {0, 1}, f
            fractions.append(lab.mean())
        assert 0.03 < np.mean(fractions) < 0.12, (site, np.mean(fractions))  # README: about 5-7.5 % vessel
        verify_dataset_integrity(str(folder), 1)


def test_crop_pair_differs_in_field_of_view_only(tmp_path):
    """Issue 28, item 5: DRIVE's test images whole and its training images cropped around their vessels, both about
    the same size in pixels; the crop is the window with the most vessel pixels."""
    import json

    from fednnunet.data.retina import _most_vessels_window, convert_retina_crop_pair

    label = np.zeros((8, 10), np.uint8)
    label[5:8, 6:9] = 1
    label[0, 0] = 1
    assert _most_vessels_window(label, 2) == (slice(4, 8), slice(4, 9))  # first window holding all 9 of the block
    src = make_fake_source(tmp_path / "src", shape=(20, 24))
    whole, crop = convert_retina_crop_pair(src, tmp_path / "raw", first_id=30, downsample=4, crop=2)
    assert (whole.name, crop.name) == ("Dataset030_DRIVEWhole", "Dataset031_DRIVECrop")
    # the fake layout has DRIVE_21 and DRIVE_22 in train/, DRIVE_01 in test/
    assert sorted(p.name for p in (whole / "labelsTr").iterdir()) == ["DRIVE_01.png"]
    assert sorted(p.name for p in (crop / "labelsTr").iterdir()) == ["DRIVE_21.png", "DRIVE_22.png"]
    assert read_png(whole / "labelsTr" / "DRIVE_01.png").shape == read_png(crop / "labelsTr" / "DRIVE_21.png").shape \
        == (5, 6)
    # the fake vessel (rows 4-9, columns 3-4) lies in the top-left 10 x 12 window; downsampled 2 x, it is half of
    # 3 x 2 blocks (vessel: ties go to vessel); in the whole image downsampled 4 x it is a quarter of a block
    assert read_png(crop / "labelsTr" / "DRIVE_21.png").sum() == 6
    assert read_png(whole / "labelsTr" / "DRIVE_01.png").sum() == 0
    meta = {d: json.loads((d / "dataset.json").read_text()) for d in (whole, crop)}
    assert meta[crop]["fednnunet_source"] == {"site": "DRIVECrop", "collection": "drive", "downsample": 2, "crop": 2}
    assert meta[whole]["channel_names"] == meta[crop]["channel_names"] and meta[whole]["labels"] == \
        meta[crop]["labels"]
    with pytest.raises(ValueError, match="crop must be >= 2 and divide downsample"):
        convert_retina_crop_pair(src, tmp_path / "raw2", first_id=30, downsample=4, crop=3)
