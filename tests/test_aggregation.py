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


# ------------------------------------------------------------------------- streaming, reuse, out=


def _naive(ups: list[dict[str, np.ndarray]], ws: list[float], name: str) -> np.ndarray:
    """The promised arithmetic, spelled out: ((w1 x1 + w2 x2) + ...) / W in float64, cast back."""
    dtype = ups[0][name].dtype
    if len(ups) == 1:
        return ups[0][name].astype(dtype)
    acc = ws[0] * ups[0][name].astype(np.float64)
    for u, w in zip(ups[1:], ws[1:]):
        acc = acc + w * u[name].astype(np.float64)
    return (acc / sum(ws)).astype(dtype)


@pytest.mark.parametrize("chunk", [7, 1 << 18])
def test_streaming_is_bitwise_the_naive_float64_sum_for_every_k(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """K = 1 (own values), 2 (fused in result), 3+ (sums folded one add late): always the same arithmetic."""
    monkeypatch.setattr(fedavg_module, "_CHUNK", chunk)
    rng = np.random.default_rng(10)

    def up() -> dict[str, np.ndarray]:
        return {"f32": rng.standard_normal((6, 9)).astype(np.float32),
                "f64": rng.standard_normal(40),  # float64 parameters are computed straight into the output
                "f16": rng.standard_normal(13).astype(np.float16),
                "strided": rng.standard_normal((5, 22)).astype(np.float32)[:, ::2]}

    ups = [up() for _ in range(6)]
    ws = [0.3, 7.0, 1.0 / 3.0, 2.5, 11.0, 0.1]
    for k in range(1, 7):
        avg = StreamingAverager()
        for u, w in zip(ups[:k], ws[:k]):
            avg.add(u, w)
        out = avg.result()
        for name in ups[0]:
            assert out[name].dtype == ups[0][name].dtype
            assert out[name].tobytes() == _naive(ups[:k], ws[:k], name).tobytes(), (k, name)


def test_reset_reuses_the_sums_and_gives_a_fresh_averagers_result() -> None:
    rng = np.random.default_rng(11)
    rounds = [[_model(rng) for _ in range(k)] for k in (4, 2, 1, 5)]
    reused = StreamingAverager()
    sums = None
    for ups in rounds:
        ws = [float(rng.integers(1, 50)) for _ in ups]
        reused.reset()
        fresh = StreamingAverager()
        for u, w in zip(ups, ws):
            reused.add(u, w)
            fresh.add(u, w)
        assert reused.num_updates == len(ups) and reused.total_weight == sum(ws)
        a, b = reused.result(), fresh.result()
        assert a.keys() == b.keys()
        assert all(a[n].dtype == b[n].dtype and a[n].tobytes() == b[n].tobytes() for n in a)
        if len(ups) > 2:  # sums were written: the same arrays as in the earlier round with sums
            if sums is not None:
                assert all(reused._acc[n] is sums[n] for n in sums)
            sums = dict(reused._acc)
    # a different model after reset: new sums where the shape changed, no error
    reused.reset()
    for _ in range(3):
        reused.add({"x": np.ones(3, np.float32)}, 1.0)
    np.testing.assert_array_equal(reused.result()["x"], np.ones(3, np.float32))


def test_result_into_preallocated_out() -> None:
    rng = np.random.default_rng(12)
    ups = [_model(rng) for _ in range(3)]
    ws = [1.0, 2.0, 5.0]
    avg = StreamingAverager()
    for u, w in zip(ups, ws):
        avg.add(u, w)
    expect = avg.result()
    out = {n: np.full_like(a, 7) for n, a in ups[0].items()}
    got = avg.result(out=out)
    assert list(got) == list(expect)
    for name in expect:
        assert got[name] is out[name]  # written in place, not a new array
        assert got[name].tobytes() == expect[name].tobytes()
    # a wider or narrower float dtype, and a non-contiguous destination, are written correctly too
    wide = {n: np.empty(a.shape, np.float64 if a.dtype.kind == "f" else a.dtype) for n, a in ups[0].items()}
    avg.result(out=wide)
    name = "encoder.stages.2.conv.weight"
    np.testing.assert_allclose(wide[name], expect[name], rtol=1e-6)
    strided = dict(out, **{name: np.zeros(ups[0][name].shape[::-1], np.float32).T})  # a transposed view
    avg.result(out=strided)
    np.testing.assert_array_equal(strided[name], expect[name])
    with pytest.raises(ValueError, match="lacks"):
        avg.result(out={})
    with pytest.raises(ValueError, match="shape"):
        avg.result(out=dict(out, **{name: np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match="not both"):
        avg.result(dtype_like=out, out=out)
    # one update: its exact values, into out too
    one = StreamingAverager()
    one.add(ups[0], 0.37)
    dest = {n: np.empty_like(a) for n, a in ups[0].items()}
    assert all(one.result(out=dest)[n].tobytes() == a.tobytes() for n, a in ups[0].items())


def test_streaming_keeps_at_most_two_updates_alive() -> None:
    import gc
    import weakref

    rng = np.random.default_rng(13)
    avg = StreamingAverager()
    refs = []
    for i in range(6):
        arr = rng.standard_normal(100).astype(np.float32)
        refs.append(weakref.ref(arr))
        avg.add({"x": arr}, 1.0 + i)
        del arr
        gc.collect()
        alive = [r() is not None for r in refs]
        assert sum(alive) <= 2 and alive[-1]  # the latest one is still needed
    avg.reset()
    gc.collect()
    assert all(r() is None for r in refs)


# ------------------------------------------------------------------------------ StreamingAsymAverager


def _same(a: dict, b: dict) -> None:
    """Two asym results: same sites, keys, dtypes and bytes; the same local objects."""
    assert list(a) == list(b)
    for site in a:
        assert list(a[site]) == list(b[site])
        for name in a[site]:
            assert a[site][name].dtype == b[site][name].dtype
            assert a[site][name].tobytes() == b[site][name].tobytes(), (site, name)


@pytest.mark.parametrize("scope", ["all", "any"])
def test_streaming_asym_equals_asym_fedavg_for_every_subset_and_order(asym_sites, scope) -> None:
    import itertools

    from fednnunet.aggregation import ModelSpec, StreamingAsymAverager

    sites = dict(asym_sites, D=_model(np.random.default_rng(9), 5, 1))
    weights = dict(WEIGHTS, D=0.7)
    agg = StreamingAsymAverager({s: ModelSpec.of(u) for s, u in sites.items()}, scope)
    for r in range(1, len(sites) + 1):
        for order in itertools.permutations(sites, r):
            agg.reset()
            for s in order:
                agg.add(s, sites[s], weights[s])
            assert agg.added == order
            got, report = agg.result()
            expected, expected_report = asym_fedavg({s: sites[s] for s in order}, {s: weights[s] for s in order},
                                                    scope)
            _same(got, expected)
            assert report == expected_report
            for s in order:  # kept-local parameters are the site's own objects
                for name in report.sites[s].local_names:
                    assert got[s][name] is sites[s][name]
            # the averages are the naive float64 sums over exactly the sites in the group, in add order
            for s in order:
                for name in set(sites[s]) - set(report.sites[s].local_names) - {"norm.num_batches_tracked"}:
                    members = [m for m in order if name in sites[m] and sites[m][name].shape == sites[s][name].shape]
                    ref = _naive([sites[m] for m in members], [weights[m] for m in members], name)
                    assert got[s][name].tobytes() == ref.tobytes()


def test_streaming_asym_left_out_sites(asym_sites) -> None:
    from fednnunet.aggregation import ModelSpec, StreamingAsymAverager

    specs = {s: ModelSpec.of(u) for s, u in asym_sites.items()}
    # scope "all": with B (the odd first conv) left out, A and C average their first conv too
    agg = StreamingAsymAverager(specs, "all")
    agg.add("A", asym_sites["A"], WEIGHTS["A"])
    agg.add("C", asym_sites["C"], WEIGHTS["C"])
    out, report = agg.result()
    assert set(out) == {"A", "C"} and report.sites["A"].params_local == 0
    np.testing.assert_allclose(out["A"][FIRST_CONV], _weighted(asym_sites, ["A", "C"], FIRST_CONV), rtol=1e-6)
    assert out["A"][FIRST_CONV] is out["C"][FIRST_CONV]
    # scope "any", A left out: the first conv of B and of C each have a group of one added site
    agg = StreamingAsymAverager(specs, "any")
    agg.add("B", asym_sites["B"], WEIGHTS["B"])
    agg.add("C", asym_sites["C"], WEIGHTS["C"])
    out, report = agg.result()
    assert out["C"][FIRST_CONV] is asym_sites["C"][FIRST_CONV]
    assert out["B"][FIRST_CONV] is asym_sites["B"][FIRST_CONV]
    assert set(report.sites["C"].local_names) == {FIRST_CONV}
    # a single site added: its own model, nothing averaged
    agg.reset()
    agg.add("B", asym_sites["B"], WEIGHTS["B"])
    out, report = agg.result()
    assert all(out["B"][n] is a for n, a in asym_sites["B"].items())
    assert report.sites["B"].fraction_averaged == 0.0


def test_streaming_asym_errors(asym_sites) -> None:
    from fednnunet.aggregation import ModelSpec, StreamingAsymAverager

    specs = {s: ModelSpec.of(u) for s, u in asym_sites.items()}
    with pytest.raises(ValueError, match="scope"):
        StreamingAsymAverager(specs, "some")  # type: ignore[arg-type]
    agg = StreamingAsymAverager(specs)
    with pytest.raises(ValueError, match="no updates"):
        agg.result()
    with pytest.raises(ValueError, match="unknown site"):
        agg.add("Z", asym_sites["A"], 1.0)
    with pytest.raises(ValueError, match="missing"):
        agg.add("A", asym_sites["B"], 1.0)  # B's model is not A's
    wrong = dict(asym_sites["A"], **{FIRST_CONV: asym_sites["B"][FIRST_CONV]})
    with pytest.raises(ValueError, match="spec"):
        agg.add("A", wrong, 1.0)
    with pytest.raises(ValueError, match="weight"):
        agg.add("A", asym_sites["A"], -1.0)
    assert agg.added == ()  # nothing was added by the failed calls
    agg.add("A", asym_sites["A"], 1.0)
    with pytest.raises(ValueError, match="already added"):
        agg.add("A", asym_sites["A"], 1.0)


def test_wire_casts_are_numpys_bits_and_changes_round_trip() -> None:
    """The float16 cast (done by torch for speed) gives numpy's bits, subnormals and specials included; a reply
    of changes restores the trained weights to float16's precision of the change, not of the weight."""
    from fednnunet.aggregation import ModelSpec, delta_to_wire, from_wire, to_wire

    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, 1e-9, 3e-8, 6.0e-5, 0.1, 65504.0, 7e4, np.inf, -np.inf, np.nan], np.float32)
    arrays = {"w": np.concatenate([special, (rng.standard_normal(10_000) * 1e-6).astype(np.float32)]),
              "steps": np.arange(4, dtype=np.int64)}
    with np.errstate(over="ignore"):
        expected = arrays["w"].astype(np.float16)
    wire = to_wire(arrays, "float16")
    np.testing.assert_array_equal(wire["w"].view(np.uint16), expected.view(np.uint16))
    assert wire["steps"] is arrays["steps"]

    received = {"w": rng.standard_normal(1000).astype(np.float16).astype(np.float32), "steps": arrays["steps"]}
    trained = {"w": received["w"] + (rng.standard_normal(1000) * 1e-4).astype(np.float32), "steps": arrays["steps"]}
    spec = ModelSpec.of(trained)
    restored = from_wire(delta_to_wire(trained, received, "float16"), spec, base=received)
    assert restored["w"].dtype == np.float32 and restored["steps"] is arrays["steps"]
    np.testing.assert_allclose(restored["w"], trained["w"], rtol=0, atol=1e-4 * 2 ** -10 * 8)


def test_site_ordered_adds_make_a_seeded_average_independent_of_arrival_order() -> None:
    """Arrival order changes the float64 sum's last bits; adding in site order (seeded runs) does not."""
    from fednnunet.aggregation import SiteOrderedAdds

    rng = np.random.default_rng(3)
    # magnitudes 1e-12..1e12 per element: float64 sums of float32 values then round, differently per order
    updates = {s: {"w": (rng.normal(size=4096) * 10.0 ** rng.uniform(-12, 12, 4096)).astype(np.float32)}
               for s in "abcd"}
    weights = {"a": 3.0, "b": 7.0, "c": 1.0, "d": 5.0}

    def average(arrivals: str, order: list[str] | None) -> np.ndarray:
        averager, called = StreamingAverager(), []
        adds = SiteOrderedAdds(order)
        for s in arrivals:
            adds.add(s, lambda s=s: (called.append(s), averager.add(updates[s], weights[s])))
        adds.flush()
        assert called == ([x for x in order if x in arrivals] if order else list(arrivals))
        return averager.result()["w"]

    unordered = {average(p, None).tobytes() for p in ("abcd", "dcba", "cadb", "bdac")}
    assert len(unordered) > 1  # the effect being fixed exists for these numbers
    ordered = {average(p, list("abcd")).tobytes() for p in ("abcd", "dcba", "cadb", "bdac")}
    assert len(ordered) == 1
    assert average("dab", list("abcd")).tobytes() == average("abd", list("abcd")).tobytes()  # c left out
    adds = SiteOrderedAdds(["a", "b"])
    adds.add("a", lambda: None)
    with pytest.raises(ValueError, match="not expected"):
        adds.add("a", lambda: None)


# ---------------------------------------------------------------------------------------------- update norm bound
def test_clip_update_scales_a_long_update_to_the_bound() -> None:
    from fednnunet.aggregation import clip_update, update_norm

    base = {"a": np.zeros(2, np.float32), "b": np.ones((1, 2), np.float64), "n": np.array(7, np.int64)}
    update = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[1.0, 5.0]]), "n": np.array(9, np.int64)}
    # the change over every float array together: (3, 0) and (0, 4) -> norm 5; integers do not count
    assert update_norm(update, base) == pytest.approx(5.0)
    clipped, norm = clip_update(update, base, 1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [[1.0, 1.8]])
    assert clipped["a"].dtype == np.float32 and clipped["b"].dtype == np.float64
    assert clipped["n"] is update["n"]  # an integer buffer is never scaled
    assert update_norm(clipped, base) == pytest.approx(1.0)
    # within the bound: the same arrays, unchanged (plain FedAvg maths)
    same, norm = clip_update(update, base, 5.5)
    assert norm == pytest.approx(5.0) and all(same[k] is update[k] for k in update)
    for bad in (0.0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError):
            clip_update(update, base, bad)


