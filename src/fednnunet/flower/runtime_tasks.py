"""Taking Flower tasks ourselves from a Runtime API (a SuperNode or SuperLink started with ``--isolation process``).

Why: in its default isolation a Flower SuperNode installs and runs the ClientApp of whatever app (FAB) a run
carries, in a fresh process per message, and a SuperLink runs any submitted ServerApp. In ``--isolation process``
neither starts anything: an outside executor claims each task from the component's Runtime API
(``AcquireTask``, signed with the SuperExec auth secret that the component was started with) and then acts on it
with the task's token. FednnU-Net is that executor: the site worker handles its SuperNode's tasks in its own
process with its installed ClientApp (no process per message, no relay) and refuses runs of any other app; the
coordinator starts a ServerApp only for the run it submitted itself and fails every other run.

This module is the whole contract with Flower 1.41's Runtime API; every call goes through Flower's own client,
interceptors and (de)serialisation functions. ``tests/test_flower_contract.py`` fails loudly when an upgrade
changes it.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Iterator

import httpx
from flwr.app import Context, Message
from flwr.common.constant import SubStatus
from flwr.common.serde import run_from_proto
from flwr.proto.message_pb2 import PullObjectRequest, PullObjectResponse  # pylint: disable=no-name-in-module
from flwr.proto.runtime_pb2 import (  # pylint: disable=no-name-in-module
    AcquireTaskRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor,
                                         SuperExecAuthHttpInterceptor)
from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

if TYPE_CHECKING:
    from flwr.superlink.grid import HttpGrid

logger = logging.getLogger(__name__)

__all__ = ["ClaimedTask", "RuntimeTasks", "TaskType", "SubStatus"]

#: The only Runtime API method the SuperExec secret protects (Flower's own SuperExec signs the same one).
_ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"


def _client(address: str, interceptors: list, root_certificates: bytes | None) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=root_certificates is None, root_certificates=root_certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"), *interceptors],
        retry_invoker=_stale_connection_retries())


def _stale_connection_retries() -> RetryInvoker:
    """Send a request again when it met a connection the component had just closed.

    Why: the Runtime API's uvicorn drops a keep-alive connection after 5 s idle, and httpx reuses one for up to
    5 s, so a reply pushed right after a ~5 s epoch can find its connection closed ("Server disconnected without
    sending a response"). Flower's own ``flwr-clientapp`` retries these transport errors with
    ``make_simple_http_retry_invoker``, which however retries without end and interrupts its process on a 401;
    a long-lived worker needs the retry bounded (a SuperNode that is really gone must surface as an error).
    """
    return RetryInvoker(wait_gen_factory=lambda: exponential(base_delay=0.05, max_delay=1),
                        recoverable_exceptions=(httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError),
                        max_tries=3, max_time=10.0)


class RuntimeTasks:
    """Claims pending tasks of one Runtime API with the SuperExec auth secret (only its holder can claim)."""

    def __init__(self, address: str, secret: bytes, root_certificates: bytes | None = None) -> None:
        self.address = address
        self.root_certificates = root_certificates
        self._client = _client(address, [SuperExecAuthHttpInterceptor(
            master_secret=secret, protected_methods=frozenset({_ACQUIRE_METHOD}))], root_certificates)

    def acquire(self, task_type: TaskType) -> "ClaimedTask | None":
        """The oldest pending task of ``task_type`` (now claimed by us), or None when there is none."""
        res = self._client.AcquireTask(AcquireTaskRequest(supported_task_types=[task_type]))
        if not res.HasField("task") or not res.token:
            return None
        return ClaimedTask(res.task, res.token, self.address, self.root_certificates)

    def close(self) -> None:
        self._client.close()


#: A message whose objects stop arriving at the SuperNode for this long is given up (see _PromptPulls).
#: (Flower's SuperNode fetches ≤ 5 MiB chunks two at a time: 30 s without one is a link below ~3 Mbit/s, or none.)
PULL_STALL_S = 30.0
#: How often an object the SuperNode is still fetching is asked for again (see _PromptPulls).
PULL_POLL_S = 0.05


class _PromptPulls:
    """The Runtime API client as Flower's ``pull_task_input`` uses it, except for objects the SuperNode has not yet
    fetched from the SuperLink: they are asked for again every ``poll_s`` until they arrive, and one still missing
    ``stall_s`` seconds after the last object arrived is reported as not found, which ends Flower's pull.

    Why prompt: the SuperNode makes a task as soon as a message's metadata arrives and fetches its objects after
    that, so a worker that claims the task at once asks for objects that are on their way. Flower's own retry
    waits 1 s, then 2, 4 ... up to 10 s (its ClientApp process, started later, rarely meets that): a 124 MB model
    arriving in ~1 s at the SuperNode reached the worker 2-3.6 s after the task appeared.
    Why bounded: if the SuperLink dies mid-transfer (a coordinator restarted), the objects never arrive and
    Flower's pull would retry for up to two hours while the resumed run's tasks wait behind it. A pull that makes
    progress (a large model over a slow link) is not affected.
    """

    def __init__(self, client: RuntimeHttpClient, stall_s: float, poll_s: float = PULL_POLL_S) -> None:
        self._client = client
        self._stall_s = stall_s
        self._poll_s = poll_s
        self._last_progress = time.monotonic()

    def __getattr__(self, name: str) -> object:
        return getattr(self._client, name)

    def PullObject(self, request: PullObjectRequest) -> PullObjectResponse:  # noqa: N802 - Flower's method name
        while True:
            res = self._client.PullObject(request)
            now = time.monotonic()
            if not res.object_found:
                return res
            if res.object_available:
                self._last_progress = now
                return res
            if now - self._last_progress > self._stall_s:
                logger.warning("object %s of run %d unavailable for %.0f s: giving the message up",
                               request.object_id, request.run_id, now - self._last_progress)
                return PullObjectResponse(object_found=False, object_available=False)
            time.sleep(self._poll_s)


@lru_cache(maxsize=None)
def _prompt_grid_class() -> type["HttpGrid"]:
    """Flower's ``HttpGrid`` whose Runtime API client pulls objects as :class:`_PromptPulls` does.

    Why: a SuperNode sends a reply's message to the SuperLink first and its objects after it, so the server, which
    looks for replies every 0.1 s, meets a 124 MB reply whose objects are still arriving, and Flower's retry waits
    1 s, then 2 s, ... for them. Defined on first use: the SuperLink side's module is never imported at a site.
    """
    from flwr.superlink.grid import HttpGrid

    class PromptHttpGrid(HttpGrid):
        @property
        def _runtime_client(self) -> RuntimeHttpClient:  # Flower's own property, wrapped
            return _PromptPulls(super()._runtime_client, PULL_STALL_S)  # type: ignore[return-value]

    return PromptHttpGrid


@dataclass
class ClaimedTask:
    """One claimed task; its token authorises every further call about it (and is never logged)."""

    task: Task
    token: str
    address: str
    root_certificates: bytes | None = None

    def __post_init__(self) -> None:
        self._client = _client(self.address, [RuntimeTokenHttpInterceptor(self.token)], self.root_certificates)
        self.cancelled = False  # set when the component no longer knows the task (its run was stopped)

    @property
    def run_id(self) -> int:
        return int(self.task.run_id)

    @property
    def fab_hash(self) -> str:
        return str(self.task.fab_hash)

    def pull_input(self, stall_s: float = PULL_STALL_S) -> tuple[Message, Context, Run, Fab]:
        """A ClientApp task's message, context, run and FAB (data only: nothing of the FAB is installed or run).

        Raises ``ObjectPullError`` when none of the message's objects became available for ``stall_s`` seconds.
        """
        return pull_task_input(_PromptPulls(self._client, stall_s))

    def server_grid(self) -> "HttpGrid":
        """A ServerApp task's Grid (Flower's own, bound to this task's token and run) to message the nodes; it
        pulls the objects of a reply promptly (see :func:`_prompt_grid_class`)."""
        res = self._client.PullTaskInput(PullTaskInputRequest())
        # Flower stamps every new Message with the process's task identity (flwr-serverapp sets it the same way)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (res.task_id, res.run.run_id,
                                                                           res.context.node_id)
        run = run_from_proto(res.run)
        grid = _prompt_grid_class()(runtime_api_address=self.address, insecure=self.root_certificates is None,
                                    root_certificates=self.root_certificates, token=self.token)
        grid.set_run(run)
        return grid

    def reply(self, message: Message, context: Context) -> None:
        push_message(self._client, message, context)

    def finish(self, status: str, details: str = "", context: Context | None = None) -> None:
        """Mark the task completed/failed (``SubStatus``); a failure to report it is logged, not raised."""
        push_task_output(client=self._client, context=context, sub_status=status, details=details)

    @contextmanager
    def heartbeats(self) -> Iterator[None]:
        """Keep the task alive while it is handled (the component fails tasks whose heartbeats stop)."""
        sender = HeartbeatSender(self._heartbeat)
        sender.start()
        try:
            yield
        finally:
            sender.stop()

    def _heartbeat(self) -> bool:
        # Flower's own heartbeat function raises SIGINT in the process when the task is gone; a long-lived
        # executor only notes it (the reply is then refused and logged by the component).
        try:
            res = self._client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False
        if not res.success and not self.cancelled:
            logger.warning("task %d of run %d is no longer known to %s (run stopped?)", self.task.task_id,
                           self.run_id, self.address)
            self.cancelled = True
        return True

    def close(self) -> None:
        self._client.close()
