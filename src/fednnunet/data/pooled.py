"""Build the pooled (centralized) dataset of several sites: the reference FFE must match, and the centralized
baseline of the paper's protocol.

Cases are linked (not copied) under a site prefix so names stay unique; the pooled dataset.json takes the
shared fields of the first site and the total case count.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

from fednnunet.data.raw_layout import write_raw_datasets

logger = logging.getLogger(__name__)


def _dataset_folder(raw: Path, dataset_id: int | str) -> Path:
    matches = sorted(raw.glob(f"Dataset{int(dataset_id):03d}_*"))
    if not matches:
        raise FileNotFoundError(f"dataset {dataset_id} not found in {raw}")
    return matches[0]


def pool_datasets(raw: Path, dataset_ids: Sequence[int | str], pooled_id: int, name: str = "Pooled") -> Path:
    """Create ``raw/Dataset<pooled_id>_<name>`` holding every training case of ``dataset_ids``."""
    raw = Path(raw)
    total = 0

    def write(_: int, folder: Path) -> None:
        nonlocal total
        (folder / "imagesTr").mkdir(parents=True)
        (folder / "labelsTr").mkdir()
        base: dict | None = None
        for ds in dataset_ids:
            source = _dataset_folder(raw, ds)
            dj = json.loads((source / "dataset.json").read_text())
            base = base or dj
            ending = dj["file_ending"]
            prefix = f"s{int(ds)}_"
            for label in sorted((source / "labelsTr").glob(f"*{ending}")):
                case = label.name[: -len(ending)]
                os.symlink(label.resolve(), folder / "labelsTr" / f"{prefix}{label.name}")
                for img in sorted((source / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}")):
                    os.symlink(img.resolve(), folder / "imagesTr" / f"{prefix}{img.name}")
                total += 1
        assert base is not None
        pooled = {k: v for k, v in base.items() if k != "numTraining"}
        pooled.update(numTraining=total, name=name)
        (folder / "dataset.json").write_text(json.dumps(pooled, indent=2))

    (target,) = write_raw_datasets(raw, pooled_id, [name], write)
    logger.info("pooled %d cases of %s into %s", total, ", ".join(map(str, dataset_ids)), target)
    return target
