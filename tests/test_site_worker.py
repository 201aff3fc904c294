"""The site worker's SIGTERM handling: nnU-Net's forked process pools, and work after a reply (no nnU-Net needed)."""

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


_AFTER_REPLY = textwrap.dedent("""
    import os, signal, sys, time
    from fednnunet.site.worker import SiteWorker, install_sigterm_handling

    worker = SiteWorker("901", "901")
    install_sigterm_handling(worker)

    def work():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        print("finished", flush=True)

    worker.after_reply(work, stop_waits=sys.argv[1] == "defer")
    worker.run_after_reply()
    print("survived", flush=True)
""")


def test_sigterm_waits_for_a_checkpoint_write_but_not_for_sampling_ahead() -> None:
    """Work after a reply either defers a SIGTERM until it is done (a checkpoint write must not be torn) or is
    abandoned at once (sampling ahead is only a head start); either way the worker then dies of SIGTERM."""
    for mode, expected in (("defer", "finished"), ("abandon", "")):
        proc = subprocess.run([sys.executable, "-c", _AFTER_REPLY, mode], capture_output=True, text=True, timeout=60)
        assert proc.returncode == -signal.SIGTERM and proc.stdout.strip() == expected, (mode, proc)
