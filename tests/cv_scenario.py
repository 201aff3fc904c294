"""Federated find_best_configuration against nnU-Net's own tool on the pooled predictions (run as a script).

``python cv_scenario.py ROOT SCENARIO`` writes, under ROOT (the three nnU-Net folders), the cross-validation
outputs of two models (``2d`` and ``3d_fullres``, folds 0 and 1, segmentations plus ``--npz`` probabilities) at two
sites with different case counts, and a pooled dataset holding the union of the same files. It runs

* the federation's task (``run_job``: the server's decisions) against the real site workers (``SiteWorker.handle``,
  whose operations write the files), joined by ``in_process.InProcessCaller``, which passes every message through
  the protocol's envelope and JSON as the network would;
* ``nnunetv2.evaluation.find_best_configuration.find_best_configuration`` on the pooled dataset;

and writes ``ROOT/compare.json`` with both sides' decisions and figures, for the test to compare. Scenarios:
``helps``: one site's predictions carry small spurious components far from the objects (removing all but the
largest foreground component helps the pooled result, not that site's own) and the other's carry small core
islands outside the ring (keeping the largest core component helps); ``no_help``: some cases hold a second object
and nothing is spurious, so no postprocessing step helps. A third case per site has no core at all (Dice NaN
for the core in that case).

nnU-Net spawns worker processes that re-import this file: the work is under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

SHAPE = (10, 26, 26)
SITES = {"901": ("Dataset901_SiteA", "sitea", 4), "902": ("Dataset902_SiteB", "siteb", 6)}
POOLED = "Dataset990_Pooled"
CONFIGS = ("2d", "3d_fullres")
FOLDS = (0, 1)
LABELS = {"background": 0, "ring": 1, "core": 2}


def _ball(center: tuple[float, ...], radius: float) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius ** 2


def _reference(rng: np.random.Generator, two_objects: bool, core: bool) -> np.ndarray:
    seg = np.zeros(SHAPE, np.uint8)
    centers = [(5, 8, 8), (5, 18, 18)] if two_objects else [(5, 12, 12)]
    for i, c in enumerate(centers):
        c = tuple(x + rng.uniform(-0.5, 0.5) for x in c)
        seg[_ball(c, 4.2 if i == 0 else 3.2)] = 1
        if core and i == 0:
            seg[_ball(c, 2.2)] = 2
    return seg


def _perturb(rng: np.random.Generator, ref: np.ndarray, flip: float) -> np.ndarray:
    """A prediction: the reference with some voxels on the outer boundary of the ring shifted by one voxel."""
    pred = ref.copy()
    shifted = np.roll(ref, 1, 2)
    change = (shifted != ref) & (ref < 2) & (shifted < 2) & (rng.random(SHAPE) < flip)
    pred[change] = shifted[change]
    return pred


def _probabilities(rng: np.random.Generator, seg: np.ndarray, noise: float) -> np.ndarray:
    """Softmax of noisy logits whose argmax is mostly ``seg`` (much noise: scattered voxels flip)."""
    logits = 2.0 * np.eye(3, dtype=np.float32)[seg].transpose(3, 0, 1, 2) + rng.normal(0, noise, (3, *SHAPE))
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


def _write(seg: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(seg.astype(np.uint8)), str(path), useCompression=True)


def _plans(name: str) -> dict:
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {}, "_kw_requires_import": []}
    return {"dataset_name": name, "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
            "label_manager": "LabelManager", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "original_median_shape_after_transp": list(SHAPE),
            "experiment_planner_used": "ExperimentPlanner", "foreground_intensity_properties_per_channel": {},
            "configurations": {c: {"data_identifier": f"nnUNetPlans_{c}", "architecture": arch} for c in CONFIGS}}


def write_data(root: Path, scenario: str) -> None:
    """Both sites' files and the pooled dataset (the union of the same files)."""
    from batchgenerators.utilities.file_and_folder_operations import save_pickle
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    raw, pre, res = (root / v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": LABELS, "numTraining": 0, "file_ending": ".nii.gz"}
    for s_index, (site, (name, prefix, n)) in enumerate(SITES.items()):
        rng = np.random.default_rng([7, s_index, len(scenario)])
        for ds in (name, POOLED):
            (raw / ds / "labelsTr").mkdir(parents=True, exist_ok=True)
            (pre / ds / "gt_segmentations").mkdir(parents=True, exist_ok=True)
            for d in (raw / ds, pre / ds):
                (d / "dataset.json").write_text(json.dumps({**dataset_json, "name": ds}))
            (pre / ds / "nnUNetPlans.json").write_text(json.dumps(_plans(ds)))
            for c in CONFIGS:
                model = res / ds / f"nnUNetTrainer__nnUNetPlans__{c}"
                model.mkdir(parents=True, exist_ok=True)
                (model / "plans.json").write_text(json.dumps(_plans(ds)))
                (model / "dataset.json").write_text(json.dumps({**dataset_json, "name": ds}))
        for i in range(n):
            case = f"{prefix}_{i:03d}"
            two = scenario == "no_help" and i % 2 == 1
            ref = _reference(rng, two, core=i != 2)
            for ds in (name, POOLED):
                _write(ref, raw / ds / "labelsTr" / f"{case}.nii.gz")
                _write(ref, pre / ds / "gt_segmentations" / f"{case}.nii.gz")
            _, props = SimpleITKIO().read_seg(str(raw / name / "labelsTr" / f"{case}.nii.gz"))
            for m, c in enumerate(CONFIGS):
                pred = _perturb(rng, ref, 0.25 + 0.15 * m)
                if scenario == "helps" and site == "902" and i % 3 != 2:  # spurious blobs far from the object
                    pred[_ball((2, 2 + 3 * m, 23), 1.0)] = 1
                    pred[_ball((8, 23, 3), 0.9)] = 1
                if scenario == "helps" and site == "901" and i != 2:  # core islands just outside the ring
                    pred[_ball((5, 12, 17.5), 0.8)] = 2
                probs = _probabilities(rng, pred, 0.6 if scenario == "helps" else 0.3)
                seg = probs.argmax(0).astype(np.uint8)
                fold = FOLDS[i % len(FOLDS)]
                for ds in (name, POOLED):
                    out = res / ds / f"nnUNetTrainer__nnUNetPlans__{c}" / f"fold_{fold}" / "validation"
                    out.mkdir(parents=True, exist_ok=True)
                    _write(seg, out / f"{case}.nii.gz")
                    np.savez_compressed(out / f"{case}.npz", probabilities=probs)
                    save_pickle(props, str(out / f"{case}.pkl"))


def run_federated(root: Path) -> dict:
    from fednnunet.federation.events import EventLog
    from fednnunet.federation.job import JobSpec
    from fednnunet.federation.runner import run_job
    from fednnunet.site.worker import SiteWorker
    from in_process import InProcessCaller  # beside this script (the tests' SiteCaller over real workers)

    caller = InProcessCaller({s: SiteWorker(s, s, task="find_best_configuration") for s in SITES})
    out = root / "server"
    job = JobSpec(task="find_best_configuration", num_sites=len(SITES), out_dir=str(out), release_sites=False,
                  best_configuration={"configurations": list(CONFIGS), "folds": list(FOLDS), "num_processes": 1})
    result = run_job(job, caller, EventLog(out / "events.jsonl"))
    result["messages"] = caller.messages
    return result


def run_nnunet(dataset: str, configs: list[str], plans: list[str], folds: tuple[int, ...]) -> dict:
    """nnU-Net's own find_best_configuration (its inference information and postprocessing.json)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.evaluation.find_best_configuration import (dumb_trainer_config_plans_to_trained_models_dict,
                                                             find_best_configuration)

    models = dumb_trainer_config_plans_to_trained_models_dict(["nnUNetTrainer"], configs, plans)
    info = find_best_configuration(dataset, models, allow_ensembling=True, num_processes=1, overwrite=True,
                                   folds=folds, strict=False)
    source = Path(info["best_model_or_ensemble"]["postprocessing_file"]).parent
    return {"info": info, "postprocessing": load_json(str(source / "postprocessing.json"))}


def site_checks(root: Path, result: dict) -> dict:
    """What each site wrote: nnU-Net's pickle (loaded with nnU-Net) and that it reproduces postprocessed/."""
    import SimpleITK as sitk
    from batchgenerators.utilities.file_and_folder_operations import load_json, load_pickle
    from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing_to_folder

    out = {}
    for site, info in result["sites"].items():
        inference = load_json(info["inference_information"])
        fns, kwargs = load_pickle(inference["best_model_or_ensemble"]["postprocessing_file"])
        source = Path(inference["best_model_or_ensemble"]["postprocessing_file"]).parent
        again = root / f"again_{site}"
        apply_postprocessing_to_folder(str(source), str(again), fns, kwargs, str(source / "plans.json"),
                                       str(source / "dataset.json"), 1)
        same = all(np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(p))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(source / "postprocessed" / p.name))))
                   for p in again.glob("*.nii.gz"))
        kwargs = [{k: np.asarray(v).tolist() for k, v in kw.items()} for kw in kwargs]
        out[site] = {"fns": [f.__name__ for f in fns], "kwargs": kwargs, "inference": inference,
                     "reapplied_equals_postprocessed": same, "cases": len(list(again.glob("*.nii.gz"))),
                     "instructions": Path(info["instructions_file"]).read_text(),
                     "temp_left": (source / "postprocessed" / "temp").exists(),
                     "postprocessed_files": sorted(p.name for p in (source / "postprocessed").iterdir())}
    return out


