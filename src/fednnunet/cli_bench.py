"""``fednnunet bench ...``: the performance benchmarks, printed for people or as JSON (issue 6)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _emit(args: argparse.Namespace, name: str, result, text: str) -> None:
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))


def cmd_overhead(args: argparse.Namespace) -> int:
    from fednnunet.bench import bench_overhead, format_overhead

    result = bench_overhead(sites=args.sites, rounds=args.rounds, model=args.model, iterations=args.iterations,
                            transfer_dtype=args.transfer_dtype, work=Path(args.work) if args.work else None,
                            floor=not args.no_floor)
    suffix = "" if args.transfer_dtype == "float32" else f"-{args.transfer_dtype}"
    _emit(args, f"overhead-{args.model}{suffix}", result, format_overhead(result))
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    from fednnunet.bench import bench_aggregate, format_aggregate_table

    sites = [int(k) for k in args.sites.split(",")]
    rows = bench_aggregate(sites=sites, params=float(args.params), repeats=args.repeats,
                           modes=tuple(args.modes.split(",")))
    _emit(args, "aggregate", rows, format_aggregate_table(rows))
    return 0


def cmd_planning(args: argparse.Namespace) -> int:
    from fednnunet.bench import bench_planning, format_planning

    datasets = args.datasets.split() if args.datasets else []
    result = bench_planning(sites=args.sites, work=Path(args.work) if args.work else None, raw=args.raw,
                            datasets=datasets)
    _emit(args, "-".join(["planning", *datasets]), result, format_planning(result))
    return 0


def cmd_site_epoch(args: argparse.Namespace) -> int:
    from fednnunet.bench import bench_site_epoch, format_site_epoch

    result = bench_site_epoch(rounds=args.rounds, repeats=args.repeats, iterations=args.iterations,
                              val_iterations=args.val_iterations, device=args.device, da_workers=args.da_workers,
                              work=Path(args.work) if args.work else None)
    _emit(args, "site-epoch", result, format_site_epoch(result))
    return 0


def cmd_checks(args: argparse.Namespace) -> int:
    from fednnunet.bench import bench_checks, format_checks

    datasets = args.datasets.split() if args.datasets else []
    if bool(args.raw) != bool(datasets):
        raise SystemExit("error: --raw and --datasets go together")
    result = bench_checks(raw=args.raw, datasets=datasets, demo=not args.no_demo, large_cases=args.large,
                          num_processes=args.np, repeats=args.repeats, work=Path(args.work) if args.work else None)
    _emit(args, "-".join(["checks", *datasets]), result, format_checks(result))
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from fednnunet.bench.gateway import bench_gateway, format_gateway

    result = bench_gateway(work=Path(args.work) if args.work else None, requests=args.requests,
                           attackers=args.attackers, bodies=args.bodies, body_mb=args.body_mb,
                           compare_with=Path(args.compare_with) if args.compare_with else None)
    _emit(args, "gateway", result, format_gateway(result))
    return 0


def cmd_all(args: argparse.Namespace) -> int:
    """Every benchmark at the sizes reported in BENCHMARKS.md (`make bench`)."""
    started = time.time()
    base = vars(args)
    overhead = dict(sites=3, rounds=5, iterations=2, work=None, no_floor=False)
    steps = [
        (cmd_aggregate, dict(sites="2,4,8,16,32,64", params="30e6", repeats=3, modes="ffe,asym,asym_stream")),
        (cmd_planning, dict(sites=3, work=None, raw=None, datasets=None)),
        (cmd_checks, dict(raw=None, datasets=None, no_demo=False, large=4, np=1, repeats=3, work=None)),
        (cmd_overhead, dict(overhead, model="tiny", transfer_dtype="float32")),
        (cmd_overhead, dict(overhead, model="30m", transfer_dtype="float32")),
        (cmd_overhead, dict(overhead, model="30m", transfer_dtype="float16")),
        (cmd_overhead, dict(overhead, sites=1, model="30m", transfer_dtype="float32")),
        (cmd_site_epoch, dict(rounds=3, repeats=2, iterations=250, val_iterations=50, device="cpu", da_workers=None,
                              work=None)),
    ]
    for fn, extra in steps:
        print(f"--- {fn.__name__[4:]} {extra} ({time.time() - started:.0f} s elapsed)", flush=True)
        fn(argparse.Namespace(**{**base, **extra}))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="performance benchmarks (not part of the tests; they print numbers)")
    bench = p.add_subparsers(dest="bench", required=True)

    def common(b: argparse.ArgumentParser) -> None:
        b.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        b.add_argument("--out", help="also write the result as JSON into this folder")

    b = bench.add_parser("overhead", help="per-round overhead and bytes of a real loopback federation")
    b.add_argument("--sites", type=int, default=3)
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--model", choices=("tiny", "30m"), default="tiny")
    b.add_argument("--iterations", type=int, default=2, help="training iterations per round")
    b.add_argument("--transfer-dtype", choices=("float32", "float16"), default="float32",
                   help="model transfer dtype (fednnunet run train --transfer-dtype)")
    b.add_argument("--work", help="work folder (default: a new temporary folder)")
    b.add_argument("--no-floor", action="store_true",
                   help="skip Flower's floor: the same SuperNodes and bytes per round with no work, run afterwards")
    common(b)
    b.set_defaults(func=cmd_overhead)

    b = bench.add_parser("aggregate", help="aggregation time and peak memory vs a plain copy")
    b.add_argument("--sites", default="2,4,8,16,32,64", help="comma-separated K values")
    b.add_argument("--params", default="30e6")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--modes", default="ffe,asym,asym_stream")
    common(b)
    b.set_defaults(func=cmd_aggregate)

    b = bench.add_parser("planning", help="federated plan_and_preprocess vs the slowest site's local planning")
    b.add_argument("--sites", type=int, default=3, help="number of synthetic sites (ignored with --raw)")
    b.add_argument("--raw", help="bench these existing datasets instead: an nnU-Net raw folder (only read)")
    b.add_argument("--datasets", help='with --raw: the sites\' datasets, ids or names, e.g. "950 951"')
    b.add_argument("--work", help="work folder (default: a new temporary folder)")
    common(b)
    b.set_defaults(func=cmd_planning)

    b = bench.add_parser("site-epoch", help="a site's epochs: nnU-Net's own training vs a one-site federation")
    b.add_argument("--rounds", type=int, default=3, help="epochs (= federated rounds) per run")
    b.add_argument("--repeats", type=int, default=2, help="runs per arm, alternating")
    b.add_argument("--iterations", type=int, default=250, help="training iterations per epoch (nnU-Net's: 250)")
    b.add_argument("--val-iterations", type=int, default=50, help="validation iterations per epoch (nnU-Net's: 50)")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    b.add_argument("--da-workers", type=int, default=None,
                   help="nnUNet_n_proc_DA for both arms (default: 0 on the CPU, nnU-Net's own on CUDA)")
    b.add_argument("--work", help="work folder (default: a new temporary folder)")
    common(b)
    b.set_defaults(func=cmd_site_epoch)

    b = bench.add_parser("checks", help="a site's data checks vs nnU-Net's fingerprint extraction on the same data")
    b.add_argument("--raw", help="also bench these existing datasets: an nnU-Net raw folder (only read)")
    b.add_argument("--datasets", help='with --raw: ids or names, e.g. "950 951"')
    b.add_argument("--no-demo", action="store_true", help="skip the synthetic 3D demo sites")
    b.add_argument("--large", type=int, default=0, help="also a synthetic CT-sized 3D site with this many cases")
    b.add_argument("-np", type=int, default=1, help="processes for the site check and the fingerprint")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--work", help="work folder (default: a new temporary folder)")
    common(b)
    b.set_defaults(func=cmd_checks)

    b = bench.add_parser("gateway", help="the coordinator's gateway under slow-connection and unauthenticated-body "
                                         "attacks (issue 24), with a real SuperLink behind it")
    b.add_argument("--requests", type=int, default=10, help="a registered site's signed Fleet requests per condition")
    b.add_argument("--attackers", type=int, default=100, help="slow-head connections kept open by the attacker")
    b.add_argument("--bodies", type=int, default=32, help="concurrent unauthenticated bodies")
    b.add_argument("--body-mb", type=int, default=16, help="size of each unauthenticated body (MiB)")
    b.add_argument("--compare-with", metavar="FILE",
                   help="also measure this gateway module file under the slow-head attacks (e.g. an earlier version: "
                        "git show REV:src/fednnunet/security/gateway.py > FILE)")
    b.add_argument("--work", help="work folder (default: a new temporary folder)")
    common(b)
    b.set_defaults(func=cmd_gateway)

    b = bench.add_parser("all", help="every benchmark (make bench)")
    common(b)
    b.set_defaults(func=cmd_all)
