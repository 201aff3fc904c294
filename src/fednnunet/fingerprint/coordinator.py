"""Coordinator side of federated fingerprint extraction and planning, independent of the transport.

Round trips (each one message to every site):
1. ``describe``: dataset name, case count, dataset.json fields, per-case problems (which stop the job before
   anything is written) and warnings (passed on to the people running it); checked before anything else.
2. ``fingerprint_sample``: sites sample with the global case count and return aggregates, with the first
   round of bucket counts for the percentile search as a coarse histogram. A site with one channel has
   usually sampled already, after its ``describe`` reply, with its own case count: the global count's samples
   are a prefix of those (``CaseAnalysis.reusable_for``).
3. ``fingerprint_counts`` (one round for float32 data): bucket counts that finish the exact percentile search.
4. ``fingerprint_apply``: every site writes the merged fingerprint and plans/preprocesses from it.
So FFE costs four round trips whatever the dataset size. With ``asym`` each site extracts and plans locally
(rounds 1 and 4 only). The transport is a :class:`~fednnunet.protocol.caller.SiteCaller`; Flower provides one,
tests can provide another. The site's half of each round trip is in :mod:`.site_ops`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, cast

import numpy as np

from fednnunet import __version__
from fednnunet.atomic_files import write_json_atomic
from fednnunet.federation.events import EventLog
from fednnunet.federation.job import JobSpec
from fednnunet.fingerprint.checks import FederationDataError, check_compatible
from fednnunet.fingerprint.merge import SiteSummary, assemble_fingerprint, new_search, pooled_sample_dtype, search_dtype
from fednnunet.fingerprint.order_stats import COARSE_BITS
from fednnunet.protocol.caller import Arrays, SiteCaller, SiteReply
from fednnunet.protocol.messages import (CountRequest, Describe, DescribeReply, FingerprintApply,
                                         FingerprintApplyReply, FingerprintCounts, FingerprintSample,
                                         FingerprintSampleReply, PlanSpec, SampleAhead)

logger = logging.getLogger(__name__)


@dataclass
class PlanRequest:
    """What `plan_and_preprocess` asks of every site (mirrors nnUNetv2_plan_and_preprocess options)."""

    configurations: list[str]
    planner: str = "ExperimentPlanner"
    gpu_memory_target_gb: dict[str, float] = field(default_factory=dict)  # per site ("*": all); empty: default
    num_processes: int = 1

    def spec(self, gpu_memory_target_gb: float | None, global_num_cases: int | None) -> PlanSpec:
        """The planning options one site gets (FFE: one GPU target and the pooled case count for all sites)."""
        return PlanSpec(configurations=self.configurations, planner=self.planner,
                        gpu_memory_target_gb=gpu_memory_target_gb, num_processes=self.num_processes,
                        global_num_cases=global_num_cases)


@dataclass
class FingerprintJob:
    asym: bool = False
    plan: PlanRequest | None = None
    num_processes: int = 1
    check_cases: bool = True
    task: str = ""  # sites started for another task refuse (``fednnunet client TASK``)


@dataclass
class FingerprintOutcome:
    fingerprint: dict | None  # merged fingerprint (None with asym)
    sites: dict[str, dict[str, Any]]  # per site: dataset name, files written
    round_trips: int
    gpu_memory_target_gb: float | None = None


#: warnings shown per site in the server's events (``fednnunet check`` at the site lists them all)
MAX_WARNINGS_SHOWN = 20


def _describe(caller: SiteCaller, job: FingerprintJob,
              warn: Callable[[str], None] = logger.warning) -> dict[str, DescribeReply]:
    # FFE sites may sample with their own case count while Flower carries this reply and the sampling request
    sample_ahead = None if job.asym else SampleAhead(num_processes=job.num_processes)
    replies = caller.broadcast(Describe(task=job.task, check_cases=job.check_cases, num_processes=job.num_processes,
                                        sample_ahead=sample_ahead))
    descs = {site: cast(DescribeReply, reply) for site, (reply, _) in sorted(replies.items())}
    for site, desc in descs.items():  # suspicious but legal data: shown, and the job goes on
        shown = desc.warnings
        for w in shown[:MAX_WARNINGS_SHOWN]:
            warn(w)
        if len(shown) > MAX_WARNINGS_SHOWN:
            warn(f"site {site}: {len(shown) - MAX_WARNINGS_SHOWN} more warning(s); `fednnunet check "
                 f"{desc.dataset_name}` at the site lists them all")
    problems = [p for d in descs.values() for p in d.problems]
    if problems:
        raise FederationDataError("dataset problems found:\n  " + "\n  ".join(problems))
    wrong = {s: d.version for s, d in descs.items() if d.version != __version__}
    if wrong:
        raise FederationDataError(f"the server runs fednnunet {__version__}; sites on other versions: " +
                                  ", ".join(f"{s}: {v}" for s, v in wrong.items()))
    check_compatible(descs)
    return descs


def _gpu_target(job_plan: PlanRequest) -> float | None:
    targets = job_plan.gpu_memory_target_gb
    if not targets:
        return None
    smallest = min(targets.values())
    if len(set(targets.values())) > 1:
        logger.warning("sites have different GPU memory targets (%s); FFE plans one network for all sites, "
                       "so it plans for the smallest: %.1f GB",
                       ", ".join(f"{s}: {g} GB" for s, g in targets.items()), smallest)
    return smallest


def _coarse_per_channel(summaries: list[SiteSummary], sample_arrays: Mapping[str, Arrays],
                        key_space: np.dtype) -> list[list[tuple[np.ndarray, np.ndarray]]] | None:
    """Every site's coarse histogram per channel, or None when a site's samples have another type than the search
    (its histogram is in another key space; the search then starts from the pooled min and max)."""
    if any(np.dtype(s.sample_dtype) != key_space for s in summaries):
        return None
    per_channel = []
    for ch in range(len(summaries[0].channels)):
        hists = []
        for s in summaries:
            arrays = sample_arrays[s.site]
            names = (f"coarse_bins_{ch}", f"coarse_counts_{ch}")
            if any(n not in arrays for n in names) or arrays[names[0]].shape != arrays[names[1]].shape:
                raise FederationDataError(f"site {s.site}: the sampling reply lacks a coarse histogram of channel {ch}")
            bins, counts = arrays[names[0]], arrays[names[1]]
            well_formed = (bins.ndim == 1 and bins.dtype.kind == "u" and counts.dtype.kind in "iu"
                           and (bins.size == 0 or (int(bins[-1]) < 1 << COARSE_BITS and bool(np.all(bins[1:] > bins[:-1]))))
                           and not (counts < 0).any())
            if not well_formed or int(counts.sum()) != s.channels[ch].count:
                raise FederationDataError(f"site {s.site}: channel {ch}'s coarse histogram is malformed or does not "
                                          f"hold its {s.channels[ch].count} samples")
            hists.append((bins, counts))
        per_channel.append(hists)
    return per_channel


def _exact_percentiles(caller: SiteCaller, summaries: list[SiteSummary], progress: Callable[[str], None],
                       sample_arrays: Mapping[str, Arrays] | None = None) -> tuple[list[list[float]], int]:
    """nnU-Net's percentiles of every channel; returns them and the number of count rounds it took."""
    key_space = search_dtype(summaries)
    pooled = pooled_sample_dtype(summaries)
    num_channels = len(summaries[0].channels)
    coarse = None if sample_arrays is None else _coarse_per_channel(summaries, sample_arrays, key_space)
    searches = [new_search([s.channels[ch] for s in summaries], key_space, coarse=None if coarse is None else coarse[ch])
                for ch in range(num_channels)]
    rounds = 0
    while not all(search.done for _, search in searches):
        requests: list[CountRequest] = []
        arrays: Arrays = {}
        index = []
        for ch, (_, search) in enumerate(searches):
            for lo, edges in search.requests():
                arrays[f"edges_{len(requests)}"] = edges
                requests.append(CountRequest(channel=ch, lo=int(lo)))
                index.append(ch)
        replies = caller.broadcast(FingerprintCounts(key_space=str(key_space), requests=requests), arrays)
        rounds += 1
        totals = [sum(np.asarray(out[f"counts_{i}"], dtype=np.int64) for _, out in replies.values())
                  for i in range(len(requests))]
        for ch, (_, search) in enumerate(searches):
            search.update([t for t, c in zip(totals, index) if c == ch])
        progress(f"percentile search round {rounds}: {sum(not s.done for _, s in searches)} channel(s) open")
    return [plan.percentiles(search.keys(), key_space, pooled) for plan, search in searches], rounds


