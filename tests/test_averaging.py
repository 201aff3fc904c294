"""What averaging costs each site (evaluation.averaging): computed by hand on small round records."""

from __future__ import annotations

import math

import pytest

from fednnunet.evaluation.averaging import averaging_gap, averaging_table
from fednnunet.evaluation.report import markdown_table


def _round(r: int, **sites: tuple[float | None, float | None]) -> dict:
    """sites: name -> (local pseudo-Dice after the epoch, pseudo-Dice of the model received at this round)."""
    out = {}
    for name, (local, delivered) in sites.items():
        entry = {"mean_fg_dice": local}
        if delivered is not None:
            entry["delivered"] = {"mean_fg_dice": delivered}
        out[name] = entry
    return {"round": r, "sites": out}


def test_gap_pairs_each_delivered_model_with_the_local_models_it_averaged() -> None:
    records = [_round(1, a=(0.50, 0.10), b=(0.40, 0.10)),
               _round(2, a=(0.60, 0.45), b=(0.50, 0.30)),
               _round(3, a=(0.70, 0.55), b=(0.55, 0.40)),
               _round(4, a=(0.80, 0.60), b=(float("nan"), 0.50)),  # b's local figure of round 4 is not finite
               _round(5, a=(0.85, 0.75), b=(0.65, 0.45))]
    gaps = averaging_gap(records)
    # a: pairs (1->2), (2->3), (3->4), (4->5); the second half: rounds 4 and 5
    assert gaps["a"]["rounds"] == 2
    assert gaps["a"]["local"] == pytest.approx((0.70 + 0.80) / 2)
    assert gaps["a"]["delivered"] == pytest.approx((0.60 + 0.75) / 2)
    assert gaps["a"]["gap"] == pytest.approx(((0.60 - 0.70) + (0.75 - 0.80)) / 2)
    # b: round 5 has no round-4 local figure, so the pairs are rounds 2, 3, 4 and the second half is 3 and 4
    assert gaps["b"]["rounds"] == 2
    assert gaps["b"]["gap"] == pytest.approx(((0.40 - 0.50) + (0.50 - 0.55)) / 2)
    # the first half: a's rounds 2 and 3, b's round 2
    assert gaps["a"]["early_rounds"] == 2
    assert gaps["a"]["early_gap"] == pytest.approx(((0.45 - 0.50) + (0.55 - 0.60)) / 2)
    assert gaps["b"]["early_rounds"] == 1 and gaps["b"]["early_gap"] == pytest.approx(0.30 - 0.40)


def test_a_run_without_delivered_validation_has_no_entry() -> None:
    assert averaging_gap([_round(1, a=(0.5, None)), _round(2, a=(0.6, None))]) == {}
    assert averaging_gap([_round(1, a=(0.5, 0.1))]) == {}  # one round: nothing to pair


def test_table_over_repeats_and_its_markdown() -> None:
    run1 = [_round(1, a=(0.5, 0.1)), _round(2, a=(0.6, 0.4))]
    run2 = [_round(1, a=(0.5, 0.1)), _round(2, a=(0.6, 0.3))]
    table = averaging_table({"ffe": [run1, run2], "local": [[_round(1, a=(0.5, None))]]})
    e = table["ffe"]["a"]
    assert e["gaps"] == pytest.approx([-0.1, -0.2]) and e["gap"] == pytest.approx(-0.15)
    assert e["gap_sd"] == pytest.approx(math.sqrt(0.005)) and e["runs"] == 2 and e["rounds"] == [1, 1]
    assert e["early_gap"] is None and e["early_gaps"] == []  # one paired round: no first half
    assert table["local"] == {}
    results = {"methods": {"ffe": {"a": {"dsc": 0.5, "hd95": 1.0, "cases": 2}}}, "averaging_gap": table}
    md = markdown_table(results)
    assert "## What averaging costs each site" in md
    assert "| FFE | 0.500 → 0.350 (-0.150 ± 0.071, R=2) |" in md


def test_markdown_shows_the_first_half_gap_when_there_is_one() -> None:
    run = [_round(1, a=(0.5, 0.1)), _round(2, a=(0.6, 0.3)), _round(3, a=(0.7, 0.65))]  # pairs: 2 (early), 3
    table = averaging_table({"asym": [run]})
    results = {"methods": {"asym": {"a": {"dsc": 0.5, "hd95": 1.0, "cases": 2}}}, "averaging_gap": table}
    assert "| AsymFedAvg | 0.600 → 0.650 (+0.050; first half -0.200, R=1) |" in markdown_table(results)
