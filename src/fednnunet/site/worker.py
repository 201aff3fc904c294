"""The long-lived process of one site: holds the site's state across Flower messages and does the ML.

Started next to the site's SuperNode (by ``fednnunet client`` or the one-machine launcher) with the nnU-Net
environment of the site. It claims its SuperNode's tasks itself and answers one at a time in this process (see
:mod:`fednnunet.site.serve`): no process per message, no relay. Each request is decoded and checked by the protocol
(:mod:`fednnunet.protocol`) and handed to its stage's site half (:data:`HANDLERS`); errors are returned as messages
with a kind, naming the site, never as tracebacks crossing the network.

Work that the reply does not need runs after the reply has been pushed and before the next task is claimed, so it
is off the critical path (Flower takes seconds to carry the reply and the next request) yet never overlaps the
state it uses. Two kinds: writing a round's ``checkpoint_latest.pth``, which a SIGTERM does not tear (the signal
takes effect once the write is done), and sampling the fingerprint's intensities ahead of the server's request,
which a SIGTERM abandons at once.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
import time
import traceback
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from fednnunet.protocol.codec import WireError
from fednnunet.protocol.envelope import error_body, ok_body, read_request
from fednnunet.protocol.errors import ErrorKind, OpError
from fednnunet.protocol.messages import JobDone, JobDoneReply, Op, Reply

if TYPE_CHECKING:  # pragma: no cover - the stages' site halves import torch/nnU-Net, which the worker loads lazily
    from fednnunet.cross_validation.site import SiteCrossValidation
    from fednnunet.fingerprint.site_samples import CaseAnalysis, LocalSamples
    from fednnunet.training.session import TrainingSession

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
Handler = Callable[["SiteWorker", Any, Arrays], "tuple[Reply, Arrays]"]

#: Where each operation is answered: the site half of its stage (``module:function``), imported on first use so
#: that a worker loads only the stages its jobs need.
HANDLERS: dict[Op, str] = {
    Op.DESCRIBE: "fednnunet.fingerprint.site_ops:describe",
    Op.FINGERPRINT_SAMPLE: "fednnunet.fingerprint.site_ops:fingerprint_sample",
    Op.FINGERPRINT_COUNTS: "fednnunet.fingerprint.site_ops:fingerprint_counts",
    Op.FINGERPRINT_APPLY: "fednnunet.fingerprint.site_ops:fingerprint_apply",
    Op.TRAIN_INIT: "fednnunet.training.site_ops:train_init",
    Op.TRAIN_ROUND: "fednnunet.training.site_ops:train_round",
    Op.TRAIN_VALIDATE_DELIVERED: "fednnunet.training.site_ops:train_validate_delivered",
    Op.TRAIN_FINISH: "fednnunet.training.site_ops:train_finish",
    Op.TRAIN_VALIDATE: "fednnunet.training.site_ops:train_validate",
    Op.CV_EVALUATE: "fednnunet.cross_validation.site_ops:cv_evaluate",
    Op.CV_POSTPROCESS: "fednnunet.cross_validation.site_ops:cv_postprocess",
    Op.CV_FINISH: "fednnunet.cross_validation.site_ops:cv_finish",
    Op.JOB_DONE: "fednnunet.site.worker:job_done",
}


def _handler(op: Op) -> Handler:
    module, name = HANDLERS[op].split(":")
    return getattr(importlib.import_module(module), name)


def _error_kind(err: Exception) -> ErrorKind:
    """The kind of a failed operation: its own (``OpError``), bad data or options (``ValueError``), or a failure."""
    if isinstance(err, OpError):
        return err.kind
    return ErrorKind.BAD_INPUT if isinstance(err, ValueError) else ErrorKind.FAILED


class SiteWorker:
    """State of one site across the federation's messages; the stages' site halves (:data:`HANDLERS`) do the work."""

    def __init__(self, site: str, dataset: str, exit_after_job: bool = False, task: str | None = None,
                 train_expect: tuple[str, list[str]] | None = None) -> None:
        self.site = site
        self.task = task
        self.train_expect = train_expect  # (configuration, folds) this site was started for, if any
        self.exit_after_job = exit_after_job
        self.exit_requested = False
        self.refusal: str | None = None  # why this worker stopped serving the federation (it exits non-zero)
        self.dataset = dataset
        self.dataset_name: str | None = None
        self.samples: LocalSamples | None = None  # of the running fingerprint extraction
        self.sampled_ahead: CaseAnalysis | None = None  # run after the describe reply, for the next request
        self.training: TrainingSession | None = None  # of the running federated training
        self.cross_validation: SiteCrossValidation | None = None  # of a running find_best_configuration
        self._after_reply: tuple[Callable[[], None], bool] | None = None  # (work, a SIGTERM waits for it)
        self.after_reply_error: str | None = None  # reported with the next request
        self.deferring_stop = False  # True while after-reply work runs that a SIGTERM must not tear
        self.stop_requested = False  # a SIGTERM arrived during after-reply work
        self._warming: threading.Thread | None = None  # imports the training stack ahead (see warm_up)

    # --- protocol -----------------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """A worker started for training imports its training stack in the background; :meth:`handle` waits for it.

        Why: the worker waits seconds for its SuperNode and the server's first messages, while the imports of
        its first ``train_init`` (torch and nnU-Net's trainer: 4-5 s on two cores) would otherwise sit between
        the federation's start and its first epoch. Messages wait for the imports so that no message's own
        imports race them in another thread. Safe this early: nnU-Net 2.8 reads its environment variables
        (``nnUNet_preprocessed``, ``nnUNet_n_proc_DA``, ...) when it uses them, not at import.
        """
        if self.task == "train" and self._warming is None:
            self._warming = threading.Thread(target=_import_training_stack, name="warm-up", daemon=True)
            self._warming.start()

    def handle(self, body: dict[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        """Answer one message body (and its arrays) with a reply body (and arrays): the site's only entry."""
        if self._warming is not None:
            self._warming.join()
            self._warming = None
        try:
            request, registered_as = read_request(body)
        except WireError as err:
            return error_body(ErrorKind.BAD_REQUEST, f"site {self.site}: {err}"), {}
        op = request.OP.value
        if registered_as is not None and registered_as != self.site:
            # the coordinator names this site by the key it holds; a site started under another name stops
            self.refusal = (f"the server knows this site's key as {registered_as!r}, but it was started as "
                            f"{self.site!r} (--site-name, default: the key file's name): refused")
            self.exit_requested = True
            logger.error("site %s: %s", self.site, self.refusal)
            return error_body(ErrorKind.REFUSED, f"site {self.site}: {self.refusal}"), {}
        if self.after_reply_error is not None:
            error, self.after_reply_error = self.after_reply_error, None
            return error_body(ErrorKind.FAILED, f"{op}: site {self.site}: {error}"), {}
        if request.OP != Op.FINGERPRINT_SAMPLE:
            self.sampled_ahead = None  # only the request right after describe uses it
        received_at, started = time.time(), time.perf_counter()
        try:
            reply, out = _handler(request.OP)(self, request, arrays)
        except Exception as err:  # reported to the server with the site named; details stay in the site log
            logger.error("site %s: %s failed:\n%s", self.site, op, traceback.format_exc())
            msg = str(err)
            if self.site not in msg:
                msg = f"site {self.site}: {msg}"
            return error_body(_error_kind(err), f"{op}: {type(err).__name__}: {msg}"), {}
        seconds = time.perf_counter() - started
        logger.info("site %s: %s done in %.2f s", self.site, op, seconds)
        # wall-clock times let the server split a round trip into download / site / upload (see training)
        return ok_body(replace(reply, site=self.site, seconds=seconds, received_at=received_at,
                               replied_at=time.time())), out

    def after_reply(self, work: Callable[[], None], stop_waits: bool = True) -> None:
        """Leave ``work`` for after this op's reply. ``stop_waits``: a SIGTERM meanwhile takes effect once the
        work is done (a checkpoint write); otherwise it ends the worker at once (work that is only a head start)."""
        self._after_reply = (work, stop_waits)

    def run_after_reply(self) -> None:
        """Run the work the last op left for after its reply; a failure is reported with the next request."""
        pending, self._after_reply = self._after_reply, None
        if pending is not None:
            work, self.deferring_stop = pending
            try:
                work()
            except Exception as err:  # noqa: BLE001 - kept for the next request, which names the site
                logger.error("site %s: work after the reply failed:\n%s", self.site, traceback.format_exc())
                self.after_reply_error = f"after the previous reply: {type(err).__name__}: {err}"
            finally:
                self.deferring_stop = False
        if self.stop_requested:
            _die_of(signal.SIGTERM)

    # --- what the stages' site halves share -----------------------------------------------------------------
    def check_task(self, task: str) -> None:
        """A site started for one task (``fednnunet client TASK``) refuses a job of another."""
        if self.task and task and task != self.task:
            raise OpError(ErrorKind.REFUSED, f"site {self.site} was started for task {self.task!r} but the server "
                                             f"runs {task!r}")

    def describe_dataset(self) -> str:
        """This site's nnU-Net dataset name (as the describe operation found it)."""
        if self.dataset_name is None:
            from fednnunet.fingerprint.site_dataset import describe_site

            self.dataset_name = describe_site(self.site, self.dataset).dataset_name
        return self.dataset_name


def job_done(worker: SiteWorker, request: JobDone, arrays: Arrays) -> tuple[JobDoneReply, Arrays]:
    """The server's job ended; a site started for one job (`fednnunet client`) exits after replying."""
    worker.exit_requested = worker.exit_after_job
    return JobDoneReply(exiting=worker.exit_requested), {}


def _import_training_stack() -> None:
    """What a site's first ``train_init`` imports (see :meth:`SiteWorker.warm_up`)."""
    try:
        for module in ("fednnunet.training.session", "nnunetv2.run.run_training",
                       "nnunetv2.training.nnUNetTrainer.nnUNetTrainer"):
            importlib.import_module(module)
    except Exception:  # noqa: BLE001 - the message that needs the module meets the error again and reports it
        logger.warning("importing the training stack ahead failed", exc_info=True)


def _die_of(signum: int) -> None:
    """End the process as the signal's default action would (what a SIGTERM did before a handler was set), after
    removing the private folders holding its SuperNode's secret (the default action runs no cleanup)."""
    from fednnunet.processes import remove_private_folders

    remove_private_folders()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def install_sigterm_handling(worker: SiteWorker) -> None:
    """SIGTERM ends the worker at once, except during after-reply work that defers it, which it lets finish first.

    Forked children (nnU-Net's process pools, which it stops with SIGTERM) must still die of SIGTERM at once.
    Resetting the handler in the child is not enough: Python drops a signal that arrives between ``fork()`` and
    the reset, and a pool worker stopped in that window waits on the pool's queue forever (a site's
    ``describe`` hung so; a loop of pool starts hung within 1500). SIGTERM is blocked around ``fork()`` instead,
    so such a signal stays pending in the kernel and kills the child as soon as the child unblocks it.
    """
    def on_sigterm(signum: int, _frame: Any) -> None:
        if worker.deferring_stop:
            logger.info("site %s: stopping once the work after the last reply is done", worker.site)
            worker.stop_requested = True
        else:
            _die_of(signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    saved = threading.local()

    def before() -> None:
        saved.mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def in_parent() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, saved.mask)

    def in_child() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, saved.mask)

    os.register_at_fork(before=before, after_in_parent=in_parent, after_in_child=in_child)
