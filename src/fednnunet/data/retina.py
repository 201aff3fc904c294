"""Four real retinal-vessel sites (DRIVE, STARE, CHASE_DB1, RC-SLO) as nnU-Net v2 raw datasets.

The source is the folder described in ``shared/data/retina-vessels/README.md`` (one sub-folder per
collection, RGB uint8 TIFF images, single-channel uint8 TIFF masks). The data are never copied into
this repository or shipped with the package; this module only converts a local copy.

Format, identical for all four sites (the federation requires equal channels, labels and file ending):

* ``file_ending`` ``.png``, read by nnU-Net's ``NaturalImage2DIO``: this is nnU-Net's own recipe for
  2D natural RGB images (its ``Dataset120_RoadSegmentation`` conversion). PNG is lossless, one file per
  case holds the three colour channels, and the reader returns them as three channels of shape
  ``(3, 1, H, W)``. Pixel spacing is unknown for these collections (treat as 1 x 1); NaturalImage2DIO
  reports the nominal 2D spacing ``(999, 1, 1)``, so HD95 on these datasets is in pixels of the
  converted images.
* ``channel_names`` ``{"0": "R", "1": "G", "2": "B"}``. The green channel alone carries most vessel
  contrast and is a common hand-made choice, but nnU-Net's approach is to avoid hand-made
  preprocessing: it z-scores each channel per image and lets the network weigh them. Keeping RGB also
  keeps the colour differences between cameras, which are part of the site heterogeneity the
  federation is meant to face. The cost is only the first convolution and the input I/O.
* ``labels`` ``{"background": 0, "vessel": 1}``. Masks stored as 0/255 are normalised to 0/1; any
  other value is refused.

All cases of a site go to ``imagesTr``/``labelsTr`` (DRIVE: its train and test folders, 40 cases;
STARE 10; CHASE_DB1 8, first annotator; RC-SLO 10): nnU-Net's 5-fold cross-validation splits them.
Case identifiers are ``<SITE>_<source id>``, e.g. ``DRIVE_21``, ``CHASEDB1_Image_11L``.

``downsample`` (integer factor ``d``, default 1 = original resolution) makes a CPU benchmark feasible.
Height and width are first cropped to multiples of ``d`` (at most ``d - 1`` rows/columns at the bottom
and right, outside the circular field of view in these images), then images are area-averaged over
``d x d`` blocks (rounded back to uint8) and masks take the block majority, ties going to vessel (a
block is vessel when at least half of it is), so vessels about half a block wide do not vanish. The
factor is recorded in ``dataset.json`` under ``fednnunet_source.downsample``: multiply pixel HD95 by
it to get original pixels.

Writing is atomic: every site is written to a temporary folder inside ``out_dir`` and renamed into
place only after all four are complete.

A pair of sites that differ the way crops differ from whole photographs (issue 28, item 5:
:func:`convert_retina_crop_pair`): DRIVE's 20 test images whole (``DRIVEWhole``) and its 20 training images each
cropped to a window of ``1/crop`` of the height and width around the structure, the window with the most vessel
pixels (where the large vessels leave the optic disc; ``DRIVECrop``). The crops are downsampled ``crop`` times
less, so both sites' images have about the same size in pixels while a crop's vessels are ``crop`` times as wide:
one camera, one population, and only the field of view differs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fednnunet.data.raw_layout import write_raw_datasets

logger = logging.getLogger(__name__)

__all__ = ["convert_retina_vessels", "convert_retina_crop_pair", "SITES", "CHANNEL_NAMES", "LABELS", "FILE_ENDING"]

CHANNEL_NAMES: dict[str, str] = {"0": "R", "1": "G", "2": "B"}
LABELS: dict[str, int] = {"background": 0, "vessel": 1}
FILE_ENDING = ".png"


@dataclass(frozen=True)
class _Part:
    """One image folder of a collection and how its image names map to mask names."""

    image_dir: str  # relative to the collection folder
    label_dir: str
    image_pattern: str  # regex on the file stem, group "id" is the case id
    label_stem: str  # format string with {id}


@dataclass(frozen=True)
class _Site:
    name: str  # used in the dataset name and case identifiers
    folder: str  # sub-folder of the source
    parts: tuple[_Part, ...]
    citation: str
    license: str


SITES: tuple[_Site, ...] = (
    _Site(
        "DRIVE",
        "drive",
        (
            _Part("train/img", "train/label", r"(?P<id>\d+)_training", "{id}_manual1"),
            _Part("test/img", "test/label", r"(?P<id>\d+)_test", "{id}_manual1"),
        ),
        "Staal et al., Ridge-based vessel segmentation in color images of the retina, IEEE TMI 23(4), 2004",
        "research use with citation",
    ),
    _Site(
        "STARE",
        "stare",
        (_Part("test/image", "test/label", r"(?P<id>im\d+)", "{id}"),),
        "Hoover et al., Locating blood vessels in retinal images by piecewise threshold probing, IEEE TMI 19(3), 2000",
        "research use with citation",
    ),
    _Site(
        "CHASEDB1",
        "chase_db1",
        (_Part("test/img", "test/label", r"(?P<id>Image_\d+[LR])", "{id}_1stHO"),),
        "Owen et al., Measuring retinal vessel tortuosity in 10-year-old children, IOVS 50(5), 2009",
        "CC BY 4.0",
    ),
    _Site(
        "RCSLO",
        "rc-slo",
        (_Part("test/img", "test/label", r"(?P<id>[A-Za-z0-9_-]+)", "{id}"),),
        "Zhang et al., Robust retinal vessel segmentation via locally adaptive derivative frames, "
        "IEEE TMI 35(12), 2016",
        "research use with citation",
    ),
)


def _tifs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".tif", ".tiff")
                  and not p.name.startswith("."))


def _find_cases(src: Path, site: _Site) -> list[tuple[str, Path, Path]]:
    """(case identifier, image file, label file) for one site; ValueError if the layout is unexpected."""
    root = src / site.folder
    if not root.is_dir():
        raise ValueError(f"{src}: collection folder {site.folder!r} for site {site.name} is missing")
    cases: list[tuple[str, Path, Path]] = []
    for part in site.parts:
        img_dir, lab_dir = root / part.image_dir, root / part.label_dir
        for d in (img_dir, lab_dir):
            if not d.is_dir():
                raise ValueError(f"{root}: expected folder {d.relative_to(root)} for site {site.name} is missing")
        images = _tifs(img_dir)
        if not images:
            raise ValueError(f"{img_dir}: no .tif images for site {site.name}")
        missing: list[str] = []
        for img in images:
            m = re.fullmatch(part.image_pattern, img.stem)
            if m is None:
                raise ValueError(f"{img_dir}: unexpected image name {img.name!r} for site {site.name} "
                                 f"(expected stems matching {part.image_pattern!r})")
            label_stem = part.label_stem.format(id=m["id"])
            label = next((lab_dir / (label_stem + ext) for ext in (img.suffix, ".tif", ".tiff")
                          if (lab_dir / (label_stem + ext)).is_file()), None)
            if label is None:
                missing.append(label_stem + img.suffix)
                continue
            cases.append((f"{site.name}_{m['id']}", img, label))
        if missing:
            raise ValueError(f"{lab_dir}: missing label file(s) for site {site.name}: {', '.join(missing)}")
    ids = [c[0] for c in cases]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"{root}: duplicate case ids for site {site.name}: {dupes}")
    return cases


def _read_case(image_file: Path, label_file: Path) -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    image = tifffile.imread(image_file)
    label = tifffile.imread(label_file)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{image_file}: expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    if label.ndim != 2 or label.shape != image.shape[:2]:
        raise ValueError(f"{label_file}: expected a single-channel mask of shape {image.shape[:2]}, got {label.shape}")
    values = np.unique(label)
    if not set(values.tolist()) <= {0, 1, 255}:
        raise ValueError(f"{label_file}: mask values must be 0/1 (or 0/255), found {values.tolist()[:10]}")
    return image, (label > 0).astype(np.uint8)


def _downsample(image: np.ndarray, label: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    if d == 1:
        return image, label
    h, w = (image.shape[0] // d) * d, (image.shape[1] // d) * d
    if h == 0 or w == 0:
        raise ValueError(f"downsample factor {d} is larger than the image {image.shape[:2]}")
    img = image[:h, :w].reshape(h // d, d, w // d, d, 3).mean(axis=(1, 3))
    lab = label[:h, :w].reshape(h // d, d, w // d, d).mean(axis=(1, 3))
    return np.rint(img).astype(np.uint8), (lab >= 0.5).astype(np.uint8)


def _most_vessels_window(label: np.ndarray, crop: int) -> tuple[slice, slice]:
    """The window of ``1/crop`` of the height and width holding the most vessel pixels (the first such, scanning
    rows then columns): an integral image gives every window's count at once."""
    h, w = label.shape[0] // crop, label.shape[1] // crop
    if h == 0 or w == 0:
        raise ValueError(f"crop factor {crop} is larger than the image {label.shape}")
    integral = np.pad(label.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    counts = integral[h:, w:] - integral[:-h, w:] - integral[h:, :-w] + integral[:-h, :-w]
    top, left = np.unravel_index(int(np.argmax(counts)), counts.shape)
    return slice(int(top), int(top) + h), slice(int(left), int(left) + w)


def _cropped(image: np.ndarray, label: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = _most_vessels_window(label, crop)
    return image[rows, cols], label[rows, cols]


def _write_site(folder: Path, site: _Site, cases: list[tuple[str, Path, Path]], downsample: int,
                crop: int = 1) -> None:
    """``crop`` > 1: each case cropped around its vessels (:func:`_cropped`) before the downsampling."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    from skimage import io

    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    vessel_px = total_px = 0
    shapes = set()
    for case_id, image_file, label_file in cases:
        image, label = _read_case(image_file, label_file)
        if crop > 1:
            image, label = _cropped(image, label, crop)
        image, label = _downsample(image, label, downsample)
        io.imsave(folder / "imagesTr" / f"{case_id}_0000{FILE_ENDING}", image, check_contrast=False)
        io.imsave(folder / "labelsTr" / f"{case_id}{FILE_ENDING}", label, check_contrast=False)
        vessel_px += int(label.sum())
        total_px += label.size
        shapes.add(label.shape)
        if not label.any():
            logger.warning("%s: %s has no vessel pixels after downsampling by %d", site.name, case_id, downsample)
    generate_dataset_json(
        str(folder), CHANNEL_NAMES, LABELS, len(cases), FILE_ENDING,
        reference=site.citation,  # generate_dataset_json 2.8.1 stores `release` under "citation"
        dataset_name=folder.name,
        description=f"Retinal vessel segmentation, site {site.name} (RGB fundus/SLO images, 2D)",
        license=site.license,
        converted_by="fednnunet.data.retina",
        fednnunet_source={"site": site.name, "collection": site.folder, "downsample": downsample,
                          **({"crop": crop} if crop > 1 else {})},
    )
    logger.info("%s: %d cases, shapes %s, vessel fraction %.3f", site.name, len(cases), sorted(shapes),
                vessel_px / max(total_px, 1))


def _check_factor(value: object, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_first_id(first_id: int, count: int) -> None:
    if not 1 <= first_id <= 999 - (count - 1):
        raise ValueError(f"first_id must be in 1..{999 - count + 1} (nnU-Net dataset ids), got {first_id}")


def convert_retina_crop_pair(src: Path, out_dir: Path, first_id: int, downsample: int = 8, crop: int = 2
                             ) -> list[Path]:
    """Write ``Dataset{first_id}_DRIVEWhole`` (DRIVE's test images, whole, downsampled ``downsample`` times) and
    ``Dataset{first_id + 1}_DRIVECrop`` (its training images cropped around their vessels to ``1/crop`` of each
    side, downsampled ``downsample / crop`` times): two sites whose images differ only in field of view (module
    docstring). ``downsample`` must be a multiple of ``crop``. Raises as :func:`convert_retina_vessels`."""
    src, out_dir = Path(src), Path(out_dir)
    downsample, crop = _check_factor(downsample, "downsample"), _check_factor(crop, "crop")
    if crop < 2 or downsample % crop:
        raise ValueError(f"crop must be >= 2 and divide downsample ({downsample}), got {crop}")
    _check_first_id(first_id, 2)
    if not src.is_dir():
        raise ValueError(f"{src}: retina-vessels source folder does not exist")
    drive = SITES[0]
    cases = _find_cases(src, drive)
    train_dir = src / drive.folder / drive.parts[0].image_dir
    whole = [c for c in cases if c[1].parent != train_dir]
    cropped = [c for c in cases if c[1].parent == train_dir]
    sites = [_Site("DRIVEWhole", drive.folder, drive.parts[1:], drive.citation, drive.license),
             _Site("DRIVECrop", drive.folder, drive.parts[:1], drive.citation, drive.license)]

    def write(i: int, folder: Path) -> None:
        if i == 0:
            _write_site(folder, sites[0], whole, downsample)
        else:
            _write_site(folder, sites[1], cropped, downsample // crop, crop)

    targets = write_raw_datasets(out_dir, first_id, [site.name for site in sites], write)
    logger.info("wrote %s (downsample %d, crop %d)", ", ".join(t.name for t in targets), downsample, crop)
    return targets


def convert_retina_vessels(src: Path, out_dir: Path, first_id: int, downsample: int = 1) -> list[Path]:
    """Write ``Dataset{first_id}_DRIVE``, ``+1 _STARE``, ``+2 _CHASEDB1``, ``+3 _RCSLO`` into ``out_dir``.

    Returns the four dataset folders in that order. See the module docstring for the format.

    Raises:
        ValueError: ``src`` does not have the expected layout (the message names the folder and what is
            missing), a file is not as expected, or the arguments are out of range.
        FileExistsError: ``out_dir`` already holds a ``DatasetNNN_*`` folder with one of the four ids.
    """
    src, out_dir = Path(src), Path(out_dir)
    downsample = _check_factor(downsample, "downsample")
    _check_first_id(first_id, len(SITES))
    if not src.is_dir():
        raise ValueError(f"{src}: retina-vessels source folder does not exist")
    all_cases = [_find_cases(src, site) for site in SITES]  # validate the whole layout before writing

    targets = write_raw_datasets(out_dir, first_id, [site.name for site in SITES],
                                 lambda i, folder: _write_site(folder, SITES[i], all_cases[i], downsample))
    logger.info("wrote %s (downsample %d)", ", ".join(t.name for t in targets), downsample)
    return targets
