"""Synthetic multi-site federation in nnU-Net v2 raw format.

Why: federated nnU-Net is only interesting when sites differ the way hospitals do (scanner spacing, field
of view, intensity calibration, noise, cohort size). Real multi-site data cannot ship with the package, so
this module writes small datasets that (a) a U-Net learns in a few dozen iterations, (b) pass nnU-Net's own
``verify_dataset_integrity`` and plan/preprocess with the stock planner, and (c) differ between sites
enough that a naive fingerprint merge visibly goes wrong (site foreground means around 160, 450 and 280).

Each case holds one or two objects: a bright core (label 2) inside a less bright ring (label 1) on a
smooth, strictly nonzero background with Gaussian noise. Geometry is drawn in millimetres so objects keep
their physical size across site spacings. One site has a zero-valued border so nnU-Net's crop-to-nonzero
changes the shape (``shapes_after_crop`` differs from the raw shape), and one case per federation has a
tiny object (very little foreground, but never none).

Randomness is derived from ``SeedSequence([seed, site_index, case_index])`` so a site's data do not depend
on how many sites are written, and the same seed gives byte-identical arrays.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fednnunet.data.raw_layout import write_raw_datasets

logger = logging.getLogger(__name__)

__all__ = ["write_demo_federation", "LABELS", "FILE_ENDING"]

#: Identical across sites: the federation refuses sites whose labels, channels or file ending differ.
LABELS: dict[str, int] = {"background": 0, "ring": 1, "core": 2}
FILE_ENDING = ".nii.gz"


@dataclass(frozen=True)
class _SiteProfile:
    """What makes one synthetic hospital different from the others."""

    name: str
    spacing: tuple[float, ...]  # numpy axis order: (y, x) for 2D, (z, y, x) for 3D, in mm
    shape: tuple[int, ...]  # nominal array shape in numpy axis order
    shape_jitter: int  # per-case +/- variation of the in-plane size (voxels)
    num_cases: int
    background: float  # mean background level
    ring: float  # ring intensity level
    core: float  # core intensity level
    noise: float  # Gaussian noise sigma
    zero_border: int  # width (voxels) of an exactly-zero frame; 0 for none


# Three archetypes; more sites cycle through them with a deterministic twist (see _profile).
_BASE_2D = (
    dict(spacing=(1.0, 1.0), shape=(64, 64), shape_jitter=0, num_cases=6,
         background=70.0, ring=140.0, core=200.0, noise=6.0, zero_border=0),
    dict(spacing=(0.7, 0.7), shape=(88, 80), shape_jitter=4, num_cases=9,
         background=180.0, ring=400.0, core=540.0, noise=35.0, zero_border=0),
    dict(spacing=(1.25, 1.25), shape=(52, 56), shape_jitter=3, num_cases=12,
         background=120.0, ring=240.0, core=340.0, noise=15.0, zero_border=3),
)
_BASE_3D = (
    dict(spacing=(1.0, 1.0, 1.0), shape=(32, 40, 40), shape_jitter=0, num_cases=6,
         background=70.0, ring=140.0, core=200.0, noise=6.0, zero_border=0),
    dict(spacing=(3.0, 0.9, 0.9), shape=(20, 48, 44), shape_jitter=3, num_cases=9,
         background=180.0, ring=400.0, core=540.0, noise=35.0, zero_border=0),
    dict(spacing=(1.5, 1.2, 1.2), shape=(28, 36, 36), shape_jitter=2, num_cases=12,
         background=120.0, ring=240.0, core=340.0, noise=15.0, zero_border=2),
)

# The site index and case index (within that site) of the deliberately tiny object.
_TINY_CASE = (1, 0)


def _site_name(index: int) -> str:
    """SiteA, SiteB, ..., SiteZ, SiteAA, ...: unique, letters only, valid in nnU-Net folder names."""
    letters = ""
    n = index
    while True:
        letters = chr(ord("A") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return "Site" + letters


def _profile(index: int, dim: int, scale: float = 1.0) -> _SiteProfile:
    """Site profile: the archetype ``index % 3``, varied for each further cycle so no two sites are equal;
    ``scale`` multiplies the image size (same spacing: a larger field of view around objects of the same size)."""
    base = dict((_BASE_2D if dim == 2 else _BASE_3D)[index % 3])
    base["shape"] = tuple(max(8, round(n * scale)) for n in base["shape"])
    cycle = index // 3
    if cycle:
        # Later cycles: slightly different resolution, calibration and cohort size.
        factor = 1.0 + 0.1 * cycle
        base["spacing"] = tuple(round(s * factor, 4) for s in base["spacing"])
        for key in ("background", "ring", "core"):
            base[key] = base[key] * (1.0 + 0.25 * cycle)
        base["num_cases"] = max(4, base["num_cases"] - 2 * cycle)
    return _SiteProfile(name=_site_name(index), **base)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A smooth field in roughly [-1, 1] (a few low-frequency cosines): cheap stand-in for a bias field."""
    grids = np.meshgrid(*[np.linspace(0.0, 1.0, n) for n in shape], indexing="ij")
    field = np.zeros(shape, dtype=np.float64)
    for _ in range(3):
        freq = rng.uniform(0.3, 1.5, size=len(shape))
        phase = rng.uniform(0.0, 2 * np.pi)
        field += np.cos(sum(f * np.pi * g for f, g in zip(freq, grids)) + phase)
    return field / 3.0


