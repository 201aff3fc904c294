"""The model that is delivered: validated at the sites every round, and the federation's best model.

Why: a site's pseudo-Dice after its local epoch describes its *local* weights, not the model the federation
delivers (FFE: the global average; AsymFedAvg: the site's post-aggregation model), and the two can differ a lot.
So every ``validate_every`` rounds each site runs nnU-Net's own online validation on the weights it received,
before it trains on them (``SiteTrainer.validate_online``: the same iterations and loader as nnU-Net's validation
of every epoch). The model received at round r is the aggregate after round r - 1 (round 1: the initial model);
the final aggregate is validated in one more exchange after the last round.

The federation's best model is the delivered model with the highest pseudo-Dice pooled over the sites, each site
weighted by its validation cases; only rounds in which every site reported count (a round without a weak site
would look better than it is). It is written as ``checkpoint_best.pth`` by every site (its own delivered model
in AsymFedAvg) and by the server beside the global model, so ``--val_best`` and ``nnUNetv2_predict -chk
checkpoint_best.pth`` use it. Without delivered validation no ``checkpoint_best.pth`` is written.

Cost: ``val_iterations`` forward passes per validated model per site (nnU-Net's default 50 against 250 training
iterations, i.e. roughly 7 % of an epoch), plus, once, one Flower round trip for the final model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fednnunet.aggregation import UpdateRejected, validate_metrics

__all__ = ["BEST_PREFIX", "BestDelivered", "check_delivered", "pooled_dice", "validates_round"]

#: Prefix of the best model's array names when it travels beside the final model (``train_finish``).
BEST_PREFIX = "best/"

Arrays = dict[str, np.ndarray]


def validates_round(round_: int, every: int) -> bool:
    """Whether round ``round_`` validates the model it delivers: rounds 1, 1 + every, ... (models 0, every, ...)."""
    return every > 0 and (round_ - 1) % every == 0


def check_delivered(value: Any) -> None:
    """Raise :class:`UpdateRejected` unless ``value`` is a site's delivered-model validation report."""
    if not isinstance(value, Mapping):
        raise UpdateRejected(f"delivered-model validation must be a mapping, got {type(value).__name__}")
    validate_metrics({k: v for k, v in value.items() if v is not None and k != "pseudo_dice"},
                     {"num_val_cases": int, "seconds": float})
    dice = value.get("mean_fg_dice")
    if dice is not None and not 0.0 <= float(dice) <= 1.0:
        raise UpdateRejected(f"delivered mean_fg_dice {dice!r} is not in [0, 1]")
    if int(value["num_val_cases"]) < 0:
        raise UpdateRejected("num_val_cases is negative")


def pooled_dice(reports: Mapping[str, Mapping[str, Any]]) -> float | None:
    """Mean pseudo-Dice over sites, weighted by their validation cases; None when no site has a finite value."""
    pairs = [(float(r["mean_fg_dice"]), int(r["num_val_cases"])) for r in reports.values()
             if r.get("mean_fg_dice") is not None and math.isfinite(float(r["mean_fg_dice"]))]
    total = sum(n for _, n in pairs)
    if not pairs or total == 0:
        return None
    return sum(d * n for d, n in pairs) / total


class BestDelivered:
    """The best delivered model so far: its pooled pseudo-Dice, which model (the aggregate after round N), and a
    copy of its weights (FFE: ``{"global": ...}``; AsymFedAvg: one per site)."""

    def __init__(self, score: float | None = None, model_round: int | None = None,
                 models: Mapping[str, Arrays] | None = None) -> None:
        self.score, self.model_round = score, model_round
        self.models: dict[str, Arrays] | None = None if models is None else dict(models)

    def consider(self, model_round: int, reports: Mapping[str, Mapping[str, Any]], sites: list[str],
                 models: Mapping[str, Arrays]) -> bool:
        """Take ``models`` (copied) as the new best if every site reported and their pooled Dice is higher."""
        if set(reports) != set(sites):
            return False
        score = pooled_dice(reports)
        if score is None or (self.score is not None and score <= self.score):
            return False
        self.score, self.model_round = score, model_round
        self.models = {k: {n: np.array(a, copy=True) for n, a in m.items()} for k, m in models.items()}
        return True

    def info(self) -> dict[str, Any]:
        return {"score": self.score, "model_round": self.model_round}
