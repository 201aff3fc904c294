"""Exact distributed order statistics over float samples held by several sites.

nnU-Net's fingerprint stores percentiles (0.5, 50, 99.5) of the foreground intensity samples pooled over all
cases; CT normalization clips with them. Averaging per-site percentiles (what the reference implementation does)
is wrong. Here the server finds the exact k-th smallest pooled sample without any sample leaving a site: every
float maps to an integer key that sorts like the float, the server narrows an integer interval per wanted rank,
and each site only answers "how many of my samples fall in each of these key buckets". With 2**16 buckets per
round, a 32-bit float is pinned down in two rounds after the min/max round, independent of the dataset size.
The first of those rounds needs no request: its buckets can be fixed in advance as the top 16 bits of the key
(:func:`coarse_histogram`), so sites send them with their min/max and a 32-bit float needs one count round.

The final percentile is interpolated exactly like ``numpy.percentile(..., method="linear")`` so the result is
bit-identical to nnU-Net's extraction on the pooled data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

#: Buckets per interval and round. 2**16 buckets resolve a 32-bit key in two rounds.
DEFAULT_BUCKETS = 1 << 16

#: Leading key bits of the coarse histogram: as fine as one count round (2**16 buckets).
COARSE_BITS = 16

_KEY_DTYPES = {np.dtype(np.float32): np.dtype(np.uint32), np.dtype(np.float64): np.dtype(np.uint64)}


def key_dtype(float_dtype: np.dtype) -> np.dtype:
    """The unsigned integer type whose order matches ``float_dtype``'s order."""
    try:
        return _KEY_DTYPES[np.dtype(float_dtype)]
    except KeyError as err:
        raise TypeError(f"order statistics support float32 and float64 samples, not {float_dtype}") from err


def float_to_key(values: np.ndarray) -> np.ndarray:
    """Map floats to unsigned keys with the same order (negative floats: all bits flipped; others: sign set).

    In place on one new array (no temporaries): a site maps 10**8 samples per channel."""
    values = np.ascontiguousarray(values)
    kdt = key_dtype(values.dtype)
    bits = values.view(kdt)
    nbits = 8 * kdt.itemsize
    flip = bits >> kdt.type(nbits - 1)  # 1 for negative floats
    flip *= kdt.type((1 << (nbits - 1)) - 1)  # negative: all but the sign bit
    flip |= kdt.type(1 << (nbits - 1))  # always the sign bit
    flip ^= bits
    return flip


def key_to_float(keys: np.ndarray | int, float_dtype: np.dtype) -> np.ndarray:
    """Inverse of :func:`float_to_key`."""
    kdt = key_dtype(float_dtype)
    keys = np.asarray(keys, dtype=kdt)
    sign = kdt.type(1 << (8 * kdt.itemsize - 1))
    bits = np.where(keys & sign, keys & ~sign, ~keys).astype(kdt, copy=False)
    return bits.view(np.dtype(float_dtype))


