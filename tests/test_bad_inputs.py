"""A table of broken site inputs, each with the message a person gets (site, case and problem named).

The site worker's `describe` operation is what the server calls first; it runs here in a subprocess (nnU-Net
reads its folders from the environment at import) over one raw folder holding one broken dataset per row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from faults import cut, replace_voxels, store_non_finite
from fednnunet.data.synthetic import write_demo_federation
from fednnunet.fingerprint.checks import FederationDataError
from fednnunet.fingerprint.coordinator import FingerprintJob, _describe
from fednnunet.protocol.envelope import request_body
from fednnunet.protocol.messages import Describe, DescribeReply, TrainInit

ROWS = {  # dataset id -> (how it is broken, expected message)
    911: ("nan", "site s911, case {case}: file imagesTr/{case}_0000.nrrd (channel 0, MRI): image contains 1 NaN "
                 "values"),
    912: ("label", "site s912, case {case}: file labelsTr/{case}.nii.gz: label values [7] are not in dataset.json "
                   "labels [0, 1, 2]"),
    913: ("shape", "site s913, case {case}: image shape"),
    914: ("missing", "site s914, case {case}: missing file(s)"),
    915: ("empty", "site s915: dataset.json says numTraining="),
    916: ("cut", "site s916, case {case}: file imagesTr/{case}_0000.nii.gz: cut short: its gzip stream ends after"),
    917: ("nifti_nan", "site s917, case {case}: file imagesTr/{case}_0000.nii.gz: 2 NaN voxel(s) stored"),
    918: ("empty_label", "site s918, case {case}: file labelsTr/{case}.nii.gz: label is empty (background only)"),
    999: ("absent", "site s999: dataset 999 not found"),
}
WARNINGS = ("empty_label",)  # rows whose dataset passes, with a warning

SCRIPT = """
import json, sys
from fednnunet.protocol.envelope import request_body
from fednnunet.protocol.messages import Describe
from fednnunet.site.worker import SiteWorker
out = {}
for ds in sys.argv[1:]:
    body, _ = SiteWorker(f"s{ds}", ds).handle(request_body(Describe(task="")), {})
    out[ds] = body
