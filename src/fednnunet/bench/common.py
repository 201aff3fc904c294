"""Helpers shared by the benchmarks that run the real commands as subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

NNUNET_DIRS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def console_script(name: str) -> str:
    """The console script ``name`` of this environment (next to the running python), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def nnunet_env(root: Path) -> dict[str, str]:
    """This process's environment with its own nnU-Net folders under ``root``.

    ``nnUNet_n_proc_DA`` is removed: nnU-Net's planner calls ``torch.set_num_threads`` with it, and the
    value 0 (the fastest for tiny CPU training) crashes planning. Removed for both runs so they see the
    same environment.
    """
    env = dict(os.environ)
    env.pop("nnUNet_n_proc_DA", None)
    for var in NNUNET_DIRS:
        path = root / var
        path.mkdir(parents=True, exist_ok=True)
        env[var] = str(path)
    return env


def run_timed(cmd: list[str], env: Mapping[str, str], log: Path, timeout_s: float) -> float:
    """Run ``cmd`` to completion (output to ``log``); return its wall time; raise if it fails."""
    return run_concurrently([(cmd, log)], env, timeout_s)


def run_concurrently(runs: list[tuple[list[str], Path]], env: Mapping[str, str], timeout_s: float) -> float:
    """Start every ``(cmd, log)`` at once and wait for all; return the wall time until the last one ended.

    Raises if any fails or if they do not all finish within ``timeout_s`` (the others are then killed).
    """
    t0 = time.perf_counter()
    procs = []
    try:
        for cmd, log in runs:
            with log.open("wb") as out:
                procs.append(subprocess.Popen(cmd, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL))
        for proc, (cmd, log) in zip(procs, runs):
            try:
                code = proc.wait(timeout=max(0.0, timeout_s - (time.perf_counter() - t0)))
            except subprocess.TimeoutExpired as err:
                raise RuntimeError(f"{' '.join(cmd)} did not finish in {timeout_s:.0f} s (log: {log})") from err
            if code != 0:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code} (log: {log}):\n{tail}")
        return time.perf_counter() - t0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


