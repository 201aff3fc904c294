"""The sites' training replies checked against what the coordinator expects, before anything uses them.

Why (issue 24: site replies are data): a site's reply comes from another organisation's machine. The protocol has
checked its shape (types of every field); these are the checks of its content that only the coordinator can make:

* ``train_init`` (:func:`check_site_infos`): the names that reach file names are plain identifiers equal to the
  coordinator's own (``-tr``, the configuration); with FFE, the plans, fingerprint, dataset.json fields, key map and
  mirroring axes the global model is written with must be the same at every site (else no global model can speak
  for all of them); the FedAvg weights are fixed from the counts separately (aggregation/site_weights.py);
* a trainer rebuilt after a lost session (:func:`check_rebuilt`) must be the one the run fixed;
* every round's update (:func:`check_round_reply`): the model's names, shapes and wire dtypes, finite values, the
  metrics the loop reads, the training-case count fixed at ``train_init``, and the delivered-model report.

A failed check raises :class:`~fednnunet.aggregation.SiteReplyError` (``train_init``: the run stops) or
:class:`~fednnunet.aggregation.UpdateRejected` (a round: the site is left out of it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from fednnunet.aggregation import ModelSpec, UpdateRejected, validate_metrics, validate_update, wire_spec
from fednnunet.aggregation.site_weights import SiteReplyError, fingerprint_digest
from fednnunet.identifiers import check_identifier
from fednnunet.protocol.messages import TrainInitReply, TrainRoundReply
from fednnunet.training.delivered import check_delivered
from fednnunet.training.options import TrainOptions

__all__ = ["check_count", "check_rebuilt", "check_round_reply", "check_site_infos", "check_site_names"]

Arrays = dict[str, np.ndarray]

#: Plans fields that name the site's own dataset: the only ones in which FFE sites' plans may differ.
_PLANS_OWN_FIELDS = ("dataset_name",)
#: dataset.json fields the predictor reads the network's inputs and outputs from: equal at every FFE site.
_DATASET_SHARED_FIELDS = ("channel_names", "labels", "regions_class_order")
#: The round metrics the loop reads, with their types (every other numeric metric must be finite too).
_ROUND_METRICS = {"train_loss": float, "epoch_seconds": float, "num_training_cases": int}


def check_site_names(site: str, trainer_name: Any, configuration: Any, options: TrainOptions) -> None:
    """The names a reply states that reach file names must be identifiers and exactly the coordinator's own."""
    for field_, value, expected in (("trainer_name", trainer_name, options.trainer),
                                    ("configuration", configuration, options.configuration)):
        try:
            name = check_identifier(value, field_)
        except ValueError as err:
            raise SiteReplyError(site, field_, str(err)) from None
        if name != expected:
            raise SiteReplyError(site, field_, f"{name!r}, but this run trains {expected!r}")


