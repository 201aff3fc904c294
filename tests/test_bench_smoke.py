"""Smoke tests of the benchmarks (issue 6): they run and return their keys. Not benchmarks themselves.

The overhead and planning commands run whole federations: they are in tests_long/test_bench_commands.py
(`make test-long`); `fednnunet bench site-epoch` runs in tests/test_gpu_check.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fednnunet.aggregation import ModelSpec, StreamingAsymAverager, asym_fedavg
from fednnunet.bench import bench_aggregate, bench_planning, format_aggregate_table, model_shapes
from fednnunet.bench.aggregate import _random_update

FEDNNUNET = str(Path(sys.executable).parent / "fednnunet")
KEYS = {"aggregate_s", "copy_s", "ratio", "peak_mb", "update_mb", "mode", "sites", "inputs_held_mb", "server_mb"}


def test_bench_aggregate_runs_and_returns_its_keys():
    rows = bench_aggregate(sites=(2, 3), params=2e5, repeats=1)
    assert [(r["mode"], r["sites"]) for r in rows] == [("ffe", 2), ("ffe", 3), ("asym_stream", 2),
                                                        ("asym_stream", 3), ("asym", 2), ("asym", 3)]
    for row in rows:
        assert KEYS <= row.keys()
        assert row["aggregate_s"] > 0 and row["copy_s"] > 0 and math.isfinite(row["ratio"])
        assert row["first_round_s"] > 0 and row["steady_peak_mb"] <= row["peak_mb"] + 0.1
        assert row["update_mb"] == pytest.approx(row["params"] * 4 / 1e6)
        # the aggregator holds at least its result or the updates it still needs (one update's worth)
        assert row["peak_mb"] >= row["update_mb"]
        assert row["server_mb"] >= row["peak_mb"]
    for row in rows[:4]:  # streaming: one update in flight, whatever K
        assert row["inputs_held_mb"] == pytest.approx(row["update_mb"])
    asym = [r for r in rows if r["mode"] != "ffe"]
    assert all(r["variant_sites"] >= 1 and 0 < r["min_fraction_averaged"] < 1 for r in asym)
    table = format_aggregate_table(rows)
    assert len(table.splitlines()) == len(rows) + 1 and "ratio" in table


def test_bench_aggregate_bad_arguments():
    with pytest.raises(ValueError):
        bench_aggregate(sites=(2,), params=1e5, modes=("nope",))
    with pytest.raises(ValueError):
        bench_aggregate(sites=(0,), params=1e5)


def test_model_shapes_look_like_nnunet():
    shapes = model_shapes(30e6)
    assert len(shapes) == 108
    assert sum(math.prod(s) for s in shapes.values()) == pytest.approx(30e6, rel=0.01)
    variant = model_shapes(30e6, variant=True)
    assert variant.keys() == shapes.keys()
    assert 0 < sum(shapes[n] != variant[n] for n in shapes) < 12


def test_streaming_asym_on_bench_networks_matches_asym_fedavg():
    """The bench's two network variants through StreamingAsymAverager give asym_fedavg's result, bitwise."""
    a = _random_update(model_shapes(2e4), seed=1)
    b = _random_update(model_shapes(2e4, variant=True), seed=2)
    updates = {"s0": a, "s1": {n: v + 1 for n, v in a.items()}, "s2": b}
    weights = {"s0": 1.0, "s1": 3.0, "s2": 2.0}
    for scope in ("all", "any"):
        expected, _ = asym_fedavg(updates, weights, scope)
        agg = StreamingAsymAverager({s: ModelSpec.of(u) for s, u in updates.items()}, scope)
        for s, u in updates.items():
            agg.add(s, u, weights[s])
        got, _ = agg.result()
        for s in updates:
            assert list(got[s]) == list(expected[s])
            for name, arr in got[s].items():
                assert arr.tobytes() == expected[s][name].tobytes()


def test_bench_planning_refuses_a_used_folder(tmp_path):
    (tmp_path / "something").write_text("x")
    with pytest.raises(FileExistsError):
        bench_planning(sites=2, work=tmp_path)


def test_bench_planning_checks_its_datasets_before_any_work(tmp_path):
    raw = tmp_path / "raw"
    (raw / "Dataset950_A").mkdir(parents=True)
    work = tmp_path / "work"
    with pytest.raises(ValueError, match="name the datasets"):
        bench_planning(raw=raw, work=work)
    with pytest.raises(ValueError, match="need raw"):
        bench_planning(datasets=["950"], work=work)
    with pytest.raises(FileNotFoundError, match="dataset '951'"):
        bench_planning(raw=raw, datasets=["950", "951"], work=work)
    with pytest.raises(ValueError, match="give an id"):
        bench_planning(raw=raw, datasets=["DRIVE"], work=work)
    assert not work.exists()


def test_bench_aggregate_command_prints_json_keys():
    res = subprocess.run([FEDNNUNET, "bench", "aggregate", "--sites", "2",
                          "--params", "1e5", "--repeats", "1", "--modes", "ffe", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    (row,) = json.loads(res.stdout)
    assert {"aggregate_s", "copy_s", "ratio", "peak_mb", "update_mb"} <= set(row)


def test_overhead_summary_from_server_records():
    from fednnunet.bench.overhead import summarize

    records = [{"round": r, "wall_seconds": 10.0 + r, "overhead_seconds": 4.0 + r,
                "bytes": {"a": {"sent": 100, "received": 100}, "b": {"sent": 100, "received": 104}},
                "model_bytes": {"global": 100}} for r in (1, 2, 3)]
    s = summarize(records, sites=2, model="tiny", iterations=2)
    assert s["overhead_s_median"] == 6.0 and s["round_s_median"] == 12.0 and s["compute_s_median"] == 6.0
    assert s["bytes_per_site_per_round"] == 202 and s["model_bytes"] == 100 and s["bytes_ratio"] == 2.02


def test_overhead_breakdown_follows_the_last_reply() -> None:
    """The critical path of a round is the site whose reply came last; gaps are measured between rounds."""
    from fednnunet.bench.overhead import summarize
    from fednnunet.protocol.messages import TrainRoundReply
    from fednnunet.training.progress import round_timing

    def record(r: int, start: float) -> dict:
        # pushed 0.5 s after the round started; site a answers after 4 s, site b after 6 s (its epoch: 3 s)
        replies = {"a": (TrainRoundReply(metrics={}, seconds=2.0, received_at=start + 1.5, replied_at=start + 3.5), {}),
                   "b": (TrainRoundReply(metrics={}, seconds=3.5, received_at=start + 2.0, replied_at=start + 5.5), {})}
        times = {"a": (start + 0.5, start + 4.5), "b": (start + 0.5, start + 6.5)}
        timing = round_timing(start, start + 7.0, replies, times)
        return {"round": r, "started_at": start, "t": start + 7.2, "wall_seconds": 7.0, "overhead_seconds": 4.0,
                "sites": {"a": {"epoch_seconds": 1.8}, "b": {"epoch_seconds": 3.0}}, "timing": timing,
                "bytes": {}, "model_bytes": {"global": 1}}

    s = summarize([record(1, 100.0), record(2, 107.5)], sites=2, model="tiny", iterations=2)
    parts = s["breakdown_s_median"]
    assert parts["prepare_s"] == pytest.approx(0.5) and parts["after_s"] == pytest.approx(0.5)
    assert parts["down_s"] == pytest.approx(1.5) and parts["up_s"] == pytest.approx(1.0)
    assert parts["site_extra_s"] == pytest.approx(0.5)
    assert parts["gap_s"] == pytest.approx(0.3)  # only round 1 has a next round
