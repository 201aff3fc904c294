"""The FFE global model in nnU-Net's layout, so that ``nnUNetv2_predict`` and friends use it as they use any model.

Why the coordinator writes one: with FFE every site ends with the same model, and the coordinator holds it (and the
best delivered one) without any site's data. What it writes beside the weights (plans, dataset.json, fingerprint,
the checkpoint's key map and mirroring axes) comes from the sites only after ``check_site_infos``
(training/site_checks.py), and the folder names are the coordinator's own options.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fednnunet.aggregation.momentum import split_momentum
from fednnunet.atomic_files import write_atomic, write_json_atomic
from fednnunet.identifiers import check_identifier
from fednnunet.training.options import TrainOptions
from fednnunet.training.site_checks import check_site_names

__all__ = ["write_global_model", "write_global_models"]

Arrays = dict[str, np.ndarray]


def write_global_model(root: Path, info: Mapping[str, Any], options: TrainOptions, fold: str,
                       weights: Arrays, epochs: int, filename: str = "checkpoint_final.pth") -> Path:
    """Write the global FFE model as ``<root>/global/<trainer>__<plans>__<config>/fold_X/<filename>`` (the final
    model, or ``checkpoint_best.pth``: the best delivered one).

    The folder's names are the coordinator's own (``options``: -tr, -p, the configuration), never a site's: the
    ``trainer_name`` and ``configuration`` in ``info`` (from the sites, see
    :func:`~fednnunet.training.site_checks.check_site_infos`) must equal them, else nothing is written
    (``ValueError``). The checkpoint has what nnU-Net's predictor reads (trainer name, configuration, mirroring axes
    and the full ``state_dict`` including nnU-Net's alias keys, rebuilt from the site's alias map so each tensor is
    stored once), with plans.json, dataset.json and dataset_fingerprint.json beside the fold folder.
    """
    import torch

    check_site_names("reply", info.get("trainer_name"), info.get("configuration"), options)
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
    write_atomic(fold_dir / filename, lambda f: torch.save(checkpoint, f))
    return fold_dir


def write_global_models(root: Path, info: Mapping[str, Any], options: TrainOptions, fold: str, final: Arrays,
                        best: Arrays | None, epochs: int) -> Path:
    """The final global model, and the best delivered one if any (else an earlier run's ``checkpoint_best.pth`` is
    removed); the network's weights only (with ``--momentum average`` the models also carry momentum buffers)."""
    fold_dir = write_global_model(root, info, options, fold, split_momentum(final)[0], epochs)
    (fold_dir / "checkpoint_best.pth").unlink(missing_ok=True)  # an earlier run's
    if best is not None:
        write_global_model(root, info, options, fold, split_momentum(best)[0], epochs, filename="checkpoint_best.pth")
    return fold_dir
