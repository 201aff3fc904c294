"""FedAvg and AsymFedAvg: exact maths, dtype rules, streaming, asymmetric grouping."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from fednnunet.aggregation import AsymReport, StreamingAverager, asym_fedavg, fedavg

# the package re-exports the function `fedavg`, which shadows the submodule of the same name
fedavg_module = importlib.import_module("fednnunet.aggregation.fedavg")


def _model(rng: np.random.Generator, n_stages: int = 5, in_channels: int = 1) -> dict[str, np.ndarray]:
    """A small nnU-Net-like state dict: conv weight/bias per encoder stage, a seg head, a counter."""
    m: dict[str, np.ndarray] = {}
    ch_in = in_channels
    for s in range(n_stages):
        ch = 4 * (s + 1)
        m[f"encoder.stages.{s}.conv.weight"] = rng.standard_normal((ch, ch_in, 3, 3)).astype(np.float32)
        m[f"encoder.stages.{s}.conv.bias"] = rng.standard_normal(ch).astype(np.float32)
        ch_in = ch
    m["seg.weight"] = rng.standard_normal((2, 4, 1, 1)).astype(np.float32)
    m["norm.num_batches_tracked"] = np.array(int(rng.integers(0, 1000)), dtype=np.int64)
    return m


# ---------------------------------------------------------------------------------------------- FedAvg


def test_fedavg_weighted_matches_hand_computation() -> None:
    a = {"w": np.array([1.0, 2.0, 3.0], dtype=np.float32), "b": np.array([[0.5]], dtype=np.float32)}
    b = {"w": np.array([4.0, 6.0, 0.0], dtype=np.float32), "b": np.array([[-1.0]], dtype=np.float32)}
    out = fedavg([a, b], [1.0, 3.0])
    # (1*a + 3*b) / 4
    np.testing.assert_array_equal(out["w"], np.array([13 / 4, 20 / 4, 3 / 4], dtype=np.float32))
    np.testing.assert_array_equal(out["b"], np.array([[-2.5 / 4]], dtype=np.float32))
    assert list(out) == ["w", "b"]


def test_fedavg_uniform_weights_is_plain_mean() -> None:
    rng = np.random.default_rng(0)
    ups = [{"x": rng.standard_normal((7, 5)).astype(np.float64)} for _ in range(4)]
    out = fedavg(ups, [2.0] * 4)
    np.testing.assert_allclose(out["x"], np.mean([u["x"] for u in ups], axis=0), rtol=0, atol=1e-15)


def test_fedavg_preserves_dtype_and_accumulates_in_float64() -> None:
    big, small = np.float32(1e8), np.float32(1.0)
    ups = [{"x": np.full(3, v, np.float32), "h": np.full(2, 1.5, np.float16)} for v in (big, small, small)]
    out = fedavg(ups, [1.0, 1.0, 1.0])
    assert out["x"].dtype == np.float32 and out["h"].dtype == np.float16
    np.testing.assert_array_equal(out["x"], np.float32((1e8 + 2.0) / 3.0))
    np.testing.assert_array_equal(out["h"], np.float16(1.5))


def test_int_buffers_take_value_of_largest_weight() -> None:
    def up(counter: int, flag: bool) -> dict[str, np.ndarray]:
        return {"w": np.zeros(2, np.float32), "n": np.array(counter, np.int64), "f": np.array([flag])}

    out = fedavg([up(10, False), up(250, True), up(40, False)], [1.0, 5.0, 2.0])
    assert out["n"].dtype == np.int64 and int(out["n"]) == 250
    assert out["f"].dtype == np.bool_ and bool(out["f"][0]) is True
    # ties: the first update added wins
    out = fedavg([up(7, False), up(9, True)], [3.0, 3.0])
    assert int(out["n"]) == 7


def test_streaming_equals_batch_and_result_is_repeatable() -> None:
    rng = np.random.default_rng(1)
    ups = [_model(rng) for _ in range(5)]
    weights = [3.0, 1.0, 4.0, 1.0, 5.0]
    avg = StreamingAverager()
    for u, w in zip(ups, weights):
        avg.add(u, w)
    assert avg.num_updates == 5 and avg.total_weight == 14.0
    first, second = avg.result(), avg.result()
    batch = fedavg(ups, weights)
    for name in batch:
        np.testing.assert_array_equal(first[name], batch[name])
        np.testing.assert_array_equal(second[name], batch[name])
        expect = sum(w * u[name].astype(np.float64) for u, w in zip(ups, weights)) / 14.0
        if name != "norm.num_batches_tracked":
            np.testing.assert_allclose(first[name], expect.astype(np.float32), rtol=1e-6)
    assert int(first["norm.num_batches_tracked"]) == int(ups[4]["norm.num_batches_tracked"])


def test_chunked_accumulate_covers_arrays_larger_than_a_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fedavg_module, "_CHUNK", 7)
    rng = np.random.default_rng(2)
    ups = [{"x": rng.standard_normal((5, 11)).astype(np.float32)[:, ::2]} for _ in range(3)]  # non-contiguous
    out = fedavg(ups, [1.0, 2.0, 3.0])
    expect = (ups[0]["x"] * 1.0 + ups[1]["x"].astype(np.float64) * 2 + ups[2]["x"].astype(np.float64) * 3) / 6
    np.testing.assert_allclose(out["x"], expect, rtol=1e-6)


def test_result_dtype_like_casts_to_reference() -> None:
    avg = StreamingAverager()
    avg.add({"x": np.array([1.0, 2.0], np.float64)}, 1.0)
    assert avg.result(dtype_like={"x": np.zeros(2, np.float32)})["x"].dtype == np.float32
    assert avg.result(dtype_like={"x": np.dtype("float16")})["x"].dtype == np.float16
    with pytest.raises(TypeError):
        avg.result(dtype_like={"x": np.dtype("int32")})


def test_weight_and_shape_errors() -> None:
    x = {"x": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="total weight is zero"):
        fedavg([x, x], [0.0, 0.0])
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight"):
            fedavg([x], [bad])
    with pytest.raises(ValueError, match="2 updates but 1 weights"):
        fedavg([x, x], [1.0])
    with pytest.raises(ValueError, match="no updates"):
        fedavg([], [])
    with pytest.raises(ValueError, match=r"shape \(3,\) != \(2,\)"):
        fedavg([x, {"x": np.ones(3, np.float32)}], [1.0, 1.0])
    with pytest.raises(ValueError, match="missing \\['x'\\], unexpected \\['y'\\]"):
        fedavg([x, {"y": np.ones(2, np.float32)}], [1.0, 1.0])
    with pytest.raises(ValueError, match="same kind"):
        fedavg([x, {"x": np.ones(2, np.int32)}], [1.0, 1.0])
    with pytest.raises(TypeError, match="cannot average"):
        fedavg([{"s": np.array(["a"])}], [1.0])


# ------------------------------------------------------------------------------------------ AsymFedAvg


@pytest.fixture()
def asym_sites() -> dict[str, dict[str, np.ndarray]]:
    """A: stages 0-4; B: stages 0-5 and 2 input channels (first conv differs); C: like A."""
    rng = np.random.default_rng(3)
    return {"A": _model(rng, 5, 1), "B": _model(rng, 6, 2), "C": _model(rng, 5, 1)}


WEIGHTS = {"A": 10.0, "B": 30.0, "C": 20.0}
FIRST_CONV = "encoder.stages.0.conv.weight"
B_ONLY = {"encoder.stages.5.conv.weight", "encoder.stages.5.conv.bias"}


def _weighted(sites: dict[str, dict[str, np.ndarray]], members: list[str], name: str) -> np.ndarray:
    total = sum(WEIGHTS[s] for s in members)
    acc = sum(WEIGHTS[s] * sites[s][name].astype(np.float64) for s in members)
    return (acc / total).astype(sites[members[0]][name].dtype)


def test_asym_scope_all_averages_only_layers_common_to_every_site(asym_sites) -> None:
    out, report = asym_fedavg(asym_sites, WEIGHTS, scope="all")
    common = set(asym_sites["A"]) - {FIRST_CONV}
    for site, own in asym_sites.items():
        assert list(out[site]) == list(own)  # same keys, same order
        for name, arr in own.items():
            if name in common:
                if name == "norm.num_batches_tracked":
                    assert out[site][name] == asym_sites["B"][name]  # heaviest site
                else:
                    np.testing.assert_allclose(out[site][name], _weighted(asym_sites, ["A", "B", "C"], name), rtol=1e-6)
            else:
                assert out[site][name] is arr  # kept local: the very same array
    a, b = report.sites["A"], report.sites["B"]
    assert report.scope == "all" and isinstance(report, AsymReport)
    assert (a.params_averaged, a.params_local) == (len(common), 1)
    assert (b.params_averaged, b.params_local) == (len(common), 3)
    assert set(b.local_names) == B_ONLY | {FIRST_CONV} and a.local_names == (FIRST_CONV,)
    assert a.values_local == asym_sites["A"][FIRST_CONV].size
    assert a.values_averaged + a.values_local == sum(v.size for v in asym_sites["A"].values())
    assert b.values_local == sum(asym_sites["B"][n].size for n in B_ONLY | {FIRST_CONV})
    assert report.num_groups == len(common)
    assert len(report.lines()) == 3


def test_asym_scope_any_averages_each_compatible_group(asym_sites) -> None:
    out, report = asym_fedavg(asym_sites, WEIGHTS, scope="any")
    # the first conv is shared by A and C only: averaged between them, B keeps its own
    expect_ac = _weighted(asym_sites, ["A", "C"], FIRST_CONV)
    np.testing.assert_allclose(out["A"][FIRST_CONV], expect_ac, rtol=1e-6)
    assert out["C"][FIRST_CONV] is out["A"][FIRST_CONV]
    assert out["B"][FIRST_CONV] is asym_sites["B"][FIRST_CONV]
    for name in B_ONLY:  # only B has stage 5
        assert out["B"][name] is asym_sites["B"][name]
    np.testing.assert_allclose(
        out["B"]["seg.weight"], _weighted(asym_sites, ["A", "B", "C"], "seg.weight"), rtol=1e-6
    )
    assert report.sites["A"].params_local == 0 and report.sites["C"].params_local == 0
    assert set(report.sites["B"].local_names) == B_ONLY | {FIRST_CONV}
    assert report.sites["A"].fraction_averaged == 1.0


def test_asym_identical_architectures_equal_fedavg() -> None:
    rng = np.random.default_rng(4)
    sites = {f"site{i}": _model(rng) for i in range(4)}
    weights = {"site0": 1.0, "site1": 7.0, "site2": 2.5, "site3": 4.0}
    ref = fedavg(list(sites.values()), list(weights.values()))
    for scope in ("all", "any"):
        out, report = asym_fedavg(sites, weights, scope=scope)
        for site in sites:
            assert out[site].keys() == ref.keys()
            for name in ref:
                assert out[site][name].dtype == ref[name].dtype
                np.testing.assert_array_equal(out[site][name], ref[name])  # bit-identical
            assert report.sites[site].params_local == 0


def test_asym_single_site_and_argument_errors(asym_sites) -> None:
    out, report = asym_fedavg({"A": asym_sites["A"]}, {"A": 1.0})
    assert all(out["A"][n] is a for n, a in asym_sites["A"].items())  # nothing to average with
    assert report.sites["A"].params_averaged == 0
    with pytest.raises(ValueError, match="scope"):
        asym_fedavg(asym_sites, WEIGHTS, scope="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no weight for \\['C'\\]"):
        asym_fedavg(asym_sites, {"A": 1.0, "B": 1.0})
    with pytest.raises(ValueError, match="no updates"):
        asym_fedavg({}, {})


def test_asym_dtype_kind_mismatch_is_not_averaged() -> None:
    a = {"x": np.ones(3, np.float32), "n": np.array(1, np.int64)}
    b = {"x": np.zeros(3, np.float32), "n": np.array(2.0, np.float32)}
    out, report = asym_fedavg({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, scope="any")
    np.testing.assert_array_equal(out["a"]["x"], np.full(3, 0.5, np.float32))
    assert out["a"]["n"] is a["n"] and out["b"]["n"] is b["n"]
    assert report.sites["a"].local_names == ("n",)
