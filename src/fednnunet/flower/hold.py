"""Hold messages: keeping a site's SuperNode from sleeping while the server prepares its next message.

Flower 1.41's SuperNode asks the SuperLink for a message right after it has sent a reply; when there is none (the
server is still aggregating and uploading the next model) it sleeps a fixed 3 s before it asks again. Every
exchange therefore waits up to 3 s for nothing. So with every message the server also queues a small *hold*
message right behind it: the SuperNode takes the hold as soon as it has sent the reply and waits for its answer,
and the site answers it only when the server's next message should be there, ``hold_s`` after the hold reached
the SuperNode. ``hold_s`` is what the server took last time between this site's reply and its next message, plus
a margin, and never more than :data:`MAX_HOLD_S`: a hold that ends too early costs the 3 s sleep it tried to
avoid, one that ends too late at most the margin; longer holds would be no better than the sleep.
Nothing else changes: holds carry no content, their answers are discarded, and a site answers them itself, in its
message loop (:mod:`fednnunet.site.serve`).
"""

from __future__ import annotations

import time
from typing import Iterable

from flwr.app import Message

from fednnunet.flower.messages import to_record

#: Flower message type of a hold (a query with its own action, so that no ClientApp function answers it).
HOLD_MESSAGE_TYPE = "query.hold"
MAX_HOLD_S = 2.5
MARGIN_S = 0.3
#: The server's turnaround before it has measured one for a site.
DEFAULT_TURNAROUND_S = 0.5


class Holds:
    """The server side: one hold per message, sized by the last measured turnaround for its node."""

    def __init__(self) -> None:
        self.turnaround: dict[int, float] = {}
        self._replied_at: dict[int, float] = {}
        self.outstanding: list[str] = []  # ids of holds whose (discarded) answers are still to be pulled

    def hold_s(self, node: int) -> float:
        return min(MAX_HOLD_S, self.turnaround.get(node, DEFAULT_TURNAROUND_S) + MARGIN_S)

    def messages(self, nodes: Iterable[int]) -> list[Message]:
        return [Message(to_record({"hold_s": self.hold_s(n)}), dst_node_id=n, message_type=HOLD_MESSAGE_TYPE)
                for n in nodes]

    def pushed(self, nodes: Iterable[int], at: float) -> None:
        """The next messages for ``nodes`` were pushed at ``at``: each node's turnaround since its last reply."""
        for node in nodes:
            if (replied := self._replied_at.pop(node, None)) is not None:
                self.turnaround[node] = at - replied

    def replied(self, node: int, at: float) -> None:
        self._replied_at[node] = at


def hold_remaining(hold_s: float, arrived_at: float) -> float:
    """Seconds a site still holds a hold that reached its SuperNode at ``arrived_at`` (wall clock)."""
    return max(0.0, min(float(hold_s), MAX_HOLD_S) - (time.time() - arrived_at))
