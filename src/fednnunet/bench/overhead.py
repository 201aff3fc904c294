"""Per-round overhead of a real federation on loopback: what a round costs beyond the slowest site's epoch.

A federation of ``sites`` synthetic 2D sites is planned with FFE and trained for ``rounds`` rounds through the
same ``fednnunet run`` commands a user types (real SuperLink, SuperNodes, site workers, persistent trainers).
The figures come from the server's ``metrics.jsonl``: the round's wall time (send, epoch, reply, validation of
the updates, aggregation), the slowest site's epoch compute time as measured at the site, their difference
(overhead), and the array bytes sent to and received from each site during the round.

``model="30m"``: the same 2D plans with every stage twice as wide (a custom nnU-Net plans file,
``nnUNetPlans30M``), which makes the U-Net about 31 M parameters, the size of a 3d_fullres nnU-Net, while the
compute per iteration stays small enough for a CPU.

The engine's floor is measured in the same run (``floor=True``, :mod:`fednnunet.bench.flower_floor`): the same
number of SuperNodes exchanging the same bytes per round through Flower with no work at all. Overhead above the
floor is what the federation adds to Flower's own cost.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from fednnunet.bench.common import console_script, nnunet_env, run_timed

LARGE_PLANS = "nnUNetPlans30M"


def write_large_plans(preprocessed_dataset: Path, configuration: str = "2d") -> str:
    """Derive ``nnUNetPlans30M.json`` from the dataset's ``nnUNetPlans.json`` (same data, 2x the features)."""
    plans = json.loads((preprocessed_dataset / "nnUNetPlans.json").read_text())
    plans["plans_name"] = LARGE_PLANS
    arch = plans["configurations"][configuration]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [2 * f for f in arch["features_per_stage"]]
    (preprocessed_dataset / f"{LARGE_PLANS}.json").write_text(json.dumps(plans, indent=2))
    return LARGE_PLANS


def bench_overhead(sites: int = 3, rounds: int = 3, model: str = "tiny", iterations: int = 2,
                   transfer_dtype: str = "float32", work: Path | None = None, floor: bool = True) -> dict[str, Any]:
    """Run the federation and return medians over rounds plus the per-round records (and Flower's floor)."""
    from fednnunet.bench.flower_floor import bench_flower_floor
    from fednnunet.data.synthetic import write_demo_federation

    if model not in ("tiny", "30m"):
        raise ValueError(f"model must be 'tiny' or '30m', got {model!r}")
    work = Path(work or tempfile.mkdtemp(prefix="fednnunet-bench-overhead-")).resolve()
    env = nnunet_env(work)  # training gets --da-workers 0 below
    fednnunet = console_script("fednnunet")
    ids = [str(901 + i) for i in range(sites)]
    if not any((work / "nnUNet_raw").glob("Dataset901_*")):
        write_demo_federation(work / "nnUNet_raw", first_id=901, sites=sites, dim=2, seed=0)
    run_timed([fednnunet, "run", "plan_and_preprocess", " ".join(ids), "-c", "2d", "--out", str(work / "plan")],
           env, work / "plan.log", 3600)
    plans = "nnUNetPlans"
    if model == "30m":
        for ds in sorted((work / "nnUNet_preprocessed").glob("Dataset9*")):
            plans = write_large_plans(ds)
    out = work / f"train-{model}-{transfer_dtype}"
    run_timed([fednnunet, "run", "train", " ".join(ids), "2d", "0", "-p", plans, "--rounds", str(rounds),
            "--iterations-per-round", str(iterations), "--val-iterations", "1", "--skip-val", "--da-workers", "0",
            "--transfer-dtype", transfer_dtype, "--validate-delivered-every", "0",  # transport only, as before
            "--out", str(out)], env, work / f"{out.name}.log", 3600)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = summarize(records, sites=sites, model=model, iterations=iterations, transfer_dtype=transfer_dtype,
                       work=work)
    if floor:
        download = statistics.median(b["sent"] for r in records for b in r.get("bytes", {}).values())
        engine = bench_flower_floor(sites, rounds, int(download), work / f"floor-{out.name}")
        result.update(floor=engine, floor_s_median=engine["round_s_median"],
                      overhead_above_floor_s=result["overhead_s_median"] - engine["round_s_median"])
    return result


#: Parts of a round's overhead, on the critical path (the site whose reply came last); see round_timing().
BREAKDOWN = ("prepare_s", "down_s", "site_extra_s", "up_s", "after_s", "gap_s")


