"""The site worker's SIGTERM handling with nnU-Net's forked process pools (no nnU-Net needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

_POOL_LOOP = textwrap.dedent("""
    import multiprocessing, sys
    from fednnunet.site.worker import SiteWorker, install_sigterm_handling

    def identity(x):
        return x

    install_sigterm_handling(SiteWorker("901", "901"))
    for _ in range(int(sys.argv[1])):
        with multiprocessing.get_context("fork").Pool(4) as pool:  # as nnU-Net's file listing does
            pool.map(identity, range(2))  # leaving the block stops the pool's workers with SIGTERM
    print("done")
""")


def test_forked_pools_stop_under_the_workers_sigterm_handler() -> None:
    """A pool stopped right after it started must not hang: a worker that only reset the handler in the child
    lost SIGTERMs that arrived in between, and such a loop hung within 1500 pool starts (this takes ~15 s)."""
    proc = subprocess.Popen([sys.executable, "-c", _POOL_LOOP, "1000"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # with the hung pool workers
    assert proc.returncode == 0 and out.strip() == "done", out
