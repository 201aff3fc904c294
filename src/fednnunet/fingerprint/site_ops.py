"""Site side of federated fingerprint extraction and planning: the site worker's answer to each FFE request.

The coordinator's half of each round trip is in :mod:`.coordinator`. The state between requests lives on the
worker (``worker.samples``, ``worker.sampled_ahead``, ``worker.dataset_name``), which dispatches each request
here. Nothing here imports nnU-Net at module import: the modules it uses load it when they run.
"""

from __future__ import annotations

import logging
import traceback
from typing import TYPE_CHECKING

import numpy as np

from fednnunet import __version__
from fednnunet.atomic_files import write_json_atomic
from fednnunet.fingerprint.integrity import check_site_cases
from fednnunet.fingerprint.merge import samples_per_case
from fednnunet.fingerprint.site_dataset import describe_site
from fednnunet.fingerprint.site_samples import CaseAnalysis, LocalSamples
from fednnunet.planning.site_planning import extract_local_fingerprint, plan_and_preprocess_site, preprocessed_folder
from fednnunet.protocol.errors import ErrorKind, OpError
from fednnunet.protocol.messages import (Describe, DescribeReply, FingerprintApply, FingerprintApplyReply,
                                         FingerprintCounts, FingerprintCountsReply, FingerprintSample,
                                         FingerprintSampleReply)

if TYPE_CHECKING:  # pragma: no cover - the worker imports this module lazily
    from fednnunet.site.worker import SiteWorker

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


def describe(worker: SiteWorker, request: Describe, arrays: Arrays) -> tuple[DescribeReply, Arrays]:
    """The site's dataset and its cases' problems and warnings; with ``sample_ahead``, sample after replying."""
    worker.check_task(request.task)
    dataset = describe_site(worker.site, worker.dataset)
    worker.dataset_name = dataset.dataset_name
    problems: list[str] = []
    warnings: list[str] = []
    if request.check_cases:
        check = check_site_cases(worker.site, dataset.dataset_name, request.num_processes)
        problems, warnings = check.problems, check.warnings
    ahead = request.sample_ahead
    if (ahead is not None and not problems
            and CaseAnalysis.prefix_is_exact(len(dataset.dataset_json.get("channel_names", {})))):
        worker.after_reply(lambda: _sample_ahead(worker, dataset.num_cases, ahead.num_processes), stop_waits=False)
    return DescribeReply(dataset_name=dataset.dataset_name, num_cases=dataset.num_cases,
                         dataset_json=dataset.dataset_json, problems=problems, warnings=warnings,
                         version=__version__), {}


def _sample_ahead(worker: SiteWorker, num_cases: int, num_processes: int) -> None:
    """Analyse the cases with this site's own case count, an upper bound of the pooled count's samples per case
    (see ``CaseAnalysis.reusable_for``). A failure is left to the sampling request to meet and report."""
    try:
        worker.sampled_ahead = CaseAnalysis.run(worker.site, worker.describe_dataset(), samples_per_case(num_cases),
                                                num_processes)
    except Exception:  # noqa: BLE001 - the request repeats the analysis and reports what fails
        logger.warning("site %s: sampling ahead failed; sampling on request instead:\n%s", worker.site,
                       traceback.format_exc())


def fingerprint_sample(worker: SiteWorker, request: FingerprintSample,
                       arrays: Arrays) -> tuple[FingerprintSampleReply, Arrays]:
    """Sample like nnU-Net with the pooled case count (reusing the samples taken ahead when they are a prefix);
    reply the aggregates and the coarse histograms."""
    name = worker.describe_dataset()
    per_case = samples_per_case(request.global_num_cases)
    ahead, worker.sampled_ahead = worker.sampled_ahead, None
    if ahead is not None and ahead.reusable_for(per_case):
        analysis = ahead.truncated(per_case)
        logger.info("site %s: using the cases analysed ahead (%d -> %d samples per case)", worker.site,
                    ahead.samples_per_case, per_case)
    else:
        analysis = CaseAnalysis.run(worker.site, name, per_case, request.num_processes)
    worker.samples = LocalSamples.of(analysis)
    summary = worker.samples.summary()
    for case in worker.samples.empty_cases:
        logger.warning("site %s, case %s: no foreground voxels; nnU-Net samples no intensities from it",
                       worker.site, case)
    return FingerprintSampleReply(summary=summary), worker.samples.coarse_histograms()


def fingerprint_counts(worker: SiteWorker, request: FingerprintCounts,
                       arrays: Arrays) -> tuple[FingerprintCountsReply, Arrays]:
    """The samples' counts in the buckets of each request (edges in ``edges_I``), for the percentile search."""
    if worker.samples is None:
        raise OpError(ErrorKind.SESSION_LOST, f"site {worker.site}: counts requested before sampling")
    key_space = np.dtype(request.key_space)
    out = {}
    for i, req in enumerate(request.requests):
        out[f"counts_{i}"] = worker.samples.bucket_counts(req.channel, key_space, req.lo, arrays[f"edges_{i}"])
    return FingerprintCountsReply(), out


def fingerprint_apply(worker: SiteWorker, request: FingerprintApply,
                      arrays: Arrays) -> tuple[FingerprintApplyReply, Arrays]:
    """Write the merged fingerprint (FFE) or extract a local one (asym), then plan/preprocess if asked."""
    name = worker.describe_dataset()
    fingerprint = request.fingerprint
    plan = request.plan
    worker.samples = None  # the samples are no longer needed; free the memory
    if plan is None:
        fingerprint_file = preprocessed_folder(name) / "dataset_fingerprint.json"
        if fingerprint is None:
            extract_local_fingerprint(name, request.num_processes)
        else:
            write_json_atomic(fingerprint_file, fingerprint)
        return FingerprintApplyReply(fingerprint_file=str(fingerprint_file)), {}
    if fingerprint is None:
        extract_local_fingerprint(name, plan.num_processes)
    plans = plan_and_preprocess_site(
        name, fingerprint, plan.configurations, planner=plan.planner, gpu_memory_target_gb=plan.gpu_memory_target_gb,
        num_processes=plan.num_processes, global_num_cases=plan.global_num_cases, preprocess=True)
    plans_file = preprocessed_folder(name) / f"{plans['plans_name']}.json"
    return FingerprintApplyReply(plans=plans, plans_file=str(plans_file)), {}
