"""Federated algorithms behind one small interface (see :mod:`cafedist.algorithms.base`).

Adding an algorithm means adding one module here that defines a subclass of
:class:`~cafedist.algorithms.base.Algorithm` with a ``name``: the registry discovers every
module of this package and registers each such class under its name.
"""

from __future__ import annotations

import importlib
import pkgutil

from cafedist.algorithms.base import Algorithm, ClientView, LocalBatch, Phase, Setup
from cafedist.errors import ConfigError

_NOT_ALGORITHMS = {"base", "common"}


def _discover() -> dict[str, type[Algorithm]]:
    found: dict[str, type[Algorithm]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name in _NOT_ALGORITHMS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Algorithm) and obj.name and obj.__module__ == module.__name__:
                if obj.name in found and found[obj.name] is not obj:
                    raise RuntimeError(f"two algorithms named {obj.name!r}: {found[obj.name]} and {obj}")
                found[obj.name] = obj
    return dict(sorted(found.items()))


ALGORITHMS: dict[str, type[Algorithm]] = _discover()


def get_algorithm(name: str, field_name: str = "algorithm.name") -> type[Algorithm]:
    """Look up an algorithm class by name, with a clear error listing the choices."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(f"{field_name}: unknown algorithm {name!r} "
                          f"(choices: {', '.join(ALGORITHMS)})") from None


__all__ = ["ALGORITHMS", "Algorithm", "ClientView", "LocalBatch", "Phase", "Setup", "get_algorithm"]


def reference_markdown() -> str:
    """``docs/ALGORITHMS.md``: every registered algorithm, its source line and parameters.

    Generated from the code (module docstrings and ``Params`` dataclasses), so it cannot drift;
    ``tests/test_configs.py`` checks the file is current. Regenerate with
    ``python -c "from cafedist.algorithms import reference_markdown as r; print(r(), end='')" > docs/ALGORITHMS.md``.
    """
    import dataclasses
    import sys

    lines = ["# Algorithms", "",
             "Every algorithm runs on the same early-exit models, store, launchers, checkpoints and metrics.",
             "Select one with `algorithm.name=NAME`; its parameters live in `algorithm.NAME.*`.",
             "The module docstring of each (`cafedist/algorithms/<module>.py`) gives the source, the",
             "reference defaults and every deviation. *(Generated from the code.)*", ""]
    for name, cls in ALGORITHMS.items():
        module = sys.modules[cls.__module__]
        title = (module.__doc__ or cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        lines += [f"## `{name}`", "", f"{title} (`{cls.__module__.replace('.', '/')}.py`)", ""]
        fields = dataclasses.fields(cls.Params) if dataclasses.is_dataclass(cls.Params) else ()
        if not fields:
            lines += ["No parameters.", ""]
            continue
        lines += ["| parameter | default |", "|---|---|"]
        defaults = cls.Params()
        for f in fields:
            lines.append(f"| `{f.name}` | `{getattr(defaults, f.name)!r}` |")
        lines.append("")
    return "\n".join(lines)
