"""Digests of everything a seeded federation produces, to show that a change leaves seeded runs bit for bit as
they were: run it on two checkouts and diff the output (``scripts/seeded_digests.sh OLD NEW``).

Digested: every merged/site fingerprint and plans file, every site's preprocessed arrays, and for each trained
model the network weights and optimizer state of ``checkpoint_final.pth`` and the Dice of its validation
(``summary.json``), FFE and AsymFedAvg; and the find_best_configuration result. Timings, timestamps and the run's folder are left out.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch


def _tensor_digest(obj: object, h: "hashlib._Hash") -> None:
    if isinstance(obj, torch.Tensor):
        h.update(obj.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _tensor_digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensor_digest(v, h)
    else:
        h.update(repr(obj).encode())


def _json_digest(path: Path, root: Path) -> str:
    """A JSON file's digest with the run's folder left out (nnU-Net writes absolute paths into some files)."""
    return hashlib.sha256(path.read_text().replace(str(root), "<root>").encode()).hexdigest()


def digests(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    pre = root / "nnUNet_preprocessed"
    for f in sorted(pre.rglob("*.json")):
        out[str(f.relative_to(root))] = _json_digest(f, root)
    for f in sorted(pre.rglob("*.b2nd")) + sorted(pre.rglob("*.npz")) + sorted(pre.rglob("*.pkl")):
        out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    for ckpt in sorted((root / "nnUNet_results").rglob("checkpoint_final.pth")):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        for part in ("network_weights", "optimizer_state"):
            h = hashlib.sha256()
            _tensor_digest(state[part], h)
            out[f"{ckpt.relative_to(root)}:{part}"] = h.hexdigest()
    for summary in sorted((root / "nnUNet_results").rglob("validation/summary.json")):
        dice = json.loads(summary.read_text())["foreground_mean"]["Dice"]
        out[str(summary.relative_to(root))] = repr(np.float64(dice))
    for f in sorted((root / "nnUNet_results").rglob("inference_information.json")):
        out[str(f.relative_to(root))] = _json_digest(f, root)
    return out


if __name__ == "__main__":
    for key, value in digests(Path(sys.argv[1])).items():
        print(f"{value}  {key}")
