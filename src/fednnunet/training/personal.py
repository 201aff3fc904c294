"""A site's own model beside the federation's (``--finetune-epochs N``): the final model fine-tuned on the site's
training cases of the fold with the stock nnU-Net trainer, then validated on the site's fold like any nnU-Net model.

Why a plans identifier of its own (``<plans>_personal``): nnU-Net names a results folder
``<trainer>__<plans_name>__<configuration>`` from the ``plans_name`` entry of the plans, and reads the preprocessed
arrays from the configuration's ``data_identifier``. A copy of the site's plans file under the new name, with only
``plans_name`` changed, therefore gives the personal model an ordinary results folder of its own (it never
overwrites the global model's), reuses the preprocessed data as is, and ``nnUNetv2_predict -p <plans>_personal`` and
``find_best_configuration -p <plans> <plans>_personal`` see it as one more model.

Why this learning rate: nnU-Net's poly schedule restarted over the N fine-tuning epochs, from a tenth of the
trainer's initial learning rate (:data:`FINETUNE_LR_FACTOR`). The federation's schedule has decayed to almost zero
at its end, so continuing it would barely move the model; restarting at the full initial rate (1e-2 for the stock
trainer, with SGD momentum 0.99) takes steps as large as at the start of a training and would undo much of what
the federation learnt before the N epochs decay again. A tenth is the usual fine-tuning rate for a trained network
and lets the model fit the site's distribution while starting from the federation's knowledge. The optimizer
starts fresh (no momentum): the site's momentum belonged to its last local epoch of the federation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fednnunet.atomic_files import write_json_atomic
from fednnunet.seeding import derive_seed

if TYPE_CHECKING:  # pragma: no cover - the coordinator imports personal_plans without the training stack
    from fednnunet.protocol.messages import TrainInit

__all__ = ["FINETUNE_LR_FACTOR", "PERSONAL_SUFFIX", "finetune", "personal_plans"]

#: appended to the plans identifier of the federation's model to name the personal model's plans
PERSONAL_SUFFIX = "_personal"
#: the fine-tuning's initial learning rate, as a fraction of the trainer's own (see the module docstring)
FINETUNE_LR_FACTOR = 0.1


def personal_plans(plans: str) -> str:
    """The plans identifier of the personal models of a federation trained with plans ``plans``."""
    return plans + PERSONAL_SUFFIX


def write_personal_plans(preprocessed: Path, plans: str) -> str:
    """Write ``<plans>_personal.json`` beside ``<plans>.json`` in the site's preprocessed dataset folder: the same
    plans (same configurations and ``data_identifier``) under the personal name; returns that identifier."""
    name = personal_plans(plans)
    content = json.loads((preprocessed / f"{plans}.json").read_text())
    content["plans_name"] = name
    write_json_atomic(preprocessed / f"{name}.json", content)
    return name


def finetune(site: str, dataset: str, init: TrainInit, preprocessed: Path, weights: dict[str, np.ndarray],
             epochs: int, validate: bool) -> Path:
    """Train ``weights`` (the federation's final model) for ``epochs`` nnU-Net epochs on this site's training cases
    of the fold, write the personal model's ``checkpoint_final.pth`` and run nnU-Net's final validation if
    ``validate``; returns its fold folder.

    The trainer is the run's own (``-tr``, device, iterations per epoch, validation iterations, augmentation
    workers: ``init``, the run's ``train_init`` request), driven through :class:`SiteTrainer` like every federated
    epoch; a seeded run draws the fine-tuning from its own stream of the run's seed."""
    from fednnunet.training.site_trainer import SiteTrainer

    trainer = SiteTrainer(
        dataset, init.configuration, init.fold,
        trainer_name=init.trainer,
        plans_identifier=write_personal_plans(preprocessed, init.plans),
        device=init.device,
        export_npz=init.npz,
        total_epochs=epochs,
        iterations_per_epoch=init.iterations_per_round,
        val_iterations=init.val_iterations,
        num_workers=init.da_workers,
        seed=None if init.seed is None else derive_seed(init.seed, "site", site, "personal"),
        initial_lr_factor=FINETUNE_LR_FACTOR,
    )
    try:
        trainer.set_weights(weights)
        for _ in range(epochs):
            trainer.run_epoch()
        return trainer.finish(validate=validate)
    finally:
        trainer.close()
