"""Dataclasses to JSON-ready dicts and back, with every field's type checked against its annotation.

Why not trust the dict: a site's reply is data from another organisation's machine (and a request, at the site,
is data from the network). Decoding checks the shape once, here, and names the message and the field that is
wrong; the code that uses a message then reads typed attributes. Supported annotations: ``bool``, ``int``,
``float`` (an int is accepted and converted), ``str``, ``Any`` (any JSON value), ``X | None``, ``list[X]``,
``dict[str, X]``, ``Literal[...]`` and nested dataclasses. Unknown keys are an error: both ends run the same
version (``describe`` checks it), so an unknown key is a fault, not a newer peer.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import lru_cache
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class WireError(ValueError):
    """A message does not have the shape its dataclass declares; the text names the message and the field."""


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked (and for floats converted) against annotation ``tp``; raises WireError."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise WireError(f"{where}: missing value (null)")
        kinds = [option for option in options if option is not type(None)]
        if len(kinds) == 1:  # X | None: X's own error says what is wrong
            return _convert(value, kinds[0], where)
        for option in kinds:
            try:
                return _convert(value, option, where)
            except WireError:
                continue
        raise WireError(f"{where}: {_short(value)} is none of {tp}")
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            raise WireError(f"{where}: {_short(value)} is not one of {typing.get_args(tp)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise WireError(f"{where}: expected a list, got {_short(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise WireError(f"{where}: expected an object, got {_short(value)}")
        key_type, item = typing.get_args(tp)
        if key_type is not str:
            raise TypeError(f"{where}: only str keys are supported")
        if not all(isinstance(k, str) for k in value):
            raise WireError(f"{where}: keys must be strings")
        return {k: _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return decode(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise WireError(f"{where}: expected true or false, got {_short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise WireError(f"{where}: expected an integer, got {_short(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WireError(f"{where}: expected a number, got {_short(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise WireError(f"{where}: expected a string, got {_short(value)}")
        return value
    raise TypeError(f"{where}: annotation {tp!r} is not supported by the protocol codec")


def decode(cls: type[T], data: Any, where: str) -> T:
    """An instance of dataclass ``cls`` from ``data`` (a decoded JSON object), every field checked.

    ``where`` names the message in errors (e.g. "site h1: train_round reply")."""
    if not isinstance(data, Mapping):
        raise WireError(f"{where}: expected an object, got {_short(data)}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise WireError(f"{where}: unknown field(s) {', '.join(map(str, unknown[:10]))}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _convert(data[name], hints[name], f"{where}: {name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise WireError(f"{where}: missing field {name}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:  # a dataclass's own checks (__post_init__)
        raise WireError(f"{where}: {err}") from None


def encode(obj: Any) -> dict[str, Any]:
    """The JSON-ready dict of dataclass ``obj`` (nested dataclasses too); what :func:`decode` reads back."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return encode(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
