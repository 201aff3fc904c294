"""``fednnunet run|server|client find_best_configuration`` options and what the CLI prints of cross-validation.

The flags are those of ``nnUNetv2_find_best_configuration`` (same names, defaults and meaning); they map onto
``BestConfigurationOptions`` (``JobSpec.best_configuration``), whose defaults they show. The server's result holds
the pooled cross-validation table, the decision and each site's inference instructions; this module prints them
for people. It stays at the CLI edge, beside the other ``cli_*`` modules, because all it does is argparse and
``print``; the stage itself (:mod:`fednnunet.cross_validation`) logs and never prints.
"""

from __future__ import annotations

import argparse
from typing import Any

from fednnunet.cross_validation.coordinator import BestConfigurationOptions

__all__ = ["add_options", "add_site_options", "options_from_args", "print_best_configuration", "print_training"]


def add_options(t: argparse.ArgumentParser) -> None:
    """nnUNetv2_find_best_configuration's flags (for `run` and `server`), with the options' defaults."""
    defaults = BestConfigurationOptions()
    t.add_argument("-c", nargs="+", default=defaults.configurations,
                   help=f"configurations (nnU-Net's default: {' '.join(defaults.configurations)}; those a "
                        "site's plans lack are skipped)")
    t.add_argument("-tr", nargs="+", default=defaults.trainers, help="trainers")
    t.add_argument("-p", nargs="+", default=defaults.plans, help="plans identifiers")
    t.add_argument("-f", nargs="+", type=int, default=defaults.folds,
                   help=f"folds (default {' '.join(map(str, defaults.folds))})")
    t.add_argument("-np", type=int, default=defaults.num_processes,
                   help="processes per site for ensembling and postprocessing (default: nnU-Net's, "
                        "nnUNet_def_n_proc or 8; 1 runs in the site's own process)")
    t.add_argument("--disable_ensembling", action="store_true", help="no ensembles of two configurations")
    t.add_argument("--no_overwrite", action="store_true",
                   help="keep cross-validation and ensemble files that exist (nnU-Net's --no_overwrite)")


def add_site_options(t: argparse.ArgumentParser) -> None:
    """A site's own choice (`client`, and `run` for every site)."""
    t.add_argument("--share-per-case", action="store_true",
                   help="also send each case's Dice per class to the server (default: only sums and counts)")


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    try:
        opts = BestConfigurationOptions(configurations=list(args.c), trainers=list(args.tr), plans=list(args.p),
                                        folds=list(args.f), allow_ensembling=not args.disable_ensembling,
                                        num_processes=args.np, overwrite=not args.no_overwrite)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    return {k: v for k, v in vars(opts).items()}


def print_best_configuration(result: dict[str, Any]) -> None:
    from fednnunet.cross_validation.report import format_cv_table

    rows = result.get("cross_validation", {}).get("rows", {})
    if rows:
        print("cross-validation, pooled over all sites (foreground mean Dice; per site with its case count):")
        print(format_cv_table(rows, "model or ensemble"))
    pre, post = result.get("result_on_crossval_pre_pp"), result.get("result_on_crossval_post_pp")
    print(f"best: {result.get('best')} (pooled Dice {pre:.4f}, after postprocessing {post:.4f})")
    for step in result.get("postprocessing", []):
        print(f"  keep the largest component of {step['step']}: {'yes' if step['applied'] else 'no'} "
              f"({step['dice_before']:.5f} -> {step['dice_after']:.5f})")
    sites = result.get("sites", {})
    for site, files in sites.items():
        print(f"site {site}: {files.get('instructions_file')}")
    if sites:
        site, files = next(iter(sites.items()))
        print(f"inference at site {site} (every site has its own in inference_instructions.txt):")
        print(files.get("instructions", "").strip())
    folds = result.get("folds", [])
    if sorted(folds) != [0, 1, 2, 3, 4]:
        print(f"note: only fold(s) {' '.join(map(str, folds))}: the decision rests on their validation cases and the "
              "commands predict with them alone; nnU-Net's five-fold cross-validation and fold ensemble need folds "
              "0-4 (train each, then run find_best_configuration with -f 0 1 2 3 4)")


def print_training(result: dict[str, Any]) -> str:
    """Per fold and site: rounds, round time, final validation; then the pooled validation table. Returns the
    summary for the 'done' line."""
    from fednnunet.cross_validation.report import format_cv_table

    folds = result.get("folds", {})
    rounds = 0
    for fold, info in folds.items():
        rounds += int(info.get("rounds", 0))
        timing = (f", mean {info['mean_round_seconds']:.1f} s per round (overhead {info['mean_overhead_seconds']:.1f} s)"
                  if "mean_round_seconds" in info else "")
        print(f"fold {fold}: " + (f"{info['rounds']} round(s){timing}" if "rounds" in info else "validated (--val)"))
        for site, s in sorted(info.get("sites", {}).items()):
            dice = s.get("validation_mean_dice")
            print(f"  site {site}: model in {s.get('output_folder')}"
                  + ("" if dice is None else f", final validation mean Dice {dice:.4f}"))
            personal = s.get("personal")
            if personal:
                dice = personal.get("validation_mean_dice")
                print(f"    its personal model ({personal['epochs']} epoch(s) fine-tuned) in "
                      f"{personal['output_folder']}" + ("" if dice is None else f", validation mean Dice {dice:.4f}"))
        for site, error in sorted(info.get("errors", {}).items()):
            print(f"  site {site}: failed: {error}")
        if info.get("global_model"):
            print(f"  global model (FFE): {info['global_model']}")
    rows = result.get("cross_validation", {}).get("rows", {})
    if rows:
        print("final validation (nnU-Net's summary.json), pooled over the sites:")
        print(format_cv_table(rows, "fold"))
    return f"{len(folds)} fold(s), {rounds} round(s)"
