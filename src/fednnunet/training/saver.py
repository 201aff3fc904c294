"""A round's results written in the background: the server state, the ``metrics.jsonl`` line, the plot.

Why a background thread: writing a 30 M-parameter model (and AsymFedAvg's one per site) with fsync and drawing the
plot take seconds that would otherwise sit between two rounds, while the sites wait for the next model.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from fednnunet.atomic_files import write_atomic
from fednnunet.training.progress import try_draw_progress
from fednnunet.training.state import save_state

__all__ = ["METRICS_FILE", "BackgroundSaver", "save_round", "write_metrics"]

Arrays = dict[str, np.ndarray]

METRICS_FILE = "metrics.jsonl"


class BackgroundSaver:
    """Runs one save at a time in a background thread, in round order.

    :meth:`wait` re-raises a failed save; the loop waits before it aggregates the next round (so arrays handed to a
    save are never changed under it) and before it finishes.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fednnunet-state")
        self._pending: Future[None] | None = None

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def save_round(out: Path, r: int, models: Mapping[str, Arrays], asym: bool, history: list[dict[str, Any]],
               extra: Mapping[str, Any], best: Mapping[str, Any] | None = None,
               best_models: Mapping[str, Arrays] | None = None, draw: bool = True) -> None:
    """Save the state after round ``r``, then append its record to ``metrics.jsonl``, then (``draw``) the plot."""
    save_state(out, r, models, asym, history, extra, best, best_models)
    with (out / METRICS_FILE).open("a") as f:  # after the state: a resumed run never repeats a line
        f.write(json.dumps(history[-1]) + "\n")
    if draw:
        try_draw_progress(out, history)


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """``metrics.jsonl`` rebuilt from a resumed state's history: it drops lines of a round that was not saved."""
    write_atomic(out / METRICS_FILE, "".join(json.dumps(h) + "\n" for h in history).encode())
