"""The SiteCaller contract (fednnunet.protocol.caller) over real site workers in this process.

Every message goes through the protocol's envelope and JSON both ways, as over Flower, so a test that uses it
exercises the same encoding, decoding and checks; only the transport is left out (tested end to end elsewhere).
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

from fednnunet.protocol.caller import OnReply, SiteFailure, SiteReply, TrafficCounter
from fednnunet.protocol.envelope import read_reply, request_body
from fednnunet.protocol.errors import SiteError
from fednnunet.protocol.messages import Request

Arrays = dict[str, Any]


class InProcessCaller:
    def __init__(self, workers: Mapping[str, Any]) -> None:
        self.workers = dict(workers)
        self.traffic = TrafficCounter()
        self.exchange_times: dict[str, tuple[float, float]] = {}
        self.messages: list[tuple[str, int]] = []  # (op, bytes of the reply body)
        self._sites: list[str] = []

    @property
    def sites(self) -> list[str]:
        return list(self._sites)

    def _one(self, site: str, request: Request, arrays: Arrays | None) -> SiteReply | SiteError:
        pushed = time.time()
        body = json.loads(json.dumps(request_body(request)))
        reply, out = self.workers[site].handle(body, dict(arrays or {}))
        text = json.dumps(reply)
        self.messages.append((request.OP.value, len(text)))
        self.exchange_times[site] = (pushed, time.time())
        self.traffic.add(site, sum(getattr(a, "nbytes", 0) for a in (arrays or {}).values()),
                         sum(getattr(a, "nbytes", 0) for a in out.values()))
        decoded = read_reply(type(request), json.loads(text), site)
        return decoded if isinstance(decoded, SiteError) else (decoded, out)

    def try_call(self, requests: Mapping[str, Request], arrays: Mapping[str, Arrays] | None = None,
                 timeout_s: float | None = None, on_reply: OnReply | None = None, expected_s: float | None = None
                 ) -> tuple[dict[str, SiteReply], dict[str, SiteError]]:
        replies: dict[str, SiteReply] = {}
        errors: dict[str, SiteError] = {}
        for site, request in requests.items():
            answer = self._one(site, request, (arrays or {}).get(site))
            if isinstance(answer, SiteError):
                errors[site] = answer
            elif on_reply is not None and (problem := on_reply(site, *answer)) is not None:
                errors[site] = problem
            else:
                replies[site] = answer if on_reply is None else (answer[0], {})
        return replies, errors

    def call(self, requests: Mapping[str, Request], arrays: Mapping[str, Arrays] | None = None,
             timeout_s: float | None = None) -> dict[str, SiteReply]:
        replies, errors = self.try_call(requests, arrays, timeout_s)
        if errors:
            raise SiteFailure(next(iter(requests.values())).OP.value, errors)
        return replies

    def broadcast(self, request: Request, arrays: Arrays | None = None,
                  timeout_s: float | None = None) -> dict[str, SiteReply]:
        self._sites = sorted(self.workers)
        return self.call({s: request for s in self._sites}, {s: arrays for s in self._sites} if arrays else None,
                         timeout_s)
