"""Per-case dataset checks at a site, reported with the site and case named.

nnU-Net's ``verify_dataset_integrity`` prints its findings and then raises one generic error; a federation needs
the site and the case in the message that reaches the coordinator. Every file is first checked below nnU-Net's
reader (:mod:`.file_checks`: SimpleITK reads a cut-short ``.nii.gz`` as zeros and NaN as 0), then read with
nnU-Net's own reader for the dataset, so what passes here is what nnU-Net will read later.

Problems (the data cannot be used as they are) stop a federation before anything is written; warnings (legal
but suspicious: a constant or all-zero image, an empty label, an intensity range far outside the other cases')
are reported to the people running it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fednnunet.fingerprint.file_checks import file_problems
from fednnunet.fingerprint.site_dataset import training_cases

logger = logging.getLogger(__name__)

#: a case's intensity range of a channel is "far outside" the other cases' when it does not overlap the median range
#: of the site's cases ([median of the minima, median of the maxima]) at all, or when its width (max - min) is this
#: factor or more above or below the median width: data in other units or scaled (x 1000, 0-1 vs 0-4095)
RANGE_FACTOR = 10.0
#: fewest cases with a non-constant channel for the range comparison (the median of three outvotes one outlier)
RANGE_MIN_CASES = 3


@dataclass
class CaseCheck:
    """The findings of one case; messages without the site and case (:class:`SiteCheck` adds them)."""

    case: str
    files: list[str]  # relative to the dataset folder, images then label
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: per channel (min, max) as nnU-Net's reader reads it; None where the case was not read or is constant
    ranges: list[tuple[float, float] | None] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "error" if self.problems else "warning" if self.warnings else "ok"

    def channel_file(self, channel: int) -> str:
        """The image file holding ``channel`` (one per channel, or one RGB file holding three)."""
        images = self.files[:-1]
        return images[min(channel, len(images) - 1)]


@dataclass
class SiteCheck:
    """Every case of a site checked: problems stop a federation, warnings are reported to the people running it."""

    site: str
    dataset_name: str
    folder: str
    cases: list[CaseCheck]
    reader: str | None = None  # nnU-Net's reader class for the dataset
    dataset_problems: list[str] = field(default_factory=list)  # not tied to one case, already naming the site

    @property
    def problems(self) -> list[str]:
        return self.dataset_problems + [f"site {self.site}, case {c.case}: {p}" for c in self.cases for p in c.problems]

    @property
    def warnings(self) -> list[str]:
        return [f"site {self.site}, case {c.case}: {w}" for c in self.cases for w in c.warnings]


def check_site_cases(site: str, dataset_name: str, num_processes: int = 1) -> SiteCheck:
    """Check every case of this site: each file below nnU-Net's reader (:mod:`.file_checks`), then the case as
    nnU-Net's reader reads it; ``num_processes`` cases at a time."""
    folder, dataset_json, cases = training_cases(site, dataset_name)
    result = SiteCheck(site, dataset_name, folder, [])
    if dataset_json.get("numTraining") not in (None, len(cases)):
        result.dataset_problems.append(f"site {site}: dataset.json says numTraining={dataset_json['numTraining']} "
                                       f"but {len(cases)} cases were found")
    if not cases:
        result.dataset_problems.append(f"site {site}: no training cases in {folder}")
        return result
    rw_class, reader_problem = _reader_class(dataset_json, cases)
    result.reader = rw_class.__name__ if rw_class else None
    if reader_problem:
        result.dataset_problems.append(f"site {site}: {reader_problem}")
    spec = _CaseSpec(folder, rw_class, list(dataset_json["channel_names"].values()),
                     _label_values(dataset_json["labels"]), dataset_json["labels"].get("ignore"))
    jobs = [(case, files["images"], files["label"], spec) for case, files in sorted(cases.items())]
    if num_processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            result.cases = pool.starmap(_check_case, jobs)
    else:
        result.cases = [_check_case(*job) for job in jobs]
    _warn_far_ranges(result.cases, spec.channel_names)
    for message in [*result.problems, *result.warnings]:  # for the site's log; callers show them to people
        logger.info(message)
    return result


@dataclass
class _CaseSpec:
    """What every case is checked against (sent to worker processes)."""

    folder: str
    reader: type | None  # nnU-Net's reader class for the dataset; None when no reader reads its files
    channel_names: list[str]
    labels: set[int]
    ignore_label: int | None