def test_update_norm_of_a_large_array_in_blocks() -> None:
    from fednnunet.aggregation import update_norm

    rng = np.random.default_rng(3)
    base = {"w": rng.standard_normal(3_000_001).astype(np.float32)}
    update = {"w": base["w"] + rng.standard_normal(3_000_001).astype(np.float32)}
    expected = np.linalg.norm(update["w"].astype(np.float64) - base["w"].astype(np.float64))
    assert update_norm(update, base) == pytest.approx(expected, rel=1e-12)


def test_clipped_fedavg_bounds_one_sites_influence() -> None:
    """A hostile site sends a huge update: after clipping, the average moves by at most its weight share x C."""
    from fednnunet.aggregation import clip_update

    rng = np.random.default_rng(5)
    g = {"w": rng.standard_normal(100).astype(np.float32)}
    honest = [{"w": g["w"] + np.float32(0.01) * rng.standard_normal(100).astype(np.float32)} for _ in range(3)]
    hostile = {"w": g["w"] + np.float32(1e6)}
    bound, weights = 1.0, [1.0, 1.0, 1.0, 1.0]
    plain = fedavg(honest + [hostile], weights)
    assert np.linalg.norm(plain["w"] - g["w"]) > 1e5
    clipped = [clip_update(u, g, bound)[0] for u in honest + [hostile]]
    honest_avg = fedavg(honest, [1.0, 1.0, 1.0])
    robust = fedavg(clipped, weights)
    # honest updates are short: unchanged; the hostile one moves the average by at most 1/4 x C
    assert all(c["w"] is u["w"] for c, u in zip(clipped[:3], honest))
    shift = np.linalg.norm(robust["w"].astype(np.float64) - (3 * honest_avg["w"] + g["w"]) / 4)
    assert shift <= 0.25 * bound * (1 + 1e-5)


