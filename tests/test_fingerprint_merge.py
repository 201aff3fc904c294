"""The pure FFE core: site aggregates + exact percentile search reproduce nnU-Net's pooled statistics.

The reference here is what nnU-Net's ``DatasetFingerprintExtractor.run`` does with the per-case samples of the
pooled dataset: concatenate per channel (an empty list for a case without foreground), then np.percentile /
np.mean / np.std.
"""

from __future__ import annotations

import numpy as np
import pytest

from fednnunet.fingerprint.checks import FederationDataError, check_compatible
from fednnunet.fingerprint.merge import PERCENTILES, SiteSummary, assemble_fingerprint, samples_per_case
from fednnunet.fingerprint.order_stats import (OrderStatisticSearch, coarse_histogram, count_in_buckets, float_to_key,
                                               key_to_float, linear_percentiles, percentile_ranks, pool_coarse)
from fednnunet.fingerprint.coordinator import _exact_percentiles
from fednnunet.fingerprint.site_samples import LocalSamples, _CaseResult
from fednnunet.protocol.messages import DescribeReply, FingerprintCounts, FingerprintCountsReply


def _case(name: str, samples: list[np.ndarray], spacing=(1.0, 1.0), shape=(10, 10), rel=1.0) -> _CaseResult:
    return _CaseResult(name, list(shape), list(spacing), samples, rel)


def _nnunet_pooled_stats(sites: list[list[_CaseResult]], num_channels: int) -> dict:
    """What nnU-Net computes from the same per-case samples on the pooled dataset."""
    cases = [c for site in sites for c in site]
    per_channel = [np.concatenate([c.samples[i] if c.samples[i].size else [] for c in cases])
                   for i in range(num_channels)]
    per_channel = np.array(per_channel)
    out = {}
    for i in range(num_channels):
        p005, med, p995 = np.percentile(per_channel[i], np.array(PERCENTILES))
        out[str(i)] = {"mean": float(np.mean(per_channel[i])), "median": float(med),
                       "std": float(np.std(per_channel[i])), "min": float(np.min(per_channel[i])),
                       "max": float(np.max(per_channel[i])), "percentile_99_5": float(p995),
                       "percentile_00_5": float(p005)}
    return out


class _LocalCaller:
    """Answers the protocol's counting round from in-memory site samples (the transport is tested end to end
    in test_ffe_federation.py)."""

    def __init__(self, samples: dict[str, LocalSamples]) -> None:
        self.samples = samples
        self.sites = list(samples)
        self.calls = 0

    def broadcast(self, request, arrays=None, timeout_s=None):
        assert isinstance(request, FingerprintCounts)
        self.calls += 1
        key_space = np.dtype(request.key_space)
        return {site: (FingerprintCountsReply(), {f"counts_{i}": s.bucket_counts(r.channel, key_space, r.lo,
                                                                                  arrays[f"edges_{i}"])
                                                   for i, r in enumerate(request.requests)})
                for site, s in self.samples.items()}


def _federate(sites: list[list[_CaseResult]], num_channels: int, coarse: bool = True) -> tuple[dict, int]:
    """The pooled fingerprint and the number of count rounds; ``coarse``: sites send coarse histograms with their
    summaries, as the sampling reply does."""
    samples = {f"s{i}": LocalSamples(f"s{i}", cases, num_channels) for i, cases in enumerate(sites)}
    summaries = [SiteSummary.from_dict(name, s.summary()) for name, s in samples.items()]
    caller = _LocalCaller(samples)
    sample_arrays = {name: s.coarse_histograms() for name, s in samples.items()} if coarse else None
    percentiles, rounds = _exact_percentiles(caller, summaries, lambda m: None, sample_arrays)
    return assemble_fingerprint(summaries, percentiles), rounds


def _assert_matches(fp: dict, ref: dict) -> None:
    for ch, expected in ref.items():
        got = fp["foreground_intensity_properties_per_channel"][ch]
        for key in ("min", "max", "median", "percentile_00_5", "percentile_99_5"):
            assert got[key] == expected[key], (ch, key, got[key], expected[key])
        for key in ("mean", "std"):
            assert got[key] == pytest.approx(expected[key], rel=1e-6), (ch, key)


def _rng_samples(rng, n, mean, std, dtype=np.float32) -> np.ndarray:
    return rng.normal(mean, std, n).astype(dtype)


