"""The training options of a job, and the requests the coordinator builds from them for the sites.

Why here and only here: the options are the coordinator's (``JobSpec.train``, the flags of ``fednnunet run train``);
what a site needs of them travels as a :class:`~fednnunet.protocol.messages.TrainInit` (or ``TrainValidate``) built
by :meth:`TrainOptions.train_init`, so every value a site uses is the coordinator's, and a site never restates a
default. The number of rounds is the coordinator's own rule too (``--rounds`` or :func:`default_epochs`), never a
site's ``num_epochs``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, TypeVar

from fednnunet.aggregation import WIRE_DTYPES
from fednnunet.aggregation.momentum import MOMENTUM_MODES
from fednnunet.aggregation.robust import check_max_norm
from fednnunet.identifiers import check_identifier
from fednnunet.protocol.messages import TrainInit, TrainValidate
from fednnunet.training.personal import personal_plans

__all__ = ["NNUNET_DEFAULT_EPOCHS", "TrainOptions", "default_epochs"]

_Request = TypeVar("_Request", bound=TrainInit)


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
    validate_delivered_every: int = 1  # validate the delivered model every N rounds (0: never; training/delivered.py)
    momentum: str = "local"  # the sites' SGD momentum: kept, reset or averaged each round (aggregation/momentum.py)
    server_momentum: float = 0.0  # FedAvgM's beta at the server (FFE only; 0: plain FedAvg)
    clip_update_norm: float | None = None  # bound on the L2 norm of each site's update (aggregation/robust.py)
    finetune_epochs: int = 0  # then every site fine-tunes the final model into its own (training/personal.py)
    local_norm: bool = False  # FedBN: every site keeps its normalization layers' weights (aggregation/strategy.py)

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
        for name in ("seed", "validate_delivered_every", "finetune_epochs"):
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
        if self.finetune_epochs:
            check_identifier(personal_plans(self.plans), "plans")  # the personal models' folders are named by it
            if self.validation_only or self.disable_checkpointing:
                raise ValueError("--finetune-epochs trains and writes a personal model at every site: not with "
                                 "--val or --disable_checkpointing")
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

    def train_init(self, fold: str, continue_training: bool) -> TrainInit:
        """The request that builds a site's trainer for ``fold`` (``continue_training``: from its own checkpoint)."""
        return self._site_request(TrainInit, fold, continue_training)

    def train_validate(self, fold: str) -> TrainValidate:
        """``--val``: the request that validates a site's existing final checkpoint of ``fold``."""
        return self._site_request(TrainValidate, fold, continue_training=False)

    def _site_request(self, cls: type[_Request], fold: str, continue_training: bool) -> _Request:
        """Every field of the request is the option of the same name: the options a request has no field for
        (``weighting``, ``min_sites``, the timeouts, ...) are the coordinator's alone."""
        values = {f.name: getattr(self, f.name) for f in fields(cls) if f.name != "fold"}
        values.update(fold=fold, continue_training=continue_training)
        if continue_training:
            values["pretrained_weights"] = None
        return cls(**values)


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

