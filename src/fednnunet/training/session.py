"""The site side of federated training: one :class:`~fednnunet.training.site_trainer.SiteTrainer` per run and fold.

Why a separate object (held by the site worker as ``worker.training``): the trainer (network, optimizer, data
loaders) must outlive the per-message ClientApp processes, and the worker should stay a thin protocol layer. The
session turns the server's training requests (:mod:`fednnunet.protocol.messages`: ``TrainInit``, ``TrainRound``,
``TrainValidateDelivered``, ``TrainFinish``) into SiteTrainer calls and their typed replies; every option comes
from the request as the coordinator sent it (no default is restated here):

* ``init``: build the trainer once (``--c``/resume -> continue from this site's own checkpoint), reply with the
  initial de-duplicated weights, the training-case count (the FedAvg weight) and the dataset's case count (the
  coordinator bounds the weight with them and the merged fingerprint: aggregation/site_weights.py), and what the
  server needs to write the global model in nnU-Net's layout (plans/dataset/fingerprint JSONs, checkpoint
  metadata, the alias keys of the full ``state_dict``);
* ``round``: load the received weights into the live network (and the SGD momentum: kept, zeroed or the received
  average, ``--momentum``, aggregation/momentum.py), validate them with nnU-Net's online validation
  when the server asks (the delivered model, see training/delivered.py), run ``epochs_per_round`` nnU-Net
  epochs, reply with the weights (their change from the received ones: see aggregation/wire.py) and the epoch
  metrics; the
  worker then calls :meth:`TrainingSession.save_checkpoint` (``checkpoint_latest.pth``, so the site can resume)
  after the reply has gone, because writing it (about 1 s for a 30 M-parameter network and its optimizer state)
  would otherwise delay every round;
* ``validate``: nnU-Net's online validation of the final aggregated weights (the last delivered model);
* ``finish``: write the federation's best delivered model as ``checkpoint_best.pth`` (nnU-Net's own one, by the
  local EMA pseudo-Dice, is never written in a federation), load the final aggregated weights, write
  ``checkpoint_final.pth`` and run nnU-Net's final validation;
  with ``finetune_epochs``, then fine-tune the final model into the site's own (training/personal.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fednnunet.aggregation import (ModelSpec, delta_to_wire, from_wire, narrows, to_wire, validate_update,
                                   wire_spec)
from fednnunet.aggregation.momentum import MOMENTUM_PREFIX, split_momentum
from fednnunet.protocol.messages import (PersonalModel, TrainFinish, TrainFinishReply, TrainInit, TrainInitReply,
                                         TrainRound, TrainRoundReply, TrainValidate, TrainValidateDeliveredReply,
                                         TrainValidateReply)
from fednnunet.seeding import derive_seed
from fednnunet.training.delivered import BEST_PREFIX
from fednnunet.training.personal import finetune
from fednnunet.training.site_trainer import SiteTrainer, load_trainer_class
from fednnunet.training.weights import alias_map, normalization_keys

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]

__all__ = ["TrainingSession", "validate_only"]


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _dataset_num_cases(nn_trainer: Any) -> int:
    """The cases in this site's preprocessed folder of the configuration (nnU-Net's identifiers: what its split
    divides into training and validation cases)."""
    dataset_class = getattr(nn_trainer, "dataset_class", None)
    if dataset_class is None:
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        dataset_class = infer_dataset_class(nn_trainer.preprocessed_dataset_folder)
    return len(dataset_class.get_identifiers(nn_trainer.preprocessed_dataset_folder))


def _clean(value: Any) -> float | None:
    """JSON has no NaN: nnU-Net's pseudo Dice is NaN for a class absent from prediction and target."""
    return None if value is None or not math.isfinite(float(value)) else float(value)