def test_very_different_intensity_ranges_merge_exactly():
    # The reference implementation's failure case: site means 160 and 450. Averaging per-site statistics gives a
    # std near the within-site std; the pooled std is far larger.
    rng = np.random.default_rng(0)
    site_a = [_case(f"a{i}", [_rng_samples(rng, 5000, 160, 30)]) for i in range(4)]
    site_b = [_case(f"b{i}", [_rng_samples(rng, 5000, 450, 40)]) for i in range(6)]
    ref = _nnunet_pooled_stats([site_a, site_b], 1)
    fp, rounds = _federate([site_a, site_b], 1)
    _assert_matches(fp, ref)
    assert rounds == 1  # float32 keys: the coarse histograms fix the top 16 bits, one count round the rest
    assert fp["foreground_intensity_properties_per_channel"]["0"]["std"] > 130
    fp_without, rounds_without = _federate([site_a, site_b], 1, coarse=False)
    assert fp_without == fp and rounds_without == 2  # from the pooled min/max: two rounds, same result


def test_sites_with_different_sample_types_search_from_min_max():
    # A float64 site puts the search in float64 keys; a float32 site's coarse bins are in the other key space.
    rng = np.random.default_rng(7)
    site_a = [_case("a0", [_rng_samples(rng, 3000, 10, 3)])]
    site_b = [_case("b0", [_rng_samples(rng, 3000, 12, 3, np.float64)])]
    fp, rounds = _federate([site_a, site_b], 1)
    _assert_matches(fp, _nnunet_pooled_stats([site_a, site_b], 1))
    assert rounds == 4  # 64-bit keys, 16 bits a round


def test_coarse_histogram_that_disagrees_with_the_count_names_the_site():
    rng = np.random.default_rng(8)
    samples = {"s0": LocalSamples("s0", [_case("a0", [_rng_samples(rng, 500, 0, 1)])], 1)}
    summaries = [SiteSummary.from_dict("s0", samples["s0"].summary())]
    good = samples["s0"].coarse_histograms()
    bins, counts = good["coarse_bins_0"], good["coarse_counts_0"]
    assert bins.size > 2
    bad = [(bins[1:], counts[1:]),  # samples missing
           (bins[::-1], counts[::-1]),  # not increasing
           (bins + (1 << 16), counts),  # beyond 16 bits
           (bins, np.concatenate(([-counts[0]], counts[1:-1], [counts[-1] + 2 * counts[0]])))]  # negative
    for b, c in bad:
        with pytest.raises(FederationDataError, match="site s0: channel 0's coarse histogram"):
            _exact_percentiles(_LocalCaller(samples), summaries, lambda m: None,
                               {"s0": {"coarse_bins_0": b, "coarse_counts_0": c}})


def test_coarse_start_then_search_finds_exact_ranks():
    rng = np.random.default_rng(9)
    parts = [np.concatenate([rng.normal(0, 1, 700), rng.normal(1e4, 5, 300)]).astype(np.float32) for _ in range(3)]
    keys = [np.sort(float_to_key(p)) for p in parts]
    allv = np.sort(np.concatenate(parts))
    ranks = [0, 5, 1499, 2998, 2999]
    search = OrderStatisticSearch(ranks, int(min(k[0] for k in keys)), int(max(k[-1] for k in keys)))
    search.start_from_coarse(*pool_coarse([coarse_histogram(k) for k in keys]), np.dtype(np.uint32))
    assert len(search.requests()) <= len(ranks)
    search.update([sum(count_in_buckets(k, lo, e) for k in keys) for lo, e in search.requests()])
    assert search.done
    assert np.array_equal(key_to_float(search.keys(), np.float32), allv[ranks])


def test_site_with_single_case_and_two_channels():
    rng = np.random.default_rng(1)
    site_a = [_case("a0", [_rng_samples(rng, 3000, -500, 200), _rng_samples(rng, 3000, 3, 1)])]
    site_b = [_case(f"b{i}", [_rng_samples(rng, 3000, 40, 300), _rng_samples(rng, 3000, 1000, 5)])
              for i in range(3)]
    fp, _ = _federate([site_a, site_b], 2)
    _assert_matches(fp, _nnunet_pooled_stats([site_a, site_b], 2))


