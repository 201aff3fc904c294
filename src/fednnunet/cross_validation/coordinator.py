"""Federated ``nnUNetv2_find_best_configuration``, coordinator half: nnU-Net's decisions from pooled aggregates.

Round trips (each one message to every site, typed in :mod:`fednnunet.protocol.messages`; the site half is
:mod:`fednnunet.cross_validation.site`):

1. ``cv_evaluate``: every site (refusing if it was started for another task) scores its cross-validation
   predictions of each model (and, unless ``--disable_ensembling``, each ensemble of two models from their ``--npz``
   probabilities) and replies per model and ensemble the sums and counts of what nnU-Net averages
   (``MetricSums``): no image, no probability, no per-case value unless the site opts in. The pooled sums give the summary nnU-Net computes on the union of the
   cases; the best model or ensemble is chosen by nnU-Net's rule (``aggregates.best_candidate``);
2. ``cv_postprocess`` once per step of nnU-Net's postprocessing search: keep only the largest component of all
   foreground, then of each class when there are several; each step is decided on the pooled sums by nnU-Net's
   rule and the decision travels with the next request;
3. ``cv_finish``: the decisions; every site writes nnU-Net's files with nnU-Net's functions
   (``postprocessing.pkl`` is pickled at the site), so the printed inference commands work there.

The server writes ``cross_validation.json`` (every site's and the pooled summary of every model and ensemble, as
nnU-Net's ``summary.json`` without per-case entries) and ``best_configuration.json`` (nnU-Net's
``inference_information`` fields with pooled figures, the postprocessing steps, each site's files and commands)
in its out dir, and prints both.
"""


from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, cast

from fednnunet.atomic_files import write_json_atomic
from fednnunet.cross_validation.aggregates import (AggregateError, MetricSums, best_candidate,
                                                   keep_largest_class_helps, keep_largest_foreground_helps,
                                                   selected_models)
from fednnunet.cross_validation.report import compact_cv, cv_row
from fednnunet.federation.events import EventLog
from fednnunet.federation.job import JobSpec
from fednnunet.protocol.caller import SiteCaller
from fednnunet.protocol.messages import (CvEvaluate, CvEvaluateReply, CvFinish, CvFinishReply, CvPostprocess,
                                         CvPostprocessReply, Reply, Request)

logger = logging.getLogger(__name__)

__all__ = ["BestConfigurationOptions", "run_best_configuration_task", "CV_FILE", "DECISION_FILE"]

CV_FILE = "cross_validation.json"
DECISION_FILE = "best_configuration.json"
#: nnUNetv2_find_best_configuration's default -c
DEFAULT_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")

R = TypeVar("R", bound=Reply)


