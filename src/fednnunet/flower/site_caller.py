"""A :class:`~fednnunet.protocol.caller.SiteCaller` over a Flower Grid.

Why not ``grid.send_and_receive``: it sleeps 3 s between pulls, which adds up to seconds per round; here replies
are pulled every ``poll_s`` (0.1 s by default; every :data:`IDLE_POLL_S` while no reply can be expected yet, see
``try_call``'s ``expected_s``, and further apart the longer a reply of unknown duration takes: each pull is a
request that the SuperLink and this process serve on the cores the sites train on). Replies are matched by
``reply_to_message_id`` (the source id of SuperLink-generated error replies is not the node's).

Who a reply is from: with registered site keys (``fednnunet server --tls-dir``) a node IS the site its key is
named for (``registered``); every message tells the site that name, and a reply that claims another is refused.
Only without keys (one machine, or ``--insecure``) does a node's first reply name its site.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import numpy as np
from flwr.app import Message
from flwr.common.constant import ErrorCode

from fednnunet.array_layout import LayoutError
from fednnunet.flower.hold import Holds
from fednnunet.flower.messages import PackedArrays, from_record, record_nbytes, to_record
from fednnunet.protocol.caller import OnReply, SiteFailure, SiteReply, TrafficCounter
from fednnunet.protocol.envelope import read_reply, request_body
from fednnunet.protocol.errors import ErrorKind, SiteError
from fednnunet.protocol.messages import Request

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
#: Seconds between pulls while no reply is expected yet.
IDLE_POLL_S = 1.0
#: While nothing says when a reply is due (``expected_s`` unknown: the first round), the pulls are spaced by this
#: share of the time waited so far (from ``poll_s`` up to IDLE_POLL_S): a reply waits at most 2 % longer, and a
#: 30 s first epoch takes about 140 pulls instead of 300 (served on the cores the sites train on).
UNKNOWN_WAIT_SHARE = 0.02
#: The kind of a Flower error reply (a SuperLink's or SuperNode's, not the site's own)
_FLOWER_ERROR_KINDS = {ErrorCode.NODE_UNAVAILABLE: ErrorKind.NODE_UNAVAILABLE, ErrorCode.INVALID_FAB: ErrorKind.REFUSED_APP}


class FlowerSiteCaller:
    """Send operations to the sites connected to a Flower SuperLink and gather their replies."""

    def __init__(self, grid: Any, *, timeout_s: float = 3600.0, poll_s: float = 0.1,
                 message_type: str = "query", holds: bool = True, registered: Mapping[int, str] | None = None
                 ) -> None:
        """``holds``: queue a hold behind every message (see :mod:`fednnunet.flower.hold`); only for sites that
        answer holds, i.e. fednnunet site workers. ``registered``: node id -> site name of the registered keys."""
        self.grid = grid
        self.registered = dict(registered or {})
        self.holds = Holds() if holds else None
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.message_type = message_type
        self.node_of: dict[str, int] = {}
        self.traffic = TrafficCounter()
        #: site -> (time pushed, time its reply was pulled), wall clock, of the latest exchange with the site
        self.exchange_times: dict[str, tuple[float, float]] = {}

    @property
    def sites(self) -> list[str]:
        return list(self.node_of)

    def wait_for_nodes(self, expected: int, timeout_s: float) -> list[int]:
        """Block until ``expected`` SuperNodes are connected."""
        deadline = time.monotonic() + timeout_s
        while True:
            nodes = sorted(n for n in self.grid.get_node_ids() if not self.registered or n in self.registered)
            if len(nodes) >= expected:
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of {expected} sites connected within {timeout_s:.0f} s")
            time.sleep(0.5)

    def broadcast(self, request: Request, arrays: Arrays | None = None,
                  timeout_s: float | None = None) -> dict[str, SiteReply]:
        targets = list(self.node_of.values()) or sorted(self.grid.get_node_ids())
        return self._exchange({n: (request, arrays) for n in targets}, timeout_s)

    def call(self, requests: Mapping[str, Request], arrays: Mapping[str, Arrays] | None = None,
             timeout_s: float | None = None) -> dict[str, SiteReply]:
        arrays = arrays or {}
        return self._exchange({self.node_of[s]: (r, arrays.get(s)) for s, r in requests.items()}, timeout_s)

    def try_call(self, requests: Mapping[str, Request], arrays: Mapping[str, Arrays] | None = None,
                 timeout_s: float | None = None, on_reply: OnReply | None = None, expected_s: float | None = None
                 ) -> tuple[dict[str, SiteReply], dict[str, SiteError]]:
        """Like :meth:`call` but returns (replies, errors) instead of raising when some sites fail.

        ``on_reply(site, reply, arrays)``, when given, is called for each successful reply as soon as it is
        pulled (so the server can aggregate an update and drop it before the next one arrives): a returned
        string makes it an error of that site; otherwise the reply is kept without its arrays.
        ``expected_s``: no reply is expected before 80 % of this many seconds (a round as long as the last one);
        until then replies are pulled only every IDLE_POLL_S.
        """
        arrays = arrays or {}
        return self._exchange_tolerant({self.node_of[s]: (r, arrays.get(s)) for s, r in requests.items()},
                                       timeout_s, on_reply, expected_s)

    def _exchange(self, payloads: Mapping[int, tuple[Request, Arrays | None]],
                  timeout_s: float | None) -> dict[str, SiteReply]:
        replies, errors = self._exchange_tolerant(payloads, timeout_s)
        if errors:
            raise SiteFailure(_op_of(payloads), errors)
        return replies

    def _exchange_tolerant(self, payloads: Mapping[int, tuple[Request, Arrays | None]],
                           timeout_s: float | None, on_reply: OnReply | None = None, expected_s: float | None = None
                           ) -> tuple[dict[str, SiteReply], dict[str, SiteError]]:
        site_of = {n: s for s, n in self.node_of.items()}
        messages, sent_bytes = [], {}
        request_of = {node: request for node, (request, _) in payloads.items()}
        packed: dict[int, PackedArrays] = {}  # sites sent the same arrays object share one packed copy
        for node, (request, arrays) in payloads.items():
            if arrays and id(arrays) not in packed:
                packed[id(arrays)] = PackedArrays.of(arrays)
            # with registered keys, the name of this node's key: the site checks it is its own
            record = to_record(request_body(request, self.registered.get(node)), packed.get(id(arrays)))
            sent_bytes[node] = record_nbytes(record)
            messages.append(Message(record, dst_node_id=node, message_type=self.message_type))
        if self.holds is not None:
            messages += self.holds.messages(payloads)
        ids = list(self.grid.push_messages(messages))
        pushed_at = time.time()
        pending = dict(zip(ids, payloads))
        if self.holds is not None:
            self.holds.pushed(payloads, pushed_at)
            self.holds.outstanding += ids[len(payloads):]
        started = time.monotonic()
        deadline = started + (timeout_s or self.timeout_s)
        quiet_until = started + 0.8 * (expected_s or 0.0)
        replies: dict[str, SiteReply] = {}
        errors: dict[str, SiteError] = {}
        while pending and time.monotonic() < deadline:
            holds = self.holds.outstanding if self.holds is not None else []
            batch = list(self.grid.pull_messages(list(pending) + holds))
            batch.reverse()
            while batch:  # popped one by one so that each reply can be freed once used
                msg = batch.pop()
                node = pending.pop(msg.metadata.reply_to_message_id, None)
                if node is None:  # the answer to a hold (or a reply no longer waited for): discarded
                    if msg.metadata.reply_to_message_id in holds:
                        holds.remove(msg.metadata.reply_to_message_id)
                    continue
                if self.holds is not None:
                    self.holds.replied(node, time.time())
                name = self.registered.get(node) or site_of.get(node, f"node {node}")
                if msg.has_error():
                    kind = _FLOWER_ERROR_KINDS.get(msg.error.code, ErrorKind.TRANSPORT)
                    errors[name] = SiteError(f"Flower error {msg.error.code}: {msg.error.reason}", kind)
                    continue
                try:
                    body, out = from_record(msg.content)
                except LayoutError as err:
                    errors[name] = SiteError(f"malformed reply: {err}", ErrorKind.MALFORMED_REPLY)
                    continue
                answer = read_reply(type(request_of[node]), body, name)
                site = name if isinstance(answer, SiteError) else answer.site
                if node in self.registered and site != name:
                    logger.warning("node %d (key of site %s) replied as site %r: refused", node, name, site)
                    errors[name] = SiteError(f"replied as site {site!r}, but its key is registered as {name!r}: "
                                             "refused", ErrorKind.REJECTED)
                    continue
                if node not in site_of and not isinstance(answer, SiteError):
                    self.node_of[site] = node
                    site_of[node] = site
                self.traffic.add(site, sent_bytes[node], record_nbytes(msg.content))
                self.exchange_times[site] = (pushed_at, time.time())
                if isinstance(answer, SiteError):
                    errors[site] = answer
                elif on_reply is None:
                    replies[site] = (answer, out)
                elif (problem := on_reply(site, answer, out)) is not None:
                    errors[site] = problem
                else:
                    replies[site] = (answer, {})
                del out, msg, answer  # an update is dropped as soon as it has been used
            if pending:
                now = time.monotonic()
                if replies or errors:
                    pause = self.poll_s
                elif expected_s is None:
                    pause = min(IDLE_POLL_S, max(self.poll_s, UNKNOWN_WAIT_SHARE * (now - started)))
                else:
                    pause = self.poll_s if now >= quiet_until else IDLE_POLL_S
                time.sleep(pause)
        for node in pending.values():
            errors[site_of.get(node, f"node {node}")] = SiteError(
                f"no reply within {timeout_s or self.timeout_s:.0f} s", ErrorKind.TIMEOUT)
        return replies, errors


def _op_of(payloads: Mapping[int, tuple[Request, Arrays | None]]) -> str:
    return next(iter(payloads.values()))[0].OP.value if payloads else "operation"
