"""What ``cafedist compare`` runs: the variants (algorithms and CAFEDistill ablations),
seeds and grid settings, each planned as one ``cafedist train`` into its own run directory."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from cafedist import RESULTS_VERSION
from cafedist.errors import ConfigError
from cafedist.tuning import NO_SETTING, Setting

if TYPE_CHECKING:
    from cafedist.config import Config

log = logging.getLogger("cafedist")



#: the method every other row is read against: listed first, its ablations next to it
REFERENCE = "cafedistill"

#: pseudo-algorithms: name -> (registered algorithm, parameters of its section to set)
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "cafedistill-nokd": ("cafedistill", {"cross_client_kd": False}),
    "cafedistill-nosel": ("cafedistill", {"student_selection": False}),
}


# ----------------------------------------------------------------------------- what to run
@dataclass(frozen=True)
class Variant:
    """A row of the comparison: a registered algorithm plus config overrides."""

    name: str
    algorithm: str
    overrides: tuple[str, ...] = ()


def _yaml_scalar(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (bool, int, float)) else str(value)


def available_variants() -> dict[str, Variant]:
    """Every registered algorithm and every ablation whose base algorithm is registered, in
    report order: the reference method, its ablations, then the rest alphabetically."""
    from cafedist.algorithms import ALGORITHMS

    out = {name: Variant(name, name, (f"algorithm.name={name}",)) for name in ALGORITHMS}
    for name, (base, params) in ABLATIONS.items():
        if name in out:  # one of the two would silently stand for the other in every table
            cls = ALGORITHMS[name]
            raise RuntimeError(f"algorithm {name!r} ({cls.__module__}.{cls.__qualname__}) is registered under the "
                               f"name of compare's ablation {name!r} ({base} with "
                               f"{', '.join(f'{k}={v}' for k, v in params.items())}): rename the algorithm")
        if base in ALGORITHMS:
            sets = tuple(f"algorithm.{base}.{k}={_yaml_scalar(v)}" for k, v in params.items())
            out[name] = Variant(name, base, (f"algorithm.name={base}", *sets))

    def rank(name: str) -> tuple[int, str]:
        if name == REFERENCE:
            return 0, name
        return (1 if name in ABLATIONS and ABLATIONS[name][0] == REFERENCE else 2), name

    return {name: out[name] for name in sorted(out, key=rank)}


def check_ablation_axes(variants: Sequence[Variant], grid_keys: Sequence[str]) -> None:
    """Refuse a ``--grid`` key that an ablation among ``variants`` fixes (``cafedistill-nokd``
    and ``algorithm.cafedistill.cross_client_kd``): every row of it would train the ablation's
    value under a label that names another."""
    for variant in variants:
        if variant.name not in ABLATIONS:
            continue
        base, fixed = ABLATIONS[variant.name]
        for key in grid_keys:
            param = key.removeprefix(f"algorithm.{base}.")
            if param in fixed:
                raise ConfigError(f"--grid {key}: {variant.name} is {base} with {param} fixed to "
                                  f"{_yaml_scalar(fixed[param])}, so each of its rows would train that value; "
                                  f"drop {variant.name} from --algorithms or vary another key")


def resolve_algorithms(spec: str | Sequence[str]) -> list[Variant]:
    """``"all"`` or ``"a,b,c"`` (or a list of names) -> variants, in the given order, no duplicates."""
    known = available_variants()
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ConfigError("--algorithms: expected 'all' or a comma-separated list of algorithm names")
    if names == ["all"]:
        return list(known.values())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--algorithms: unknown algorithm {unknown[0]!r} (choices: all, {', '.join(known)})")
    return [known[n] for n in dict.fromkeys(names)]


def resolve_seeds(spec: str | int | Sequence[int], base_seed: int) -> list[int]:
    """A count ``k`` -> ``base_seed + 0 .. k-1``; a comma list ``"0,5,7"`` (or a sequence) -> those seeds."""
    if isinstance(spec, int):
        count: int | None = spec
        seeds: list[int] = []
    elif isinstance(spec, str) and "," not in spec:
        try:
            count, seeds = int(spec), []
        except ValueError:
            raise ConfigError(f"--seeds {spec!r}: expected a number of seeds (e.g. 3) "
                              "or a comma-separated list (e.g. 0,5,7)") from None
    else:
        count = None
        items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
        try:
            seeds = [int(s) for s in items]
        except (TypeError, ValueError):
            raise ConfigError(f"--seeds {spec!r}: expected comma-separated integers, e.g. 0,5,7") from None
    if count is not None:
        if count < 1:
            raise ConfigError(f"--seeds {spec!r}: expected at least 1 seed")
        seeds = [base_seed + k for k in range(count)]
    if not seeds:
        raise ConfigError(f"--seeds {spec!r}: expected at least 1 seed")
    return list(dict.fromkeys(seeds))


@dataclass
class PlannedRun:
    """One (variant, setting, seed) of a comparison and the ``cafedist train`` that produces it."""

    variant: Variant
    seed: int
    run_dir: Path
    config: str | None  # absolute path of the YAML file
    overrides: tuple[str, ...]  # user overrides, then the setting's, then the variant's, then the seed
    config_hash: str  # of the resolved config: what a reusable summary.json must carry
    setting: Setting = NO_SETTING  # the grid point (empty without --grid)
    row: str = ""  # the report row the run belongs to (default: the variant name)
    # the resolved config as planned: what the run is judged by, not the config file as it
    # reads later (edited while compare runs, it would make runs of another config pass)
    cfg: Config | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.row = self.row or self.variant.name

    def planned_config(self) -> Config:
        """The resolved config this run was planned with (loaded now if not given)."""
        if self.cfg is None:
            from cafedist.config import load_config

            self.cfg = load_config(self.config, list(self.overrides))
        return self.cfg

    def config_changed(self) -> str | None:
        """Why the config file no longer gives the run compare planned (None: it does, or
        differs only where the run does not, e.g. another algorithm's section): a training
        started now would read the edited file and train another run than the report names."""
        from cafedist.config import identity_fields, load_config, run_identity
        from cafedist.errors import CafeError
        from cafedist.train.preflight import dict_diff

        planned = self.planned_config()
        try:
            now = load_config(self.config, list(self.overrides))
        except CafeError as exc:
            return f"--config {self.config} no longer loads since compare started ({exc})"
        if run_identity(now) == run_identity(planned):
            return None
        # as the hash tells values apart: 1 -> 1.0 in a list is another run too
        diff = dict_diff(identity_fields(planned, keep_defaults=True), identity_fields(now, keep_defaults=True),
                         as_hashed=True)
        return f"--config {self.config} was edited since compare started (first difference: {diff or '?'})"

    def held_by_another(self) -> str | None:
        """What this run's directory holds that the run may not continue, in ``train``'s words
        without its ``--resume`` advice, which compare has no flag for (another config's or
        algorithm's run, results of no known config); None: nothing, or a run of this config
        that compare trains again from the start anyway (:meth:`outdated`)."""
        from cafedist.errors import CafeError, RunDirError
        from cafedist.train.preflight import plan_run_dir

        if self.outdated() is not None:
            return None
        try:
            plan_run_dir(self.planned_config(), self.run_dir, "auto")
        except RunDirError as exc:
            return exc.problem
        except CafeError:  # anything else: the training reports it in its own words
            return None
        return None

    @property
    def label(self) -> str:
        return f"{self.variant.name}{f' [{self.setting.label}]' if self.setting.pairs else ''} seed{self.seed}"

    def train_argv(self) -> list[str]:
        """Arguments of ``cafedist`` (``train`` and its options) for this run: a finished run
        that cannot stand in the comparison (:meth:`outdated`) is moved aside and trained again."""
        from cafedist.submit import RunSpec

        resume = "none" if self.outdated() is not None else "auto"
        return RunSpec(self.config, str(self.run_dir), self.overrides, resume=resume).train_argv()

    def _summary(self) -> dict | None:
        """The run's summary.json when it was written for this very config, or for an earlier
        config file of the same run (it differed only in other algorithms' sections), and still
        describes the run (:func:`~cafedist.run.metrics.run_standing`: a ``--resume force``
        extension that checkpointed since has taken the run past it)."""
        from cafedist.run.metrics import run_standing

        summary = run_standing(self.run_dir).summary
        return summary if summary is not None and self._written_for_this(summary) else None

    def _written_for_this(self, record: dict) -> bool:
        """Whether a summary or checkpoint manifest of the run directory was written for this
        very config, or for an earlier config file of the same run."""
        if record.get("config_hash") == self.config_hash:
            return True
        from cafedist.train.preflight import earlier_hashes

        return record.get("config_hash") in earlier_hashes(self.planned_config(), self.run_dir)

    def outdated(self) -> str | None:
        """Why this run, finished with this config or stopped partway, must be trained again
        from the start (None: it need not, or there is nothing of it): it is not what a run
        trained for the config from the start gives, being trained by code whose results differ
        (another RESULTS_VERSION) or extended by ``--resume force`` from another
        ``train.rounds`` that what it trained depended on. Of an unfinished run its newest
        checkpoint tells: resumed, it would finish as such a run (its manifest's record is
        carried into summary.json), to be trained again by the next compare all the same."""
        summary = self._summary()
        if summary is not None:
            return _why_not_reusable(summary)
        manifest = self._newest_manifest()
        return None if manifest is None else _why_not_reusable(manifest)

    def _newest_manifest(self) -> dict | None:
        """The manifest of the run's newest checkpoint (read without verifying the checkpoint)
        when it was written for this very config or for an earlier config file of the run."""
        from cafedist.run.checkpoint import CheckpointDir

        candidates = CheckpointDir(self.run_dir).candidates()
        try:
            manifest = json.loads((candidates[0] / "MANIFEST.json").read_text()) if candidates else None
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) and self._written_for_this(manifest) else None

    def finished_summary(self) -> dict | None:
        """The run's summary if it is finished with this very config by code of this
        :data:`~cafedist.RESULTS_VERSION` and as a run trained for it from the start, else None."""
        summary = self._summary()
        return summary if summary is not None and _why_not_reusable(summary) is None else None


def _why_not_reusable(summary: dict) -> str | None:
    """Why a run cannot stand in a comparison, as its ``summary`` (or its newest checkpoint's
    manifest, which records the same) says (None: it can)."""
    if summary.get("results_version", 1) != RESULTS_VERSION:
        return "trained by code with other results (RESULTS_VERSION changed)"
    changes = summary.get("rounds_changes")
    # an extension where nothing depended on the total is the longer run bit for bit
    if isinstance(changes, list) and any(isinstance(c, dict) and c.get("depended") for c in changes):
        return "extended by --resume force from another train.rounds that its training depended on"
    return None


def plan_run(config: str | os.PathLike | None, variant: Variant, seed: int, out: str | os.PathLike,
             overrides: Sequence[str] = (), setting: Setting = NO_SETTING, row: str = "",
             like: PlannedRun | None = None) -> PlannedRun:
    """One run, its directory (``runs/<variant>[/<setting>]/seed<seed>``) and its resolved
    config (validated now, so a typo fails before anything starts). ``like``: a run planned
    earlier of the same variant and setting (``--tune``'s trial): this one is planned from its
    config, the file as it read then, with ``seed`` (read again, an edit made meanwhile would
    be this run's plan, and no check would see it)."""
    from cafedist.config import config_from_dict, config_hash, load_config

    config_path = str(Path(config).resolve()) if config else None
    # later overrides win: the setting, the variant (an ablation's switch must hold) and the
    # seed are what compare controls
    ovr = (*overrides, *setting.overrides, *variant.overrides, f"seed={seed}")
    if like is not None:
        cfg = config_from_dict({**like.planned_config().to_dict(), "seed": seed})
    else:
        cfg = load_config(config_path, list(ovr))
    run_dir = Path(out).resolve() / "runs" / variant.name
    run_dir = (run_dir / setting.slug if setting.pairs else run_dir) / f"seed{seed}"
    return PlannedRun(variant, seed, run_dir, config_path, ovr, config_hash(cfg), setting, row, cfg)


def plan_runs(config: str | os.PathLike | None, variants: Sequence[Variant], seeds: str | int | Sequence[int],
              out: str | os.PathLike, overrides: Sequence[str] = (),
              settings: dict[str, list[Setting]] | None = None) -> list[PlannedRun]:
    """Every (variant, setting, seed) run (``settings``: per variant name, default the empty
    setting). Seeds given as a count start at the config's seed. A variant with several
    settings gets one report row per setting."""
    from cafedist.config import load_config

    base = load_config(str(Path(config).resolve()) if config else None, list(overrides))
    runs = []
    for variant in variants:
        for setting in (settings or {}).get(variant.name, [NO_SETTING]):
            row = f"{variant.name} [{setting.label}]" if setting.pairs else variant.name
            for seed in resolve_seeds(seeds, base.seed):
                runs.append(plan_run(config, variant, seed, out, overrides, setting, row))
    return runs
