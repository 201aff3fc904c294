"""A :class:`~fednnunet.fingerprint.protocol.SiteCaller` over a Flower Grid.

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
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from flwr.app import Message
from flwr.common.constant import ErrorCode

from fednnunet.array_layout import LayoutError
from fednnunet.flower.hold import Holds
from fednnunet.flower.messages import PackedArrays, from_record, record_nbytes, to_record

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
Reply = tuple[dict[str, Any], Arrays]
#: Seconds between pulls while no reply is expected yet.
IDLE_POLL_S = 1.0
#: While nothing says when a reply is due (``expected_s`` unknown: the first round), the pulls are spaced by this
#: share of the time waited so far (from ``poll_s`` up to IDLE_POLL_S): a reply waits at most 2 % longer, and a
#: 30 s first epoch takes about 140 pulls instead of 300 (served on the cores the sites train on).
UNKNOWN_WAIT_SHARE = 0.02
#: Called with (site, result, arrays) for each successful reply as it arrives; returns an error or None.
OnReply = Callable[[str, dict[str, Any], Arrays], "str | None"]


class SiteFailure(RuntimeError):
    """One or more sites failed an operation; ``errors`` maps site (or node) to its message."""

    def __init__(self, op: str, errors: Mapping[str, str]) -> None:
        self.op = op
        self.errors = dict(errors)
        super().__init__(f"{op} failed at {len(errors)} site(s):\n  " +
                         "\n  ".join(f"{s}: {e}" for s, e in self.errors.items()))


@dataclass
class TrafficCounter:
    """Array bytes sent to and received from each site (the payload that dominates the wire)."""

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)

    def add(self, site: str, sent: int, received: int) -> None:
        self.sent[site] = self.sent.get(site, 0) + sent
        self.received[site] = self.received.get(site, 0) + received


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

    def broadcast(self, op: str, config: dict[str, Any], arrays: Arrays | None = None,
                  timeout_s: float | None = None) -> dict[str, Reply]:
        targets = list(self.node_of.values()) or sorted(self.grid.get_node_ids())
        return self._exchange(op, {n: (config, arrays) for n in targets}, timeout_s)

    def call(self, op: str, configs: Mapping[str, dict[str, Any]], arrays: Mapping[str, Arrays] | None = None,
             timeout_s: float | None = None) -> dict[str, Reply]:
        arrays = arrays or {}
        return self._exchange(op, {self.node_of[s]: (c, arrays.get(s)) for s, c in configs.items()}, timeout_s)

    def try_call(self, op: str, configs: Mapping[str, dict[str, Any]], arrays: Mapping[str, Arrays] | None = None,
                 timeout_s: float | None = None, on_reply: OnReply | None = None, expected_s: float | None = None
                 ) -> tuple[dict[str, Reply], dict[str, str]]:
        """Like :meth:`call` but returns (replies, errors) instead of raising when some sites fail.

        ``on_reply(site, result, arrays)``, when given, is called for each successful reply as soon as it is
        pulled (so the server can aggregate an update and drop it before the next one arrives): a returned
        string makes it an error of that site; otherwise the reply is kept without its arrays.
        ``expected_s``: no reply is expected before 80 % of this many seconds (a round as long as the last one);
        until then replies are pulled only every IDLE_POLL_S.
        """
        arrays = arrays or {}
        return self._exchange_tolerant(op, {self.node_of[s]: (c, arrays.get(s)) for s, c in configs.items()},
                                       timeout_s, on_reply, expected_s)

    def _exchange(self, op: str, payloads: Mapping[int, tuple[dict[str, Any], Arrays | None]],
                  timeout_s: float | None) -> dict[str, Reply]:
        replies, errors = self._exchange_tolerant(op, payloads, timeout_s)
        if errors:
            raise SiteFailure(op, errors)
        return replies

    def _exchange_tolerant(self, op: str, payloads: Mapping[int, tuple[dict[str, Any], Arrays | None]],
                           timeout_s: float | None, on_reply: OnReply | None = None, expected_s: float | None = None
                           ) -> tuple[dict[str, Reply], dict[str, str]]:
        site_of = {n: s for s, n in self.node_of.items()}
        messages, sent_bytes = [], {}
        packed: dict[int, PackedArrays] = {}  # sites sent the same arrays object share one packed copy
        for node, (config, arrays) in payloads.items():
            if arrays and id(arrays) not in packed:
                packed[id(arrays)] = PackedArrays.of(arrays)
            body = {"op": op, "config": config}
            if node in self.registered:
                body["site"] = self.registered[node]  # the name of this node's key: the site checks it is its own
            record = to_record(body, packed.get(id(arrays)))
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
        replies: dict[str, Reply] = {}
        errors: dict[str, str] = {}
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
                    lost = "node unavailable, " if msg.error.code == ErrorCode.NODE_UNAVAILABLE else ""
                    errors[name] = f"{lost}Flower error {msg.error.code}: {msg.error.reason}"
                    continue
                try:
                    body, out = from_record(msg.content)
                except LayoutError as err:
                    errors[name] = f"malformed reply: {err}"
                    continue
                site = str(body.get("result", {}).get("site") or name)
                if node in self.registered and site != name:
                    logger.warning("node %d (key of site %s) replied as site %r: refused", node, name, site)
                    errors[name] = f"replied as site {site!r}, but its key is registered as {name!r}: refused"
                    continue
                if node not in site_of and body.get("ok"):
                    self.node_of[site] = node
                    site_of[node] = site
                self.traffic.add(site, sent_bytes[node], record_nbytes(msg.content))
                self.exchange_times[site] = (pushed_at, time.time())
                if not body.get("ok"):
                    errors[site] = str(body.get("error", "unknown error"))
                elif on_reply is None:
                    replies[site] = (body["result"], out)
                elif (problem := on_reply(site, body["result"], out)) is not None:
                    errors[site] = problem
                else:
                    replies[site] = (body["result"], {})
                del out, msg  # an update is dropped as soon as it has been used
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
            errors[site_of.get(node, f"node {node}")] = f"no reply within {timeout_s or self.timeout_s:.0f} s"
        return replies, errors
