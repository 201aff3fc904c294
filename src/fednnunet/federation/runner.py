"""Run a :class:`JobSpec` against connected sites; called by the ServerApp.

Each task is run by the coordinator half of its stage (:data:`TASKS`); this module only dispatches, records the
result and releases the sites.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from fednnunet.atomic_files import write_json_atomic
from fednnunet.federation.events import EventLog
from fednnunet.federation.job import JobSpec
from fednnunet.protocol.caller import SiteCaller
from fednnunet.protocol.messages import JobDone

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
EVENTS_FILE = "events.jsonl"

#: task -> the function that runs it (``module:function``, imported when a job needs it)
RUNNERS = {
    "extract_fingerprint": "fednnunet.fingerprint.coordinator:run_fingerprint_task",
    "plan_and_preprocess": "fednnunet.fingerprint.coordinator:run_fingerprint_task",
    "train": "fednnunet.training.task:run_training_task",
    "find_best_configuration": "fednnunet.cross_validation.coordinator:run_best_configuration_task",
}


def run_job(job: JobSpec, caller: SiteCaller, events: EventLog) -> dict[str, Any]:
    """Run the job's task and write ``result.json`` (``{"ok": true, ...}`` or the error) in its out_dir."""
    out = Path(job.out_dir)
    started = time.time()
    try:
        module, name = RUNNERS[job.task].split(":")
        result = getattr(importlib.import_module(module), name)(job, caller, events)
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
        caller.broadcast(JobDone())
    except Exception as err:  # a site that is gone need not be told
        logger.warning("could not tell every site that the job ended: %s", err)


def read_result(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else None
