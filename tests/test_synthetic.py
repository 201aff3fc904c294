"""Tests for the synthetic multi-site federation generator (fednnunet.data.synthetic)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fednnunet.data.synthetic import write_demo_federation


def _cases(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray, sitk.Image]]:
    """(case id, image array, label array, image) for every case of a raw dataset."""
    out = []
    for lab in sorted((folder / "labelsTr").glob("*.nii.gz")):
        case = lab.name[: -len(".nii.gz")]
        img = sitk.ReadImage(str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
        out.append((case, sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(sitk.ReadImage(str(lab))), img))
    return out


def _foreground_mean(folder: Path) -> float:
    values = np.concatenate([im[lab > 0] for _, im, lab, _ in _cases(folder)])
    return float(values.mean())


@pytest.fixture(scope="module")
def fed2d(tmp_path_factory) -> list[Path]:
    return write_demo_federation(tmp_path_factory.mktemp("raw2d"), first_id=901, sites=3, dim=2, seed=0)


@pytest.fixture(scope="module")
def fed3d(tmp_path_factory) -> list[Path]:
    return write_demo_federation(tmp_path_factory.mktemp("raw3d"), first_id=911, sites=3, dim=3, seed=0)


def test_layout_and_dataset_json(fed2d: list[Path]) -> None:
    assert [p.name for p in fed2d] == ["Dataset901_SiteA", "Dataset902_SiteB", "Dataset903_SiteC"]
    for folder in fed2d:
        ds = json.loads((folder / "dataset.json").read_text())
        assert ds["numTraining"] == len(list((folder / "labelsTr").glob("*.nii.gz")))
        assert ds["numTraining"] == len(list((folder / "imagesTr").glob("*_0000.nii.gz")))
        assert ds["labels"] == {"background": 0, "ring": 1, "core": 2}
        assert ds["channel_names"] == {"0": "MRI"}
    # No leftovers of the atomic write.
    assert sorted(p.name for p in fed2d[0].parent.iterdir()) == [p.name for p in fed2d]


def test_identical_metadata_across_sites(fed2d: list[Path], fed3d: list[Path]) -> None:
    for fed in (fed2d, fed3d):
        jsons = [json.loads((f / "dataset.json").read_text()) for f in fed]
        for key in ("channel_names", "labels", "file_ending"):
            assert all(j[key] == jsons[0][key] for j in jsons), key
        assert jsons[0]["file_ending"] == ".nii.gz"


def test_ct_channel(tmp_path: Path) -> None:
    folders = write_demo_federation(tmp_path, sites=2, ct=True)
    for f in folders:
        assert json.loads((f / "dataset.json").read_text())["channel_names"] == {"0": "CT"}


def test_determinism(tmp_path: Path, fed2d: list[Path]) -> None:
    again = write_demo_federation(tmp_path / "a", first_id=901, sites=3, dim=2, seed=0)
    other = write_demo_federation(tmp_path / "b", first_id=901, sites=3, dim=2, seed=1)
    for f0, f1, f2 in zip(fed2d, again, other):
        c0, c1, c2 = _cases(f0), _cases(f1), _cases(f2)
        assert [c[0] for c in c0] == [c[0] for c in c1]
        for (_, im0, lab0, _), (_, im1, lab1, _) in zip(c0, c1):
            assert im0.tobytes() == im1.tobytes()
            assert lab0.tobytes() == lab1.tobytes()
        assert any(im0.shape != im2.shape or not np.array_equal(im0, im2)
                   for (_, im0, _, _), (_, im2, _, _) in zip(c0, c2))


def test_site_data_independent_of_site_count(tmp_path: Path, fed2d: list[Path]) -> None:
    (single,) = write_demo_federation(tmp_path, first_id=901, sites=1, dim=2, seed=0)
    for (_, a, la, _), (_, b, lb, _) in zip(_cases(single), _cases(fed2d[0])):
        assert np.array_equal(a, b) and np.array_equal(la, lb)


@pytest.mark.parametrize("dim", [2, 3])
def test_sites_differ(dim: int, fed2d: list[Path], fed3d: list[Path]) -> None:
    fed = fed2d if dim == 2 else fed3d
    spacings = [_cases(f)[0][3].GetSpacing() for f in fed]
    counts = [json.loads((f / "dataset.json").read_text())["numTraining"] for f in fed]
    means = [_foreground_mean(f) for f in fed]
    assert len(set(spacings)) == len(fed)
    assert len(set(counts)) == len(fed) and sum(counts) <= 40
    # Very different intensity ranges: roughly 160 vs 450 vs 280.
    assert 120 < means[0] < 200 and 380 < means[1] < 520 and 220 < means[2] < 340
    if dim == 3:
        # One site with thick (3 mm) slices vs ~1 mm elsewhere: anisotropic.
        assert max(spacings[1]) / min(spacings[1]) >= 3.0
        assert max(spacings[0]) / min(spacings[0]) < 1.5


@pytest.mark.parametrize("dim", [2, 3])
def test_images_are_learnable_and_valid(dim: int, fed2d: list[Path], fed3d: list[Path]) -> None:
    fed = fed2d if dim == 2 else fed3d
    fg_fractions = []
    zero_border_sites = 0
    for folder in fed:
        cases = _cases(folder)
        has_zero_border = False
        for _, im, lab, img in cases:
            assert img.GetDimension() == dim and im.dtype == np.float32 and lab.dtype == np.uint8
            assert np.isfinite(im).all()
            assert set(np.unique(lab)) == {0, 1, 2}  # both foreground labels always present
            inside = im[lab == 0]
            # Labels match intensities: core brighter than ring brighter than background.
            assert im[lab == 2].mean() > im[lab == 1].mean() > inside.mean()
            fg_fractions.append(float((lab > 0).mean()))
            if (im == 0).any():
                has_zero_border = True
                # Zeros only form a frame: inside their bounding box all voxels are nonzero.
                nz = np.nonzero(im)
                box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in nz)
                assert (im[box] != 0).all() and im[box].size < im.size
        zero_border_sites += has_zero_border
    assert zero_border_sites == 1
    assert min(fg_fractions) < 0.01  # one case with very little foreground


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "Dataset902_Something").mkdir()
    with pytest.raises(FileExistsError, match="Dataset902_Something"):
        write_demo_federation(tmp_path, first_id=901, sites=3)
    # Nothing was written, not even the sites whose ids were free.
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset902_Something"]


@pytest.mark.parametrize("kwargs", [dict(dim=4), dict(sites=0), dict(first_id=998, sites=3), dict(first_id=0)])
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        write_demo_federation(tmp_path, **kwargs)


def test_fast(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    write_demo_federation(tmp_path / "2d", dim=2)
    write_demo_federation(tmp_path / "3d", dim=3)
    assert time.perf_counter() - t0 < 5.0


# nnU-Net reads nnUNet_raw & co. at import time (nnunetv2.paths), so every nnU-Net step runs in a fresh
# interpreter with those variables set; this also keeps nnunetv2's module state out of this test process.
_NNUNET_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints, plan_experiments, preprocess)
    raw, pp, folders, plan_id = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])
    for f in folders:
        verify_dataset_integrity(f, num_processes=1)
    extract_fingerprints([plan_id], num_processes=1, verbose=False, show_progress_bar=False)
    plan_experiments([plan_id])
    preprocess([plan_id], configurations=["2d"], num_processes=[1], verbose=False)
    print("NNUNET_OK")
    """
)


