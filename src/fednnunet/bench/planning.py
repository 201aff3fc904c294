"""Federated vs. local planning time (issue 6, item 3).

``fednnunet run plan_and_preprocess "<ids>" -c 2d -np 1`` on K synthetic sites (a real one-machine
federation: SuperLink, SuperNodes, site workers, federated fingerprint) against nnU-Net's own
``nnUNetv2_plan_and_preprocess -d ID -c 2d -np 1`` run for each site alone, one after the other, on a second
copy of the same raw data with its own ``nnUNet_preprocessed``; the slowest site is the reference. Both are
timed as subprocesses (wall clock, process start-up and imports included) on the same machine in the same run.

Read the ratio with the machine in mind: the federation runs the K sites' planning *concurrently* on this
one machine, while each local run has the machine to itself. With K sites on fewer than K cores the
federated figure includes CPU contention that a real federation (one machine per site) does not have;
``sum_local_s`` (all local runs back to back) and ``cpu_count`` are returned so this can be judged, and
``concurrent_local_s``: the K local runs started at once, i.e. the same contention without the federation, so
``ratio_vs_concurrent`` is the federation's own cost (with one site that is the local run itself).

By default the sites are the synthetic demo sites (small: local planning takes ~20 s, so the federation's fixed
cost weighs heavily); ``raw``/``datasets`` bench existing nnU-Net raw datasets instead, e.g. the real retina sites.
Both sides get the same process counts: ``-np`` for preprocessing and ``-npfp`` for the fingerprint.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

from fednnunet.bench.common import console_script, nnunet_env, run_concurrently, run_timed

__all__ = ["bench_planning", "format_planning"]


def _dataset_folder(raw: Path, dataset: str) -> Path:
    """``raw``'s folder of a dataset given by id (``"950"``) or full name (``"Dataset950_DRIVE"``)."""
    if dataset.startswith("Dataset"):
        folder = raw / dataset
        found = [folder] if folder.is_dir() else []
    elif dataset.isdigit():
        found = sorted(raw.glob(f"Dataset{int(dataset):03d}_*"))
    else:
        raise ValueError(f"dataset {dataset!r}: give an id (950) or a folder name (Dataset950_DRIVE)")
    if len(found) != 1:
        raise FileNotFoundError(f"dataset {dataset!r}: expected one folder for it in {raw}, found {len(found)}")
    return found[0]