def test_aggregation_strategies_behind_the_seam() -> None:
    """The training loop's seam (aggregation/strategy.py): FedAvg writes into the global model's own arrays, FedAvgM
    saves and restores its velocity, AsymFedAvg keeps one model per site; FedAvg refuses sites with other networks."""
    from types import SimpleNamespace

    from fednnunet.aggregation import ModelSpec, aggregation_strategy
    from fednnunet.aggregation.strategy import GLOBAL, AsymFedAvg, FedAvg, FedAvgM

    def options(server_momentum: float = 0.0, asym_scope: str = "all") -> SimpleNamespace:
        return SimpleNamespace(server_momentum=server_momentum, asym_scope=asym_scope, local_norm=False)

    init = {"a": {"w": np.zeros(2, np.float32)}, "b": {"w": np.ones(2, np.float32)}}
    specs = {s: ModelSpec.of(m) for s, m in init.items()}
    fedavg_ = aggregation_strategy(False, options(), specs)
    assert type(fedavg_) is FedAvg and fedavg_.model_key("b") == GLOBAL
    models = fedavg_.initial_models(init, ["a", "b"])
    own = models[GLOBAL]["w"]
    fedavg_.start_round()
    fedavg_.add("a", {"w": np.full(2, 1.0, np.float32)}, 1.0)
    fedavg_.add("b", {"w": np.full(2, 4.0, np.float32)}, 3.0)
    assert fedavg_.apply(models) == {} and models[GLOBAL]["w"] is own
    np.testing.assert_array_equal(own, [3.25, 3.25])

    momentum = aggregation_strategy(False, options(server_momentum=0.5), specs)
    assert type(momentum) is FedAvgM
    models = momentum.initial_models(init, ["a", "b"])
    momentum.start_round()
    momentum.add("a", {"w": np.full(2, 2.0, np.float32)}, 1.0)
    momentum.apply(models)
    saved = momentum.saved_models(models)
    assert sorted(saved[GLOBAL]) == ["server_velocity/w", "w"]
    resumed = aggregation_strategy(False, options(server_momentum=0.5), specs)
    resumed.restore(saved)
    assert list(saved[GLOBAL]) == ["w"]
    np.testing.assert_array_equal(resumed.momentum.velocity["w"], [-2.0, -2.0])
    plain = {GLOBAL: dict(momentum.saved_models(models)[GLOBAL])}
    aggregation_strategy(False, options(), specs).restore(plain)  # a FedAvgM state resumed without momentum
    assert list(plain[GLOBAL]) == ["w"]

    other = {"a": specs["a"], "b": ModelSpec.of({"w": np.zeros(3, np.float32)})}
    with pytest.raises(ValueError, match="sites a and b have different networks"):
        aggregation_strategy(False, options(), other)
    with pytest.raises(ValueError, match="--server-momentum applies to FFE"):
        aggregation_strategy(True, options(server_momentum=0.5), other)
    asym = aggregation_strategy(True, options(), other)
    assert type(asym) is AsymFedAvg and asym.model_key("b") == "b"
    models = asym.initial_models({"a": init["a"], "b": {"w": np.zeros(3, np.float32)}}, ["a", "b"])
    asym.start_round()
    asym.add("a", {"w": np.ones(2, np.float32)}, 1.0)
    asym.add("b", {"w": np.ones(3, np.float32)}, 1.0)
    assert asym.apply(models) == {"asym_fraction_averaged": {"a": 0.0, "b": 0.0}}
