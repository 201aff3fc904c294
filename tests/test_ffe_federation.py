"""End to end: `fednnunet run plan_and_preprocess` with a real SuperLink, SuperNodes and site workers equals
nnU-Net's own extraction and planning on the pooled dataset, and broken sites fail cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fednnunet.data.pooled import pool_datasets
from conftest import nnunet_env
from faults import replace_voxels, store_non_finite
from fednnunet.data.synthetic import write_demo_federation

BIN = Path(sys.executable).parent
SITES = ["Dataset901_SiteA", "Dataset902_SiteB", "Dataset903_SiteC"]


def _run(cmd: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def federated(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffe")
    env = nnunet_env(root)
    raw = Path(env["nnUNet_raw"])
    write_demo_federation(raw, first_id=901, sites=3, dim=2, seed=0, ct=True)
    res = _run([str(BIN / "fednnunet"), "run", "plan_and_preprocess", "901 902 903", "-c", "2d",
                "--out", str(root / "out")], env)
    assert res.returncode == 0, res.stdout + res.stderr
    pool_datasets(raw, [901, 902, 903], 990)
    ref = _run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "990", "-c", "2d", "-np", "1", "--no_pp"], env)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    return root, env, res.stdout


def _load(root: Path, dataset: str, name: str) -> dict:
    return json.loads((root / "nnUNet_preprocessed" / dataset / name).read_text())


def test_fingerprint_equals_pooled_extraction(federated):
    root, _, _ = federated
    ref = _load(root, "Dataset990_Pooled", "dataset_fingerprint.json")
    for site in SITES:
        fp = _load(root, site, "dataset_fingerprint.json")
        r = ref["foreground_intensity_properties_per_channel"]["0"]
        f = fp["foreground_intensity_properties_per_channel"]["0"]
        for key in ("min", "max", "median", "percentile_00_5", "percentile_99_5"):
            assert f[key] == r[key], (site, key)
        for key in ("mean", "std"):
            assert f[key] == pytest.approx(r[key], rel=1e-6), (site, key)
        assert sorted(map(tuple, fp["spacings"])) == sorted(map(tuple, ref["spacings"]))
        assert sorted(map(tuple, fp["shapes_after_crop"])) == sorted(map(tuple, ref["shapes_after_crop"]))
        assert fp["median_relative_size_after_cropping"] == ref["median_relative_size_after_cropping"]


def test_plans_equal_pooled_planning(federated):
    root, _, _ = federated
    ref = _load(root, "Dataset990_Pooled", "nnUNetPlans.json")
    for site in SITES:
        plans = _load(root, site, "nnUNetPlans.json")
        assert plans["configurations"] == ref["configurations"], site
        for key in set(ref) - {"dataset_name", "foreground_intensity_properties_per_channel"}:
            assert plans[key] == ref[key], (site, key)
        assert (root / "nnUNet_preprocessed" / site / "nnUNetPlans_2d").is_dir()
        assert (root / "nnUNet_preprocessed" / site / "gt_segmentations").is_dir()
    assert ref["configurations"]["2d"]["normalization_schemes"] == ["CTNormalization"]


def test_progress_and_round_trips_reported(federated):
    root, _, stdout = federated
    result = json.loads((root / "out" / "result.json").read_text())
    assert result["ok"] and result["round_trips"] == 4  # describe, sample, one percentile count, apply
    assert "percentile search round" in stdout and "done in" in stdout
    # one channel: every site sampled after its describe reply, and the fingerprint test above shows it exact
    for site in ("901", "902", "903"):
        log = (root / "out" / "federation" / "logs" / f"worker-{site}.log").read_text()
        assert "using the cases analysed ahead" in log, site


def test_broken_site_fails_with_site_and_case_named_and_writes_nothing(tmp_path):
    """Faults that nnU-Net's reader hides (a file cut short, NaN stored) stop planning before anything is written;
    a warning (an empty label) reaches the output."""
    env = nnunet_env(tmp_path)
    raw = Path(env["nnUNet_raw"])
    write_demo_federation(raw, first_id=901, sites=2, dim=2, seed=1)
    cut_image = sorted((raw / "Dataset902_SiteB" / "imagesTr").glob("*.nii.gz"))[0]
    cut_image.write_bytes(cut_image.read_bytes()[:200])  # SimpleITK reads this as an all-zero image
    nan_image, empty_label = sorted((raw / "Dataset901_SiteA" / "imagesTr").glob("*.nii.gz"))[1], \
        sorted((raw / "Dataset901_SiteA" / "labelsTr").glob("*.nii.gz"))[2]
    store_non_finite(nan_image, [np.nan])
    replace_voxels(empty_label, np.zeros_like)
    res = _run([str(BIN / "fednnunet"), "run", "plan_and_preprocess", "901 902", "-c", "2d",
                "--out", str(tmp_path / "out")], env, timeout=600)
    assert res.returncode != 0
    case = cut_image.name[: -len("_0000.nii.gz")]
    assert f"site 902, case {case}: file imagesTr/{cut_image.name}: cut short: its gzip stream" in res.stderr, \
        res.stdout + res.stderr
    case = nan_image.name[: -len("_0000.nii.gz")]
    assert f"site 901, case {case}: file imagesTr/{nan_image.name}: 1 NaN voxel(s) stored" in res.stderr
    case = empty_label.name[: -len(".nii.gz")]
    assert f"WARNING: site 901, case {case}: file labelsTr/{empty_label.name}: label is empty" in res.stdout
    assert not list(Path(env["nnUNet_preprocessed"]).rglob("*"))
