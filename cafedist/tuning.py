"""Parameter grids and validation-based tuning for ``cafedist compare``.

``--grid KEY=v1,v2,...`` (repeatable; the values are one YAML flow list without its
brackets) gives each method a list of *settings*: the product, in grid order (the first
``--grid`` varies slowest), of the axes that apply to it. An axis applies to a method unless
its key is ``algorithm.<name>.*`` for another registered algorithm than the method's own (the
ablations ``cafedistill-no*`` read the ``cafedistill`` section). ``--max-trials N`` keeps the
first N settings of each method, in that order.

``--tune`` (:func:`tune`) chooses on the validation split (``data.val_fraction``; compare adds 0.1
when the config has none, :func:`with_validation_split`). It trains every setting of every
method on the first seed (the *trials*), picks per method the setting with the highest
validation accuracy at the last exit (``summary.json`` ``val_acc_per_exit[-1]``; ties go to
the earlier setting in grid order), then trains the chosen setting on every seed. The test
split is never read for the choice. The first seed's final run is the chosen trial itself:
same config, same run directory, so it is reused, not retrained. While a trial is stopped
unfinished (a signal; a rerun resumes it) nothing is chosen and no final trains.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Protocol, Sequence, TypeVar

import yaml

from cafedist import yamlio
from cafedist.errors import ConfigError

log = logging.getLogger("cafedist")

#: keys ``compare`` itself controls, so a grid over them would fight its own flags
_CONTROLLED = {"seed": "--seeds", "algorithm.name": "--algorithms"}


def render_value(value: Any) -> str:
    """The shortest YAML text that reads back as ``value`` (for overrides and labels).

    Plain text where YAML reads it back unchanged (``0.05``, ``true``, ``group``), JSON
    otherwise (quoted strings, flow lists and mappings); floats always keep a dot, so that
    plain YAML 1.1 readers (a user's ``yaml.safe_load``) read ``1.0e-05`` as a float too, and
    nan and infinities are YAML's ``.nan``, ``.inf``, ``-.inf`` (JSON's ``NaN`` is a string there).
    """
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, _, exponent = text.partition("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, str) and value and not re.search(r"[\s,:#\[\]{}]", value):
        try:
            if yamlio.load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    if isinstance(value, (dict, list)) and _holds_non_finite(value):
        # JSON would write Infinity/NaN, strings to YAML: the items as rendered here instead
        if isinstance(value, list):
            return "[" + ",".join(render_value(v) for v in value) + "]"
        return "{" + ",".join(f"{json.dumps(str(k))}: {render_value(v)}" for k, v in sorted(value.items())) + "}"
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def _holds_non_finite(value: Any) -> bool:
    """Whether a (nested) list or mapping holds a nan or an infinity."""
    if isinstance(value, float):
        return not math.isfinite(value)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return any(_holds_non_finite(v) for v in items)


@dataclass(frozen=True)
class GridAxis:
    """One ``--grid KEY=v1,v2,...``: a dotted config key and its values as YAML texts (rendered
    by :func:`render_value`: what runs), and ``given``, the same values as typed (for messages)."""

    key: str
    values: tuple[str, ...]
    given: tuple[str, ...] = field(default=(), compare=False)

    @property
    def algorithm(self) -> str | None:
        """The algorithm whose section the key is in (``algorithm.<name>...``), else None."""
        parts = self.key.split(".")
        return parts[1] if parts[0] == "algorithm" and len(parts) >= 2 else None

    def applies_to(self, algorithm: str) -> bool:
        """True if the axis changes a run of the registered ``algorithm``."""
        return self.algorithm is None or self.algorithm == algorithm


def parse_axis(spec: str) -> GridAxis:
    """``"train.lr=0.02,0.05"`` -> GridAxis; ConfigError (naming ``--grid``) on bad input."""
    key, sep, text = spec.partition("=")
    key = key.strip()
    where = f"--grid {spec!r}"
    if not sep or not key or not text.strip():
        raise ConfigError(f"{where}: expected KEY=v1,v2,... with a dotted config key, e.g. train.lr=0.02,0.05")
    if not all(key.split(".")):
        raise ConfigError(f"{where}: empty component in key {key!r}")
    if key in _CONTROLLED:
        raise ConfigError(f"{where}: {key} is set by compare itself (use {_CONTROLLED[key]})")
    flow = f"[{text}]"
    try:
        values = yamlio.load(flow)
        # each value's own text, for messages that name it as the user typed it (.nan, not NaN)
        given = tuple(flow[n.start_mark.index:n.end_mark.index] for n in yamlio.compose(flow).value)
    except yaml.YAMLError:
        raise ConfigError(f"{where}: the values are not valid YAML (expected v1,v2,... e.g. 0.02,0.05)") from None
    texts = [render_value(v) for v in values]
    if not texts:
        raise ConfigError(f"{where}: expected at least one value")
    # compared as read, not as written: 1 and 1.0 (or 0.1 and 1e-1) are one run
    twice = next((t for i, t in enumerate(texts) if values[i] in values[:i]), None)
    if twice is not None:
        raise ConfigError(f"{where}: value {twice} is given twice")
    return GridAxis(key, tuple(texts), given)


def grid_names(axes: Sequence[GridAxis]) -> dict[str, str]:
    """How an error names each grid value's override (``KEY=VALUE`` as it runs): ``--grid
    KEY=VALUE`` with the value as typed (for :func:`cafedist.config.load_config`'s ``names``)."""
    return {f"{a.key}={text}": f"--grid {a.key}={given}" for a in axes
            for text, given in zip(a.values, a.given or a.values)}


def parse_grid(specs: Sequence[str], algorithms: Sequence[str], *, known: Sequence[str]) -> list[GridAxis]:
    """Parse every ``--grid``; ``algorithms`` are the chosen methods' registered algorithms and
    ``known`` every registered one. A key given twice, an unknown algorithm section or an axis
    that applies to none of the chosen methods is a ConfigError."""
    axes: list[GridAxis] = []
    for spec in specs:
        axis = parse_axis(spec)
        if any(a.key == axis.key for a in axes):
            raise ConfigError(f"--grid {axis.key}: given twice (put every value in one --grid)")
        if axis.algorithm is not None and axis.algorithm not in known:
            raise ConfigError(f"--grid {axis.key}: no algorithm {axis.algorithm!r} "
                              f"(expected algorithm.<name>.<field> with a name from: {', '.join(sorted(known))})")
        if not any(axis.applies_to(a) for a in algorithms):
            raise ConfigError(f"--grid {axis.key}: applies to none of the chosen algorithms "
                              f"({', '.join(dict.fromkeys(algorithms))})")
        axes.append(axis)
    return axes


@dataclass(frozen=True)
class Setting:
    """One point of a grid for one method: ``(key, YAML text)`` pairs in grid order; empty
    for a method that no axis applies to (it runs with the config as given)."""

    pairs: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        """``train.lr=0.05 algorithm.cafedistill.mu=2`` ("" for the empty setting)."""
        return " ".join(f"{k}={v}" for k, v in self.pairs)

    @property
    def overrides(self) -> tuple[str, ...]:
        """The setting as dotted ``cafedist train`` overrides."""
        return tuple(f"{k}={v}" for k, v in self.pairs)

    @property
    def slug(self) -> str:
        """A readable directory name, unique per setting: the label with ``,`` between keys;
        characters unsafe in paths (and over-long labels) get a short hash of the label."""
        text = ",".join(self.overrides)
        safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
        if safe == text and len(safe) <= 100:
            return safe
        return f"{safe[:80]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


#: the setting of a method no grid axis applies to: it runs with the config as given
NO_SETTING = Setting()


def settings_for(axes: Sequence[GridAxis], algorithm: str, max_trials: int | None = None) -> list[Setting]:
    """The settings of a method running the registered ``algorithm``: the product of the axes
    that apply to it (first axis slowest), the first ``max_trials`` of them if given."""
    if max_trials is not None and max_trials < 1:
        raise ConfigError(f"--max-trials: expected >= 1 trials per method, got {max_trials}")
    mine = [a for a in axes if a.applies_to(algorithm)]
    combos = itertools.product(*[[(a.key, v) for v in a.values] for a in mine])
    return [Setting(tuple(c)) for c in itertools.islice(combos, max_trials)]


#: the validation share ``--tune`` holds out when the config has no validation split
DEFAULT_VAL_FRACTION = 0.1


def with_validation_split(config: str | os.PathLike | None, overrides: Sequence[str]) -> tuple[tuple[str, ...], int]:
    """The overrides, plus ``data.val_fraction=0.1`` when the config and overrides leave it at
    0; and the config's seed (the first seed of the comparison).

    Tuning must choose on held-out data, never on test; rather than refuse a config without a
    validation split, ``--tune`` carves one (and says so), so every run of the comparison,
    trials and finals alike, trains on the same smaller train split.
    """
    from cafedist.config import load_config

    base = load_config(str(Path(config).resolve()) if config else None, list(overrides))
    if base.data.val_fraction > 0:
        return tuple(overrides), base.seed
    log.warning("--tune: the config has no validation split (data.val_fraction: 0); holding out %g of every "
                "client's train split to choose on (set data.val_fraction to change it)", DEFAULT_VAL_FRACTION)
    return (*overrides, f"data.val_fraction={DEFAULT_VAL_FRACTION}"), base.seed


def check_tunable(axes: Sequence[GridAxis]) -> None:
    """``--tune`` chooses on the validation split (:func:`with_validation_split` makes sure
    there is one): no axis may change the data (every trial of a method must be judged on the
    same validation samples)."""
    data = next((a.key for a in axes if a.key.split(".")[0] == "data"), None)
    if data is not None:
        raise ConfigError(f"--grid {data}: with --tune the grid may not change the data "
                          "(every trial must be judged on the same validation split)")


# ----------------------------------------------------------------------------- the tuning protocol
class _Outcome(Protocol):
    """What tuning reads of a run's outcome (compare's RunOutcome): ``run`` has ``setting``,
    ``variant`` and ``finished_summary()``."""

    run: Any
    status: str


OutcomeT = TypeVar("OutcomeT", bound=_Outcome)


def validation_score(summary: dict | None) -> float | None:
    """What tuning maximises: mean validation accuracy at the last exit (None if absent)."""
    if not summary or not summary.get("val_acc_per_exit"):
        return None
    return float(summary["val_acc_per_exit"][-1])


def choose(outcomes: Sequence[_Outcome]) -> int | None:
    """Index of the trial with the highest :func:`validation_score` (the first one on ties, so
    grid order decides); None when no trial finished with a validation score."""
    best, best_score = None, -math.inf
    for i, o in enumerate(outcomes):
        score = validation_score(o.run.finished_summary() if o.status != "failed" else None)
        if score is not None and score > best_score:
            best, best_score = i, score
    return best


@dataclass
class TuneResult(Generic[OutcomeT]):
    """What :func:`tune` did, per method name (in method order)."""

    seed: int = 0  # the seed the trials ran on
    trials: dict[str, list[OutcomeT]] = field(default_factory=dict)  # every trial, in grid order
    chosen: dict[str, int | None] = field(default_factory=dict)  # index into trials[name]; None: none usable
    finals: list[OutcomeT] = field(default_factory=list)  # the chosen settings on every seed

    @property
    def stopped(self) -> list[OutcomeT]:
        """Trials stopped unfinished by a signal: while there are any, nothing is chosen or
        trained further (a rerun resumes them, then chooses)."""
        return [o for t in self.trials.values() for o in t if o.status == "stopped"]

    def counts(self) -> dict[str, int]:
        """Trials per method."""
        return {name: len(t) for name, t in self.trials.items()}

    def failed(self, name: str) -> list[OutcomeT]:
        """Method ``name``'s trials that failed: the choice was made among the others (a rerun
        retries them, and may choose otherwise)."""
        return [o for o in self.trials[name] if o.status == "failed"]

    def chosen_setting(self, name: str) -> Setting | None:
        """The setting chosen for method ``name`` (None: none chosen, e.g. every trial failed)."""
        i = self.chosen.get(name)
        return None if i is None else self.trials[name][i].run.setting


def tune(methods: Sequence[Any], settings: dict[str, list[Setting]], seeds: Sequence[int],
         plan: Callable[[Any, Setting, int], Any],
         execute: Callable[[list[Any]], list[OutcomeT]]) -> TuneResult[OutcomeT]:
    """Trials of every method's settings on ``seeds[0]``, the choice, then the chosen settings
    on every seed. ``methods`` have a ``name``; ``plan(method, setting, seed)`` makes a planned
    run and ``execute(runs)`` runs them (reusing finished ones), one outcome per run in order.
    When a trial was stopped (:attr:`TuneResult.stopped`) nothing is chosen and no final runs."""
    counts = ", ".join(f"{m.name} {len(settings[m.name])}" for m in methods)
    trial_runs = {m.name: [plan(m, s, seeds[0]) for s in settings[m.name]] for m in methods}  # validates all first
    log.info("compare --tune: trials on seed %d (%s), then the chosen settings on seeds %s",
             seeds[0], counts, ", ".join(map(str, seeds)))
    if len({len(settings[m.name]) for m in methods}) > 1:
        log.warning("compare --tune: the methods get different numbers of trials (%s), because the grid keys "
                    "that apply to them differ; results.md says so", counts)
    flat = execute([r for runs in trial_runs.values() for r in runs])
    result: TuneResult[OutcomeT] = TuneResult(seed=seeds[0])
    it = iter(flat)
    for m in methods:
        result.trials[m.name] = [next(it) for _ in trial_runs[m.name]]
    if result.stopped:
        # a choice without them might not be the rerun's, once it has resumed them: the finals
        # trained for it would be wasted (and a report of it replaced)
        result.chosen = dict.fromkeys(result.trials)
        return result
    result.chosen = {name: choose(trials) for name, trials in result.trials.items()}
    finals = [plan(m, setting, seed) for m in methods
              if (setting := result.chosen_setting(m.name)) is not None for seed in seeds]
    # a final on the first seed is its trial: trained in this call when the trial was, which
    # the report's "trained now / reused" counts must say (execute sees a finished run)
    trained_now = {str(o.run.run_dir): o for o in flat if o.status == "done"}
    result.finals = [trained_now.get(str(o.run.run_dir), o) if o.status == "skipped" else o
                     for o in (execute(finals) if finals else [])]
    return result


def tuning_markdown(result: TuneResult, first_seed: int) -> list[str]:
    """The ``## Tuning`` section of results.md: trials and choice per method, unequal trial
    counts stated, failed trials listed (with a stopped trial there is no report)."""
    counts = result.counts()
    lines = ["## Tuning", "",
             f"Every setting of a method was trained on seed {first_seed}; the one with the highest mean "
             "validation accuracy at the last exit (each client's validation split, carved from its train "
             "split; ties: the earlier setting in grid order) was then trained on every seed. The tables "
             "above report test accuracy of the chosen settings; the test split played no part in the choice. "
             f"The seed-{first_seed} run of each chosen setting is its trial (reused, not retrained). "
             "Every trial: trials.csv.", ""]
    if len(set(counts.values())) > 1:
        lines += ["**Unequal trial budgets**: the grid keys that apply differ between methods, so they got "
                  + ", ".join(f"{name} {n}" for name, n in counts.items()) + " trials.", ""]
    lines += ["| algorithm | trials | chosen setting | validation accuracy, last exit (%) |",
              "| --- | --- | --- | --- |"]
    for name, trials in result.trials.items():
        i = result.chosen[name]
        if i is None:
            lines.append(f"| {name} | {len(trials)} | – (no trial finished) | – |")
            continue
        score = validation_score(trials[i].run.finished_summary())
        label = f"`{trials[i].run.setting.label or '(config as given)'}`"
        if failed := result.failed(name):
            label += f" (among the {len(trials) - len(failed)} that did not fail)"
        lines.append(f"| {name} | {len(trials)} | {label} | {100 * score:.2f} |")
    failed = [o for trials in result.trials.values() for o in trials if o.status == "failed"]
    if failed:
        lines += ["", "Failed trials:", ""]
        lines += [f"- `{o.run.variant.name}` `{o.run.setting.label}`: {o.message}" for o in failed]
    return lines + [""]