def main(root: Path, scenario: str) -> None:
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[var] = str(root / var)
    shutil.rmtree(root, ignore_errors=True)
    write_data(root, scenario)
    federated = run_federated(root)
    nnunet = run_nnunet(POOLED, list(CONFIGS), ["nnUNetPlans"], FOLDS)
    compare = {"federated": federated, "nnunet": nnunet, "sites": site_checks(root, federated)}
    (root / "compare.json").write_text(json.dumps(compare, indent=1, default=str))


def _close(a: dict, b: dict, where: str) -> None:
    """Every number of nnU-Net's summary parts within 1e-9 (nnU-Net writes NaN where we write null)."""
    for key, value in b.items():
        if isinstance(value, dict):
            _close(a[key], value, f"{where}.{key}")
        elif value is None or (isinstance(value, float) and value != value):
            assert a[key] is None or a[key] != a[key], where
        else:
            assert abs(a[key] - value) <= 1e-9, (where, key, a[key], value)


def assert_same_decision(fed: dict, nnunet: dict) -> None:
    """The federation's result (result.json of the server) against nnU-Net's tool on the pooled data."""
    info, pp = nnunet["info"], nnunet["postprocessing"]
    best = info["best_model_or_ensemble"]
    assert list(fed["all_results"]) == list(info["all_results"])
    for key, value in info["all_results"].items():
        assert abs(fed["all_results"][key] - value) <= 1e-9, key
    assert fed["selected_model_or_models"] == best["selected_model_or_models"]
    assert abs(fed["result_on_crossval_pre_pp"] - best["result_on_crossval_pre_pp"]) <= 1e-9
    assert abs(fed["result_on_crossval_post_pp"] - best["result_on_crossval_post_pp"]) <= 1e-9
    _close(fed["pooled_before_postprocessing"], pp["input_folder"], "before")
    _close(fed["pooled_after_postprocessing"], pp["postprocessed"], "after")
    applied = [s["applied"] for s in fed["postprocessing"]]
    assert len(pp["postprocessing_kwargs"]) == sum(applied)


if __name__ == "__main__":
    if sys.argv[1] == "--nnunet":  # ROOT DATASET "CONFIGS" "PLANS" "FOLDS": nnU-Net's tool only
        root = Path(sys.argv[2]).resolve()
        result = run_nnunet(sys.argv[3], sys.argv[4].split(), sys.argv[5].split(),
                            tuple(int(f) for f in sys.argv[6].split()))
        (root / "nnunet.json").write_text(json.dumps(result, indent=1, default=str))
    else:
        main(Path(sys.argv[1]).resolve(), sys.argv[2])
