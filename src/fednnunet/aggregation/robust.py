"""A norm bound on each site's update (``--clip-update-norm C``): bounded influence for larger federations.

Why a norm bound and not a coordinate-wise median or trimmed mean: the server adds every update to a streaming
average as it arrives (``StreamingAverager``: memory independent of the number of sites); a median or a trimmed
mean needs all K updates of a round in memory at once (K x the model). Clipping works on one update at a time:
a site's *update* -- its change ``x - g`` from the model ``g`` this server sent it this round -- is scaled down
to L2 norm ``C`` when it is longer::

    x' = g + (x - g) * min(1, C / ||x - g||)

The norm is taken over every floating-point array of the update together (with ``--momentum average`` the
momentum buffers' change counts too; integer buffers are left alone). Then FedAvg averages the clipped updates
with the sites' weights, so one site moves the global model by at most ``p_i * C`` per round (``p_i``: its share
of the weights, which the coordinator fixes at ``train_init`` from counts bounded by the federation's plan, see
``site_weights.py``), whatever it sends. Honest updates shorter than ``C`` are unchanged: the maths is plain
FedAvg. ``C`` is in the weights' own units; the round record lists every site's update norm (``update_norms``),
so a first run with a generous bound shows the scale of honest updates.

Pure numpy, no Flower: tested without a network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["check_max_norm", "clip_update", "update_norm"]

Update = dict[str, np.ndarray]

_CHUNK = 1 << 20  # elements per block: the difference is formed block by block (no model-sized temporary)


def check_max_norm(max_norm: float) -> float:
    """``max_norm`` as a float; a finite number > 0 (``ValueError`` otherwise)."""
    if isinstance(max_norm, (bool, np.bool_)):
        raise ValueError("the update norm bound must be a number, not a bool")
    value = float(max_norm)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"the update norm bound must be a finite number > 0, got {max_norm!r}")
    return value


def update_norm(update: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``update - base`` over the floating-point arrays of ``update`` (summed in float64).

    ``update`` and ``base`` have the same names and shapes (validated before: ``validate_update``)."""
    total = 0.0
    for name, arr in update.items():
        if arr.dtype.kind != "f":
            continue
        a, b = arr.reshape(-1), np.asarray(base[name]).reshape(-1)
        for start in range(0, a.size, _CHUNK):
            d = a[start:start + _CHUNK].astype(np.float64) - b[start:start + _CHUNK]
            total += float(np.dot(d, d))
    return math.sqrt(total)


def clip_update(update: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
                max_norm: float) -> tuple[Update, float]:
    """``(update', norm)``: ``update`` with its change from ``base`` scaled to L2 norm ``max_norm`` if longer.

    ``norm`` is the norm before clipping. An update within the bound comes back as the same arrays (no copy);
    a clipped one as new arrays of the update's dtypes (``base + (update - base) * max_norm / norm`` in float64,
    then cast). Integer and boolean arrays are never changed.
    """
    bound = check_max_norm(max_norm)
    norm = update_norm(update, base)
    if norm <= bound:
        return dict(update), norm
    scale = bound / norm
    clipped: Update = {}
    for name, arr in update.items():
        if arr.dtype.kind != "f":
            clipped[name] = arr
            continue
        b = np.asarray(base[name], dtype=np.float64)
        clipped[name] = (b + (arr.astype(np.float64) - b) * scale).astype(arr.dtype)
    return clipped, norm
