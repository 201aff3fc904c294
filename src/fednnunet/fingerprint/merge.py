"""Merge per-site fingerprint aggregates into the fingerprint of the pooled dataset (pure, no I/O).

What nnU-Net computes on pooled data (``DatasetFingerprintExtractor.run``) and how each part is rebuilt here:

- ``spacings`` / ``shapes_after_crop``: per-case lists, concatenated over sites (equal as multisets).
- ``median_relative_size_after_cropping``: median over all cases of each case's relative size (exact).
- per channel ``mean`` / ``std`` (ddof 0): from each site's count, mean and sum of squared deviations (Chan's
  parallel formula in float64); nnU-Net evaluates them in float32 on the pooled samples, so they agree to ~1e-7.
- ``min`` / ``max``: exact.
- ``median`` / ``percentile_00_5`` / ``percentile_99_5``: exact order statistics found by
  :mod:`fednnunet.fingerprint.order_stats`, interpolated like numpy.

nnU-Net concatenates a case without foreground as an empty Python list, which promotes the pooled samples from
float32 to float64; the percentile interpolation follows that dtype so the result stays bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from fednnunet.fingerprint.order_stats import (OrderStatisticSearch, float_to_key, key_dtype, key_to_float,
                                               linear_percentiles, percentile_ranks, pool_coarse)

#: The percentiles nnU-Net stores, in its order.
PERCENTILES = (0.5, 50.0, 99.5)

#: nnU-Net samples this many foreground voxels in total, split evenly over the cases.
NUM_FOREGROUND_SAMPLES_TOTAL = 10e7


def samples_per_case(global_num_cases: int) -> int:
    """Per-case foreground sample count nnU-Net uses for a dataset of ``global_num_cases`` (must be global)."""
    if global_num_cases < 1:
        raise ValueError("the federation has no training cases")
    return int(NUM_FOREGROUND_SAMPLES_TOTAL // global_num_cases)


@dataclass(frozen=True)
class ChannelSummary:
    """What one site reveals about one channel's foreground samples: aggregates only."""

    count: int
    mean: float
    m2: float  # sum of squared deviations from this site's own mean
    min: float
    max: float

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ChannelSummary":
        return cls(int(d["count"]), float(d["mean"]), float(d["m2"]), float(d["min"]), float(d["max"]))


@dataclass(frozen=True)
class SiteSummary:
    """A site's contribution to the pooled fingerprint."""

    site: str
    spacings: list[list[float]]
    shapes_after_crop: list[list[int]]
    relative_sizes: list[float]
    channels: list[ChannelSummary]
    sample_dtype: str  # dtype of the samples as nnU-Net's pooled array would hold them at this site
    empty_foreground_cases: int

    @property
    def num_cases(self) -> int:
        return len(self.spacings)

    @classmethod
    def from_dict(cls, site: str, d: Mapping[str, Any]) -> "SiteSummary":
        return cls(
            site=site,
            spacings=[list(map(float, s)) for s in d["spacings"]],
            shapes_after_crop=[list(map(int, s)) for s in d["shapes_after_crop"]],
            relative_sizes=[float(r) for r in d["relative_sizes"]],
            channels=[ChannelSummary.from_dict(c) for c in d["channels"]],
            sample_dtype=str(d["sample_dtype"]),
            empty_foreground_cases=int(d["empty_foreground_cases"]),
        )


def search_dtype(summaries: Sequence[SiteSummary]) -> np.dtype:
    """The float type whose keys the percentile search walks: the widest sample type any site holds.

    Readers of nnU-Net return float32, so this is float32 and the search needs two count rounds."""
    return np.result_type(*[np.dtype(s.sample_dtype) for s in summaries])


def pooled_sample_dtype(summaries: Sequence[SiteSummary]) -> np.dtype:
    """The dtype of nnU-Net's pooled sample array (float64 once any case anywhere has no foreground)."""
    dtypes = [search_dtype(summaries)]
    if any(s.empty_foreground_cases for s in summaries):
        dtypes.append(np.dtype(np.float64))
    return np.result_type(*dtypes)


