"""The server state of a fold, saved after every round so that ``--resume`` continues where a run stopped.

Why files of plain arrays and JSON: ``round_NNNN.npz`` (loaded with ``allow_pickle=False``) holds the models after
the round (and what the aggregation strategy keeps of its own, e.g. the server momentum's velocity), ``state.json``
the round, the metric history, the options, the FedAvg weights fixed at ``train_init`` and the best delivered model
(``best_NNNN.npz``). Each file is written atomically and the JSON last, so a crash at any point leaves a state that
names complete weights files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fednnunet.aggregation.strategy import GLOBAL
from fednnunet.atomic_files import write_atomic, write_json_atomic

__all__ = ["STATE_DIR", "STATE_FILE", "load_models", "load_state", "save_best", "save_state"]

Arrays = dict[str, np.ndarray]

STATE_DIR = "state"
STATE_FILE = "state.json"
_SEP = "::"  # model key and parameter name in the keys of a state file with several models


def save_state(out: Path, round_: int, models: Mapping[str, Arrays], asym: bool,
               history: list[dict[str, Any]], extra: Mapping[str, Any], best: Mapping[str, Any] | None = None,
               best_models: Mapping[str, Arrays] | None = None) -> Path:
    """Save the weights after ``round_`` and the metric history; the previous weights file is removed after.

    FFE keeps one model under the key ``global``; AsymFedAvg one per site; FedBN (``--local-norm``) the global
    model and each site's normalization weights. The weights go to
    ``round_NNNN.npz`` (plain arrays, loaded with ``allow_pickle=False``), then ``state.json`` names it: the
    JSON is replaced last, so it always points at a complete weights file. ``best``: the best delivered model's
    score and round (training/delivered.py); ``best_models``: its weights, when they changed since the last
    save (``best_NNNN.npz``, written before the JSON like the round's weights).
    """
    state_dir = out / STATE_DIR
    npz = _save_models(state_dir / f"round_{round_:04d}.npz", models, asym)
    previous = load_state(out) or {}
    state = {"round": round_, "weights_file": npz.name, "asym": asym,
             "sites": sorted(models) if _keyed(models, asym) else None,
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


def _keyed(models: Mapping[str, Arrays], asym: bool) -> bool:
    """Whether a state file names the model of every key (AsymFedAvg's sites; FedBN's global model and the sites'
    normalization weights) or holds FFE's one global model under the plain parameter names."""
    return asym or set(models) != {GLOBAL}


def _save_models(npz: Path, models: Mapping[str, Arrays], asym: bool) -> Path:
    keyed = _keyed(models, asym)
    flat = {(f"{site}{_SEP}{name}" if keyed else name): arr
            for site, model in models.items() for name, arr in model.items()}
    write_atomic(npz, lambda f: np.savez(f, **flat))
    return npz


def load_state(out: Path) -> dict[str, Any] | None:
    """The fold's saved ``state.json`` (None: no round was saved in ``out``)."""
    path = out / STATE_DIR / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_models(out: Path, state: Mapping[str, Any], weights_file: str | None = None) -> dict[str, Arrays]:
    """The models saved with ``state``: ``{GLOBAL: ...}`` (FFE), ``{site: ...}`` (AsymFedAvg) or both (FedBN's
    global model and the sites' normalization weights); those of
    ``weights_file`` (e.g. the best delivered model's) instead of the last round's when given."""
    models: dict[str, Arrays] = {}
    with np.load(out / STATE_DIR / (weights_file or state["weights_file"]), allow_pickle=False) as data:
        for key in data.files:
            if state.get("sites") is not None:
                site, name = key.split(_SEP, 1)
            else:
                site, name = GLOBAL, key
            models.setdefault(site, {})[name] = data[key]
    return models
