"""The rest of nnU-Net, federated, end to end on synthetic sites (`make test-long`; not part of `make test`).

Too slow for the default suite (each federation run starts real Flower processes; 3D validation on CPU is slow):

* 2D, two sites with different case counts: FFE planning with nnU-Net's default planner and with the ResEnc M
  preset, federated training of ``2d`` under both plans on folds 0 and 1 with ``--npz`` (a multi-fold run in one
  command), then ``fednnunet run find_best_configuration``: its decision equals nnU-Net's own tool on a dataset
  holding the union of the sites' cross-validation outputs, and the commands it prints run at every site;
* 3D cascade: sites large enough for nnU-Net to plan ``3d_lowres`` (``--scale 2``, ``-gpu_memory_target 0.1``),
  ``3d_lowres`` trained federated on fold ``all`` (every site's final validation writes the next-stage
  predictions of all its cases), ``3d_cascade_fullres`` trained federated on them, ``nnUNetv2_predict`` of the
  cascade at a site.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from conftest import nnunet_env, run_logged  # noqa: E402
from cv_scenario import assert_same_decision  # noqa: E402

BIN = Path(sys.executable).parent
TRAIN = ["--rounds", "1", "--iterations-per-round", "2", "--val-iterations", "1", "--da-workers", "0"]
PLANS = ("nnUNetPlans", "nnUNetResEncUNetMPlans")


@pytest.fixture(scope="module")
def env_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("pipeline")
    env = nnunet_env(root)
    env.update(OMP_NUM_THREADS="1", nnUNet_def_n_proc="1")
    env.pop("nnUNet_n_proc_DA", None)
    return root, env


def _fednnunet(env_root: tuple[Path, dict[str, str]], *argv: str) -> None:
    """`fednnunet ARGV` as a user runs it, its output in ROOT/logs/."""
    root, env = env_root
    (root / "logs").mkdir(exist_ok=True)
    log = root / "logs" / f"{len(list((root / 'logs').iterdir())):02d}_{argv[0]}_{argv[1].strip('-')}.log"
    run_logged([str(BIN / "fednnunet"), *argv], env, log, timeout=3600)


@pytest.fixture(scope="module")
def trained_2d(env_root: tuple[Path, dict[str, str]]) -> Path:
    root, _ = env_root
    _fednnunet(env_root, "demo-data", "--out", str(root / "nnUNet_raw"), "--first-id", "901", "--sites", "2")
    _fednnunet(env_root, "run", "plan_and_preprocess", "901 902", "-c", "2d", "--out", str(root / "plan"))
    _fednnunet(env_root, "run", "plan_and_preprocess", "901 902", "-c", "2d", "-pl", "nnUNetPlannerResEncM",
               "--out", str(root / "plan_resenc"))
    for plans in PLANS:
        _fednnunet(env_root, "run", "train", "901 902", "2d", "0", "1", "-p", plans, "--npz", *TRAIN,
                   "--out", str(root / f"train_{plans}"))
    return root


def test_resenc_preset_plans_are_identical_and_train(trained_2d: Path) -> None:
    pre = trained_2d / "nnUNet_preprocessed"
    plans = [json.loads(next(pre.glob(f"Dataset{d}_*")).joinpath("nnUNetResEncUNetMPlans.json").read_text())
             for d in ("901", "902")]
    for p in plans:
        p.pop("dataset_name")
    assert plans[0] == plans[1]
    assert plans[0]["configurations"]["2d"]["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    result = json.loads((trained_2d / "train_nnUNetResEncUNetMPlans" / "result.json").read_text())
    assert sorted(result["folds"]) == ["0", "1"]


def test_several_folds_are_one_run_with_a_summary_per_fold_and_site(trained_2d: Path) -> None:
    out = trained_2d / "train_nnUNetPlans"
    result = json.loads((out / "result.json").read_text())
    for fold in ("0", "1"):
        assert result["folds"][fold]["rounds"] == 1 and "mean_round_seconds" in result["folds"][fold]
        assert set(result["folds"][fold]["sites"]) == {"901", "902"}
        assert all("validation_mean_dice" in s for s in result["folds"][fold]["sites"].values())
    rows = json.loads((out / "cross_validation.json").read_text())["rows"]
    assert list(rows) == ["fold 0", "fold 1", "all folds"]
    assert rows["all folds"]["pooled"]["num_cases"] == rows["fold 0"]["pooled"]["num_cases"] + \
        rows["fold 1"]["pooled"]["num_cases"]


def _pool(root: Path, sites: list[str], pooled: str) -> None:
    """A dataset holding the union of the sites' labels, plans and cross-validation outputs."""
    raw, pre, res = (root / v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    names = [next(raw.glob(f"Dataset{s}_*")).name for s in sites]

    def renamed(path: Path) -> str:
        data = json.loads(path.read_text())
        if "dataset_name" in data:
            data["dataset_name"] = pooled
        return json.dumps(data)

    for name in names:
        for src, dst in ((raw / name / "labelsTr", raw / pooled / "labelsTr"),
                         (pre / name / "gt_segmentations", pre / pooled / "gt_segmentations")):
            shutil.copytree(src, dst, dirs_exist_ok=True)
        for plans in PLANS:
            (pre / pooled / f"{plans}.json").write_text(renamed(pre / name / f"{plans}.json"))
        shutil.copy(pre / name / "dataset.json", pre / pooled / "dataset.json")
        shutil.copy(raw / name / "dataset.json", raw / pooled / "dataset.json")
        for plans in PLANS:
            model = f"nnUNetTrainer__{plans}__2d"
            for fold in ("0", "1"):
                dst = res / pooled / model / f"fold_{fold}" / "validation"
                dst.mkdir(parents=True, exist_ok=True)
                for f in (res / name / model / f"fold_{fold}" / "validation").iterdir():
                    if f.suffix in (".gz", ".npz", ".pkl"):
                        shutil.copy(f, dst / f.name)
            (res / pooled / model / "plans.json").write_text(renamed(res / name / model / "plans.json"))
            shutil.copy(res / name / model / "dataset.json", res / pooled / model / "dataset.json")


def test_best_configuration_equals_nnunet_on_pooled_outputs_and_its_commands_run(
        env_root: tuple[Path, dict[str, str]], trained_2d: Path, tmp_path: Path) -> None:
    env = env_root[1]
    out = trained_2d / "best"
    _fednnunet(env_root, "run", "find_best_configuration", "901 902", "-c", "2d", "-p", *PLANS, "-f", "0", "1",
               "-np", "1", "--out", str(out))
    fed = json.loads((out / "result.json").read_text())
    assert len(fed["all_results"]) == 3  # two models and their ensemble

    _pool(trained_2d, ["901", "902"], "Dataset990_Pooled")
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "tests" / "cv_scenario.py"), "--nnunet",
                           str(tmp_path), "Dataset990_Pooled", "2d", " ".join(PLANS), "0 1"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_decision(fed, json.loads((tmp_path / "nnunet.json").read_text()))

    for site in ("901", "902"):  # the printed commands, placeholders filled in, CPU flags added
        raw = next((trained_2d / "nnUNet_raw").glob(f"Dataset{site}_*"))
        inp = tmp_path / f"in_{site}"
        inp.mkdir()
        first = sorted((raw / "imagesTr").iterdir())[0]
        shutil.copy(first, inp / first.name)
        places = {"INPUT_FOLDER": str(inp)}
        for placeholder in ("OUTPUT_FOLDER", "OUTPUT_FOLDER_PP", "OUTPUT_FOLDER_MODEL_1", "OUTPUT_FOLDER_MODEL_2"):
            places[placeholder] = str(tmp_path / f"{site}_{placeholder.lower()}")
        for line in fed["sites"][site]["instructions"].splitlines():
            if not line.startswith("nnUNetv2_"):
                continue
            argv = line.split()
            argv = [str(BIN / argv[0])] + [places.get(a, a) for a in argv[1:]]
            if argv[0].endswith("nnUNetv2_predict"):
                argv += ["-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"]
            run = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
            assert run.returncode == 0, " ".join(argv) + run.stdout[-2000:] + run.stderr[-2000:]
        assert len(list(Path(places["OUTPUT_FOLDER_PP"]).glob("*.nii.gz"))) == 1


