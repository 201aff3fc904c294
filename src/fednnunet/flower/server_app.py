"""Flower ServerApp: loads the job file named in the run config and runs it against the connected sites."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fednnunet.federation.events import EventLog
from fednnunet.federation.job import JobSpec
from fednnunet.federation.runner import EVENTS_FILE, run_job
from fednnunet.flower.site_caller import FlowerSiteCaller

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    job_file = str(context.run_config.get("job-file", ""))
    if not job_file:
        raise ValueError("run config 'job-file' is empty: pass --run-config 'job-file=\"/path/job.json\"'")
    job = JobSpec.load(job_file)
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "server.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fednnunet")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    events = EventLog(out / EVENTS_FILE)
    caller = FlowerSiteCaller(grid)
    events.info(f"waiting for {job.num_sites} site(s)")
    caller.wait_for_nodes(job.num_sites, job.connect_timeout_s)
    run_job(job, caller, events)
