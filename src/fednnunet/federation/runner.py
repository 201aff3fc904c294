"""Run a :class:`JobSpec` against connected sites; called by the ServerApp."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from fednnunet.federation.events import EventLog
from fednnunet.federation.job import JobSpec
from fednnunet.fingerprint.protocol import FingerprintJob, PlanRequest, SiteCaller, run_fingerprint_job
from fednnunet.planning.site_planning import write_json_atomic

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
EVENTS_FILE = "events.jsonl"


def run_fingerprint_task(job: JobSpec, caller: SiteCaller, events: EventLog) -> dict[str, Any]:
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


def run_job(job: JobSpec, caller: SiteCaller, events: EventLog) -> dict[str, Any]:
    """Run the job's task and write ``result.json`` (``{"ok": true, ...}`` or the error) in its out_dir."""
    out = Path(job.out_dir)
    started = time.time()
    try:
        if job.task in ("extract_fingerprint", "plan_and_preprocess"):
            result = run_fingerprint_task(job, caller, events)
        elif job.task == "find_best_configuration":
            from fednnunet.federation.best_configuration import run_best_configuration_task

            result = run_best_configuration_task(job, caller, events)
        else:
            from fednnunet.federation.training import run_training_task

            result = run_training_task(job, caller, events)
    except Exception as err:
        _release_sites(job, caller)
        events.emit("error", f"{job.task} failed: {err}")
        write_json_atomic(out / RESULT_FILE, {"ok": False, "task": job.task, "error": str(err),
                                              "seconds": time.time() - started})
        raise
    _release_sites(job, caller)
    result = {"ok": True, "task": job.task, "seconds": time.time() - started, **result}
    write_json_atomic(out / RESULT_FILE, result)
    events.emit("done", f"{job.task} finished in {result['seconds']:.1f} s")
    return result


def _release_sites(job: JobSpec, caller: SiteCaller) -> None:
    """Tell the sites the job is over (sites started for one job exit); best effort, never fails the job.
    Skipped where the job says its sites are stopped by their launcher (``JobSpec.release_sites``)."""
    if not job.release_sites or not caller.sites:
        return
    try:
        caller.broadcast("job_done", {})
    except Exception as err:  # a site that is gone need not be told
        logger.warning("could not tell every site that the job ended: %s", err)


def read_result(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else None
