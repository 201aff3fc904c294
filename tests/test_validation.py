"""Validation of site updates and metrics: each kind of tampering is rejected with a precise reason."""

from __future__ import annotations

import numpy as np
import pytest

from fednnunet.aggregation import ModelSpec, UpdateRejected, validate_metrics, validate_update


@pytest.fixture()
def ref() -> dict[str, np.ndarray]:
    return {
        "encoder.x.weight": np.ones((3, 4), np.float32),
        "encoder.x.bias": np.zeros(3, np.float32),
        "norm.num_batches_tracked": np.array(5, np.int64),
    }


@pytest.fixture()
def spec(ref) -> ModelSpec:
    return ModelSpec.of(ref)


def test_spec_of_and_sizes(spec: ModelSpec) -> None:
    assert spec.params["encoder.x.weight"] == ((3, 4), "float32")
    assert spec.params["norm.num_batches_tracked"] == ((), "int64")
    assert spec.num_values == 12 + 3 + 1
    assert spec.num_bytes == 12 * 4 + 3 * 4 + 8


def test_valid_update_is_accepted(ref, spec) -> None:
    validate_update(ref, spec, max_bytes=spec.num_bytes)
    partial = {"encoder.x.bias": ref["encoder.x.bias"]}
    validate_update(partial, spec, allow_missing=True)


def _rejected(update, spec, match: str, **kw) -> None:
    with pytest.raises(UpdateRejected, match=match):
        validate_update(update, spec, **kw)


def test_rejects_nan_and_inf(ref, spec) -> None:
    w = ref["encoder.x.weight"].copy()
    w[0, 0] = w[1, 2] = np.nan
    w[2, 3] = -np.inf
    _rejected({**ref, "encoder.x.weight": w}, spec, r"non-finite values in 'encoder.x.weight' \(2 NaN, 1 Inf\)")


def test_rejects_wrong_shape(ref, spec) -> None:
    bad = {**ref, "encoder.x.weight": np.ones((3, 3), np.float32)}
    _rejected(bad, spec, r"parameter 'encoder.x.weight': shape \(3, 3\) != expected \(3, 4\)")


def test_rejects_extra_key(ref, spec) -> None:
    _rejected({**ref, "evil": np.zeros(1, np.float32)}, spec, r"^unexpected parameter 'evil'$")


def test_rejects_missing_key(ref, spec) -> None:
    bad = dict(ref)
    del bad["encoder.x.bias"]
    _rejected(bad, spec, r"^missing parameter 'encoder.x.bias'$")
    del bad["encoder.x.weight"]
    _rejected(bad, spec, r"^missing parameters 'encoder.x.bias', 'encoder.x.weight'$")


def test_rejects_wrong_dtype(ref, spec) -> None:
    bad = {**ref, "encoder.x.bias": np.zeros(3, np.float64)}
    _rejected(bad, spec, r"parameter 'encoder.x.bias': dtype float64 != expected float32")
    bad = {**ref, "norm.num_batches_tracked": np.array(5.0, np.float32)}
    _rejected(bad, spec, r"dtype float32 != expected int64")


def test_rejects_oversized(ref, spec) -> None:
    _rejected(ref, spec, r"update is 0\.0 MB \(68 bytes\), above the limit of 0\.0 MB \(67 bytes\)", max_bytes=67)
    huge = {"encoder.x.weight": np.zeros(30_000_000, np.float32)}  # 120 MB, lazily zeroed
    _rejected(huge, spec, r"update is 120\.0 MB \(120000000 bytes\), above the limit of 100\.0 MB", max_bytes=10**8)


def test_rejects_non_arrays_and_bad_names(ref, spec) -> None:
    _rejected({**ref, "encoder.x.bias": [0.0, 0.0, 0.0]}, spec, r"'encoder.x.bias': expected a numpy array, got list")
    _rejected({**ref, 3: np.zeros(1)}, spec, r"parameter name 3 is a int, not a str")
    _rejected([("a", np.zeros(1))], spec, r"must be a mapping")
    long_name = "x" * 10_000
    with pytest.raises(UpdateRejected) as err:
        validate_update({**ref, long_name: np.zeros(1)}, spec)
    assert len(str(err.value)) < 200  # hostile names do not flood the log


def test_validate_metrics() -> None:
    required = {"num_examples": int, "train_loss": float}
    validate_metrics({"num_examples": 12, "train_loss": 0.5, "note": "ok"}, required)
    validate_metrics({"num_examples": np.int64(3), "train_loss": 1}, required)  # int is a valid float
    with pytest.raises(UpdateRejected, match=r"missing metric 'train_loss'"):
        validate_metrics({"num_examples": 12}, required)
    with pytest.raises(UpdateRejected, match=r"metric 'num_examples': expected int, got float"):
        validate_metrics({"num_examples": 1.5, "train_loss": 0.5}, required)
    with pytest.raises(UpdateRejected, match=r"expected int, got bool"):
        validate_metrics({"num_examples": True, "train_loss": 0.5}, required)
    with pytest.raises(UpdateRejected, match=r"metric 'train_loss' is not finite: nan"):
        validate_metrics({"num_examples": 1, "train_loss": float("nan")}, required)
    with pytest.raises(UpdateRejected, match=r"metric 'extra' is not finite: inf"):
        validate_metrics({"num_examples": 1, "train_loss": 0.1, "extra": float("inf")}, required)
    with pytest.raises(UpdateRejected, match=r"must be a mapping"):
        validate_metrics([1, 2], required)  # type: ignore[arg-type]
