"""YAML as cafedist reads and writes it: plain data, numbers as people write them, no surprises.

PyYAML implements YAML 1.1, whose implicit types surprise in a config: ``010`` is 8 (octal),
``1:30`` is 90 (base 60), ``5e-4`` and ``1e-3`` are strings (a 1.1 float needs a dot), a date
becomes a ``datetime``, and a repeated key silently replaces the first. :class:`ConfigLoader`
reads numbers as YAML 1.2's core schema does (``010`` is 10, ``0o10`` is 8, ``0x1f`` is 31,
``5e-4`` is 0.0005; no base 60, no underscores), leaves dates as text, and refuses what is not
plain data: a repeated key, an alias to a node that contains it (a cycle), the ``!!binary``,
``!!set``, ``!!omap``, ``!!pairs`` and ``!!timestamp`` tags, and nesting too deep to read.
Booleans stay YAML 1.1's (``yes``/``no``/``on``/``off`` too), as configs have used them.

:class:`ConfigDumper` writes with the same rules, so a string that would read back as a number
(``1e3``) is quoted: whatever :func:`dump` writes, :func:`load` reads back unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_INT = re.compile(r"^(?:[-+]?[0-9]+|[-+]?0o[0-7]+|[-+]?0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_DROPPED = {_INT_TAG, _FLOAT_TAG, "tag:yaml.org,2002:timestamp"}
_REFUSED_TAGS = ("binary", "set", "omap", "pairs", "timestamp")


def _resolvers() -> dict[str | None, list[tuple[str, re.Pattern]]]:
    """SafeLoader's implicit resolvers without 1.1's ints, floats and timestamps, plus 1.2's
    ints and floats (an int pattern is tried before the float one that also matches it)."""
    table: dict[str | None, list[tuple[str, re.Pattern]]] = {}
    for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items():
        kept = [(tag, regexp) for tag, regexp in entries if tag not in _DROPPED]
        if kept:
            table[first] = kept
    for first in list("-+0123456789"):
        table.setdefault(first, []).extend([(_INT_TAG, _INT), (_FLOAT_TAG, _FLOAT)])
    table.setdefault(".", []).append((_FLOAT_TAG, _FLOAT))
    return table


class ConfigLoader(yaml.SafeLoader):
    """A SafeLoader with YAML 1.2 numbers that refuses repeated keys, cycles and non-plain tags."""

    yaml_implicit_resolvers = _resolvers()

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._open_anchors: set[str] = set()

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if event.anchor in self._open_anchors:
                raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} refers to a node that "
                                                  f"contains it (a cycle)", event.start_mark)
            return super().compose_node(parent, index)
        anchor = getattr(self.peek_event(), "anchor", None)
        if anchor is not None:
            self._open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._open_anchors.discard(anchor)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        # the mapping's own keys, before merge keys (<<) bring in others it may override
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) or key is None:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                                key_node.start_mark)
                    seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _construct_int(loader: ConfigLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    sign, body = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
    if body[:2] == "0o":
        return sign * int(body[2:], 8)
    if body[:2] == "0x":
        return sign * int(body[2:], 16)
    return sign * int(body, 10)


def _construct_float(loader: ConfigLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    if text.lstrip("+-") == ".inf":
        return float("-inf") if text[0] == "-" else float("inf")
    if text == ".nan":
        return float("nan")
    return float(text)


def _refuse(tag: str):
    def construct(loader: ConfigLoader, node: Any) -> Any:
        raise yaml.constructor.ConstructorError(None, None, f"the tag !!{tag} is not plain data (not accepted here)",
                                                node.start_mark)
    return construct


ConfigLoader.add_constructor(_INT_TAG, _construct_int)
ConfigLoader.add_constructor(_FLOAT_TAG, _construct_float)
for _tag in _REFUSED_TAGS:
    ConfigLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse(_tag))


class ConfigDumper(yaml.SafeDumper):
    """A SafeDumper that quotes by :class:`ConfigLoader`'s rules (``'1e3'`` stays a string)."""

    yaml_implicit_resolvers = ConfigLoader.yaml_implicit_resolvers


def load(text: str) -> Any:
    """``text`` as plain data (None for an empty document); yaml.YAMLError when it is not
    valid YAML or not plain data, nesting too deep included."""
    try:
        return yaml.load(text, Loader=ConfigLoader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


def compose(text: str) -> Any:
    """The node tree of ``text`` (nodes keep their line numbers), with :func:`load`'s rules on
    what resolves to what; yaml.YAMLError as :func:`load`."""
    try:
        return yaml.compose(text, Loader=ConfigLoader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


def dump(data: Any) -> str:
    """``data`` as YAML text in the given key order that :func:`load` reads back unchanged."""
    return yaml.dump(data, Dumper=ConfigDumper, sort_keys=False)


def problem(exc: yaml.YAMLError) -> str:
    """' at line N (what is wrong)' for an error message (parts it does not know left out)."""
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or (str(exc) if type(exc) is yaml.YAMLError else None)
    return (f" at line {mark.line + 1}" if mark is not None else "") + (f" ({what})" if what else "")
