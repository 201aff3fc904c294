"""The training stage's operations at a site: what the site worker calls for each training request.

Why a module of functions beside the session: the worker (:mod:`fednnunet.site.worker`) stays a thin protocol layer
that decodes a request and hands it here; these functions check that the request fits this site (the configuration
and folds it was started for, a running session) and hold the worker's training state (``worker.training``), while
:class:`~fednnunet.training.session.TrainingSession` does the work. torch and nnU-Net are imported inside the
functions, so that a worker loads the training stack only when a job trains.
"""

from __future__ import annotations

import resource
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from fednnunet.protocol.errors import ErrorKind, OpError
from fednnunet.protocol.messages import (TrainFinish, TrainFinishReply, TrainInit, TrainInitReply, TrainRound,
                                         TrainRoundReply, TrainValidate, TrainValidateDelivered,
                                         TrainValidateDeliveredReply, TrainValidateReply)

if TYPE_CHECKING:  # pragma: no cover - the worker imports this module lazily, and the session imports torch
    from fednnunet.site.worker import SiteWorker
    from fednnunet.training.session import TrainingSession

Arrays = dict[str, np.ndarray]

__all__ = ["train_init", "train_round", "train_validate_delivered", "train_finish", "train_validate"]


def train_init(worker: SiteWorker, request: TrainInit, arrays: Arrays) -> tuple[TrainInitReply, Arrays]:
    """Build this site's trainer for a run (replacing any earlier one) and reply its initial weights."""
    from fednnunet.training.session import TrainingSession

    if worker.train_expect is not None:
        configuration, folds = worker.train_expect
        if request.configuration != configuration or request.fold not in folds:
            raise OpError(ErrorKind.REFUSED, f"site {worker.site} was started for {configuration} fold(s) "
                                             f"{' '.join(folds)} but the server trains {request.configuration} "
                                             f"fold {request.fold}")
    if worker.training is not None:
        worker.training.close()
        worker.training = None
    worker.training = TrainingSession(worker.site, worker.dataset, request)
    return worker.training.describe()


def train_round(worker: SiteWorker, request: TrainRound, arrays: Arrays) -> tuple[TrainRoundReply, Arrays]:
    """Train one round; ``checkpoint_latest.pth`` is written after the reply has gone (off the round's critical
    path; a SIGTERM meanwhile waits for the write)."""
    session = _session(worker)
    reply = session.round(request, arrays)
    worker.after_reply(session.save_checkpoint)
    return reply


def train_validate_delivered(worker: SiteWorker, request: TrainValidateDelivered, arrays: Arrays
                             ) -> tuple[TrainValidateDeliveredReply, Arrays]:
    """nnU-Net's online validation of the final aggregated model (see the coordinator's delivered-model check)."""
    return _session(worker).validate(arrays), {}


def train_finish(worker: SiteWorker, request: TrainFinish, arrays: Arrays) -> tuple[TrainFinishReply, Arrays]:
    """Write the final (and best) checkpoints and run nnU-Net's final validation; ends the session."""
    session = _session(worker)
    worker.training = None  # finished either way: a failed finish must not be retried on a half-closed trainer
    reply = session.finish(request, arrays)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return replace(reply, peak_rss_bytes=peak_rss), {}


def train_validate(worker: SiteWorker, request: TrainValidate, arrays: Arrays) -> tuple[TrainValidateReply, Arrays]:
    """``--val``: validate this site's existing final checkpoint only."""
    from fednnunet.training.session import validate_only

    return validate_only(worker.dataset, request), {}


def _session(worker: SiteWorker) -> TrainingSession:
    if worker.training is None:
        raise OpError(ErrorKind.SESSION_LOST, f"site {worker.site}: no training session (train_init was not called, "
                                              "or the site worker restarted since)")
    return worker.training