def _breakdown(record: dict[str, Any], next_record: dict[str, Any] | None) -> dict[str, float]:
    """Split one round's overhead into server, Flower and site parts (NaN where the record lacks timings)."""
    timing = record.get("timing") or {}
    sites = timing.get("sites") or {}
    out = {key: float("nan") for key in BREAKDOWN}
    if sites:
        last = max(sites, key=lambda s: sites[s]["round_trip_s"])
        epoch = float(record["sites"].get(last, {}).get("epoch_seconds", 0.0))
        out.update(prepare_s=timing.get("prepare_s", float("nan")), after_s=timing.get("after_s", float("nan")),
                   down_s=sites[last].get("down_s", float("nan")), up_s=sites[last].get("up_s", float("nan")),
                   site_extra_s=sites[last]["site_s"] - epoch)
    if next_record is not None and "started_at" in next_record and "t" in record:
        out["gap_s"] = next_record["started_at"] - record["t"]  # server work between two rounds
    return out


def _median(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return statistics.median(finite) if finite else float("nan")


def summarize(records: list[dict[str, Any]], **info: Any) -> dict[str, Any]:
    """Medians over rounds of the per-round records written by the training server."""
    per_round = []
    for i, r in enumerate(records):
        per_site = [b["sent"] + b["received"] for b in r.get("bytes", {}).values()]
        per_round.append({
            "round": r["round"], "round_s": r["wall_seconds"], "overhead_s": r["overhead_seconds"],
            "compute_s": r["wall_seconds"] - r["overhead_seconds"],
            "bytes_per_site": statistics.median(per_site) if per_site else 0,
            **_breakdown(r, records[i + 1] if i + 1 < len(records) else None),
        })
    model_bytes = max(next(iter(records[-1].get("model_bytes", {"": 0}).values()), 0), 1)
    bytes_per_site = statistics.median(p["bytes_per_site"] for p in per_round)
    return {
        "overhead_s_median": statistics.median(p["overhead_s"] for p in per_round),
        "round_s_median": statistics.median(p["round_s"] for p in per_round),
        "compute_s_median": statistics.median(p["compute_s"] for p in per_round),
        "breakdown_s_median": {key: _median([p[key] for p in per_round]) for key in BREAKDOWN},
        "bytes_per_site_per_round": bytes_per_site,
        "model_bytes": model_bytes,
        "bytes_ratio": bytes_per_site / model_bytes,
        "params": model_bytes // 4,
        "rounds": per_round,
        **{k: str(v) if isinstance(v, Path) else v for k, v in info.items()},
    }


def format_overhead(result: dict[str, Any]) -> str:
    lines = [f"model {result['model']} ({result['params'] / 1e6:.1f} M parameters, "
             f"{result['model_bytes'] / 1e6:.1f} MB), {result['sites']} sites, "
             f"{result['iterations']} iterations per round, {result.get('transfer_dtype', 'float32')} transfer",
             "round  wall_s  compute_s  overhead_s  MB/site"]
    for p in result["rounds"]:
        lines.append(f"{p['round']:>5}  {p['round_s']:6.2f}  {p['compute_s']:9.2f}  {p['overhead_s']:10.2f}  "
                     f"{p['bytes_per_site'] / 1e6:7.1f}")
    lines.append(f"median: round {result['round_s_median']:.2f} s, compute {result['compute_s_median']:.2f} s, "
                 f"overhead {result['overhead_s_median']:.2f} s; bytes per site per round "
                 f"{result['bytes_ratio']:.2f} x the model")
    parts = result.get("breakdown_s_median", {})
    lines.append("overhead on the critical path (medians): " + ", ".join(
        f"{key[:-2]} {value:.2f} s" for key, value in parts.items()))
    lines.append("  prepare/after: server before the push / after the last reply; down/up: Flower (node polling, "
                 "ClientApp start, transfer); site_extra: site work besides the epoch; gap: between rounds")
    if "floor" in result:
        floor = result["floor"]
        lines.append(f"Flower's floor (same nodes and bytes, no work): {floor['round_s_median']:.2f} s per round "
                     f"(" + " ".join(f"{t:.2f}" for t in floor["round_s"]) + "); overhead above it "
                     f"{result['overhead_above_floor_s']:.2f} s")
    return "\n".join(lines)
