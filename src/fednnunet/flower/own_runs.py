"""The coordinator executes only its own job: ServerApp tasks of the runs it submitted start, all others fail.

The SuperLink runs with ``--isolation process``, so it starts no ServerApp itself, and with the SuperExec auth
secret, so only this executor can claim its tasks. Anyone who reaches the SuperLink's Control API (in open-source
Flower 1.41 that is every local user of the coordinator's machine: it has no authentication) can still submit a
run; that run is claimed here and failed with the reason, so its ServerApp never runs and none of its messages
reaches a site.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import httpx

from fednnunet.flower.runtime_tasks import ClaimedTask, RuntimeTasks, SubStatus, TaskType

logger = logging.getLogger(__name__)

REFUSAL = "refused by the fednnunet coordinator: it executes only the runs it submitted itself"


class OwnRuns:
    """Claims every pending ServerApp task: ``start(task, work)`` for an expected run, a refusal for any other."""

    def __init__(self, tasks: RuntimeTasks, start: Callable[[ClaimedTask, Any], None],
                 on_refused: Callable[[int, str], None], poll_s: float = 0.5) -> None:
        self.tasks = tasks
        self.start = start
        self.on_refused = on_refused
        self.poll_s = poll_s
        self._expected: dict[int, Any] = {}  # run id -> what the run is to do
        self._submitting = 0  # submissions whose run id is not known yet
        self._held: list[ClaimedTask] = []  # tasks of unknown runs claimed while a submission was in flight
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fednnunet-own-runs", daemon=True)

    @contextmanager
    def submitting(self) -> Iterator[Callable[[int | str, Any], None]]:
        """``with own_runs.submitting() as expect: expect(flwr_run(...), work)``: the SuperLink offers a run's task as
        soon as it exists, before ``flwr run`` has told us its id, so tasks of unknown runs are held (not
        refused) until every submission in flight has named its run."""
        with self._lock:
            self._submitting += 1
        try:
            yield self._expect
        finally:
            with self._lock:
                self._submitting -= 1

    def _expect(self, run_id: int | str, work: Any) -> None:
        with self._lock:
            self._expected[int(run_id)] = work

    def run_in_background(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.tasks.close()

    def poll(self) -> None:
        """Claim every task pending now; start ours, refuse the others (hold them while a submission is open)."""
        while (claimed := self.tasks.acquire(TaskType.SERVER_APP)) is not None:
            self._held.append(claimed)
        held, self._held = self._held, []
        for claimed in held:
            with self._lock:
                ours = claimed.run_id in self._expected
                work = self._expected.pop(claimed.run_id, None)
                wait = not ours and self._submitting > 0
            if ours:
                self.start(claimed, work)
            elif wait:
                self._held.append(claimed)
            else:
                self._refuse(claimed)

    def _refuse(self, claimed: ClaimedTask) -> None:
        try:
            claimed.finish(SubStatus.FAILED, REFUSAL)
        finally:
            claimed.close()
        logger.warning("run %d (app FAB sha256 %s) %s", claimed.run_id, claimed.fab_hash[:12], REFUSAL)
        self.on_refused(claimed.run_id, claimed.fab_hash)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except httpx.TransportError as err:  # the SuperLink is starting or stopping
                logger.debug("SuperLink runtime API not reachable: %s", err)
            except Exception:  # noqa: BLE001 - the executor must outlive one bad task; logged with its cause
                logger.exception("claiming ServerApp tasks failed")
            self._stop.wait(self.poll_s)
