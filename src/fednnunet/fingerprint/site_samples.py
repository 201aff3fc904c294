"""Site side of federated fingerprint extraction: sample like nnU-Net, reveal only aggregates.

Each case is analysed by nnU-Net's own ``DatasetFingerprintExtractor.analyze_case`` with the per-case sample count
of the *pooled* dataset, so the samples are exactly the ones nnU-Net would draw for this case on pooled data.
The samples stay in this process (as order keys); the server only ever receives counts, sums, extremes,
and bucket counts for its percentile search (the first round of them as a coarse histogram with the summary).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from fednnunet.fingerprint.order_stats import BLOCK, coarse_histogram, count_in_buckets, float_to_key, key_to_float

logger = logging.getLogger(__name__)


@dataclass
class _CaseResult:
    case: str
    shape_after_crop: list[int]
    spacing: list[float]
    samples: list[np.ndarray]  # per channel; empty when the case has no foreground (LocalSamples keeps none)
    relative_size: float


def _analyze(case: str, images: list[str], label: str, reader_writer_class: type, num_samples: int) -> _CaseResult:
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    shape, spacing, samples, _stats, rel = DatasetFingerprintExtractor.analyze_case(
        images, label, reader_writer_class, num_samples)
    samples = [np.asarray(s) for s in samples]
    return _CaseResult(case, [int(v) for v in shape], [float(v) for v in spacing], samples, float(rel))


@dataclass
class CaseAnalysis:
    """Every training case of a site analysed by nnU-Net's ``analyze_case`` with ``samples_per_case`` samples.

    It can be run before the server has told the site the pooled case count (while Flower carries the ``describe``
    reply and the next request, about 4-5 s): the site's own count bounds the per-case sample count from above,
    and with one channel the pooled count's samples are a prefix of these (:meth:`reusable_for`)."""

    site: str
    samples_per_case: int
    cases: list[_CaseResult]
    num_channels: int

    @classmethod
    def run(cls, site: str, dataset_name: str, samples_per_case: int, num_processes: int = 1) -> "CaseAnalysis":
        """Analyse every training case of this site's raw dataset with nnU-Net's own per-case code."""
        from batchgenerators.utilities.file_and_folder_operations import join, load_json
        from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
        from nnunetv2.paths import nnUNet_raw
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

        folder = join(nnUNet_raw, dataset_name)
        dataset_json = load_json(join(folder, "dataset.json"))
        dataset = get_filenames_of_train_images_and_targets(folder, dataset_json)
        if not dataset:
            raise ValueError(f"site {site}: dataset {dataset_name} has no training cases")
        first = next(iter(dataset.values()))["images"][0]
        rw = determine_reader_writer_from_dataset_json(dataset_json, first)
        jobs = [(k, v["images"], v["label"], rw, samples_per_case) for k, v in dataset.items()]
        if num_processes <= 1:
            results = [_analyze(*j) for j in jobs]
        else:
            with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
                results = pool.starmap(_analyze, jobs)
        logger.info("site %s: analysed %d cases (%d samples per case)", site, len(results), samples_per_case)
        return cls(site, samples_per_case, results, len(dataset_json["channel_names"]))

    @staticmethod
    def prefix_is_exact(num_channels: int) -> bool:
        """Whether the first n of a case's N samples are nnU-Net's n-sample draw, for data of ``num_channels``.

        nnU-Net draws a case's samples with ``RandomState(1234).choice`` once per channel, one generator for all
        channels: the first n of N draws are the n-sample draw, but a second channel's draws start after the
        first channel's N, so they would differ. Hence one channel only."""
        return num_channels == 1

    def reusable_for(self, samples_per_case: int) -> bool:
        """Whether this analysis holds the ``samples_per_case`` analysis exactly (see :meth:`prefix_is_exact`)."""
        return self.prefix_is_exact(self.num_channels) and samples_per_case <= self.samples_per_case

    def truncated(self, samples_per_case: int) -> "CaseAnalysis":
        """The analysis nnU-Net gives with ``samples_per_case`` (see :meth:`reusable_for`)."""
        if not self.reusable_for(samples_per_case):
            raise ValueError(f"site {self.site}: an analysis of {self.num_channels} channel(s) with "
                             f"{self.samples_per_case} samples per case cannot stand for {samples_per_case}")
        cases = [dataclasses.replace(c, samples=[s[:samples_per_case] for s in c.samples]) for c in self.cases]
        return CaseAnalysis(self.site, samples_per_case, cases, self.num_channels)


