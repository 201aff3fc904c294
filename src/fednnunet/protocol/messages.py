"""Every operation a coordinator sends to a site: its request and its reply, with their fields and defaults.

A request class names its operation (``OP``) and its reply class (``REPLY``); the arrays that travel beside a
message (model weights, histograms) are not fields: each class's docstring says which it carries. Defaults live
here and nowhere else: a site does not restate what the coordinator meant by an option it left out. Every reply
has the fields of :class:`Reply`, which the site worker fills in for every operation (who answered, and when: the
coordinator splits a round trip into download, site work and upload with them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Literal


#: How a site's SGD momentum meets the averaging (``--momentum``; aggregation/momentum.py)
MomentumMode = Literal["local", "reset", "average"]
#: The float type of the weights on the wire (``--transfer-dtype``; aggregation/wire.py)
WireDtype = Literal["float32", "float16"]


class Op(str, Enum):
    """The operations a site answers, in the order a federation uses them."""

    DESCRIBE = "describe"
    FINGERPRINT_SAMPLE = "fingerprint_sample"
    FINGERPRINT_COUNTS = "fingerprint_counts"
    FINGERPRINT_APPLY = "fingerprint_apply"
    TRAIN_INIT = "train_init"
    TRAIN_ROUND = "train_round"
    TRAIN_VALIDATE_DELIVERED = "train_validate_delivered"
    TRAIN_FINISH = "train_finish"
    TRAIN_VALIDATE = "train_validate"
    CV_EVALUATE = "cv_evaluate"
    CV_POSTPROCESS = "cv_postprocess"
    CV_FINISH = "cv_finish"
    JOB_DONE = "job_done"
    #: only for the bench's floor of bare Flower: a ClientApp that sends the arrays back (bench/flower_floor.py)
    ECHO = "echo"


@dataclass(frozen=True, kw_only=True)
class Reply:
    """What every reply holds besides its operation's fields (set by the site worker, not by the operation)."""

    site: str = ""
    seconds: float = 0.0  # the operation's own time at the site
    received_at: float = 0.0  # wall clock when the site took the request ...
    replied_at: float = 0.0  # ... and when it replied


@dataclass(frozen=True, kw_only=True)
class Request:
    OP: ClassVar[Op]
    REPLY: ClassVar[type[Reply]]


# --- job ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class JobDoneReply(Reply):
    exiting: bool  # the site was started for one job and exits now


@dataclass(frozen=True, kw_only=True)
class JobDone(Request):
    """The job ended; a site started for one job (``fednnunet client``) exits after replying."""

    OP = Op.JOB_DONE
    REPLY = JobDoneReply


@dataclass(frozen=True, kw_only=True)
class EchoReply(Reply):
    pass


@dataclass(frozen=True, kw_only=True)
class Echo(Request):
    """Arrays: any; the reply carries them back (the bench's floor of bare Flower)."""

    OP = Op.ECHO
    REPLY = EchoReply


# --- fingerprint and planning -------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DescribeReply(Reply):
    dataset_name: str
    num_cases: int
    dataset_json: dict[str, Any]
    problems: list[str] = field(default_factory=list)  # per case: the job stops before anything is written
    warnings: list[str] = field(default_factory=list)  # per case: shown to the people running the job
    version: str  # the site's fednnunet version (the coordinator refuses others)


@dataclass(frozen=True, kw_only=True)
class SampleAhead:
    num_processes: int = 1


@dataclass(frozen=True, kw_only=True)
class Describe(Request):
    """The site's dataset: name, case count, dataset.json, and its cases' problems (``check_cases``)."""

    OP = Op.DESCRIBE
    REPLY = DescribeReply
    task: str  # a site started for another task refuses ("" = any)
    check_cases: bool = True
    num_processes: int = 1
    #: FFE: sample the intensities with the site's own case count after replying (see fingerprint/site_samples.py)
    sample_ahead: SampleAhead | None = None


@dataclass(frozen=True, kw_only=True)
class FingerprintSampleReply(Reply):
    """Arrays: ``coarse_bins_C``, ``coarse_counts_C`` per channel C (the first round of the percentile search)."""

    summary: dict[str, Any]  # fingerprint.merge.SiteSummary's fields (checked by SiteSummary.from_dict)


@dataclass(frozen=True, kw_only=True)
class FingerprintSample(Request):
    OP = Op.FINGERPRINT_SAMPLE
    REPLY = FingerprintSampleReply
    global_num_cases: int  # the pooled case count: how many intensities nnU-Net samples per case
    num_processes: int = 1


