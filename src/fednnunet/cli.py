"""``fednnunet`` command line: prints for people; the work happens in the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

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
        print(f"[{event.get('t', time.time()) - started:7.1f}s] {event.get('message', '')}", flush=True)
    return show


# --- demo-data ---------------------------------------------------------------------------------------------------
def cmd_demo_data(args: argparse.Namespace) -> int:
    from fednnunet.data.synthetic import write_demo_federation

    folders = write_demo_federation(Path(args.out), first_id=args.first_id, sites=args.sites, dim=args.dim,
                                    seed=args.seed, ct=args.ct)
    for f in folders:
        print(f"wrote {f}")
    return 0


# --- run -----------------------------------------------------------------------------------------------------
def _job_from_args(args: argparse.Namespace, sites: list[str], out_dir: Path):
    from fednnunet.federation.job import JobSpec

    gpu: dict[str, float] = {}
    if getattr(args, "gpu_memory_target", None):
        targets = args.gpu_memory_target
        if len(targets) == 1:
            targets = targets * len(sites)
        if len(targets) != len(sites):
            raise SystemExit(f"error: -gpu_memory_target needs 1 or {len(sites)} values, got {len(targets)}")
        gpu = dict(zip(sites, targets))
    return JobSpec(task=args.task, num_sites=len(sites), out_dir=str(out_dir), asym=getattr(args, "asym", False),
                   configurations=list(getattr(args, "c", None) or []), planner=getattr(args, "pl", "ExperimentPlanner"),
                   gpu_memory_target_gb=gpu, num_processes=args.np,
                   check_cases=not getattr(args, "no_check", False))


def cmd_run(args: argparse.Namespace) -> int:
    from fednnunet.launch import FederationError, LocalFederation, Site

    _require_env()
    sites = _split_ids(args.datasets)
    if len(set(sites)) != len(sites):
        raise SystemExit(f"error: a dataset is listed twice: {' '.join(sites)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out or Path(os.environ["nnUNet_results"]) / "FednnUNet" / f"{args.task}-{stamp}").resolve()
    job = _job_from_args(args, sites, out_dir)
    started = time.time()
    print(f"federation of {len(sites)} site(s): {', '.join(sites)}; task {args.task}; output {out_dir}", flush=True)
    site_env = {"nnUNet_n_proc_DA": str(args.da_workers)} if args.da_workers is not None else {}
    try:
        with LocalFederation(out_dir / "federation", [Site(s, s) for s in sites], site_env=site_env,
                             on_event=_printer(started)) as fed:
            result = fed.run(job)
    except FederationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: all federation processes were stopped", file=sys.stderr)
        return 130
    for site, info in result.get("sites", {}).items():
        files = ", ".join(f"{k}={v}" for k, v in info.items() if k.endswith("_file"))
        print(f"site {site} ({info.get('dataset_name')}): {files}")
    print(f"done in {time.time() - started:.1f} s ({result.get('round_trips', '?')} round trips); "
          f"summary in {out_dir / 'result.json'}")
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
    return 0


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
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("demo", help="the built-in demo federation, end to end, in a work folder")
    p.add_argument("--workdir", default="demo_run")
    p.add_argument("--first-id", type=int, default=901)
    p.add_argument("--sites", type=int, default=3)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="one-machine federation: a SuperLink and one SuperNode + site worker per dataset")
    run_sub = p.add_subparsers(dest="task", required=True)
    for task, text in (("extract_fingerprint", "federated fingerprint extraction (FFE) at every site"),
                       ("plan_and_preprocess", "fingerprint, plan and preprocess at every site")):
        t = run_sub.add_parser(task, help=text)
        t.add_argument("datasets", nargs="+", help='dataset ids, one per site, e.g. "901 902 903"')
        t.add_argument("-np", type=int, default=1, help="processes per site for fingerprint/preprocessing")
        t.add_argument("--out", help="server output folder (default: $nnUNet_results/FednnUNet/<task>-<time>)")
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
        t.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(args.func(args))


if __name__ == "__main__":
    main()