class TrainingSession:
    """One site's part of a federated training run (one fold); see the module docstring."""

    spec: ModelSpec  # what travels each round (names, shapes, dtypes): set by :meth:`describe`, the init reply

    def __init__(self, site: str, dataset: str, request: TrainInit) -> None:
        self.site, self.dataset = site, dataset
        self.init = request  # the run's options, for the personal model's trainer (finish)
        self.epochs_per_round = request.epochs_per_round
        self.transfer_dtype = request.transfer_dtype
        # how this site's SGD momentum meets the averaging (aggregation/momentum.py); one of MOMENTUM_MODES: the
        # request's type (checked when it was decoded)
        self.momentum = request.momentum
        self._checkpoint_due = False
        self.trainer = SiteTrainer(
            dataset, request.configuration, request.fold,
            trainer_name=request.trainer,
            plans_identifier=request.plans,
            device=request.device,
            pretrained_weights=request.pretrained_weights,
            continue_training=request.continue_training,
            export_npz=request.npz,
            disable_checkpointing=request.disable_checkpointing,
            total_epochs=None if request.rounds is None else request.rounds * request.epochs_per_round,
            iterations_per_epoch=request.iterations_per_round,
            val_iterations=request.val_iterations,
            num_workers=request.da_workers,
            # every site draws its own stream of the run's seed (the same seed everywhere would give every site
            # the same patch positions and augmentations)
            seed=None if request.seed is None else derive_seed(request.seed, "site", site),
            local_best=False,
        )
        if not request.continue_training:  # a best model of an earlier run in this folder is not this run's
            (self.trainer.output_folder / "checkpoint_best.pth").unlink(missing_ok=True)

    def describe(self) -> tuple[TrainInitReply, Arrays]:
        """The ``init`` reply: initial weights plus what the server needs to schedule and to write checkpoints."""
        t = self.trainer
        nn_trainer = t.trainer
        model_dir = t.output_folder.parent
        axes = getattr(nn_trainer, "inference_allowed_mirroring_axes", None)
        reply = TrainInitReply(
            num_training_cases=t.num_training_cases,
            num_validation_cases=t.num_validation_cases,
            current_epoch=t.current_epoch,
            num_epochs=t.num_epochs,
            iterations_per_epoch=int(nn_trainer.num_iterations_per_epoch),
            build_seconds=t.build_seconds,
            output_folder=str(t.output_folder),
            trainer_name=type(nn_trainer).__name__,
            configuration=nn_trainer.configuration_name,
            fold=nn_trainer.fold,
            inference_allowed_mirroring_axes=None if axes is None else [int(a) for a in axes],
            plans=_read_json(model_dir / "plans.json"),
            dataset_json=_read_json(model_dir / "dataset.json"),
            # from the preprocessed folder: the merged fingerprint FFE wrote there (the coordinator bounds the FedAvg
            # weights with it, aggregation/site_weights.py) and the number of cases this site planned with
            dataset_fingerprint=_read_json(Path(nn_trainer.preprocessed_dataset_folder_base)
                                           / "dataset_fingerprint.json"),
            dataset_num_cases=_dataset_num_cases(nn_trainer),
            state_keys=alias_map(nn_trainer.network),
            normalization=normalization_keys(nn_trainer.network),
            not_reproducible=t.not_reproducible,
        )
        weights = self._state(views=False)
        self.spec = ModelSpec.of(weights)
        return reply, weights

    def _state(self, views: bool) -> Arrays:
        """What travels each round: the weights, and with ``--momentum average`` the SGD momentum buffers beside
        them (names prefixed). ``views``: of the live tensors (see ``SiteTrainer.weight_views``), else copies."""
        t = self.trainer
        state = t.weight_views() if views else t.get_weights()
        if self.momentum == "average":
            state.update({MOMENTUM_PREFIX + k: m if views else m.copy() for k, m in t.momentum_views().items()})
        return state

    def round(self, request: TrainRound, arrays: Mapping[str, np.ndarray]) -> tuple[TrainRoundReply, Arrays]:
        """Load the round's weights (if any), train ``epochs_per_round`` epochs (or what remains of the schedule),
        reply weights and metrics.

        The reply's arrays may be views of the live network: pack or copy them before it trains again."""
        t = self.trainer
        epoch_end = request.epoch_end
        if t.current_epoch >= epoch_end:
            return self._replay(epoch_end)
        received = None
        if arrays:
            # What arrives from the network is checked like the server checks site updates: exactly this
            # network's parameters, shapes and dtypes (as sent), finite values.
            validate_update(arrays, wire_spec(self.spec, self.transfer_dtype))
            received = from_wire(arrays, self.spec)
            weights, momentum = split_momentum(received)
            t.set_weights(weights)
            if momentum:
                t.set_momentum(momentum)
            elif self.momentum == "reset":
                t.reset_momentum()
            if not narrows(self.spec, self.transfer_dtype):
                received = {}  # the reply needs no base: the message's bytes can go before the epoch
            if isinstance(arrays, dict):
                arrays.clear()
        delivered = self._validate() if received is not None and request.validate_delivered else None
        remaining = t.num_epochs - t.current_epoch
        epochs = min(self.epochs_per_round, remaining)
        if epochs < 1:
            raise RuntimeError(f"all {t.num_epochs} epochs are already done at this site")
        skipped = 0
        if t.current_epoch + epochs < epoch_end:
            # It missed rounds (left out, restarted from an older checkpoint): it trains the round's own epochs,
            # from the model the round delivered, so that its learning rate follows the federation's schedule.
            skipped = epoch_end - epochs - t.current_epoch
            logger.warning("site %s is at epoch %d, %d epoch(s) behind the round (it missed rounds or restarted "
                           "from an older checkpoint): it trains the round's epochs from the model it received",
                           self.site, t.current_epoch, skipped)
            t.skip_to_epoch(epoch_end - epochs)
        started = time.perf_counter()
        metrics: dict[str, Any] = {}
        compute = 0.0
        for _ in range(epochs):
            metrics = t.run_epoch()
            compute += metrics["epoch_seconds"]
        self._checkpoint_due = not t.trainer.disable_checkpointing
        metrics["epoch_seconds"] = compute
        metrics["site_seconds"] = time.perf_counter() - started
        metrics["pseudo_dice"] = [_clean(d) for d in metrics["pseudo_dice"]]
        for key in ("train_loss", "val_loss", "mean_fg_dice", "ema_fg_dice", "lr"):
            metrics[key] = _clean(metrics[key])
        metrics["epochs"] = epochs
        if skipped:
            metrics["skipped_epochs"] = skipped
        if delivered is not None:
            metrics["delivered"] = delivered
        # Views of the live weights: the reply is packed into its message before the network trains again, so
        # the model is copied once there (a copy here too would add one model to the worker's peak memory).
        state = self._state(views=True)
        if received is None:
            return TrainRoundReply(metrics=metrics), to_wire(state, self.transfer_dtype)
        return TrainRoundReply(metrics=metrics, delta=True), delta_to_wire(state, received, self.transfer_dtype)

    def _validate(self) -> dict[str, Any]:
        report = self.trainer.validate_online()
        report["pseudo_dice"] = [_clean(d) for d in report["pseudo_dice"]]
        for key in ("val_loss", "mean_fg_dice"):
            report[key] = _clean(report[key])
        return report

    def validate(self, arrays: Mapping[str, np.ndarray]) -> TrainValidateDeliveredReply:
        """The ``validate`` reply: nnU-Net's online validation of ``arrays`` (full precision, like ``finish``)."""
        validate_update(arrays, self.spec)
        self.trainer.set_weights(split_momentum(arrays)[0])
        return TrainValidateDeliveredReply(delivered=self._validate())

    def save_checkpoint(self) -> None:
        """Write ``checkpoint_latest.pth`` if a round trained since the last write (lets this site resume its
        optimizer state and LR schedule after a crash)."""
        if self._checkpoint_due:
            self.trainer.save_latest()
            self._checkpoint_due = False

    def _replay(self, epoch_end: int) -> tuple[TrainRoundReply, Arrays]:
        """Answer a round this site already trained before a crash, without training it again.

        Why: after a server crash, the site's ``checkpoint_latest.pth`` can be one round ahead of the server's
        last saved state. The round is then re-sent with the same global model the site already trained from, so
        the site's current weights are exactly the update it would compute; training again would run past the
        LR schedule's end.
        """
        t = self.trainer
        if t.current_epoch > epoch_end:
            raise RuntimeError(f"this site is at epoch {t.current_epoch}, past the round's end epoch {epoch_end}: "
                               "its checkpoints are newer than the server's state")
        log = t.trainer.logger

        def last(key: str) -> Any:
            try:
                return log.get_value(key, step=-1)
            except (KeyError, IndexError):
                return None

        dice = last("dice_per_class_or_region") or []
        metrics = {"train_loss": _clean(last("train_losses")), "val_loss": _clean(last("val_losses")),
                   "pseudo_dice": [_clean(float(d)) for d in dice], "mean_fg_dice": _clean(last("mean_fg_dice")),
                   "ema_fg_dice": _clean(last("ema_fg_dice")), "lr": _clean(last("lrs")),
                   "num_training_cases": t.num_training_cases, "epoch_seconds": 0.0, "site_seconds": 0.0,
                   "epoch": t.current_epoch, "epochs": 0, "replayed": True}
        logger.info("round ending at epoch %d was already trained here before a restart: replaying its weights",
                    epoch_end)
        return TrainRoundReply(metrics=metrics), to_wire(self._state(views=False), self.transfer_dtype)

    def finish(self, request: TrainFinish, arrays: Mapping[str, np.ndarray]) -> TrainFinishReply:
        """Write the final model as ``checkpoint_final.pth`` and run nnU-Net's final validation unless disabled."""
        validate = request.validate
        best = {k[len(BEST_PREFIX):]: v for k, v in arrays.items() if k.startswith(BEST_PREFIX)}
        final = {k: v for k, v in arrays.items() if not k.startswith(BEST_PREFIX)}
        for model in (final, best):
            if model:
                validate_update(model, self.spec)
        final, best = split_momentum(final)[0], split_momentum(best)[0]  # a checkpoint's optimizer is the site's
        # the federation's best delivered model: sent beside the final one, or the final one itself
        best_weights = best or (final if request.best == "final" else None)
        if best_weights:
            self.trainer.save_best(best_weights)
        else:
            (self.trainer.output_folder / "checkpoint_best.pth").unlink(missing_ok=True)
        # the personal model starts from the final model (taken before a --val_best validation loads the best one)
        start = (final or self.trainer.get_weights()) if request.finetune_epochs else None
        folder = self.trainer.finish(final or None, validate=validate, best=request.val_best)
        # without validation an old summary would describe another model
        return TrainFinishReply(output_folder=str(folder), checkpoint=str(folder / "checkpoint_final.pth"),
                                personal=None if start is None else self._personal(start, request),
                                **(_validation_result(folder) if validate else {}))

    def _personal(self, weights: Arrays, request: TrainFinish) -> PersonalModel:
        """Fine-tune ``weights`` on this site's training cases into its personal model (training/personal.py)."""
        preprocessed = Path(self.trainer.trainer.preprocessed_dataset_folder_base)
        folder = finetune(self.site, self.dataset, self.init, preprocessed, weights, request.finetune_epochs,
                          request.validate)
        return PersonalModel(output_folder=str(folder), checkpoint=str(folder / "checkpoint_final.pth"),
                             epochs=request.finetune_epochs, **(_validation_result(folder) if request.validate else {}))

    def close(self) -> None:
        self.trainer.close()


