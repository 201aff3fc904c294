"""Flower ClientApp of the federation. It runs inside the site worker, never in a process of its own.

A site's SuperNode runs with ``--isolation process``: Flower starts no ClientApp for it; the site worker claims
each task from the SuperNode and calls :func:`make_client_app` 's app in its own process (see
:mod:`fednnunet.site.serve`), which turns the message into one worker operation. The module-level ``app`` is what
the Flower App definition names; it has no worker, so wherever Flower itself loads it (a SuperNode left in its
default isolation) it refuses every message with the reason.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fednnunet.array_layout import LayoutError
from fednnunet.flower.messages import from_record, to_record
from fednnunet.protocol.envelope import error_body
from fednnunet.protocol.errors import ErrorKind

#: One worker operation: (body, arrays) of the server's message -> (reply body, reply arrays).
Handler = Callable[[dict[str, Any], dict[str, np.ndarray]], tuple[dict[str, Any], dict[str, np.ndarray]]]

NO_WORKER = ("fednnunet's ClientApp runs only inside the fednnunet site worker, beside a SuperNode started with "
             "--isolation process (use `fednnunet client`)")


def make_client_app(handler: Handler | None) -> ClientApp:
    """A ClientApp whose query and train messages go to ``handler`` (None: refuse every message)."""
    app = ClientApp()

    def handle(msg: Message, context: Context) -> Message:
        if handler is None:
            return Message(to_record(error_body(ErrorKind.REFUSED_APP, NO_WORKER)), reply_to=msg)
        try:
            body, arrays = from_record(msg.content)
        except LayoutError as err:
            return Message(to_record(error_body(ErrorKind.BAD_REQUEST, f"malformed message from the server: {err}")),
                           reply_to=msg)
        # the message now lives on in ``arrays`` only, which the operation may release once it has loaded them
        msg.content = RecordDict()
        reply, out = handler(body, arrays)
        del arrays, body
        return Message(to_record(reply, out), reply_to=msg)

    app.query()(handle)
    app.train()(handle)
    return app


app = make_client_app(None)
