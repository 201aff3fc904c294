"""Cost of a site's data checks against nnU-Net's own fingerprint extraction on the same data (issue 16).

Timed on the same datasets in one child process (nnU-Net reads its folders from the environment at import), after
one untimed pass that warms the file cache and the imports, in alternating order per repeat:

* ``file_checks``: the checks below nnU-Net's reader alone (:func:`fednnunet.fingerprint.file_checks.file_problems`
  on every image and label file, one process);
* ``site_check``: the whole check a site runs before its ``describe`` reply and ``fednnunet check`` runs
  (:func:`fednnunet.fingerprint.integrity.check_site_cases`: the file checks, then every case read with nnU-Net's
  reader, geometry, labels, NaN/Inf, warnings), with ``num_processes``;
* ``fingerprint``: nnU-Net's ``DatasetFingerprintExtractor(...).run()`` with the same ``num_processes`` (what
  ``nnUNetv2_extract_fingerprint`` runs; it starts a spawn pool even for one process, which it pays here too).

Datasets: the synthetic 3D demo sites (``fednnunet demo-data --dim 3``: tiny, so fixed costs dominate), with
``large_cases`` a synthetic CT-sized 3D site (float32 NIfTI, ``LARGE_SHAPE``), and existing nnU-Net raw datasets
(``raw``/``datasets``, only read), e.g. the real retina sites from ``fednnunet convert retina-vessels``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

from fednnunet.bench.common import nnunet_env

__all__ = ["bench_checks", "format_checks"]

LARGE_SHAPE = (160, 256, 256)  # numpy order (z, y, x): a CT-sized volume, 42 MB of float32
LARGE_ID = 979


def bench_checks(raw: Path | str | None = None, datasets: Sequence[str] = (), demo: bool = True,
                 large_cases: int = 0, num_processes: int = 1, repeats: int = 3, work: Path | str | None = None,
                 timeout_s: float = 3600.0) -> dict[str, Any]:
    """Time the checks and nnU-Net's fingerprint extraction per dataset; see the module docstring.

    Returns ``{"datasets": [{dataset, cases, files, mbytes, voxels, <step>_s: [per repeat], <step>_median_s,
    ratio_file_checks, ratio_site_check}], "num_processes", "repeats", "cpu_count"}``; the ratios are medians of
    the per-repeat ratios (check / fingerprint), with their min and max."""
    from fednnunet.data.synthetic import write_demo_federation

    cleanup = work is None
    root = Path(tempfile.mkdtemp(prefix="fednnunet-bench-checks-") if work is None else work).resolve()
    try:
        env = nnunet_env(root)
        ours = Path(env["nnUNet_raw"])
        names: list[str] = []
        if demo:
            names += [f.name for f in write_demo_federation(ours, first_id=970, sites=3, dim=3, seed=0)]
        if large_cases:
            names.append(_write_large_site(ours, large_cases))
        if raw is not None:  # read in place: a link into our raw folder
            for d in datasets:
                folder = _find(Path(raw), d)
                (ours / folder.name).symlink_to(folder.resolve())
                names.append(folder.name)
        cmd = [sys.executable, "-m", "fednnunet.bench.checks", str(num_processes), str(repeats), *names]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if out.returncode != 0:
            raise RuntimeError(f"the timing process failed:\n{out.stderr[-3000:]}")
        rows = json.loads(out.stdout.strip().splitlines()[-1])
        return {"datasets": rows, "num_processes": num_processes, "repeats": repeats, "cpu_count": os.cpu_count()}
    finally:
        if cleanup:
            shutil.rmtree(root, ignore_errors=True)


def _find(raw: Path, dataset: str) -> Path:
    found = [raw / dataset] if (raw / dataset).is_dir() else sorted(raw.glob(f"Dataset{int(dataset):03d}_*")) \
        if dataset.isdigit() else []
    if len(found) != 1:
        raise FileNotFoundError(f"dataset {dataset!r}: expected one folder for it in {raw}, found {len(found)}")
    return found[0]


def _write_large_site(raw: Path, cases: int) -> str:
    """A CT-sized synthetic 3D site: smooth background, noise and a spherical label per case (float32 NIfTI)."""
    import numpy as np
    import SimpleITK as sitk

    name = f"Dataset{LARGE_ID}_Large3D"
    folder = raw / name
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in LARGE_SHAPE)]
    for i in range(cases):
        rng = np.random.default_rng(i)
        center = [n * rng.uniform(0.35, 0.65) for n in LARGE_SHAPE]
        sphere = ((zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2) < (LARGE_SHAPE[0] / 5) ** 2
        image = (100 + 0.2 * yy + 0.1 * zz + 40 * sphere + rng.normal(0, 10, LARGE_SHAPE)).astype(np.float32)
        for array, path in ((image, f"imagesTr/large_{i:03d}_0000.nii.gz"),
                            (sphere.astype(np.uint8), f"labelsTr/large_{i:03d}.nii.gz")):
            img = sitk.GetImageFromArray(array)
            img.SetSpacing((0.8, 0.8, 1.5))
            sitk.WriteImage(img, str(folder / path), useCompression=True)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "numTraining": cases,
        "file_ending": ".nii.gz", "name": name}))
    return name


def _measure(num_processes: int, repeats: int, names: Sequence[str]) -> list[dict[str, Any]]:
    """In the child process: time the three steps on every dataset."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from fednnunet.fingerprint.file_checks import file_problems
    from fednnunet.fingerprint.integrity import check_site_cases

    rows = []
    for name in names:
        folder = join(nnUNet_raw, name)
        cases = get_filenames_of_train_images_and_targets(folder, load_json(join(folder, "dataset.json")))
        files = [f for c in cases.values() for f in [*c["images"], c["label"]]]

        def file_checks() -> None:
            bad = [p for f in files for p in file_problems(f)]
            if bad:
                raise RuntimeError(f"{name}: the bench needs intact data: {bad[:3]}")

        steps = {
            "file_checks": file_checks,
            "site_check": lambda: check_site_cases("bench", name, num_processes),
            "fingerprint": lambda: DatasetFingerprintExtractor(name, num_processes).run(overwrite_existing=True),
        }
        for step in steps.values():  # warm-up: file cache, imports, nnU-Net's first pool
            step()
        times: dict[str, list[float]] = {k: [] for k in steps}
        for r in range(repeats):
            for key in (list(steps) if r % 2 == 0 else list(reversed(steps))):
                t0 = time.perf_counter()
                steps[key]()
                times[key].append(time.perf_counter() - t0)
        row: dict[str, Any] = {"dataset": name, "cases": len(cases), "files": len(files),
                               "mbytes": sum(os.path.getsize(f) for f in files) / 1e6}
        for key, values in times.items():
            row[f"{key}_s"] = values
            row[f"{key}_median_s"] = statistics.median(values)
        for key in ("file_checks", "site_check"):
            ratios = [a / b for a, b in zip(times[key], times["fingerprint"])]
            row[f"ratio_{key}"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        rows.append(row)
    return rows


def format_checks(result: Mapping[str, Any]) -> str:
    """One line per dataset: seconds (median of the repeats) and the ratios to nnU-Net's fingerprint extraction."""
    lines = [f"data checks vs nnU-Net's fingerprint extraction (-np {result['num_processes']}, median of "
             f"{result['repeats']} repeats, {result['cpu_count']} CPUs; ratio median [min, max] over repeats)",
             f"{'dataset':<24} {'cases':>5} {'MB':>7} {'file checks':>11} {'site check':>10} {'fingerprint':>11} "
             f"{'file/fp':>18} {'site/fp':>18}"]
    for row in result["datasets"]:
        ratios = [f"{r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]"
                  for r in (row["ratio_file_checks"], row["ratio_site_check"])]
        lines.append(f"{row['dataset']:<24} {row['cases']:>5} {row['mbytes']:>7.1f} "
                     f"{row['file_checks_median_s']:>10.2f}s {row['site_check_median_s']:>9.2f}s "
                     f"{row['fingerprint_median_s']:>10.2f}s {ratios[0]:>18} {ratios[1]:>18}")
    return "\n".join(lines)


if __name__ == "__main__":  # the timing child of bench_checks: NUM_PROCESSES REPEATS DATASET...
    print(json.dumps(_measure(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])))