@dataclass
class BestConfigurationOptions:
    """``JobSpec.best_configuration``: the flags of nnUNetv2_find_best_configuration, with its defaults (the only
    place they are set: the CLI takes them from here, the sites get every option in :class:`CvEvaluate`)."""

    configurations: list[str] = field(default_factory=lambda: list(DEFAULT_CONFIGURATIONS))
    trainers: list[str] = field(default_factory=lambda: ["nnUNetTrainer"])
    plans: list[str] = field(default_factory=lambda: ["nnUNetPlans"])
    folds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    allow_ensembling: bool = True  # not --disable_ensembling
    num_processes: int | None = None  # -np; None: each site's nnU-Net default (nnUNet_def_n_proc or 8)
    overwrite: bool = True  # not --no_overwrite
    timeout_s: float = 4 * 3600.0  # per round trip (scoring and postprocessing large datasets takes a while)

    def __post_init__(self) -> None:
        for name in ("configurations", "trainers", "plans", "folds"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if any(isinstance(f, bool) or not isinstance(f, int) or f < 0 for f in self.folds):
            raise ValueError(f"folds must be non-negative integers, got {self.folds}")
        if len(set(self.folds)) != len(self.folds):
            raise ValueError(f"folds contain duplicates: {self.folds}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError("num_processes must be at least 1")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BestConfigurationOptions":
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown find_best_configuration option(s): {', '.join(unknown)}")
        return cls(**dict(data))

    def evaluate_request(self, task: str) -> CvEvaluate:
        """The first request to every site: all options but the coordinator's own timeout."""
        return CvEvaluate(configurations=self.configurations, trainers=self.trainers, plans=self.plans,
                          folds=self.folds, allow_ensembling=self.allow_ensembling,
                          num_processes=self.num_processes, overwrite=self.overwrite, task=task)


@dataclass
class _SiteEvaluation:
    reply: CvEvaluateReply
    candidates: dict[str, MetricSums]  # in nnU-Net's order


def _broadcast(caller: SiteCaller, request: Request, reply_type: type[R], timeout_s: float) -> dict[str, R]:
    """Every site's reply to ``request``; the protocol decoded each as ``request.REPLY`` (no arrays travel)."""
    assert request.REPLY is reply_type
    return {site: cast(R, reply) for site, (reply, _) in caller.broadcast(request, timeout_s=timeout_s).items()}


def _evaluation(site: str, reply: CvEvaluateReply) -> _SiteEvaluation:
    """The reply with each candidate's sums checked (its shape the protocol has checked)."""
    return _SiteEvaluation(reply, {c.key: MetricSums.from_json(c.sums, f"site {site}, {c.key}")
                                   for c in reply.candidates})


def _check_agree(evaluations: Mapping[str, _SiteEvaluation]) -> None:
    """The same models, candidates and classes everywhere, or nothing can be pooled."""
    items = list(evaluations.items())
    first_site, first = items[0]
    for site, ev in items[1:]:
        for what, a, b in (("trained models", first.reply.models, ev.reply.models),
                           ("models and ensembles", list(first.candidates), list(ev.candidates)),
                           ("classes", first.reply.classes, ev.reply.classes)):
            if a != b:
                raise AggregateError(f"sites {first_site} and {site} differ in their {what}: {a} vs {b}")


def _pool(replies: Mapping[str, CvPostprocessReply], what: str) -> dict[str, MetricSums]:
    return {site: MetricSums.from_json(reply.sums, f"site {site}, {what}") for site, reply in replies.items()}


def _nn_summary(sums: MetricSums) -> dict[str, Any]:
    """The part of nnU-Net's summary.json that postprocessing.json keeps: foreground_mean and mean."""
    summary = sums.summary()
    return {"foreground_mean": summary["foreground_mean"], "mean": summary["mean"]}


_REPLY_FIELDS = frozenset(f.name for f in fields(Reply))


def _site_files(reply: CvFinishReply) -> dict[str, str]:
    """What a site wrote and its inference instructions: the reply without who answered and when."""
    return {f.name: getattr(reply, f.name) for f in fields(reply) if f.name not in _REPLY_FIELDS}


def run_best_configuration_task(job: JobSpec, caller: SiteCaller, events: EventLog) -> dict[str, Any]:
    """Run find_best_configuration across the connected sites; write and return the decision and the table."""
    opts = BestConfigurationOptions.from_dict(job.best_configuration)
    out = Path(job.out_dir)
    events.info(f"find_best_configuration: configurations {' '.join(opts.configurations)}, trainers "
                f"{' '.join(opts.trainers)}, plans {' '.join(opts.plans)}, folds {' '.join(map(str, opts.folds))}")
    replies = _broadcast(caller, opts.evaluate_request(job.task), CvEvaluateReply, opts.timeout_s)
    if len(replies) < job.num_sites:
        raise RuntimeError(f"only {len(replies)} of {job.num_sites} sites answered")
    evaluations = {site: _evaluation(site, reply) for site, reply in sorted(replies.items())}
    _check_agree(evaluations)
    models = next(iter(evaluations.values())).reply.models
    events.info(f"{len(evaluations)} site(s) scored their cross-validation (" + ", ".join(
        f"{s}: {ev.reply.dataset_name}" for s, ev in evaluations.items()) + "); trained models: " + ", ".join(
        f"{m['trainer']}__{m['plans']}__{m['configuration']}" for m in models))
    order = list(next(iter(evaluations.values())).candidates)
    pooled = {key: MetricSums.pooled({s: ev.candidates[key] for s, ev in evaluations.items()}) for key in order}
    all_results = {key: pooled[key].dice() for key in order}
    table = {key: cv_row({s: ev.candidates[key] for s, ev in evaluations.items()}) for key in order}
    events.info("cross-validation, pooled over the sites: " + compact_cv(table))
    best = best_candidate(list(all_results.items()))
    events.info(f"best: {best} (pooled foreground mean Dice {all_results[best]:.4f}); determining postprocessing")

    steps_done: list[dict[str, Any]] = []
    kept: list[bool] = []
    current = pooled[best]
    step, steps = 0, ["foreground"]
    while step < len(steps):
        request = CvPostprocess(candidate=best, step=step, keep_previous=kept[-1] if kept else None)
        tried = _broadcast(caller, request, CvPostprocessReply, opts.timeout_s)
        targets = {(tuple(r.steps), r.target) for r in tried.values()}
        if len(targets) != 1:
            raise AggregateError(f"sites disagree on postprocessing step {step}: {sorted(targets)}")
        (site_steps, target), = targets
        steps = list(site_steps)
        after = MetricSums.pooled(_pool(tried, f"postprocessing step {step}"))
        helps = (keep_largest_foreground_helps(current, after) if step == 0
                 else keep_largest_class_helps(current, after, target))
        what = "all foreground" if step == 0 else f"class {target}"
        before_dice = current.dice() if step == 0 else current.means()[target]["Dice"]
        after_dice = after.dice() if step == 0 else after.means()[target]["Dice"]
        steps_done.append({"step": what, "applied": helps, "dice_before": before_dice, "dice_after": after_dice})
        events.info(f"keep the largest component of {what}: {'yes' if helps else 'no'} "
                    f"(pooled Dice {before_dice:.5f} -> {after_dice:.5f})")
        kept.append(helps)
        if helps:
            current = after
        step += 1

    decision = CvFinish(
        best=best, kept=kept, keep_last=kept[-1], all_results=all_results,
        result_on_crossval_pre_pp=pooled[best].dice(), result_on_crossval_post_pp=current.dice(),
        before=_nn_summary(pooled[best]), after=_nn_summary(current))
    finished = _broadcast(caller, decision, CvFinishReply, opts.timeout_s)
    site_files = {site: _site_files(reply) for site, reply in sorted(finished.items())}

    cv = {"folds": opts.folds, "models": models, "rows": table}
    per_case = {s: ev.reply.per_case for s, ev in evaluations.items() if ev.reply.per_case is not None}
    if per_case:
        cv["per_case"] = per_case
    write_json_atomic(out / CV_FILE, cv)
    result = {
        "folds": opts.folds, "ensembling_allowed": opts.allow_ensembling, "all_results": all_results, "best": best,
        "selected_model_or_models": selected_models(best), "postprocessing": steps_done,
        "result_on_crossval_pre_pp": decision.result_on_crossval_pre_pp,
        "result_on_crossval_post_pp": decision.result_on_crossval_post_pp,
        "pooled_before_postprocessing": decision.before, "pooled_after_postprocessing": decision.after,
        "sites": site_files}
    write_json_atomic(out / DECISION_FILE, result)
    return {**result, "cross_validation": cv, "round_trips": 2 + len(steps)}