@dataclass(frozen=True, kw_only=True)
class CountRequest:
    channel: int
    lo: int  # the bucket's lower key


@dataclass(frozen=True, kw_only=True)
class FingerprintCountsReply(Reply):
    """Arrays: ``counts_I`` for the I-th count request."""


@dataclass(frozen=True, kw_only=True)
class FingerprintCounts(Request):
    """Arrays: ``edges_I`` for the I-th count request (bucket edges in the key space)."""

    OP = Op.FINGERPRINT_COUNTS
    REPLY = FingerprintCountsReply
    key_space: str  # numpy dtype of the search's keys
    requests: list[CountRequest]


@dataclass(frozen=True, kw_only=True)
class PlanSpec:
    """nnUNetv2_plan_and_preprocess's options for one site."""

    configurations: list[str]
    planner: str
    gpu_memory_target_gb: float | None
    num_processes: int
    global_num_cases: int | None  # FFE: the pooled count (batch size and planning as for the pooled data)


@dataclass(frozen=True, kw_only=True)
class FingerprintApplyReply(Reply):
    fingerprint_file: str | None = None
    plans: dict[str, Any] | None = None
    plans_file: str | None = None


@dataclass(frozen=True, kw_only=True)
class FingerprintApply(Request):
    """Write the merged fingerprint (FFE) or extract the site's own (``fingerprint`` None), then plan if asked."""

    OP = Op.FINGERPRINT_APPLY
    REPLY = FingerprintApplyReply
    fingerprint: dict[str, Any] | None
    plan: PlanSpec | None
    num_processes: int = 1


# --- training -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class TrainInitReply(Reply):
    """Arrays: the trainer's initial weights (its state dict without aliases)."""

    num_training_cases: int
    num_validation_cases: int
    current_epoch: int
    num_epochs: int
    iterations_per_epoch: int
    build_seconds: float
    output_folder: str
    trainer_name: str
    configuration: str
    fold: int | str
    inference_allowed_mirroring_axes: list[int] | None
    plans: Any  # checked by the coordinator (training.site_checks.check_site_infos): a site's word until then
    dataset_json: Any
    dataset_fingerprint: Any
    dataset_num_cases: Any
    state_keys: dict[str, str]  # alias -> name of the state dict entries it shares storage with
    #: the weights of the network's normalization layers (``--local-norm`` keeps them at each site); checked by the
    #: coordinator (equal at every site, names of the network's weights)
    normalization: list[str] = field(default_factory=list)
    not_reproducible: list[str] = field(default_factory=list)  # why a seeded run is not bit for bit here


@dataclass(frozen=True, kw_only=True)
class TrainInit(Request):
    """Build the site's nnU-Net trainer for one fold; nnUNetv2_train's options mean what they mean there."""

    OP = Op.TRAIN_INIT
    REPLY = TrainInitReply
    configuration: str
    fold: str
    trainer: str
    plans: str
    device: str
    npz: bool
    continue_training: bool
    pretrained_weights: str | None
    val_best: bool
    disable_checkpointing: bool
    rounds: int | None  # the coordinator's number of rounds (None only for --val)
    iterations_per_round: int | None
    val_iterations: int | None
    epochs_per_round: int
    da_workers: int | None
    transfer_dtype: WireDtype
    seed: int | None
    momentum: MomentumMode


@dataclass(frozen=True, kw_only=True)
class TrainValidateReply(Reply):
    output_folder: str
    validation_summary: str | None = None
    validation_mean_dice: float | None = None
    validation_sums: dict[str, Any] | None = None  # cross_validation.aggregates.MetricSums.to_json()


@dataclass(frozen=True, kw_only=True)
class TrainValidate(TrainInit):
    """``--val``: validate the site's existing final checkpoint (the options of train_init name it)."""

    OP = Op.TRAIN_VALIDATE
    REPLY = TrainValidateReply


@dataclass(frozen=True, kw_only=True)
class TrainRoundReply(Reply):
    """Arrays: the site's new weights (or, with ``delta``, their change from what the coordinator sent)."""

    metrics: dict[str, Any]  # checked by aggregation.validation.validate_metrics
    delta: bool = False


@dataclass(frozen=True, kw_only=True)
class TrainRound(Request):
    """Arrays: the model to train from (the site's own for AsymFedAvg); none: train on from the site's weights."""

    OP = Op.TRAIN_ROUND
    REPLY = TrainRoundReply
    round: int
    epoch_end: int  # the epoch the site's trainer reaches with this round
    validate_delivered: bool  # validate the received model before training on it


