"""Confidence intervals for paired DSC differences over cases and repeated trainings, and their reading against a
non-inferiority margin.

Why a two-stage bootstrap: a method's score varies with the held-out cases *and* with the training itself (nnU-Net
draws its initial weights, patches and augmentations at random; BENCHMARKS.md measured 0.025-0.04 DSC between two
trainings of the same command). A test over cases alone (the Wilcoxon tests) treats one training as the method.
Here every bootstrap replicate draws R repeats with replacement and, independently, n cases with replacement, and
takes the mean paired difference over the drawn (repeat, case) cells; the 2.5 and 97.5 percentiles of B = 10,000
replicates form the 95 % interval (percentile bootstrap, generator seeded: the same inputs give the same interval).
Repeat k of method a is paired with repeat k of method b and case c with case c; the trainings of two methods are
independent, so pairing the repeats by index only fixes which ones are drawn together. With few repeats (2-3)
the repeat stage can take only a few distinct values, so the interval is coarse; it still widens with the
training-to-training spread, which a case-only interval would hide.

Reading (margin 0.01 DSC): a is **non-inferior** to b when the interval's lower bound is above -margin (one-sided
at 2.5 %), **within the margin** (equivalent) when the whole interval lies in [-margin, +margin], and above
(below) b when the whole interval is above (below) 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MARGIN", "N_BOOT", "paired_bootstrap_ci", "margin_reading", "paired_difference"]

MARGIN = 0.01
N_BOOT = 10_000
_CHUNK = 500  # replicates per vectorised batch (memory: chunk x R x n floats)


def paired_bootstrap_ci(diffs: np.ndarray, level: float = 0.95, n_boot: int = N_BOOT,
                        seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``diffs`` (repeats x cases) and its two-stage percentile bootstrap interval at ``level``.

    Raises:
        ValueError: ``diffs`` is not a non-empty 2-D array of finite numbers, or ``level`` is not in (0, 1).
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 2 or d.size == 0 or not np.all(np.isfinite(d)):
        raise ValueError(f"diffs must be a non-empty repeats x cases array of finite numbers, got shape {d.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    repeats, cases = d.shape
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, _CHUNK):
        b = min(_CHUNK, n_boot - start)
        r = rng.integers(0, repeats, size=(b, repeats))
        c = rng.integers(0, cases, size=(b, cases))
        # d[r_i, c_j] for every drawn repeat i and case j, averaged: (b, R, n) -> (b,)
        means[start:start + b] = d[r[:, :, None], c[:, None, :]].mean(axis=(1, 2))
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(d.mean()), float(low), float(high)


def margin_reading(low: float, high: float, margin: float = MARGIN) -> dict[str, bool]:
    """``non_inferior``: low > -margin; ``within_margin``: -margin <= low and high <= margin; ``above`` / ``below``:
    the whole interval above / below 0 (a is better / worse)."""
    return {"non_inferior": bool(low > -margin), "within_margin": bool(-margin <= low and high <= margin),
            "above": bool(low > 0), "below": bool(high < 0)}


def paired_difference(a: Sequence[Sequence[dict[str, Any]]], b: Sequence[Sequence[dict[str, Any]]],
                      margin: float = MARGIN, level: float = 0.95, n_boot: int = N_BOOT,
                      seed: int = 0) -> dict[str, Any]:
    """DSC(a) - DSC(b) at one site: per-case lists of every repeat of each method, paired by repeat and case id.

    Cases missing from any repeat of either method are left out (``unpaired_cases`` counts them). Returns
    ``{"mean_diff", "ci_low", "ci_high", "level", "n_cases", "n_repeats", "margin", "non_inferior",
    "within_margin", "above", "below"}`` (see :func:`margin_reading`), with None values and a ``reason`` when
    nothing pairs.
    """
    repeats = min(len(a), len(b))
    per_a = [{str(c["case"]): float(c["dsc"]) for c in rep} for rep in a[:repeats]]
    per_b = [{str(c["case"]): float(c["dsc"]) for c in rep} for rep in b[:repeats]]
    every = [set(x) for x in per_a + per_b]
    common = sorted(set.intersection(*every)) if every else []
    entry: dict[str, Any] = {"mean_diff": None, "ci_low": None, "ci_high": None, "level": level,
                             "n_cases": len(common), "n_repeats": repeats, "margin": margin,
                             "non_inferior": None, "within_margin": None, "above": None, "below": None}
    unpaired = len(set.union(*every) - set(common)) if every else 0
    if unpaired:
        entry["unpaired_cases"] = unpaired
    if repeats != len(a) or repeats != len(b):
        entry["unpaired_repeats"] = abs(len(a) - len(b))
    if not common:
        entry["reason"] = "no case was scored for both methods in every repeat"
        return entry
    diffs = np.array([[pa[c] - pb[c] for c in common] for pa, pb in zip(per_a, per_b)])
    mean, low, high = paired_bootstrap_ci(diffs, level, n_boot, seed)
    entry.update(mean_diff=mean, ci_low=low, ci_high=high, **margin_reading(low, high, margin))
    return entry
