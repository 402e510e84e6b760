"""What ``cafedist compare`` refuses before anything trains: every method at every grid setting,
loaded and built as ``train`` checks a config before it touches a run directory
(:func:`cafedist.train.plan.check_buildable`), so that a grid value no run could train with
(``--grid 'model.options={width: 0}'``) is one line now rather than a failed run per seed.

Two passes: :func:`method_configs` loads every config (cheap: a typo anywhere fails before any
store is prepared), then :func:`check_built` builds each distinct one (which may prepare the
first seed's store: seconds to minutes).

The run directories themselves are not checked here: a run whose directory holds another
config's run fails unstarted when its turn comes (:meth:`~cafedist.compare.plan.PlannedRun.held_by_another`),
and the others go on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cafedist.compare.plan import Variant, resolve_seeds
from cafedist.config import Config, dump_config, load_config, name_override
from cafedist.errors import CafeError
from cafedist.tuning import GridAxis, Setting, grid_names

log = logging.getLogger("cafedist")


@dataclass(frozen=True)
class MethodConfig:
    """One method at one grid setting: its overrides (in plan_run's order) and the resolved
    config on the first seed."""

    variant: Variant
    setting: Setting
    overrides: tuple[str, ...]
    cfg: Config


def method_configs(config: str | os.PathLike | None, variants: Sequence[Variant],
                   settings: dict[str, list[Setting]], overrides: Sequence[str], axes: Sequence[GridAxis],
                   seeds: str | int | Sequence[int]) -> list[MethodConfig]:
    """Every setting of every method, its config loaded on the first seed (nothing built yet).
    A bad value is one ConfigError naming the grid value as the user typed it
    (``--grid train.lr=.nan: ...``)."""
    path = str(Path(config).resolve()) if config else None
    first = resolve_seeds(seeds, load_config(path, list(overrides)).seed)[0]
    names = grid_names(axes)
    out: list[MethodConfig] = []
    for variant in variants:
        for setting in settings[variant.name]:
            # in plan_run's order: later overrides win
            ovr = (*overrides, *setting.overrides, *variant.overrides, f"seed={first}")
            out.append(MethodConfig(variant, setting, ovr, load_config(path, list(ovr), names)))
    return out


def check_built(configs: Sequence[MethodConfig], axes: Sequence[GridAxis], prepare: bool = True) -> None:
    """Build each distinct config of ``configs`` as train checks it (the first seed's store is
    prepared for that, and training reuses it; without ``prepare``, as for ``--submit``, a store
    not prepared yet is not read and its runs' models are checked by their jobs). A failure is
    one CafeError naming the grid value as typed and the method."""
    from cafedist.train.plan import check_buildable

    names = grid_names(axes)
    built: set[str] = set()  # one build per distinct config (methods may share one)
    for mc in configs:
        key = dump_config(mc.cfg)
        if key in built:
            continue
        built.add(key)
        try:
            if not check_buildable(mc.cfg, prepare_store=prepare):
                log.info("compare: %s's store is not prepared yet; its model is checked by its jobs", mc.variant.name)
        except CafeError as exc:
            raise type(exc)(_named(exc, mc.overrides, names, mc.variant, mc.setting)) from None


def _named(exc: CafeError, overrides: Sequence[str], names: dict[str, str], variant: Variant,
           setting: Setting) -> str:
    """``exc``'s message led by the override that set the field it names, and the method (and
    the setting, as typed, when no override of it is to blame) behind it."""
    blamed = name_override(str(exc), overrides, names)
    where = f"method {variant.name}"
    if blamed is None and setting.pairs:
        where += ", " + " ".join(names.get(o, o) for o in setting.overrides)
    return f"{blamed + ': ' if blamed else ''}{exc} ({where})"
