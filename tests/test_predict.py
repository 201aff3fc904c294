"""End to end: train a tiny 2D site for one short epoch, predict its held-out fold-0 cases with nnU-Net's
predictor, and score them.

Everything that imports nnunetv2 runs in subprocesses with the nnUNet_* variables set (``nnunetv2.paths`` reads
them once, at import). One driver run per module, on conftest's ``planned_site`` (planned once per session,
shared with test_site_trainer.py) with its own results folder; the tests assert on the driver's JSON report.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import PLANNED_SITE_ID as DATASET_ID
from conftest import run_logged, trainer_env

_DRIVER = textwrap.dedent('''
    import json
    import sys
    import time
    from pathlib import Path


    def main(root, report_path):
        import os

        from fednnunet.evaluation.predict import case_input_files, held_out_cases, predict_cases
        from fednnunet.evaluation.report import evaluate_predictions
        from fednnunet.training.site_trainer import SiteTrainer

        root = Path(root)
        raw = next(Path(os.environ["nnUNet_raw"]).glob("DatasetDATASET_ID_*"))
        pre = Path(os.environ["nnUNet_preprocessed"]) / raw.name
        report = {}
        st = SiteTrainer(DATASET_ID, "2d", fold=0, device="cpu", total_epochs=1, iterations_per_epoch=2,
                         val_iterations=1, num_workers=0)
        st.run_epoch()
        fold_folder = st.finish(validate=False)
        model_folder = fold_folder.parent
        report["model_folder"] = str(model_folder)

        cases = held_out_cases(pre, 0)
        report["held_out"] = cases
        report["train_cases"] = json.loads((pre / "splits_final.json").read_text())[0]["train"]
        files = case_input_files(raw, cases)
        report["input_files"] = files

        start = time.perf_counter()
        outputs = predict_cases(model_folder, [0], files, root / "pred", device="cpu")
        report["predict_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        outputs_seq = predict_cases(model_folder, "0", files, root / "pred_seq", device="cpu", sequential=True)
        report["predict_sequential_seconds"] = time.perf_counter() - start
        report["outputs"] = [str(p) for p in outputs]
        report["outputs_seq"] = [str(p) for p in outputs_seq]

        report["eval"] = evaluate_predictions(root / "pred", raw / "labelsTr", raw / "dataset.json")
        report["eval_seq"] = evaluate_predictions(root / "pred_seq", raw / "labelsTr", raw / "dataset.json")
        errors = {}
        try:
            predict_cases(model_folder, [0, 1], files, root / "pred_bad")
        except FileNotFoundError as e:
            errors["missing_fold"] = str(e)
        report["errors"] = errors
        Path(report_path).write_text(json.dumps(report, indent=1))


    if __name__ == "__main__":  # nnU-Net's workers use spawn, which re-imports this file
        main(sys.argv[1], sys.argv[2])
''').replace("DATASET_ID", str(DATASET_ID))


@pytest.fixture(scope="module")
def run(planned_site: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("predict")
    env = trainer_env(planned_site, root / "results")
    driver = root / "driver.py"
    driver.write_text(_DRIVER)
    report_path = root / "report.json"
    run_logged([sys.executable, str(driver), str(root), str(report_path)], env, root / "driver.log", timeout=900)
    report = json.loads(report_path.read_text())
    report["root"] = str(root)
    return report


def test_predicts_exactly_the_held_out_cases(run: dict) -> None:
    held_out = run["held_out"]
    assert held_out and not set(held_out) & set(run["train_cases"])
    assert [Path(p).name for p in run["outputs"]] == [f"{c}.nii.gz" for c in held_out]
    assert all(Path(p).is_file() for p in run["outputs"])
    assert all(len(f) == 1 and f[0].endswith("_0000.nii.gz") for f in run["input_files"])
    # nnU-Net's record of how the predictions were made sits next to them
    assert (Path(run["root"]) / "pred" / "predict_from_raw_data_args.json").is_file()


def test_evaluation_of_predictions_is_complete_and_finite(run: dict) -> None:
    for key in ("eval", "eval_seq"):
        e = run[key]
        assert e["cases"] == len(run["held_out"])
        assert [c["case"] for c in e["per_case"]] == run["held_out"]
        assert 0.0 <= e["dsc"] <= 1.0 and e["hd95"] >= 0.0
        assert set(e["per_class"]) == {"1", "2"}  # ring, core


def test_sequential_prediction_gives_the_same_segmentations(run: dict) -> None:
    import numpy as np
    import SimpleITK as sitk

    for a, b in zip(run["outputs"], run["outputs_seq"]):
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(a)), sitk.GetArrayFromImage(sitk.ReadImage(b)))
    assert run["eval"]["per_case"] == run["eval_seq"]["per_case"]


def test_missing_fold_is_reported_before_any_work(run: dict) -> None:
    assert "fold 1" in run["errors"]["missing_fold"]