@pytest.mark.long  # 1 min; the synthetic sites go through stock nnU-Net planning in many other tests too
def test_nnunet_verify_fingerprint_plan_preprocess(fed2d: list[Path], tmp_path: Path) -> None:
    raw = fed2d[0].parent
    pp, results = tmp_path / "preprocessed", tmp_path / "results"
    pp.mkdir()
    results.mkdir()
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pp), nnUNet_results=str(results),
               OMP_NUM_THREADS="1")
    site_c = fed2d[2]  # the site with a zero border: cropping must change the shape
    proc = subprocess.run(
        [sys.executable, "-c", _NNUNET_SCRIPT, str(raw), str(pp), ",".join(map(str, fed2d)), "903"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0 and "NNUNET_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]

    fp = json.loads((pp / site_c.name / "dataset_fingerprint.json").read_text())
    raw_shapes = [im.shape for _, im, _, _ in _cases(site_c)]
    assert len(fp["shapes_after_crop"]) == len(raw_shapes) == 12
    for crop, shape in zip(fp["shapes_after_crop"], raw_shapes):
        assert crop[0] == 1 and tuple(crop[1:]) == (shape[0] - 6, shape[1] - 6)  # 3-pixel zero frame removed
    assert np.allclose(fp["spacings"][0][1:], [1.25, 1.25])
    props = fp["foreground_intensity_properties_per_channel"]["0"]
    assert all(np.isfinite(v) for v in props.values())
    assert 220 < props["mean"] < 340
    plans = json.loads((pp / site_c.name / "nnUNetPlans.json").read_text())
    assert "2d" in plans["configurations"]
    assert len(list((pp / site_c.name / "nnUNetPlans_2d").glob("*.b2nd"))) == 2 * 12  # data + seg
