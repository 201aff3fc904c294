"""Faults that nnU-Net's reader hides, written the way they happen, each with the message a person gets: from the
file checks themselves and from `fednnunet check DATASET` (the federation's side: test_bad_inputs.py and
test_ffe_federation.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import nnunet_env
from faults import cut, drop_trailer, flip_trailer_byte, overclaim, replace_voxels, store_non_finite
from fednnunet.data.synthetic import write_demo_federation
from fednnunet.fingerprint import file_checks
from fednnunet.fingerprint.file_checks import file_problems

BIN = Path(sys.executable).parent
CUT = "cut short: its gzip stream ends after"
NAN = "NaN voxel(s) stored (SimpleITK, nnU-Net's NIfTI reader, reads them as 0)"
INF = "infinite voxel(s) stored"
CRC = "damaged: its gzip CRC-32 check failed"
LENGTH = "damaged: the length in its gzip trailer does not match the data"


def _image(path: Path, array: np.ndarray | None = None, compressed: bool = True) -> Path:
    array = np.random.default_rng(0).normal(100, 10, (6, 20, 24)).astype(np.float32) if array is None else array
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), useCompression=compressed)
    return path


# --- the file checks -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 0.9, 0.99])
def test_cut_short_nifti_gz(tmp_path, fraction):
    f = _image(tmp_path / "x.nii.gz")
    assert file_problems(f) == []
    cut(f, fraction)
    (problem,) = file_problems(f)
    assert problem.startswith(CUT) and "before its end marker and trailer (CRC and length)" in problem


@pytest.mark.parametrize("fault, expected", [(drop_trailer, CUT), (lambda f: flip_trailer_byte(f, -8), CRC),
                                             (lambda f: flip_trailer_byte(f, -2), LENGTH)])
def test_gzip_trailer_missing_or_damaged(tmp_path, fault, expected):
    f = _image(tmp_path / "x.nii.gz")
    fault(f)
    (problem,) = file_problems(f)
    assert problem.startswith(expected), problem


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
@pytest.mark.parametrize("dtype", [np.float32, np.dtype(">f8")])
def test_nan_and_inf_as_stored(tmp_path, ending, dtype, monkeypatch):
    f = _image(tmp_path / f"x{ending}", compressed=ending == ".nii.gz")
    store_non_finite(f, [np.nan, np.nan, np.inf, -np.inf, np.nan], dtype)
    monkeypatch.setattr(file_checks, "CHUNK_BYTES", 7)  # chunks that split voxels: counted across the seams
    assert file_problems(f) == [f"3 {NAN}", f"2 {INF} (SimpleITK, nnU-Net's NIfTI reader, reads them as 0)"]


def test_uncompressed_nifti_shorter_than_its_header_says(tmp_path):
    f = _image(tmp_path / "x.nii", compressed=False)
    overclaim(f)
    (problem,) = file_problems(f)
    assert problem == ("holds 11520 of the 12000 bytes of voxel data its NIfTI header describes (96.0 %): cut "
                       "short, or the header is wrong")
    g = _image(tmp_path / "y.nii", compressed=False)
    cut(g, 0.5)
    assert "voxel data its NIfTI header describes" in file_problems(g)[0]


def test_intact_files_of_every_checked_format_pass(tmp_path):
    files = [_image(tmp_path / "a.nii.gz"), _image(tmp_path / "b.nii", compressed=False),
             _image(tmp_path / "c.mha"), _image(tmp_path / "d.mha", compressed=False), _image(tmp_path / "e.gipl"),
             _image(tmp_path / "f.png", np.arange(64 * 48, dtype=np.uint8).reshape(64, 48))]
    two = tmp_path / "g.nii.gz"  # two gzip members, as some tools write; and zero padding after the stream
    two.write_bytes(files[0].read_bytes() + files[0].read_bytes() + b"\0" * 16)
    assert {f.name: file_problems(f) for f in [*files, two]} == {f.name: [] for f in [*files, two]}


def test_other_formats_whose_reader_hides_faults(tmp_path):
    mha = _image(tmp_path / "x.mha")  # SimpleITK prints "Uncompress failed" and returns wrong voxels
    data = bytearray(mha.read_bytes())
    data[-1] ^= 0x10  # its Adler-32
    mha.write_bytes(bytes(data))
    assert file_problems(mha) == ["damaged: its zlib Adler-32 check failed"]
    gipl = _image(tmp_path / "x.gipl")  # SimpleITK reads a cut GIPL without an error
    cut(gipl, 0.5)
    assert file_problems(gipl) == ["holds 5632 of the 11520 bytes of voxel data its GIPL header describes (48.9 %): "
                                   "cut short, or the header is wrong"]
    png = _image(tmp_path / "x.png", np.arange(64 * 48, dtype=np.uint8).reshape(64, 48))
    data = png.read_bytes()
    png.write_bytes(data[:-20])  # the reader zero-fills the last pixels
    assert file_problems(png) == ["cut short inside its IDAT chunk (an interrupted copy?)"]
    bad = bytearray(data)
    bad[len(data) // 2] ^= 0x10
    png.write_bytes(bytes(bad))
    assert file_problems(png) == ["damaged: its IDAT chunk's CRC check failed"]


# --- `fednnunet check DATASET` -------------------------------------------------------------------------------------
def _case_files(folder: Path) -> list[tuple[str, Path, Path]]:
    out = []
    for label in sorted((folder / "labelsTr").glob("*.nii.gz")):
        case = label.name[: -len(".nii.gz")]
        out.append((case, folder / "imagesTr" / f"{case}_0000.nii.gz", label))
    return out


def _check(env: dict[str, str], *args: str) -> tuple[int, str]:
    """`fednnunet check` with nnUNet_raw only; its output with the table's line wraps undone."""
    only_raw = {k: v for k, v in env.items() if k not in ("nnUNet_preprocessed", "nnUNet_results")}
    res = subprocess.run([str(BIN / "fednnunet"), "check", *args], env=only_raw, capture_output=True, text=True,
                         timeout=120)
    return res.returncode, " ".join(res.stdout.split()) + res.stderr


