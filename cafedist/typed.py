"""Dataclasses from plain data (YAML, JSON): strict type checks with one-line errors.

:func:`build_dataclass` instantiates a (nested) dataclass from a mapping, rejecting unknown keys
and values of the wrong type (``data.clients: expected an integer (64-bit), got 'ten'``); a
dataclass's own ``checks()`` (algorithm parameters: ``(field, ok, expected)``) and
``validate()`` (the config's sections) then run. The config (:mod:`cafedist.config`) is built
this way.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal

from cafedist.errors import ConfigError


def type_name(tp: Any) -> str:
    """How an error message names what annotation ``tp`` accepts."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def is_integer(value: Any) -> bool:
    """An int that is not a bool (``True`` is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A number that is neither nan nor infinite."""
    # nan/inf (YAML .nan/.inf) are never meaningful settings: lr=.inf "trains" to chance
    try:
        return is_number(value) and math.isfinite(value)
    except OverflowError:  # an int beyond any float (309 digits and more)
        return False


# annotation -> (accepts the YAML value?, conversion, what the error says was expected)
_SCALARS: dict[Any, tuple[Any, Any, str]] = {
    bool: (lambda v: isinstance(v, bool), bool, "true or false"),
    # 64 bits: what torch tensors, generators and HDF5 attributes hold
    int: (lambda v: is_integer(v) and -2**63 <= v < 2**63, int,
          "an integer (64-bit)"),
    float: (is_finite_number, float, "a finite number"),
    str: (lambda v: isinstance(v, str), str, "a string"),
    dict: (lambda v: isinstance(v, dict), dict, "a mapping"),
    list: (lambda v: isinstance(v, (list, tuple)), list, "a list"),
}


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: expected {type_name(tp)}, got {value!r}")
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if tp in _SCALARS or origin in (dict, list) or tp in (dict, list):
        accepts, convert, expected = _SCALARS[origin or tp]
        if accepts(value):
            return convert(value)
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    return value


def build_dataclass(cls: type, values: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    prefix = f"{where}." if where else ""
    if unknown:
        known = f"known: {', '.join(sorted(fields))}" if fields else "this section takes no keys"
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key ({known})")
    obj = cls(**{name: coerce(value, hints[name], prefix + name) for name, value in values.items()})
    for name, ok, expected in obj.checks() if hasattr(obj, "checks") else ():  # algorithm parameters
        if not ok:
            raise ConfigError(f"{prefix}{name}: must be {expected}, got {getattr(obj, name)!r}")
    if hasattr(obj, "validate"):  # the config's own sections
        obj.validate()
    return obj
