"""Adding the round's updates in a fixed site order, whatever order they arrive in.

Why: the averagers sum in float64 in add order and round once to float32, so updates added in arrival order
(which varies from run to run) can change the last bit of the result. A seeded run must give the same model
every time, so it adds in site order: an update that arrives early is held until every site before it was added
or the round's replies are all in. Unseeded runs add on arrival (no update held: the server's memory stays one
update).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["SiteOrderedAdds"]


class SiteOrderedAdds:
    """Runs each site's ``add`` callable in the order of ``order``; ``order=None`` runs it at once.

    Call :meth:`add` as updates arrive and :meth:`flush` when the round's replies are complete: it runs the
    held adds of the sites after a missing one (left out of the round), still in site order.
    """

    def __init__(self, order: Sequence[str] | None) -> None:
        self._order = None if order is None else list(order)
        self._next = 0
        self._held: dict[str, Callable[[], None]] = {}

    def add(self, site: str, add: Callable[[], None]) -> None:
        if self._order is None:
            add()
            return
        if site not in self._order or site in self._held or self._order.index(site) < self._next:
            raise ValueError(f"site {site!r} is not expected (again) in this round")
        self._held[site] = add
        while self._next < len(self._order) and self._order[self._next] in self._held:
            self._held.pop(self._order[self._next])()
            self._next += 1

    def flush(self) -> None:
        if self._order is None:
            return
        for site in self._order[self._next:]:
            held = self._held.pop(site, None)
            if held is not None:
                held()
        self._next = len(self._order)
