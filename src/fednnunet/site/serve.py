"""The site worker's message loop: it takes its SuperNode's tasks itself and answers them in its own process.

The SuperNode runs with ``--isolation process`` and ``--superexec-auth-secret-file``: it starts no ClientApp
process and only the holder of the secret (this worker; the file is readable by the site's user only) can claim a
task, so no other local user can take the global model or answer in the site's name. For every task the worker
checks the run's app against the FAB of its own installed version (:func:`fednnunet.flower.app_bundle.refusal`):
any other app, or another version, gets an error reply and a line in this log naming the run and the app, and
nothing of it is installed or run. Messages of the federation's own app go to the installed ClientApp, called
here, which hands them to :class:`~fednnunet.site.worker.SiteWorker`.

Work a reply does not need (a checkpoint write, sampling ahead) runs after the reply is pushed and before the next
task is claimed: off the critical path, and never overlapping the state it uses.
"""

from __future__ import annotations

import logging
import time
import traceback
from datetime import datetime
from pathlib import Path

import httpx
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from fednnunet.array_layout import LayoutError
from fednnunet.flower.app_bundle import refusal
from fednnunet.flower.client_app import make_client_app
from fednnunet.flower.hold import HOLD_MESSAGE_TYPE, hold_remaining
from fednnunet.flower.messages import from_record, to_record
from fednnunet.flower.runtime_tasks import ClaimedTask, RuntimeTasks, SubStatus, TaskType
from fednnunet.site.supernode import SuperNodeProcess, SuperNodeSpec
from fednnunet.site.worker import SiteWorker

logger = logging.getLogger(__name__)

#: Seconds the SuperNode is kept after the job released the worker, so that its reply to the release reaches the
#: server (Flower's SuperNode looks for pushed replies every 0.5 s; there is no API to ask whether one has left).
RELEASE_GRACE_S = 3.0
#: How long a refused activation is tried again after the worker started: Flower counts a node as online until it
#: missed two 30 s heartbeats, so a client restarted right after it was killed is let in within about a minute
#: (never longer than the client's --connect-timeout).
ACTIVATION_WAIT_S = 80.0
ACTIVATION_RETRY_S = 5.0
#: Seconds between claims while no task is pending. A claim is one local HTTP request; the SuperNode itself only
#: asks the server every 3 s when idle, so this adds at most this much to a message's latency.
POLL_S = 0.05


class SuperNodeExited(RuntimeError):
    """The site's SuperNode ended (refused by the server, server unreachable, ...); the message says why."""


def run_site(worker: SiteWorker, spec: SuperNodeSpec, logs: Path, runtime_port: int | None = None) -> None:
    """Start this site's SuperNode and answer its tasks until the job releases the worker; the SuperNode is
    stopped with it. Raises SuperNodeExited when the SuperNode ends first."""
    worker.warm_up()
    supernode = SuperNodeProcess(spec, Path(logs) / f"supernode-{worker.site}.log", runtime_port).start()
    try:
        serve(worker, supernode)
        # the SuperNode sends a pushed reply within its 0.5 s check for replies; give the last one time to leave
        time.sleep(RELEASE_GRACE_S)
    finally:
        supernode.stop()


def serve(worker: SiteWorker, supernode: SuperNodeProcess, poll_s: float = POLL_S) -> None:
    """Claim and answer this site's tasks until the server's job releases the worker (or it is terminated)."""
    tasks = RuntimeTasks(supernode.runtime_address, supernode.secret)
    app = make_client_app(worker.handle)
    logger.info("site %s (dataset %s) takes its tasks from the SuperNode at %s", worker.site, worker.dataset,
                supernode.runtime_address)
    started = time.monotonic()
    try:
        while not worker.exit_requested:
            if (code := supernode.exit_code()) is not None:
                wait_s = min(ACTIVATION_WAIT_S, supernode.spec.max_wait_s or ACTIVATION_WAIT_S)
                if supernode.activation_refused() and time.monotonic() - started < wait_s:
                    # a client restarted right after it was killed: the server still counts the old one as online
                    logger.warning("site %s: the server did not let this site in (yet); trying again", worker.site)
                    time.sleep(ACTIVATION_RETRY_S)
                    supernode.restart()
                    continue
                raise SuperNodeExited(f"site {worker.site}: lost the server {supernode.spec.superlink} (SuperNode "
                                      f"exited with code {code}): {supernode.reason()}")
            try:
                claimed = tasks.acquire(TaskType.CLIENT_APP)
            except httpx.TransportError:  # the SuperNode is still starting (or has just ended: checked above)
                time.sleep(max(poll_s, 0.2))
                continue
            if claimed is None:
                time.sleep(poll_s)
                continue
            try:
                _answer(claimed, app, worker.site)
            finally:
                claimed.close()
            worker.run_after_reply()
    finally:
        tasks.close()


def _hold_s(message: Message, claimed: ClaimedTask) -> float:
    """How much longer to hold a hold (see :mod:`fednnunet.flower.hold`): from when it reached the SuperNode."""
    try:
        body, _ = from_record(message.content)
        arrived = datetime.fromisoformat(claimed.task.pending_at).timestamp()
        return hold_remaining(float(body.get("hold_s", 0.0)), arrived)
    except (LayoutError, ValueError, TypeError):
        return 0.0


def _answer(claimed: ClaimedTask, app, site: str) -> None:  # noqa: ANN001 - a flwr ClientApp
    """Answer one task: refuse a foreign app, else let the installed ClientApp answer. A reply that cannot be
    pushed leaves the task unfinished, so that the SuperNode answers the server with an error once its token
    expires (a finished task without a reply would leave the SuperNode waiting)."""
    started = time.perf_counter()
    with claimed.heartbeats():
        try:
            message, context, run, fab = claimed.pull_input()
        except Exception as err:  # noqa: BLE001 - the server lost: this task fails, the site serves the next one
            logger.error("site %s: could not take the message of run %d (%s: %s); its task is failed", site,
                         claimed.run_id, type(err).__name__, err)
            claimed.finish(SubStatus.FAILED, f"message not received: {err}")
            return
        pulled = time.perf_counter()
        reason = refusal(run.fab_id, run.fab_version, run.fab_hash, fab.content)
        if reason is not None:
            logger.error("site %s: refused run %d: %s; nothing of it was installed or run", site, run.run_id, reason)
            reply = Message(Error(ErrorCode.INVALID_FAB, f"site {site} refused run {run.run_id}: {reason}"),
                            reply_to=message)
            status, details = SubStatus.FAILED, reason
        elif message.metadata.message_type == HOLD_MESSAGE_TYPE:
            time.sleep(_hold_s(message, claimed))
            reply, status, details = Message(to_record({"ok": True, "result": {}}), reply_to=message), \
                SubStatus.COMPLETED, ""
        else:
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        del message
        handled = time.perf_counter()
        try:
            claimed.reply(reply, context)
        except Exception:  # noqa: BLE001 - logged; the unfinished task expires into an error reply
            logger.error("site %s: could not push the reply for run %d:\n%s", site, run.run_id,
                         traceback.format_exc())
            return
        claimed.finish(status, details, context)
    logger.info("site %s: task of run %d: message pulled in %.2f s, handled in %.2f s, reply pushed in %.2f s",
                site, run.run_id, pulled - started, handled - pulled, time.perf_counter() - handled)
