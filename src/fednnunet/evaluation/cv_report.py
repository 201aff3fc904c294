"""Cross-validation results at the coordinator: every site's summary and the pooled one, as JSON and a table.

Sites send :class:`~fednnunet.evaluation.cv_aggregates.MetricSums` (after federated training: of their final
validation's ``summary.json``; in find_best_configuration: of every model and ensemble). Each row of the report is
one thing that was validated (a fold, all folds, a model, an ensemble) with nnU-Net's summary figures (per class
means of Dice, IoU, TP, FP, FN, TN, n_pred, n_ref and their foreground mean) for the pooled cases and per site, so
nobody has to log in at a hospital to read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fednnunet.evaluation.cv_aggregates import MetricSums

__all__ = ["cv_row", "format_cv_table"]


def cv_row(site_sums: Mapping[str, MetricSums]) -> dict[str, Any]:
    """``{"pooled": summary, "sites": {site: summary}}`` (summaries as :meth:`MetricSums.summary`)."""
    return {"pooled": MetricSums.pooled(site_sums).summary(),
            "sites": {site: sums.summary() for site, sums in sorted(site_sums.items())}}


def _dice(summary: Mapping[str, Any], cls: str | None = None) -> str:
    value = (summary["foreground_mean"] if cls is None else summary["mean"].get(cls, {})).get("Dice")
    return "-" if value is None else f"{value:.4f}"


def format_cv_table(rows: Mapping[str, Mapping[str, Any]], title: str = "") -> str:
    """A text table: per row the pooled case count, foreground mean Dice, Dice per class, and each site's
    foreground mean Dice (with its case count)."""
    if not rows:
        return ""
    first = next(iter(rows.values()))
    classes = list(first["pooled"]["mean"])
    sites = sorted({s for r in rows.values() for s in r["sites"]})
    width = max(len(title), *(len(name) for name in rows))
    header = [title.ljust(width), "cases", "Dice", *(f"Dice {c}" for c in classes), *(f"{s} (n)" for s in sites)]
    lines = [header]
    for name, row in rows.items():
        pooled = row["pooled"]
        line = [name.ljust(width), str(pooled["num_cases"]), _dice(pooled), *(_dice(pooled, c) for c in classes)]
        for s in sites:
            site = row["sites"].get(s)
            line.append("-" if site is None else f"{_dice(site)} ({site['num_cases']})")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
