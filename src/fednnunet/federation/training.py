"""Federated nnU-Net training, server side: FedAvg on FFE plans, or AsymFedAvg on per-site plans.

One round = ``epochs_per_round`` nnU-Net epochs at every site (the paper: one epoch), then aggregation:

* FFE (all sites planned from the merged fingerprint, identical networks): every site starts from the first
  site's initial weights, and every round all sites receive the same weighted FedAvg model.
* AsymFedAvg (``--asym``, after ``plan_and_preprocess --asym``): every site keeps its own architecture; each
  round layers that are compatible (same name and shape) are averaged (``asym_fedavg``, scope ``all``/``any``)
  and every site gets back its own model.

Why the loop lives here and not in a Flower Strategy: AsymFedAvg sends different content to each site, sites
may be left out of a round (errors, ``--round-timeout``) while the run goes on (``--min-sites``), and the
server state must be saved atomically after every round so that ``--resume`` can continue. The trainers
themselves live in the site workers (``fednnunet.site.training_session``), built once per run.

Site replies are data (issue 24): folders and the number of rounds come from the coordinator's own options only
(``-tr``, ``-p``, the job's configuration, ``--rounds`` or :func:`default_epochs`); the names a site replies must be
plain identifiers equal to them, the plans/dataset/fingerprint JSONs written beside the global model are taken
only when every FFE site holds the same ones (:func:`check_site_infos`), and the FedAvg weights are fixed at
``train_init`` from counts bounded by the merged fingerprint (aggregation/site_weights.py); a round's reply with
another count is an update rejection. ``--clip-update-norm`` bounds each site's update (aggregation/robust.py).

Outputs in the job's out dir (per fold in ``fold_X/`` when several folds run): ``metrics.jsonl`` (one JSON line
per round), ``progress.png``, ``state/`` (``state.json`` + ``round_NNNN.npz``), and in FFE mode the global model in
nnU-Net's layout under ``global/<trainer>__<plans>__<configuration>/fold_X/``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fednnunet.aggregation import (WIRE_DTYPES, ModelSpec, SiteOrderedAdds, StreamingAsymAverager, StreamingAverager,
                                   UpdateRejected, from_wire, to_wire, validate_metrics, validate_update, wire_spec)
from fednnunet.aggregation.momentum import MOMENTUM_MODES, ServerMomentum, split_momentum
from fednnunet.aggregation.robust import check_max_norm, clip_update
from fednnunet.aggregation.site_weights import (FixedWeights, SiteReplyError, check_resumed, fingerprint_digest,
                                                fix_site_weights)
from fednnunet.federation.delivered import (BEST_PREFIX, BestDelivered, check_delivered, pooled_dice,
                                            validates_round)
from fednnunet.federation.events import EventLog
from fednnunet.federation.job import JobSpec
from fednnunet.identifiers import check_identifier
from fednnunet.planning.site_planning import write_json_atomic

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]

__all__ = ["TrainOptions", "run_training_task", "load_state", "save_state", "default_epochs", "check_identifier",
           "check_site_infos", "write_global_model"]

STATE_DIR = "state"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "progress.png"
#: The plot is redrawn at most this often (and after the last round): drawing it takes a core for a few tenths of a
#: second, which short rounds would pay every time while the sites transfer.
PLOT_EVERY_S = 30.0
_SEP = "::"  # site and parameter name in the keys of an AsymFedAvg state file

# Options that only the server uses; everything else is sent to the sites as their trainer configuration.
_SERVER_ONLY = ("folds", "weighting", "min_sites", "round_timeout_s", "init_timeout_s", "finish_timeout_s",
                "resume", "asym_scope", "skip_validation", "validation_only", "validate_delivered_every",
                "server_momentum", "clip_update_norm")
#: Name prefix of the server momentum's velocity in a saved FFE state (beside the global model's arrays).
_VELOCITY_PREFIX = "server_velocity/"


@dataclass
class TrainOptions:
    """The training options of a job (``JobSpec.train``); nnU-Net flags mean what they mean for nnUNetv2_train."""

    configuration: str = "2d"
    folds: list[str] = field(default_factory=lambda: ["0"])
    trainer: str = "nnUNetTrainer"
    plans: str = "nnUNetPlans"
    device: str = "cpu"
    npz: bool = False
    continue_training: bool = False  # --c: in a federation the same as --resume
    pretrained_weights: str | None = None
    validation_only: bool = False  # --val
    val_best: bool = False
    disable_checkpointing: bool = False
    skip_validation: bool = False  # no final validation (not an nnU-Net flag; for quick CPU runs)
    rounds: int | None = None  # default: default_epochs(trainer) / epochs_per_round (the coordinator's own rule)
    iterations_per_round: int | None = None
    val_iterations: int | None = None
    epochs_per_round: int = 1
    weighting: str = "cases"
    min_sites: int | None = None  # default: all sites
    round_timeout_s: float | None = None
    init_timeout_s: float = 3600.0
    finish_timeout_s: float = 4 * 3600.0
    resume: bool = False
    asym_scope: str = "all"
    da_workers: int | None = None
    transfer_dtype: str = "float32"  # float16 halves the bytes of every round (see aggregation/wire.py)
    seed: int | None = None  # seeds every site's generators; the server then adds updates in site order
    validate_delivered_every: int = 1  # validate the delivered model every N rounds (0: never; federation/delivered.py)
    momentum: str = "local"  # the sites' SGD momentum: kept, reset or averaged each round (aggregation/momentum.py)
    server_momentum: float = 0.0  # FedAvgM's beta at the server (FFE only; 0: plain FedAvg)
    clip_update_norm: float | None = None  # bound on the L2 norm of each site's update (aggregation/robust.py)

    def __post_init__(self) -> None:
        # these name folders (at the sites and in the coordinator's global/ model folder)
        for name in ("configuration", "trainer", "plans"):
            check_identifier(getattr(self, name), name)
        if self.clip_update_norm is not None:
            self.clip_update_norm = check_max_norm(self.clip_update_norm)
        self.folds = [str(f) for f in self.folds]
        for f in self.folds:
            if f != "all" and not f.isdigit():
                raise ValueError(f"fold must be an integer or 'all', got {f!r}")
        if not self.folds:
            raise ValueError("at least one fold is needed")
        if self.weighting not in ("cases", "uniform"):
            raise ValueError(f"weighting must be 'cases' or 'uniform', got {self.weighting!r}")
        if self.momentum not in MOMENTUM_MODES:
            raise ValueError(f"momentum must be one of {', '.join(MOMENTUM_MODES)}, got {self.momentum!r}")
        if isinstance(self.server_momentum, bool) or not 0.0 <= float(self.server_momentum) < 1.0:
            raise ValueError(f"server_momentum must be in [0, 1), got {self.server_momentum!r}")
        if self.server_momentum and self.momentum == "average":
            raise ValueError("server momentum and averaged site momentum are two answers to the same question: "
                             "choose one")
        if self.transfer_dtype not in WIRE_DTYPES:
            raise ValueError(f"transfer_dtype must be one of {', '.join(WIRE_DTYPES)}, got {self.transfer_dtype!r}")
        if self.asym_scope not in ("all", "any"):
            raise ValueError(f"asym_scope must be 'all' or 'any', got {self.asym_scope!r}")
        for name in ("rounds", "iterations_per_round", "val_iterations", "epochs_per_round", "min_sites"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("seed", "validate_delivered_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.round_timeout_s is not None and self.round_timeout_s <= 0:
            raise ValueError("round_timeout_s must be positive")
        if self.validation_only and (self.continue_training or self.resume):
            raise ValueError("--val only validates an existing model; it cannot be combined with --c/--resume")
        if self.val_best and not self.validate_delivered_every:
            raise ValueError("--val_best validates checkpoint_best.pth, the best delivered model, which needs the "
                             "delivered-model validation (--validate-delivered-every N > 0)")
        if self.pretrained_weights and (self.continue_training or self.resume):
            raise ValueError("pretrained weights only apply at the start of a training, not with --c/--resume")
        if self.rounds is None and not self.validation_only and default_epochs(self.trainer) is None:
            raise ValueError(f"the number of rounds of trainer {self.trainer} is unknown to the coordinator: give "
                             "--rounds (defaults exist only for nnUNetTrainer, 1000 epochs, and nnU-Net's "
                             "nnUNetTrainer_<N>epochs variants)")

    def total_rounds(self) -> int:
        """``rounds``, or the default from the trainer's name (never from a site): its epochs / epochs per round."""
        if self.rounds is not None:
            return int(self.rounds)
        epochs = default_epochs(self.trainer)
        if epochs is None:
            raise ValueError(f"give --rounds: trainer {self.trainer} has no default known to the coordinator")
        return max(1, epochs // self.epochs_per_round)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**dict(data))

    def asdict(self) -> dict[str, Any]:
        return asdict(self)

    def site_config(self, fold: str, continue_training: bool) -> dict[str, Any]:
        """What a site needs to build its trainer (see ``TrainingSession``)."""
        cfg = {k: v for k, v in self.asdict().items() if k not in _SERVER_ONLY}
        cfg.update(fold=fold, continue_training=continue_training)
        if continue_training:
            cfg["pretrained_weights"] = None
        return cfg


#: nnU-Net's default training length (nnUNetTrainer.num_epochs)
NNUNET_DEFAULT_EPOCHS = 1000
#: nnU-Net's naming convention for trainers that only change the number of epochs (nnUNetTrainer_5epochs,
#: nnUNetTrainer_1epoch, nnUNetTrainer_250epochs_NoMirroring, ...)
_EPOCHS_VARIANT = re.compile(r"^nnUNetTrainer_([1-9][0-9]{0,5})epochs?(_NoMirroring)?$")


def default_epochs(trainer: str) -> int | None:
    """The epochs of ``trainer`` as the coordinator knows them: 1000 for nnUNetTrainer, N for nnU-Net's
    ``nnUNetTrainer_<N>epochs`` variants; None for any other trainer (then ``--rounds`` is required)."""
    if trainer == "nnUNetTrainer":
        return NNUNET_DEFAULT_EPOCHS
    match = _EPOCHS_VARIANT.match(trainer)
    return int(match.group(1)) if match else None


# --- server state ----------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: a crash never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state(out: Path, round_: int, models: Mapping[str, Arrays], asym: bool,
               history: list[dict[str, Any]], extra: Mapping[str, Any], best: Mapping[str, Any] | None = None,
               best_models: Mapping[str, Arrays] | None = None) -> Path:
    """Save the weights after ``round_`` and the metric history; the previous weights file is removed after.

    FFE keeps one model under the key ``global``; AsymFedAvg one per site. The weights go to
    ``round_NNNN.npz`` (plain arrays, loaded with ``allow_pickle=False``), then ``state.json`` names it: the
    JSON is replaced last, so it always points at a complete weights file. ``best``: the best delivered model's
    score and round (federation/delivered.py); ``best_models``: its weights, when they changed since the last
    save (``best_NNNN.npz``, written before the JSON like the round's weights).
    """
    state_dir = out / STATE_DIR
    npz = _save_models(state_dir / f"round_{round_:04d}.npz", models, asym)
    previous = load_state(out) or {}
    state = {"round": round_, "weights_file": npz.name, "asym": asym, "sites": sorted(models) if asym else None,
             "history": history, **extra, "best": _best_entry(out, previous, best, best_models, asym)}
    write_json_atomic(state_dir / STATE_FILE, state)
    _remove_replaced(out, previous, state)
    return npz