def run_fingerprint_job(caller: SiteCaller, job: FingerprintJob, progress: Callable[[str], None] = logger.info,
                        warn: Callable[[str], None] = logger.warning) -> FingerprintOutcome:
    """Run FFE (or the asym local planning) across all sites of ``caller``; ``warn`` gets the sites' data
    warnings (naming site and case)."""
    descs = _describe(caller, job, warn)
    trips = 1
    total_cases = sum(d.num_cases for d in descs.values())
    progress("sites: " + ", ".join(f"{s} ({d.dataset_name}, {d.num_cases} cases)" for s, d in descs.items()))
    gpu = _gpu_target(job.plan) if job.plan and not job.asym else None

    if job.asym:
        requests = {}
        for site in caller.sites:
            plan = None
            if job.plan:
                targets = job.plan.gpu_memory_target_gb
                plan = job.plan.spec(targets.get(site, targets.get("*")), None)
            requests[site] = FingerprintApply(fingerprint=None, plan=plan, num_processes=job.num_processes)
        replies = caller.call(requests)
        return FingerprintOutcome(None, _site_files(descs, replies), trips + 1)

    replies = caller.broadcast(FingerprintSample(global_num_cases=total_cases, num_processes=job.num_processes))
    trips += 1
    # in site order, not in the order the replies arrived: the merge's float sums and per-case lists depend on it
    summaries = [SiteSummary.from_dict(site, cast(FingerprintSampleReply, reply).summary)
                 for site, (reply, _) in sorted(replies.items())]
    progress(f"sampled {sum(c.count for s in summaries for c in s.channels[:1])} foreground voxels per channel "
             f"from {total_cases} cases")
    percentiles, search_rounds = _exact_percentiles(caller, summaries, progress,
                                                    {site: arrays for site, (_, arrays) in replies.items()})
    trips += search_rounds
    fingerprint = assemble_fingerprint(summaries, percentiles)
    plan = job.plan.spec(gpu, total_cases) if job.plan else None
    replies = caller.broadcast(FingerprintApply(fingerprint=fingerprint, plan=plan, num_processes=job.num_processes))
    trips += 1
    return FingerprintOutcome(fingerprint, _site_files(descs, replies), trips, gpu)


