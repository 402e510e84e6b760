"""Validation of model options: each family declares a frozen dataclass of its options.

Option names and types come from the dataclass fields, so adding an option is one line in
the family's module. Every mistake becomes a one-line :class:`ConfigError` naming the field
(``model.arch``, ``model.options.<name>``) and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

from ..errors import ConfigError
from ..typed import is_finite_number, is_integer

T = TypeVar("T")

ARCH_FIELD = "model.arch"
OPTION_FIELD = "model.options"


def option_field(name: str) -> str:
    """Dotted config name of one model option, used in error messages."""
    return f"{OPTION_FIELD}.{name}"


def require(condition: bool, name: str, expected: str, value: Any) -> None:
    """Raise a ConfigError for option ``name`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{option_field(name)}: expected {expected}, got {value!r}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is float:
        return "a finite number"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _matches(tp: Any, value: Any) -> bool:
    """Strict type check: bools are not ints, ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return is_integer(value)
    if tp is float:  # nan/inf are never meaningful option values
        return is_finite_number(value)
    return isinstance(value, tp)


def parse_options(arch: str, cls: type[T], options: Mapping[str, Any]) -> T:
    """Build the options dataclass ``cls`` from user ``options``, checking names and types.

    Range checks live in the dataclass's ``__post_init__`` (using :func:`require`).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, value in options.items():
        if name not in fields:
            raise ConfigError(
                f"{option_field(name)}: unknown option for {ARCH_FIELD}={arch!r}; "
                f"expected one of: {', '.join(fields) or '(none)'}")
        require(_matches(hints[name], value), name, _type_name(hints[name]), value)
        values[name] = float(value) if hints[name] is float else value
    return cls(**values)


def option_defaults(cls: type) -> dict[str, Any]:
    """Default value of every option of an options dataclass (name -> default)."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def check_input_shape(arch: str, input_shape: tuple[int, ...], ndim: int, layout: str) -> None:
    """Raise a ConfigError unless ``input_shape`` has ``ndim`` positive integer dims."""
    ok = (len(input_shape) == ndim
          and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape))
    if not ok:
        raise ConfigError(f"{ARCH_FIELD}={arch!r}: input shape {tuple(input_shape)} does not fit; "
                          f"expected {layout} with positive sizes")