def save_best(out: Path, best: Mapping[str, Any], best_models: Mapping[str, Arrays], asym: bool) -> None:
    """Record a new best delivered model in the saved state (e.g. the final model, after the last round)."""
    previous = load_state(out) or {}
    state = {**previous, "best": _best_entry(out, previous, best, best_models, asym)}
    write_json_atomic(out / STATE_DIR / STATE_FILE, state)
    _remove_replaced(out, previous, state)


def _best_entry(out: Path, previous: Mapping[str, Any], best: Mapping[str, Any] | None,
                best_models: Mapping[str, Arrays] | None, asym: bool) -> dict[str, Any] | None:
    """The state's ``best`` entry; ``best_models`` (new since the last save) go to ``best_NNNN.npz`` first."""
    if best is None:
        return None
    weights_file = (previous.get("best") or {}).get("weights_file")
    if best_models is not None:
        weights_file = _save_models(out / STATE_DIR / f"best_{int(best['model_round']):04d}.npz", best_models,
                                    asym).name
    return {**best, "weights_file": weights_file}


def _remove_replaced(out: Path, previous: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """Delete the weights files ``previous`` named and ``state`` (already written) no longer does."""
    named = {state.get("weights_file"), (state.get("best") or {}).get("weights_file")}
    for old in (previous.get("weights_file"), (previous.get("best") or {}).get("weights_file")):
        if old is not None and old not in named:
            (out / STATE_DIR / old).unlink(missing_ok=True)


def _save_models(npz: Path, models: Mapping[str, Arrays], asym: bool) -> Path:
    flat = {(f"{site}{_SEP}{name}" if asym else name): arr
            for site, model in models.items() for name, arr in model.items()}
    _atomic_write(npz, lambda f: np.savez(f, **flat))
    return npz


def load_state(out: Path) -> dict[str, Any] | None:
    path = out / STATE_DIR / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_models(out: Path, state: Mapping[str, Any], weights_file: str | None = None) -> dict[str, Arrays]:
    """The models saved with ``state``: ``{"global": ...}`` (FFE) or ``{site: ...}`` (AsymFedAvg); those of
    ``weights_file`` (e.g. the best delivered model's) instead of the last round's when given."""
    models: dict[str, Arrays] = {}
    with np.load(out / STATE_DIR / (weights_file or state["weights_file"]), allow_pickle=False) as data:
        for key in data.files:
            if state.get("asym"):
                site, name = key.split(_SEP, 1)
            else:
                site, name = "global", key
            models.setdefault(site, {})[name] = data[key]
    return models


# --- reporting ---------------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    return "nan" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
        else f"{value:.{digits}f}"


def round_line(record: Mapping[str, Any]) -> str:
    """The one line per round a person watches: per-site FedAvg weight (when the record has them), loss /
    pseudo-Dice / epoch seconds, the delivered model's pseudo-Dice (per site, and pooled), wall and overhead."""
    parts = [f"round {record['round']}/{record['rounds']}"]
    weights = record.get("weights") or {}
    total = sum(weights.values()) or 1.0
    norms = record.get("update_norms") or {}
    for site, m in record["sites"].items():
        delivered = m.get("delivered")
        weight = "" if site not in weights else f" weight {weights[site]:g} ({100 * weights[site] / total:.0f} %)"
        norm = "" if site not in norms else f" |update| {norms[site]:.3g}"
        parts.append(f"{site}:{weight}{norm} loss {_fmt(m.get('train_loss'))}/{_fmt(m.get('val_loss'))} "
                     f"dice {_fmt(m.get('mean_fg_dice'))}"
                     + ("" if delivered is None else f" (delivered {_fmt(delivered.get('mean_fg_dice'))})")
                     + f" {m.get('epoch_seconds', 0):.1f}s")
    for site in record.get("left_out", {}):
        parts.append(f"{site}: left out")
    if "delivered_mean_fg_dice" in record:
        best = record.get("best") or {}
        parts.append(f"delivered {_fmt(record['delivered_mean_fg_dice'])} (best {_fmt(best.get('score'))}, "
                     f"model of round {best.get('model_round')})")
    parts.append(f"wall {record['wall_seconds']:.1f}s overhead {record['overhead_seconds']:.1f}s")
    return " | ".join(parts)


def _num(value: Any) -> float:
    """A plotted value: None (JSON's NaN) as NaN, 0.0 kept."""
    return float("nan") if value is None else float(value)


def draw_progress(history: list[dict[str, Any]], path: Path, final: Mapping[str, Any] | None = None) -> None:
    """Per-site train (solid) / validation (dashed) loss and mean pseudo-Dice against the round: the local model
    after the round's epoch (solid) and the delivered model, i.e. the aggregate after the round (dotted; black:
    pooled over the sites). ``final``: the final model's validation record (federation/delivered.py)."""
    from matplotlib.figure import (
        Figure,  # no pyplot: drawn in the background saver thread
    )

    sites = sorted({s for rec in history for s in rec["sites"]})
    records = history + ([dict(final)] if final else [])
    fig = Figure(figsize=(8, 7))
    ax_loss, ax_dice = fig.subplots(2, 1, sharex=True)
    for i, site in enumerate(sites):
        color = f"C{i % 10}"
        rows = [(rec["round"], rec["sites"][site]) for rec in history if site in rec["sites"]]
        rounds = [r for r, _ in rows]
        ax_loss.plot(rounds, [_num(m.get("train_loss")) for _, m in rows], "-", color=color, label=f"{site} train")
        ax_loss.plot(rounds, [_num(m.get("val_loss")) for _, m in rows], "--", color=color, label=f"{site} val")
        ax_dice.plot(rounds, [_num(m.get("mean_fg_dice")) for _, m in rows], "-o", color=color, ms=3,
                     label=f"{site} local")
        delivered = [(rec["delivered_model_round"], rec["sites"][site]["delivered"]) for rec in records
                     if site in rec["sites"] and "delivered" in rec["sites"][site]]
        if delivered:
            ax_dice.plot([r for r, _ in delivered], [_num(d.get("mean_fg_dice")) for _, d in delivered], ":s",
                         color=color, ms=3, label=f"{site} delivered")
    pooled = [(rec["delivered_model_round"], rec["delivered_mean_fg_dice"]) for rec in records
              if "delivered_mean_fg_dice" in rec]
    if pooled:
        ax_dice.plot([r for r, _ in pooled], [_num(d) for _, d in pooled], ":",
                     color="black", label="delivered, pooled")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=7, ncol=2)
    ax_dice.set_ylabel("mean pseudo-Dice")
    ax_dice.set_xlabel("round (delivered: the aggregate after that round)")
    ax_dice.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))


