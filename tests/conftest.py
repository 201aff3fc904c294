"""Helpers shared by the end-to-end tests."""

from __future__ import annotations

import os
from pathlib import Path


def nnunet_env(root: Path) -> dict[str, str]:
    """This process's environment with nnU-Net's three folders created under ``root`` (nnU-Net reads them at
    import, so tests hand them to subprocesses rather than importing nnunetv2 with other paths)."""
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(root / var)
        (root / var).mkdir(parents=True, exist_ok=True)
    return env