def test_check_command_names_case_file_and_fault(tmp_path):
    env = nnunet_env(tmp_path)
    raw = Path(env["nnUNet_raw"])
    _, folder = write_demo_federation(raw, first_id=921, sites=2, dim=2, seed=3)  # the second site: 9 cases
    cases = _case_files(folder)
    faults = [  # per case: the fault, and the first message of its row (after case and file count)
        (lambda img, lab: cut(img, 0.5), f"ERROR file imagesTr/{{img}}: {CUT}"),
        (lambda img, lab: store_non_finite(img, [np.nan, np.inf]), f"ERROR file imagesTr/{{img}}: 1 {NAN}"),
        (lambda img, lab: drop_trailer(lab), f"ERROR file labelsTr/{{lab}}: {CUT}"),
        (lambda img, lab: flip_trailer_byte(img, -7), f"ERROR file imagesTr/{{img}}: {CRC}"),
        (lambda img, lab: flip_trailer_byte(lab, -3), f"ERROR file labelsTr/{{lab}}: {LENGTH}"),
        (lambda img, lab: replace_voxels(lab, np.zeros_like), "warning file labelsTr/{lab}: label is empty "
                                                              "(background only)"),
        (lambda img, lab: replace_voxels(img, np.zeros_like), "warning file imagesTr/{img} (channel 0, MRI): image "
                                                              "is all zero"),
        (lambda img, lab: replace_voxels(img, lambda a: a * 1000), "warning file imagesTr/{img} (channel 0, MRI): "
                                                                   "intensity range"),
    ]
    for (fault, _), (_, img, lab) in zip(faults, cases):
        fault(img, lab)
    code, out = _check(env, "922", "-np", "2")  # two processes: the rows stay in case order
    assert code == 1, out
    for (_, expected), (case, img, lab) in zip(faults, cases):
        assert f"{case} 2 {expected.format(img=img.name, lab=lab.name)}" in out, (case, expected, out)
    assert "is far outside the other cases' (median range" in out and "]): no overlap" in out
    assert f"{cases[8][0]} 2 ok" in out
    assert "9 case(s): 1 ok, 3 with warnings, 5 with errors" in out

    case, _, label = _case_files(raw / "Dataset921_SiteA")[0]  # a dataset with warnings only passes
    replace_voxels(label, np.zeros_like)
    code, out = _check(env, "921")
    assert code == 0 and f"{case} 2 warning file labelsTr/{label.name}: label is empty" in out, out


def test_check_command_and_client_uncompressed_nifti_header_claims_more(tmp_path):
    env = nnunet_env(tmp_path)
    (folder,) = write_demo_federation(Path(env["nnUNet_raw"]), first_id=923, sites=1, dim=3, seed=4)  # (NibabelIO:
    # nnU-Net's reader of .nii reads 3D only)
    for f in [*folder.glob("imagesTr/*.nii.gz"), *folder.glob("labelsTr/*.nii.gz")]:
        nib.save(nib.load(f), str(f)[: -len(".gz")])
        f.unlink()
    dataset_json = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**dataset_json, "file_ending": ".nii"}))
    image = sorted(folder.glob("imagesTr/*.nii"))[2]
    overclaim(image)
    code, out = _check(env, "923")
    case = image.name[: -len("_0000.nii")]
    assert code == 1
    assert f"{case} 2 ERROR file imagesTr/{image.name}: holds " in out, out
    assert "bytes of voxel data its NIfTI header describes" in out, out
    assert "read with NibabelIO" in out and "5 ok, 0 with warnings, 1 with errors; 0 dataset problem(s)" in out, out

    # a hospital's `fednnunet client` checks before it starts anything (nothing listens on the server's port)
    res = subprocess.run([str(BIN / "fednnunet"), "client", "plan_and_preprocess", "923", "--server", "127.0.0.1:9",
                          "--insecure", "--connect-timeout", "5"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"error: site 923, case {case}: file imagesTr/{image.name}: holds " in res.stderr
    assert "error: site 923: 1 data problem(s); not connecting" in res.stderr
    assert not list(Path(env["nnUNet_results"]).rglob("*.log"))  # no SuperNode, no site worker started
