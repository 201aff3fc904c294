"""The engine's floor under a round's overhead: the same Flower deployment and bytes, with no work at all.

A ServerApp sends each of K SuperNodes one packed buffer the size of the round's download (as the training server
sends the model) and the ClientApp answers at once with a buffer of the same size and new content (as a site
answers with its update; the same content would let Flower skip the upload, because it addresses objects by their
hash). The server gathers the replies with the training server's own :class:`FlowerSiteCaller` (0.1 s polling)
and every round sends new content. What a round takes here is what Flower 1.41 itself costs on this machine for
one download and one upload per site: SuperNode polling, a ClientApp process per message (started by Flower's
SuperExec, which looks for new messages every ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, here 0.25 s instead of its
default 1 s, to make the floor no slower than Flower can be) and the object transfers. ``fednnunet bench
overhead`` measures it in the same run as the federation's overhead.
"""

from __future__ import annotations

import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fednnunet.atomic_files import write_json_atomic
from fednnunet.federation.runner import RESULT_FILE
from fednnunet.federation.server_node import ServerNode
from fednnunet.flower.messages import from_record, to_record
from fednnunet.flower.site_caller import FlowerSiteCaller
from fednnunet.protocol.envelope import ok_body
from fednnunet.protocol.messages import Echo, EchoReply

server = ServerApp()
client = ClientApp()

#: Flower 1.41's SuperExec polling interval for new tasks (environment variable) and the floor's value.
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_S = "0.25"


class StockServerNode(ServerNode):
    """A ServerNode whose SuperLink runs every submitted ServerApp itself (Flower's own SuperExec), as stock Flower
    does: the floor of bare Flower here, and a compromised coordinator in tests/test_isolation.py. It claims no
    run; its runs are followed (:meth:`ServerNode.follow`) like any other."""

    def _execution(self) -> tuple[list[str], Path | None]:
        return [], None


@client.query()
def echo(msg: Message, context: Context) -> Message:
    _, arrays = from_record(msg.content)
    reply = {name: array + 1 for name, array in arrays.items()}  # as many bytes, new content
    return Message(to_record(ok_body(EchoReply(site=str(context.node_id))), reply), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    out = Path(str(config["out-dir"]))
    try:
        caller = FlowerSiteCaller(grid, holds=False)  # bare Flower: the stock ClientApp answers every message
        caller.wait_for_nodes(int(config["sites"]), 120)
        payload = np.zeros(int(config["payload-bytes"]), np.uint8)
        times = []
        for round_ in range(int(config["rounds"]) + 1):  # round 0 warms up (a node's first ClientApp installs the app)
            payload += 1
            started = time.perf_counter()
            caller.broadcast(Echo(), {"model": payload})
            if round_:
                times.append(time.perf_counter() - started)
        result: dict[str, Any] = {"ok": True, "round_s": times}
    except Exception as err:  # noqa: BLE001 - the launcher reads the reason from the result file
        result = {"ok": False, "error": f"{type(err).__name__}: {err}\n{traceback.format_exc()}"}
    write_json_atomic(out / RESULT_FILE, result)


def bench_flower_floor(sites: int, rounds: int, payload_bytes: int, work: Path) -> dict[str, Any]:
    """Start a SuperLink and ``sites`` SuperNodes on loopback, run the echo app; round times and their median."""
    from fednnunet.flower.app_bundle import app_dir
    from fednnunet.processes import ProcessGroup
    from fednnunet.site.supernode import supernode_command

    work = Path(work).resolve()
    out = work / "run"
    nodes = ProcessGroup(work, {SUPEREXEC_POLL_ENV: SUPEREXEC_POLL_S})
    superlink = StockServerNode(work)
    superlink.extra_env[SUPEREXEC_POLL_ENV] = SUPEREXEC_POLL_S  # its SuperExec starts the ServerApp
    with superlink:
        try:
            for i in range(sites):
                nodes.start_process(f"supernode-{i}", supernode_command(superlink.site_address),
                                    nodes.env(f"node-{i}"))

            def check() -> None:
                superlink.check_alive()
                nodes.check_alive()

            run_config = f'out-dir="{out}" sites={sites} rounds={rounds} payload-bytes={int(payload_bytes)}'
            result = superlink.follow(superlink.submit_app(app_dir(work, "echo_app"), run_config), out, 1800, check)
        finally:
            nodes.stop()
    return {"round_s": result["round_s"], "round_s_median": statistics.median(result["round_s"]),
            "payload_bytes": int(payload_bytes), "sites": sites}
