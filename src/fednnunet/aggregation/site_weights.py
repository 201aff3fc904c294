"""The FedAvg weights, fixed once per run from counts the federation's plan bounds (issue 24).

Why: FedAvg weights each site by its training cases, and that count comes from the site. Unchecked, a site
claiming 10^9 cases makes the average its own update, and an infinite or negative count aborts the run. So the
coordinator fixes every site's weight at ``train_init`` and only after these checks (:func:`fix_site_weights`):

* each site reports ``num_training_cases`` (the size of its training split: the weight), ``num_validation_cases``
  and ``dataset_num_cases`` (the cases in its own preprocessed folder), all integers, and
  ``1 <= num_training_cases <= dataset_num_cases``, ``0 <= num_validation_cases <= dataset_num_cases``;
* FFE (sites planned together): every site sends the merged ``dataset_fingerprint.json`` that FFE wrote into its
  preprocessed folder. The coordinator hashes it itself (SHA-256 of canonical JSON, :func:`fingerprint_digest`;
  a site cannot report one hash and hold another file): all sites must hold the same one, and since it lists one
  spacing per case of the pooled data, its length is the federation's planned case total. The sites' declared
  ``dataset_num_cases`` must sum to exactly that total. So with honest co-sites a site cannot declare more cases
  than it planned with, and its weight is at most its declared count;
* AsymFedAvg (``--asym``, every site planned alone): there is no shared record. Each site's own fingerprint must
  list its own ``dataset_num_cases`` cases (self-consistency only), and the per-site bounds above hold; a site can
  still claim more cases than it has if it lies consistently. Use ``--weighting uniform`` where that matters.

Every round, a reply whose ``num_training_cases`` is not the count fixed here is an update rejection (the site is
left out of that round; see ``training/fold_loop.py``). The fixed counts and weights are saved in the server
state, so ``--resume`` uses the same ones (:func:`check_resumed`).

Pure Python, no Flower: tested without a network.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the weights are fixed from the sites' typed train_init replies
    from fednnunet.protocol.messages import TrainInitReply

__all__ = ["FixedWeights", "SiteReplyError", "check_resumed", "case_count", "fingerprint_digest",
           "fix_site_weights", "pooled_cases"]


class SiteReplyError(ValueError):
    """A site's reply does not match what the coordinator expects; the message names the site(s) and the field."""

    def __init__(self, sites: str, field: str, problem: str) -> None:
        super().__init__(f"site {sites}: {field}: {problem}")
        self.sites, self.field = sites, field