def _make_case(profile: _SiteProfile, rng: np.random.Generator, tiny: bool) -> tuple[np.ndarray, np.ndarray]:
    """One image (float32) and its label map (uint8), same shape, in numpy axis order."""
    ndim = len(profile.shape)
    shape = list(profile.shape)
    # In-plane size varies a little per case (different reconstruction FOVs within one hospital).
    for ax in range(ndim - 2, ndim):
        if profile.shape_jitter:
            shape[ax] += int(rng.integers(-profile.shape_jitter, profile.shape_jitter + 1))
    shape_t = tuple(shape)
    spacing = np.asarray(profile.spacing)
    coords = np.meshgrid(*[(np.arange(n) + 0.0) * s for n, s in zip(shape_t, spacing)], indexing="ij")
    # Objects must stay clear of the image edge (and of a zero border, if any).
    margin = (profile.zero_border + 1) * spacing
    fov = np.asarray(shape_t) * spacing
    label = np.zeros(shape_t, dtype=np.uint8)
    num_objects = 1 if tiny else int(rng.choice([1, 1, 2]))
    half_diag = 0.5 * float(np.sqrt(np.sum(spacing**2)))
    for _ in range(num_objects):
        if tiny:
            r_core = 1.05 * half_diag
            thickness = 2.1 * half_diag
        else:
            r_core = rng.uniform(3.0, 7.0)
            thickness = rng.uniform(2.5, 5.0)
        r_outer = r_core + thickness
        axes = rng.uniform(0.8, 1.2, size=ndim)  # slightly elliptic
        extent = r_outer * axes + margin
        lo, hi = extent, np.maximum(fov - extent, extent + 1e-3)
        center = rng.uniform(lo, hi)
        dist = np.sqrt(sum(((c - m) / a) ** 2 for c, m, a in zip(coords, center, axes)))
        ring_mask = (dist <= r_outer) & (label == 0)
        label[ring_mask] = 1
        label[dist <= r_core] = 2
        # Guarantee both labels are present, however small the object.
        idx = tuple(int(np.clip(np.rint(m / s), 0, n - 1)) for m, s, n in zip(center, spacing, shape_t))
        if not (label == 2).any():
            label[idx] = 2
        if not (label == 1).any():
            nb = list(idx)
            nb[-1] = idx[-1] + 1 if idx[-1] + 1 < shape_t[-1] else idx[-1] - 1
            label[tuple(nb)] = 1

    gain = rng.uniform(0.9, 1.1)  # per-case calibration drift within a site
    background = profile.background * (1.0 + 0.15 * _smooth_field(rng, shape_t))
    image = np.where(label == 2, profile.core, np.where(label == 1, profile.ring, background))
    image = gain * image + rng.normal(0.0, profile.noise, size=shape_t)
    # nnU-Net crops to nonzero: keep the object/background strictly positive, never exactly zero.
    image = np.maximum(image, 0.05 * profile.background)
    if profile.zero_border:
        b = profile.zero_border
        inner = tuple(slice(b, n - b) for n in shape_t)
        framed = np.zeros_like(image)
        framed[inner] = image[inner]
        image = framed
    return image.astype(np.float32), label


