"""Aggregation at scale: time and server peak memory to aggregate K site updates (issue 6, item 2).

What is measured is the project's own aggregation code, the way a server calls it:

* ``ffe``: FedAvg with :class:`~fednnunet.aggregation.StreamingAverager`, updates added one at a time as
  they arrive, then :meth:`~fednnunet.aggregation.StreamingAverager.result`.
* ``asym_stream``: AsymFedAvg with :class:`~fednnunet.aggregation.StreamingAsymAverager` (groups fixed
  from every site's ``ModelSpec``), updates added one at a time as they arrive, then ``result()``.
* ``asym``: :func:`~fednnunet.aggregation.asym_fedavg` called once with a dict of all K updates (the
  all-at-once API, for comparison: it needs every update in memory at the same time).

For the AsymFedAvg modes a quarter of the sites (at least one) have a different network for a few layers
(an anisotropic site: kernel (1, 3, 3) in the two highest-resolution stages and stride (1, 2, 2) in the
second), so not everything matches.

Rounds. A server keeps its aggregator from round to round (``reset()`` between rounds) and, for FFE, writes
the result into a preallocated model (``result(out=...)``). ``aggregate_s`` is the best of ``repeats`` such
steady-state rounds (K adds + result); ``first_round_s`` is the round of a new aggregator (fresh float64
sums, fresh result arrays), reported separately.

Updates arrive as new arrays (``base * (1 + 1e-3 k)``, computed untimed, like a decoded message), not in a
reused buffer: the streaming aggregators keep references to what they still need (FedAvg: the latest
update, or the first two; AsymFedAvg also each site's possibly-local layers) instead of copying, so a
reused buffer would be wrong and would hide that memory.

Memory is measured with :mod:`tracemalloc` (numpy reports its array allocations to it) as the peak
above the memory in use just before the round starts. For the streaming modes the updates are created
inside that window, so ``server_mb`` is everything the round needs (updates in flight included) and
``peak_mb`` = ``server_mb`` minus the one update being received (the aggregator's own growth, comparable
to the all-at-once mode); ``peak_mb`` is for a first round (the most memory), ``steady_peak_mb`` for a
later one (reused sums; FFE result into the preallocated model). For ``asym_fedavg`` by default
(``asym_inputs="shared"``) the K input dicts share the arrays of two base updates, built before the window,
so ``peak_mb`` is its own growth and ``inputs_held_mb`` what the API forces a real server to hold (K
decoded updates); ``asym_inputs="distinct"`` builds K real copies inside the window instead (use small K).

Baseline: a plain ``np.copyto`` of the same K updates (same sizes, arriving the same way, untimed) into a
preallocated update-sized buffer, timed in the same run; the best of ``repeats`` passes, so
``ratio`` = ``aggregate_s`` / ``copy_s`` compares like with like.
"""

from __future__ import annotations

import gc
import math
import time
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fednnunet.aggregation import (ModelSpec, StreamingAsymAverager, StreamingAverager, asym_fedavg,
                                   validate_update)

__all__ = ["bench_aggregate", "format_aggregate_table", "model_shapes"]

Update = dict[str, np.ndarray]
Shapes = dict[str, tuple[int, ...]]

MODES = ("ffe", "asym_stream", "asym")

# nnU-Net 3d_fullres PlainConvUNet of a typical dataset: 6 stages, 2 convs per stage (encoder and decoder),
# InstanceNorm with affine, conv bias, deep supervision (a 1x1x1 seg layer per decoder stage), 1 input channel
# and 3 classes. At scale 1 this is exactly nnU-Net's network: 108 unique tensors, 31,196,399 values.
_BASE_FEATURES = (32, 64, 128, 256, 320, 320)
_IN_CHANNELS = 1
_NUM_CLASSES = 3