def _validation_result(folder: Path) -> dict[str, Any]:
    """The final validation's ``summary.json``: its path, the foreground mean Dice, and the sums and counts the
    coordinator pools into the cross-validation table (no per-case value leaves the site); as the fields of a
    :class:`TrainValidateReply` (none when there is no summary)."""
    from fednnunet.cross_validation.aggregates import MetricSums

    summary = folder / "validation" / "summary.json"
    if not summary.is_file():
        return {}
    data = json.loads(summary.read_text())
    return {"validation_summary": str(summary),
            "validation_mean_dice": _clean((data.get("foreground_mean") or {}).get("Dice", float("nan"))),
            "validation_sums": MetricSums.of_summary(data).to_json()}


def validate_only(dataset: str, request: TrainValidate) -> TrainValidateReply:
    """``nnUNetv2_train --val``: final validation of this site's existing ``checkpoint_final.pth`` (no training).

    Built directly from nnU-Net's ``maybe_load_checkpoint(validation_only=True)`` because a SiteTrainer would
    start data loaders that validation does not need.
    """
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    import torch

    name = maybe_convert_to_dataset_name(int(dataset) if str(dataset).isdigit() else dataset)
    base = join(nnUNet_preprocessed.get(), name)
    plans = load_json(join(base, request.plans + ".json"))
    plans["continue_training"] = False  # nnU-Net 2.8's trainer pops this flag from the plans (see SiteTrainer)
    fold = request.fold if request.fold == "all" else int(request.fold)
    trainer = load_trainer_class(request.trainer)(
        plans=plans, configuration=request.configuration, fold=fold,
        dataset_json=load_json(join(base, "dataset.json")), device=torch.device(request.device))
    maybe_load_checkpoint(trainer, False, True, None)
    if request.val_best:
        trainer.load_checkpoint(join(trainer.output_folder, "checkpoint_best.pth"))
    trainer.perform_actual_validation(request.npz)
    return TrainValidateReply(output_folder=str(trainer.output_folder),
                              **_validation_result(Path(trainer.output_folder)))
