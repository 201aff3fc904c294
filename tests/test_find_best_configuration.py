"""Federated find_best_configuration: nnU-Net's rules on pooled sums, and equality with nnU-Net's own tool.

The equality test runs ``cv_scenario.py`` in a subprocess (nnU-Net reads its folders from the environment): two
sites with 4 and 6 cases, two models with two folds each, the federation's server task against the real site
workers, and ``find_best_configuration`` of nnU-Net on a dataset holding the union of the same predictions.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fednnunet.cross_validation.aggregates import (AggregateError, MetricSums, best_candidate,
                                                   keep_largest_class_helps, keep_largest_foreground_helps,
                                                   selected_models)

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from cv_scenario import assert_same_decision  # noqa: E402  (a script beside the tests, run as a subprocess too)


def _cases(rng: np.random.Generator, n: int, nan_every: int = 3) -> list[dict]:
    cases = []
    for i in range(n):
        core = math.nan if i % nan_every == 0 else float(rng.random())
        cases.append({"1": {"Dice": float(rng.random()), "TP": float(rng.integers(0, 99))},
                      "2": {"Dice": core, "TP": float(rng.integers(0, 99))}})
    return cases


def test_pooled_sums_give_nnunets_means() -> None:
    """Sums of any split of the cases pool to np.nanmean over all of them, and the foreground mean to np.mean of
    the class means (nnU-Net's compute_metrics_on_folder)."""
    rng = np.random.default_rng(0)
    cases = _cases(rng, 11)
    whole = MetricSums.of_cases(cases, ["1", "2"])
    parts = {"a": MetricSums.of_cases(cases[:3], ["1", "2"]), "b": MetricSums.of_cases(cases[3:], ["1", "2"]),
             "c": MetricSums.of_cases([], ["1", "2"], ["Dice", "TP"])}
    pooled = MetricSums.pooled(parts)
    assert pooled.num_cases == 11
    for c in ("1", "2"):
        for m in ("Dice", "TP"):
            expected = np.nanmean([case[c][m] for case in cases])
            assert abs(pooled.means()[c][m] - expected) < 1e-12
            assert abs(whole.means()[c][m] - expected) < 1e-12
    assert abs(pooled.dice() - np.mean([np.nanmean([case[c]["Dice"] for case in cases]) for c in ("1", "2")])) < 1e-12
    # a class absent from every case: NaN mean, NaN foreground mean (JSON: null)
    absent = MetricSums.of_cases([{"1": {"Dice": 0.5}, "2": {"Dice": math.nan}}], ["1", "2"])
    assert math.isnan(absent.means()["2"]["Dice"]) and math.isnan(absent.dice())
    assert absent.summary()["foreground_mean"]["Dice"] is None
    # the wire format round-trips and is checked
    assert MetricSums.from_json(json.loads(json.dumps(pooled.to_json()))) == pooled
    bad = pooled.to_json()
    bad["counts"][0][0] = 99
    with pytest.raises(AggregateError, match="site x: malformed metric sums"):
        MetricSums.from_json(bad, "site x")
    bad = pooled.to_json()
    bad["sums"][1][0] = float("inf")
    with pytest.raises(AggregateError):
        MetricSums.from_json(bad)
    with pytest.raises(AggregateError, match="site b reports classes"):
        MetricSums.pooled({"a": whole, "b": MetricSums.of_cases(cases, ["1"])})


def _sums(*dice_per_class: float) -> MetricSums:
    classes = [str(i + 1) for i in range(len(dice_per_class))]
    return MetricSums.of_cases([{c: {"Dice": d} for c, d in zip(classes, dice_per_class)}], classes)


def test_nnunets_decision_rules() -> None:
    # the highest wins; a tie goes to the first (single models come before ensembles)
    assert best_candidate([("a", 0.5), ("b", 0.7), ("ens", 0.7)]) == "b"
    with pytest.raises(AggregateError, match="NaN"):
        best_candidate([("a", math.nan), ("b", 0.7)])
    # all foreground: strictly better on average and no class worse
    assert keep_largest_foreground_helps(_sums(0.5, 0.5), _sums(0.6, 0.5))
    assert not keep_largest_foreground_helps(_sums(0.5, 0.5), _sums(0.5, 0.5))
    assert not keep_largest_foreground_helps(_sums(0.5, 0.5), _sums(0.8, 0.4))
    # one class: strictly better
    assert keep_largest_class_helps(_sums(0.5, 0.5), _sums(0.5, 0.6), "2")
    assert not keep_largest_class_helps(_sums(0.5, 0.5), _sums(0.9, 0.5), "2")
    assert selected_models("ensemble___T__P__2d___T__P__3d_fullres___0_1") == [
        {"configuration": "2d", "trainer": "T", "plans_identifier": "P"},
        {"configuration": "3d_fullres", "trainer": "T", "plans_identifier": "P"}]


@pytest.fixture(scope="module", params=["helps", "no_help"])
def scenario(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp(f"cv_{request.param}")
    env = {**os.environ, "nnUNet_def_n_proc": "1"}
    env.pop("FEDNNUNET_SHARE_PER_CASE", None)
    proc = subprocess.run([sys.executable, str(HERE / "cv_scenario.py"), str(root), request.param], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"name": request.param, **json.loads((root / "compare.json").read_text())}


def test_federated_decision_equals_nnunet_on_pooled_data(scenario: dict) -> None:
    fed, nn = scenario["federated"], scenario["nnunet"]
    info, pp = nn["info"], nn["postprocessing"]
    best = info["best_model_or_ensemble"]
    # the same candidates in the same order, the same pooled results, the same choice, the same postprocessing
    # with the same pooled figures before and after it
    assert_same_decision(fed, nn)
    if scenario["name"] == "helps":  # an ensemble wins; all-foreground and core postprocessing help the pool
        assert fed["best"].startswith("ensemble___")
        assert [s["applied"] for s in fed["postprocessing"]] == [True, False, True]
        assert pp["postprocessing_kwargs"] == [{"labels_or_regions": [1, 2]}, {"labels_or_regions": 2}]
    else:  # a single model wins; no postprocessing step helps
        assert not fed["best"].startswith("ensemble___")
        assert [s["applied"] for s in fed["postprocessing"]] == [False, False, False]
        assert pp["postprocessing_kwargs"] == []
    # only small JSON aggregates came back from the sites (no per-case values: they did not opt in)
    assert max(size for _, size in fed["messages"]) < 4000
    assert "per_case" not in fed["cross_validation"]
    rows = fed["cross_validation"]["rows"]
    assert {s: rows[fed["best"]]["sites"][s]["num_cases"] for s in ("901", "902")} == {"901": 4, "902": 6}

    for site, written in scenario["sites"].items():
        # nnU-Net's pickle, written at the site, loads with nnU-Net and holds nnU-Net's decision
        assert written["fns"] == pp["postprocessing_fns"] and written["kwargs"] == pp["postprocessing_kwargs"]
        assert written["reapplied_equals_postprocessed"] and written["cases"] == {"901": 4, "902": 6}[site]
        assert not written["temp_left"] and "summary.json" in written["postprocessed_files"]
        inference = written["inference"]
        assert set(inference) == set(info) and set(inference["best_model_or_ensemble"]) == set(best)
        assert inference["all_results"] == fed["all_results"]
        name = {"901": "Dataset901_SiteA", "902": "Dataset902_SiteB"}[site]
        assert inference["dataset_name_or_id"] == name
        assert f"nnUNetv2_predict -d {name} " in written["instructions"]
        assert inference["best_model_or_ensemble"]["postprocessing_file"] in written["instructions"]
        assert ("nnUNetv2_ensemble" in written["instructions"]) == fed["best"].startswith("ensemble___")


def test_training_summary_per_fold_and_site(capsys: pytest.CaptureFixture[str]) -> None:
    """A multi-fold run is one run: rounds and time per fold, final validation per site, the pooled table
    (what `fednnunet run train ... "0 1"` prints from the server's result)."""
    from fednnunet.cli_cross_validation import print_training
    from fednnunet.cross_validation.report import training_cv

    rng = np.random.default_rng(1)

    def site(n: int) -> dict:
        sums = MetricSums.of_cases(_cases(rng, n), ["1", "2"])
        return {"output_folder": "/r", "validation_mean_dice": sums.dice(), "validation_sums": sums.to_json()}

    folds = {"0": {"rounds": 3, "mean_round_seconds": 5.0, "mean_overhead_seconds": 2.0,
                   "sites": {"a": site(2), "b": site(3)}},
             "1": {"rounds": 3, "mean_round_seconds": 6.0, "mean_overhead_seconds": 2.5,
                   "sites": {"a": site(2), "b": site(4)}, "errors": {"c": "no reply"}}}
    report = training_cv(folds)
    assert list(report["rows"]) == ["fold 0", "fold 1", "all folds"]
    assert report["rows"]["all folds"]["pooled"]["num_cases"] == 11
    assert report["rows"]["all folds"]["sites"]["b"]["num_cases"] == 7
    summary = print_training({"folds": folds, "cross_validation": report})
    out = capsys.readouterr().out
    assert summary == "2 fold(s), 6 round(s)"
    assert "fold 1: 3 round(s), mean 6.0 s per round" in out and "site c: failed: no reply" in out
    assert out.count("final validation mean Dice") == 4 and "all folds  11" in out