def _unet_shapes(scale: float, variant: bool) -> Shapes:
    """Names and shapes of the alias-free state dict of a PlainConvUNet, in ``state_dict`` order.

    ``variant`` is an anisotropic site: kernel (1, 3, 3) in stages 0-1 (and the decoder stages that mirror
    them) and stride (1, 2, 2) in stage 1 (so the last transposed conv differs too): 9 weights change shape.
    """
    feats = [max(1, round(f * scale)) for f in _BASE_FEATURES]
    n = len(feats)
    kernels = [(1, 3, 3) if variant and i < 2 else (3, 3, 3) for i in range(n)]
    strides = [(1, 1, 1)] + [(1, 2, 2) if variant and i == 1 else (2, 2, 2) for i in range(1, n)]
    shapes: Shapes = {}

    def conv_block(prefix: str, cin: int, cout: int, kernel: tuple[int, ...]) -> None:
        shapes[f"{prefix}.conv.weight"] = (cout, cin, *kernel)
        shapes[f"{prefix}.conv.bias"] = (cout,)
        shapes[f"{prefix}.norm.weight"] = (cout,)
        shapes[f"{prefix}.norm.bias"] = (cout,)

    prev = _IN_CHANNELS
    for i, f in enumerate(feats):
        for j in range(2):
            conv_block(f"encoder.stages.{i}.0.convs.{j}", prev if j == 0 else f, f, kernels[i])
        prev = f
    for s in range(n - 1):  # decoder stage s mirrors encoder stage n-2-s; input = skip + upsampled
        e = n - 2 - s
        for j in range(2):
            conv_block(f"decoder.stages.{s}.convs.{j}", 2 * feats[e] if j == 0 else feats[e], feats[e], kernels[e])
    for s in range(n - 1):  # upsamples from stage n-1-s to n-2-s with that stage's stride as kernel
        shapes[f"decoder.transpconvs.{s}.weight"] = (feats[n - 1 - s], feats[n - 2 - s], *strides[n - 1 - s])
        shapes[f"decoder.transpconvs.{s}.bias"] = (feats[n - 2 - s],)
    for s in range(n - 1):
        shapes[f"decoder.seg_layers.{s}.weight"] = (_NUM_CLASSES, feats[n - 2 - s], 1, 1, 1)
        shapes[f"decoder.seg_layers.{s}.bias"] = (_NUM_CLASSES,)
    return shapes


def _count(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes.values())


def model_shapes(params: float = 30e6, variant: bool = False) -> Shapes:
    """Shapes of an nnU-Net-like 3D U-Net with about ``params`` values (108 tensors).

    The channel widths of nnU-Net's 3d_fullres network (32 ... 320) are scaled by one factor chosen so the
    total comes closest to ``params``; ``variant=True`` gives the anisotropic-site network of the same
    width (a few layers differ in shape, the rest match).
    """
    if params < 1:
        raise ValueError(f"params must be >= 1, got {params!r}")
    lo, hi = 1e-3, 64.0
    for _ in range(60):  # bisection on the (monotone) count; rounding makes it a step function
        mid = math.sqrt(lo * hi)
        if _count(_unet_shapes(mid, False)) < params:
            lo = mid
        else:
            hi = mid
    scale = min((lo, hi), key=lambda s: abs(_count(_unet_shapes(s, False)) - params))
    return _unet_shapes(scale, variant)


def _random_update(shapes: Shapes, seed: int, reuse: Mapping[str, np.ndarray] | None = None) -> Update:
    """float32 arrays ~ N(0, 0.01^2); arrays of ``reuse`` with the same shape are shared, not copied."""
    rng = np.random.default_rng(seed)
    out: Update = {}
    for name, shape in shapes.items():
        if reuse is not None and name in reuse and reuse[name].shape == shape:
            out[name] = reuse[name]
            continue
        arr = rng.standard_normal(math.prod(shape), dtype=np.float32).reshape(shape)
        arr *= np.float32(0.01)
        out[name] = arr
    return out


def _arrive(base: Mapping[str, np.ndarray], k: int) -> Update:
    """Site ``k``'s update as the server gets it: new arrays (``base * (1 + 1e-3 k)``), like a decoded message.

    New arrays, not a reused buffer: the aggregators keep references to added arrays (the first update until
    the second arrives, a site's possibly-local layers until the result), as a real server's would.
    """
    factor = np.float32(1.0 + 1e-3 * k)
    return {name: np.multiply(arr, factor) for name, arr in base.items()}


