"""Flower ClientApp: relays each message to this site's worker process (see fednnunet.site.worker).

The SuperNode's node config names the worker's socket: ``--node-config 'site-socket="/path/site.sock"'``.
Kept free of torch and nnU-Net imports so that the per-message process starts fast.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fednnunet.array_layout import LayoutError
from fednnunet.flower.messages import from_record, to_record
from fednnunet.site import ipc

app = ClientApp()

#: How long a message waits for a site worker that is still starting (its SuperNode may connect first).
WORKER_START_WAIT_S = 60.0


def _relay(msg: Message, context: Context) -> Message:
    socket_path = str(context.node_config.get("site-socket", ""))
    if not socket_path:
        reply = {"ok": False, "error": "this SuperNode has no 'site-socket' in its --node-config"}
        return Message(to_record(reply), reply_to=msg)
    try:
        body, arrays = from_record(msg.content)
    except LayoutError as err:
        return Message(to_record({"ok": False, "error": f"malformed message from the server: {err}"}), reply_to=msg)
    try:
        reply, out = ipc.request(socket_path, body, arrays, connect_wait_s=WORKER_START_WAIT_S)
    except (OSError, LayoutError) as err:
        reply, out = {"ok": False, "error": f"site worker at {socket_path} unreachable: {err}"}, {}
    return Message(to_record(reply, out), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _relay(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _relay(msg, context)
