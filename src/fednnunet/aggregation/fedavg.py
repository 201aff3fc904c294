"""Weighted federated averaging (FedAvg) and asymmetric FedAvg (AsymFedAvg) over named numpy arrays.

Pure numpy on purpose: no Flower, no torch, no nnU-Net. The server converts messages to
``dict[str, np.ndarray]`` (one entry per real parameter, nnU-Net's alias keys already removed) and
calls into this module, so the maths can be tested exactly and quickly.

Two rules worth knowing (both also in the docstrings below):

* Floating-point parameters are averaged in float64 and cast back to their original dtype at the end,
  so the result does not depend on rounding in float32 partial sums.
* Integer and boolean arrays (e.g. BatchNorm's ``num_batches_tracked`` counter) are never averaged:
  an averaged counter is not a meaningful count and would silently truncate. The value of the update
  with the largest weight is taken instead (on ties the earliest added update wins, so the result is
  deterministic for a fixed order).

AsymFedAvg (Skorupko et al. 2025, eq. 2-4, Algorithm 1) averages a parameter only among sites whose
parameter has the same name, shape and dtype kind; every site keeps its own values for the rest.

Both come as streaming classes, for a server that adds each site's update as it arrives and keeps the
aggregator from round to round (memory independent of the number of sites, per-round cost close to a
copy of the bytes): :class:`StreamingAverager` (FedAvg) and :class:`StreamingAsymAverager`. The
functions :func:`fedavg` and :func:`asym_fedavg` are their all-at-once forms (same code, same bits).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fednnunet.aggregation.validation import ModelSpec

__all__ = [
    "AsymReport",
    "SiteAsymStats",
    "StreamingAsymAverager",
    "StreamingAverager",
    "asym_fedavg",
    "fedavg",
]

logger = logging.getLogger(__name__)

Update = dict[str, np.ndarray]

# Elements per block of the accumulate step (2 MiB of float64 scratch: fits in L2/L3 cache).
_CHUNK = 1 << 18

_AVERAGED_KINDS = frozenset("f")  # floating point: averaged in float64
_PICKED_KINDS = frozenset("iub")  # signed/unsigned int, bool: value of the largest-weight update


def _check_weight(weight: float) -> float:
    """Return ``weight`` as a float; reject negative, NaN, infinite and boolean weights."""
    if isinstance(weight, (bool, np.bool_)):
        raise TypeError("weight must be a number, not a bool")
    w = float(weight)
    if not math.isfinite(w) or w < 0.0:
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    return w


class StreamingAverager:
    """Weighted average of model updates that are fed one at a time, reusable round after round.

    Why streaming: the server should not hold K updates in memory to average K sites. This class
    keeps one float64 accumulator per floating-point parameter (plus the current winner for integer
    buffers) and at most two updates by reference, so its memory does not depend on K.

    Why the per-round costs are low (the goal: a round costs <= 3x a plain copy of the same bytes, also
    for K = 2): memory passes are the cost, so none is wasted.

    * Updates are held by reference and folded into the float64 sums one add late: the first two are
      combined in one pass (``acc = w1 * x1 + w2 * x2``: no zero-fill, no separate scaling pass), then
      each add folds the previous update, and :meth:`result` folds the latest one in the same pass that
      divides by the total weight and casts. So a round reads every update once, writes the sums K - 2
      times and the result once; with two updates no float64 sums are ever written; with one update
      :meth:`result` returns its exact values.
    * :meth:`reset` starts the next round but keeps the float64 accumulators (reused when the names and
      shapes are the same), and ``result(out=...)`` writes into a preallocated model: fresh memory costs
      a page fault and a zeroing per page, i.e. another pass.

    So **do not modify an added update's arrays in place until** :meth:`result` **or** :meth:`reset`.
    Dropping them is fine (the averager keeps the ones it still needs alive: at most two updates).

    The first update fixes the parameter names, shapes and dtype kinds; every later update must match
    them exactly (``ValueError`` otherwise). Validation of untrusted updates belongs to
    :func:`fednnunet.aggregation.validate_update` and should run before :meth:`add`.

    Weights are finite numbers >= 0 (typically the number of training cases of the site). A zero
    weight contributes nothing; :meth:`result` raises ``ValueError`` when the total weight is zero.
    The arithmetic is the same whatever the number of updates: ``(((w1 x1 + w2 x2) + w3 x3) + ...) / W``
    in float64 (``W`` summed in add order), so results are bitwise reproducible for a fixed add order.

    Integer/bool arrays are not averaged: :meth:`result` returns a copy of the array from the update
    with the largest weight (the first one added among equal weights).
    """

    def __init__(self) -> None:
        self._acc: dict[str, np.ndarray] = {}  # float params: sum of w * x of the folded updates, float64
        self._folded = False  # whether _acc holds the sum of the updates added before _pending
        self._spare: dict[str, np.ndarray] = {}  # accumulators kept by reset() for the next round
        self._pending: list[tuple[dict[str, np.ndarray], float]] = []  # added, not yet folded (by reference)
        self._picked: dict[str, np.ndarray] = {}  # int/bool params: copy from the heaviest update
        self._spec: dict[str, tuple[tuple[int, ...], np.dtype]] = {}  # name -> (shape, first dtype)
        self._picked_weight = -1.0
        self._total_weight = 0.0
        self._count = 0
        self._scratch: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def num_updates(self) -> int:
        """Number of updates added since construction or the last :meth:`reset`."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights added so far."""
        return self._total_weight

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names, in the order of the first update (empty before the first :meth:`add`)."""
        return tuple(self._spec)

    def reset(self) -> None:
        """Forget every added update (start a new round) but keep the float64 accumulators allocated.

        The next round reuses them for parameters with the same name and shape, so it pays no page
        faults; parameters that changed get new ones. References to added updates are dropped.
        """
        self._spare.update(self._acc)
        self._acc = {}
        self._folded = False
        self._pending = []
        self._picked = {}
        self._spec = {}
        self._picked_weight = -1.0
        self._total_weight = 0.0
        self._count = 0

    def add(self, update: Mapping[str, np.ndarray], weight: float) -> None:
        """Add ``weight * update`` to the sums.

        The arrays are read, not copied; leave them unmodified until :meth:`result` or :meth:`reset`.
        """
        w = _check_weight(weight)
        if self._count == 0:
            self._init_from(update)
        else:
            self._check_matches(update)
        self._pending.append(({name: np.asarray(update[name]) for name in self._spec}, w))
        if w > self._picked_weight:
            for name in self._picked:
                self._picked[name] = np.array(update[name], copy=True)
            self._picked_weight = w
        self._total_weight += w
        self._count += 1
        if len(self._pending) > (1 if self._folded else 2):
            self._fold()

    def result(self, dtype_like: Mapping[str, np.ndarray | np.dtype] | None = None,
               out: Mapping[str, np.ndarray] | None = None) -> Update:
        """Return the weighted average, one array per parameter (in the order of the first update).

        Floating-point parameters are averaged in float64, then cast to: the dtype of ``out[name]``
        when ``out`` is given, else the dtype given for that name in ``dtype_like`` (a reference model's
        arrays, or dtypes), else the dtype of the first update added; so float32 stays float32.
        Integer/bool buffers come from the largest-weight update, unchanged.

        ``out``: a preallocated model (every name, arrays of the right shapes) to write the result into
        instead of allocating new arrays; the returned dict holds those very arrays. It must not share
        memory with an added update. ``dtype_like`` and ``out`` exclude each other.

        With one update added, its own values are returned (copied, cast to the target dtype).
        Can be called more than once; adding more updates afterwards is allowed.
        """
        if self._count == 0:
            raise ValueError("no updates were added")
        if self._total_weight <= 0.0:
            raise ValueError("total weight is zero: nothing to average")
        if out is not None and dtype_like is not None:
            raise ValueError("give dtype_like or out, not both")
        if out is not None:
            self._check_out(out)
        res: Update = {}
        for name, (shape, dtype) in self._spec.items():
            dest = None if out is None else out[name]
            if dtype.kind in _PICKED_KINDS:
                src = self._picked[name]
                if dest is None:
                    res[name] = src.copy()
                else:
                    np.copyto(dest, src, casting="same_kind")
                    res[name] = dest
                continue
            if dest is None:
                if dtype_like is not None and name in dtype_like:
                    ref = dtype_like[name]
                    dtype = np.dtype(ref.dtype if hasattr(ref, "dtype") else ref)  # type: ignore[union-attr]
                    if dtype.kind not in _AVERAGED_KINDS:
                        raise TypeError(f"parameter {name!r}: dtype_like gives {dtype}, a floating dtype is needed")
                dest = np.empty(shape, dtype=dtype)
            self._finalize(name, dest)
            res[name] = dest
        return res

    # -- internals (also used by StreamingAsymAverager) -------------------------------------------

    def _only_update(self) -> dict[str, np.ndarray] | None:
        """The added update's arrays (the caller's own objects) when exactly one was added."""
        return self._pending[0][0] if self._count == 1 else None

    def _float_names(self) -> Iterator[str]:
        return (name for name, (_, dtype) in self._spec.items() if dtype.kind in _AVERAGED_KINDS)

    def _init_from(self, update: Mapping[str, np.ndarray]) -> None:
        if len(update) == 0:
            raise ValueError("update has no parameters")
        spec: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        picked: dict[str, np.ndarray] = {}
        for name, value in update.items():
            arr = np.asarray(value)
            kind = arr.dtype.kind
            if kind not in _AVERAGED_KINDS and kind not in _PICKED_KINDS:
                raise TypeError(f"parameter {name!r}: cannot average dtype {arr.dtype}")
            spec[name] = (arr.shape, arr.dtype)
            if kind in _PICKED_KINDS:
                picked[name] = arr  # replaced by a copy in add() (weight > -1 always)
        self._spec, self._picked = spec, picked

    def _check_matches(self, update: Mapping[str, np.ndarray]) -> None:
        if update.keys() != self._spec.keys():
            missing = sorted(self._spec.keys() - update.keys())
            extra = sorted(update.keys() - self._spec.keys())
            raise ValueError(f"update keys differ from the first update: missing {missing}, unexpected {extra}")
        for name, (shape, dtype) in self._spec.items():
            arr = np.asarray(update[name])
            if arr.shape != shape:
                raise ValueError(f"parameter {name!r}: shape {arr.shape} != {shape} of the first update")
            if arr.dtype.kind != dtype.kind:
                raise ValueError(f"parameter {name!r}: dtype {arr.dtype} is not the same kind as {dtype}")

    def _check_out(self, out: Mapping[str, np.ndarray]) -> None:
        missing = [name for name in self._spec if name not in out]
        if missing:
            raise ValueError(f"out lacks parameters {sorted(missing)}")
        for name, (shape, dtype) in self._spec.items():
            dest = out[name]
            if not isinstance(dest, np.ndarray) or dest.shape != shape:
                raise ValueError(f"out[{name!r}] must be an array of shape {shape}")
            if dest.dtype.kind != dtype.kind:
                raise TypeError(f"out[{name!r}]: dtype {dest.dtype} is not the same kind as {dtype}")

    def _fold(self) -> None:
        """Fold the oldest pending update(s) into the float64 sums: the first two together, then one."""
        if not self._folded:
            (x1, w1), (x2, w2) = self._pending[:2]
            del self._pending[:2]
            for name in self._float_names():
                acc = self._spare.pop(name, None)
                if acc is None or acc.shape != self._spec[name][0]:
                    acc = np.empty(self._spec[name][0], dtype=np.float64)  # fully written below
                self._acc[name] = acc
                self._blockwise(acc, [(x1[name], w1), (x2[name], w2)])
            self._folded = True
        else:
            x, w = self._pending.pop(0)
            for name in self._float_names():
                self._blockwise(self._acc[name], [(x[name], w)], acc=self._acc[name])

    def _finalize(self, name: str, dest: np.ndarray) -> None:
        """``dest[...] = (sums + pending terms) / total weight``, cast to dest's dtype, in one pass."""
        terms = [(x[name], w) for x, w in self._pending]
        if not self._folded and len(terms) == 1:  # a single update: its own values, no arithmetic
            np.copyto(dest, terms[0][0], casting="same_kind")
            return
        self._blockwise(dest, terms, acc=self._acc[name] if self._folded else None, divide=True)

    def _blockwise(self, dest: np.ndarray, terms: list[tuple[np.ndarray, float]],
                   acc: np.ndarray | None = None, divide: bool = False) -> None:
        """``dest[...] = (acc + sum(w * x for x, w in terms)) [/ total weight]`` in float64, in cache-sized
        blocks (``acc`` may be ``dest`` itself: the in-place ``acc += w * x``).

        Why this shape: ``acc += w * x`` allocates a full-size float64 temporary (an extra write and read
        of 8 bytes/element), and numpy ufuncs that cast float32 -> float64 (or back) on the fly go through
        a slow buffered path (about 3-4x a plain copy). Casting a block into a small float64 scratch with
        ``np.copyto`` and then doing same-dtype ufuncs keeps the scratch in cache, so the memory traffic
        is the minimum: each input read once, ``dest`` written once. Blocks of 2**18 elements were fastest
        (smaller blocks pay per-call overhead; measured down to 2**15). The float64 operations and their
        order are exactly ``(acc + w1 x1) + w2 x2 ...`` then ``/ W``, whatever is fused with what.
        """
        if not dest.flags.c_contiguous:  # reshape(-1) would be a copy: write through a temporary
            tmp = np.empty(dest.shape, dtype=dest.dtype)
            self._blockwise(tmp, terms, acc, divide)
            np.copyto(dest, tmp)
            return
        if self._scratch is None:
            self._scratch = (np.empty(_CHUNK, dtype=np.float64), np.empty(_CHUNK, dtype=np.float64))
        flat_dest = dest.reshape(-1)  # contiguous: a view
        flat_acc = None if acc is None else acc.reshape(-1)  # our own contiguous array: a view
        flat_terms = [(x.reshape(-1), w) for x, w in terms]  # views when contiguous (normal), else one copy
        direct = dest.dtype == np.float64  # compute straight into dest (the sums, or a float64 result)
        scratch_a, scratch_b = self._scratch
        for start in range(0, flat_dest.size, _CHUNK):
            stop = min(start + _CHUNK, flat_dest.size)
            dest_block, b = flat_dest[start:stop], scratch_b[: stop - start]
            target = dest_block if direct else scratch_a[: stop - start]
            if flat_acc is None:  # target = w1 * x1, then the other terms
                x, w = flat_terms[0]
                np.copyto(b, x[start:stop], casting="same_kind")
                np.multiply(b, w, out=target)
                value, in_target, rest = target, True, flat_terms[1:]
            else:
                value, in_target, rest = flat_acc[start:stop], False, flat_terms
            for x, w in rest:
                np.copyto(b, x[start:stop], casting="same_kind")
                np.multiply(b, w, out=b)
                np.add(value, b, out=target)
                value, in_target = target, True
            if divide:
                np.divide(value, self._total_weight, out=target)
                value, in_target = target, True
            if not direct:
                np.copyto(dest_block, value, casting="same_kind")
            elif not in_target:
                np.copyto(dest_block, value)


