"""The contract with Flower 1.41 that the site worker and the coordinator rely on (fednnunet.flower.runtime_tasks):
a SuperNode and a SuperLink in ``--isolation process`` whose Runtime API hands tasks only to the holder of the
SuperExec secret, tasks carrying the run's FAB hash, and Flower's own client functions to take a task's message
and answer it. If a Flower upgrade changes any of it, this test says so before anything else breaks."""

from __future__ import annotations

import httpx
import pytest

from conftest import nnunet_env, own_run


def test_flower_version_is_the_one_the_contract_was_checked_with() -> None:
    import flwr

    assert flwr.__version__.startswith("1.41."), (
        f"Flower {flwr.__version__}: fednnunet takes tasks from Flower's Runtime API itself (runtime_tasks.py), "
        "checked against Flower 1.41; re-check that contract (this file) before allowing another version")


def test_a_grid_can_be_told_to_stop_retrying() -> None:
    """An interrupted coordinator ends its run's requests by limiting the Grid's retries (server_node._abandon), as
    Flower's own flwr-clientapp does on exit; without it the interpreter waits forever on retrying threads."""
    from flwr.superlink.grid import HttpGrid
    from flwr.supercore.retry.retry_invoker import RetryInvoker

    grid = HttpGrid(runtime_api_address="127.0.0.1:9", insecure=True, token="t")
    assert isinstance(grid._retry_invoker, RetryInvoker) and hasattr(grid._retry_invoker, "max_tries")


def test_only_the_secret_holder_takes_tasks_and_the_installed_app_answers(tmp_path) -> None:  # noqa: ANN001
    from flwr.proto.runtime_pb2 import PushTaskOutputRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    from fednnunet.flower.app_bundle import expected_app
    from fednnunet.flower.runtime_tasks import RuntimeTasks, TaskType
    from fednnunet.flower.site_caller import FlowerSiteCaller
    from fednnunet.protocol.messages import JobDone
    from fednnunet.federation.local import Site, SiteNode
    from fednnunet.federation.server_node import ServerNode

    with ServerNode(tmp_path / "server") as server, own_run(server) as grid, \
            SiteNode(tmp_path / "site", Site("901", "901"), server.site_address, nnunet_env(tmp_path)) as node:
        node.wait_ready()
        caller = FlowerSiteCaller(grid)
        caller.wait_for_nodes(1, 120)
        # another local user, without the secret: can neither claim a task (the global model) nor answer one
        for address, kind in ((f"127.0.0.1:{node.runtime_port}", TaskType.CLIENT_APP),
                              (f"127.0.0.1:{server.port}", TaskType.SERVER_APP)):
            with pytest.raises(httpx.HTTPStatusError, match="401|403"):
                RuntimeTasks(address, b"not the secret").acquire(kind)
            forger = RuntimeHttpClient.from_server_address(address, insecure=True, root_certificates=None,
                                                           interceptors=[RuntimeTokenHttpInterceptor("forged")])
            with pytest.raises(httpx.HTTPStatusError, match="401|403"):
                forger.PushTaskOutput(PushTaskOutputRequest(sub_status="completed"))
        # the worker took the task itself, checked that the run's FAB hash is its own app's, and answered
        assert grid.run.fab_hash == expected_app().fab_hash
        [(result, _)] = caller.broadcast(JobDone()).values()
        assert result.site == "901" and result.exiting is False  # a one-machine site stays for the next job


def test_a_run_executed_here_that_ends_without_a_result_fails_at_once(tmp_path) -> None:  # noqa: ANN001
    """The coordinator knows when the work of its own run ended, so it needs no `flwr ls` process (0.5-2 s of
    CPU each, taken from the sites on a one-machine federation) to notice one that left no result.json: the
    error names the run and says how its work ended, well before the first `flwr ls` check would run."""
    from fednnunet.flower.app_bundle import app_dir
    from fednnunet.federation.server_node import RUN_STATUS_CHECK_S, FederationError, ServerNode

    with ServerNode(tmp_path / "server") as server:
        run_id = server.submit_app(app_dir(server.workdir), 'job-file=""', lambda grid: None)
        with pytest.raises(FederationError, match=rf"run {run_id} ended \(completed\) without a result"):
            server.follow(run_id, tmp_path / "out", timeout_s=RUN_STATUS_CHECK_S - 5, check=lambda: None)


def test_objects_on_their_way_are_pulled_promptly_and_a_stalled_message_is_given_up() -> None:
    """The site claims a task as soon as its SuperNode knows the message, while the objects are still on their way:
    they must reach the site as soon as they arrive (Flower's own retry would wait 1 s, then 2 s, ...). A SuperNode
    that can no longer fetch them (its SuperLink died mid-transfer) must not keep the site pulling for Flower's
    two hours: after the stall bound the object reads as not found, which ends Flower's pull with ObjectPullError."""
    import time
    from collections import Counter

    from flwr.proto.message_pb2 import PullObjectRequest, PullObjectResponse
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError, pull_objects

    from fednnunet.flower.runtime_tasks import _PromptPulls

    class SuperNode:  # "late" arrives at the 5th request, "never" never does
        calls: Counter = Counter()

        def PullObject(self, request: PullObjectRequest) -> PullObjectResponse:  # noqa: N802
            self.calls[request.object_id] += 1
            ready = request.object_id == "ready" or (request.object_id == "late" and self.calls["late"] >= 5)
            return PullObjectResponse(object_found=True, object_available=ready, object_content=b"x" * ready)

    node = SuperNode()
    pulls = _PromptPulls(node, stall_s=0.5, poll_s=0.02)
    flower_pull = make_pull_object_fn_protobuf(pulls.PullObject, Node(node_id=1), 7)
    backoffs = []

    def pull(object_id: str) -> bytes:  # Flower's pull function, noting each time Flower's own backoff would start
        try:
            return flower_pull(object_id)
        except ObjectUnavailableError:
            backoffs.append(object_id)
            raise

    assert pull_objects(["ready", "late"], pull) == {"ready": b"x", "late": b"x"}  # Flower's own pull loop
    assert node.calls["late"] == 5 and backoffs == []  # asked again at once, never left to Flower's 1-10 s retry
    started = time.monotonic()
    with pytest.raises(ObjectPullError):
        pull_objects(["never"], pull)
    assert time.monotonic() - started >= 0.5 and backoffs == []  # given up after the stall bound, not before


def test_the_server_grid_pulls_reply_objects_promptly() -> None:
    """A SuperNode sends a reply's message before its objects: the server's Grid must pull them as the site does
    (_PromptPulls), which works only while Flower's HttpGrid pulls objects through its ``_runtime_client``."""
    import inspect

    from flwr.superlink.grid import HttpGrid

    from fednnunet.flower.runtime_tasks import _prompt_grid_class, _PromptPulls

    assert "self._runtime_client.PullObject" in inspect.getsource(HttpGrid.pull_messages)
    grid = _prompt_grid_class()(runtime_api_address="127.0.0.1:9", insecure=True, token="t")
    try:
        assert isinstance(grid, HttpGrid) and isinstance(grid._runtime_client, _PromptPulls)
    finally:
        grid._disconnect()
