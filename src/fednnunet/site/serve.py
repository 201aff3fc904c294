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

A site is never lost silently. A SuperNode that could not join at the worker's start (refused key, TLS failure,
server unreachable within ``--connect-timeout``) ends the worker with the reason. One that joined and is lost later
(it gave up reconnecting after ``--connect-timeout``, or exited: a long outage, a coordinator restart that takes a
while) is restarted with backoff (:class:`_Rejoin`), with the same Runtime API port and secret, while the worker
and its trainer stay; each loss, restart and rejoin is a line on the terminal and in the log. After
``--rejoin-for`` seconds without rejoining the worker ends with the reason.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
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
#: How long a site tries to rejoin after its SuperNode was lost (``fednnunet client --rejoin-for``).
REJOIN_FOR_S = 3600.0
#: Wait before the first restart of a lost SuperNode; it doubles with every try, up to REJOIN_MAX_WAIT_S. Each
#: restarted SuperNode itself tries to reach the server for --connect-timeout seconds.
REJOIN_FIRST_WAIT_S = 5.0
REJOIN_MAX_WAIT_S = 60.0
#: Seconds between looks at the SuperNode's log for a give-up (an exit is seen at every poll).
CHECK_S = 1.0


class SuperNodeExited(RuntimeError):
    """The site's SuperNode ended (refused by the server, server unreachable, ...); the message says why."""


def run_site(worker: SiteWorker, spec: SuperNodeSpec, logs: Path, runtime_port: int | None = None,
             rejoin_for_s: float = REJOIN_FOR_S, notify: Callable[[str], None] | None = None) -> None:
    """Start this site's SuperNode and answer its tasks until the job releases the worker; the SuperNode is
    stopped with it. A SuperNode lost after it joined is restarted (see :class:`_Rejoin`; ``notify`` gets a line
    for a person each time). Raises SuperNodeExited when it could not join at the start, or did not rejoin
    within ``rejoin_for_s``."""
    worker.warm_up()
    supernode = SuperNodeProcess(spec, Path(logs) / f"supernode-{worker.site}.log", runtime_port).start()
    try:
        serve(worker, supernode, rejoin_for_s=rejoin_for_s, notify=notify)
        # the SuperNode sends a pushed reply within its 0.5 s check for replies; give the last one time to leave
        time.sleep(RELEASE_GRACE_S)
    finally:
        supernode.stop()


def serve(worker: SiteWorker, supernode: SuperNodeProcess, poll_s: float = POLL_S,
          rejoin_for_s: float = REJOIN_FOR_S, notify: Callable[[str], None] | None = None) -> None:
    """Claim and answer this site's tasks until the server's job releases the worker (or it is terminated)."""
    tasks = RuntimeTasks(supernode.runtime_address, supernode.secret)
    app = make_client_app(worker.handle)
    logger.info("site %s (dataset %s) takes its tasks from the SuperNode at %s", worker.site, worker.dataset,
                supernode.runtime_address)
    keeper = _Rejoin(worker.site, supernode, rejoin_for_s, notify)
    try:
        while not worker.exit_requested:
            if not keeper.serving():
                time.sleep(0.2)
                continue
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


def _clock(monotonic_s: float) -> str:
    """A monotonic time as the wall-clock time of day, for a person."""
    return datetime.fromtimestamp(time.time() + monotonic_s - time.monotonic()).strftime("%H:%M:%S")


class _Rejoin:
    """Watches the site's SuperNode; restarts it when it is lost after it joined, until it rejoins or the bound.

    :meth:`serving` is called before every claim: True while the SuperNode runs (or may: a give-up is only acted on
    when seen twice, a second apart), False while a restart is pending; it raises SuperNodeExited when the node
    could not join at the start (refused key, TLS, unreachable: the existing errors) or did not rejoin within
    ``rejoin_for_s`` of its loss.
    """

    def __init__(self, site: str, supernode: SuperNodeProcess, rejoin_for_s: float,
                 notify: Callable[[str], None] | None) -> None:
        self.site, self.supernode, self.rejoin_for_s, self._notify = site, supernode, rejoin_for_s, notify
        self.started = time.monotonic()
        self.lost_at: float | None = None  # when the current outage was noticed
        self.tries = 0  # restarts in the current outage
        self.restart_at: float | None = None
        self.suspect_since: float | None = None  # a give-up line seen, not yet confirmed
        self.next_check = 0.0

    def say(self, line: str) -> None:
        logger.warning(line)
        if self._notify is not None:
            self._notify(line)

    def serving(self) -> bool:
        now, node = time.monotonic(), self.supernode
        deadline = None if self.lost_at is None else self.lost_at + self.rejoin_for_s
        if self.restart_at is not None:  # a restart is due
            if now < self.restart_at:
                return False
            self.restart_at = None
            node.restart()
            return False
        code = node.exit_code()
        if code is None and now < self.next_check:
            return True
        self.next_check = now + CHECK_S
        if code is None:
            if self.lost_at is not None and node.joined():
                self.say(f"site {self.site}: rejoined the server {node.spec.superlink} at {_clock(now)}, "
                         f"{now - self.lost_at:.0f} s after its SuperNode was lost ({self.tries} restart(s))")
                self.lost_at, self.tries, deadline = None, 0, None
            if deadline is not None and now >= deadline:  # the restarted node is still trying: the bound is hit
                self._give_up(f"its SuperNode did not reach the server: {node.cause() or 'still trying'}")
            if not node.gave_up():
                self.suspect_since = None
                return True
            if self.suspect_since is None:
                self.suspect_since = now
                return True
            what = node.lost() or "its SuperNode gave up reaching the server"
            node.halt()
        else:
            what = f"its SuperNode exited (code {code})"
        self.suspect_since = None
        if not node.joined_once and not node.joined():
            # it never joined: refused, TLS, unreachable at the start; end the worker with the reason, except a
            # client restarted right after it was killed (the server still counts the old one as online)
            wait_s = min(ACTIVATION_WAIT_S, node.spec.max_wait_s or ACTIVATION_WAIT_S)
            if node.activation_refused() and now - self.started < wait_s:
                logger.warning("site %s: the server did not let this site in (yet); trying again", self.site)
                self.restart_at = now + ACTIVATION_RETRY_S
                return False
            raise SuperNodeExited(f"site {self.site}: lost the server {node.spec.superlink} ({what}): "
                                  f"{node.reason()}")
        cause = node.cause()
        what = f"{what}: {cause}" if cause and cause not in what else what
        if self.lost_at is None:
            self.lost_at, self.tries = now, 0
            deadline = now + self.rejoin_for_s
        wait = min(REJOIN_MAX_WAIT_S, REJOIN_FIRST_WAIT_S * 2 ** self.tries)
        if now + wait >= deadline:
            self._give_up(what)
        self.tries += 1
        self.restart_at = now + wait
        self.say(f"site {self.site}: {what} at {_clock(now)}; restarting it at {_clock(self.restart_at)} (in "
                 f"{wait:.0f} s, try {self.tries}); this site stops at {_clock(deadline)} if it has not rejoined "
                 f"by then (--rejoin-for {self.rejoin_for_s:.0f} s)")
        return False

    def _give_up(self, what: str) -> None:
        node = self.supernode
        line = (f"site {self.site}: could not rejoin the server {node.spec.superlink} within --rejoin-for "
                f"{self.rejoin_for_s:.0f} s ({self.tries} restart(s)); last: {what}")
        logger.error("%s; last SuperNode log lines:\n%s", line, node.reason())
        raise SuperNodeExited(f"{line}; {node.reason()}")


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
