"""The benchmark commands that run whole federations, at their smallest (`make test-long`; about two minutes):
`fednnunet bench overhead` (one site, two rounds of the tiny model, then Flower's floor with one SuperNode) and
`fednnunet bench planning` (one synthetic site: a federated and a local planning). They run and print their
keys; they are not benchmarks themselves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FEDNNUNET = str(Path(sys.executable).parent / "fednnunet")


def test_bench_planning_command_runs_and_prints_its_keys(tmp_path):
    res = subprocess.run([FEDNNUNET, "bench", "planning", "--sites", "1", "--json", "--work", str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(res.stdout)
    assert {"federated_s", "slowest_local_s", "ratio", "concurrent_local_s", "ratio_vs_concurrent",
            "per_site_local_s"} <= set(result)
    assert result["sites"] == 1 and list(result["per_site_local_s"]) == ["901"]
    assert result["ratio"] == pytest.approx(result["federated_s"] / result["slowest_local_s"])
    assert result["concurrent_local_s"] == result["slowest_local_s"]  # one site: the local run is not repeated
    # both sides really planned: each root holds its own plans
    for side in ("federated", "local"):
        assert (tmp_path / "w" / side / "nnUNet_preprocessed" / "Dataset901_SiteA" / "nnUNetPlans.json").is_file()


def test_bench_overhead_command_runs_a_federation_and_prints_its_keys(tmp_path: Path) -> None:
    res = subprocess.run([FEDNNUNET, "bench", "overhead", "--sites", "1", "--rounds", "2", "--model", "tiny",
                          "--json", "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout)
    assert {"overhead_s_median", "round_s_median", "compute_s_median", "bytes_per_site_per_round",
            "model_bytes", "breakdown_s_median"} <= set(result)
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert 0 < result["compute_s_median"] < result["round_s_median"]
    assert result["overhead_s_median"] == pytest.approx(result["round_s_median"] - result["compute_s_median"],
                                                        abs=1.0)
    # one download and one upload of the de-duplicated float32 model per site per round (packing adds < 0.1 %)
    assert 2.0 <= result["bytes_per_site_per_round"] / result["model_bytes"] < 2.01
    # Flower's floor ran in the same run: as many SuperNodes, the round's download as payload, two timed rounds
    floor = result["floor"]
    assert floor["sites"] == 1 and len(floor["round_s"]) == 2 and floor["round_s_median"] > 0
    assert result["model_bytes"] <= floor["payload_bytes"] < 1.01 * result["model_bytes"]
    assert result["overhead_above_floor_s"] == pytest.approx(result["overhead_s_median"] - result["floor_s_median"])