def test_case_without_foreground_promotes_like_nnunet():
    # nnU-Net concatenates [] for such a case, which turns the pooled samples into float64.
    rng = np.random.default_rng(2)
    empty = np.zeros(0, dtype=np.float32)
    site_a = [_case("a0", [_rng_samples(rng, 4001, 100, 20)]), _case("a1", [empty])]
    site_b = [_case("b0", [_rng_samples(rng, 3999, 130, 50)])]
    fp, _ = _federate([site_a, site_b], 1)
    _assert_matches(fp, _nnunet_pooled_stats([site_a, site_b], 1))
    assert LocalSamples("a", site_a, 1).summary()["empty_foreground_cases"] == 1


def test_ties_and_integer_valued_intensities():
    rng = np.random.default_rng(3)
    sites = [[_case(f"{s}{i}", [np.round(_rng_samples(rng, 2000, 50 * s, 10))]) for i in range(2)] for s in range(3)]
    fp, _ = _federate(sites, 1)
    _assert_matches(fp, _nnunet_pooled_stats(sites, 1))


def test_geometry_is_concatenated_and_median_relative_size_exact():
    rng = np.random.default_rng(4)
    site_a = [_case("a0", [_rng_samples(rng, 10, 1, 1)], (3.0, 1.0, 1.0), (20, 30, 30), 0.8)]
    site_b = [_case(f"b{i}", [_rng_samples(rng, 10, 1, 1)], (1.0, 0.5, 0.5), (40, 60, 60), 0.5 + i / 10)
              for i in range(2)]
    fp, _ = _federate([site_a, site_b], 1)
    assert fp["spacings"] == [[3.0, 1.0, 1.0], [1.0, 0.5, 0.5], [1.0, 0.5, 0.5]]
    assert fp["shapes_after_crop"] == [[20, 30, 30], [40, 60, 60], [40, 60, 60]]
    assert fp["median_relative_size_after_cropping"] == float(np.median([0.8, 0.5, 0.6]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_percentiles_bit_identical_to_numpy(dtype):
    rng = np.random.default_rng(5)
    for n in [1, 2, 3, 10, 199, 1000, 4567]:
        x = rng.normal(0, 100, n).astype(dtype)
        s = np.sort(x)
        pairs = percentile_ranks(n, PERCENTILES)
        got = linear_percentiles(n, PERCENTILES, s[[a for a, _ in pairs]], s[[b for _, b in pairs]])
        ref = np.percentile(x, np.array(PERCENTILES))
        assert got.dtype == ref.dtype
        assert np.array_equal(got.view(np.uint8), ref.view(np.uint8)), (n, got, ref)


def test_order_statistic_search_finds_exact_ranks_with_small_buckets():
    rng = np.random.default_rng(6)
    parts = [rng.normal(0, 1, 1000).astype(np.float32) for _ in range(3)]
    keys = [np.sort(float_to_key(p)) for p in parts]
    allv = np.sort(np.concatenate(parts))
    ranks = [0, 1, 1499, 2999]
    search = OrderStatisticSearch(ranks, int(min(k[0] for k in keys)), int(max(k[-1] for k in keys)), buckets=8)
    while not search.done:
        search.update([sum(count_in_buckets(k, lo, e) for k in keys) for lo, e in search.requests()])
    assert np.array_equal(key_to_float(search.keys(), np.float32), allv[ranks])


def test_float_keys_sort_like_floats():
    x = np.array([-np.inf, -3.5, -0.0, 0.0, 1e-30, 2.0, np.inf], dtype=np.float32)
    k = float_to_key(x)
    assert np.all(np.diff(k.astype(np.int64)) > 0)
    assert np.array_equal(key_to_float(k, np.float32).view(np.uint32), x.view(np.uint32))


def test_samples_per_case_uses_global_count():
    assert samples_per_case(27) == int(10e7 // 27)
    with pytest.raises(ValueError):
        samples_per_case(0)


def test_incompatible_sites_are_named():
    base = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}
    descs = {"901": DescribeReply(dataset_name="Dataset901_X", num_cases=3, dataset_json=base, version=""),
             "902": DescribeReply(dataset_name="Dataset902_X", num_cases=2,
                                  dataset_json={**base, "labels": {"background": 0, "b": 1}}, version=""),
             "903": DescribeReply(dataset_name="Dataset903_X", num_cases=0, dataset_json=base, version="")}
    with pytest.raises(FederationDataError) as err:
        check_compatible(descs)
    msg = str(err.value)
    assert "'labels' differs" in msg and "902" in msg and "901, 903" in msg
    assert "site 903" in msg and "no training cases" in msg
