"""``fednnunet`` command line: prints for people; the work happens in the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

NNUNET_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def _split_ids(values: Sequence[str]) -> list[str]:
    """Accept "901 902 903" as one argument (the reference implementation's form) or as several."""
    return [v for value in values for v in value.replace(",", " ").split()]


def _require_env() -> None:
    missing = [v for v in NNUNET_ENV if not os.environ.get(v)]
    if missing:
        raise SystemExit(f"error: set the nnU-Net environment variable(s) {', '.join(missing)} "
                         "(see the README, 'Environment')")


def _printer(started: float):
    def show(event: dict) -> None:
        kind = "WARNING: " if event.get("kind") == "warning" else ""
        print(f"[{event.get('t', time.time()) - started:7.1f}s] {kind}{event.get('message', '')}", flush=True)
    return show


# --- demo-data ---------------------------------------------------------------------------------------------------
def cmd_demo_data(args: argparse.Namespace) -> int:
    from fednnunet.data.synthetic import write_demo_federation

    folders = write_demo_federation(Path(args.out), first_id=args.first_id, sites=args.sites, dim=args.dim,
                                    seed=args.seed, ct=args.ct, scale=args.scale)
    for f in folders:
        print(f"wrote {f}")
    return 0


# --- run -----------------------------------------------------------------------------------------------------
def _job_from_args(args: argparse.Namespace, sites: list[str], out_dir: Path, num_sites: int | None = None):
    """Map a task's flags onto the JobSpec; ``sites`` are known for `run`, only counted for `server`."""
    from fednnunet.federation.job import JobSpec

    gpu: dict[str, float] = {}
    if getattr(args, "gpu_memory_target", None):
        targets = args.gpu_memory_target
        if len(targets) == 1:
            gpu = {"*": targets[0]}
        elif len(targets) == len(sites):
            gpu = dict(zip(sites, targets))
        else:
            raise SystemExit(f"error: -gpu_memory_target needs 1 value or one per site ({len(sites)}), "
                             f"got {len(targets)}")
    train: dict = {}
    best: dict = {}
    configurations = list(getattr(args, "c", None) or [])
    if args.task == "train":
        train = _train_options(args).asdict()
        configurations = [args.configuration]
    elif args.task == "find_best_configuration":
        from fednnunet.cli_cross_validation import options_from_args

        best, configurations = options_from_args(args), []
    return JobSpec(task=args.task, num_sites=num_sites or len(sites), out_dir=str(out_dir),
                   asym=getattr(args, "asym", False), configurations=configurations,
                   planner=getattr(args, "pl", "ExperimentPlanner"), gpu_memory_target_gb=gpu,
                   num_processes=getattr(args, "np", None) or 1, check_cases=not getattr(args, "no_check", False),
                   connect_timeout_s=getattr(args, "site_wait", None) or JobSpec.connect_timeout_s,
                   train=train, best_configuration=best)


def _out_dir(args: argparse.Namespace) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(args.out or Path(os.environ["nnUNet_results"]) / "FednnUNet" / f"{args.task}-{stamp}").resolve()


def _print_result(task: str, result: dict, started: float, out_dir: Path) -> None:
    from fednnunet.cli_cross_validation import print_best_configuration, print_training

    timing = f"{result.get('round_trips', '?')} round trips"
    if task == "train":
        timing = print_training(result)
    elif task == "find_best_configuration":
        print_best_configuration(result)
    else:
        for site, info in result.get("sites", {}).items():
            files = ", ".join(f"{k}={v}" for k, v in info.items() if k.endswith("_file"))
            print(f"site {site} ({info.get('dataset_name')}): {files}")
    print(f"done in {time.time() - started:.1f} s ({timing}); summary in {out_dir / 'result.json'}")


def _run_reporting(task: str, out_dir: Path, started: float, work) -> int:
    """Run ``work()`` (which returns the job result), print the outcome; exit codes for people and scripts."""
    from fednnunet.federation.server_node import FederationError
    from fednnunet.processes import ProcessError

    import signal
    import threading

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the launcher, which stops every process it started

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminated)
    try:
        result = work()
    except (FederationError, ProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C or SIGTERM): all federation processes were stopped", file=sys.stderr)
        return 130
    if result is not None:
        _print_result(task, result, started, out_dir)
    return 0