# --- what the sites reply at train_init -------------------------------------------------------------------------
#: Plans fields that name the site's own dataset: the only ones in which FFE sites' plans may differ.
_PLANS_OWN_FIELDS = ("dataset_name",)
#: dataset.json fields the predictor reads the network's inputs and outputs from: equal at every FFE site.
_DATASET_SHARED_FIELDS = ("channel_names", "labels", "regions_class_order")


def _site_field(site: str, field_: str, check) -> Any:
    """``check()``, with a ValueError turned into a :class:`SiteReplyError` naming the site and the field."""
    try:
        return check()
    except SiteReplyError:
        raise
    except ValueError as err:
        raise SiteReplyError(site, field_, str(err)) from None


def _check_site_names(site: str, info: Mapping[str, Any], options: TrainOptions) -> None:
    """The reply's names that reach file names must be identifiers and exactly the coordinator's own."""
    for field_, expected in (("trainer_name", options.trainer), ("configuration", options.configuration)):
        value = _site_field(site, field_, lambda: check_identifier(info.get(field_), field_))
        if value != expected:
            raise SiteReplyError(site, field_, f"{value!r}, but this run trains {expected!r}")


def check_site_infos(infos: Mapping[str, Mapping[str, Any]], options: TrainOptions, asym: bool,
                     spec: ModelSpec | None = None) -> dict[str, Any] | None:
    """Check the sites' ``train_init`` replies against what the coordinator expects; raise :class:`SiteReplyError`
    (naming the site and the field) otherwise.

    Every site: ``trainer_name`` and ``configuration`` are identifiers equal to the run's own (``-tr``, the job's
    configuration). FFE also: every site's plans are identical apart from the dataset name, name this run's plans
    (``-p``) and hold its configuration; the merged fingerprints are identical (``site_weights``); the dataset.json
    fields the predictor uses (channels, labels, regions) and the checkpoint's key map and mirroring axes are
    identical, and the key map names only parameters of the network (``spec``). Returns, for FFE, what
    :func:`write_global_model` writes beside the global model (taken from the sites only after these checks);
    None for AsymFedAvg (no global model).
    """
    for site, info in sorted(infos.items()):
        if not isinstance(info, Mapping):
            raise SiteReplyError(site, "train_init", f"expected a mapping, got {type(info).__name__}")
        _check_site_names(site, info, options)
    if asym:
        return None
    sites = sorted(infos)
    first = sites[0]

    def same(field_: str, value_of) -> Any:
        reference = value_of(infos[first])
        for s in sites[1:]:
            if value_of(infos[s]) != reference:
                raise SiteReplyError(s, field_, f"differs from site {first}'s; FedAvg needs sites planned together "
                                     "(plan_and_preprocess with all of them)")
        return reference

    for s in sites:
        plans = infos[s].get("plans")
        if not isinstance(plans, Mapping):
            raise SiteReplyError(s, "plans", "missing (plan_and_preprocess first)")
        if plans.get("plans_name") != options.plans:
            raise SiteReplyError(s, "plans", f"plans_name {plans.get('plans_name')!r}, but this run uses "
                                 f"{options.plans!r}")
        if not isinstance(plans.get("configurations"), Mapping) or options.configuration not in plans["configurations"]:
            raise SiteReplyError(s, "plans", f"no configuration {options.configuration!r}")
        if not isinstance(infos[s].get("dataset_json"), Mapping):
            raise SiteReplyError(s, "dataset_json", "missing")
        if not isinstance(infos[s].get("dataset_fingerprint"), Mapping):
            raise SiteReplyError(s, "dataset_fingerprint", "missing (plan_and_preprocess first)")
    same("plans", lambda i: {k: v for k, v in i["plans"].items() if k not in _PLANS_OWN_FIELDS})
    same("dataset_fingerprint", lambda i: fingerprint_digest(i["dataset_fingerprint"]))
    same("dataset_json", lambda i: {k: i["dataset_json"].get(k) for k in _DATASET_SHARED_FIELDS})
    state_keys = same("state_keys", lambda i: i.get("state_keys"))
    if (not isinstance(state_keys, Mapping) or not state_keys
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in state_keys.items())
            or (spec is not None and not set(state_keys.values()) <= set(spec.params))):
        raise SiteReplyError(", ".join(sites), "state_keys", "not a map of checkpoint keys to the network's "
                             "parameters")
    axes = same("inference_allowed_mirroring_axes", lambda i: i.get("inference_allowed_mirroring_axes"))
    if axes is not None and (not isinstance(axes, list) or len(axes) > 3 or len(set(axes)) != len(axes) or not all(
            isinstance(a, int) and not isinstance(a, bool) and 0 <= a < 3 for a in axes)):
        raise SiteReplyError(", ".join(sites), "inference_allowed_mirroring_axes", f"not a list of axes: {axes!r}")
    return {"trainer_name": options.trainer, "configuration": options.configuration,
            "plans": infos[first]["plans"], "dataset_json": infos[first]["dataset_json"],
            "dataset_fingerprint": infos[first]["dataset_fingerprint"], "state_keys": dict(state_keys),
            "inference_allowed_mirroring_axes": axes}


