"""How every coordinator job reaches the sites: one interface, whatever carries the messages.

:class:`~fednnunet.flower.site_caller.FlowerSiteCaller` implements it over a Flower Grid; tests implement it in
process. The operation is the request's class (:mod:`fednnunet.protocol.messages`), the replies are its reply class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, TypeVar

import numpy as np

from fednnunet.protocol.errors import ErrorKind, SiteError
from fednnunet.protocol.messages import Reply, Request

Arrays = dict[str, np.ndarray]
R = TypeVar("R", bound=Reply)
#: a site's typed reply and the arrays beside it
SiteReply = tuple[Reply, Arrays]
#: Called with (site, reply, arrays) for each successful reply as it arrives; returns an error or None.
OnReply = Callable[[str, Reply, Arrays], "SiteError | None"]


class SiteFailure(RuntimeError):
    """One or more sites failed an operation; ``errors`` maps site (or node) to its error (with its kind)."""

    def __init__(self, op: str, errors: Mapping[str, SiteError]) -> None:
        self.op = op
        self.errors = dict(errors)
        super().__init__(f"{op} failed at {len(errors)} site(s):\n  " +
                         "\n  ".join(f"{s}: {e}" for s, e in self.errors.items()))


def rejected(message: str) -> SiteError:
    """The coordinator's refusal of a reply it checked (an ``on_reply`` result)."""
    return SiteError(message, ErrorKind.REJECTED)


@dataclass
class TrafficCounter:
    """Array bytes sent to and received from each site (the payload that dominates the wire)."""

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)

    def add(self, site: str, sent: int, received: int) -> None:
        self.sent[site] = self.sent.get(site, 0) + sent
        self.received[site] = self.received.get(site, 0) + received


class SiteCaller(Protocol):
    """Sends one operation to sites and gathers each site's typed reply.

    ``broadcast`` sends the same request to every connected site (and learns the site names on first use);
    ``call`` sends each site its own request and raises :class:`SiteFailure` if any failed; ``try_call`` returns
    the failures instead (``on_reply`` sees each reply as it arrives; ``expected_s``: when replies are due)."""

    traffic: TrafficCounter
    #: site -> (time pushed, time its reply was pulled), wall clock, of the latest exchange with the site
    exchange_times: dict[str, tuple[float, float]]

    @property
    def sites(self) -> list[str]: ...

    def broadcast(self, request: Request, arrays: Arrays | None = None,
                  timeout_s: float | None = None) -> dict[str, SiteReply]: ...

    def call(self, requests: Mapping[str, Request], arrays: Mapping[str, Arrays] | None = None,
             timeout_s: float | None = None) -> dict[str, SiteReply]: ...

    def try_call(self, requests: Mapping[str, Request], arrays: Mapping[str, Arrays] | None = None,
                 timeout_s: float | None = None, on_reply: OnReply | None = None, expected_s: float | None = None
                 ) -> tuple[dict[str, SiteReply], dict[str, SiteError]]: ...