def _site_files(descs: Mapping[str, DescribeReply], replies: Mapping[str, SiteReply]) -> dict[str, dict[str, Any]]:
    """Per site: its dataset and the files its ``fingerprint_apply`` wrote (the job's result.json lists them)."""
    out = {}
    for site, (reply, _) in replies.items():
        applied = cast(FingerprintApplyReply, reply)
        files = {"fingerprint_file": applied.fingerprint_file, "plans_file": applied.plans_file}
        out[site] = {"dataset_name": descs[site].dataset_name, "num_cases": descs[site].num_cases,
                     **{k: v for k, v in files.items() if v is not None}}
    return out


def run_fingerprint_task(job: JobSpec, caller: SiteCaller, events: EventLog) -> dict[str, Any]:
    """The ``extract_fingerprint`` and ``plan_and_preprocess`` tasks of a job; the merged fingerprint is kept
    beside the job's result as ``merged_fingerprint.json``."""
    plan = None
    if job.task == "plan_and_preprocess":
        plan = PlanRequest(job.configurations, job.planner, dict(job.gpu_memory_target_gb), job.num_processes)
    outcome = run_fingerprint_job(caller, FingerprintJob(job.asym, plan, job.num_processes, job.check_cases,
                                                         job.task), events.info, lambda w: events.emit("warning", w))
    out = Path(job.out_dir)
    if outcome.fingerprint is not None:
        write_json_atomic(out / "merged_fingerprint.json", outcome.fingerprint)
    return {"sites": outcome.sites, "round_trips": outcome.round_trips,
            "gpu_memory_target_gb": outcome.gpu_memory_target_gb}
