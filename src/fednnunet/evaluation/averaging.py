"""What averaging costs each site in a federated run: its local model before averaging against the model it
receives after.

Why: the figure a site logs every round (nnU-Net's online pseudo-Dice after its epochs) describes its *local*
model; the model it then receives (FFE: the global average; AsymFedAvg: its own model with the compatible layers
averaged) is validated at the start of the next round on the same site's validation cases ("delivered" in
``metrics.jsonl``, see training/delivered.py). Round r's delivered figure minus round r-1's local figure is what
averaging took from (or gave to) that site: client drift on heterogeneous sites shows up here as a negative gap,
while the held-out DSC of the final model only shows its end result.

The second half of the rounds is summarised in full (local, delivered, gap) and the first half by its gap alone:
early on every model changes fast and the sites' models drift apart most, so averaging can cost there what it
gives back later (on the retina sites it did both, BENCHMARKS.md). Both figures are nnU-Net's online pseudo-Dice
(random validation patches, foreground classes pooled), so single rounds are noisy; the mean over rounds and the
sd over repeats say how much.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["averaging_gap", "averaging_table"]


def averaging_gap(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Per site of one run (its ``metrics.jsonl`` records, in round order): the means over the second half of the
    paired rounds r >= 2 of ``local`` (pseudo-Dice after round r-1's epochs), ``delivered`` (pseudo-Dice of the model
    received at round r) and ``gap`` = delivered - local, with ``rounds`` (how many rounds), and ``early_gap`` /
    ``early_rounds``, the same gap over the first half (None when there is none)."""
    local: dict[str, dict[int, float]] = {}
    delivered: dict[str, dict[int, float]] = {}
    for rec in records:
        r = int(rec["round"])
        for site, m in (rec.get("sites") or {}).items():
            if _finite(m.get("mean_fg_dice")):
                local.setdefault(site, {})[r] = float(m["mean_fg_dice"])
            got = m.get("delivered") or {}
            if _finite(got.get("mean_fg_dice")):
                delivered.setdefault(site, {})[r] = float(got["mean_fg_dice"])
    out: dict[str, dict[str, float | int]] = {}
    for site in sorted(delivered):
        paired = sorted(r for r in delivered[site] if r - 1 in local.get(site, {}))
        early, kept = paired[:len(paired) // 2], paired[len(paired) // 2:]
        if not kept:
            continue
        loc = statistics.fmean(local[site][r - 1] for r in kept)
        dlv = statistics.fmean(delivered[site][r] for r in kept)
        early_gap = statistics.fmean(delivered[site][r] - local[site][r - 1] for r in early) if early else None
        out[site] = {"local": loc, "delivered": dlv, "gap": dlv - loc, "rounds": len(kept), "early_gap": early_gap,
                     "early_rounds": len(early)}
    return out


def averaging_table(runs_by_method: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]) -> dict[str, Any]:
    """Per method and site over its runs (one per repeat): mean local, delivered and gap, the gap's sd over the
    runs, the runs' gaps, and the first half's mean gap (``results.json``'s ``averaging_gap``)."""
    table: dict[str, Any] = {}
    for method, runs in runs_by_method.items():
        per_run = [averaging_gap(records) for records in runs]
        sites = sorted({s for gaps in per_run for s in gaps})
        table[method] = {}
        for site in sites:
            entries = [gaps[site] for gaps in per_run if site in gaps]
            gaps = [float(e["gap"]) for e in entries]
            early = [float(e["early_gap"]) for e in entries if e.get("early_gap") is not None]
            table[method][site] = {
                "local": statistics.fmean(float(e["local"]) for e in entries),
                "delivered": statistics.fmean(float(e["delivered"]) for e in entries),
                "gap": statistics.fmean(gaps), "gap_sd": statistics.stdev(gaps) if len(gaps) > 1 else None,
                "gaps": gaps, "runs": len(entries), "rounds": [int(e["rounds"]) for e in entries],
                "early_gap": statistics.fmean(early) if early else None, "early_gaps": early}
    return table


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
