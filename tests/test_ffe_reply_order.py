"""The merged fingerprint does not depend on the order in which the sites' replies arrive.

Over Flower the replies come in the order the sites finish; the merge once followed it, so two runs of the same
federation could write fingerprints that differ in the order of the per-case lists and in the last digit of the
pooled standard deviation (seen with the seeded digests of issue 25). Real site workers, in process (the
protocol's envelope and JSON both ways), answered in two orders.

Runs in a subprocess because nnU-Net reads its folders from the environment at import.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import nnunet_env

_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from in_process import InProcessCaller
    from fednnunet.fingerprint.coordinator import FingerprintJob, run_fingerprint_job
    from fednnunet.site.worker import SiteWorker

    class Reversed(InProcessCaller):
        def try_call(self, requests, *args, **kwargs):
            replies, errors = super().try_call(requests, *args, **kwargs)
            return dict(reversed(list(replies.items()))), errors

    def fingerprint(caller_class):
        workers = {site: SiteWorker(site, dataset) for site, dataset in (("a", "931"), ("b", "932"), ("c", "933"))}
        caller = caller_class(workers)
        order = []
        original = caller.try_call
        def recording(requests, *args, **kwargs):
            replies, errors = original(requests, *args, **kwargs)
            order.append(list(replies))
            return replies, errors
        caller.try_call = recording
        outcome = run_fingerprint_job(caller, FingerprintJob(check_cases=False), lambda _: None, lambda _: None)
        return json.dumps(outcome.fingerprint), order

    plain, plain_order = fingerprint(InProcessCaller)
    reversed_, reversed_order = fingerprint(Reversed)
    assert plain_order[1] == ["a", "b", "c"] and reversed_order[1] == ["c", "b", "a"], (plain_order, reversed_order)
    assert plain == reversed_
    print("ok")
""")


def test_the_merged_fingerprint_is_the_same_whatever_order_the_replies_arrive_in(tmp_path: Path) -> None:
    from fednnunet.data.synthetic import write_demo_federation

    env = nnunet_env(tmp_path)
    write_demo_federation(Path(env["nnUNet_raw"]), first_id=931, sites=3, dim=2, seed=0)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(Path(__file__).parent)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
