"""Conversion between our (JSON body, named arrays) messages and Flower records.

Only two things cross the network: a JSON string in a ConfigRecord and numeric arrays in an ArrayRecord (which
Flower serialises with ``np.save(allow_pickle=False)``). Nothing received is unpickled.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

BODY = "body"
ARRAYS = "arrays"


def to_record(body: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> RecordDict:
    record = RecordDict({BODY: ConfigRecord({"json": json.dumps(body)})})
    if arrays:
        record[ARRAYS] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return record


def from_record(record: RecordDict) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    body = json.loads(str(record.config_records[BODY]["json"])) if BODY in record.config_records else {}
    arrays = {}
    if ARRAYS in record.array_records:
        arrays = {k: v.numpy() for k, v in record.array_records[ARRAYS].items()}
    return body, arrays


def record_nbytes(record: RecordDict) -> int:
    """Bytes of array data in a record (what dominates the wire)."""
    if ARRAYS not in record.array_records:
        return 0
    return sum(len(a.data) for a in record.array_records[ARRAYS].values())
