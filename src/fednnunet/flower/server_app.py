"""The federation's ServerApp: runs one job (a :class:`JobSpec`) against the sites connected to a Flower Grid.

``fednnunet server`` and ``fednnunet run`` call :func:`execute` in their own process for the run they submitted
(see :mod:`fednnunet.flower.own_runs`); ``app`` is the same job behind Flower's ServerApp interface, which the
Flower App definition names, for a SuperLink that runs ServerApps itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fednnunet.federation.events import EventLog
from fednnunet.federation.job import JobSpec
from fednnunet.federation.runner import EVENTS_FILE, RESULT_FILE, run_job
from fednnunet.flower.site_caller import FlowerSiteCaller
from fednnunet.atomic_files import write_json_atomic

app = ServerApp()


def execute(grid: Grid, job: JobSpec) -> None:
    """Wait for the job's sites, run it and leave ``result.json`` in its out dir, also when it fails."""
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "server.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fednnunet")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        events = EventLog(out / EVENTS_FILE)
        caller = FlowerSiteCaller(grid, registered={int(node): site for node, site in job.site_nodes.items()})
        events.info(f"waiting for {job.num_sites} site(s)")
        try:
            caller.wait_for_nodes(job.num_sites, job.connect_timeout_s)
        except TimeoutError as err:
            events.emit("error", str(err))
            write_json_atomic(out / RESULT_FILE, {"ok": False, "task": job.task, "error": str(err)})
            raise
        run_job(job, caller, events)
    finally:
        root.removeHandler(handler)
        handler.close()


@app.main()
def main(grid: Grid, context: Context) -> None:
    job_file = str(context.run_config.get("job-file", ""))
    if not job_file:
        raise ValueError("run config 'job-file' is empty: pass --run-config 'job-file=\"/path/job.json\"'")
    execute(grid, JobSpec.load(job_file))