# --- global model in nnU-Net's layout --------------------------------------------------------------------------
def write_global_model(root: Path, info: Mapping[str, Any], options: TrainOptions, fold: str,
                       weights: Arrays, epochs: int, filename: str = "checkpoint_final.pth") -> Path:
    """Write the global FFE model as ``<root>/global/<trainer>__<plans>__<config>/fold_X/<filename>`` (the final
    model, or ``checkpoint_best.pth``: the best delivered one).

    The folder's names are the coordinator's own (``options``: -tr, -p, the configuration), never a site's: the
    ``trainer_name`` and ``configuration`` in ``info`` (from the sites, see :func:`check_site_infos`) must equal
    them, else nothing is written (``ValueError``). The checkpoint has what nnU-Net's predictor reads (trainer
    name, configuration, mirroring axes and the full ``state_dict`` including nnU-Net's alias keys, rebuilt from the
    site's alias map so each tensor is stored once), with plans.json, dataset.json and dataset_fingerprint.json
    beside the fold folder.
    """
    import torch

    _check_site_names("reply", info, options)
    fold = str(fold)
    if fold != "all" and not fold.isdigit():
        raise ValueError(f"fold must be an integer or 'all', got {fold!r}")
    trainer, plans, configuration = (check_identifier(options.trainer, "trainer"),
                                     check_identifier(options.plans, "plans"),
                                     check_identifier(options.configuration, "configuration"))
    base = (root / "global").resolve()
    model_dir = base / f"{trainer}__{plans}__{configuration}"
    fold_dir = model_dir / f"fold_{fold}"
    if fold_dir.resolve().parent.parent != base or Path(filename).name != filename:
        raise ValueError(f"refusing to write outside {base}: {fold_dir / filename}")
    missing = [k for k in info["state_keys"].values() if k not in weights]
    if missing:
        raise ValueError(f"the checkpoint's key map names {len(missing)} parameter(s) the model lacks, e.g. "
                         f"{missing[0]!r}")
    fold_dir.mkdir(parents=True, exist_ok=True)
    for name, key in (("plans.json", "plans"), ("dataset.json", "dataset_json"),
                      ("dataset_fingerprint.json", "dataset_fingerprint")):
        if info.get(key) is not None:
            write_json_atomic(model_dir / name, info[key])
    tensors = {name: torch.from_numpy(np.array(arr, copy=True)) for name, arr in weights.items()}
    network_weights = OrderedDict((key, tensors[canon]) for key, canon in info["state_keys"].items())
    axes = info.get("inference_allowed_mirroring_axes")
    checkpoint = {
        "network_weights": network_weights,
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": None,
        "_best_ema": None,
        "current_epoch": epochs,
        "init_args": {"plans": info.get("plans"), "configuration": configuration,
                      "fold": fold if fold == "all" else int(fold), "dataset_json": info.get("dataset_json"),
                      "device": "cpu"},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": None if axes is None else tuple(axes),
    }
    _atomic_write(fold_dir / filename, lambda f: torch.save(checkpoint, f))
    return fold_dir