def fedavg(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Update:
    """Weighted FedAvg of ``updates`` (all with the same names, shapes and dtype kinds).

    A thin wrapper over :class:`StreamingAverager`; see there for the dtype and integer-buffer rules.
    """
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    if not updates:
        raise ValueError("no updates to average")
    averager = StreamingAverager()
    for update, weight in zip(updates, weights):
        averager.add(update, weight)
    return averager.result()


# ------------------------------------------------------------------------------------------------
# AsymFedAvg
# ------------------------------------------------------------------------------------------------

Scope = Literal["all", "any"]
SiteId = Hashable


@dataclass(frozen=True)
class SiteAsymStats:
    """What AsymFedAvg did to one site's model in one round."""

    params_averaged: int
    params_local: int
    values_averaged: int  # scalar values (array elements) in averaged parameters
    values_local: int
    local_names: tuple[str, ...] = ()  # parameters the site kept as they were

    @property
    def fraction_averaged(self) -> float:
        """Share of the site's scalar values that were averaged (0.0 for an empty model)."""
        total = self.values_averaged + self.values_local
        return self.values_averaged / total if total else 0.0


@dataclass(frozen=True)
class AsymReport:
    """Per-site summary of an AsymFedAvg round, for the server log and the run report."""

    scope: str
    sites: dict[SiteId, SiteAsymStats] = field(default_factory=dict)
    num_groups: int = 0  # distinct (parameter name, compatible site set) pairs that were averaged

    def lines(self) -> list[str]:
        """One human-readable line per site."""
        return [
            f"site {site}: averaged {s.params_averaged} params ({s.values_averaged} values, "
            f"{100 * s.fraction_averaged:.1f}%), kept local {s.params_local} params ({s.values_local} values)"
            for site, s in self.sites.items()
        ]


Signature = tuple[tuple[int, ...], str]


def _signature(arr: np.ndarray) -> Signature:
    """What must match for two sites' parameters to be averaged: shape and dtype kind."""
    return arr.shape, arr.dtype.kind


def _signatures(spec: ModelSpec | Mapping[str, np.ndarray]) -> dict[str, Signature]:
    """name -> signature, from a ModelSpec or from arrays (an update or a model of the site)."""
    if isinstance(spec, ModelSpec):
        return {name: (tuple(shape), np.dtype(dtype).kind) for name, (shape, dtype) in spec.params.items()}
    return {name: _signature(np.asarray(arr)) for name, arr in spec.items()}


def _compatible_groups(
    signatures: Mapping[SiteId, Mapping[str, Signature]], scope: Scope
) -> dict[tuple[SiteId, ...], list[str]]:
    """Map each set of sites (in input order) to the parameter names averaged among exactly that set.

    The one grouping rule of AsymFedAvg. For one name, the sites sharing a signature (shape, dtype
    kind) form a group (scope "any") or, under the paper's rule (scope "all"), the name is averaged
    only when every site has it with one signature. Groups need at least two sites: a lone site keeps
    its own values. Grouping by site set lets one StreamingAverager handle all parameters of that set
    (each name belongs to at most one group per site, so a site set never sees a name twice).
    """
    sites = list(signatures)
    by_name: dict[str, dict[Signature, list[SiteId]]] = {}
    for site in sites:
        for name, sig in signatures[site].items():
            by_name.setdefault(name, {}).setdefault(sig, []).append(site)

    groups: dict[tuple[SiteId, ...], list[str]] = {}
    for name, by_sig in by_name.items():
        if scope == "all":
            if len(by_sig) == 1:
                (members,) = by_sig.values()
                if len(members) == len(sites) and len(members) >= 2:
                    groups.setdefault(tuple(members), []).append(name)
        else:
            for members in by_sig.values():
                if len(members) >= 2:
                    groups.setdefault(tuple(members), []).append(name)
    return groups


def _check_scope(scope: str) -> None:
    if scope not in ("all", "any"):
        raise ValueError(f"scope must be 'all' or 'any', got {scope!r}")


class StreamingAsymAverager:
    """AsymFedAvg fed one site update at a time, as the updates arrive.

    Why: :func:`asym_fedavg` over a dict of K updates makes the server hold all K decoded updates at
    once (K x the model size). The grouping of AsymFedAvg only needs names, shapes and dtypes, which
    the server knows before the round (every site's :class:`~fednnunet.aggregation.ModelSpec`), so
    the accumulators can be fixed up front and each update added, then dropped, as it arrives.

    How: for every parameter name, the expected sites (``specs``) are split into classes of equal
    signature (shape, dtype kind); the classes of two or more sites, grouped by site set, each get one
    :class:`StreamingAverager` (reused across rounds by :meth:`reset`). A class only ever receives its
    members' updates, so whatever subset of sites is added, a class's sum is over exactly its added
    members, in the order they were added.

    Sites left out (never added this round) are handled exactly like :func:`asym_fedavg` called with
    only the added sites: :meth:`result` applies the same grouping rule (:func:`_compatible_groups`)
    to the added sites only. With scope ``"all"`` a name is averaged when every *added* site has it
    with one signature (so a left-out odd site no longer blocks the others); with ``"any"`` when at
    least two added sites share its signature. A name whose group has one added site, or a round with
    one added site, keeps that site's own arrays. ``result()`` is bitwise identical to
    ``asym_fedavg({added sites, in add order}, weights, scope)`` (that function is this class).

    Memory: the groups' float64 sums (kept across rounds by :meth:`reset`), the result (one array per
    averaged name and group, shared by the group's sites), and, held by reference until :meth:`reset`:
    (a) per group, the at most two updates its :class:`StreamingAverager` has not folded yet, and (b)
    every added site's arrays that may stay local: names with no other expected site
    of equal signature, and with scope ``"all"`` names on which the expected sites disagree. (b) are the
    sites' own layers, which a server keeps anyway as part of each site's model; nothing else grows
    with K. Do not modify an added update's arrays in place until :meth:`result`/:meth:`reset`.

    Use, one object per federation (or fold), one round after another::

        agg = StreamingAsymAverager({site: spec, ...}, scope="all")
        for each round:
            agg.reset()
            for site, update in arriving_updates:      # validated; dropped by the caller after add
                agg.add(site, update, weight_of[site])
            models, report = agg.result()               # only the added sites; others keep their model
    """

    def __init__(self, specs: Mapping[SiteId, ModelSpec | Mapping[str, np.ndarray]],
                 scope: Scope = "all") -> None:
        _check_scope(scope)
        if not specs:
            raise ValueError("no sites")
        self.scope: Scope = scope
        self._sigs = {site: _signatures(spec) for site, spec in specs.items()}
        # Classes of equal signature among the expected sites (the "any" rule over all of them).
        self._groups = _compatible_groups(self._sigs, "any")
        for members, names in self._groups.items():  # fail here, not halfway through adding a site
            for name in names:
                kind = self._sigs[members[0]][name][1]
                if kind not in _AVERAGED_KINDS and kind not in _PICKED_KINDS:
                    raise TypeError(f"parameter {name!r}: cannot average dtype kind {kind!r}")
        self._averagers = {members: StreamingAverager() for members in self._groups}
        self._group_of: dict[SiteId, dict[str, tuple[SiteId, ...]]] = {site: {} for site in specs}
        for members, names in self._groups.items():
            for site in members:
                for name in names:
                    self._group_of[site][name] = members
        unanimous = {n for names in _compatible_groups(self._sigs, "all").values() for n in names}
        # Names a site may keep as its own whatever else arrives: held by reference when added.
        self._maybe_local: dict[SiteId, tuple[str, ...]] = {
            site: tuple(n for n in sigs if n not in self._group_of[site] or (scope == "all" and n not in unanimous))
            for site, sigs in self._sigs.items()}
        self._added: dict[SiteId, tuple[list[str], dict[str, np.ndarray]]] = {}  # site -> (key order, kept)
        self._added_to: dict[tuple[SiteId, ...], list[SiteId]] = {members: [] for members in self._groups}

    @property
    def sites(self) -> tuple[SiteId, ...]:
        """The expected sites (those of ``specs``)."""
        return tuple(self._sigs)

    @property
    def added(self) -> tuple[SiteId, ...]:
        """Sites added since construction or the last :meth:`reset`, in add order."""
        return tuple(self._added)

    def reset(self) -> None:
        """Start a new round: forget the added updates, keep the accumulators allocated."""
        for averager in self._averagers.values():
            averager.reset()
        for added in self._added_to.values():
            added.clear()
        self._added = {}

    def add(self, site: SiteId, update: Mapping[str, np.ndarray], weight: float) -> None:
        """Accumulate one site's update (names, shapes and dtype kinds as in its spec).

        The caller may drop ``update`` as soon as this returns, but must not modify its arrays in place
        until :meth:`result`/:meth:`reset`. Each site at most once per round.
        """
        if site not in self._sigs:
            raise ValueError(f"unknown site {site!r}: not among the sites given at construction")
        if site in self._added:
            raise ValueError(f"site {site!r} was already added this round")
        _check_weight(weight)
        sigs = self._sigs[site]
        if update.keys() != sigs.keys():
            missing = sorted(sigs.keys() - update.keys())
            extra = sorted(update.keys() - sigs.keys())
            raise ValueError(f"site {site!r}: update does not match its spec: missing {missing}, unexpected {extra}")
        for name, sig in sigs.items():
            got = _signature(np.asarray(update[name]))
            if got != sig:
                raise ValueError(f"site {site!r}, parameter {name!r}: shape/dtype kind {got} != spec {sig}")
        for members, names in self._groups.items():
            if site in members:
                self._averagers[members].add({name: update[name] for name in names}, weight)
                self._added_to[members].append(site)
        kept = {name: np.asarray(update[name]) for name in self._maybe_local[site]}
        self._added[site] = (list(update), kept)

    def result(self) -> tuple[dict[SiteId, Update], AsymReport]:
        """Per added site, its new model, and the round's :class:`AsymReport` (added sites only).

        Each model has the site's keys in the order of its update: averaged arrays for the names
        averaged (one array object shared by the sites of a group: treat as read-only) and the site's
        own arrays (the very objects it added) for the rest. Sites not added are not in the result.
        """
        if not self._added:
            raise ValueError("no updates to average")
        present = list(self._added)
        final = _compatible_groups({site: self._sigs[site] for site in present}, self.scope)
        results: dict[tuple[SiteId, ...], Update] = {}
        averaged: dict[SiteId, dict[str, np.ndarray]] = {site: {} for site in present}
        for members, names in final.items():
            for name in names:
                group = self._group_of[members[0]][name]
                if group not in results:
                    if self._added_to[group] != list(members):  # would be a bug in the grouping
                        raise AssertionError(f"group {group} holds {self._added_to[group]}, expected {members}")
                    results[group] = self._averagers[group].result()
                value = results[group][name]
                for site in members:
                    averaged[site][name] = value

        out: dict[SiteId, Update] = {}
        stats: dict[SiteId, SiteAsymStats] = {}
        for site in present:
            order, kept = self._added[site]
            mine = averaged[site]
            merged: Update = {}
            n_avg = n_loc = v_avg = v_loc = 0
            local: list[str] = []
            for name in order:
                size = math.prod(self._sigs[site][name][0])
                if name in mine:
                    merged[name] = mine[name]
                    n_avg += 1
                    v_avg += size
                else:
                    merged[name] = kept[name] if name in kept else self._own(site, name)
                    n_loc += 1
                    v_loc += size
                    local.append(name)
            out[site] = merged
            stats[site] = SiteAsymStats(n_avg, n_loc, v_avg, v_loc, tuple(local))

        report = AsymReport(scope=self.scope, sites=stats, num_groups=sum(len(n) for n in final.values()))
        for line in report.lines():
            logger.debug("AsymFedAvg(%s) %s", self.scope, line)
        return out, report

    def _own(self, site: SiteId, name: str) -> np.ndarray:
        """A site's own array for a name of a group where it is the only added site (held by the averager)."""
        group = self._group_of[site][name]
        averager = self._averagers[group]
        if self._added_to[group] != [site]:  # would be a bug in the grouping
            raise AssertionError(f"{name!r} of site {site!r} is local but group {group} has {self._added_to[group]}")
        first = averager._only_update()
        assert first is not None
        return first[name]


def asym_fedavg(
    updates: Mapping[SiteId, Mapping[str, np.ndarray]],
    weights: Mapping[SiteId, float],
    scope: Scope = "all",
) -> tuple[dict[SiteId, Update], AsymReport]:
    """Asymmetric FedAvg: average each parameter only among sites where it is compatible.

    A parameter is compatible between sites when it has the same name, shape and dtype kind.

    * ``scope="all"`` (the paper's rule, eq. 2-4): a parameter is averaged only when every site has it
      with the same shape; otherwise every site keeps its own.
    * ``scope="any"``: for each name the sites are grouped by shape, and every group of at least two
      sites is averaged among itself (weights renormalised within the group).

    Returns one dict per site, with the site's keys in the site's order: averaged arrays for its
    compatible parameters and its own arrays (the very same objects, values unchanged) for the rest.
    Averaged arrays are shared between the sites of a group to keep memory flat: treat them as
    read-only. With identical architectures at all sites the result equals :func:`fedavg` for every
    site. Averaging follows :class:`StreamingAverager` (float64 accumulation, dtype kept, integer
    buffers from the heaviest site of the group).

    The all-at-once form of :class:`StreamingAsymAverager` (which it is: the updates are added site by
    site in dict order). A server should use that class and add each update as it arrives, rather
    than holding all K updates for this call.
    """
    _check_scope(scope)
    if not updates:
        raise ValueError("no updates to average")
    if updates.keys() != weights.keys():
        missing = [s for s in updates if s not in weights]
        extra = [s for s in weights if s not in updates]
        raise ValueError(f"weights do not match sites: no weight for {missing}, weight for unknown {extra}")
    averager = StreamingAsymAverager(updates, scope)  # signatures read from the updates themselves
    for site, update in updates.items():
        averager.add(site, update, weights[site])
    return averager.result()
