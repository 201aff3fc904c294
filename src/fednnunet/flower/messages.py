"""Conversion between our (JSON body, named arrays) messages and Flower records.

Only two things cross the network: a ConfigRecord with the JSON body and the arrays' layout, and an ArrayRecord
holding all arrays packed into one uint8 buffer (see :mod:`fednnunet.array_layout` for why one buffer; Flower
serialises it with ``np.save(allow_pickle=False)``). Nothing received is unpickled, and a layout that names a
non-numeric dtype or does not match the buffer is refused.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.constant import SType

from fednnunet.array_layout import LayoutError, pack, unpack

BODY = "body"
ARRAYS = "arrays"
PACKED = "packed"


@dataclass(frozen=True)
class PackedArrays:
    """Arrays already packed for a record: packing once serves every message that carries the same model."""

    layout: str
    record: ArrayRecord

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> "PackedArrays":
        layout, buffer = pack(arrays)
        return cls(json.dumps(layout), ArrayRecord({PACKED: Array(buffer)}))


def to_record(body: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | PackedArrays | None = None) -> RecordDict:
    config = ConfigRecord({"json": json.dumps(body)})
    record = RecordDict({BODY: config})
    if arrays:
        packed = arrays if isinstance(arrays, PackedArrays) else PackedArrays.of(arrays)
        config["layout"] = packed.layout
        record[ARRAYS] = packed.record
    return record


def _packed_buffer(array: Array) -> np.ndarray:
    """The received packed buffer as a read-only view of the message's bytes (no copy of the model).

    Flower's ``Array.numpy()`` would ``np.load`` a copy; here numpy's own ``.npy`` header reader checks that the
    bytes hold a 1-D uint8 array and the data is viewed where it lies.
    """
    stream = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, fortran_order, dtype = read_header(stream)
    except (ValueError, KeyError) as err:
        raise LayoutError(f"packed arrays are not a .npy buffer: {err}") from None
    if dtype != np.uint8 or len(shape) != 1 or fortran_order:
        raise LayoutError(f"packed arrays must be a 1-D uint8 buffer, got {dtype} with shape {shape}")
    if stream.tell() + shape[0] != len(array.data):
        raise LayoutError(f"packed buffer of {len(array.data) - stream.tell()} bytes where its header says {shape[0]}")
    return np.frombuffer(array.data, dtype=np.uint8, count=shape[0], offset=stream.tell())


def from_record(record: RecordDict) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(body, arrays); the arrays are read-only views into the received bytes. Raises LayoutError if malformed."""
    config = record.config_records.get(BODY)
    if config is None:
        return {}, {}
    try:
        body = json.loads(str(config["json"]))
        layout = json.loads(str(config["layout"])) if "layout" in config else []
    except (KeyError, json.JSONDecodeError) as err:
        raise LayoutError(f"malformed message body: {err}") from None
    if not layout:
        return body, {}
    if ARRAYS not in record.array_records or PACKED not in record.array_records[ARRAYS]:
        raise LayoutError("message lists arrays but carries no packed array buffer")
    packed = record.array_records[ARRAYS][PACKED]
    if packed.stype != SType.NUMPY:
        raise LayoutError(f"packed arrays of serialisation type {packed.stype!r}")
    return body, unpack(layout, _packed_buffer(packed))


def record_nbytes(record: RecordDict) -> int:
    """Bytes of array data in a record (what dominates the wire)."""
    if ARRAYS not in record.array_records:
        return 0
    return sum(len(a.data) for a in record.array_records[ARRAYS].values())
