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
    """An interrupted coordinator ends its run's requests by limiting the Grid's retries (launch._abandon), as
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
    from fednnunet.launch import ServerNode, Site, SiteNode

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
        [(result, _)] = caller.broadcast("job_done", {}).values()
        assert result["site"] == "901" and result["exiting"] is False  # a one-machine site stays for the next job


def test_a_message_whose_objects_stop_arriving_is_given_up() -> None:
    """A SuperNode that can no longer fetch a message's objects (its SuperLink died mid-transfer) must not keep the
    site pulling for Flower's two hours: after the stall bound the object reads as not found, which ends Flower's
    pull with ObjectPullError; objects that keep arriving reset the bound."""
    import time

    from flwr.proto.message_pb2 import PullObjectRequest, PullObjectResponse
    from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError
    from flwr.proto.node_pb2 import Node

    from fednnunet.flower.runtime_tasks import _StallBoundedPulls

    class SuperNode:  # answers "found, not yet available" except for the object named "ready"
        def PullObject(self, request: PullObjectRequest) -> PullObjectResponse:  # noqa: N802
            ready = request.object_id == "ready"
            return PullObjectResponse(object_found=True, object_available=ready, object_content=b"x" * ready)

    pulls = _StallBoundedPulls(SuperNode(), stall_s=0.2)
    pull = make_pull_object_fn_protobuf(pulls.PullObject, Node(node_id=1), 7)
    with pytest.raises(ObjectUnavailableError):
        pull("late")  # within the bound: Flower retries
    time.sleep(0.25)
    assert pull("ready") == b"x"  # progress resets the bound
    with pytest.raises(ObjectUnavailableError):
        pull("late")
    time.sleep(0.25)
    with pytest.raises(ObjectPullError):
        pull("late")