def _nbytes(update: Mapping[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in update.values())


def _peak_growth(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` and return (its result, peak traced bytes above what was in use when it started).

    The result is still referenced when the peak is read, so what the aggregator returns counts.
    Works whether or not tracemalloc was already running (it is left as it was).
    """
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
        return result, peak - start
    finally:
        if not was_tracing:
            tracemalloc.stop()


def _variant_sites(k: int) -> set[int]:
    """A quarter of ``k`` sites (at least one), spread out: the last, then every fourth from the end."""
    return {k - 1 - 4 * i for i in range(max(1, k // 4))}


def _bench_one(mode: str, k: int, base_a: Update, base_b: Update, dst_a: Update, dst_b: Update, repeats: int,
               asym_scope: str, asym_inputs: str) -> dict[str, Any]:
    weights = [float(5 + i % 7) for i in range(k)]  # "cases per site", so the average is weighted
    variant = _variant_sites(k) if mode != "ffe" else set()
    sites = [f"site{i:02d}" for i in range(k)]
    spec_a, spec_b = ModelSpec.of(base_a), ModelSpec.of(base_b)
    update_bytes = _nbytes(base_a)

    def base_of(i: int) -> Update:
        return base_b if i in variant else base_a

    def copy_pass() -> float:
        t = 0.0
        for i in range(k):
            src = _arrive(base_of(i), i)  # untimed, as in every pass
            dst = dst_b if i in variant else dst_a
            t0 = time.perf_counter()
            for name, arr in src.items():
                np.copyto(dst[name], arr)
            t += time.perf_counter() - t0
            del src
        return t

    def validate_pass() -> float:
        t = 0.0
        for i in range(k):
            src = _arrive(base_of(i), i)
            t0 = time.perf_counter()
            validate_update(src, spec_b if i in variant else spec_a)
            t += time.perf_counter() - t0
            del src
        return t

    if mode in ("ffe", "asym_stream"):
        def new_aggregator() -> Any:
            if mode == "ffe":
                return StreamingAverager()
            return StreamingAsymAverager({s: (spec_b if i in variant else spec_a) for i, s in enumerate(sites)},
                                         asym_scope)

        def agg_pass(agg: Any, steady: bool) -> tuple[float, Any]:
            """One round: K updates arrive (untimed) and are added (timed), then the result (timed).

            ``steady``: a later round of a server that keeps ``agg``: reset, and (FFE) the result written
            into the preallocated global model. Otherwise a first round: fresh sums, fresh result.
            """
            t0 = time.perf_counter()
            agg.reset()
            t = time.perf_counter() - t0
            for i in range(k):
                src = _arrive(base_of(i), i)  # the update arriving, decoded: untimed
                t0 = time.perf_counter()
                if mode == "ffe":
                    agg.add(src, weights[i])
                else:
                    agg.add(sites[i], src, weights[i])
                t += time.perf_counter() - t0
                del src  # the server drops it; the aggregator keeps what it needs
            t0 = time.perf_counter()
            result = agg.result(out=dst_a) if mode == "ffe" and steady else agg.result()
            t += time.perf_counter() - t0
            return t, result

        kept = new_aggregator()
        first_s, result = agg_pass(kept, steady=False)
        del result
        agg_times = []
        copy_times, val_times = [], []
        for _ in range(repeats):
            t, result = agg_pass(kept, steady=True)
            agg_times.append(t)
            del result
            copy_times.append(copy_pass())
            val_times.append(validate_pass())
        # Memory, updates arriving inside the traced window: server_mb is everything the round allocates
        # (updates in flight included); peak_mb leaves out the one update being received, as for asym_fedavg.
        (_, result), server = _peak_growth(lambda: agg_pass(new_aggregator(), steady=False))
        del result
        (_, result), steady_server = _peak_growth(lambda: agg_pass(kept, steady=True))
        peak, steady_peak = server - update_bytes, steady_server - update_bytes
        held_bytes = update_bytes  # one update in flight
    elif mode == "asym":
        weight_of = dict(zip(sites, weights))

        def make_inputs() -> dict[str, Update]:
            if asym_inputs == "distinct":
                return {s: _arrive(base_of(i), i) for i, s in enumerate(sites)}
            return {s: dict(base_of(i)) for i, s in enumerate(sites)}

        def agg_pass_all() -> tuple[float, Any]:
            updates = make_inputs()
            t0 = time.perf_counter()
            result = asym_fedavg(updates, weight_of, asym_scope)
            return time.perf_counter() - t0, result

        agg_times, copy_times, val_times = [], [], []
        for _ in range(repeats):
            t, result = agg_pass_all()
            agg_times.append(t)
            del result
            copy_times.append(copy_pass())
            val_times.append(validate_pass())
        first_s = agg_times[0]  # asym_fedavg starts from scratch on every call
        held_bytes = sum(_nbytes(base_of(i)) for i in range(k))  # asym_fedavg needs every update at once
        if asym_inputs == "distinct":
            (_, result), peak = _peak_growth(agg_pass_all)  # the K copies are built inside the window: they count
            server = peak
        else:
            inputs = make_inputs()  # shared arrays, built before the window: only asym_fedavg's own growth counts
            result, peak = _peak_growth(lambda: asym_fedavg(inputs, weight_of, asym_scope))
            del inputs
            server = peak + held_bytes
        steady_peak = peak
    else:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")

    if mode == "ffe":
        averaged_frac, local_bytes = 1.0, 0
    else:
        stats = result[1].sites
        averaged_frac = min(st.fraction_averaged for st in stats.values())
        local_bytes = max(st.values_local for st in stats.values()) * 4
    del result

    agg_s, copy_s, val_s = min(agg_times), min(copy_times), min(val_times)
    mb = 1e6
    return {
        "mode": mode, "sites": k, "params": sum(a.size for a in base_a.values()), "tensors": len(base_a),
        "update_mb": update_bytes / mb, "aggregate_s": agg_s, "copy_s": copy_s,
        "ratio": agg_s / copy_s if copy_s > 0 else float("inf"),
        "first_round_s": first_s, "first_round_ratio": first_s / copy_s if copy_s > 0 else float("inf"),
        "validate_s": val_s, "ratio_with_validate": (agg_s + val_s) / copy_s if copy_s > 0 else float("inf"),
        "peak_mb": peak / mb, "peak_per_update": peak / update_bytes, "steady_peak_mb": steady_peak / mb,
        "inputs_held_mb": held_bytes / mb, "server_mb": server / mb,
        "variant_sites": len(variant), "min_fraction_averaged": averaged_frac,
        "local_mb_per_site": local_bytes / mb,
        "asym_scope": asym_scope if mode != "ffe" else None,
        "asym_inputs": asym_inputs if mode == "asym" else None,
    }


def bench_aggregate(sites: Sequence[int] = (2, 4, 8, 16, 32, 64), params: float = 30e6, repeats: int = 3,
                    modes: Sequence[str] = MODES, *, asym_scope: str = "all",
                    asym_inputs: str = "shared", seed: int = 0,
                    progress: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Time and server peak memory of aggregating K float32 updates of ``params`` values, per K and mode.

    Returns one dict per (mode, K), in that order, with (among others) ``aggregate_s`` (best of
    ``repeats`` steady-state rounds: reset + K x add + result, or one ``asym_fedavg`` call),
    ``first_round_s`` (a new aggregator's round), ``copy_s`` (best plain ``np.copyto`` of the same K x update
    bytes), ``ratio`` = aggregate_s / copy_s, ``first_round_ratio``, ``peak_mb`` (tracemalloc peak growth of
    a first round, the update being received excluded), ``steady_peak_mb`` (same, a later round),
    ``update_mb``, ``inputs_held_mb`` (updates the API needs in memory at once: 1 for the streaming modes, K
    for ``asym_fedavg``), ``server_mb`` (the round's whole peak: updates in flight included),
    ``validate_s`` (K x ``validate_update``, which the server runs before adding) and
    ``ratio_with_validate``. ``modes``: any of ``"ffe"``, ``"asym_stream"``, ``"asym"``. ``progress`` is
    called with each row as soon as it is measured.
    """
    sites = [int(k) for k in sites]
    if not sites or min(sites) < 1:
        raise ValueError(f"sites must be positive integers, got {sites!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {MODES}")
    if asym_inputs not in ("shared", "distinct"):
        raise ValueError(f"asym_inputs must be 'shared' or 'distinct', got {asym_inputs!r}")

    base_a = _random_update(model_shapes(params, variant=False), seed)
    base_b = _random_update(model_shapes(params, variant=True), seed + 1, reuse=base_a)
    dst_a = {n: np.empty_like(a) for n, a in base_a.items()}
    dst_b = {n: (dst_a[n] if base_b[n] is base_a[n] else np.empty_like(a)) for n, a in base_b.items()}
    for arrays in (dst_a, dst_b):  # touch every page now, not inside the first timed pass
        for arr in arrays.values():
            arr.fill(0)

    rows: list[dict[str, Any]] = []
    for mode in modes:
        for k in sites:
            row = _bench_one(mode, k, base_a, base_b, dst_a, dst_b, repeats, asym_scope, asym_inputs)
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


_COLUMNS = (
    ("mode", "{:<11}", "{:<11}"), ("sites", "{:>5}", "{:>5d}"), ("update_mb", "{:>9}", "{:>9.1f}"),
    ("aggregate_s", "{:>11}", "{:>11.3f}"), ("copy_s", "{:>8}", "{:>8.3f}"), ("ratio", "{:>6}", "{:>6.2f}"),
    ("first_round_s", "{:>13}", "{:>13.3f}"), ("validate_s", "{:>10}", "{:>10.3f}"),
    ("peak_mb", "{:>8}", "{:>8.1f}"), ("steady_peak_mb", "{:>14}", "{:>14.1f}"),
    ("inputs_held_mb", "{:>14}", "{:>14.1f}"), ("server_mb", "{:>9}", "{:>9.1f}"),
)


def format_aggregate_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width text table of :func:`bench_aggregate` rows (one line per mode and K)."""
    lines = [" ".join(head.format(name) for name, head, _ in _COLUMNS)]
    for row in rows:
        lines.append(" ".join(cell.format(row[name]) for name, _, cell in _COLUMNS))
    return "\n".join(lines)
