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
        self._checked: set[int] = set()  # mapping nodes whose own keys were checked

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

    def flatten_mapping(self, node: Any) -> None:
        # the mapping's own keys, checked before merge keys (<<) bring in others it may override;
        # once per node, as merging writes the inherited keys into a merged-in node itself
        if id(node) not in self._checked:
            self._checked.add(id(node))
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
        super().flatten_mapping(node)


def _scalar_text(loader: ConfigLoader, node: Any, pattern: re.Pattern, kind: str) -> str:
    """A scalar's text when it is written as ``kind`` (an explicit ``!!int x`` too must be one)."""
    text = loader.construct_scalar(node)
    if not isinstance(text, str) or not pattern.match(text):
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not {kind}", node.start_mark)
    return text


def _construct_int(loader: ConfigLoader, node: yaml.ScalarNode) -> int:
    text = _scalar_text(loader, node, _INT, "an integer")
    sign, body = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
    if body[:2] == "0o":
        return sign * int(body[2:], 8)
    if body[:2] == "0x":
        return sign * int(body[2:], 16)
    return sign * int(body, 10)


def _construct_float(loader: ConfigLoader, node: yaml.ScalarNode) -> float:
    text = _scalar_text(loader, node, _FLOAT, "a number").lower()
    if text.lstrip("+-") == ".inf":
        return float("-inf") if text[0] == "-" else float("inf")
    if text == ".nan":
        return float("nan")
    return float(text)


def _construct_bool(loader: ConfigLoader, node: yaml.ScalarNode) -> bool:
    text = loader.construct_scalar(node)
    value = loader.bool_values.get(text.lower()) if isinstance(text, str) else None
    if value is None:
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a boolean", node.start_mark)
    return value


def _refuse(tag: str):
    def construct(loader: ConfigLoader, node: Any) -> Any:
        raise yaml.constructor.ConstructorError(None, None, f"the tag !!{tag} is not plain data (not accepted here)",
                                                node.start_mark)
    return construct


ConfigLoader.add_constructor(_INT_TAG, _construct_int)
ConfigLoader.add_constructor(_FLOAT_TAG, _construct_float)
ConfigLoader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)
for _tag in _REFUSED_TAGS:
    ConfigLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse(_tag))


class ConfigDumper(yaml.SafeDumper):
    """A SafeDumper that quotes a string which :class:`ConfigLoader` *or* YAML 1.1 (a plain
    ``yaml.safe_load``) would read as something else (``'1e3'``, ``'08'``, ``'2024-01-01'``):
    what it writes reads back the same under either."""

    yaml_implicit_resolvers = ConfigLoader.yaml_implicit_resolvers

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and implicit[0] and tag == _STR_TAG:
            return _yaml11_tag(value)
        return tag


_STR_TAG = "tag:yaml.org,2002:str"


def _yaml11_tag(value: str) -> str:
    """The tag PyYAML's own (YAML 1.1) resolver gives a plain scalar ``value``."""
    table = yaml.SafeLoader.yaml_implicit_resolvers
    for tag, regexp in table.get(value[:1], []) + table.get(None, []):
        if regexp.match(value):
            return tag
    return _STR_TAG


def load(text: str) -> Any:
    """``text`` as plain data (None for an empty document); yaml.YAMLError when it is not
    valid YAML or not plain data, nesting too deep included."""
    return load_noting_comments(text, note=False)[0]


def load_noting_comments(text: str, note: bool = True) -> tuple[Any, bool]:
    """:func:`load` and (``note``) :func:`has_comments` of ``text`` from one parse; the same
    yaml.YAMLError as :func:`load`. (False for the comments when not ``note``.)"""
    try:
        loader = ConfigLoader(text)
        try:  # yaml.load's steps, with the node tree looked at in between
            node = loader.get_single_node()
            # comments before constructing: merge keys (<<) rewrite the mappings that hold them
            commented = note and _comment_outside_scalars(text, node)
            return (None if node is None else loader.construct_document(node)), commented
        finally:
            loader.dispose()
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        # a constructor PyYAML does not guard (its own bugs on odd input): still one line
        raise yaml.YAMLError(f"cannot read a value ({type(exc).__name__})") from None


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


def has_comments(text: str) -> bool:
    """Whether ``text`` holds a YAML comment: a ``#`` at a line's start or after a space that
    lies in no scalar (``root: "a #1"`` holds none). yaml.YAMLError when it is not valid YAML."""
    return _comment_outside_scalars(text, compose(text))


def _comment_outside_scalars(text: str, root: Any) -> bool:
    """Whether ``text``, composed into the node tree ``root``, holds a ``#`` comment."""
    spans: list[tuple[int, int]] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            spans.append((node.start_mark.index, node.end_mark.index))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(part for pair in node.value for part in pair)
    for match in re.finditer(r"(?:^|(?<=\s))#", text, flags=re.MULTILINE):
        if not any(start <= match.start() < end for start, end in spans):
            return True
    return False


def problem(exc: yaml.YAMLError) -> str:
    """' at line N (what is wrong)' for an error message (parts it does not know left out)."""
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or (str(exc) if type(exc) is yaml.YAMLError else None)
    return (f" at line {mark.line + 1}" if mark is not None else "") + (f" ({what})" if what else "")
