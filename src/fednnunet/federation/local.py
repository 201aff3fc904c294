"""A federation on one machine (``fednnunet run``): a coordinator and one site process per dataset, on loopback.

- :class:`Site`: a site's name and its dataset.
- :class:`SiteNode`: one site's process (``python -m fednnunet.site.main``, the entry point ``fednnunet client``
  uses too), which starts and owns the site's Flower SuperNode and takes every task from it.
- :class:`LocalFederation`: a :class:`~fednnunet.federation.server_node.ServerNode` and one SiteNode per site,
  started and stopped together.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from fednnunet.federation.job import JobSpec
from fednnunet.federation.server_node import ServerNode
from fednnunet.processes import ProcessError, ProcessGroup, StartStop, free_port, wait_listening


@dataclass
class Site:
    name: str
    dataset: str


class SiteNode(ProcessGroup):
    """One site of a one-machine federation: its worker process (state and ML), which starts and owns the site's
    SuperNode (transport to the server; see :mod:`fednnunet.site.supernode`) and takes every task from it."""

    def __init__(self, workdir: Path, site: Site, server: str, extra_env: dict[str, str] | None = None,
                 task: str | None = None) -> None:
        super().__init__(workdir, extra_env)
        self.site = site
        self.server = server
        self.task = task  # the worker refuses jobs of another task (and warms up for training)
        self.runtime_port = free_port()

    def start(self) -> "SiteNode":
        worker = [sys.executable, "-m", "fednnunet.site.main", "--site", self.site.name, "--dataset",
                  self.site.dataset, "--superlink", self.server, "--runtime-port", str(self.runtime_port),
                  "--logs", str(self.logs), *(["--task", self.task] if self.task else [])]
        self.worker = self.start_process(f"worker-{self.site.name}", worker, self.env(f"site-{self.site.name}"))
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until the SuperNode's Runtime API (where the worker takes its tasks) listens; fails if the worker died."""
        wait_listening(self, "127.0.0.1", self.runtime_port, f"site {self.site.name}: SuperNode", timeout_s)


@dataclass
class LocalFederation(StartStop):
    """A server and every site on loopback: ``with LocalFederation(...) as fed: fed.run(job)``."""

    workdir: Path
    sites: Sequence[Site]
    site_env: dict[str, str] = field(default_factory=dict)
    on_event: Callable[[dict], None] = lambda e: None
    task: str | None = None  # the one task its jobs run, if known: the sites refuse others, and warm up for it

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.server = ServerNode(self.workdir, on_event=self.on_event)
        self.nodes = [SiteNode(self.workdir, s, self.server.site_address, extra_env=self.site_env, task=self.task)
                      for s in self.sites]
        self.logs = self.server.logs
        self._reported_dead: set[str] = set()

    def start(self) -> "LocalFederation":
        """Start every process at once: the site workers import while the SuperLink and the job start (:meth:`run`
        checks they came up)."""
        for node in self.nodes:
            node.start()
        self.server.start()
        return self

    def check_alive(self) -> None:
        """The server's processes must live; a dead site is the job's business (``--min-sites``), so it is
        only reported here, once."""
        self.server.check_alive()
        for node in self.nodes:
            try:
                node.check_alive()
            except ProcessError as err:
                if node.site.name not in self._reported_dead:
                    self._reported_dead.add(node.site.name)
                    self.on_event({"t": time.time(), "kind": "warning",
                                   "message": f"site {node.site.name} stopped: {err}"})

    def stop(self) -> None:
        groups: list[ProcessGroup] = [*self.nodes, self.server]
        with ThreadPoolExecutor(max_workers=len(groups)) as pool:  # each group waits for its own processes
            list(pool.map(lambda group: group.stop(), groups))

    def run(self, job: JobSpec, timeout_s: float | None = None) -> dict:
        """Run ``job`` on these sites; they are stopped with the federation, so the job does not release them."""
        run_id = self.server.submit(replace(job, release_sites=False))
        for node in self.nodes:  # while the job starts; a worker that fails to start is an error at once
            node.wait_ready()
        return self.server.follow(run_id, Path(job.out_dir), timeout_s, self.check_alive)