# --- the loop ----------------------------------------------------------------------------------------------------
def round_timing(started_at: float, ended_at: float, replies: Mapping[str, tuple[dict[str, Any], Any]],
                 exchange_times: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    """Where a round's wall time went (wall-clock seconds; the site's split needs roughly synchronised clocks).

    ``prepare_s``: server work before the models were handed to Flower; per site ``down_s`` (push to the site
    worker receiving the message: Flower's node polling, the ClientApp process start, the download), ``site_s``
    (the worker's handling: loading weights, the epoch, its checkpoint) and ``up_s`` (worker reply to the
    server pulling it); ``after_s``: server work after the last reply (checks and aggregation).
    """
    sites: dict[str, dict[str, float]] = {}
    for site, (result, _) in replies.items():
        if site not in exchange_times:
            continue
        pushed, pulled = exchange_times[site]
        entry = {"round_trip_s": pulled - pushed, "site_s": float(result.get("seconds", 0.0))}
        if "received_at" in result and "replied_at" in result:
            entry["down_s"] = float(result["received_at"]) - pushed
            entry["up_s"] = pulled - float(result["replied_at"])
        sites[site] = entry
    timing: dict[str, Any] = {"sites": sites}
    if sites:
        first_push = min(exchange_times[s][0] for s in sites)
        last_pull = max(exchange_times[s][1] for s in sites)
        timing.update(prepare_s=first_push - started_at, after_s=ended_at - last_pull)
    return timing


class _BackgroundSaver:
    """Saves the server state, the metrics line and the plot of a round in one background thread.

    Why: writing a 30 M-parameter model (and AsymFedAvg's one per site) with fsync and drawing the plot take
    seconds that would otherwise sit between two rounds. One save runs at a time, in round order; :meth:`wait`
    re-raises a failed save, and the loop waits before it aggregates the next round (so arrays handed to a
    save are never changed under it) and before it finishes.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fednnunet-state")
        self._pending = None

    def submit(self, fn, *args: Any) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _save_round(out: Path, r: int, models: Mapping[str, Arrays], asym: bool, history: list[dict[str, Any]],
                extra: Mapping[str, Any], best: Mapping[str, Any] | None = None,
                best_models: Mapping[str, Arrays] | None = None, draw: bool = True) -> None:
    save_state(out, r, models, asym, history, extra, best, best_models)
    with (out / METRICS_FILE).open("a") as f:  # after the state: a resumed run never repeats a line
        f.write(json.dumps(history[-1]) + "\n")
    if not draw:
        return
    try:
        draw_progress(history, out / PLOT_FILE)
    except Exception as err:  # a plot must never stop a training
        logger.warning("could not draw %s: %s", out / PLOT_FILE, err)


def _first_reply_s(history: list[dict[str, Any]]) -> float | None:
    """Seconds from the push to the first reply in the fastest round so far (the first round is slow: warm-up);
    the transport pulls for replies slowly until close to it."""
    firsts = [min(s["round_trip_s"] for s in sites.values())
              for rec in history if (sites := (rec.get("timing") or {}).get("sites"))]
    return min(firsts) if firsts else None


def _specs_differ(a: ModelSpec, b: ModelSpec) -> str | None:
    for name in list(a.params) + [n for n in b.params if n not in a.params]:
        if a.params.get(name) != b.params.get(name):
            return f"{name}: {a.params.get(name)} vs {b.params.get(name)}"
    return None


def _metrics_ok(metrics: Any) -> None:
    validate_metrics(metrics if isinstance(metrics, Mapping) else {},
                     {"train_loss": float, "epoch_seconds": float, "num_training_cases": int})


def _count_ok(count: Any, fixed: int) -> None:
    """A reply's training-case count must be the one fixed at train_init (an integer: ``validate_metrics``)."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or int(count) != fixed:
        text = repr(count)
        raise UpdateRejected(f"num_training_cases {text if len(text) <= 40 else text[:37] + '...'} is not the "
                             f"{fixed} fixed at train_init")


#: A site left out for one of these has (probably) lost its trainer: its worker restarted, or its node went away and
#: came back. It is asked to rebuild it from its own checkpoint before the next round (a site that kept its
#: trainer simply rebuilds it from the same checkpoint).
SESSION_LOST = ("no training session", "node unavailable")


class _FoldRun:
    """One fold's federated training (state kept on the object so the steps stay small)."""

    def __init__(self, job: JobSpec, options: TrainOptions, fold: str, caller: Any, events: EventLog,
                 out: Path, root: Path) -> None:
        self.job, self.opts, self.fold, self.caller, self.events = job, options, fold, caller, events
        self.out, self.root = out, root
        self.out.mkdir(parents=True, exist_ok=True)
        self.best = BestDelivered()  # the best delivered model (federation/delivered.py)
        self.server_momentum: ServerMomentum | None = None  # FedAvgM (FFE with --server-momentum)
        self.fixed: FixedWeights | None = None  # the sites' counts and weights, fixed at train_init
        self.global_info: dict[str, Any] | None = None  # FFE: what is written beside the global model (checked)

    def _init_sites(self, sites: list[str], continue_training: bool) -> tuple[dict, dict, dict]:
        cfg = self.opts.site_config(self.fold, continue_training)
        replies, errors = self.caller.try_call("train_init", {s: cfg for s in sites},
                                               timeout_s=self.opts.init_timeout_s)
        infos = {s: r for s, (r, _) in replies.items()}
        weights = {s: w for s, (_, w) in replies.items()}
        return infos, weights, errors

    def run(self, sites: list[str]) -> dict[str, Any]:
        opts, events, asym = self.opts, self.events, self.job.asym
        state = load_state(self.out) if (opts.resume or opts.continue_training) else None
        if (opts.resume or opts.continue_training) and state is None:
            events.info(f"fold {self.fold}: no saved server state in {self.out / STATE_DIR}: starting at round 1")
        if state is not None and bool(state.get("asym")) != asym:
            raise ValueError("the saved state is from a run with" + ("out" if asym else "") + " --asym")
        if asym and opts.server_momentum:
            raise ValueError("--server-momentum applies to FFE's global model; AsymFedAvg has none")

        started = time.perf_counter()
        infos, init_weights, errors = self._init_sites(sites, continue_training=state is not None)
        if errors:
            raise RuntimeError("train_init failed at " + "; ".join(f"{s}: {e}" for s, e in errors.items()))
        specs = {s: ModelSpec.of(init_weights[s]) for s in sites}
        first = sites[0]
        if not asym:
            for s in sites[1:]:
                diff = _specs_differ(specs[first], specs[s])
                if diff:
                    raise ValueError(f"sites {first} and {s} have different networks ({diff}); FedAvg needs "
                                     "identical plans: plan with FFE, or train with --asym")
        # Site replies are data: names, plans and counts are checked against the coordinator's own before use, and
        # the weights are fixed here, bounded by the federation's plan (aggregation/site_weights.py).
        self.global_info = check_site_infos(infos, opts, asym, specs[first])
        fixed = fix_site_weights(infos, asym, opts.weighting)
        if state is not None:
            fixed = check_resumed(fixed, state.get("site_weights"))
        self.fixed = fixed
        events.emit("train_init", f"fold {self.fold}: {len(sites)} site trainer(s) built in "
                    f"{time.perf_counter() - started:.1f} s (" + ", ".join(
                        f"{s}: {fixed.cases[s]} cases, epoch {infos[s].get('current_epoch')}"
                        for s in sites) + ")" + ("" if opts.seed is None else f", seed {opts.seed}"),
                    weights=fixed.to_json())
        events.info(fixed.line())
        if asym:
            events.info("--asym: the sites were planned alone, so no shared record bounds their declared case "
                        "counts (each is only checked against its own fingerprint); --weighting uniform avoids "
                        "relying on them")
        for s in sites:
            for reason in infos[s].get("not_reproducible") or []:
                events.info(f"site {s}: seeded, but not bit-for-bit repeatable: {reason}")
        epochs_per_round = opts.epochs_per_round
        rounds = opts.total_rounds()  # the coordinator's option or its default rule: never a site's num_epochs
        weight_of = dict(fixed.weights)
        min_sites = min(opts.min_sites or len(sites), len(sites))

        velocity: Arrays = {}
        if state is not None:
            models = load_models(self.out, state)
            if not asym:
                velocity = {k[len(_VELOCITY_PREFIX):]: models["global"].pop(k) for k in list(models["global"])
                            if k.startswith(_VELOCITY_PREFIX)}
            start, history = int(state["round"]), list(state.get("history", []))
            for key, model in models.items():
                for s in ([key] if asym else sites):
                    try:
                        validate_update(model, specs[s])
                    except UpdateRejected as err:
                        raise ValueError(f"saved state does not fit the network of site {s}: {err}") from err
            saved_best = state.get("best") or {}
            if saved_best.get("weights_file"):
                self.best = BestDelivered(saved_best["score"], saved_best["model_round"],
                                          load_models(self.out, state, saved_best["weights_file"]))
            events.info(f"fold {self.fold}: resuming after round {start} of {rounds}")
            # the metrics log is rebuilt from the saved history: it drops lines of a round that was not saved
            _atomic_write(self.out / METRICS_FILE,
                          lambda f: f.write("".join(json.dumps(h) + "\n" for h in history).encode()))
        else:
            # received arrays are read-only views of the reply; the FFE average is written into its own arrays
            models = (dict(init_weights) if asym
                      else {"global": {k: np.array(v) for k, v in init_weights[first].items()}})
            start, history = 0, []
        del init_weights
        if opts.server_momentum:
            self.server_momentum = ServerMomentum(opts.server_momentum, velocity)

        saver = _BackgroundSaver()
        try:
            self._rounds(sites, start, rounds, models, history, specs, weight_of, min_sites, saver)
        finally:
            saver.close()
        final = self._validate_final(sites, models, rounds, history)
        result = self._finish(sites, models, infos, rounds * epochs_per_round, history, rounds)
        if final is not None:
            result["final_model_validation"] = final
        return result

    def _validate_final(self, sites: list[str], models: Mapping[str, Arrays], rounds: int,
                        history: list[dict[str, Any]]) -> dict[str, Any] | None:
        """One more exchange after the last round: every site validates the final model (the last delivered one),
        which may become the best; reported in the events, result.json and progress.png."""
        opts, asym = self.opts, self.job.asym
        if not opts.validate_delivered_every or not history:
            return None
        payload = {s: models[s if asym else "global"] for s in sites}
        replies, errors = self.caller.try_call("train_validate_delivered", {s: {} for s in sites}, payload,
                                               timeout_s=opts.round_timeout_s)
        reports: dict[str, Any] = {}
        for s, (res, _) in replies.items():
            try:
                check_delivered(res.get("delivered"))
                reports[s] = res["delivered"]
            except UpdateRejected as err:
                errors[s] = f"rejected: {err}"
        for s, reason in sorted(errors.items()):
            self.events.emit("left_out", f"final model: site {s} did not validate it: {reason}", site=s, reason=reason)
        if self.best.consider(rounds, reports, sites, models):
            save_best(self.out, self.best.info(), self.best.models, asym)
        record = {"round": rounds, "sites": {s: {"delivered": d} for s, d in reports.items()}, "left_out": errors,
                  "delivered_model_round": rounds, "delivered_mean_fg_dice": pooled_dice(reports),
                  "best": self.best.info()}
        try:
            draw_progress(history, self.out / PLOT_FILE, record)
        except Exception as err:  # a plot must never stop a training
            logger.warning("could not draw %s: %s", self.out / PLOT_FILE, err)
        best = self.best.info()
        self.events.info(f"fold {self.fold}: final model: delivered pseudo-Dice " + ", ".join(
            f"{s} {_fmt(d.get('mean_fg_dice'))}" for s, d in sorted(reports.items()))
            + f", pooled {_fmt(record['delivered_mean_fg_dice'])}; best delivered model: after round "
            f"{best['model_round']} ({_fmt(best['score'])})")
        return record

    def _rounds(self, sites: list[str], start: int, rounds: int, models: dict[str, Arrays],
                history: list[dict[str, Any]], specs: Mapping[str, ModelSpec], weight_of: Mapping[str, float],
                min_sites: int, saver: _BackgroundSaver) -> None:
        opts, events, asym = self.opts, self.events, self.job.asym
        epochs_per_round = opts.epochs_per_round
        needs_init: set[str] = set()
        cases = self.fixed.cases if self.fixed is not None else {}
        # one averager for the whole run: its float64 sums stay allocated from round to round
        averager = StreamingAsymAverager(specs, opts.asym_scope) if asym else StreamingAverager()
        last_drawn = float("-inf")
        for r in range(start + 1, rounds + 1):
            self._reinit(needs_init)
            t0, started_at = time.perf_counter(), time.time()
            targets = [s for s in sites if s not in needs_init]
            # FFE: one wire copy of the global model serves every site (packed once for Flower)
            shared = None if asym else to_wire(models["global"], opts.transfer_dtype)
            payload = {s: to_wire(models[s], opts.transfer_dtype) if asym else shared for s in targets}
            configs = {s: {"round": r, "epoch_end": r * epochs_per_round,
                           "validate_delivered": validates_round(r, opts.validate_delivered_every)} for s in targets}
            traffic = self.caller.traffic
            before = {x: (traffic.sent.get(x, 0), traffic.received.get(x, 0)) for x in targets}
            averager.reset()
            # seeded: add in site order, so the float64 sums do not depend on the order replies arrive in
            adds = SiteOrderedAdds(targets if opts.seed is not None else None)
            metrics: dict[str, dict[str, Any]] = {}
            norms: dict[str, float] = {}

            def take(site: str, result: dict[str, Any], update: Arrays) -> str | None:
                """Check one update as it arrives and add it to the running average (then it can be dropped)."""
                try:
                    validate_update(update, wire_spec(specs[site], opts.transfer_dtype))
                    _metrics_ok(result.get("metrics"))
                    _count_ok(result["metrics"]["num_training_cases"], cases[site])
                    if "delivered" in result["metrics"]:
                        check_delivered(result["metrics"]["delivered"])
                except UpdateRejected as err:
                    return f"update rejected: {err}"
                # a reply with "delta" holds changes from what this server sent (see aggregation/wire.py)
                model_sent = models[site if asym else "global"]
                weights = from_wire(update, specs[site], base=model_sent if result.get("delta") is True else None)
                if opts.clip_update_norm is not None:  # bounded influence (aggregation/robust.py)
                    weights, norms[site] = clip_update(weights, model_sent, opts.clip_update_norm)
                if asym:
                    adds.add(site, lambda: averager.add(site, weights, weight_of[site]))
                else:
                    adds.add(site, lambda: averager.add(weights, weight_of[site]))
                metrics[site] = dict(result["metrics"])
                return None

            replies, errors = self.caller.try_call("train_round", configs, payload, timeout_s=opts.round_timeout_s,
                                                   on_reply=take, expected_s=_first_reply_s(history))
            adds.flush()
            del payload, shared
            exchange_times = dict(getattr(self.caller, "exchange_times", {}))
            round_bytes = {x: {"sent": traffic.sent.get(x, 0) - before[x][0],
                               "received": traffic.received.get(x, 0) - before[x][1]} for x in targets}
            errors = {**{s: "could not rebuild its trainer" for s in needs_init}, **errors}
            for s, reason in sorted(errors.items()):
                events.emit("left_out", f"round {r}: site {s} left out: {reason}", round=r, site=s, reason=reason)
                if any(sign in reason for sign in SESSION_LOST):
                    needs_init.add(s)
            if len(metrics) < min_sites:
                raise RuntimeError(f"round {r}: only {len(metrics)} of {len(sites)} site(s) delivered an update, "
                                   f"at least {min_sites} needed (--min-sites); reasons: " +
                                   "; ".join(f"{s}: {e}" for s, e in sorted(errors.items())))
            # the models sent this round, validated at the sites: the best so far is copied before aggregation
            delivered = {s: m["delivered"] for s, m in metrics.items() if "delivered" in m}
            new_best = bool(delivered) and self.best.consider(r - 1, delivered, sites, models)
            saver.wait()  # the previous round's save holds the arrays that aggregation overwrites
            asym_info = self._aggregate(models, averager)
            wall = time.perf_counter() - t0
            timing = round_timing(started_at, time.time(), replies, exchange_times)
            # the site's compute: its epochs and the validation of the model it received
            slowest = max(m.get("epoch_seconds", 0.0) + (m.get("delivered") or {}).get("seconds", 0.0)
                          for m in metrics.values())
            record = {"round": r, "rounds": rounds, "fold": self.fold, "started_at": started_at, "t": time.time(),
                      "wall_seconds": wall,
                      "overhead_seconds": wall - slowest, "sites": metrics, "left_out": errors,
                      "weights": {s: weight_of[s] for s in metrics}, "bytes": round_bytes,
                      **({} if opts.clip_update_norm is None else
                         {"clip_update_norm": opts.clip_update_norm, "update_norms": dict(sorted(norms.items()))}),
                      "model_bytes": {k: int(sum(a.nbytes for a in m.values())) for k, m in models.items()},
                      "timing": timing, **asym_info}
            if delivered:
                record.update(delivered_model_round=r - 1, delivered_mean_fg_dice=pooled_dice(delivered),
                              best=self.best.info())
            history.append(record)
            draw = r == rounds or time.monotonic() - last_drawn >= PLOT_EVERY_S
            last_drawn = time.monotonic() if draw else last_drawn
            saver.submit(_save_round, self.out, r, self._saved_models(models), asym, list(history),
                         {"rounds": rounds, "fold": self.fold, "options": opts.asdict(),
                          "site_weights": None if self.fixed is None else self.fixed.to_json()}, self.best.info(),
                         self.best.models if new_best else None, draw)
            events.emit("round", round_line(record), round=r, weights=record["weights"])

    def _reinit(self, needs_init: set[str]) -> None:
        """Rebuild the trainer of sites whose worker lost it (restarted), continuing from their own checkpoint."""
        if not needs_init:
            return
        infos, _, errors = self._init_sites(sorted(needs_init), continue_training=True)
        for s in sorted(infos):
            try:  # the rebuilt trainer must be the one the run fixed at train_init
                _check_site_names(s, infos[s], self.opts)
                if self.fixed is not None:
                    _count_ok(infos[s].get("num_training_cases"), self.fixed.cases[s])
            except (ValueError, KeyError) as err:
                errors[s] = f"rebuilt, but its reply does not fit the run: {err}"
                continue
            self.events.info(f"site {s} rebuilt its trainer (epoch {infos[s].get('current_epoch')}) and rejoins")
            needs_init.discard(s)
        for s, e in errors.items():
            self.events.info(f"site {s} could not rebuild its trainer: {e}")

    def _aggregate(self, models: dict[str, Arrays],
                   averager: StreamingAverager | StreamingAsymAverager) -> dict[str, Any]:
        """Update ``models`` from the round's averager; sites left out keep their model (asym).

        FFE writes the average into the global model's own arrays (``out=``): no new 4 bytes per parameter
        every round; with server momentum the global model takes FedAvgM's step towards the average instead.
        AsymFedAvg gives every site that delivered its new model (averaged groups shared).
        """
        if not self.job.asym:
            if self.server_momentum is None:
                models["global"] = averager.result(out=models["global"])
            else:
                self.server_momentum.step(models["global"], averager.result())
            return {}
        new, report = averager.result()
        models.update(new)
        return {"asym_fraction_averaged": {s: st.fraction_averaged for s, st in report.sites.items()}}

    def _saved_models(self, models: Mapping[str, Arrays]) -> dict[str, Arrays]:
        """What a round's state file holds: the models, and FFE's server-momentum velocity (for ``--resume``)."""
        if self.server_momentum is None:
            return dict(models)
        return {"global": {**models["global"], **{_VELOCITY_PREFIX + k: v
                                                  for k, v in self.server_momentum.velocity.items()}}}

    def _finish(self, sites: list[str], models: Mapping[str, Arrays], infos: Mapping[str, Any], epochs: int,
                history: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
        opts, events, best = self.opts, self.events, self.best
        # the sites write the best delivered model as checkpoint_best.pth: sent beside the final one, unless it is
        # the final one; without delivered validation they write none
        best_is = None if best.models is None else ("final" if best.model_round == rounds else "sent")
        cfg = {"validate": not opts.skip_validation, "val_best": opts.val_best, "best": best_is}
        key = {s: s if self.job.asym else "global" for s in sites}
        payload = {s: models[key[s]] if best_is != "sent" else
                   {**models[key[s]], **{BEST_PREFIX + n: a for n, a in best.models[key[s]].items()}} for s in sites}
        events.info(f"fold {self.fold}: sending the final model to {len(sites)} site(s)"
                    + ("" if opts.skip_validation else " (then nnU-Net's final validation)"))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fednnunet-global") as pool:
            # written while the sites finish (the server's first torch import and a torch.save: about 1 s)
            writing = (pool.submit(self._write_global_models, models, epochs)
                       if not self.job.asym and not opts.disable_checkpointing else None)
            replies, errors = self.caller.try_call("train_finish", {s: cfg for s in sites}, payload,
                                                   timeout_s=opts.finish_timeout_s)
            finish_s = time.perf_counter() - t0
            fold_dir = None if writing is None else writing.result()
        result: dict[str, Any] = {"rounds": history[-1]["round"] if history else 0, "sites": {}, "errors": errors}
        for s, (res, _) in sorted(replies.items()):
            result["sites"][s] = res
            dice = res.get("validation_mean_dice")
            events.info(f"site {s}: final model in {res.get('output_folder')}"
                        + ("" if dice is None else f", validation mean Dice {dice:.4f}"))
        for s, e in sorted(errors.items()):
            events.emit("error", f"site {s} could not finish: {e}", site=s)
        events.info(f"fold {self.fold}: finish took {finish_s:.1f} s")
        if fold_dir is not None:
            result["global_model"] = str(fold_dir)
            events.info(f"global model: {fold_dir / 'checkpoint_final.pth'}")
        if best.models is not None:
            result["best_model"] = best.info()
            events.info(f"checkpoint_best.pth: the delivered model after round {best.model_round} (pooled "
                        f"pseudo-Dice {_fmt(best.score)})")
        if history:
            result["mean_round_seconds"] = float(np.mean([h["wall_seconds"] for h in history]))
            result["mean_overhead_seconds"] = float(np.mean([h["overhead_seconds"] for h in history]))
        if len(replies) < min(opts.min_sites or len(sites), len(sites)):
            raise RuntimeError("train_finish failed at " + "; ".join(f"{s}: {e}" for s, e in errors.items()))
        return result

    def _write_global_models(self, models: Mapping[str, Arrays], epochs: int) -> Path:
        """The FFE global model in nnU-Net's layout: the final one, and the best delivered one if any (names and
        JSON files checked at train_init: ``check_site_infos``)."""
        info = self.global_info
        assert info is not None
        # the network's weights only (with --momentum average the model also carries the momentum buffers)
        fold_dir = write_global_model(self.root, info, self.opts, self.fold, split_momentum(models["global"])[0],
                                      epochs)
        (fold_dir / "checkpoint_best.pth").unlink(missing_ok=True)  # an earlier run's
        if self.best.models is not None:
            write_global_model(self.root, info, self.opts, self.fold, split_momentum(self.best.models["global"])[0],
                               epochs, filename="checkpoint_best.pth")
        return fold_dir


def _validate_only(options: TrainOptions, fold: str, caller: Any, events: EventLog,
                   sites: list[str]) -> dict[str, Any]:
    cfg = options.site_config(fold, continue_training=False)
    replies = caller.call("train_validate", {s: cfg for s in sites}, timeout_s=options.finish_timeout_s)
    for s, (res, _) in sorted(replies.items()):
        events.info(f"site {s}: validated {res.get('output_folder')}")
    return {"sites": {s: res for s, (res, _) in replies.items()}}


def _cross_validation(folds: Mapping[str, Any], root: Path, events: EventLog) -> dict[str, Any]:
    """Every site's final validation summary and the pooled one, per fold and over the folds:
    ``cross_validation.json`` in the job's out dir and a table in the events."""
    from fednnunet.evaluation.cv_report import compact_cv, training_cv

    report = training_cv(folds)
    if report["rows"]:
        write_json_atomic(root / "cross_validation.json", report)
        events.info("final validation, pooled over the sites: " + compact_cv(report["rows"]))
    return report


def run_training_task(job: JobSpec, caller: Any, events: EventLog) -> dict[str, Any]:
    """Run ``job`` (task ``train``) fold after fold; return per-fold, per-site output folders and timings."""
    options = TrainOptions.from_dict(job.train)
    if not options.validation_only:  # the rounds are the coordinator's (never a site's num_epochs); sent to the sites
        options = replace(options, rounds=options.total_rounds())
    root = Path(job.out_dir)
    described = caller.broadcast("describe", {"check_cases": False, "task": "train"})
    sites = sorted(described)
    if len(sites) < job.num_sites:
        raise RuntimeError(f"only {len(sites)} of {job.num_sites} sites answered")
    events.info(f"training on {len(sites)} site(s): " + ", ".join(
        f"{s} ({described[s][0].get('dataset_name')})" for s in sites) +
        f"; {'AsymFedAvg (scope ' + options.asym_scope + ')' if job.asym else 'FedAvg'}, "
        f"weighting {options.weighting}, site momentum {options.momentum}"
        + (f", server momentum {options.server_momentum}" if options.server_momentum else ""))
    folds: dict[str, Any] = {}
    for fold in options.folds:
        if options.validation_only:
            folds[fold] = _validate_only(options, fold, caller, events, sites)
            continue
        out = root if len(options.folds) == 1 else root / f"fold_{fold}"
        folds[fold] = _FoldRun(job, options, fold, caller, events, out, root).run(sites)
    result: dict[str, Any] = {"folds": folds, "traffic": {"sent": caller.traffic.sent,
                                                          "received": caller.traffic.received}}
    result["cross_validation"] = _cross_validation(folds, root, events)
    if len(folds) == 1:
        result.update(next(iter(folds.values())))
    return result