def case_count(site: str, field: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; a bool, float (1e9, inf, nan), string or smaller number is refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SiteReplyError(site, field, f"expected an integer, got {_short(value)}")
    if int(value) < minimum:
        raise SiteReplyError(site, field, f"must be >= {minimum}, got {int(value)}")
    return int(value)


def fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    """SHA-256 of ``fingerprint`` as canonical JSON (sorted keys, no spaces): equal content, equal digest."""
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def pooled_cases(site: str, fingerprint: Any) -> int:
    """The number of cases a fingerprint describes: one entry of ``spacings`` per case."""
    if not isinstance(fingerprint, Mapping) or not isinstance(fingerprint.get("spacings"), list):
        raise SiteReplyError(site, "dataset_fingerprint", "missing, or without a list of per-case spacings "
                             "(plan_and_preprocess first)")
    return len(fingerprint["spacings"])


@dataclass(frozen=True)
class FixedWeights:
    """What :func:`fix_site_weights` fixed for a run (saved in the server state as ``site_weights``)."""

    cases: dict[str, int]  # num_training_cases per site: every round's reply must repeat it
    weights: dict[str, float]  # the FedAvg weights (the cases, or 1.0 each with --weighting uniform)
    declared: dict[str, int]  # dataset_num_cases per site
    planned_total: int | None  # FFE: the cases of the merged fingerprint; None with --asym
    fingerprint_sha256: str | None  # FFE: the merged fingerprint's digest

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """For the run's events: every site's cases and its share of the weights."""
        total = sum(self.weights.values())
        share = ", ".join(f"{s}: {self.cases[s]} of {self.declared[s]} cases, weight {w:g} "
                          f"({100 * w / total:.1f} %)" for s, w in sorted(self.weights.items()))
        planned = ("" if self.planned_total is None else
                   f"; planned total {self.planned_total} cases (fingerprint {self.fingerprint_sha256[:12]})")
        return f"FedAvg weights fixed at train_init: {share}{planned}"


def fix_site_weights(infos: Mapping[str, TrainInitReply], asym: bool, weighting: str) -> FixedWeights:
    """Check every site's ``train_init`` counts (module docstring) and fix the weights; raise
    :class:`SiteReplyError` naming the site and the field otherwise."""
    cases: dict[str, int] = {}
    declared: dict[str, int] = {}
    totals: dict[str, int] = {}
    digests: dict[str, str] = {}
    for site in sorted(infos):
        info = infos[site]
        d = declared[site] = case_count(site, "dataset_num_cases", info.dataset_num_cases)
        n = cases[site] = case_count(site, "num_training_cases", info.num_training_cases)
        v = case_count(site, "num_validation_cases", info.num_validation_cases, minimum=0)
        if n > d:
            raise SiteReplyError(site, "num_training_cases", f"{n} training cases, but its dataset has {d}")
        if v > d:
            raise SiteReplyError(site, "num_validation_cases", f"{v} validation cases, but its dataset has {d}")
        fingerprint = info.dataset_fingerprint
        totals[site] = pooled_cases(site, fingerprint)
        digests[site] = fingerprint_digest(fingerprint)
    planned_total = digest = None
    if asym:
        for site, total in totals.items():
            if total != declared[site]:
                raise SiteReplyError(site, "dataset_num_cases", f"{declared[site]} cases, but its own fingerprint "
                                     f"lists {total}")
    else:
        groups: dict[str, list[str]] = {}
        for site, dg in digests.items():
            groups.setdefault(dg, []).append(site)
        if len(groups) > 1:
            ranked = sorted(groups.values(), key=len, reverse=True)
            odd = [s for g in (ranked if len(ranked[0]) == len(ranked[1]) else ranked[1:]) for s in g]
            raise SiteReplyError(", ".join(sorted(odd)), "dataset_fingerprint",
                                 "the sites hold different merged fingerprints (" + "; ".join(
                                     f"{', '.join(g)}: {dg[:12]}" for dg, g in sorted(groups.items()))
                                 + "): FedAvg needs sites planned together (plan_and_preprocess with all of them)")
        digest = next(iter(groups))
        planned_total = next(iter(totals.values()))
        if sum(declared.values()) != planned_total:
            listed = " + ".join(f"{declared[s]} ({s})" for s in sorted(declared))
            raise SiteReplyError(", ".join(sorted(declared)), "dataset_num_cases",
                                 f"the sites declare {listed} = {sum(declared.values())} cases, but the federation "
                                 f"was planned on {planned_total} (the merged dataset_fingerprint.json): train with "
                                 "exactly the sites planned together, on the data they planned with")
    weights = {s: float(n) if weighting == "cases" else 1.0 for s, n in cases.items()}
    return FixedWeights(cases, weights, declared, planned_total, digest)


def check_resumed(fixed: FixedWeights, saved: Mapping[str, Any] | None) -> FixedWeights:
    """On ``--resume``: the counts of the run being resumed (its server state's ``site_weights``) must be the ones
    the sites report now; the saved weights are used. ``saved`` None (a state from an older version): ``fixed``."""
    if not saved:
        return fixed
    saved_cases = saved.get("cases") or {}
    saved_weights = saved.get("weights") or {}
    for site, n in sorted(fixed.cases.items()):
        if site not in saved_cases or site not in saved_weights:
            raise SiteReplyError(site, "num_training_cases", "this site was not part of the run being resumed")
        if saved_cases[site] != n:
            raise SiteReplyError(site, "num_training_cases", f"{n} now, but {saved_cases[site]} when the run "
                                 "being resumed started (its state.json)")
    if saved.get("fingerprint_sha256") != fixed.fingerprint_sha256:
        raise SiteReplyError(", ".join(sorted(fixed.cases)), "dataset_fingerprint",
                             "not the merged fingerprint of the run being resumed")
    weights = {s: float(saved_weights[s]) for s in fixed.cases}
    return FixedWeights(dict(fixed.cases), weights, dict(fixed.declared), fixed.planned_total,
                        fixed.fingerprint_sha256)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
