"""Sampling ahead: a site analyses its cases with its own case count after the describe reply; the pooled
count's samples must then be exactly a prefix of those (one channel), and the worker must use them only then.

Runs in a subprocess because nnU-Net reads its folders from the environment at import.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import nnunet_env

_SCRIPT = textwrap.dedent("""
    import numpy as np
    from fednnunet.fingerprint.site_samples import CaseAnalysis
    from fednnunet.protocol.envelope import request_body
    from fednnunet.protocol.messages import Describe, FingerprintSample, SampleAhead
    from fednnunet.site.worker import SiteWorker

    def same_cases(a, b):
        return all(x.case == y.case and x.shape_after_crop == y.shape_after_crop and x.spacing == y.spacing
                   and x.relative_size == y.relative_size and len(x.samples) == len(y.samples)
                   and all(np.array_equal(s, t) for s, t in zip(x.samples, y.samples))
                   for x, y in zip(a.cases, b.cases, strict=True))

    # one channel: the first n of N samples are nnU-Net's n-sample draw
    big, small = CaseAnalysis.run("A", "Dataset901_SiteA", 4000), CaseAnalysis.run("A", "Dataset901_SiteA", 1500)
    assert big.reusable_for(1500) and big.reusable_for(4000) and not big.reusable_for(4001)
    assert same_cases(big.truncated(1500), small)
    assert not same_cases(big, CaseAnalysis.run("A", "Dataset901_SiteA", 3999))  # the comparison can fail

    # two channels: the second channel's draws start after the first's, so a prefix is not nnU-Net's draw
    big2, small2 = CaseAnalysis.run("B", "Dataset905_TwoChannels", 4000), CaseAnalysis.run("B", "Dataset905_TwoChannels", 1500)
    assert not big2.reusable_for(1500)
    assert all(np.array_equal(x.samples[0][:1500], y.samples[0]) for x, y in zip(big2.cases, small2.cases))
    assert any(not np.array_equal(x.samples[1][:1500], y.samples[1]) for x, y in zip(big2.cases, small2.cases))

    # the worker: sampling ahead after describe gives the same sampling reply as sampling on request
    def sample_reply(dataset, ahead):
        worker = SiteWorker("A", dataset)
        described, _ = worker.handle(request_body(Describe(task="", sample_ahead=SampleAhead(num_processes=1)
                                                           if ahead else None)), {})
        assert described["ok"], described
        worker.run_after_reply()
        used_ahead = worker.sampled_ahead is not None
        reply, arrays = worker.handle(request_body(FingerprintSample(global_num_cases=20000)), {})
        assert reply["ok"], reply
        assert worker.sampled_ahead is None
        return used_ahead, reply["result"]["summary"], arrays

    for dataset, expect_ahead in (("Dataset901_SiteA", True), ("Dataset905_TwoChannels", False)):
        used, summary, arrays = sample_reply(dataset, True)
        used_on_request, summary_on_request, arrays_on_request = sample_reply(dataset, False)
        assert used is expect_ahead and not used_on_request, dataset
        assert summary == summary_on_request, dataset
        assert arrays.keys() == arrays_on_request.keys()
        assert all(np.array_equal(arrays[k], arrays_on_request[k]) for k in arrays), dataset
    print("ok")
""")


def test_samples_taken_ahead_equal_nnunets_draw_for_the_pooled_count(tmp_path: Path) -> None:
    from fednnunet.data.synthetic import write_demo_federation

    env = nnunet_env(tmp_path)
    raw = Path(env["nnUNet_raw"])
    (src,) = write_demo_federation(raw, first_id=901, sites=1, dim=2, seed=0)
    two = raw / "Dataset905_TwoChannels"
    shutil.copytree(src, two)
    for image in sorted((two / "imagesTr").glob("*_0000.nii.gz")):
        shutil.copy(image, image.with_name(image.name.replace("_0000.", "_0001.")))
    dataset_json = json.loads((two / "dataset.json").read_text())
    dataset_json["channel_names"] = {"0": "MRI", "1": "MRI copy"}
    (two / "dataset.json").write_text(json.dumps(dataset_json))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]
