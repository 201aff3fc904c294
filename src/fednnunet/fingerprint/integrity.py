"""Per-case dataset checks at a site, reported with the site and case named.

nnU-Net's ``verify_dataset_integrity`` prints its findings and then raises one generic error; a federation needs
the site and the case in the message that reaches the coordinator. The files are read with nnU-Net's own
reader for the dataset, so what passes here is what nnU-Net will read later.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def describe_site(site: str, dataset: str | int) -> dict[str, Any]:
    """What the server needs to know before merging: dataset name, case count and the dataset.json fields."""
    from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    if not nnUNet_raw:
        raise ValueError(f"site {site}: the environment variable nnUNet_raw is not set")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as err:
        raise ValueError(f"site {site}: dataset {dataset} not found under nnUNet_raw={nnUNet_raw}") from err
    folder = join(nnUNet_raw, name)
    if not isfile(join(folder, "dataset.json")):
        raise ValueError(f"site {site}: {folder} has no dataset.json")
    dataset_json = load_json(join(folder, "dataset.json"))
    try:
        cases = get_filenames_of_train_images_and_targets(folder, dataset_json)
    except Exception as err:  # nnU-Net raises assorted errors for broken layouts
        raise ValueError(f"site {site}: cannot list the training cases of {name}: {err}") from err
    return {"site": site, "dataset_name": name, "num_cases": len(cases), "dataset_json": dataset_json}


def check_site_cases(site: str, dataset_name: str) -> list[str]:
    """Problems of every case at this site (empty list when all is well); each names site, case and file."""
    from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    folder = join(nnUNet_raw, dataset_name)
    dataset_json = load_json(join(folder, "dataset.json"))
    cases = get_filenames_of_train_images_and_targets(folder, dataset_json)
    expected_labels = _label_values(dataset_json["labels"])
    num_channels = len(dataset_json["channel_names"])
    problems: list[str] = []
    if dataset_json.get("numTraining") not in (None, len(cases)):
        problems.append(f"site {site}: dataset.json says numTraining={dataset_json['numTraining']} "
                        f"but {len(cases)} cases were found")
    if not cases:
        return problems + [f"site {site}: no training cases in {folder}"]
    rw_class = None
    for case, files in sorted(cases.items()):
        where = f"site {site}, case {case}"
        missing = [f for f in [*files["images"], files["label"]] if not isfile(f)]
        if missing:
            problems.append(f"{where}: missing file(s) {', '.join(missing)}")
            continue
        try:
            rw_class = rw_class or determine_reader_writer_from_dataset_json(dataset_json, files["images"][0])
            rw = rw_class()
            images, img_props = rw.read_images(files["images"])
            seg, seg_props = rw.read_seg(files["label"])
        except Exception as err:  # corrupt files surface as anything from the imaging libraries
            problems.append(f"{where}: cannot read its files ({type(err).__name__}: {err})")
            continue
        if images.shape[0] != num_channels:  # one file per channel, or one RGB file holding three
            problems.append(f"{where}: {images.shape[0]} channel(s) read, dataset.json names {num_channels}")
            continue
        problems += _case_problems(where, images, img_props, seg, seg_props, expected_labels)
    for p in problems:
        logger.error(p)
    return problems


def _label_values(labels: dict[str, Any]) -> set[int]:
    values: set[int] = set()
    for v in labels.values():
        values.update(v if isinstance(v, (list, tuple)) else [v])
    return {int(v) for v in values}


def _case_problems(where: str, images: np.ndarray, img_props: dict, seg: np.ndarray, seg_props: dict,
                   expected_labels: set[int]) -> list[str]:
    problems = []
    if images.shape[1:] != seg.shape[1:]:
        problems.append(f"{where}: image shape {images.shape[1:]} differs from label shape {seg.shape[1:]}")
    if not np.allclose(img_props.get("spacing"), seg_props.get("spacing"), rtol=1e-4):
        problems.append(f"{where}: image spacing {img_props.get('spacing')} differs from label spacing "
                        f"{seg_props.get('spacing')}")
    n_nan = int(np.isnan(images).sum())
    if n_nan:
        problems.append(f"{where}: image contains {n_nan} NaN values")
    if np.isinf(images).any():
        problems.append(f"{where}: image contains infinite values")
    if np.isnan(seg).any():
        problems.append(f"{where}: label contains NaN values")
    else:
        unexpected = sorted(set(np.unique(seg).astype(int).tolist()) - expected_labels)
        if unexpected:
            problems.append(f"{where}: label values {unexpected} are not in dataset.json labels "
                            f"{sorted(expected_labels)}")
    return problems
