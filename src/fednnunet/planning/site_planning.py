"""Plan and preprocess one site with stock nnU-Net, from a given (merged) fingerprint.

Two things make the plans of every site equal to planning on the pooled data:
- the merged fingerprint is the site's ``dataset_fingerprint.json``;
- the planner sees the *global* case count as ``numTraining``: nnU-Net caps the batch size at 5 % of the dataset's
  voxels via ``numTraining`` x median shape, so the local count would give every site its own batch size.
Nothing is left half-written: if planning or preprocessing fails, the previous fingerprint and plans are restored
(or removed when there were none).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from fednnunet.atomic_files import write_json_atomic

logger = logging.getLogger(__name__)

DEFAULT_PLANNER = "ExperimentPlanner"


@contextlib.contextmanager
def restore_on_failure(paths: Sequence[Path]) -> Iterator[None]:
    """Back up ``paths``; if the block fails, put the backups back (or delete files that did not exist)."""
    backups: dict[Path, Path | None] = {}
    tmpdir = Path(tempfile.mkdtemp(prefix="fednnunet-backup-"))
    try:
        for i, p in enumerate(paths):
            if p.exists():
                backups[p] = tmpdir / f"{i}"
                shutil.copy2(p, backups[p])
            else:
                backups[p] = None
        try:
            yield
        except BaseException:
            for p, b in backups.items():
                if b is None:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                else:
                    os.replace(b, p)
            raise
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def planner_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a stock nnU-Net planning step: ``nnUNet_n_proc_DA`` raised to 1 where it is below 1.

    Why: nnU-Net's planner calls ``torch.set_num_threads(nnUNet_n_proc_DA)``, which rejects the 0 that is best
    for training small CPU runs (and that the README suggests exporting). Planning uses the value for nothing
    else, so the plans are the same; training still reads the site's own setting.
    """
    out = dict(env)
    value = out.get("nnUNet_n_proc_DA")
    if value is not None and value.strip().lstrip("-").isdigit() and int(value) < 1:
        out["nnUNet_n_proc_DA"] = "1"
    return out


@contextlib.contextmanager
def positive_da_workers() -> Iterator[None]:
    """:func:`planner_env` for this process, around an in-process planner call; the site's setting is restored."""
    old = os.environ.get("nnUNet_n_proc_DA")
    if old is not None:
        os.environ["nnUNet_n_proc_DA"] = planner_env(os.environ)["nnUNet_n_proc_DA"]
    try:
        yield
    finally:
        if old is not None:
            os.environ["nnUNet_n_proc_DA"] = old


def preprocessed_folder(dataset_name: str) -> Path:
    from nnunetv2.paths import nnUNet_preprocessed

    if not nnUNet_preprocessed:
        raise ValueError("the environment variable nnUNet_preprocessed is not set")
    return Path(nnUNet_preprocessed) / dataset_name


def _planner_class(name: str) -> type:
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    if name == DEFAULT_PLANNER:
        return ExperimentPlanner
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), name,
                                      current_module="nnunetv2.experiment_planning")
    if cls is None:
        raise ValueError(f"experiment planner '{name}' not found in nnunetv2.experiment_planning")
    return cls


def plan_and_preprocess_site(
    dataset_name: str,
    fingerprint: dict | None,
    configurations: Sequence[str],
    *,
    planner: str = DEFAULT_PLANNER,
    gpu_memory_target_gb: float | None = None,
    num_processes: int = 1,
    global_num_cases: int | None = None,
    preprocess: bool = True,
) -> dict:
    """Write ``fingerprint`` (when given), plan with the global case count, preprocess ``configurations``.

    Returns the plans dict. ``fingerprint=None`` keeps the site's own (local, AsymFedAvg) fingerprint, which
    must already exist.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    folder = preprocessed_folder(dataset_name)
    fp_file = folder / "dataset_fingerprint.json"
    planner_cls = _planner_class(planner)
    kwargs: dict[str, Any] = {}
    if gpu_memory_target_gb is not None:
        kwargs["gpu_memory_target_in_gb"] = float(gpu_memory_target_gb)
    with restore_on_failure([fp_file]):
        if fingerprint is not None:
            write_json_atomic(fp_file, fingerprint)
        elif not fp_file.exists():
            raise FileNotFoundError(f"{fp_file} is missing: extract the fingerprint first")
        instance = planner_cls(dataset_name, **kwargs)
        plans_file = folder / f"{instance.plans_identifier}.json"
        with restore_on_failure([plans_file]):
            if global_num_cases is not None:
                # nnU-Net reads numTraining only to cap the batch size; the pooled dataset has this many cases.
                instance.dataset_json["numTraining"] = int(global_num_cases)
            with positive_da_workers():
                plans = instance.plan_experiment()
            if preprocess and configurations:
                preprocess_dataset(convert_dataset_name_to_id(dataset_name), instance.plans_identifier,
                                   list(configurations), [num_processes] * len(configurations),
                                   show_progress_bar=False)
    logger.info("%s: planned %s (plans %s)", dataset_name, ", ".join(configurations), plans_file)
    return plans


def extract_local_fingerprint(dataset_name: str, num_processes: int = 1) -> dict:
    """nnU-Net's own extraction on this site's data alone (AsymFedAvg: every site keeps its own plans)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    extractor = DatasetFingerprintExtractor(dataset_name, num_processes)
    extractor.show_progress_bar = False
    return extractor.run(overwrite_existing=True)
