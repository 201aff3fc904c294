"""Confidence intervals of paired DSC differences over cases and training repeats (pure, known inputs) and their
place in results.json / results.md."""

from __future__ import annotations

import numpy as np
import pytest

from fednnunet.evaluation.intervals import margin_reading, paired_bootstrap_ci, paired_difference
from fednnunet.evaluation.report import build_repeated_results, markdown_table


def _cases(dsc, prefix: str = "c") -> list[dict]:
    return [{"case": f"{prefix}{i}", "dsc": float(d), "hd95": 1.0} for i, d in enumerate(dsc)]


def test_constant_difference_has_a_point_interval() -> None:
    assert paired_bootstrap_ci(np.full((3, 10), 0.02)) == pytest.approx((0.02, 0.02, 0.02))


def test_spread_between_repeats_widens_the_interval() -> None:
    """Two repeats, every case 0.0 in one and 0.1 in the other: drawing repeats gives means 0, 0.05, 0.1 with
    probabilities 1/4, 1/2, 1/4, so the 95 % interval is [0, 0.1]; over cases alone it would be [0.05, 0.05]."""
    diffs = np.array([[0.0] * 8, [0.1] * 8])
    assert paired_bootstrap_ci(diffs) == pytest.approx((0.05, 0.0, 0.1))


def test_cases_only_matches_the_normal_approximation() -> None:
    rng = np.random.default_rng(1)
    d = rng.normal(0.01, 0.05, size=(1, 400))
    mean, low, high = paired_bootstrap_ci(d)
    half = 1.96 * d.std(ddof=1) / np.sqrt(d.size)
    assert mean == pytest.approx(d.mean())
    assert low == pytest.approx(mean - half, abs=0.1 * half) and high == pytest.approx(mean + half, abs=0.1 * half)
    assert paired_bootstrap_ci(d) == (mean, low, high)  # seeded: the same inputs give the same interval
    with pytest.raises(ValueError):
        paired_bootstrap_ci(np.array([[np.nan]]))


def test_margin_reading() -> None:
    assert margin_reading(-0.005, 0.008) == {"non_inferior": True, "within_margin": True, "above": False,
                                             "below": False}
    assert margin_reading(-0.012, 0.02)["non_inferior"] is False
    assert margin_reading(0.001, 0.03) == {"non_inferior": True, "within_margin": False, "above": True,
                                           "below": False}
    assert margin_reading(-0.03, -0.02)["below"] is True


def test_paired_difference_pairs_cases_by_id_in_every_repeat() -> None:
    a = [_cases([0.8, 0.7, 0.6]), list(reversed(_cases([0.9, 0.7, 0.5])))]
    b = [_cases([0.7, 0.7, 0.6]), _cases([0.8, 0.6])]  # c2 missing from b's second repeat: left out
    e = paired_difference(a, b)
    assert e["n_cases"] == 2 and e["n_repeats"] == 2 and e["unpaired_cases"] == 1
    assert e["mean_diff"] == pytest.approx(np.mean([0.1, 0.0, 0.1, 0.1]))
    assert e["ci_low"] <= e["mean_diff"] <= e["ci_high"]


def test_repeated_results_mean_sd_intervals_and_markdown() -> None:
    """Two repeats: FFE 0.004 below centralized and 0.1 above local at every case."""
    base = np.linspace(0.6, 0.8, 12)
    reps = [{"local": {"S": _cases(base - 0.1 + k * 0.02)}, "ffe": {"S": _cases(base + k * 0.02)},
             "centralized": {"S": _cases(base + 0.004 + k * 0.02)}} for k in range(2)]
    r = build_repeated_results(reps, [5, 6], "cmd", {})
    assert [x["seed"] for x in r["repeats"]] == [5, 6] and r["repeats"][1]["methods"]["ffe"]["S"]["cases"] == 12
    ffe = r["methods"]["ffe"]["S"]
    assert ffe["repeats"] == 2 and ffe["dsc_repeats"] == pytest.approx([base.mean(), base.mean() + 0.02])
    assert ffe["dsc"] == pytest.approx(base.mean() + 0.01) and ffe["dsc_sd"] == pytest.approx(0.02 / np.sqrt(2))
    vs_c = r["intervals"]["ffe_vs_centralized"]["sites"]["S"]
    assert vs_c["mean_diff"] == pytest.approx(-0.004) and vs_c["ci_low"] == pytest.approx(-0.004)
    assert vs_c["within_margin"] and vs_c["non_inferior"] and vs_c["below"]
    vs_l = r["intervals"]["ffe_vs_local"]["sites"]["S"]
    assert vs_l["mean_diff"] == pytest.approx(0.1) and vs_l["above"] and not vs_l["within_margin"]
    md = markdown_table(r)
    assert f"**{ffe['dsc']:.3f}** ± 0.014" in md and "R=2" in md  # bold: best privacy-preserving
    assert "| FFE − Centralized | -0.004 [-0.004, -0.004] within ±0.01; below (n=12, R=2) |" in md


def test_compare_runs_pairs_two_benchmarks_by_case_and_repeat(tmp_path) -> None:
    """One method at two budgets (the convergence check): +0.02 at every case of SiteA; SiteB only in one run."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from fednnunet.evaluation.report import compare_runs

    base = np.linspace(0.6, 0.8, 6)
    small = build_repeated_results([{"centralized": {"SiteA": _cases(base + k * 0.01), "SiteB": _cases(base)}}
                                    for k in range(2)], [0, 1], "small", {})
    large = build_repeated_results([{"centralized": {"SiteA": _cases(base + k * 0.01 + 0.02)}} for k in range(2)],
                                   [0, 1], "large", {})
    table = compare_runs(large, "centralized", small, "centralized")
    assert set(table) == {"SiteA"}
    assert table["SiteA"]["mean_diff"] == pytest.approx(0.02) and table["SiteA"]["n_repeats"] == 2
    assert table["SiteA"]["ci_low"] == pytest.approx(0.02) and table["SiteA"]["ci_high"] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="method 'ffe' is not in the results"):
        compare_runs(large, "ffe", small, "centralized")

    for name, res in (("large", large), ("small", small)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    cli = Path(sys.executable).parent / "fednnunet"
    out = subprocess.run([str(cli), "compare-results", str(tmp_path / "large"), str(tmp_path / "small"),
                          "--method", "centralized"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "SiteA: +0.0200 [+0.0200, +0.0200] (n=6 cases, R=2)" in out.stdout
