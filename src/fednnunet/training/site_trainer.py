"""A stock nnU-Net trainer, built once per site and driven one epoch per federated round.

Why not ``nnUNetTrainer.run_training()`` per round: it calls ``on_train_start`` each time, which rebuilds the
data loaders (and their worker processes), re-unpacks the dataset, and on CUDA leaves a fresh
``torch.compile`` to warm up. ``SiteTrainer`` builds the trainer exactly the way ``nnUNetv2_train`` does
(``nnunetv2.run.run_training``: plans and dataset.json from ``$nnUNet_preprocessed``, ``--c`` / pretrained
weights via ``maybe_load_checkpoint``), calls ``on_train_start`` once, and then runs nnU-Net's own per-epoch
hook sequence (copied in *order* from ``nnUNetTrainer.run_training``, never in content) whenever the
federation asks for a round. Optimizer state (SGD momentum 0.99), the poly LR schedule (driven by
``current_epoch`` / ``num_epochs``) and nnU-Net's logger stay local trainer state across rounds; only the
weights are exchanged, in place (see ``weights``).

Nothing of nnU-Net is subclassed, copied or patched: the trainer class is the stock one (or any ``-tr``
variant by name), so ``finish()`` leaves an ordinary nnU-Net results folder that ``nnUNetv2_predict``,
``nnUNetv2_find_best_configuration`` and ``nnUNetv2_export_model_to_zip`` use as is.

Environment, read by nnU-Net (set it before constructing, in the site process):

* ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results``: read once when ``nnunetv2.paths`` is first
  imported. This module therefore imports nnU-Net lazily, inside the constructor, so a process can set them
  after importing ``fednnunet``, but never after anything imported ``nnunetv2``.
* ``nnUNet_n_proc_DA``: number of data-augmentation worker processes; ``0`` runs augmentation in the
  training process (fastest for tiny CPU runs, no worker start-up). ``SiteTrainer(num_workers=...)`` sets it.
* ``nnUNet_def_n_proc``: worker processes of the final validation's export pool (default 8).
* ``nnUNet_compile``: torch.compile on CUDA (nnU-Net's default: on; never on CPU).

nnU-Net starts helper processes with the ``spawn`` method (dataset unpacking, the final validation's export
pool), which re-imports the parent's ``__main__``: a script that builds a ``SiteTrainer`` must do so under
``if __name__ == "__main__":`` or every helper builds another trainer.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fednnunet.seeding import derive_seed, seed_everything
from fednnunet.training.weights import (copy_in_place, live_state, load_unique_state, momentum_buffers,
                                       unique_state, unwrap)

if TYPE_CHECKING:  # pragma: no cover - typing only; importing nnunetv2 freezes its path variables
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

logger = logging.getLogger(__name__)

__all__ = ["SiteTrainer", "load_trainer_class"]


def load_trainer_class(trainer_name: str) -> type:
    """The nnU-Net trainer class called ``trainer_name``.

    ``nnUNetTrainer`` is imported directly. Any other name goes through nnU-Net's own lookup
    (``recursive_find_trainer_class_by_name``, i.e. ``recursive_find_python_class`` over
    ``nnunetv2/training/nnUNetTrainer`` plus ``$nnUNet_extTrainer``), exactly as ``nnUNetv2_train -tr`` does.
    Why the special case: that lookup imports every trainer module, including ``primus/`` (timm ->
    torchvision), which crashes with a CPU-only torch beside a CUDA torchvision build.
    """
    if trainer_name == "nnUNetTrainer":
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        return nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    return recursive_find_trainer_class_by_name(trainer_name)


def _normalize_fold(fold: int | str) -> int | str:
    """``'all'`` stays a string, anything else must be an integer (as ``nnUNetv2_train`` accepts it)."""
    if isinstance(fold, str):
        if fold == "all":
            return fold
        try:
            return int(fold)
        except ValueError:
            raise ValueError(f"fold must be an integer or 'all', got {fold!r}") from None
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)):
        raise ValueError(f"fold must be an integer or 'all', got {fold!r}")
    return int(fold)


def _positive_or_none(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


class SiteTrainer:
    """One site's nnU-Net trainer, alive for the whole federation.

    Typical use in a site process, per round: ``set_weights(global)``, ``run_epoch()``, ``get_weights()``
    (and optionally ``save_latest()``); at the end ``finish(final_global_weights)``.

    Args:
        dataset: nnU-Net dataset id (``901``, ``"901"``) or name (``"Dataset901_SiteA"``); must be planned and
            preprocessed in ``$nnUNet_preprocessed``.
        configuration: nnU-Net configuration, e.g. ``"2d"``, ``"3d_fullres"``.
        fold: cross-validation fold (``0``-``4``) or ``"all"``, as ``nnUNetv2_train``.
        trainer_name: stock trainer class name (``-tr``); the checkpoint records it so inference finds it.
        plans_identifier: plans file name without ``.json`` (``-p``).
        device: ``"cpu"``, ``"cuda"`` or a ``torch.device``.
        pretrained_weights: nnU-Net checkpoint to initialise from (``-pretrained_weights``; nnU-Net's
            ``load_pretrained_weights``, which skips the segmentation heads). Not with ``continue_training``.
        continue_training: resume from this site's own ``checkpoint_final.pth`` (or a newer
            ``checkpoint_latest.pth`` beside it), else ``checkpoint_latest.pth``,
            else ``checkpoint_best.pth`` (``--c``; starts fresh with nnU-Net's warning when none exists).
        export_npz: also save softmax probabilities in the final validation (``--npz``).
        disable_checkpointing: never write checkpoints (``--disable_checkpointing``). Then ``finish`` writes no
            ``checkpoint_final.pth`` and the folder cannot be used for inference.
        total_epochs: ``trainer.num_epochs``; set it to rounds x epochs per round so nnU-Net's poly LR decays
            over the federation (default: the trainer's own, 1000 for the stock trainer).
        iterations_per_epoch: overrides ``trainer.num_iterations_per_epoch`` (stock: 250).
        val_iterations: overrides ``trainer.num_val_iterations_per_epoch`` (stock: 50).
        num_workers: if given, sets ``os.environ['nnUNet_n_proc_DA']`` before building, which nnU-Net reads
            for its augmentation workers (0: augment in this process, best for tiny CPU runs).
        seed: seeds Python's, numpy's and torch's generators (``fednnunet.seeding``) before the trainer is built
            (network initialisation, the loaders' first batch) and again at the start of every epoch from
            ``(seed, epoch)``. Bit-for-bit repeatable on CPU with augmentation in this process
            (``num_workers=0``); :attr:`not_reproducible` says why a run is not. None: nnU-Net's unseeded default.
            The online validation is reseeded from ``(seed, "val", epoch)``, so :meth:`validate_online` before an
            epoch sees exactly the patches that epoch's own validation sees.
        local_best: let nnU-Net write ``checkpoint_best.pth`` by its local EMA pseudo-Dice (and its periodic
            ``checkpoint_latest.pth``) in ``on_epoch_end``, as ``nnUNetv2_train``. A federation passes False: its
            best model is the best *delivered* model, written with :meth:`save_best` (see training.session).
        initial_lr_factor: scales the trainer's ``initial_lr`` (the start of its poly schedule) before the optimizer
            is built; a personal model's fine-tuning starts from a fraction of it (training/personal.py). None: the
            trainer's own.

    Raises:
        ValueError: bad fold, iteration or epoch numbers.
        RuntimeError: from nnU-Net, e.g. unknown dataset, or both ``continue_training`` and
            ``pretrained_weights``.
    """

    def __init__(
        self,
        dataset: int | str,
        configuration: str,
        fold: int | str = 0,
        trainer_name: str = "nnUNetTrainer",
        plans_identifier: str = "nnUNetPlans",
        device: str | torch.device = "cpu",
        pretrained_weights: str | os.PathLike[str] | None = None,
        continue_training: bool = False,
        export_npz: bool = False,
        disable_checkpointing: bool = False,
        total_epochs: int | None = None,
        iterations_per_epoch: int | None = None,
        val_iterations: int | None = None,
        num_workers: int | None = None,
        seed: int | None = None,
        local_best: bool = True,
        initial_lr_factor: float | None = None,
    ) -> None:
        start = time.perf_counter()
        fold = _normalize_fold(fold)
        total_epochs = _positive_or_none("total_epochs", total_epochs)
        iterations_per_epoch = _positive_or_none("iterations_per_epoch", iterations_per_epoch)
        val_iterations = _positive_or_none("val_iterations", val_iterations)
        if continue_training and pretrained_weights is not None:
            # checked here too (nnU-Net checks it only after building the trainer) to fail before any work
            raise RuntimeError("continue_training and pretrained_weights are mutually exclusive "
                               "(pretrained weights only apply at the start of a training)")
        if num_workers is not None:
            if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
                raise ValueError(f"num_workers must be a non-negative integer or None, got {num_workers!r}")
            os.environ["nnUNet_n_proc_DA"] = str(num_workers)

        # nnU-Net imports are deferred to here: nnunetv2.paths freezes the nnUNet_* variables at import time.
        from batchgenerators.utilities.file_and_folder_operations import join, load_json
        from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results
        from nnunetv2.run.run_training import maybe_load_checkpoint
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

        if not nnUNet_preprocessed.is_set() or not nnUNet_results.is_set():
            raise RuntimeError("nnUNet_preprocessed and nnUNet_results must be set in the environment before "
                               "nnunetv2 is first imported in this process")

        self.export_npz = bool(export_npz)
        self.device = torch.device(device)
        self.seed = None if seed is None else derive_seed(seed)  # checked here, before any work
        self.local_best = bool(local_best)
        self._reseed("build")
        trainer_class = load_trainer_class(trainer_name)
        dataset_name = maybe_convert_to_dataset_name(dataset if isinstance(dataset, str) else int(dataset))

        # as nnunetv2.run.run_training.get_trainer_from_args (which takes a string id and always looks the
        # trainer up by name, hence not called directly)
        preprocessed_base = join(nnUNet_preprocessed.get(), dataset_name)
        plans = load_json(join(preprocessed_base, plans_identifier + ".json"))
        plans["continue_training"] = bool(continue_training)  # popped by the trainer, tells its logger to resume
        dataset_json = load_json(join(preprocessed_base, "dataset.json"))
        trainer: nnUNetTrainer = trainer_class(plans=plans, configuration=configuration, fold=fold,
                                               dataset_json=dataset_json, device=self.device)
        if disable_checkpointing:
            trainer.disable_checkpointing = True
        # Before initialize(): configure_optimizers() hands num_epochs to the PolyLRScheduler.
        if total_epochs is not None:
            trainer.num_epochs = total_epochs
        if iterations_per_epoch is not None:
            trainer.num_iterations_per_epoch = iterations_per_epoch
        if val_iterations is not None:
            trainer.num_val_iterations_per_epoch = val_iterations
        if initial_lr_factor is not None:
            trainer.initial_lr = trainer.initial_lr * initial_lr_factor

        latest = Path(trainer.output_folder) / "checkpoint_latest.pth"
        final = Path(trainer.output_folder) / "checkpoint_final.pth"
        if (continue_training and latest.is_file() and final.is_file()
                and latest.stat().st_mtime > final.stat().st_mtime):
            # nnU-Net's --c prefers checkpoint_final.pth; a newer checkpoint_latest.pth beside it means a later
            # run in this folder crashed after an earlier one had finished: resume the later run.
            trainer.load_checkpoint(str(latest))
        else:
            maybe_load_checkpoint(trainer, bool(continue_training), False,
                                  None if pretrained_weights is None else os.fspath(pretrained_weights))
        if self.device.type == "cuda":  # as run_training
            torch.backends.cudnn.deterministic = False
            torch.backends.cudnn.benchmark = True

        #: why a seeded run is not bit-for-bit repeatable here (empty: it is, or no seed was given)
        self.not_reproducible: list[str] = []
        if seed is not None and get_allowed_n_proc_DA() > 0:
            self.not_reproducible.append(
                f"nnUNet_n_proc_DA={get_allowed_n_proc_DA()}: nnU-Net's augmentation workers are unseeded and "
                "their batches arrive in any order (use 0)")
        if seed is not None and self.device.type == "cuda":
            self.not_reproducible.append("CUDA: cuDNN benchmark mode and non-deterministic GPU kernels "
                                         "(as nnUNetv2_train)")
        for reason in self.not_reproducible:
            logger.warning("seeded, but not bit-for-bit repeatable: %s", reason)

        # Builds network/optimizer if needed, data loaders, unpacks the dataset, writes plans.json,
        # dataset.json and dataset_fingerprint.json next to the fold folder.
        trainer.on_train_start()
        self.trainer = trainer
        self._finished = False
        self._closed = False

        train_keys, val_keys = trainer.do_split()
        #: number of training cases of this fold: the FedAvg weight of this site
        self.num_training_cases: int = len(train_keys)
        #: number of validation cases of this fold (the weight of this site's delivered-model validation)
        self.num_validation_cases: int = len(val_keys)
        #: wall seconds of the build (trainer, network, data loaders, dataset unpacking, checkpoint loading)
        self.build_seconds: float = time.perf_counter() - start
        logger.info("site trainer %s %s fold %s built in %.1f s: %s training cases, epoch %d of %d, "
                    "%d+%d iterations per epoch, output %s", dataset_name, configuration, fold, self.build_seconds,
                    self.num_training_cases, trainer.current_epoch, trainer.num_epochs,
                    trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch, trainer.output_folder)

    # ------------------------------------------------------------------ state

    @property
    def network(self) -> torch.nn.Module:
        """The plain network (DDP / torch.compile wrappers removed); its tensors are the live training tensors."""
        return unwrap(self.trainer.network)

    @property
    def current_epoch(self) -> int:
        """Number of epochs completed so far (nnU-Net's ``current_epoch``: the index of the next epoch)."""
        return int(self.trainer.current_epoch)

    @property
    def num_epochs(self) -> int:
        """Total epochs the poly LR schedule spans (``trainer.num_epochs``)."""
        return int(self.trainer.num_epochs)

    @property
    def output_folder(self) -> Path:
        """``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/fold_<fold>``."""
        return Path(self.trainer.output_folder)

    def get_weights(self) -> dict[str, np.ndarray]:
        """The network's weights, one entry per distinct tensor (alias keys removed), as numpy copies."""
        return unique_state(self.trainer.network)

    def weight_views(self) -> dict[str, np.ndarray]:
        """As :meth:`get_weights`, but views of the live tensors on the CPU: valid until the network trains again."""
        return live_state(self.trainer.network)

    def set_weights(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Writes ``arrays`` in place into the live network; optimizer state and compiled graphs stay valid.

        Raises:
            ValueError: missing/unexpected key or shape mismatch (nothing is written then).
        """
        load_unique_state(self.trainer.network, arrays)

    def _momentum(self) -> dict[str, torch.Tensor]:
        return momentum_buffers(self.trainer.network, self.trainer.optimizer)

    def momentum_views(self) -> dict[str, np.ndarray]:
        """The optimizer's SGD momentum buffers, keyed like the weights (views on the CPU, as :meth:`weight_views`);
        zeros for weights not stepped yet (see ``weights.momentum_buffers``)."""
        with torch.no_grad():
            return {k: b.detach().cpu().numpy() for k, b in self._momentum().items()}

    def set_momentum(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Writes ``arrays`` in place into the optimizer's momentum buffers (``--momentum average``).

        Raises:
            ValueError: the names, shapes or dtype kinds are not those of :meth:`momentum_views` (nothing is
                written then).
        """
        copy_in_place(self._momentum(), arrays, what="momentum buffer", holder="optimizer")

    def reset_momentum(self) -> None:
        """Zeroes the optimizer's momentum buffers (``--momentum reset``: the next step starts like a fresh SGD)."""
        with torch.no_grad():
            for buf in self._momentum().values():
                buf.zero_()

    # ------------------------------------------------------------------ training

    def run_epoch(self) -> dict[str, Any]:
        """Runs one nnU-Net epoch with the stock hooks, in the order of ``nnUNetTrainer.run_training``.

        Returns:
            ``train_loss`` and ``val_loss`` (float), ``pseudo_dice`` (list of float per foreground class or
            region, nnU-Net's online validation Dice; NaN for a class absent from prediction and target),
            ``mean_fg_dice`` and ``ema_fg_dice`` (float), ``lr`` (float, the learning rate of this epoch),
            ``num_training_cases`` (int), ``epoch_seconds`` (float, wall time of the hooks here) and ``epoch``
            (int, ``current_epoch`` after the epoch, i.e. epochs completed).

        Raises:
            RuntimeError: after ``finish``/``close``, or when all ``total_epochs`` are done (the poly LR
                ``(1 - epoch / num_epochs) ** 0.9`` is undefined past the end).
        """
        self._check_open()
        t = self.trainer
        if t.current_epoch >= t.num_epochs:
            raise RuntimeError(f"all {t.num_epochs} epochs are done (current_epoch={t.current_epoch}); "
                               "raise total_epochs to train further")
        start = time.perf_counter()
        self._reseed("epoch", t.current_epoch)
        t.on_epoch_start()

        t.on_train_epoch_start()
        train_outputs = [t.train_step(next(t.dataloader_train)) for _ in range(t.num_iterations_per_epoch)]
        t.on_train_epoch_end(train_outputs)

        self._validation_epoch()
        logged = self._local_log().my_fantastic_logging
        if math.isnan(logged["ema_fg_dice"][t.current_epoch]):  # every epoch before was skipped: nnU-Net's EMA
            logged["ema_fg_dice"][t.current_epoch] = logged["mean_fg_dice"][t.current_epoch]  # starts at its first value
        if self.local_best:
            t.on_epoch_end()  # logs, periodic/best checkpoints, progress.png, current_epoch += 1
        else:  # the same hook with nnU-Net's own switch off: no checkpoint_best.pth by the local EMA
            t.disable_checkpointing, checkpointing = True, t.disable_checkpointing
            try:
                t.on_epoch_end()
            finally:
                t.disable_checkpointing = checkpointing
        seconds = time.perf_counter() - start

        log = t.logger
        metrics: dict[str, Any] = {
            "train_loss": float(log.get_value("train_losses", step=-1)),
            "val_loss": float(log.get_value("val_losses", step=-1)),
            "pseudo_dice": [float(d) for d in log.get_value("dice_per_class_or_region", step=-1)],
            "mean_fg_dice": float(log.get_value("mean_fg_dice", step=-1)),
            "ema_fg_dice": float(log.get_value("ema_fg_dice", step=-1)),
            "lr": float(log.get_value("lrs", step=-1)),
            "num_training_cases": self.num_training_cases,
            "epoch_seconds": seconds,
            "epoch": int(t.current_epoch),
        }
        logger.info("epoch %d/%d done in %.2f s: train_loss %.4f val_loss %.4f pseudo_dice %s",
                    metrics["epoch"], t.num_epochs, seconds, metrics["train_loss"], metrics["val_loss"],
                    [round(d, 4) for d in metrics["pseudo_dice"]])
        return metrics

    def _validation_epoch(self) -> None:
        """nnU-Net's online validation (``num_val_iterations_per_epoch`` batches of the validation loader), logged
        by ``on_validation_epoch_end`` into ``trainer.logger`` at ``current_epoch``."""
        t = self.trainer
        self._reseed("val", t.current_epoch)
        with torch.no_grad():
            t.on_validation_epoch_start()
            val_outputs = [t.validation_step(next(t.dataloader_val)) for _ in range(t.num_val_iterations_per_epoch)]
            t.on_validation_epoch_end(val_outputs)

    def validate_online(self) -> dict[str, Any]:
        """nnU-Net's online validation of the network's current weights (e.g. a model just received), without
        training and without touching nnU-Net's training log.

        The hooks are nnU-Net's own (same iterations, loader and pseudo-Dice as every epoch's validation); their
        log goes to a scratch ``LocalLogger`` that is dropped afterwards, so the trainer's log, EMA pseudo-Dice
        and progress.png keep describing the local epochs only.

        Returns:
            ``val_loss``, ``pseudo_dice`` (per foreground class or region, NaN for a class absent from
            prediction and target), ``mean_fg_dice``, ``num_val_cases`` and ``seconds``.
        """
        from nnunetv2.training.logging.nnunet_logger import LocalLogger

        self._check_open()
        t = self.trainer
        start = time.perf_counter()
        log, t.logger = t.logger, LocalLogger()
        try:
            self._validation_epoch()
            scratch = t.logger
        finally:
            t.logger = log
        return {"val_loss": float(scratch.get_value("val_losses", step=-1)),
                "pseudo_dice": [float(d) for d in scratch.get_value("dice_per_class_or_region", step=-1)],
                "mean_fg_dice": float(scratch.get_value("mean_fg_dice", step=-1)),
                "num_val_cases": self.num_validation_cases, "seconds": time.perf_counter() - start}

    def _reseed(self, *keys: str | int) -> None:
        """Seed every generator for the step named by ``keys`` (no-op without a seed): each step's draws are then
        independent of how many draws came before it (a resumed run, an extra validation)."""
        if self.seed is not None:
            seed_everything(derive_seed(self.seed, *keys))

    def skip_to_epoch(self, epoch: int) -> None:
        """Continue at ``epoch`` (a site that missed federated rounds): the poly learning rate follows
        ``current_epoch``, the epochs in between are not trained here.

        nnU-Net's log holds exactly one entry per epoch and key (its lists are indexed by epoch), so each skipped
        epoch gets NaN for what was not measured (gaps in ``progress.png``) and the EMA pseudo-Dice carried over
        unchanged; written to the local log directly, because logging ``mean_fg_dice`` would update the EMA."""
        self._check_open()
        if not self.current_epoch <= epoch < self.num_epochs:
            raise ValueError(f"cannot skip from epoch {self.current_epoch} to {epoch} of {self.num_epochs}")
        log = self._local_log()
        for skipped in range(self.current_epoch, epoch):
            ema = log.my_fantastic_logging["ema_fg_dice"]
            carried = ema[-1] if ema else float("nan")
            for key in log.my_fantastic_logging:
                log.log(key, carried if key == "ema_fg_dice" else float("nan"), skipped)
        self.trainer.current_epoch = epoch

    def _local_log(self) -> Any:
        """nnU-Net's per-epoch lists: the trainer's ``nnUNetLogger`` (or the local one inside 2.8's ``MetaLogger``)."""
        return getattr(self.trainer.logger, "local_logger", self.trainer.logger)

    def save_latest(self) -> Path | None:
        """Saves ``checkpoint_latest.pth`` (live weights, optimizer, logger, epoch) with the trainer's own code.

        Why: lets a site resume after a crash with ``continue_training=True`` at the right epoch (see :meth:`_save`).

        Returns:
            the checkpoint path, or None when checkpointing is disabled.
        """
        self._check_open()
        if self.trainer.disable_checkpointing:
            logger.info("checkpointing is disabled: no checkpoint_latest.pth written")
            return None
        path = self._save("checkpoint_latest.pth")
        logger.info("saved %s (resumes at epoch %d)", path, self.trainer.current_epoch)
        return path

    def save_best(self, weights: Mapping[str, np.ndarray]) -> Path | None:
        """Write ``weights`` as ``checkpoint_best.pth`` with nnU-Net's own checkpoint code (a federation's best
        delivered model); the live network keeps its weights. None when checkpointing is disabled."""
        self._check_open()
        if self.trainer.disable_checkpointing:
            return None
        live = self.get_weights()
        self.set_weights(weights)
        try:
            return self._save("checkpoint_best.pth")
        finally:
            self.set_weights(live)

    def _save(self, name: str) -> Path:
        """``trainer.save_checkpoint`` between epochs: it stores ``current_epoch + 1`` because nnU-Net calls it in
        ``on_epoch_end`` before the increment, so the counter is stepped back around the call (as nnU-Net's
        ``on_train_end`` does for ``checkpoint_final.pth``)."""
        t = self.trainer
        path = self.output_folder / name
        t.current_epoch -= 1
        try:
            t.save_checkpoint(str(path))
        finally:
            t.current_epoch += 1
        return path

    def finish(self, final_weights: Mapping[str, np.ndarray] | None = None, validate: bool = True,
               best: bool = False) -> Path:
        """Ends training like ``nnUNetv2_train``: final checkpoint, data loaders shut down, final validation.

        Args:
            final_weights: the federation's final (aggregated) weights, loaded into the live network first so
                that ``checkpoint_final.pth`` is the global model; None keeps the current weights.
            validate: run nnU-Net's ``perform_actual_validation`` on this fold's validation cases
                (``fold_X/validation/summary.json``); sliding window with mirroring, so it is the slow part.
            best: validate with this site's ``checkpoint_best.pth`` instead (``--val_best``): nnU-Net's best
                local epoch, or in a federation (``local_best=False``) the best delivered model (:meth:`save_best`).

        Returns:
            the fold folder, an ordinary nnU-Net results folder (``checkpoint_final.pth`` with the stock
            ``trainer_name``; plans.json, dataset.json, dataset_fingerprint.json one level up).
        """
        self._check_open()
        t = self.trainer
        if final_weights is not None:
            self.set_weights(final_weights)
        if best and t.disable_checkpointing:
            raise RuntimeError("best=True needs checkpoint_best.pth, but checkpointing is disabled")
        if best and validate and not (self.output_folder / "checkpoint_best.pth").is_file():
            raise RuntimeError(f"best=True needs {self.output_folder / 'checkpoint_best.pth'}, which does not exist")
        if t.disable_checkpointing:
            logger.warning("checkpointing is disabled: no checkpoint_final.pth, the folder cannot be used "
                           "for inference")
        start = time.perf_counter()
        t.on_train_end()  # writes checkpoint_final.pth, removes checkpoint_latest.pth, stops loader workers
        self._finished = True
        self._closed = True
        if validate:
            if best:
                t.load_checkpoint(str(self.output_folder / "checkpoint_best.pth"))
            t.perform_actual_validation(self.export_npz)
        logger.info("finished %s in %.1f s (validation: %s)", self.output_folder, time.perf_counter() - start,
                    validate)
        return self.output_folder

    def close(self) -> None:
        """Stops the data-augmentation workers without writing anything (abort path); idempotent.

        ``finish`` already does this through nnU-Net's ``on_train_end``. After ``close`` the trainer cannot
        train any more.
        """
        if self._closed:
            return
        self._closed = True
        for loader in (self.trainer.dataloader_train, self.trainer.dataloader_val):
            stop = getattr(loader, "_finish", None)  # only the multi-process augmenters have workers to stop
            if callable(stop):
                stop()
        logger.info("closed site trainer %s", self.output_folder)

    def __enter__(self) -> SiteTrainer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError("this SiteTrainer is finished; build a new one to train again")
        if self._closed:
            raise RuntimeError("this SiteTrainer is closed; build a new one to train again")
