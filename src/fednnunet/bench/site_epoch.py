"""A site's epoch as nnU-Net trains it alone, and the same epochs in a one-site federation, in one run.

Both arms train the same dataset and plans, fold, device and number of epochs with nnU-Net's real epoch (250
training and 50 validation iterations unless asked otherwise), the same data-augmentation workers (``--da-workers``,
default 0 on the CPU and nnU-Net's own default on CUDA), and no final validation:

* ``nnunet``: nnU-Net's own training loop, ``nnUNetTrainer.run_training()``, on a trainer built as
  ``nnUNetv2_train`` builds it (``nnunetv2.run.run_training``; the class is imported rather than looked up by name,
  and ``num_epochs`` is set to the number of epochs, which ``nnUNetv2_train`` has no flag for), in a process of its
  own: what a hospital training alone would run;
* ``federation``: ``fednnunet run train DATASET CONFIG FOLD --rounds R`` (one round = one epoch), the real
  SuperLink, SuperNode and site worker, with ``--validate-delivered-every 0``: with one site the delivered model is
  the site's own model after its epoch, which nnU-Net's online validation at the end of that epoch has just
  validated, so a second validation would compare more work than nnU-Net does.

Reported per arm: compute per epoch as nnU-Net's logger measures it in both (its ``epoch_start_timestamps`` to
``epoch_end_timestamps``, read from the ``checkpoint_final.pth`` the arm wrote; the site's own ``epoch_seconds``
also count ``on_epoch_end``'s plot, which nnU-Net's timestamps leave out), the whole command's wall time, and the
peak resident memory of the process that trains (the site worker's, which it reports at the end of the run).
Arms alternate, so drift on a shared machine hits both.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from fednnunet.bench.common import console_script, nnunet_env, run_timed

DATASET_ID = 971


def _nnunet_arm(dataset: str, configuration: str, fold: str, epochs: int, iterations: int, val_iterations: int,
                device: str, out: Path) -> None:
    """Runs in its own process (``python -m fednnunet.bench.site_epoch``): nnU-Net's own training loop."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = maybe_convert_to_dataset_name(int(dataset))
    base = join(nnUNet_preprocessed.get(), name)
    plans = load_json(join(base, "nnUNetPlans.json"))
    plans["continue_training"] = False  # as nnunetv2.run.run_training hands it to the trainer
    trainer = nnUNetTrainer(plans=plans, configuration=configuration,
                            fold=int(fold), dataset_json=load_json(join(base, "dataset.json")),
                            device=torch.device(device))
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = val_iterations
    maybe_load_checkpoint(trainer, False, False, None)
    if trainer.device.type == "cuda":  # as nnunetv2.run.run_training
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    trainer.run_training()
    out.write_text(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def logged_epoch_seconds(results: Path) -> list[float]:
    """Seconds of every epoch as nnU-Net's logger timed them, from the one ``checkpoint_final.pth`` under
    ``results`` (an nnU-Net results folder)."""
    import torch

    [checkpoint] = results.glob("Dataset*/*/fold_*/checkpoint_final.pth")
    log = torch.load(checkpoint, map_location="cpu", weights_only=False)["logging"]
    return [end - start for start, end in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])]


