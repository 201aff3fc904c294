"""Helpers shared by the end-to-end tests."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

BIN = Path(sys.executable).parent
#: The synthetic 2D site that the site-trainer and prediction tests share (planned once per test session).
PLANNED_SITE_ID = 901


def nnunet_env(root: Path) -> dict[str, str]:
    """This process's environment with nnU-Net's three folders created under ``root`` (nnU-Net reads them at
    import, so tests hand them to subprocesses rather than importing nnunetv2 with other paths)."""
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(root / var)
        (root / var).mkdir(parents=True, exist_ok=True)
    return env


def trainer_env(root: Path, results: Path) -> dict[str, str]:
    """nnU-Net folders under ``root`` but results in ``results`` (so that tests sharing one planned site
    train into their own folders), set for a small CPU machine."""
    env = nnunet_env(root)
    results.mkdir(parents=True, exist_ok=True)
    env["nnUNet_results"] = str(results)
    env["nnUNet_def_n_proc"] = "1"  # validation/export worker pools
    env.pop("nnUNet_n_proc_DA", None)  # the planner calls torch.set_num_threads(nnUNet_n_proc_DA)
    env.pop("nnUNet_compile", None)
    return env


def run_logged(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> None:
    """Run ``cmd`` with its output in ``log``; fail with the log's tail."""
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed with {proc.returncode}; log tail:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def planned_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root whose nnUNet_raw / nnUNet_preprocessed hold Dataset901 planned by stock nnU-Net (2d)."""
    from fednnunet.data.synthetic import write_demo_federation

    root = tmp_path_factory.mktemp("planned_site")
    env = trainer_env(root, root / "nnUNet_results")
    write_demo_federation(root / "nnUNet_raw", first_id=PLANNED_SITE_ID, sites=1, dim=2, seed=0)
    run_logged([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(PLANNED_SITE_ID), "-c", "2d", "-np", "1",
                "-npfp", "1"], env, root / "plan.log", timeout=600)
    return root


@contextmanager
def own_run(server, timeout_s: float = 120.0) -> Iterator:  # noqa: ANN001 - a started fednnunet.federation.server_node.ServerNode
    """A run of the federation's app that ``server`` executes by handing the test its Grid: the test sends the
    sites operations itself (``FlowerSiteCaller(grid)``) through the real SuperLink, SuperNodes and workers."""
    from fednnunet.flower.app_bundle import app_dir

    grids: queue.Queue = queue.Queue()
    done = threading.Event()

    def work(grid) -> None:  # noqa: ANN001 - Flower's Grid
        grids.put(grid)
        done.wait()

    server.submit_app(app_dir(server.workdir), 'job-file=""', work)
    try:
        yield grids.get(timeout=timeout_s)
    finally:
        done.set()