@dataclass(frozen=True, kw_only=True)
class TrainValidateDeliveredReply(Reply):
    delivered: dict[str, Any]  # checked by training.delivered.check_delivered


@dataclass(frozen=True, kw_only=True)
class TrainValidateDelivered(Request):
    """Arrays: the final model; the site validates it as nnU-Net's online validation would."""

    OP = Op.TRAIN_VALIDATE_DELIVERED
    REPLY = TrainValidateDeliveredReply


@dataclass(frozen=True, kw_only=True)
class PersonalModel:
    """A site's own model (``--finetune-epochs``): the final model fine-tuned on the site's training cases, in an
    nnU-Net results folder of its own plans identifier (training/personal.py); its final validation as in
    :class:`TrainValidateReply`."""

    output_folder: str
    checkpoint: str
    epochs: int
    validation_summary: str | None = None
    validation_mean_dice: float | None = None
    validation_sums: dict[str, Any] | None = None  # cross_validation.aggregates.MetricSums.to_json()


@dataclass(frozen=True, kw_only=True)
class TrainFinishReply(TrainValidateReply):
    checkpoint: str
    peak_rss_bytes: int = 0
    personal: PersonalModel | None = None  # only when the request asked for fine-tuning


@dataclass(frozen=True, kw_only=True)
class TrainFinish(Request):
    """Arrays: the final model, and the best delivered one under ``best/`` names when ``best`` is "sent"."""

    OP = Op.TRAIN_FINISH
    REPLY = TrainFinishReply
    validate: bool  # nnU-Net's final validation
    val_best: bool
    best: Literal["final", "sent"] | None  # where checkpoint_best.pth comes from (None: no best model)
    #: then fine-tune the final model for this many epochs on the site's own training cases (0: no personal model)
    finetune_epochs: int = 0

    def __post_init__(self) -> None:
        if self.finetune_epochs < 0:  # a negative count would build a trainer with no schedule at the site
            raise ValueError(f"finetune_epochs must be non-negative, got {self.finetune_epochs}")


# --- find_best_configuration --------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Candidate:
    key: str  # a model (its folder name) or an ensemble (nnU-Net's name)
    sums: dict[str, Any]  # MetricSums.to_json()


@dataclass(frozen=True, kw_only=True)
class CvEvaluateReply(Reply):
    dataset_name: str
    models: list[dict[str, str]]  # trainer, plans, configuration of every trained model found
    classes: list[str]
    candidates: list[Candidate]  # in nnU-Net's order
    per_case: dict[str, Any] | None = None  # only with --share-per-case


@dataclass(frozen=True, kw_only=True)
class CvEvaluate(Request):
    """Score the site's cross-validation predictions of every model and ensemble; reply sums only."""

    OP = Op.CV_EVALUATE
    REPLY = CvEvaluateReply
    configurations: list[str]
    trainers: list[str]
    plans: list[str]
    folds: list[int]
    allow_ensembling: bool
    num_processes: int | None
    overwrite: bool
    task: str


@dataclass(frozen=True, kw_only=True)
class CvPostprocessReply(Reply):
    step: int
    target: str  # nnU-Net's key of the class (or region) the step keeps the largest component of, or "foreground"
    steps: list[str]
    sums: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class CvPostprocess(Request):
    OP = Op.CV_POSTPROCESS
    REPLY = CvPostprocessReply
    candidate: str
    step: int
    keep_previous: bool | None  # settles the previous step (None at the first)


@dataclass(frozen=True, kw_only=True)
class CvFinishReply(Reply):
    dataset_name: str
    inference_information: str
    instructions_file: str
    instructions: str
    postprocessing_file: str
    federated_decision: str


@dataclass(frozen=True, kw_only=True)
class CvFinish(Request):
    """The coordinator's decision; the site writes nnU-Net's find_best_configuration files from it."""

    OP = Op.CV_FINISH
    REPLY = CvFinishReply
    best: str
    kept: list[bool]
    keep_last: bool
    all_results: dict[str, float]
    result_on_crossval_pre_pp: float
    result_on_crossval_post_pp: float
    before: dict[str, Any]
    after: dict[str, Any]


#: operation -> its request class
REQUESTS: dict[Op, type[Request]] = {cls.OP: cls for cls in (
    Describe, FingerprintSample, FingerprintCounts, FingerprintApply, TrainInit, TrainRound, TrainValidateDelivered,
    TrainFinish, TrainValidate, CvEvaluate, CvPostprocess, CvFinish, JobDone, Echo)}
