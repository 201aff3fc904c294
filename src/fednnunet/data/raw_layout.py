"""Writing nnU-Net raw datasets all-or-none, shared by every dataset writer of the package.

A half-written dataset folder looks like a valid dataset to nnU-Net; so each dataset is built in a hidden
temporary folder beside its target and renamed into place only when all of them are complete.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence


def check_ids_free(out_dir: Path, ids: Sequence[int]) -> None:
    """Raise FileExistsError if any ``Dataset<id>_*`` already exists in ``out_dir``."""
    existing = [e.name for e in out_dir.iterdir()] if out_dir.exists() else []
    for dataset_id in ids:
        clash = sorted(n for n in existing if re.fullmatch(rf"Dataset{dataset_id:03d}_.+", n))
        if clash:
            raise FileExistsError(f"{out_dir / clash[0]} already exists (dataset id {dataset_id}); "
                                  "remove it or choose another first_id")


def write_raw_datasets(out_dir: Path, first_id: int, names: Sequence[str],
                       write: Callable[[int, Path], None]) -> list[Path]:
    """Create ``out_dir/Dataset<first_id + i>_<names[i]>`` with ``write(i, folder)`` for each i, all or none."""
    if not (1 <= first_id and first_id + len(names) - 1 <= 999):
        raise ValueError(f"dataset ids {first_id}..{first_id + len(names) - 1} are outside nnU-Net's range 1..999")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = [first_id + i for i in range(len(names))]
    check_ids_free(out_dir, ids)
    targets = [out_dir / f"Dataset{d:03d}_{name}" for d, name in zip(ids, names)]
    temps: list[Path] = []
    done: list[tuple[Path, Path]] = []
    try:
        for i, target in enumerate(targets):
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{target.name}_", dir=out_dir))
            temps.append(tmp)
            write(i, tmp / target.name)
        for tmp, target in zip(temps, targets):
            os.rename(tmp / target.name, target)  # atomic; fails rather than merging if the target appeared
            done.append((tmp, target))
    except BaseException:
        for tmp, target in done:
            os.rename(target, tmp / target.name)
        raise
    finally:
        for tmp in temps:
            shutil.rmtree(tmp, ignore_errors=True)
    return targets