class LocalSamples:
    """This site's foreground samples, kept per channel as order keys (unsorted) for the percentile search.

    Only the keys are kept (the values are their exact inverse) and the summary is computed once, here."""

    @classmethod
    def of(cls, analysis: CaseAnalysis) -> "LocalSamples":
        return cls(analysis.site, analysis.cases, analysis.num_channels)

    def __init__(self, site: str, cases: Sequence[_CaseResult], num_channels: int) -> None:
        self.site = site
        dtypes = {s.dtype for c in cases for s in c.samples if s.size}
        self.sample_dtype = np.result_type(*dtypes) if dtypes else np.dtype(np.float32)
        self._keys: list[np.ndarray] = []
        self._key_space: list[np.dtype] = []  # the float type each channel's keys encode
        self._channels: list[dict[str, Any]] = []
        for ch in range(num_channels):
            parts = [c.samples[ch] for c in cases if c.samples[ch].size]
            values = (np.concatenate(parts) if parts else np.zeros(0)).astype(self.sample_dtype, copy=False)
            if np.isnan(values).any():
                raise ValueError(f"site {site}: channel {ch} has NaN foreground intensities")
            self._channels.append(_moments(values))
            self._keys.append(float_to_key(values) if values.size else np.zeros(0, np.uint32))
            self._key_space.append(self.sample_dtype)
        #: cases without foreground voxels (nnU-Net samples nothing from them); reported, not an error
        self.empty_cases = [c.case for c in cases if any(s.size == 0 for s in c.samples)]
        # case geometry only: the samples live on as keys
        self.cases = [dataclasses.replace(c, samples=[]) for c in cases]

    def summary(self) -> dict[str, Any]:
        """Aggregates for the server: per-case geometry (as in nnU-Net's fingerprint) and per-channel moments."""
        return {
            "spacings": [c.spacing for c in self.cases],
            "shapes_after_crop": [c.shape_after_crop for c in self.cases],
            "relative_sizes": [c.relative_size for c in self.cases],
            "channels": self._channels,
            "sample_dtype": str(self.sample_dtype),
            "empty_foreground_cases": len(self.empty_cases),
        }

    def coarse_histograms(self) -> dict[str, np.ndarray]:
        """Per channel, the first count round answered in advance (``coarse_bins_C``, ``coarse_counts_C``), in the
        key space of this site's sample type; the server uses them when every site holds the same type."""
        out = {}
        for ch, keys in enumerate(self._keys):
            out[f"coarse_bins_{ch}"], out[f"coarse_counts_{ch}"] = coarse_histogram(keys)
        return out

    def bucket_counts(self, channel: int, key_space: np.dtype, lo: int, edges: np.ndarray) -> np.ndarray:
        """How many of this site's samples of ``channel`` fall in each bucket of the server's request."""
        key_space = np.dtype(key_space)
        if self._key_space[channel] != key_space:
            # another site's samples have a wider type; the search runs in its key space from now on, so the keys
            # are converted once and replace the originals (no second copy is kept)
            values = key_to_float(self._keys[channel], self._key_space[channel])
            self._keys[channel] = float_to_key(values.astype(key_space, copy=False))
            self._key_space[channel] = key_space
        return count_in_buckets(self._keys[channel], lo, edges)


def _moments(values: np.ndarray) -> dict[str, Any]:
    """Count, float64 mean, sum of squared deviations, min and max, in blocks (no float64 copy of 10**8 values)."""
    if not values.size:
        return {"count": 0, "mean": 0.0, "m2": 0.0, "min": 0.0, "max": 0.0}
    mean = float(values.mean(dtype=np.float64))
    m2 = 0.0
    for start in range(0, values.size, BLOCK):
        dev = values[start:start + BLOCK].astype(np.float64)
        dev -= mean
        m2 += float(dev @ dev)
    return {"count": int(values.size), "mean": mean, "m2": m2, "min": float(values.min()), "max": float(values.max())}
