"""Seeds for reproducible training: one run seed, one stream per purpose (site, epoch, validation).

nnU-Net seeds nothing: its network initialisation draws from torch's global generator, and its data loading and
augmentation (``nnUNetDataLoader``, batchgeneratorsv2 transforms) from numpy's and torch's global generators of
the process that produces the batches. With ``nnUNet_n_proc_DA=0`` that is the training process itself, so
seeding these generators (plus Python's ``random``) at the right points makes a CPU run bit-for-bit repeatable.

Why a derived seed per purpose instead of one ``seed_everything(seed)`` at the start: every site must draw its
own stream (the same seed at every site would give every site the same patch positions and augmentations), and
reseeding at every epoch from ``(seed, site, epoch)`` makes the stream of one epoch independent of everything
before it: a resumed run, or a run that validates the delivered model every N rounds, draws exactly what an
uninterrupted run without that validation draws.
"""

from __future__ import annotations

import random
import zlib

import numpy as np

__all__ = ["derive_seed", "seed_everything"]


def derive_seed(seed: int, *keys: str | int) -> int:
    """A 32-bit seed for the stream named by ``keys`` (e.g. ``("site", "901")``) of the run seeded ``seed``.

    numpy's ``SeedSequence`` mixes the run seed and the keys (strings by their CRC-32), so streams of different
    keys or seeds are unrelated, and seeds S and S+1 give unrelated streams (benchmark repeats use S..S+R-1).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    words = [int(seed)] + [zlib.crc32(str(k).encode()) for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch's (CPU and every CUDA device)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
