"""Cross-validation results at the coordinator: every site's summary and the pooled one, as JSON and a table.

Sites send :class:`~fednnunet.cross_validation.aggregates.MetricSums` (after federated training: of their final
validation's ``summary.json``; in find_best_configuration: of every model and ensemble). Each row of the report is
one thing that was validated (a fold, all folds, a model, an ensemble) with nnU-Net's summary figures (per class
means of Dice, IoU, TP, FP, FN, TN, n_pred, n_ref and their foreground mean) for the pooled cases and per site, so
nobody has to log in at a hospital to read them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from fednnunet.cross_validation.aggregates import AggregateError, MetricSums

logger = logging.getLogger(__name__)

__all__ = ["cv_row", "format_cv_table", "compact_cv", "training_cv"]


def cv_row(site_sums: Mapping[str, MetricSums]) -> dict[str, Any]:
    """``{"pooled": summary, "sites": {site: summary}}`` (summaries as :meth:`MetricSums.summary`)."""
    return {"pooled": MetricSums.pooled(site_sums).summary(),
            "sites": {site: sums.summary() for site, sums in sorted(site_sums.items())}}


def _dice(summary: Mapping[str, Any], cls: str | None = None) -> str:
    value = (summary["foreground_mean"] if cls is None else summary["mean"].get(cls, {})).get("Dice")
    return "-" if value is None else f"{value:.4f}"


def compact_cv(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """One line for a progress log: each row's pooled foreground mean Dice and case count."""
    return "; ".join(f"{name}: Dice {_dice(row['pooled'])} ({row['pooled']['num_cases']} cases)"
                     for name, row in rows.items())


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


def training_cv(folds: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The final validations of a federated training, from the sites' ``validation_sums`` (``train_finish``
    replies): one row per fold and, with several folds, one for their union (the cross-validation); with
    personal models (``--finetune-epochs``) the same rows again for them, named "... personal"."""
    rows = _training_rows(folds, lambda record: record, "")
    rows.update(_training_rows(folds, lambda record: record.get("personal") or {}, " personal"))
    return {"rows": rows}


def _training_rows(folds: Mapping[str, Mapping[str, Any]],
                   model: Callable[[Mapping[str, Any]], Mapping[str, Any]], suffix: str) -> dict[str, Any]:
    """The rows of one kind of model: ``model`` picks its record out of a site's result."""
    per_fold: dict[str, dict[str, MetricSums]] = {}
    for fold, info in folds.items():
        for site, reply in info.get("sites", {}).items():
            sums = model(reply).get("validation_sums")
            if sums is None:
                continue
            try:
                per_fold.setdefault(fold, {})[site] = MetricSums.from_json(sums, f"site {site}")
            except AggregateError as err:  # a report must never fail a training
                logger.warning("fold %s: %s", fold, err)
    rows = {f"fold {fold}{suffix}": cv_row(sums) for fold, sums in per_fold.items()}
    if len(per_fold) > 1:
        sites = sorted({s for sums in per_fold.values() for s in sums})
        rows[f"all folds{suffix}"] = cv_row({s: MetricSums.pooled({f: sums[s] for f, sums in per_fold.items()
                                                                    if s in sums}) for s in sites})
    return rows