@pytest.fixture(scope="module")
def cascade(env_root: tuple[Path, dict[str, str]]) -> Path:
    root, _ = env_root
    _fednnunet(env_root, "demo-data", "--out", str(root / "nnUNet_raw"), "--first-id", "911", "--sites", "2",
               "--dim", "3", "--scale", "2")
    _fednnunet(env_root, "run", "plan_and_preprocess", "911 912", "-c", "3d_fullres", "3d_lowres",
               "-gpu_memory_target", "0.1", "--out", str(root / "plan3d"))
    _fednnunet(env_root, "run", "train", "911 912", "3d_lowres", "all", *TRAIN, "--out", str(root / "lowres"))
    _fednnunet(env_root, "run", "train", "911 912", "3d_cascade_fullres", "all", *TRAIN, "--skip-val",
               "--out", str(root / "cascade"))
    return root


def test_cascade_trains_on_every_sites_next_stage_predictions_and_predicts(
        env_root: tuple[Path, dict[str, str]], cascade: Path, tmp_path: Path) -> None:
    raw, res = cascade / "nnUNet_raw", cascade / "nnUNet_results"
    for site in ("911", "912"):
        name = next(raw.glob(f"Dataset{site}_*")).name
        plans = json.loads((cascade / "nnUNet_preprocessed" / name / "nnUNetPlans.json").read_text())
        assert plans["configurations"]["3d_cascade_fullres"]["previous_stage"] == "3d_lowres"
        cases = {p.name[: -len("_0000.nii.gz")] for p in (raw / name / "imagesTr").iterdir()}
        next_stage = res / name / "nnUNetTrainer__nnUNetPlans__3d_lowres" / "predicted_next_stage" / "3d_cascade_fullres"
        assert {p.name.split(".")[0] for p in next_stage.iterdir() if p.suffix != ".pkl"} >= cases
        assert (res / name / "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres" / "fold_all" /
                "checkpoint_final.pth").is_file()
    inp = tmp_path / "in"
    inp.mkdir()
    first = sorted((next(raw.glob("Dataset911_*")) / "imagesTr").iterdir())[0]
    shutil.copy(first, inp / first.name)
    cpu = ["-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1", "-f", "all", "-d", "911"]
    for argv in (["-c", "3d_lowres", "-i", str(inp), "-o", str(tmp_path / "low")],
                 ["-c", "3d_cascade_fullres", "-i", str(inp), "-o", str(tmp_path / "full"),
                  "-prev_stage_predictions", str(tmp_path / "low")]):
        run = subprocess.run([str(BIN / "nnUNetv2_predict"), *argv, *cpu], capture_output=True, text=True,
                             timeout=900, env=env_root[1])
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert len(list((tmp_path / "full").glob("*.nii.gz"))) == 1