def bench_site_epoch(rounds: int = 3, repeats: int = 2, iterations: int = 250, val_iterations: int = 50,
                     device: str = "cpu", da_workers: int | None = None, work: Path | None = None) -> dict[str, Any]:
    """Plan one synthetic 2D site with stock nnU-Net, then alternate the two arms ``repeats`` times."""
    from fednnunet.data.synthetic import write_demo_federation

    work = Path(work or tempfile.mkdtemp(prefix="fednnunet-bench-site-epoch-")).resolve()
    env = nnunet_env(work)
    dataset = str(DATASET_ID)
    if not any((work / "nnUNet_preprocessed").glob(f"Dataset{dataset}_*/nnUNetPlans.json")):
        write_demo_federation(work / "nnUNet_raw", first_id=DATASET_ID, sites=1, dim=2, seed=0)
        run_timed([console_script("nnUNetv2_plan_and_preprocess"), "-d", dataset, "-c", "2d", "-np", "1",
                   "-npfp", "1"], env, work / "plan.log", 3600)
    if da_workers is None and device == "cpu":
        da_workers = 0  # fastest for tiny CPU runs
    train_env = dict(env) if da_workers is None else {**env, "nnUNet_n_proc_DA": str(da_workers)}
    da = [] if da_workers is None else ["--da-workers", str(da_workers)]
    arms: dict[str, list[dict[str, Any]]] = {"nnunet": [], "federation": []}
    for i in range(repeats):
        results = work / f"results-nnunet-{i}"
        measured = work / f"nnunet-{i}.json"
        wall = run_timed([sys.executable, "-m", "fednnunet.bench.site_epoch", dataset, "2d", "0", str(rounds),
                          str(iterations), str(val_iterations), device, str(measured)],
                         {**train_env, "nnUNet_results": str(results)}, work / f"nnunet-{i}.log", 7200)
        arms["nnunet"].append({"wall_s": wall, "epoch_s": logged_epoch_seconds(results),
                               "peak_rss_bytes": json.loads(measured.read_text())["peak_rss_bytes"]})

        out, results = work / f"federation-{i}", work / f"results-federation-{i}"
        wall = run_timed([console_script("fednnunet"), "run", "train", dataset, "2d", "0", "--rounds", str(rounds),
                          "--iterations-per-round", str(iterations), "--val-iterations", str(val_iterations),
                          "-device", device, "--skip-val", *da, "--validate-delivered-every", "0", "--out", str(out)],
                         {**train_env, "nnUNet_results": str(results)}, work / f"federation-{i}.log", 7200)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        site = json.loads((out / "result.json").read_text())["sites"][dataset]
        arms["federation"].append({"wall_s": wall, "epoch_s": logged_epoch_seconds(results),
                                   "site_epoch_s": [r["sites"][dataset]["epoch_seconds"] for r in records],
                                   "overhead_s": [r["overhead_seconds"] for r in records],
                                   "peak_rss_bytes": site["peak_rss_bytes"]})
    return summarize(arms, rounds=rounds, iterations=iterations, val_iterations=val_iterations, device=device,
                     da_workers=da_workers, work=str(work))


def summarize(arms: dict[str, list[dict[str, Any]]], **info: Any) -> dict[str, Any]:
    """Medians per arm and the federation/nnU-Net ratios (the issue's targets: 1.02, 1.10 and 1.2)."""
    def median_epoch(arm: str) -> float:
        return statistics.median(e for run in arms[arm] for e in run["epoch_s"])

    def median_of(arm: str, key: str) -> float:
        return statistics.median(run[key] for run in arms[arm])

    ratios = {"epoch_compute": median_epoch("federation") / median_epoch("nnunet"),
              "wall": median_of("federation", "wall_s") / median_of("nnunet", "wall_s"),
              "peak_memory": median_of("federation", "peak_rss_bytes") / median_of("nnunet", "peak_rss_bytes")}
    return {"ratios": ratios, "targets": {"epoch_compute": 1.02, "wall": 1.10, "peak_memory": 1.2},
            "epoch_s_median": {arm: median_epoch(arm) for arm in arms},
            "wall_s_median": {arm: median_of(arm, "wall_s") for arm in arms},
            "peak_rss_mb_median": {arm: median_of(arm, "peak_rss_bytes") / 2**20 for arm in arms},
            "overhead_s_median": statistics.median(o for run in arms["federation"] for o in run["overhead_s"]),
            "runs": arms, **info}


def format_site_epoch(result: dict[str, Any]) -> str:
    da = "nnU-Net's default" if result["da_workers"] is None else result["da_workers"]
    lines = [f"one synthetic 2D site on {result['device']}, {result['rounds']} epochs of {result['iterations']}+"
             f"{result['val_iterations']} iterations, nnUNet_n_proc_DA {da}, {len(result['runs']['nnunet'])} run(s) "
             "per arm (alternating)",
             "arm          epoch_s  wall_s  peak_MB"]
    for arm in ("nnunet", "federation"):
        lines.append(f"{arm:<11} {result['epoch_s_median'][arm]:8.2f} {result['wall_s_median'][arm]:7.1f} "
                     f"{result['peak_rss_mb_median'][arm]:8.0f}")
    r, t = result["ratios"], result["targets"]
    lines.append("federation / nnU-Net: " + ", ".join(
        f"{key} {r[key]:.3f} (target <= {t[key]})" for key in r))
    lines.append(f"federation overhead per round (median): {result['overhead_s_median']:.2f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the nnU-Net arm of `fednnunet bench site-epoch`")
    for name in ("dataset", "configuration", "fold", "epochs", "iterations", "val_iterations", "device", "out"):
        parser.add_argument(name)
    args = parser.parse_args(argv)
    _nnunet_arm(args.dataset, args.configuration, args.fold, int(args.epochs), int(args.iterations),
                int(args.val_iterations), args.device, Path(args.out))


if __name__ == "__main__":
    main()