def bucket_edges(lo: int, hi: int, buckets: int) -> np.ndarray:
    """Upper (inclusive) key of each bucket splitting ``[lo, hi]``; fewer buckets when the interval is small."""
    width = hi - lo + 1
    n = min(buckets, width)
    step = -(-width // n)  # ceil division: every bucket holds at most `step` keys
    uppers = [min(lo + (i + 1) * step - 1, hi) for i in range(n)]
    return np.unique(np.asarray(uppers, dtype=np.uint64))


#: Values per block in the site's linear passes over its samples (keys here, float64 deviations in
#: ``site_samples``): small enough for the cache, large enough for numpy's per-call overhead.
BLOCK = 1 << 18


def count_in_buckets(keys: np.ndarray, lo: int, edges: np.ndarray) -> np.ndarray:
    """Site side: how many keys fall in each bucket ``(prev_edge, edge]`` with the first bucket starting at lo.

    One pass over the (unsorted) keys in blocks: sorting 10**8 keys per channel cost seconds, a pass costs
    a fraction of one, and a request usually selects few keys."""
    kdt = keys.dtype
    edges = np.asarray(edges).astype(kdt)
    lo_key, hi_key = kdt.type(lo), edges[-1]
    counts = np.zeros(len(edges), np.int64)
    for start in range(0, keys.size, BLOCK):
        block = keys[start:start + BLOCK]
        inside = block[(block >= lo_key) & (block <= hi_key)]
        if inside.size:
            counts += np.bincount(np.searchsorted(edges, inside, side="left"), minlength=len(edges))
    return counts


def coarse_shift(kdt: np.dtype) -> int:
    """How far a key of type ``kdt`` is shifted right to leave its :data:`COARSE_BITS` leading bits."""
    return 8 * np.dtype(kdt).itemsize - COARSE_BITS


def coarse_histogram(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Site side: counts of keys per value of their leading :data:`COARSE_BITS` bits, nonzero bins only.

    The bins are fixed by the key type alone, so a site can send them before the server knows the pooled
    range; they carry what the first count round between the pooled min and max would (2**16 buckets)."""
    shift = keys.dtype.type(coarse_shift(keys.dtype))
    dense = np.zeros(1 << COARSE_BITS, np.int64)
    for start in range(0, keys.size, BLOCK):
        dense += np.bincount(keys[start:start + BLOCK] >> shift, minlength=dense.size)
    bins = np.flatnonzero(dense)
    return bins.astype(np.uint64), dense[bins]


def pool_coarse(histograms: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Server side: the pooled coarse histogram (sorted bins, summed counts) from every site's.

    The histograms must already be checked (the protocol refuses a malformed one, naming its site)."""
    bins = np.concatenate([np.asarray(b, dtype=np.uint64) for b, _ in histograms])
    counts = np.concatenate([np.asarray(c, dtype=np.int64) for _, c in histograms])
    pooled_bins, inverse = np.unique(bins, return_inverse=True)
    pooled = np.zeros(pooled_bins.size, np.int64)
    np.add.at(pooled, inverse, counts)
    return pooled_bins, pooled


@dataclass
class _Target:
    rank: int  # 0-based rank in the pooled sorted samples
    lo: int
    hi: int
    below: int  # pooled samples with key < lo


@dataclass
class OrderStatisticSearch:
    """Server side search for several ranks at once.

    Each round, :meth:`requests` yields unique key intervals with bucket edges; sites answer with bucket counts
    (:func:`count_in_buckets`), the server sums them over sites and calls :meth:`update`.
    """

    ranks: Sequence[int]
    key_min: int
    key_max: int
    buckets: int = DEFAULT_BUCKETS
    _targets: list[_Target] = field(init=False)

    def __post_init__(self) -> None:
        self._targets = [_Target(int(r), int(self.key_min), int(self.key_max), 0) for r in self.ranks]

    @property
    def done(self) -> bool:
        return all(t.lo == t.hi for t in self._targets)

    def start_from_coarse(self, bins: np.ndarray, counts: np.ndarray, kdt: np.dtype) -> None:
        """Narrow every target to one bin of the pooled :func:`coarse_histogram` (what one count round does)."""
        shift = coarse_shift(kdt)
        cum = np.cumsum(counts)
        for t in self._targets:
            i = int(np.searchsorted(cum, t.rank, side="right"))
            if i >= len(bins):
                raise ValueError(f"sites reported fewer samples than rank {t.rank}: inconsistent coarse counts")
            lo = int(bins[i]) << shift
            t.below = 0 if i == 0 else int(cum[i - 1])
            t.lo, t.hi = max(lo, t.lo), min(lo + (1 << shift) - 1, t.hi)
            if t.lo > t.hi:
                raise ValueError(f"rank {t.rank} falls outside the pooled min/max: inconsistent coarse counts")

    def requests(self) -> list[tuple[int, np.ndarray]]:
        """Unique (lo, edges) pairs still to be counted."""
        seen: dict[tuple[int, int], np.ndarray] = {}
        for t in self._targets:
            if t.lo != t.hi and (t.lo, t.hi) not in seen:
                seen[(t.lo, t.hi)] = bucket_edges(t.lo, t.hi, self.buckets)
        return [(lo, edges) for (lo, _), edges in seen.items()]

    def update(self, counts: Sequence[np.ndarray]) -> None:
        """Narrow every open target with the pooled counts for each request of the last :meth:`requests` call."""
        by_interval = {}
        for (lo, edges), c in zip(self.requests(), counts):
            if len(c) != len(edges):
                raise ValueError(f"expected {len(edges)} bucket counts for interval starting at {lo}, got {len(c)}")
            by_interval[(lo, int(edges[-1]))] = (edges, np.asarray(c, dtype=np.int64))
        for t in self._targets:
            if t.lo == t.hi:
                continue
            edges, c = by_interval[(t.lo, t.hi)]
            cum = t.below + np.cumsum(c)
            i = int(np.searchsorted(cum, t.rank, side="right"))  # first bucket whose cumulative count exceeds rank
            if i >= len(edges):
                raise ValueError(f"sites reported fewer samples than rank {t.rank}: inconsistent counts")
            new_lo = t.lo if i == 0 else int(edges[i - 1]) + 1
            t.below = t.below if i == 0 else int(cum[i - 1])
            t.lo, t.hi = new_lo, int(edges[i])

    def keys(self) -> np.ndarray:
        """The found key of every rank, as uint64 (a Python int list would round keys above 2**63 via float)."""
        if not self.done:
            raise RuntimeError("order statistic search is not finished")
        return np.asarray([t.lo for t in self._targets], dtype=np.uint64)


def percentile_ranks(n: int, percentiles: Sequence[float]) -> list[tuple[int, int]]:
    """For each percentile, the 0-based ranks numpy's 'linear' method interpolates between."""
    virtual = (n - 1) * (np.asarray(percentiles, dtype=np.float64) / 100)
    prev = np.floor(virtual).astype(np.int64)
    nxt = np.minimum(prev + 1, n - 1)
    return [(int(p), int(q)) for p, q in zip(prev, nxt)]


def linear_percentiles(n: int, percentiles: Sequence[float], previous: np.ndarray, following: np.ndarray) -> np.ndarray:
    """numpy's 'linear' percentile from the two neighbouring order statistics, bit for bit.

    Mirrors ``numpy.lib._function_base_impl._lerp`` as numpy 2.x applies it in ``np.percentile`` with a float64
    array of percentiles: gamma is the float64 fractional part of the virtual index, ``a + (b - a) * gamma`` for
    gamma < 0.5 and ``b - (b - a) * (1 - gamma)`` otherwise, with ``b - a`` in the samples' dtype.
    A test checks this against ``np.percentile`` for both dtypes.
    """
    q = np.asarray(percentiles, dtype=np.float64) / 100
    virtual = (n - 1) * q
    gamma = virtual - np.floor(virtual)
    a = np.asarray(previous)
    b = np.asarray(following)
    diff = b - a
    result = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=result, where=gamma >= 0.5, casting="unsafe")
    return result
