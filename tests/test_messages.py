"""Arrays in Flower records: packed into one buffer, restored exactly, and a bad layout refused before use."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fednnunet.array_layout import ALIGN, LayoutError, pack, unpack
from fednnunet.flower.messages import ARRAYS, BODY, PACKED, PackedArrays, from_record, record_nbytes, to_record


def _mixed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "half": rng.standard_normal(7).astype(np.float16),
        "count": np.array(5, dtype=np.int64),           # 0-d
        "empty": np.zeros((0, 3), dtype=np.int32),
        "mask": rng.random(11) > 0.5,
        "fortran": np.asfortranarray(rng.standard_normal((5, 6))),
        "big_endian": np.arange(3, dtype=">f4"),
    }


def test_pack_unpack_is_exact_and_aligned() -> None:
    arrays = _mixed()
    layout, buffer = pack(arrays)
    out = unpack(json.loads(json.dumps(layout)), buffer)
    assert list(out) == list(arrays)
    for name, arr in arrays.items():
        assert out[name].dtype == arr.dtype and out[name].shape == arr.shape
        np.testing.assert_array_equal(out[name], arr)
        assert out[name].ctypes.data % ALIGN == buffer.ctypes.data % ALIGN


def test_record_round_trip_through_flower_objects() -> None:
    arrays = _mixed()
    record = to_record({"op": "train_round", "config": {"round": 3}}, arrays)
    body, out = from_record(record)
    assert body == {"op": "train_round", "config": {"round": 3}}
    data = record.array_records["arrays"]["packed"].data
    for name, arr in arrays.items():
        np.testing.assert_array_equal(out[name], arr)
        # a view of the received bytes, not a copy of the model (nor a way to change what was received)
        assert not out[name].flags.writeable and not out[name].flags.owndata
        assert 0 <= out[name].__array_interface__["data"][0] - np.frombuffer(data, np.uint8).ctypes.data < len(data)
    assert record_nbytes(record) >= sum(a.nbytes for a in arrays.values())


def test_a_model_is_a_handful_of_flower_objects_not_one_per_tensor() -> None:
    """Why we pack: Flower moves each array as its own object, one request per object per hop."""
    arrays = {f"layer{i}.weight": np.zeros(1000, np.float32) for i in range(300)}
    record = to_record({}, arrays)
    assert len(record.array_records[ARRAYS]) == 1
    assert record_nbytes(record) < 1.01 * 300 * 4000 + 1024


def test_body_without_arrays() -> None:
    assert from_record(to_record({"ok": True})) == ({"ok": True}, {})


def _record_with(layout: list, buffer: np.ndarray) -> RecordDict:
    config = ConfigRecord({"json": "{}", "layout": json.dumps(layout)})
    return RecordDict({BODY: config, ARRAYS: ArrayRecord({PACKED: Array(buffer)})})


@pytest.mark.parametrize("layout, problem", [
    ([{"name": "x", "dtype": "|O", "shape": [2]}], "only numeric"),
    ([{"name": "x", "dtype": "<f4", "shape": [-1]}], "negative"),
    ([{"name": "x", "dtype": "<f4", "shape": [1000]}], "buffer holds"),
    ([{"name": "x", "dtype": "<f4", "shape": [4]}, {"name": "x", "dtype": "<f4", "shape": [4]}], "twice"),
    ([{"name": "x", "shape": [4]}], "malformed"),
    ([{"name": "x", "dtype": "not a dtype", "shape": [4]}], "malformed"),
])
def test_bad_layouts_are_refused(layout: list, problem: str) -> None:
    with pytest.raises(LayoutError, match=problem):
        from_record(_record_with(layout, np.zeros(2 * ALIGN, np.uint8)))


def test_arrays_listed_but_missing_are_refused() -> None:
    config = ConfigRecord({"json": "{}", "layout": json.dumps([{"name": "x", "dtype": "<f4", "shape": [1]}])})
    with pytest.raises(LayoutError, match="no packed array buffer"):
        from_record(RecordDict({BODY: config}))


def test_packed_buffer_must_be_bytes() -> None:
    with pytest.raises(LayoutError, match="uint8"):
        unpack([{"name": "x", "dtype": "<f4", "shape": [1]}], np.zeros(16, np.float32))


def test_object_arrays_are_refused_when_packing() -> None:
    with pytest.raises(LayoutError, match="only numeric"):
        pack({"x": np.array([{"a": 1}], dtype=object)})


def test_one_packed_model_serves_several_messages() -> None:
    packed = PackedArrays.of(_mixed())
    a, b = to_record({"site": "A"}, packed), to_record({"site": "B"}, packed)
    assert a.array_records[ARRAYS] is b.array_records[ARRAYS]
    assert from_record(a)[0] == {"site": "A"} and from_record(b)[0] == {"site": "B"}
    np.testing.assert_array_equal(from_record(b)[1]["conv.weight"], _mixed()["conv.weight"])
