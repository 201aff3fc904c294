"""A site process's one entry point: how it is started, whoever starts it.

Two commands start a site: ``fednnunet client`` (a hospital; its flags, checks and messages are in
:mod:`fednnunet.cli`) and ``python -m fednnunet.site.main`` (:func:`main`: one site of a one-machine federation,
started by :class:`fednnunet.federation.local.SiteNode`). Both describe the site as :class:`SiteOptions` and run it
with :func:`run_site_process`: the site worker (:class:`~fednnunet.site.worker.SiteWorker`), its SIGTERM handling,
its SuperNode and the loop that answers the server's tasks (:mod:`fednnunet.site.serve`).

A site process imports nothing of the coordinator: its process tools come from :mod:`fednnunet.processes`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fednnunet.site.serve import REJOIN_FOR_S, SuperNodeExited, run_site
from fednnunet.site.supernode import SuperNodeSpec
from fednnunet.site.worker import SiteWorker, install_sigterm_handling

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteOptions:
    """What a site process is started with."""

    site: str
    dataset: str
    supernode: SuperNodeSpec  # how its SuperNode reaches the server
    logs: Path  # folder of the SuperNode's log
    exit_after_job: bool = False  # exit when the server's job ends
    task: str | None = None  # refuse jobs of another task (and warm up for training)
    train_expect: tuple[str, list[str]] | None = None  # (configuration, folds): refuse training of others
    runtime_port: int | None = None  # local port of the SuperNode's Runtime API (default: a free one)
    rejoin_for_s: float = REJOIN_FOR_S  # how long to try to rejoin after the SuperNode was lost


def run_site_process(options: SiteOptions, notify: Callable[[str], None] | None = None) -> SiteWorker:
    """Serve the federation as this site until the server's job releases it; returns the worker (its ``refusal``
    says why it stopped serving, if it did).

    SIGTERM ends the process at once, but never in the middle of a checkpoint write (see
    :func:`~fednnunet.site.worker.install_sigterm_handling`). Raises SuperNodeExited when the SuperNode could not
    join at the start, or did not rejoin within ``options.rejoin_for_s``; ``notify`` gets a line for a person at
    each loss, restart and rejoin.
    """
    worker = SiteWorker(options.site, options.dataset, exit_after_job=options.exit_after_job, task=options.task,
                        train_expect=options.train_expect)
    install_sigterm_handling(worker)
    run_site(worker, options.supernode, options.logs, options.runtime_port, rejoin_for_s=options.rejoin_for_s,
             notify=notify)
    return worker


def main(argv: list[str] | None = None) -> None:
    """One site of a one-machine federation (``fednnunet run`` starts one per dataset); ``fednnunet client`` runs
    the same :func:`run_site_process` in its own process."""
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

    expect = None if args.train_configuration is None else (args.train_configuration, list(args.train_folds or []))
    spec = SuperNodeSpec(args.superlink, Path(args.root_certificates) if args.root_certificates else None,
                         Path(args.auth_key) if args.auth_key else None)
    options = SiteOptions(args.site, args.dataset, spec, Path(args.logs), exit_after_job=args.exit_after_job,
                          task=args.task, train_expect=expect, runtime_port=args.runtime_port)
    try:
        run_site_process(options)
    except SuperNodeExited as err:
        logger.error("%s", err)
        raise SystemExit(3) from None


if __name__ == "__main__":
    main()