def _reader_class(dataset_json: dict, cases: dict[str, dict]) -> tuple[type | None, str | None]:
    """nnU-Net's reader for the dataset, chosen as nnU-Net does from an example image (the first that exists);
    or the problem. Should no reader read that one (it is then reported with its case), the first image that
    passes the file checks is tried, so that the other cases are still checked."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    images = [f for c in cases.values() for f in c["images"][:1] if os.path.isfile(f)]
    if not images:
        return None, "no case has its first image"
    problem = None
    for example in (images[0], next((f for f in images[1:] if not file_problems(f)), None)):
        if example is None:
            break
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # nnU-Net prints each reader's traceback; reported below
                return determine_reader_writer_from_dataset_json(dataset_json, example, verbose=False), None
        except Exception as err:  # nnU-Net raises RuntimeError, or what the imaging library raised
            problem = problem or f"no nnU-Net reader reads {example} ({type(err).__name__}: {err})"
    return None, problem


def _check_case(case: str, images: list[str], label: str, spec: _CaseSpec) -> CaseCheck:
    files = [*images, label]
    check = CaseCheck(case, [os.path.relpath(f, spec.folder) for f in files])
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        check.problems.append(f"missing file(s) {', '.join(missing)}")
        return check
    for f, name in zip(files, check.files):
        check.problems += [f"file {name}: {p}" for p in file_problems(f)]
    if check.problems or spec.reader is None:
        return check  # what nnU-Net's reader would make of a damaged file is no further use
    try:
        rw = spec.reader()
        image, img_props = rw.read_images(images)
        seg, seg_props = rw.read_seg(label)
    except Exception as err:  # corrupt files surface as anything from the imaging libraries
        check.problems.append(f"cannot read its files ({type(err).__name__}: {err})")
        return check
    if image.shape[0] != len(spec.channel_names):  # one file per channel, or one RGB file holding three
        check.problems.append(f"{image.shape[0]} channel(s) read, dataset.json names {len(spec.channel_names)}")
        return check
    check.problems += _geometry_problems(image, img_props, seg, seg_props)
    for ch, name in enumerate(spec.channel_names):
        where = f"file {check.channel_file(ch)} (channel {ch}, {name})"
        lo, hi = float(image[ch].min()), float(image[ch].max())  # NaN or Inf anywhere make one of them non-finite
        if not (np.isfinite(lo) and np.isfinite(hi)):
            n_nan = int(np.isnan(image[ch]).sum())
            n_inf = int(np.isinf(image[ch]).sum())
            check.problems += [f"{where}: image contains {n} {what} values" for n, what in
                               ((n_nan, "NaN"), (n_inf, "infinite")) if n]
            check.ranges.append(None)
        elif lo == hi:
            check.warnings.append(f"{where}: image is {'all zero' if lo == 0 else f'constant ({lo:g})'}")
            check.ranges.append(None)
        else:
            check.ranges.append((lo, hi))
    check.problems += _label_problems(check.files[-1], seg, spec, check.warnings)
    return check


def _label_values(labels: dict[str, Any]) -> set[int]:
    values: set[int] = set()
    for v in labels.values():
        values.update(v if isinstance(v, (list, tuple)) else [v])
    return {int(v) for v in values}


def _geometry_problems(images: np.ndarray, img_props: dict, seg: np.ndarray, seg_props: dict) -> list[str]:
    problems = []
    if images.shape[1:] != seg.shape[1:]:
        problems.append(f"image shape {images.shape[1:]} differs from label shape {seg.shape[1:]}")
    if not np.allclose(img_props.get("spacing"), seg_props.get("spacing"), rtol=1e-4):
        problems.append(f"image spacing {img_props.get('spacing')} differs from label spacing "
                        f"{seg_props.get('spacing')}")
    return problems


def _label_problems(name: str, seg: np.ndarray, spec: _CaseSpec, warnings: list[str]) -> list[str]:
    """Problems of the label as nnU-Net reads it; an empty label (legal, but suspicious) goes to ``warnings``."""
    if np.isnan(seg).any():
        return [f"file {name}: label contains NaN values"]
    present = set(np.unique(seg).astype(int).tolist())
    unexpected = sorted(present - spec.labels)
    if unexpected:
        return [f"file {name}: label values {unexpected} are not in dataset.json labels {sorted(spec.labels)}"]
    if not present - {0, spec.ignore_label}:
        warnings.append(f"file {name}: label is empty (background only)")
    return []


def _warn_far_ranges(cases: list[CaseCheck], channel_names: list[str]) -> None:
    """Warn where a case's intensity range of a channel is far outside the other cases' (:data:`RANGE_FACTOR`).
    The medians over all the site's cases are the reference: a minority of outliers does not move them."""
    for ch, name in enumerate(channel_names):
        ranges = {i: c.ranges[ch] for i, c in enumerate(cases) if len(c.ranges) > ch and c.ranges[ch] is not None}
        if len(ranges) < RANGE_MIN_CASES:
            continue
        table = np.array(list(ranges.values()))
        ref_lo, ref_hi = float(np.median(table[:, 0])), float(np.median(table[:, 1]))
        ref_width = float(np.median(table[:, 1] - table[:, 0]))
        for i, (lo, hi) in ranges.items():
            width = hi - lo
            if hi < ref_lo or lo > ref_hi:
                why = "no overlap"
            elif width >= RANGE_FACTOR * ref_width:
                why = f"{width / ref_width:.0f} times as wide"
            elif width * RANGE_FACTOR <= ref_width:
                why = f"{ref_width / width:.0f} times narrower"
            else:
                continue
            cases[i].warnings.append(f"file {cases[i].channel_file(ch)} (channel {ch}, {name}): intensity range "
                                     f"[{lo:g}, {hi:g}] is far outside the other cases' (median range "
                                     f"[{ref_lo:g}, {ref_hi:g}]): {why}")
