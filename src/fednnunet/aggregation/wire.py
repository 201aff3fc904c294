"""The precision of model weights on the wire (``--transfer-dtype``).

Sending float16 instead of float32 halves the bytes per round. Only the transfer is reduced: the server
averages in float64 and keeps the global model in the network's own dtype, sites train in full precision, and
the first and the final model (``train_init`` / ``train_finish``) travel in full precision.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fednnunet.aggregation.validation import ModelSpec

WIRE_DTYPES = ("float32", "float16")


def _narrower(dtype: np.dtype, wire: np.dtype) -> bool:
    return dtype.kind == "f" and dtype.itemsize > wire.itemsize


def to_wire(arrays: Mapping[str, np.ndarray], wire_dtype: str) -> dict[str, np.ndarray]:
    """Floating arrays wider than ``wire_dtype`` cast to it; everything else unchanged."""
    wire = np.dtype(wire_dtype)
    return {k: a.astype(wire) if _narrower(a.dtype, wire) else a for k, a in arrays.items()}


def wire_spec(spec: ModelSpec, wire_dtype: str) -> ModelSpec:
    """What a valid update of a model with ``spec`` looks like on the wire."""
    wire = np.dtype(wire_dtype)
    return ModelSpec({k: (shape, wire.name if _narrower(np.dtype(dt), wire) else dt)
                      for k, (shape, dt) in spec.params.items()})


def from_wire(arrays: Mapping[str, np.ndarray], spec: ModelSpec) -> dict[str, np.ndarray]:
    """Arrays back in the model's own dtypes (after :func:`validate_update` against :func:`wire_spec`)."""
    return {k: a if a.dtype.name == spec.params[k][1] else a.astype(spec.params[k][1]) for k, a in arrays.items()}
