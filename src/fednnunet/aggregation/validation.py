"""Checks on what a site sends before the server lets it near the global model.

Why: one site's bad update (a NaN from a diverged run, a model from another plan, a tampered or
oversized message) would otherwise poison every site's model after averaging, or exhaust server memory.
Each check raises :class:`UpdateRejected` with a reason precise enough to act on from the server log.
Pure numpy, no Flower: the server converts messages to ``dict[str, np.ndarray]`` first.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["ModelSpec", "UpdateRejected", "validate_metrics", "validate_update"]

logger = logging.getLogger(__name__)

_MAX_NAME_CHARS = 80  # names come from the peer: keep log lines bounded
_MAX_NAMES_LISTED = 5


class UpdateRejected(ValueError):
    """A site's update or metrics failed validation; the message says why."""


def _name(name: object) -> str:
    """Quote a (possibly hostile, possibly huge) parameter name for a message."""
    text = repr(name)
    return text if len(text) <= _MAX_NAME_CHARS else text[: _MAX_NAME_CHARS - 3] + "..."


def _names(names: Iterable[object]) -> str:
    listed = sorted(names, key=str)
    shown = ", ".join(_name(n) for n in listed[:_MAX_NAMES_LISTED])
    more = len(listed) - _MAX_NAMES_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _plural(count: int, word: str) -> str:
    return word if count == 1 else word + "s"


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB"


@dataclass(frozen=True)
class ModelSpec:
    """The expected layout of an update: parameter name -> (shape, dtype string).

    Built from the server's own reference model (:meth:`of`), so a site cannot choose it.
    """

    params: Mapping[str, tuple[tuple[int, ...], str]]

    @classmethod
    def of(cls, update: Mapping[str, np.ndarray]) -> ModelSpec:
        """The spec of ``update`` (names, shapes, dtype names such as ``'float32'``)."""
        return cls({name: (tuple(np.shape(a)), np.asarray(a).dtype.name) for name, a in update.items()})

    @property
    def num_values(self) -> int:
        """Total number of scalar values."""
        return sum(math.prod(shape) for shape, _ in self.params.values())

    @property
    def num_bytes(self) -> int:
        """Total size in bytes of an update that matches this spec."""
        return sum(math.prod(shape) * np.dtype(dt).itemsize for shape, dt in self.params.values())


def validate_update(
    update: Mapping[str, np.ndarray],
    spec: ModelSpec,
    *,
    max_bytes: int | None = None,
    allow_missing: bool = False,
) -> None:
    """Raise :class:`UpdateRejected` unless ``update`` matches ``spec`` exactly and is finite.

    Checks, in this order (cheap and size-bounding checks first, so a huge or malformed message is
    rejected before any pass over its values):

    1. ``update`` is a mapping of str names to numpy arrays;
    2. total size <= ``max_bytes`` (if given);
    3. no unexpected names; no missing names unless ``allow_missing`` (a partial update, e.g. the
       compatible layers only);
    4. per parameter: dtype equal to the spec's (no silent up/down-casting), shape equal;
    5. floating-point values are all finite (NaN/Inf counted in the message).
    """
    if not isinstance(update, Mapping):
        raise UpdateRejected(f"update must be a mapping of parameter names to arrays, got {type(update).__name__}")
    total = 0
    for name, arr in update.items():
        if not isinstance(name, str):
            raise UpdateRejected(f"parameter name {_name(name)} is a {type(name).__name__}, not a str")
        if not isinstance(arr, np.ndarray):
            raise UpdateRejected(f"parameter {_name(name)}: expected a numpy array, got {type(arr).__name__}")
        total += arr.nbytes
    if max_bytes is not None and total > max_bytes:
        raise UpdateRejected(
            f"update is {_mb(total)} ({total} bytes), above the limit of {_mb(max_bytes)} ({max_bytes} bytes)"
        )

    expected = spec.params
    unexpected = update.keys() - expected.keys()
    if unexpected:
        raise UpdateRejected(f"unexpected {_plural(len(unexpected), 'parameter')} {_names(unexpected)}")
    if not allow_missing:
        missing = expected.keys() - update.keys()
        if missing:
            raise UpdateRejected(f"missing {_plural(len(missing), 'parameter')} {_names(missing)}")

    for name, arr in update.items():
        shape, dtype = expected[name]
        if arr.dtype != np.dtype(dtype):
            raise UpdateRejected(f"parameter {_name(name)}: dtype {arr.dtype} != expected {np.dtype(dtype)}")
        if arr.shape != tuple(shape):
            raise UpdateRejected(f"parameter {_name(name)}: shape {arr.shape} != expected {tuple(shape)}")
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            # isfinite(...).all() costs less than a copy of the array; the exact counts are only
            # computed on the (rare) failure path.
            n_nan = int(np.count_nonzero(np.isnan(arr)))
            n_inf = int(np.count_nonzero(np.isinf(arr)))
            raise UpdateRejected(f"non-finite values in {_name(name)} ({n_nan} NaN, {n_inf} Inf)")
    logger.debug("update accepted: %d parameters, %d bytes", len(update), total)


def validate_metrics(metrics: Mapping[str, object], required: Mapping[str, type]) -> None:
    """Raise :class:`UpdateRejected` unless ``metrics`` holds every ``required`` key with its type.

    For the small scalar metrics a site reports (e.g. ``{"num_examples": int, "train_loss": float}``).
    ``float`` accepts any real number (ints and numpy scalars included), ``int`` accepts integers only;
    ``bool`` is never accepted as a number. Every numeric value, required or extra, must be finite,
    so a NaN loss or an infinite weight cannot reach the aggregation.
    """
    if not isinstance(metrics, Mapping):
        raise UpdateRejected(f"metrics must be a mapping, got {type(metrics).__name__}")
    missing = required.keys() - metrics.keys()
    if missing:
        raise UpdateRejected(f"missing {_plural(len(missing), 'metric')} {_names(missing)}")
    for key, value in metrics.items():
        is_bool = isinstance(value, (bool, np.bool_))
        want = required.get(key)
        if want is float:
            ok = isinstance(value, numbers.Real) and not is_bool
        elif want is int:
            ok = isinstance(value, numbers.Integral) and not is_bool
        else:
            ok = want is None or isinstance(value, want)
        if not ok:
            raise UpdateRejected(
                f"metric {_name(key)}: expected {want.__name__}, got {type(value).__name__}"  # type: ignore[union-attr]
            )
        if isinstance(value, numbers.Real) and not is_bool and not math.isfinite(float(value)):
            raise UpdateRejected(f"metric {_name(key)} is not finite: {value!r}")