def _train_options(args: argparse.Namespace):
    """Map `fednnunet run train` flags onto TrainOptions (the one schema of JobSpec.train)."""
    from fednnunet.training.options import TrainOptions

    if args.val and args.continue_training:
        raise SystemExit("error: --val and --c cannot be combined (as for nnUNetv2_train)")
    if (args.resume or args.continue_training) and not args.out:
        raise SystemExit("error: --resume/--c needs --out, the output folder of the run to continue")
    try:
        return TrainOptions(
            configuration=args.configuration, folds=_split_ids(args.fold), trainer=args.tr, plans=args.p,
            device=args.device, npz=args.npz, continue_training=args.continue_training,
            pretrained_weights=str(Path(args.pretrained_weights).resolve()) if args.pretrained_weights else None,
            validation_only=args.val, val_best=args.val_best, disable_checkpointing=args.disable_checkpointing,
            skip_validation=args.skip_val, rounds=args.rounds, iterations_per_round=args.iterations_per_round,
            val_iterations=args.val_iterations, epochs_per_round=args.epochs_per_round, weighting=args.weighting,
            min_sites=args.min_sites, round_timeout_s=args.round_timeout, resume=args.resume,
            asym_scope=args.asym_scope, da_workers=args.da_workers, transfer_dtype=args.transfer_dtype,
            seed=args.seed, validate_delivered_every=args.validate_delivered_every, momentum=args.momentum,
            server_momentum=args.server_momentum, clip_update_norm=args.clip_update_norm,
            finetune_epochs=args.finetune_epochs, local_norm=args.local_norm)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from fednnunet.federation.local import LocalFederation, Site
    from fednnunet.processes import PRIVATE_UMASK

    _require_env()
    os.umask(PRIVATE_UMASK)  # the coordinator's state (SuperLink database: task token, messages) and outputs
    sites = _split_ids([args.datasets])
    if len(set(sites)) != len(sites):
        raise SystemExit(f"error: a dataset is listed twice: {' '.join(sites)}")
    out_dir = _out_dir(args)
    job = _job_from_args(args, sites, out_dir)
    started = time.time()
    print(f"federation of {len(sites)} site(s): {', '.join(sites)}; task {args.task}; output {out_dir}", flush=True)
    site_env = {"nnUNet_n_proc_DA": str(args.da_workers)} if getattr(args, "da_workers", None) is not None else {}
    if getattr(args, "share_per_case", False):
        from fednnunet.cross_validation.site import SHARE_PER_CASE_ENV

        site_env[SHARE_PER_CASE_ENV] = "1"
    if args.task == "train" and "OMP_NUM_THREADS" not in os.environ:
        # All sites share this machine: torch's default (one thread per core in every site) oversubscribes the
        # cores; on 2 shared CPU cores a tiny 2D epoch took ~25 s instead of ~2.5 s.
        site_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(sites)))

    def work() -> dict:
        with LocalFederation(out_dir / "federation", [Site(s, s) for s in sites], site_env=site_env,
                             on_event=_printer(started), task=args.task) as fed:
            return fed.run(job)

    return _run_reporting(args.task, out_dir, started, work)