def pooled_moments(channels: Sequence[ChannelSummary]) -> tuple[int, float, float]:
    """Count, mean and population std of the pooled samples from per-site moments (Chan et al.)."""
    parts = [c for c in channels if c.count > 0]
    n = sum(c.count for c in parts)
    if n == 0:
        raise ValueError("no foreground voxels at any site: nnU-Net cannot compute intensity statistics")
    mean = sum(c.count * c.mean for c in parts) / n
    m2 = sum(c.m2 + c.count * (c.mean - mean) ** 2 for c in parts)
    return n, float(mean), float(np.sqrt(m2 / n))


@dataclass
class PercentilePlan:
    """Ranks to search per channel and how to turn the found values into nnU-Net's three percentiles."""

    total: int
    ranks: list[int]  # unique ranks searched
    pairs: list[tuple[int, int]]  # (previous, next) rank per percentile

    @classmethod
    def for_count(cls, total: int) -> "PercentilePlan":
        pairs = percentile_ranks(total, PERCENTILES)
        return cls(total, sorted({r for pair in pairs for r in pair}), pairs)

    def percentiles(self, found_keys: np.ndarray, key_space: np.dtype, pooled_dtype: np.dtype) -> list[float]:
        """nnU-Net's three percentiles from the found keys (searched in ``key_space``, interpolated in
        ``pooled_dtype``: values are exact in both since float32 widens to float64 losslessly)."""
        values = dict(zip(self.ranks, key_to_float(found_keys, key_space)))
        prev = np.asarray([values[a] for a, _ in self.pairs], dtype=pooled_dtype)
        nxt = np.asarray([values[b] for _, b in self.pairs], dtype=pooled_dtype)
        return [float(v) for v in linear_percentiles(self.total, PERCENTILES, prev, nxt)]


def new_search(channels: Sequence[ChannelSummary], key_space: np.dtype, buckets: int | None = None,
               coarse: Sequence[tuple[np.ndarray, np.ndarray]] | None = None) -> tuple[PercentilePlan, OrderStatisticSearch]:
    """Start the exact percentile search of one channel between the pooled min and max, or, given every site's
    coarse histogram in ``key_space`` (:func:`~fednnunet.fingerprint.order_stats.coarse_histogram`), already
    narrowed to one coarse bin per rank."""
    live = [c for c in channels if c.count]
    n = sum(c.count for c in live)
    plan = PercentilePlan.for_count(n)
    bounds = float_to_key(np.asarray([min(c.min for c in live), max(c.max for c in live)], dtype=key_space))
    kwargs = {} if buckets is None else {"buckets": buckets}
    search = OrderStatisticSearch(plan.ranks, int(bounds[0]), int(bounds[1]), **kwargs)
    if coarse is not None:
        bins, counts = pool_coarse(coarse)
        search.start_from_coarse(bins, counts, key_dtype(key_space))
    return plan, search


def assemble_fingerprint(summaries: Sequence[SiteSummary], percentiles_per_channel: Sequence[Sequence[float]]) -> dict:
    """The pooled ``dataset_fingerprint.json`` content, in nnU-Net's key layout."""
    num_channels = len(summaries[0].channels)
    intensity = {}
    for ch in range(num_channels):
        chans = [s.channels[ch] for s in summaries]
        _, mean, std = pooled_moments(chans)
        p005, median, p995 = percentiles_per_channel[ch]
        intensity[str(ch)] = {
            "mean": mean,
            "median": float(median),
            "std": std,
            "min": float(min(c.min for c in chans if c.count)),
            "max": float(max(c.max for c in chans if c.count)),
            "percentile_99_5": float(p995),
            "percentile_00_5": float(p005),
        }
    rel = [r for s in summaries for r in s.relative_sizes]
    return {
        "spacings": [sp for s in summaries for sp in s.spacings],
        "shapes_after_crop": [sh for s in summaries for sh in s.shapes_after_crop],
        "foreground_intensity_properties_per_channel": intensity,
        "median_relative_size_after_cropping": float(np.median(rel, 0)),
    }
