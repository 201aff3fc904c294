"""``fednnunet evaluate``, ``fednnunet benchmark``, ``fednnunet compare-results`` and ``fednnunet convert``: commands
print for people, the work is in ``fednnunet.evaluation`` and ``fednnunet.evaluation.benchmark``."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path


def _ids(value: str | list[str] | None) -> list[str]:
    if not value:
        return []
    values = [value] if isinstance(value, str) else value
    return [v for x in values for v in x.replace(",", " ").split()]


def _dataset_folder(root: Path, site: str) -> Path:
    from fednnunet.evaluation.benchmark import BenchmarkError, resolve_sites

    try:
        return resolve_sites(root, [site])[0].folder
    except BenchmarkError as err:
        raise SystemExit(f"error: {err}") from None


def _results_folder(root: Path, site: str) -> Path:
    if site.isdigit():
        matches = sorted(root.glob(f"Dataset{int(site):03d}_*"))
    else:
        matches = sorted(root.glob(site if site.startswith("Dataset") else f"Dataset[0-9][0-9][0-9]_{site}"))
    if len(matches) != 1:
        raise SystemExit(f"error: expected one dataset {site!r} in {root}, found {[m.name for m in matches] or 'none'}")
    return matches[0]


# --- evaluate ----------------------------------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    from fednnunet.evaluation.predict import case_input_files, held_out_cases, normalize_folds, predict_cases
    from fednnunet.evaluation.report import evaluate_predictions, write_results_json

    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        if not os.environ.get(var):
            raise SystemExit(f"error: set {var} (the raw labels and splits_final.json are read from it)")
    results_root = Path(args.results_root or os.environ.get("nnUNet_results") or "")
    if not str(results_root):
        raise SystemExit("error: set nnUNet_results or pass --results-root")
    try:
        folds = normalize_folds(_ids(args.f))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    raw = Path(os.environ["nnUNet_raw"])
    raw_folder = _dataset_folder(raw, args.d)
    model = _results_folder(results_root, args.d) / f"{args.tr}__{args.p}__{args.c}"
    pre = Path(os.environ["nnUNet_preprocessed"]) / raw_folder.name
    out = Path(args.out).resolve()
    started = time.time()
    report: dict = {"dataset": raw_folder.name, "model_folder": str(model), "folds": folds,
                    "configuration": args.c, "tta": args.tta}
    try:
        pred_dir = out / "predictions" / raw_folder.name
        for fold in folds:
            cases = held_out_cases(pre, fold)
            print(f"fold {fold}: predicting {len(cases)} held-out case(s) of {raw_folder.name}", flush=True)
            predict_cases(model, [fold], case_input_files(raw_folder, cases), pred_dir, device=args.device,
                          tta=args.tta, sequential=True)
        entry = evaluate_predictions(pred_dir, raw_folder / "labelsTr", raw_folder / "dataset.json")
        report["cross_validation"] = entry
        print(f"{raw_folder.name} cross-validation ({entry['cases']} cases): DSC {entry['dsc']:.4f}, "
              f"HD95 {entry['hd95']:.2f}")
        report["external"] = {}
        for ext in _ids(args.external):
            ext_folder = _dataset_folder(raw, ext)
            ext_dir = out / "predictions" / f"external_{ext_folder.name}"
            print(f"external {ext_folder.name}: predicting all cases with the ensemble of folds {folds}", flush=True)
            predict_cases(model, folds, case_input_files(ext_folder), ext_dir, device=args.device, tta=args.tta,
                          sequential=True)
            e = evaluate_predictions(ext_dir, ext_folder / "labelsTr", ext_folder / "dataset.json")
            report["external"][ext_folder.name] = e
            print(f"{ext_folder.name} (external, {e['cases']} cases): DSC {e['dsc']:.4f}, HD95 {e['hd95']:.2f}")
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    write_results_json(report, out / "metrics.json")
    print(f"done in {time.time() - started:.1f} s; predictions in {out / 'predictions'}, metrics in "
          f"{out / 'metrics.json'}")
    return 0


# --- benchmark ---------------------------------------------------------------------------------------------------
def cmd_benchmark(args: argparse.Namespace) -> int:
    from fednnunet.evaluation.benchmark import BenchmarkError, format_progress, run_benchmark

    raw = Path(args.raw or os.environ.get("nnUNet_raw") or "")
    if not str(raw) or not raw.is_dir():
        raise SystemExit("error: set nnUNet_raw or pass --raw (the folder holding the site datasets)")
    launched = bool(sys.argv) and Path(sys.argv[0]).name in ("fednnunet", "cli.py")
    command = "fednnunet " + shlex.join(sys.argv[1:]) if launched else None
    print(f"benchmark of {', '.join(_ids(args.sites))} ({args.c}), methods {args.methods}, folds {args.folds}, "
          f"{args.rounds} round(s) x {args.iterations_per_round} iteration(s), {args.repeats} repeat(s); output "
          f"{Path(args.out).resolve()}", flush=True)
    try:
        results = run_benchmark(
            raw, _ids(args.sites), args.c, Path(args.out), external=_ids(args.external), folds=_ids(args.folds),
            rounds=args.rounds, iterations_per_round=args.iterations_per_round,
            methods=[m for m in args.methods.replace(" ", ",").split(",") if m], val_iterations=args.val_iterations,
            progress=lambda e: print(format_progress(e), flush=True), command=command, seed=args.seed,
            repeats=args.repeats, clip_update_norm=args.clip_update_norm, finetune_epochs=args.finetune_epochs)
    except (BenchmarkError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print()
    print((Path(args.out) / "results.md").read_text().split("\n## Wilcoxon")[0].strip())
    print(f"\nresults: {Path(args.out).resolve() / 'results.json'} (wall {results['budget']['wall_seconds']:.0f} s)")
    return 0


# --- compare-results ---------------------------------------------------------------------------------------------
def cmd_compare_results(args: argparse.Namespace) -> int:
    from fednnunet.evaluation.report import compare_runs

    try:
        a, b = (json.loads((Path(p) / "results.json" if Path(p).is_dir() else Path(p)).read_text())
                for p in (args.a, args.b))
        method_b = args.method_b or args.method
        table = compare_runs(a, args.method, b, method_b)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"DSC({args.method} in {args.a}) - DSC({method_b} in {args.b}), paired by case and repeat index, "
          "95 % bootstrap interval:")
    for site, e in table.items():
        if e["mean_diff"] is None:
            print(f"  {site}: n/a ({e.get('reason')})")
            continue
        print(f"  {site}: {e['mean_diff']:+.4f} [{e['ci_low']:+.4f}, {e['ci_high']:+.4f}] (n={e['n_cases']} cases, "
              f"R={e['n_repeats']}{', unpaired cases left out' if e.get('unpaired_cases') else ''})")
    return 0


# --- convert -----------------------------------------------------------------------------------------------------
def cmd_convert_retina(args: argparse.Namespace) -> int:
    from fednnunet.data.retina import convert_retina_crop_pair, convert_retina_vessels

    try:
        if args.collection == "retina-crop-pair":
            folders = convert_retina_crop_pair(Path(args.src), Path(args.out), first_id=args.first_id,
                                               downsample=args.downsample, crop=args.crop)
        else:
            folders = convert_retina_vessels(Path(args.src), Path(args.out), first_id=args.first_id,
                                             downsample=args.downsample)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for f in folders:
        n = json.loads((f / "dataset.json").read_text()).get("numTraining")
        print(f"wrote {f} ({n} cases)")
    return 0


def add_commands(sub) -> None:
    """Registers ``evaluate``, ``benchmark``, ``compare-results`` and ``convert`` on the ``fednnunet`` sub-parsers."""
    p = sub.add_parser("evaluate", help="cross-validation predictions of a trained site model, DSC and HD95")
    p.add_argument("-d", required=True, help="dataset id or name of the site")
    p.add_argument("-c", required=True, help="nnU-Net configuration, e.g. 2d")
    p.add_argument("-f", nargs="+", default=["0"], help='folds, e.g. "0 1 2 3 4" (their held-out cases)')
    p.add_argument("-tr", default="nnUNetTrainer")
    p.add_argument("-p", default="nnUNetPlans")
    p.add_argument("--results-root", help="nnUNet_results folder holding the model (default: $nnUNet_results)")
    p.add_argument("--external", help='other datasets to predict with the ensemble of the folds, e.g. "904 905"')
    p.add_argument("--tta", action="store_true", help="test-time mirroring (nnUNetv2_predict default; slower)")
    p.add_argument("-device", "--device", dest="device", default="cpu")
    p.add_argument("--out", required=True, help="folder for predictions/ and metrics.json")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("benchmark", help="local vs centralized vs FFE vs AsymFedAvg on the same splits and budget")
    p.add_argument("sites", help='internal sites, e.g. "901 902 903"')
    p.add_argument("-c", required=True, help="nnU-Net configuration, e.g. 2d")
    p.add_argument("--external", default="", help='sites never trained on, e.g. "904"')
    p.add_argument("--folds", default="0", help='cross-validation folds, e.g. "0 1 2 3 4"')
    p.add_argument("--rounds", type=int, default=10, help="epochs (federated rounds) per fold, every method")
    p.add_argument("--iterations-per-round", type=int, default=250, help="training iterations per epoch")
    p.add_argument("--val-iterations", type=int, default=None, help="online validation iterations per epoch")
    p.add_argument("--methods", default="local,centralized,ffe,asym",
                   help="comma separated: local, centralized, ffe, asym; also the FFE variants ffe16 (16-bit "
                        "transfer), ffe-uniform (plain-mean FedAvg weights), ffe-often (5 x the rounds of 1/5 the "
                        "iterations), ffe-mom-reset / ffe-mom-avg (site momentum zeroed / averaged each round), "
                        "ffe-server-mom (server momentum 0.5), ffe-clip (--clip-update-norm C), ffe-ft (FFE, then "
                        "every site's personal model: --finetune-epochs E), ffe-bn (--local-norm: FedBN, every site "
                        "keeps its normalization layers), ffe-bn-ft (both)")
    p.add_argument("--repeats", type=int, default=1,
                   help="train every method R times (seeds S..S+R-1); results.md: mean ± sd, paired 95%% intervals")
    p.add_argument("--seed", type=int, default=None,
                   help="seed S of the first repeat (default: unseeded with one repeat, 0 with several)")
    p.add_argument("--clip-update-norm", type=float, default=None, metavar="C",
                   help="the bound of the ffe-clip method (its --clip-update-norm; see update_norms in a FFE run's "
                        "metrics.jsonl for the scale of honest updates)")
    p.add_argument("--finetune-epochs", type=int, default=None, metavar="E",
                   help="the fine-tuning epochs of the ffe-ft and ffe-bn-ft methods (their --finetune-epochs; "
                        "default: a tenth of --rounds, at least 1)")
    p.add_argument("--raw", help="nnU-Net raw folder of the sites (default: $nnUNet_raw); never written")
    p.add_argument("--out", required=True, help="output folder (each method gets its own nnU-Net roots inside)")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("compare-results", help="paired DSC difference between two benchmark runs (e.g. two budgets)")
    p.add_argument("a", help="benchmark output folder (or its results.json)")
    p.add_argument("b", help="the other benchmark output folder (same splits; repeats paired by index)")
    p.add_argument("--method", required=True, help="method in A (and in B unless --method-b)")
    p.add_argument("--method-b", help="method in B (default: --method)")
    p.set_defaults(func=cmd_compare_results)

    p = sub.add_parser("convert", help="convert public collections into nnU-Net raw datasets")
    conv = p.add_subparsers(dest="collection", required=True)
    r = conv.add_parser("retina-vessels", help="DRIVE, STARE, CHASE_DB1, RC-SLO -> four raw datasets")
    r.add_argument("src", help="folder with drive/, stare/, chase_db1/, rc-slo/")
    r.add_argument("--out", required=True, help="nnU-Net raw folder to write into")
    r.add_argument("--first-id", type=int, required=True, help="id of the first dataset (DRIVE); +1..+3 follow")
    r.add_argument("--downsample", type=int, default=1, help="integer downsampling factor (1: original size)")
    r.set_defaults(func=cmd_convert_retina)
    r = conv.add_parser("retina-crop-pair", help="two sites that differ in field of view only: DRIVE's test images "
                        "whole, its training images cropped around their vessels (same size in pixels)")
    r.add_argument("src", help="folder with drive/")
    r.add_argument("--out", required=True, help="nnU-Net raw folder to write into")
    r.add_argument("--first-id", type=int, required=True, help="id of DRIVEWhole; DRIVECrop is +1")
    r.add_argument("--downsample", type=int, default=8, help="downsampling factor of the whole images (default 8)")
    r.add_argument("--crop", type=int, default=2, help="the crops are 1/C of the height and width, downsampled C "
                   "times less (C divides --downsample; default 2)")
    r.set_defaults(func=cmd_convert_retina)
