"""Named numeric arrays as one byte buffer plus a JSON layout, checked before a byte is interpreted.

Why one buffer: Flower moves every array of a record as its own object (one request each, plus a hash, at every
hop: server to SuperLink, SuperLink to SuperNode, SuperNode to ClientApp and back); an nnU-Net state dict has
hundreds of tensors, and those per-object costs, not the bytes, dominated a round on loopback. Packed, a 30 M
parameter model is a handful of 5 MB chunks. Only numeric dtypes are accepted (nothing that could hold Python objects), and a layout from the network
must account for the buffer exactly.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

#: bool, signed and unsigned integers, floats
ALLOWED_KINDS = "biuf"
#: Every array starts at a multiple of this many bytes, so the views returned by :func:`unpack` are aligned.
ALIGN = 64


class LayoutError(ValueError):
    """A layout that is malformed, names a non-numeric dtype, or does not match its buffer."""


def describe(name: str, arr: np.ndarray) -> dict[str, Any]:
    """The layout entry of one array (refuses non-numeric dtypes)."""
    if arr.dtype.kind not in ALLOWED_KINDS:
        raise LayoutError(f"array '{name}' has dtype {arr.dtype}; only numeric arrays may be sent")
    return {"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape)}


def parse(layout: Iterable[Any]) -> list[tuple[str, np.dtype, tuple[int, ...], int]]:
    """Check layout entries received from elsewhere; returns (name, dtype, shape, nbytes) per array."""
    plan, names = [], set()
    for entry in layout:
        try:
            name, dtype, shape = str(entry["name"]), np.dtype(str(entry["dtype"])), tuple(int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise LayoutError(f"malformed array entry {str(entry)[:200]!r}: {err}") from None
        if dtype.kind not in ALLOWED_KINDS:
            raise LayoutError(f"array '{name}' has dtype {dtype}; only numeric arrays are accepted")
        if any(s < 0 for s in shape):
            raise LayoutError(f"array '{name}' has a negative dimension {shape}")
        if name in names:
            raise LayoutError(f"array '{name}' appears twice")
        names.add(name)
        plan.append((name, dtype, shape, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize))
    return plan


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def packed_size(plan: Iterable[tuple[str, np.dtype, tuple[int, ...], int]]) -> int:
    """Bytes of the buffer that holds ``plan``'s arrays, each starting at an aligned offset."""
    return sum(_aligned(nbytes) for *_, nbytes in plan)


def pack(arrays: Mapping[str, np.ndarray]) -> tuple[list[dict[str, Any]], np.ndarray]:
    """(layout, uint8 buffer) holding ``arrays`` in order, each at an aligned offset."""
    layout = [describe(name, arr) for name, arr in arrays.items()]
    buffer = np.zeros(packed_size(parse(layout)), dtype=np.uint8)
    offset = 0
    for arr in arrays.values():
        raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        buffer[offset:offset + raw.size] = raw
        offset += _aligned(raw.size)
    return layout, buffer


def unpack(layout: Iterable[Any], buffer: np.ndarray) -> dict[str, np.ndarray]:
    """Views into ``buffer`` (uint8) for each array of ``layout``; refuses a layout that does not fit exactly."""
    plan = parse(layout)
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise LayoutError(f"packed arrays must be a 1-D uint8 buffer, got {buffer.dtype} with shape {buffer.shape}")
    if packed_size(plan) != buffer.size:
        raise LayoutError(f"layout describes {packed_size(plan)} bytes but the buffer holds {buffer.size}")
    arrays, offset = {}, 0
    for name, dtype, shape, nbytes in plan:
        arrays[name] = buffer[offset:offset + nbytes].view(dtype).reshape(shape)
        offset += _aligned(nbytes)
    return arrays