def _write_nifti(array: np.ndarray, spacing_numpy_order: tuple[float, ...], path: Path) -> None:
    """Write with SimpleITK; a 2D array becomes a 2D NIfTI, which nnU-Net's SimpleITKIO reads as (1, 1, H, W)."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_numpy_order)))  # sitk wants (x, y[, z])
    sitk.WriteImage(img, str(path), useCompression=True)


def _write_dataset(folder: Path, profile: _SiteProfile, site_index: int, seed: int, ct: bool) -> None:
    """Write imagesTr/, labelsTr/ and dataset.json of one site into ``folder``."""
    images, labels = folder / "imagesTr", folder / "labelsTr"
    images.mkdir()
    labels.mkdir()
    for case in range(profile.num_cases):
        rng = np.random.default_rng(np.random.SeedSequence([seed, site_index, case]))
        tiny = (site_index, case) == _TINY_CASE
        image, label = _make_case(profile, rng, tiny)
        case_id = f"{profile.name.lower()}_{case:03d}"
        _write_nifti(image, profile.spacing, images / f"{case_id}_0000{FILE_ENDING}")
        _write_nifti(label, profile.spacing, labels / f"{case_id}{FILE_ENDING}")
    dataset_json = {
        "channel_names": {"0": "CT" if ct else "MRI"},
        "labels": dict(LABELS),
        "numTraining": profile.num_cases,
        "file_ending": FILE_ENDING,
        "name": profile.name,
        "description": "fednnunet synthetic demo site (ring = label 1, core = label 2)",
        "licence": "CC0-1.0",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=4) + "\n")


def write_demo_federation(out_dir: Path, first_id: int = 901, sites: int = 3, dim: int = 2, seed: int = 0,
                          ct: bool = False, scale: float = 1.0) -> list[Path]:
    """Writes one nnU-Net raw dataset per site: out_dir/DatasetNNN_<name>/{imagesTr,labelsTr,dataset.json}; returns the dataset folders.

    Sites get ids ``first_id, first_id + 1, ...`` and names ``SiteA, SiteB, ...``. ``dim`` is 2 or 3;
    ``ct=True`` names the channel ``"CT"`` so nnU-Net normalizes with the (federated) fingerprint's
    percentiles instead of per-image z-scoring. ``scale`` > 1 makes larger images (for example 3D sites for which
    nnU-Net plans the ``3d_lowres`` -> ``3d_cascade_fullres`` cascade). All datasets are first built in hidden temporary folders
    inside ``out_dir`` and renamed into place only when every site is complete, so a crash never leaves a
    half-written dataset that nnU-Net would pick up.

    Raises:
        ValueError: bad ``dim``, ``sites`` or id range (nnU-Net ids have at most three digits).
        FileExistsError: a ``DatasetNNN_*`` folder with one of the ids already exists in ``out_dir``.
    """
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim!r}")
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites!r}")
    if not 0.25 <= scale <= 8:
        raise ValueError(f"scale must be between 0.25 and 8, got {scale!r}")
    profiles = [_profile(i, dim, scale) for i in range(sites)]

    def write(i: int, folder: Path) -> None:
        profile = profiles[i]
        folder.mkdir()
        _write_dataset(folder, profile, i, seed, ct)
        logger.info("site %s: %d cases, spacing %s mm, shape ~%s, levels bg/ring/core %.0f/%.0f/%.0f, "
                    "noise %.0f%s", profile.name, profile.num_cases, profile.spacing, profile.shape,
                    profile.background, profile.ring, profile.core, profile.noise,
                    f", zero border {profile.zero_border}" if profile.zero_border else "")

    targets = write_raw_datasets(Path(out_dir), first_id, [p.name for p in profiles], write)
    logger.info("wrote %d synthetic %dD site(s) to %s", sites, dim, out_dir)
    return targets
