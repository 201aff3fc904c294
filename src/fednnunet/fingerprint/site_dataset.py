"""What a site's dataset is: its name under ``nnUNet_raw``, its dataset.json and its training cases.

Kept apart from the case checks (:mod:`.integrity`) because every stage needs it, not only the checks: the site
worker learns its dataset's name here, and the describe reply is built from it. Importing this module loads
neither nnU-Net nor an imaging library (nnU-Net reads its folders from the environment at import, and a worker
loads its stages lazily): they are imported when a function runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SiteDataset:
    """What the coordinator needs to know of a site's dataset before merging anything."""

    dataset_name: str
    num_cases: int
    dataset_json: dict[str, Any]


def resolve_dataset(site: str, dataset: str | int) -> str:
    """The name of the dataset (id or name) under ``nnUNet_raw``; a ValueError naming the site if it is not there
    or has no dataset.json."""
    from batchgenerators.utilities.file_and_folder_operations import isfile, join
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_raw:
        raise ValueError(f"site {site}: the environment variable nnUNet_raw is not set")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as err:
        raise ValueError(f"site {site}: dataset {dataset} not found under nnUNet_raw={nnUNet_raw}") from err
    if not isfile(join(nnUNet_raw, name, "dataset.json")):
        raise ValueError(f"site {site}: {join(nnUNet_raw, name)} has no dataset.json")
    return name


def training_cases(site: str, dataset_name: str) -> tuple[str, dict, dict[str, dict]]:
    """The dataset's folder, dataset.json and training cases as nnU-Net lists them."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    folder = join(nnUNet_raw, dataset_name)
    dataset_json = load_json(join(folder, "dataset.json"))
    try:
        return folder, dataset_json, get_filenames_of_train_images_and_targets(folder, dataset_json)
    except Exception as err:  # nnU-Net raises assorted errors for broken layouts
        raise ValueError(f"site {site}: cannot list the training cases of {dataset_name}: {err}") from err


def describe_site(site: str, dataset: str | int) -> SiteDataset:
    """The site's dataset (id or name) as the coordinator sees it: name, case count and dataset.json."""
    name = resolve_dataset(site, dataset)
    _, dataset_json, cases = training_cases(site, name)
    return SiteDataset(name, len(cases), dataset_json)
