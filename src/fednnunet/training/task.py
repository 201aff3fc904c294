"""The ``train`` job at the coordinator: every fold in turn (or ``--val``), then the cross-validation table.

Why a module of its own: the job is more than a fold (which sites answer, the number of rounds fixed once for all
folds, ``--val``'s validation-only path, the table pooled over the folds); one fold's training is
:class:`~fednnunet.training.fold_loop.FoldRun`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, cast

from fednnunet.atomic_files import write_json_atomic
from fednnunet.cross_validation.report import compact_cv, training_cv
from fednnunet.federation.events import EventLog
from fednnunet.federation.job import JobSpec
from fednnunet.protocol.caller import SiteCaller
from fednnunet.protocol.messages import Describe, DescribeReply, TrainValidateReply
from fednnunet.training.fold_loop import FoldRun
from fednnunet.training.options import TrainOptions
from fednnunet.training.results import site_result

__all__ = ["run_training_task"]


def _validate_only(options: TrainOptions, fold: str, caller: SiteCaller, events: EventLog,
                   sites: list[str]) -> dict[str, Any]:
    """``--val``: every site validates its existing final checkpoint of ``fold``."""
    request = options.train_validate(fold)
    replies = {s: cast(TrainValidateReply, reply) for s, (reply, _) in
               caller.call({s: request for s in sites}, timeout_s=options.finish_timeout_s).items()}
    for s, reply in sorted(replies.items()):
        events.info(f"site {s}: validated {reply.output_folder}")
    return {"sites": {s: site_result(reply) for s, reply in replies.items()}}


def _cross_validation(folds: Mapping[str, Any], root: Path, events: EventLog) -> dict[str, Any]:
    """Every site's final validation summary and the pooled one, per fold and over the folds:
    ``cross_validation.json`` in the job's out dir and a table in the events."""
    report = training_cv(folds)
    if report["rows"]:
        write_json_atomic(root / "cross_validation.json", report)
        events.info("final validation, pooled over the sites: " + compact_cv(report["rows"]))
    return report


def _algorithm(asym: bool, options: TrainOptions) -> str:
    if asym:
        return f"AsymFedAvg (scope {options.asym_scope})"
    return "FedBN (normalization layers kept at the sites)" if options.local_norm else "FedAvg"


def run_training_task(job: JobSpec, caller: SiteCaller, events: EventLog) -> dict[str, Any]:
    """Run ``job`` (task ``train``) fold after fold; return per-fold, per-site output folders and timings."""
    options = TrainOptions.from_dict(job.train)
    if not options.validation_only:  # the rounds are the coordinator's (never a site's num_epochs); sent to the sites
        options = replace(options, rounds=options.total_rounds())
    root = Path(job.out_dir)
    described = {s: cast(DescribeReply, reply) for s, (reply, _) in
                 caller.broadcast(Describe(task="train", check_cases=False)).items()}
    sites = sorted(described)
    if len(sites) < job.num_sites:
        raise RuntimeError(f"only {len(sites)} of {job.num_sites} sites answered")
    events.info(f"training on {len(sites)} site(s): " + ", ".join(
        f"{s} ({described[s].dataset_name})" for s in sites) +
        f"; {_algorithm(job.asym, options)}, "
        f"weighting {options.weighting}, site momentum {options.momentum}"
        + (f", server momentum {options.server_momentum}" if options.server_momentum else ""))
    folds: dict[str, Any] = {}
    for fold in options.folds:
        if options.validation_only:
            folds[fold] = _validate_only(options, fold, caller, events, sites)
            continue
        out = root if len(options.folds) == 1 else root / f"fold_{fold}"
        folds[fold] = FoldRun(job, options, fold, caller, events, out, root).run(sites)
    result: dict[str, Any] = {"folds": folds, "traffic": {"sent": caller.traffic.sent,
                                                          "received": caller.traffic.received}}
    result["cross_validation"] = _cross_validation(folds, root, events)
    if len(folds) == 1:
        result.update(next(iter(folds.values())))
    return result
