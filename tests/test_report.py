"""Benchmark report: results.json schema, Wilcoxon tests, Markdown table, plots and re-scoring saved predictions.

All fast: no training, no nnU-Net planning (nnU-Net is imported only for its file reader in the last tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fednnunet.evaluation.predict import held_out_cases, normalize_folds
from fednnunet.evaluation.report import (
    build_repeated_results,
    build_results,
    evaluate_predictions,
    markdown_table,
    plot_dsc,
    plot_training_curves,
    split_by_prefix,
    wilcoxon_table,
    write_markdown,
    write_results_json,
)

SITES = ("SiteA", "SiteB")
N = 10


def _cases(dsc: np.ndarray, hd: np.ndarray, prefix: str = "case_") -> list[dict]:
    return [{"case": f"{prefix}{i:03d}", "dsc": float(d), "hd95": float(h)} for i, (d, h) in enumerate(zip(dsc, hd))]


def _methods(seed: int = 0) -> dict:
    """ffe and centralized clearly better than local; asym identical to local per case."""
    rng = np.random.default_rng(seed)
    out: dict = {m: {} for m in ("centralized", "local", "ffe", "asym")}
    for site in SITES:
        base = rng.uniform(0.5, 0.7, N)
        hd = rng.uniform(5, 10, N)
        out["local"][site] = _cases(base, hd)
        out["asym"][site] = _cases(base, hd)  # identical: no test possible
        out["ffe"][site] = _cases(base + 0.2 + rng.uniform(0, 0.01, N), hd - 2)
        out["centralized"][site] = _cases(base + 0.21 + rng.uniform(0, 0.01, N), hd - 3)
    return out


@pytest.fixture()
def results() -> dict:
    return build_results(_methods(), command="fednnunet benchmark 'A B' -c 2d --out x",
                         budget={"rounds": 2, "iterations_per_round": 3, "folds": [0]})


def test_build_results_schema(results: dict) -> None:
    assert set(results) >= {"methods", "wilcoxon", "command", "budget"}
    assert list(results["methods"]) == ["local", "ffe", "asym", "centralized"]  # paper order
    for method, per_site in results["methods"].items():
        assert list(per_site) == list(SITES)
        for site, e in per_site.items():
            assert set(e) >= {"dsc", "hd95", "cases", "per_case"}
            assert e["cases"] == N == len(e["per_case"])
            assert e["dsc"] == pytest.approx(np.mean([c["dsc"] for c in e["per_case"]]))
            assert e["hd95"] == pytest.approx(np.mean([c["hd95"] for c in e["per_case"]]))
            assert all({"case", "dsc", "hd95"} <= set(c) for c in e["per_case"])
    assert results["budget"]["rounds"] == 2 and results["command"].startswith("fednnunet benchmark")
    # strict JSON round trip
    text = json.dumps(results, allow_nan=False)
    assert json.loads(text) == results


def test_build_results_accepts_site_entries_and_rejects_bad_input() -> None:
    entry = {"per_case": _cases(np.array([0.5, 0.7]), np.array([1.0, 3.0])), "dsc": 0.6}
    r = build_results({"local": {"S": entry}}, "cmd", {})
    assert r["methods"]["local"]["S"]["dsc"] == pytest.approx(0.6)
    assert r["wilcoxon"] == {}  # no comparison has both of its methods
    with pytest.raises(ValueError, match="twice"):
        build_results({"local": {"S": _cases(np.array([0.5, 0.5]), np.ones(2)) * 2}}, "cmd", {})
    with pytest.raises(ValueError, match="hd95"):
        build_results({"local": {"S": [{"case": "a", "dsc": 0.5}]}}, "cmd", {})


def test_wilcoxon_large_shift_is_significant_identical_is_not(results: dict) -> None:
    w = results["wilcoxon"]
    assert set(w) == {"ffe_vs_local", "ffe_vs_centralized", "asym_vs_local"}
    for site in SITES:
        e = w["ffe_vs_local"]["sites"][site]
        assert e["n"] == N and e["p"] is not None and e["p"] < 0.05
        assert e["p"] == pytest.approx(2 / 2**N)  # exact test, every difference positive
        assert e["mean_diff"] > 0.19
        e = w["ffe_vs_centralized"]["sites"][site]
        assert e["p"] is not None and e["p"] < 0.05 and e["mean_diff"] < 0
        e = w["asym_vs_local"]["sites"][site]
        assert e["p"] is None and "zero" in e["reason"] and e["n"] == N


def test_wilcoxon_pairs_by_case_id_and_reports_too_few_cases() -> None:
    local = _cases(np.linspace(0.5, 0.6, 8), np.ones(8))
    ffe = list(reversed(_cases(np.linspace(0.5, 0.6, 8) + 0.1, np.ones(8))))  # other order, same ids
    r = build_results({"local": {"S": local, "T": local[:1]}, "ffe": {"S": ffe, "T": ffe[-1:]}}, "c", {})
    s = r["wilcoxon"]["ffe_vs_local"]["sites"]
    assert s["S"]["p"] == pytest.approx(2 / 2**8) and s["S"]["mean_diff"] == pytest.approx(0.1)
    assert s["T"]["p"] is None and "at least 2" in s["T"]["reason"] and s["T"]["n"] == 1
    # a site only one method was evaluated on
    r = build_results({"local": {"S": local}, "ffe": {"S": ffe, "U": ffe}}, "c", {})
    u = r["wilcoxon"]["ffe_vs_local"]["sites"]["U"]
    assert u["p"] is None and "local" in u["reason"]
    assert wilcoxon_table(r) == r["wilcoxon"]


def test_personal_models_are_read_against_local_and_ffe() -> None:
    """``ffe-ft`` (every site's personal model) gets the paired interval and the non-inferiority reading against
    local as well as against FFE: at SiteA it matches local within the margin while FFE lags; at SiteB it is
    above local."""
    rng = np.random.default_rng(1)
    base = {site: rng.uniform(0.6, 0.8, N) for site in SITES}
    repeats = []
    for _ in range(3):
        rep: dict = {m: {} for m in ("local", "ffe", "ffe-ft")}
        for site in SITES:
            hd = np.full(N, 3.0)
            rep["local"][site] = _cases(base[site] + rng.normal(0, 0.001, N), hd)
            rep["ffe"][site] = _cases(base[site] - 0.05 + rng.normal(0, 0.001, N), hd)
            shift = 0.0 if site == "SiteA" else 0.03
            rep["ffe-ft"][site] = _cases(base[site] + shift + rng.normal(0, 0.001, N), hd)
        repeats.append(rep)
    r = build_repeated_results(repeats, [0, 1, 2], "c", {})
    assert list(r["methods"]) == ["local", "ffe", "ffe-ft"]
    assert {"ffe-ft_vs_ffe", "ffe-ft_vs_local", "ffe_vs_local"} <= set(r["intervals"])
    assert r["wilcoxon"]["ffe-ft_vs_local"]["sites"]["SiteB"]["p"] < 0.05
    vs_local = r["intervals"]["ffe-ft_vs_local"]["sites"]
    assert vs_local["SiteA"]["within_margin"] and vs_local["SiteA"]["non_inferior"]
    assert vs_local["SiteA"]["n_repeats"] == 3
    assert vs_local["SiteB"]["above"] and vs_local["SiteB"]["mean_diff"] == pytest.approx(0.03, abs=0.002)
    vs_ffe = r["intervals"]["ffe-ft_vs_ffe"]["sites"]
    assert all(vs_ffe[site]["above"] for site in SITES)
    rows = {line.split("|")[1].strip(): line for line in markdown_table(r).splitlines() if line.startswith("| ")}
    assert "within ±0.01" in rows["FFE + personal fine-tuning − Local"]
    assert "non-inferior; above" in rows["FFE + personal fine-tuning − Local"]
    assert "above" in rows["FFE + personal fine-tuning − FFE"] and "not non-inferior" in rows["FFE − Local"]


def test_split_by_prefix_restores_site_case_ids() -> None:
    pooled = _cases(np.array([0.1, 0.2]), np.ones(2), prefix="s901_case_") + \
        _cases(np.array([0.3]), np.ones(1), prefix="s902_case_")
    split = split_by_prefix(pooled, {"SiteA": "s901_", "SiteB": "s902_"})
    assert [c["case"] for c in split["SiteA"]] == ["case_000", "case_001"]
    assert [c["case"] for c in split["SiteB"]] == ["case_000"]
    with pytest.raises(ValueError, match="prefix"):
        split_by_prefix(pooled, {"SiteA": "s901_"})


def test_markdown_bold_methods_sites_and_pvalues(results: dict, tmp_path: Path) -> None:
    path = write_markdown(results, tmp_path / "sub" / "results.md")
    text = path.read_text()
    assert text == markdown_table(results)
    for name in ("Local", "FFE", "AsymFedAvg", "Centralized", *SITES):
        assert name in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    # best privacy-preserving DSC and HD95 are FFE's; centralized is better but never bold
    assert rows["FFE"].count("**") == 2 * 2 * len(SITES)
    assert "**" not in rows["Centralized"] and "**" not in rows["Local"]
    assert "Wilcoxon" in text and "p = " in text and "FFE vs Local" in text and "AsymFedAvg vs Local" in text
    assert "zero" in rows["AsymFedAvg vs Local"]
    assert not list(tmp_path.glob("sub/.*.tmp"))  # atomic write leaves no temporary file


def test_markdown_ties_bold_both() -> None:
    same = _cases(np.array([0.8, 0.9]), np.array([2.0, 2.0]))
    r = build_results({"local": {"S": same}, "ffe": {"S": same}}, "c", {})
    text = markdown_table(r)
    assert text.count("**0.850**") == 2 and text.count("**2.00**") == 2


def test_results_json_is_strict(results: dict, tmp_path: Path) -> None:
    r = dict(results)
    r["budget"] = {"wall_seconds": float("nan"), "rounds": np.int64(3)}
    path = write_results_json(r, tmp_path / "results.json")
    loaded = json.loads(path.read_text())
    assert loaded["budget"] == {"wall_seconds": None, "rounds": 3}
    assert loaded["methods"] == results["methods"]


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_are_png(results: dict, tmp_path: Path) -> None:
    assert _is_png(plot_dsc(results, tmp_path / "dsc.png"))
    files = {}
    for method in ("ffe", "local"):
        f = tmp_path / f"{method}.jsonl"
        lines = [json.dumps({"round": r, "sites": {s: {"train_loss": -0.1 * r, "val_loss": -0.05 * r,
                                                       "pseudo_dice": [0.1 * r, float("nan")]} for s in SITES}})
                 for r in range(1, 4)]
        f.write_text("\n".join(lines[:2] + ["not json", '{"no": "round"}'] + lines[2:]) + "\n")
        files[method] = f
    files["asym"] = tmp_path / "missing.jsonl"  # tolerated: logged and left out
    assert _is_png(plot_training_curves(files, tmp_path / "curves.png"))
    assert _is_png(plot_training_curves({}, tmp_path / "empty.png"))


def _write_label(array: np.ndarray, path: Path, spacing: tuple[float, float]) -> None:
    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.SetSpacing(spacing[::-1])  # SimpleITK spacing is (x, y); numpy order is (y, x)
    sitk.WriteImage(img, str(path))


def test_evaluate_predictions_on_hand_computable_files(tmp_path: Path) -> None:
    """Label 1: 10x10 squares shifted by k pixels (DSC (10-k)/10, HD95 k * spacing); label 2 identical."""
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    spacing = (0.5, 0.5)
    expected = {}
    for case, k in (("a", 2), ("b", 5)):
        ref = np.zeros((30, 30), np.uint8)
        ref[5:15, 5:15] = 1
        ref[20:25, 20:25] = 2
        pred = np.zeros_like(ref)
        pred[5:15, 5 + k:15 + k] = 1
        pred[20:25, 20:25] = 2
        _write_label(ref, ref_dir / f"{case}.nii.gz", spacing)
        _write_label(pred, pred_dir / f"{case}.nii.gz", spacing)
        expected[case] = ((10 - k) / 10, k * 0.5)
    dataset_json = {"labels": {"background": 0, "one": 1, "two": 2}, "file_ending": ".nii.gz",
                    "channel_names": {"0": "x"}, "numTraining": 2}
    (tmp_path / "dataset.json").write_text(json.dumps(dataset_json))
    for dj in (dataset_json, tmp_path / "dataset.json", tmp_path):
        r = evaluate_predictions(pred_dir, ref_dir, dj)
        assert r["cases"] == 2 and [c["case"] for c in r["per_case"]] == ["a", "b"]
        for c in r["per_case"]:
            d1, h1 = expected[c["case"]]
            assert c["per_class"]["1"]["dsc"] == pytest.approx(d1)
            assert c["per_class"]["1"]["hd95"] == pytest.approx(h1)
            assert c["per_class"]["2"]["dsc"] == 1.0 and c["per_class"]["2"]["hd95"] == 0.0
            assert c["dsc"] == pytest.approx((d1 + 1.0) / 2) and c["hd95"] == pytest.approx(h1 / 2)
        assert r["dsc"] == pytest.approx(np.mean([(0.8 + 1) / 2, (0.5 + 1) / 2]))
        assert r["hd95"] == pytest.approx(np.mean([0.5, 1.25]))
        assert r["per_class"]["1"]["dsc"] == pytest.approx(0.65)
    # the result plugs straight into build_results
    res = build_results({"local": {"S": r}}, "c", {})
    assert res["methods"]["local"]["S"]["dsc"] == pytest.approx(r["dsc"])


def test_evaluate_predictions_refuses_region_labels(tmp_path: Path) -> None:
    dj = {"labels": {"background": 0, "whole": [1, 2], "core": 2}, "file_ending": ".nii.gz",
          "regions_class_order": [1, 2]}
    with pytest.raises(ValueError, match="region"):
        evaluate_predictions(tmp_path, tmp_path, dj)


def test_held_out_cases_and_folds(tmp_path: Path) -> None:
    splits = [{"train": ["a", "b", "c"], "val": ["e", "d"]}, {"train": ["d", "e", "c"], "val": ["a", "b"]}]
    (tmp_path / "splits_final.json").write_text(json.dumps(splits))
    assert held_out_cases(tmp_path, 0) == ["d", "e"]
    assert held_out_cases(tmp_path, "1") == ["a", "b"]
    with pytest.raises(ValueError, match="held-out"):
        held_out_cases(tmp_path, "all")
    with pytest.raises(ValueError, match="not in"):
        held_out_cases(tmp_path, 4)
    with pytest.raises(FileNotFoundError):
        held_out_cases(tmp_path / "nope", 0)
    assert normalize_folds("0 1 2") == [0, 1, 2]
    assert normalize_folds(["all"]) == ["all"] and normalize_folds(3) == [3]
    with pytest.raises(ValueError):
        normalize_folds([0, 0])
    with pytest.raises(ValueError):
        normalize_folds(["x"])