print(json.dumps(out))
"""


def _first_case(folder: Path) -> tuple[str, Path, Path]:
    label = sorted((folder / "labelsTr").glob("*.nii.gz"))[0]
    case = label.name[: -len(".nii.gz")]
    return case, folder / "imagesTr" / f"{case}_0000.nii.gz", label


def _break(folder: Path, how: str) -> str:
    case, image, label = _first_case(folder)
    if how == "nan":
        # SimpleITK reads NaN in NIfTI as 0 (seen with SimpleITK 2.5), so this dataset moves to NRRD, which
        # keeps NaN and which nnU-Net also reads with SimpleITK
        for f in [*folder.glob("imagesTr/*.nii.gz"), *folder.glob("labelsTr/*.nii.gz")]:
            img = sitk.ReadImage(str(f))
            if f == image:
                arr = sitk.GetArrayFromImage(img)
                arr[0, 0] = np.nan
                nan_img = sitk.GetImageFromArray(arr)
                nan_img.CopyInformation(img)
                img = nan_img
            sitk.WriteImage(img, str(f).replace(".nii.gz", ".nrrd"))
            f.unlink()
        dj = json.loads((folder / "dataset.json").read_text())
        (folder / "dataset.json").write_text(json.dumps({**dj, "file_ending": ".nrrd"}))
    elif how == "label":
        seg = sitk.ReadImage(str(label))
        arr = sitk.GetArrayFromImage(seg)
        arr[0, 0] = 7
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(seg)
        sitk.WriteImage(out, str(label))
    elif how == "shape":
        img = sitk.ReadImage(str(image))
        arr = sitk.GetArrayFromImage(img)[:-3]
        out = sitk.GetImageFromArray(arr)
        out.SetSpacing(img.GetSpacing())
        sitk.WriteImage(out, str(image))
    elif how == "missing":
        label.unlink()  # (a missing image makes nnU-Net drop the case: caught as a numTraining mismatch)
    elif how == "empty":
        for f in [*folder.glob("imagesTr/*"), *folder.glob("labelsTr/*")]:
            f.unlink()
    elif how == "cut":  # an interrupted copy, which SimpleITK reads as zeros
        cut(image, 0.6)
    elif how == "nifti_nan":  # which SimpleITK reads as 0
        store_non_finite(image, [np.nan, np.nan])
    elif how == "empty_label":
        replace_voxels(label, np.zeros_like)
    return case


def test_bad_inputs_are_reported_with_site_and_case(tmp_path):
    raw = tmp_path / "raw"
    cases = {}
    for ds, (how, _) in ROWS.items():
        if how == "absent":
            continue
        (folder,) = write_demo_federation(raw, first_id=ds, sites=1, dim=2, seed=ds)
        cases[ds] = _break(folder, how)
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "res"))
    res = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, ROWS)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    replies = json.loads(res.stdout.strip().splitlines()[-1])
    for ds, (how, expected) in ROWS.items():
        body = replies[str(ds)]
        text = body["error"] if not body["ok"] else "\n".join(body["result"]["problems"])
        if how in WARNINGS:
            assert body["ok"] and not body["result"]["problems"], body
            text = "\n".join(body["result"]["warnings"])
        assert expected.format(case=cases.get(ds)) in text, (how, text)
    assert not (tmp_path / "pre").exists() or not list((tmp_path / "pre").rglob("*.json"))


class _Caller:
    sites = ["a", "b"]

    def __init__(self, replies):
        self.replies = replies

    def broadcast(self, request, arrays=None, timeout_s=None):
        assert isinstance(request, Describe)
        return {s: (r, {}) for s, r in self.replies.items()}


def _desc(**over) -> DescribeReply:
    from fednnunet import __version__

    base = {"dataset_name": "Dataset1_X", "num_cases": 2, "problems": [], "version": __version__,
            "dataset_json": {"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1},
                             "file_ending": ".nii.gz"}}
    return DescribeReply(**{**base, **over})


def test_version_and_zero_cases_mismatch_named():
    with pytest.raises(FederationDataError, match=r"sites on other versions: b: 0\.0\.1"):
        _describe(_Caller({"a": _desc(), "b": _desc(version="0.0.1")}), FingerprintJob())
    with pytest.raises(FederationDataError, match="site b: dataset Dataset1_X has no training cases"):
        _describe(_Caller({"a": _desc(), "b": _desc(num_cases=0)}), FingerprintJob())
    with pytest.raises(FederationDataError, match="'channel_names' differs between sites"):
        _describe(_Caller({"a": _desc(), "b": _desc(dataset_json={**_desc().dataset_json,
                                                                  "channel_names": {"0": "MRI"}})}),
                  FingerprintJob())


def test_missing_environment_is_named(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    res = subprocess.run([str(Path(sys.executable).parent / "fednnunet"), "run", "extract_fingerprint", "901"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "nnUNet_raw, nnUNet_preprocessed, nnUNet_results" in res.stderr


def test_site_refuses_a_job_it_was_not_started_for():
    from fednnunet.site.worker import SiteWorker

    worker = SiteWorker("s1", "901", task="train", train_expect=("2d", ["0", "1"]))
    train_init = TrainInit(configuration="3d_fullres", fold="0", trainer="nnUNetTrainer", plans="nnUNetPlans",
                           device="cpu", npz=False, continue_training=False, pretrained_weights=None, val_best=False,
                           disable_checkpointing=False, rounds=1, iterations_per_round=None, val_iterations=None,
                           epochs_per_round=1, da_workers=None, transfer_dtype="float32", seed=None,
                           momentum="local")
    body, _ = worker.handle(request_body(train_init), {})
    assert not body["ok"] and "started for 2d fold(s) 0 1 but the server trains 3d_fullres fold 0" in body["error"]
    body, _ = worker.handle(request_body(Describe(task="plan_and_preprocess")), {})
    assert not body["ok"] and "started for task 'train' but the server runs 'plan_and_preprocess'" in body["error"]


def test_sites_that_cannot_be_federated_end_with_the_error_line_and_no_traceback(tmp_path):
    """An expected data error (labels that differ between sites) is one error line for the user, not a traceback."""
    raw = tmp_path / "raw"
    write_demo_federation(raw, first_id=931, sites=2, dim=2, seed=3)
    (dataset_json,) = raw.glob("Dataset932_*/dataset.json")
    content = json.loads(dataset_json.read_text())
    content["labels"]["extra"] = 3
    dataset_json.write_text(json.dumps(content))
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "res"))
    res = subprocess.run([str(Path(sys.executable).parent / "fednnunet"), "run", "extract_fingerprint", "931 932",
                          "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "error: sites cannot be federated: 'labels' differs between sites" in res.stderr, res.stderr
    assert "Traceback" not in res.stdout + res.stderr, res.stdout + res.stderr