def bench_planning(sites: int = 3, work: Path | str | None = None, seed: int = 0, *, first_id: int = 901,
                   raw: Path | str | None = None, datasets: Sequence[str] = (),
                   configuration: str = "2d", num_processes: int = 1, warmup: bool = True,
                   timeout_s: float = 1800.0) -> dict[str, Any]:
    """Time federated planning of ``sites`` synthetic 2D sites (or of ``datasets`` found in the nnU-Net raw folder
    ``raw``, which is only read) against each site's local nnU-Net planning.

    ``work`` must be a new or empty folder (default: a temporary folder, removed afterwards); it gets
    ``federated/``, ``local/`` and ``concurrent/`` (each with its own ``nnUNet_raw``, ``nnUNet_preprocessed``,
    ``nnUNet_results``) and ``logs/`` with every command's output. ``warmup`` first imports torch, nnU-Net
    and Flower once in a throwaway process, so neither side pays for a cold file cache.

    Returns ``federated_s``, ``slowest_local_s``, ``ratio`` (= federated_s / slowest_local_s),
    ``per_site_local_s`` ({dataset id: seconds}), and for context ``concurrent_local_s``,
    ``ratio_vs_concurrent``, ``sum_local_s``, ``sites``, ``datasets`` (folder names), ``cpu_count``, ``commands``
    and ``work``.
    """
    from fednnunet.data.synthetic import write_demo_federation

    if raw is not None:
        if not datasets:
            raise ValueError("with raw, name the datasets to bench (ids or DatasetNNN_Name)")
        sources = [_dataset_folder(Path(raw), str(d)) for d in datasets]
        sites = len(sources)
    elif datasets:
        raise ValueError("datasets need raw: the nnU-Net raw folder that holds them")
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites!r}")
    cleanup = work is None
    root = Path(tempfile.mkdtemp(prefix="fednnunet-bench-planning-") if work is None else work).resolve()
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty: the planning benchmark needs a fresh folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        logs = root / "logs"
        logs.mkdir()
        fed_env, local_env = nnunet_env(root / "federated"), nnunet_env(root / "local")
        concurrent_env = nnunet_env(root / "concurrent")
        if raw is None:
            ids = [str(first_id + i) for i in range(sites)]
            write_demo_federation(Path(fed_env["nnUNet_raw"]), first_id=first_id, sites=sites, dim=2, seed=seed)
            sources = sorted(Path(fed_env["nnUNet_raw"]).iterdir())
        else:
            ids = [str(int(folder.name[len("Dataset"):len("Dataset") + 3])) for folder in sources]
            for folder in sources:
                shutil.copytree(folder, Path(fed_env["nnUNet_raw"]) / folder.name)
        for folder in sources:  # the same raw data, separate copies (nnU-Net reuses a fingerprint it finds)
            for env in (local_env, concurrent_env):
                shutil.copytree(folder, Path(env["nnUNet_raw"]) / folder.name)

        if warmup:
            run_timed([sys.executable, "-c", "import torch, flwr, nnunetv2.experiment_planning.plan_and_preprocess_api"],
                   local_env, logs / "warmup.log", timeout_s)

        fed_cmd = [console_script("fednnunet"), "run", "plan_and_preprocess", " ".join(ids), "-c", configuration,
                   "-np", str(num_processes), "--out", str(root / "federated" / "run")]
        federated_s = run_timed(fed_cmd, fed_env, logs / "federated.log", timeout_s)

        per_site: dict[str, float] = {}
        local_cmds = []
        for ds in ids:
            cmd = [console_script("nnUNetv2_plan_and_preprocess"), "-d", ds, "-c", configuration,
                   "-np", str(num_processes), "-npfp", str(num_processes)]
            local_cmds.append(cmd)
            per_site[ds] = run_timed(cmd, local_env, logs / f"local_{ds}.log", timeout_s)

        slowest = max(per_site.values())
        if sites == 1:  # one run started "at once" is the run alone: not run twice
            concurrent_s = slowest
        else:
            concurrent_s = run_concurrently(
                [(cmd, logs / f"concurrent_{ds}.log") for ds, cmd in zip(ids, local_cmds)], concurrent_env, timeout_s)
        return {
            "federated_s": federated_s,
            "slowest_local_s": slowest,
            "ratio": federated_s / slowest,
            "concurrent_local_s": concurrent_s,
            "ratio_vs_concurrent": federated_s / concurrent_s,
            "per_site_local_s": per_site,
            "sum_local_s": sum(per_site.values()),
            "sites": sites,
            "datasets": [folder.name for folder in sources],
            "cpu_count": os.cpu_count(),
            "commands": {"federated": " ".join(fed_cmd), "local": [" ".join(c) for c in local_cmds]},
            "work": None if cleanup else str(root),
        }
    finally:
        if cleanup:
            shutil.rmtree(root, ignore_errors=True)


def format_planning(result: Mapping[str, Any]) -> str:
    """A few human-readable lines for a :func:`bench_planning` result."""
    per_site = ", ".join(f"{ds}: {s:.1f} s" for ds, s in result["per_site_local_s"].items())
    return (f"federated plan_and_preprocess ({result['sites']} sites, one machine, {result['cpu_count']} CPUs): "
            f"{result['federated_s']:.1f} s\n"
            f"local nnUNetv2_plan_and_preprocess per site: {per_site}; slowest {result['slowest_local_s']:.1f} s, "
            f"all back to back {result['sum_local_s']:.1f} s\n"
            f"all {result['sites']} local runs at once on this machine (the federation's CPU contention): "
            f"{result['concurrent_local_s']:.1f} s\n"
            f"ratio federated / slowest local: {result['ratio']:.2f}; federated / all local at once: "
            f"{result['ratio_vs_concurrent']:.2f}")
