"""The long-lived process of one site: holds the site's state across Flower messages and does the ML.

Started next to the site's SuperNode (by ``fednnunet client`` or the one-machine launcher) with the nnU-Net
environment of the site. It claims its SuperNode's tasks itself and answers one at a time in this process (see
:mod:`fednnunet.site.serve`): no process per message, no relay. Errors are returned as messages naming the site,
never as tracebacks crossing the network.

Work that the reply does not need runs after the reply has been pushed and before the next task is claimed, so it
is off the critical path (Flower takes seconds to carry the reply and the next request) yet never overlaps the
state it uses. Two kinds: writing a round's ``checkpoint_latest.pth``, which a SIGTERM does not tear (the signal
takes effect once the write is done), and sampling the fingerprint's intensities ahead of the server's request,
which a SIGTERM abandons at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import resource
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - the session imports torch/nnU-Net, which the worker loads lazily
    from fednnunet.site.training_session import TrainingSession

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
Handler = Callable[[dict[str, Any], Arrays], tuple[dict[str, Any], Arrays]]


class SiteError(RuntimeError):
    """A failure at a site whose message is meant for the coordinator as is."""


class SiteWorker:
    """State and operations of one site; each ``op_*`` method answers one message type."""

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
        self.samples = None  # LocalSamples of the running fingerprint extraction
        self.sampled_ahead = None  # CaseAnalysis run after the describe reply, for the next request
        self.training = None  # TrainingSession of the running federated training
        self.cross_validation = None  # SiteCrossValidation of a running find_best_configuration
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
        if self._warming is not None:
            self._warming.join()
            self._warming = None
        op = body.get("op")
        registered_as = body.get("site")
        if registered_as is not None and registered_as != self.site:
            # the coordinator names this site by the key it holds; a site started under another name stops
            self.refusal = (f"the server knows this site's key as {registered_as!r}, but it was started as "
                            f"{self.site!r} (--site-name, default: the key file's name): refused")
            self.exit_requested = True
            logger.error("site %s: %s", self.site, self.refusal)
            return {"ok": False, "error": f"site {self.site}: {self.refusal}"}, {}
        handler: Handler | None = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            return {"ok": False, "error": f"site {self.site}: unknown operation {op!r}"}, {}
        if self.after_reply_error is not None:
            error, self.after_reply_error = self.after_reply_error, None
            return {"ok": False, "error": f"{op}: site {self.site}: {error}"}, {}
        if op != "fingerprint_sample":
            self.sampled_ahead = None  # only the request right after describe uses it
        received_at, started = time.time(), time.perf_counter()
        try:
            result, out = handler(body.get("config", {}), arrays)
        except Exception as err:  # reported to the server with the site named; details stay in the site log
            logger.error("site %s: %s failed:\n%s", self.site, op, traceback.format_exc())
            msg = str(err)
            if self.site not in msg:
                msg = f"site {self.site}: {msg}"
            return {"ok": False, "error": f"{op}: {type(err).__name__}: {msg}"}, {}
        result.setdefault("site", self.site)
        result["seconds"] = time.perf_counter() - started
        logger.info("site %s: %s done in %.2f s", self.site, op, result["seconds"])
        # wall-clock times let the server split a round trip into download / site / upload (see training.py)
        result["received_at"], result["replied_at"] = received_at, time.time()
        return {"ok": True, "result": result}, out

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

    def op_job_done(self, config: dict[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        """The server's job ended; a site started for one job (`fednnunet client`) exits after replying."""
        self.exit_requested = self.exit_after_job
        return {"exiting": self.exit_requested}, {}

    # --- fingerprint ----------------------------------------------------------------------------------------
    def op_describe(self, config: dict[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        from fednnunet import __version__
        from fednnunet.fingerprint.integrity import check_site_cases, describe_site
        from fednnunet.fingerprint.site_samples import CaseAnalysis

        self._check_task(config)
        desc = describe_site(self.site, self.dataset)
        self.dataset_name = desc["dataset_name"]
        problems, warnings = [], []
        if config.get("check_cases", True):
            check = check_site_cases(self.site, self.dataset_name, int(config.get("num_processes", 1)))
            problems, warnings = check.problems, check.warnings
        desc.update(problems=problems, warnings=warnings, version=__version__,
                    gpu_memory_target_gb=config.get("gpu_memory_target_gb"))
        ahead = config.get("sample_ahead")
        if (ahead is not None and not problems
                and CaseAnalysis.prefix_is_exact(len(desc["dataset_json"].get("channel_names", {})))):
            self.after_reply(lambda: self._sample_ahead(int(desc["num_cases"]), int(ahead.get("num_processes", 1))),
                             stop_waits=False)
        return desc, {}

    def _check_task(self, config: dict[str, Any]) -> None:
        """A site started for one task (``fednnunet client TASK``) refuses a job of another."""
        if self.task and config.get("task") and config["task"] != self.task:
            raise SiteError(f"site {self.site} was started for task {self.task!r} but the server runs "
                            f"{config['task']!r}")

    def _sample_ahead(self, num_cases: int, num_processes: int) -> None:
        """Analyse the cases with this site's own case count, an upper bound of the pooled count's samples per case
        (see ``CaseAnalysis.reusable_for``). A failure is left to the sampling request to meet and report."""
        from fednnunet.fingerprint.merge import samples_per_case
        from fednnunet.fingerprint.site_samples import CaseAnalysis

        try:
            self.sampled_ahead = CaseAnalysis.run(self.site, self._dataset_name(), samples_per_case(num_cases),
                                                  num_processes)
        except Exception:  # noqa: BLE001 - the request repeats the analysis and reports what fails
            logger.warning("site %s: sampling ahead failed; sampling on request instead:\n%s", self.site,
                           traceback.format_exc())

    def op_fingerprint_sample(self, config: dict[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        from fednnunet.fingerprint.merge import samples_per_case
        from fednnunet.fingerprint.site_samples import CaseAnalysis, LocalSamples

        name = self._dataset_name()
        per_case = samples_per_case(int(config["global_num_cases"]))
        ahead, self.sampled_ahead = self.sampled_ahead, None
        if ahead is not None and ahead.reusable_for(per_case):
            analysis = ahead.truncated(per_case)
            logger.info("site %s: using the cases analysed ahead (%d -> %d samples per case)", self.site,
                        ahead.samples_per_case, per_case)
        else:
            analysis = CaseAnalysis.run(self.site, name, per_case, int(config.get("num_processes", 1)))
        self.samples = LocalSamples.of(analysis)
        summary = self.samples.summary()
        for case in self.samples.empty_cases:
            logger.warning("site %s, case %s: no foreground voxels; nnU-Net samples no intensities from it",
                           self.site, case)
        return {"summary": summary}, self.samples.coarse_histograms()

    def op_fingerprint_counts(self, config: dict[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        if self.samples is None:
            raise SiteError(f"site {self.site}: counts requested before sampling")
        key_space = np.dtype(config["key_space"])
        out = {}
        for i, req in enumerate(config["requests"]):
            out[f"counts_{i}"] = self.samples.bucket_counts(int(req["channel"]), key_space, int(req["lo"]),
                                                            arrays[f"edges_{i}"])
        return {}, out

    def op_fingerprint_apply(self, config: dict[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        """Write the merged fingerprint (FFE) or extract a local one (asym), then plan/preprocess if asked."""
        from fednnunet.planning.site_planning import (extract_local_fingerprint, plan_and_preprocess_site,
                                                      preprocessed_folder, write_json_atomic)

        name = self._dataset_name()
        fingerprint = config.get("fingerprint")
        plan = config.get("plan")
        self.samples = None  # the samples are no longer needed; free the memory
        if plan is None:
            if fingerprint is None:
                fingerprint = extract_local_fingerprint(name, int(config.get("num_processes", 1)))
            else:
                write_json_atomic(preprocessed_folder(name) / "dataset_fingerprint.json", fingerprint)
            return {"fingerprint_file": str(preprocessed_folder(name) / "dataset_fingerprint.json")}, {}
        if fingerprint is None:
            extract_local_fingerprint(name, int(plan.get("num_processes", 1)))
        plans = plan_and_preprocess_site(
            name, fingerprint, plan["configurations"], planner=plan["planner"],
            gpu_memory_target_gb=plan.get("gpu_memory_target_gb"), num_processes=int(plan.get("num_processes", 1)),
            global_num_cases=plan.get("global_num_cases"), preprocess=True)
        return {"plans": plans, "plans_file": str(preprocessed_folder(name) / f"{plans['plans_name']}.json")}, {}

    # --- training (state in fednnunet.site.training_session) ------------------------------------------------
    def op_train_init(self, config: dict[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        """Build this site's trainer for a run (replacing any earlier one) and reply its initial weights."""
        from fednnunet.site.training_session import TrainingSession

        if self.train_expect is not None:
            configuration, folds = self.train_expect
            if config.get("configuration") != configuration or str(config.get("fold")) not in folds:
                raise SiteError(f"site {self.site} was started for {configuration} fold(s) {' '.join(folds)} but "
                                f"the server trains {config.get('configuration')} fold {config.get('fold')}")
        if self.training is not None:
            self.training.close()
            self.training = None
        self.training = TrainingSession(self.site, self.dataset, config)
        return self.training.describe()

    def op_train_round(self, config: dict[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        session = self._session()
        reply = session.round(config, arrays)
        self.after_reply(session.save_checkpoint)
        return reply

    def op_train_validate_delivered(self, config: dict[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        """nnU-Net's online validation of the final aggregated model (see fednnunet.federation.delivered)."""
        return self._session().validate(arrays), {}

    def op_train_finish(self, config: dict[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        session = self._session()
        self.training = None  # finished either way: a failed finish must not be retried on a half-closed trainer
        result = session.finish(config, arrays)
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        return result, {}

    def op_train_validate(self, config: dict[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        """``--val``: validate this site's existing final checkpoint only."""
        from fednnunet.site.training_session import validate_only

        return validate_only(self.dataset, config), {}

    # --- find_best_configuration (state in fednnunet.evaluation.cross_validation) ---------------------------
    def op_cv_evaluate(self, config: dict[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        """Score this site's cross-validation predictions of every model and ensemble; reply only sums."""
        from fednnunet.evaluation.cross_validation import SiteCrossValidation

        self._check_task(config)
        self.cross_validation = SiteCrossValidation(self.site, self.dataset, config)
        return self.cross_validation.evaluate(), {}

    def op_cv_postprocess(self, config: dict[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        return self._cross_validation().postprocess(config), {}

    def op_cv_finish(self, config: dict[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        """Write nnU-Net's find_best_configuration files from the server's decision."""
        session, self.cross_validation = self._cross_validation(), None
        return session.finish(config), {}

    def _cross_validation(self) -> Any:
        if self.cross_validation is None:
            raise SiteError(f"site {self.site}: no find_best_configuration in progress (cv_evaluate was not called, "
                            "or the site worker restarted since)")
        return self.cross_validation

    def _session(self) -> "TrainingSession":
        if self.training is None:
            raise SiteError(f"site {self.site}: no training session (train_init was not called, or the site "
                            "worker restarted since)")
        return self.training

    def _dataset_name(self) -> str:
        if self.dataset_name is None:
            from fednnunet.fingerprint.integrity import describe_site

            self.dataset_name = describe_site(self.site, self.dataset)["dataset_name"]
        return self.dataset_name


def _import_training_stack() -> None:
    """What a site's first ``train_init`` imports (see :meth:`SiteWorker.warm_up`)."""
    try:
        for module in ("fednnunet.site.training_session", "nnunetv2.run.run_training",
                       "nnunetv2.training.nnUNetTrainer.nnUNetTrainer"):
            importlib.import_module(module)
    except Exception:  # noqa: BLE001 - the message that needs the module meets the error again and reports it
        logger.warning("importing the training stack ahead failed", exc_info=True)


def _die_of(signum: int) -> None:
    """End the process as the signal's default action would (what a SIGTERM did before a handler was set), after
    removing the private folders holding its SuperNode's secret (the default action runs no cleanup)."""
    from fednnunet.launch import remove_private_folders

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


def main(argv: list[str] | None = None) -> None:
    """One site of a one-machine federation (``fednnunet run`` starts one per dataset); ``fednnunet client`` runs
    the same in its own process."""
    parser = argparse.ArgumentParser(description="FednnU-Net site worker with its SuperNode")
    parser.add_argument("--site", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--superlink", required=True, help="HOST:PORT of the server")
    parser.add_argument("--root-certificates", default=None, help="CA certificate of the server (TLS)")
    parser.add_argument("--auth-key", default=None, help="this site's private key (SuperNode authentication)")
    parser.add_argument("--runtime-port", type=int, default=None, help="local port of the SuperNode's Runtime API")
    parser.add_argument("--logs", required=True, help="folder for the SuperNode's log")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--exit-after-job", action="store_true", help="exit when the server's job ends")
    parser.add_argument("--task", default=None, help="refuse jobs of another task")
    parser.add_argument("--train-configuration", default=None, help="refuse training of another configuration")
    parser.add_argument("--train-folds", nargs="*", default=None, help="refuse training of other folds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per task poll otherwise
    from fednnunet.site.serve import SuperNodeExited, run_site
    from fednnunet.site.supernode import SuperNodeSpec

    expect = None if args.train_configuration is None else (args.train_configuration, list(args.train_folds or []))
    worker = SiteWorker(args.site, args.dataset, args.exit_after_job, args.task, expect)
    install_sigterm_handling(worker)
    spec = SuperNodeSpec(args.superlink, Path(args.root_certificates) if args.root_certificates else None,
                         Path(args.auth_key) if args.auth_key else None)
    try:
        run_site(worker, spec, Path(args.logs), args.runtime_port)
    except SuperNodeExited as err:
        logger.error("%s", err)
        raise SystemExit(3) from None


if __name__ == "__main__":
    main()
