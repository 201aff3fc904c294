"""scripts/gpu_check.sh stays working: its CPU path runs every step it runs on a GPU machine (FFE planning, a
two-site federated training, nnUNetv2_predict on the result, the site-epoch bench), tiny."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.long  # 2 min: the GPU machine's script, whose CPU path only shows that it runs
def test_gpu_check_script_cpu_path(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path)}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA"):
        env.pop(var, None)
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu"], env=env, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "nnUNetv2_predict on the federated model: 2 segmentations" in res.stdout, res.stdout
    site_epoch = json.loads((tmp_path / "out" / "site-epoch.json").read_text())
    assert set(site_epoch["ratios"]) == {"epoch_compute", "wall", "peak_memory"}
    assert site_epoch["device"] == "cpu" and site_epoch["peak_rss_mb_median"]["federation"] > 100
    assert len(json.loads((tmp_path / "out" / "result.json").read_text())["sites"]) == 2
