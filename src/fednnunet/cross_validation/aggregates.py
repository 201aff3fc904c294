"""What crosses the wire about cross-validation results, and nnU-Net's decision rules applied to it (pure).

nnU-Net's ``summary.json`` (``compute_metrics_on_folder``) holds, per class (label or region) and metric, the mean
over cases with NaN ignored (``np.nanmean``: Dice and IoU are NaN in a case where the class is absent from both
reference and prediction), and ``foreground_mean``: the plain mean of those class means (``np.mean``, so one
all-NaN class makes it NaN). Both are ratios of additive quantities: per class and metric the sum of the non-NaN
per-case values and their count. A site therefore sends :class:`MetricSums` of its own cases and nothing per case;
the pooled sums give the means nnU-Net computes on the union of the cases (the division happens once; the sums
are ``math.fsum``-rounded, so the pooled means agree with ``np.nanmean`` to rounding, ~1e-16 relative).

``nnUNetv2_find_best_configuration`` takes its decisions from such means only, and the functions below apply its
rules (nnunetv2/evaluation/find_best_configuration.py and postprocessing/remove_connected_components.py, 2.8.1):

* the best model or ensemble has the highest ``foreground_mean`` Dice; on a tie the first one in nnU-Net's order
  (single models in the order trainer x configuration x plans, then ensembles of pairs i < j);
* keeping only the largest connected component of all foreground is kept when it raises the foreground mean
  Dice strictly and lowers no class's mean Dice;
* then, when there are several classes, for each class in turn (on top of what was kept so far): kept when that
  class's mean Dice rises strictly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["MetricSums", "AggregateError", "best_candidate", "keep_largest_foreground_helps",
           "keep_largest_class_helps", "json_number", "selected_models"]


class AggregateError(ValueError):
    """Aggregates that are malformed or do not fit together (the message names the site when known)."""


#: what nnU-Net's ``compute_metrics`` reports per class, in its order (used when a site has no case to read it from)
NNUNET_METRICS = ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref")


def json_number(value: float) -> float | None:
    """JSON has no NaN: a mean over no case is written as null."""
    return None if value is None or not math.isfinite(value) else float(value)


def _is_nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass(frozen=True)
class MetricSums:
    """Per class and metric: the sum of the per-case values that are not NaN, and how many there are.

    ``classes`` are nnU-Net's summary keys (``"1"``, or ``"(1, 2)"`` for a region) in nnU-Net's order;
    ``metrics`` are those of nnU-Net's ``compute_metrics`` (Dice, IoU, FP, TP, FN, TN, n_pred, n_ref).
    """

    num_cases: int
    classes: tuple[str, ...]
    metrics: tuple[str, ...]
    sums: tuple[tuple[float, ...], ...]  # [class][metric]
    counts: tuple[tuple[int, ...], ...]  # [class][metric]

    @classmethod
    def of_cases(cls, cases: Sequence[Mapping[str, Mapping[str, Any]]], classes: Sequence[str],
                 metrics: Sequence[str] | None = None) -> "MetricSums":
        """From per-case metrics ``{class key: {metric: value}}`` (nnU-Net's ``metric_per_case[i]['metrics']``
        with string keys)."""
        classes = tuple(str(c) for c in classes)
        if metrics is None:
            metrics = tuple(next(iter(cases[0].values()))) if cases and cases[0] else NNUNET_METRICS
        metrics = tuple(metrics)
        sums, counts = [], []
        for c in classes:
            row_s, row_n = [], []
            for m in metrics:
                values = [float(case[c][m]) for case in cases if not _is_nan(case[c][m])]
                row_s.append(math.fsum(values))
                row_n.append(len(values))
            sums.append(tuple(row_s))
            counts.append(tuple(row_n))
        return cls(len(cases), classes, metrics, tuple(sums), tuple(counts))

    @classmethod
    def of_summary(cls, summary: Mapping[str, Any]) -> "MetricSums":
        """From an nnU-Net ``summary.json`` as plain JSON (class keys are strings there)."""
        cases = [c["metrics"] for c in summary.get("metric_per_case", [])]
        return cls.of_cases(cases, list(summary.get("mean", {})))

    @classmethod
    def pooled(cls, parts: Mapping[str, "MetricSums"]) -> "MetricSums":
        """The sums of the union of the cases; ``parts`` maps a site to its sums (named in errors)."""
        if not parts:
            raise AggregateError("nothing to pool")
        items = list(parts.items())
        first_site, first = items[0]
        for site, p in items[1:]:
            if p.classes != first.classes or p.metrics != first.metrics:
                raise AggregateError(f"site {site} reports classes {list(p.classes)} / metrics {list(p.metrics)}, "
                                     f"site {first_site} {list(first.classes)} / {list(first.metrics)}")
        sums = tuple(tuple(math.fsum(p.sums[i][j] for _, p in items) for j in range(len(first.metrics)))
                     for i in range(len(first.classes)))
        counts = tuple(tuple(sum(p.counts[i][j] for _, p in items) for j in range(len(first.metrics)))
                       for i in range(len(first.classes)))
        return cls(sum(p.num_cases for _, p in items), first.classes, first.metrics, sums, counts)

    # --- what nnU-Net's summary.json holds ------------------------------------------------------------------
    def means(self) -> dict[str, dict[str, float]]:
        """``summary['mean']``: per class and metric the mean over the cases where it is not NaN (NaN if none)."""
        return {c: {m: (self.sums[i][j] / self.counts[i][j] if self.counts[i][j] else math.nan)
                    for j, m in enumerate(self.metrics)} for i, c in enumerate(self.classes)}

    def foreground_mean(self) -> dict[str, float]:
        """``summary['foreground_mean']``: per metric the mean of the class means, background ("0") left out."""
        means = self.means()
        keys = [c for c in self.classes if c != "0"]
        return {m: (math.fsum(means[c][m] for c in keys) / len(keys) if keys else math.nan) for m in self.metrics}

    def dice(self) -> float:
        """The figure nnU-Net ranks by: ``foreground_mean['Dice']``."""
        return self.foreground_mean().get("Dice", math.nan)

    def summary(self) -> dict[str, Any]:
        """``{"num_cases", "mean", "foreground_mean"}`` with NaN as null (JSON)."""
        return {"num_cases": self.num_cases,
                "mean": {c: {m: json_number(v) for m, v in ms.items()} for c, ms in self.means().items()},
                "foreground_mean": {m: json_number(v) for m, v in self.foreground_mean().items()}}

    # --- wire --------------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"num_cases": self.num_cases, "classes": list(self.classes), "metrics": list(self.metrics),
                "sums": [list(r) for r in self.sums], "counts": [list(r) for r in self.counts]}

    @classmethod
    def from_json(cls, data: Any, who: str = "a site") -> "MetricSums":
        """Checked: finite sums, integer counts between 0 and the case count, shapes that fit."""
        def bad(why: str) -> AggregateError:
            return AggregateError(f"{who}: malformed metric sums ({why})")

        if not isinstance(data, Mapping):
            raise bad("not an object")
        n = data.get("num_cases")
        classes, metrics, sums, counts = (data.get(k) for k in ("classes", "metrics", "sums", "counts"))
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise bad(f"num_cases {n!r}")
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)
                and isinstance(metrics, list) and all(isinstance(m, str) for m in metrics) and metrics):
            raise bad("classes/metrics must be lists of names")
        for name, table in (("sums", sums), ("counts", counts)):
            if not (isinstance(table, list) and len(table) == len(classes)
                    and all(isinstance(r, list) and len(r) == len(metrics) for r in table)):
                raise bad(f"{name} must be {len(classes)} x {len(metrics)}")
        for row in sums:
            for v in row:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise bad(f"sum {v!r}")
        for row in counts:
            for v in row:
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= n:
                    raise bad(f"count {v!r} of {n} cases")
        return cls(n, tuple(classes), tuple(metrics), tuple(tuple(float(v) for v in r) for r in sums),
                   tuple(tuple(r) for r in counts))


# --- nnU-Net's decision rules ----------------------------------------------------------------------------------
def best_candidate(results: Sequence[tuple[str, float]]) -> str:
    """The key nnU-Net picks from ``(key, foreground mean Dice)`` in its order: the highest, the first on a tie.

    Python's ``max`` as nnU-Net calls it; a NaN result (a class absent from every case) leaves no key equal to
    the maximum, where nnU-Net fails with an IndexError: here a clear error.
    """
    if not results:
        raise AggregateError("no trained model to choose from")
    best_score = max(r for _, r in results)
    best = [k for k, r in results if r == best_score]
    if not best:
        raise AggregateError("cannot rank the models: a foreground mean Dice is NaN (a class is absent from the "
                             "reference and the prediction of every case); " +
                             ", ".join(f"{k}: {r}" for k, r in results))
    return best[0]


def keep_largest_foreground_helps(before: MetricSums, after: MetricSums) -> bool:
    """nnU-Net's rule for removing all but the largest foreground component: the foreground mean Dice rises
    strictly and no class's mean Dice falls."""
    if not after.dice() > before.dice():
        return False
    b, a = before.means(), after.means()
    return not any(a[c]["Dice"] < b[c]["Dice"] for c in a)


def keep_largest_class_helps(before: MetricSums, after: MetricSums, key: str) -> bool:
    """nnU-Net's rule for one class or region: its mean Dice rises strictly."""
    return after.means()[key]["Dice"] > before.means()[key]["Dice"]


def selected_models(key: str) -> list[dict[str, str]]:
    """nnU-Net's ``selected_model_or_models`` of an identifier ``trainer__plans__configuration`` or of an ensemble
    ``ensemble___A___B___folds`` (``get_ensemble_name``)."""
    members = key.split("___")[1:3] if key.startswith("ensemble___") else [key]
    out = []
    for member in members:
        parts = member.split("__")
        if len(parts) != 3:
            raise AggregateError(f"not an nnU-Net model identifier: {member!r}")
        trainer, plans, configuration = parts
        out.append({"configuration": configuration, "trainer": trainer, "plans_identifier": plans})
    return out
