"""Checks that must pass before anything is merged: every site describes the same task.

A pooled fingerprint only makes sense when all sites have the same channels, labels and file ending; a mismatch
is reported naming the sites and the differing values rather than failing later inside nnU-Net.
"""

from __future__ import annotations

import json
from typing import Mapping

from fednnunet.protocol.messages import DescribeReply

#: dataset.json fields that must be identical at every site.
SHARED_FIELDS = ("channel_names", "labels", "file_ending", "regions_class_order")


class FederationDataError(ValueError):
    """Sites' datasets cannot be federated; the message names the sites and the problem."""


def check_compatible(descriptions: Mapping[str, DescribeReply]) -> None:
    """Raise :class:`FederationDataError` unless every site has the same :data:`SHARED_FIELDS` values."""
    problems = []
    for field in SHARED_FIELDS:
        groups: dict[str, list[str]] = {}
        for site, desc in descriptions.items():
            value = desc.dataset_json.get(field)
            groups.setdefault(json.dumps(value, sort_keys=True), []).append(site)
        if len(groups) > 1:
            parts = "; ".join(f"{', '.join(sites)}: {value}" for value, sites in groups.items())
            problems.append(f"'{field}' differs between sites ({parts})")
    for site, desc in descriptions.items():
        if desc.num_cases < 1:
            problems.append(f"site {site}: dataset {desc.dataset_name} has no training cases")
    if problems:
        raise FederationDataError("sites cannot be federated: " + " | ".join(problems))