def check_site_infos(infos: Mapping[str, TrainInitReply], options: TrainOptions, asym: bool,
                     spec: ModelSpec | None = None) -> dict[str, Any] | None:
    """Check the sites' ``train_init`` replies against what the coordinator expects; raise :class:`SiteReplyError`
    (naming the site and the field) otherwise.

    Every site: ``trainer_name`` and ``configuration`` are identifiers equal to the run's own (``-tr``, the job's
    configuration). FFE also: every site's plans are identical apart from the dataset name, name this run's plans
    (``-p``) and hold its configuration; the merged fingerprints are identical (``site_weights``); the dataset.json
    fields the predictor uses (channels, labels, regions), the checkpoint's key map, the normalization layers'
    weights and the mirroring axes are identical, and the key map and those weights name only parameters of the
    network (``spec``). Returns, for FFE, what
    :func:`~fednnunet.training.export.write_global_model` writes beside the global model (taken from the sites only
    after these checks); None for AsymFedAvg (no global model).
    """
    for site, info in sorted(infos.items()):
        check_site_names(site, info.trainer_name, info.configuration, options)
    if asym:
        return None
    sites = sorted(infos)
    first = sites[0]

    def same(field_: str, value_of: Callable[[TrainInitReply], Any]) -> Any:
        reference = value_of(infos[first])
        for s in sites[1:]:
            if value_of(infos[s]) != reference:
                raise SiteReplyError(s, field_, f"differs from site {first}'s; FedAvg needs sites planned together "
                                     "(plan_and_preprocess with all of them)")
        return reference

    for s in sites:
        plans = infos[s].plans
        if not isinstance(plans, Mapping):
            raise SiteReplyError(s, "plans", "missing (plan_and_preprocess first)")
        if plans.get("plans_name") != options.plans:
            raise SiteReplyError(s, "plans", f"plans_name {plans.get('plans_name')!r}, but this run uses "
                                 f"{options.plans!r}")
        if not isinstance(plans.get("configurations"), Mapping) or options.configuration not in plans["configurations"]:
            raise SiteReplyError(s, "plans", f"no configuration {options.configuration!r}")
        if not isinstance(infos[s].dataset_json, Mapping):
            raise SiteReplyError(s, "dataset_json", "missing")
        if not isinstance(infos[s].dataset_fingerprint, Mapping):
            raise SiteReplyError(s, "dataset_fingerprint", "missing (plan_and_preprocess first)")
    same("plans", lambda i: {k: v for k, v in i.plans.items() if k not in _PLANS_OWN_FIELDS})
    same("dataset_fingerprint", lambda i: fingerprint_digest(i.dataset_fingerprint))
    same("dataset_json", lambda i: {k: i.dataset_json.get(k) for k in _DATASET_SHARED_FIELDS})
    state_keys = same("state_keys", lambda i: i.state_keys)
    if (not isinstance(state_keys, Mapping) or not state_keys
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in state_keys.items())
            or (spec is not None and not set(state_keys.values()) <= set(spec.params))):
        raise SiteReplyError(", ".join(sites), "state_keys", "not a map of checkpoint keys to the network's "
                             "parameters")
    normalization = same("normalization", lambda i: i.normalization)
    if not all(isinstance(k, str) for k in normalization) or (spec is not None and not set(normalization)
                                                              <= set(spec.params)):
        raise SiteReplyError(", ".join(sites), "normalization", "not a list of the network's parameters")
    axes = same("inference_allowed_mirroring_axes", lambda i: i.inference_allowed_mirroring_axes)
    if axes is not None and (not isinstance(axes, list) or len(axes) > 3 or len(set(axes)) != len(axes) or not all(
            isinstance(a, int) and not isinstance(a, bool) and 0 <= a < 3 for a in axes)):
        raise SiteReplyError(", ".join(sites), "inference_allowed_mirroring_axes", f"not a list of axes: {axes!r}")
    return {"trainer_name": options.trainer, "configuration": options.configuration,
            "plans": infos[first].plans, "dataset_json": infos[first].dataset_json,
            "dataset_fingerprint": infos[first].dataset_fingerprint, "state_keys": dict(state_keys),
            "inference_allowed_mirroring_axes": axes}


def check_rebuilt(site: str, info: TrainInitReply, options: TrainOptions, cases: int) -> None:
    """A trainer rebuilt after a lost session must be the one the run fixed at ``train_init``: the same names and
    training-case count (``ValueError`` otherwise)."""
    check_site_names(site, info.trainer_name, info.configuration, options)
    check_count(info.num_training_cases, cases)


def check_round_reply(reply: TrainRoundReply, update: Arrays, spec: ModelSpec, transfer_dtype: str,
                      cases: int) -> None:
    """Raise :class:`UpdateRejected` unless a round's reply is an update of the site's network (``spec``) as the
    wire carries it, with its metrics, the training-case count fixed at ``train_init`` and, if present, a
    delivered-model report."""
    validate_update(update, wire_spec(spec, transfer_dtype))
    validate_metrics(reply.metrics, _ROUND_METRICS)
    check_count(reply.metrics["num_training_cases"], cases)
    if "delivered" in reply.metrics:
        check_delivered(reply.metrics["delivered"])


def check_count(count: Any, fixed: int) -> None:
    """A reply's training-case count must be the one fixed at train_init (an integer: ``validate_metrics``)."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or int(count) != fixed:
        text = repr(count)
        raise UpdateRejected(f"num_training_cases {text if len(text) <= 40 else text[:37] + '...'} is not the "
                             f"{fixed} fixed at train_init")