# --- multi-machine -------------------------------------------------------------------------------------------
def cmd_server(args: argparse.Namespace) -> int:
    from fednnunet.federation.server_node import FederationError, ServerNode, ServerTLS
    from fednnunet.processes import PRIVATE_UMASK, split_address

    os.umask(PRIVATE_UMASK)  # every folder 0700, every file 0600: the SuperLink database holds the task token
    out_dir = Path(args.out or Path.cwd() / "fednnunet_server" / f"{args.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir = out_dir.resolve()
    job = _job_from_args(args, [], out_dir, num_sites=args.num_clients)
    host, port = split_address(args.address)
    if args.tls_dir is None and not args.insecure:
        raise SystemExit("error: pass --tls-dir DIR (made by `fednnunet certs`), or --insecure for a test setup")
    tls = ServerTLS(Path(args.tls_dir).resolve()) if args.tls_dir else None
    if tls is None:
        print("WARNING: --insecure: no TLS and no site authentication; anyone who reaches the port can join",
              file=sys.stderr)
    started = time.time()

    def work() -> dict:
        try:
            server = ServerNode(out_dir / "server", (host, port), tls, on_event=_printer(started),
                                insecure=args.insecure, database=out_dir / "server" / "superlink.db")
        except FederationError as err:
            raise SystemExit(f"error: {err}") from None
        with server:
            print(f"serving {args.task} on {host}:{port} ({'TLS, registered sites only' if tls else 'insecure'}); "
                  f"waiting for {args.num_clients} site(s); output {out_dir}", flush=True)
            print("\n".join(server.exposure()), flush=True)
            return server.run(replace(job, site_nodes={str(n): s for n, s in server.site_of_node.items()}))

    return _run_reporting(args.task, out_dir, started, work)


def cmd_client(args: argparse.Namespace) -> int:
    """One hospital: this process is the site process (:mod:`fednnunet.site.main`): the site worker, which starts
    the site's SuperNode and answers its tasks."""
    from fednnunet.processes import PRIVATE_UMASK, is_loopback, split_address
    from fednnunet.site.main import SiteOptions, run_site_process
    from fednnunet.site.serve import SuperNodeExited
    from fednnunet.site.supernode import SuperNodeSpec

    _require_env()
    host, _ = split_address(args.server)
    if not args.tls_root and not args.insecure and not is_loopback(host):
        raise SystemExit(f"error: refusing to connect to {args.server} without TLS: pass --tls-root CA_FILE "
                         "(or --insecure)")
    if args.insecure:
        print("WARNING: --insecure: the connection to the server is neither encrypted nor authenticated",
              file=sys.stderr)
    if args.da_workers is not None:
        os.environ["nnUNet_n_proc_DA"] = str(args.da_workers)  # read by nnU-Net's trainer, imported later
    os.umask(PRIVATE_UMASK)  # the site's logs and outputs: this user's only
    name = _client_site_name(args)
    if getattr(args, "share_per_case", False):
        from fednnunet.cross_validation.site import SHARE_PER_CASE_ENV

        os.environ[SHARE_PER_CASE_ENV] = "1"  # read by this site's cross-validation operations
    if args.task != "train" and not args.no_check:  # training reads the preprocessed data checked at planning
        from fednnunet.cli_check import precheck_client

        precheck_client(args.dataset, name, args.np)  # before anything starts
    logs = Path(os.environ["nnUNet_results"]) / "FednnUNet" / f"client-{name}-{args.task}" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec = SuperNodeSpec(args.server, Path(args.tls_root).resolve() if args.tls_root else None,
                         Path(args.auth_key).resolve() if args.auth_key else None, args.connect_timeout)
    options = SiteOptions(name, args.dataset, spec, logs, exit_after_job=True, task=args.task,
                          train_expect=(args.configuration, _split_ids(args.fold)) if args.task == "train" else None,
                          rejoin_for_s=args.rejoin_for)
    started = time.time()
    log = logs / f"worker-{name}.log"
    print(f"site {name} (dataset {args.dataset}) joining {args.server} for {args.task}; log {log}", flush=True)
    terminal, terminal_err = _send_output_to(log)
    try:
        worker = run_site_process(options, notify=lambda line: print(line, file=terminal_err, flush=True))
    except SuperNodeExited as err:
        print(f"error: {err}", file=terminal_err, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted: this site's SuperNode was stopped", file=terminal_err, flush=True)
        return 130
    if worker.refusal is not None:
        print(f"error: {worker.refusal}", file=terminal_err, flush=True)
        return 1
    print(f"site {name}: the server's job ended after {time.time() - started:.0f} s", file=terminal, flush=True)
    return 0


def _client_site_name(args: argparse.Namespace) -> str:
    """This site's name: ``--site-name``, else its key's file name (``h1.key`` -> ``h1``, the name the coordinator
    registered ``h1.pub`` under), else the dataset. A plain identifier: it names log folders here."""
    from fednnunet.security.certs import check_site_name

    name = args.site_name or (Path(args.auth_key).stem if args.auth_key else args.dataset)
    try:
        return check_site_name(name)
    except ValueError as err:
        raise SystemExit(f"error: {err}; pass --site-name") from None


def _send_output_to(log: Path) -> tuple[Any, Any]:
    """From now on this process's output (nnU-Net prints its training log; the library logs at INFO) goes to
    ``log``; the returned (stdout, stderr) files still reach the terminal, for this command's own lines."""
    sys.stdout.flush()
    sys.stderr.flush()
    terminal, terminal_err = os.fdopen(os.dup(1), "w"), os.fdopen(os.dup(2), "w")
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in root.handlers:
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per task poll otherwise
    return terminal, terminal_err


def cmd_certs(args: argparse.Namespace) -> int:
    from fednnunet.security.certs import make_certificates

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    sites: int | list[str] = ([n.strip() for n in args.site_names.split(",") if n.strip()] if args.site_names
                              else args.sites)
    try:
        certs = make_certificates(Path(args.out), hosts, sites)
    except (ValueError, FileExistsError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"CA certificate (give to every site):  {certs.ca_cert}")
    print(f"server certificate and key:            {certs.server_cert}, {certs.server_key}")
    for site, (key, pub) in certs.site_keys.items():
        print(f"{site}: private key {key} (to that site only), public key {pub} (registered by the server)")
    print(f"a hospital's own key: `fednnunet keygen --name NAME --out DIR` there, then its NAME.pub into "
          f"{certs.folder / 'sites'}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from fednnunet.security.certs import make_site_key

    try:
        private, public = make_site_key(Path(args.out), args.name)
    except (ValueError, FileExistsError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"private key {private} (stays here: `fednnunet client ... --auth-key {private}`)")
    print(f"public key  {public} (send it to the coordinator, who puts it into <tls-dir>/sites/{public.name}; "
          f"this site is then '{args.name}' in the federation)")
    return 0


# --- demo ----------------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir).resolve()
    for var, sub in zip(NNUNET_ENV, ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")):
        os.environ[var] = str(workdir / sub)
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    ids = [str(args.first_id + i) for i in range(args.sites)]
    raw = Path(os.environ["nnUNet_raw"])
    if not all(any(raw.glob(f"Dataset{i}_*")) for i in ids):
        print(f"writing {args.sites} synthetic sites into {raw}")
        from fednnunet.data.synthetic import write_demo_federation

        write_demo_federation(raw, first_id=args.first_id, sites=args.sites, dim=2, seed=0)
    print("environment:\n" + "\n".join(f"  export {v}={os.environ[v]}" for v in NNUNET_ENV))
    plan = build_parser().parse_args(["run", "plan_and_preprocess", " ".join(ids), "-c", "2d",
                                      "--out", str(workdir / "runs" / "plan_and_preprocess")])
    code = cmd_run(plan)
    if code:
        return code
    pre = Path(os.environ["nnUNet_preprocessed"])
    print("every site now has the merged fingerprint and identical plans:")
    for i in ids:
        for d in sorted(pre.glob(f"Dataset{i}_*")):
            print(f"  {d / 'dataset_fingerprint.json'}\n  {d / 'nnUNetPlans.json'}")
    if args.rounds < 1:
        return 0
    train = build_parser().parse_args([
        "run", "train", " ".join(ids), "2d", "0", "--rounds", str(args.rounds), "--iterations-per-round",
        str(args.iterations), "--val-iterations", "2", "--da-workers", "0", "--out", str(workdir / "runs" / "train")])
    code = cmd_run(train)
    if code:
        return code
    print("federated models (ordinary nnU-Net results folders):")
    for i in ids:
        for d in sorted(Path(os.environ["nnUNet_results"]).glob(f"Dataset{i}_*/nnUNetTrainer__nnUNetPlans__2d")):
            print(f"  {d}")
    print(f"metrics and progress plot: {workdir / 'runs' / 'train'}")
    best = build_parser().parse_args(["run", "find_best_configuration", " ".join(ids), "-c", "2d", "-f", "0",
                                      "-np", "1", "--out", str(workdir / "runs" / "find_best_configuration")])
    return cmd_run(best)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fednnunet", description="Federated nnU-Net (FFE and AsymFedAvg) on Flower")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write built-in synthetic multi-site nnU-Net raw datasets")
    p.add_argument("--out", required=True, help="folder to write DatasetNNN_* into (usually $nnUNet_raw)")
    p.add_argument("--first-id", type=int, default=901)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--dim", type=int, choices=(2, 3), default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ct", action="store_true", help="CT-like channel (CT normalization from fingerprint percentiles)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="image size factor (e.g. 2.5 with --dim 3 and a small -gpu_memory_target: nnU-Net plans a "
                        "3d_lowres/3d_cascade_fullres cascade)")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("demo", help="the built-in demo federation, end to end, in a work folder")
    p.add_argument("--workdir", default="demo_run")
    p.add_argument("--first-id", type=int, default=901)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="federated training rounds after planning (0: plan only)")
    p.add_argument("--iterations", type=int, default=10, help="training iterations per round")
    p.set_defaults(func=cmd_demo)

    from fednnunet import cli_cross_validation

    for task, t in _task_parsers(sub, "run", cmd_run,
                                 "one-machine federation: a SuperLink and one SuperNode + site worker per dataset"):
        t.add_argument("datasets", help='dataset ids, one per site, e.g. "901 902 903"')
        _add_task_options(t, task)
        if task == "find_best_configuration":
            cli_cross_validation.add_site_options(t)

    for task, t in _task_parsers(sub, "server", cmd_server,
                                 "the coordinating server of a multi-machine federation (SuperLink + job)"):
        t.add_argument("--num-clients", type=int, required=True, help="sites that must connect")
        t.add_argument("--address", default="0.0.0.0:9092", help="HOST:PORT the SuperLink serves on")
        security = t.add_mutually_exclusive_group()
        security.add_argument("--tls-dir", help="folder made by `fednnunet certs` (TLS + registered site keys)")
        security.add_argument("--insecure", action="store_true", help="no TLS, no site authentication")
        t.add_argument("--site-wait", type=float, default=None, metavar="S",
                       help="seconds the job waits for the sites to connect at its start (default 300)")
        _add_task_options(t, task)

    for task, t in _task_parsers(sub, "client", cmd_client,
                                 "one site of a multi-machine federation (SuperNode + site worker)"):
        t.add_argument("dataset", help="this site's nnU-Net dataset id or name")
        if task == "train":
            t.add_argument("configuration", help="must match the server's")
            t.add_argument("fold", nargs="+", help="must match the server's")
        if task == "find_best_configuration":
            cli_cross_validation.add_site_options(t)
        t.add_argument("--server", required=True, help="HOST:PORT of the server")
        security = t.add_mutually_exclusive_group()
        security.add_argument("--tls-root", help="the federation's CA certificate (ca.crt)")
        security.add_argument("--insecure", action="store_true", help="no TLS (refused unless the server is local)")
        t.add_argument("--auth-key", help="this site's private key (sites/siteN.key from `fednnunet certs`)")
        t.add_argument("--site-name", help="name of this site (default: the --auth-key file's name, else the "
                       "dataset); with a key, the server knows the site by its key and refuses another name")
        t.add_argument("--da-workers", type=int, default=None, help="nnUNet_n_proc_DA at this site")
        t.add_argument("--connect-timeout", type=float, default=300.0,
                       help="seconds this site's SuperNode keeps trying to reach the server (at the start: then the "
                            "client ends with the reason; later: then it is restarted, see --rejoin-for)")
        t.add_argument("--rejoin-for", type=float, default=3600.0, metavar="S",
                       help="seconds this site keeps trying to rejoin after it lost the server during the job (an "
                            "outage, a coordinator restart): its SuperNode is restarted with backoff (5 s doubling "
                            "to 60 s), a line on the terminal each time, its trainer kept; then the client exits "
                            "non-zero with the reason (default 3600)")
        if task != "train":
            t.add_argument("-np", type=int, default=1, help="cases checked in parallel before connecting")
            t.add_argument("--no-check", action="store_true", help="skip the data check before connecting")

    p = sub.add_parser("certs", help="a CA, a server certificate (and, for trials, site key pairs)")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--hosts", required=True, help="server names/addresses sites connect to, comma separated")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--sites", type=int, default=0,
                       help="site key pairs site1..siteN to make here (default 0: each hospital makes its own "
                            "with `fednnunet keygen` and sends only NAME.pub)")
    names.add_argument("--site-names", help="comma separated names of the site key pairs to make here")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("keygen", help="a hospital's own site key pair; only NAME.pub goes to the coordinator")
    p.add_argument("--name", required=True, help="this site's name in the federation (a plain identifier)")
    p.add_argument("--out", required=True, help="folder for NAME.key (private, 0600) and NAME.pub")
    p.set_defaults(func=cmd_keygen)

    from fednnunet import cli_bench, cli_check, cli_evaluation  # their commands live beside their stages

    cli_check.add_commands(sub)
    cli_evaluation.add_commands(sub)
    cli_bench.add_commands(sub)
    return parser


TASK_HELP = {
    "extract_fingerprint": "federated fingerprint extraction (FFE) at every site",
    "plan_and_preprocess": "fingerprint, plan and preprocess at every site",
    "train": "federated nnU-Net training (FedAvg on FFE plans, or --asym AsymFedAvg)",
    "find_best_configuration": "nnUNetv2_find_best_configuration on the pooled cross-validation of all sites",
}


def _task_parsers(sub: Any, command: str, func: Callable[[argparse.Namespace], int],
                  text: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``command TASK`` for each federated task (run, server and client take the same three tasks)."""
    task_sub = sub.add_parser(command, help=text).add_subparsers(dest="task", required=True)
    for task, task_text in TASK_HELP.items():
        t = task_sub.add_parser(task, help=task_text)
        t.set_defaults(func=func)
        yield task, t


def _add_task_options(t: argparse.ArgumentParser, task: str) -> None:
    """The options of a task, shared by `run` (one machine) and `server` (multi-machine)."""
    t.add_argument("--out", help=f"server output folder (default: $nnUNet_results/FednnUNet/{task}-<time>)")
    if task == "train":
        _add_train_options(t)
        return
    if task == "find_best_configuration":
        from fednnunet.cli_cross_validation import add_options

        add_options(t)
        return
    t.add_argument("-np", type=int, default=1, help="processes per site for fingerprint/preprocessing")
    t.add_argument("--no-check", action="store_true", help="skip the per-case dataset check")
    t.add_argument("--da-workers", type=int, default=None, help="nnUNet_n_proc_DA for every site")
    if task == "plan_and_preprocess":
        t.add_argument("-c", nargs="+", default=["2d", "3d_fullres", "3d_lowres"],
                       help="configurations to preprocess (nnU-Net's -c)")
        t.add_argument("--asym", action="store_true",
                       help="AsymFedAvg preparation: every site plans from its own local fingerprint")
        t.add_argument("-pl", default="ExperimentPlanner", help="experiment planner class (nnU-Net's -pl)")
        t.add_argument("-gpu_memory_target", type=float, nargs="+",
                       help="GB per site (one value for all); FFE plans for the smallest")


def _add_train_options(t: argparse.ArgumentParser) -> None:
    t.add_argument("configuration", help="nnU-Net configuration, e.g. 2d, 3d_fullres")
    t.add_argument("fold", nargs="+", help="0-4 or all; several (\"0 1 2 3 4\") run one after another")
    t.add_argument("--asym", action="store_true", help="AsymFedAvg (after plan_and_preprocess --asym)")
    t.add_argument("--asym-scope", choices=("all", "any"), default="all",
                   help="average a layer only if all sites share it (paper) or among every subset sharing it")
    t.add_argument("-tr", default="nnUNetTrainer", help="nnU-Net trainer class")
    t.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    t.add_argument("-device", default="cpu", choices=("cpu", "cuda", "mps"), help="device at every site")
    t.add_argument("--npz", action="store_true", help="save softmax of the final validation (nnU-Net's --npz)")
    t.add_argument("--c", dest="continue_training", action="store_true",
                   help="continue a run (same as --resume in a federation)")
    t.add_argument("-pretrained_weights", default=None, help="nnU-Net checkpoint to start from (path at every site)")
    t.add_argument("--val", action="store_true", help="only run the final validation of the existing models")
    t.add_argument("--val_best", action="store_true", help="validate with checkpoint_best.pth")
    t.add_argument("--disable_checkpointing", action="store_true")
    t.add_argument("--skip-val", action="store_true", help="no final validation (quick CPU runs)")
    t.add_argument("--rounds", type=int, default=None,
                   help="default: the trainer's epochs / epochs per round, known to the coordinator only for "
                        "nnUNetTrainer (1000) and nnU-Net's nnUNetTrainer_<N>epochs variants (N); any other -tr "
                        "needs --rounds (never taken from a site)")
    t.add_argument("--iterations-per-round", type=int, default=None,
                   help="training iterations per epoch (default: the trainer's, 250)")
    t.add_argument("--val-iterations", type=int, default=None, help="validation iterations per epoch (default 50)")
    t.add_argument("--epochs-per-round", type=int, default=1)
    t.add_argument("--weighting", choices=("cases", "uniform"), default="cases",
                   help="FedAvg weights: training cases per site (default) or the paper's plain mean")
    t.add_argument("--momentum", choices=("local", "reset", "average"), default="local",
                   help="the sites' SGD momentum at each round: kept (default), zeroed, or averaged with the weights "
                        "(doubles the bytes of a round)")
    t.add_argument("--server-momentum", type=float, default=0.0, metavar="BETA",
                   help="FedAvgM at the server (FFE only): the round's change to the global model applied with "
                        "momentum BETA in [0, 1) (default 0: plain FedAvg)")
    t.add_argument("--clip-update-norm", type=float, default=None, metavar="C",
                   help="bound each site's update (its change from the model it was sent) to L2 norm C before "
                        "averaging, so one site moves the model by at most its weight share x C per round; with "
                        "it, metrics.jsonl records the norms (update_norms; a huge C records them without clipping) "
                        "(default: no bound)")
    t.add_argument("--min-sites", type=int, default=None, help="fewest sites a round may have (default: all)")
    t.add_argument("--round-timeout", type=float, default=None, help="seconds before a site is left out of a round")
    t.add_argument("--resume", action="store_true", help="continue from the last completed round in --out")
    t.add_argument("--transfer-dtype", choices=("float32", "float16"), default="float32",
                   help="precision of the weights sent each round (float16 halves the bytes)")
    t.add_argument("--da-workers", type=int, default=None, help="nnUNet_n_proc_DA for every site")
    t.add_argument("--seed", type=int, default=None,
                   help="seed every site (bit-for-bit repeatable on CPU with --da-workers 0); default: unseeded")
    t.add_argument("--validate-delivered-every", type=int, default=1, metavar="N",
                   help="validate the model the sites receive every N rounds, and the final one (0: never; then "
                        "no checkpoint_best.pth)")
    t.add_argument("--finetune-epochs", type=int, default=0, metavar="N",
                   help="after the federation, every site fine-tunes the final model for N epochs on its own "
                        "training cases into its personal model (plans <plans>_personal, beside the global one; "
                        "docs/training.md) (default 0: none)")
    t.add_argument("--local-norm", action="store_true",
                   help="FedBN (FFE only): average everything but the normalization layers' weights, which every "
                        "site keeps; a site's model is the global weights with its own normalization, the exported "
                        "global model (for hospitals outside the federation) has the averaged one (docs/training.md)")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # a job run in this process logs INFO to its own server.log
        handler.setLevel(level)
    raise SystemExit(args.func(args))


if __name__ == "__main__":
    main()
