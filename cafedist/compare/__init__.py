"""``cafedist compare``: every (algorithm, seed) of one config, then one report.

::

    cafedist compare --config configs/digits.yaml --algorithms all --seeds 3 --out runs/cmp
    cafedist compare --config configs/digits.yaml --algorithms cafedistill,fedavg --seeds 0,5 \\
        --out runs/cmp train.rounds=10 --jobs 2
    cafedist compare ... --submit [--local] [--partition gpu --time 2:00:00]

Each run is an ordinary ``cafedist train`` into ``OUT/runs/<algorithm>/seed<seed>``: a
subprocess (``--jobs`` at a time), so a crashing run is reported and the others go on, or a
submitit job per run with ``--submit`` (through :mod:`cafedist.submit`). A run whose
``summary.json`` was written by the same resolved config is not redone; an unfinished one is
resumed by ``train``'s ``--resume auto``. Then ``OUT/results.md``, ``OUT/results.csv``,
``OUT/accuracy_vs_macs.png`` and ``OUT/per_exit_accuracy.png`` are written (atomically)
from the summaries: mean and sample standard deviation over seeds.

Besides the registered algorithms there are ablations of CAFEDistill (:data:`ABLATIONS`),
run as ``cafedistill`` with one switch turned off; ``all`` includes them.

``--grid KEY=v1,v2`` runs every setting of a grid (``OUT/runs/<algorithm>/<setting>/seed<seed>``,
one report row per setting), ``--tune`` picks each method's setting on the validation split
first (:mod:`cafedist.tuning`). ``runs.csv``, ``curves.csv``/``curves.png`` and, with
``--tune``, ``trials.csv`` hold the per-run numbers (:mod:`cafedist.runtables`).

``--budget SPEC|FILE`` evaluates every finished run under per-client inference budgets, as
``cafedist eval RUN --budget`` does, and adds them to the report (:mod:`cafedist.compare.budgets`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from cafedist import tuning
from cafedist.compare.budgets import check_runs, evaluate_outcomes, parse_budgets
from cafedist.compare.check import check_built, method_configs
from cafedist.compare.execute import RunOutcome, execute
from cafedist.compare.plan import (
    ABLATIONS,
    REFERENCE,
    PlannedRun,
    Variant,
    available_variants,
    check_ablation_axes,
    plan_run,
    plan_runs,
    resolve_algorithms,
    resolve_seeds,
)
from cafedist.compare.report import (
    REPORT_THRESHOLDS,
    Stat,
    mean_std,
    results_csv,
    results_markdown,
    summarize,
    write_report,
)
from cafedist.errors import ConfigError
from cafedist.jobs import (
    ExecutorOptions,
    add_resource_arguments,
    require_submitit,
    resources_given,
)
from cafedist.paths import check_dir_creatable, config_file_arg, user_path
from cafedist.rundir import RunLock
from cafedist.tuning import Setting, TuneResult

log = logging.getLogger("cafedist")


# ----------------------------------------------------------------------------- API and CLI
@dataclass
class CompareResult:
    """What :func:`compare` did: every run's outcome and the files it wrote."""

    outcomes: list[RunOutcome]
    paths: dict[str, Path]
    tuned: TuneResult | None = None  # --tune: the trials and the choice
    budget_errors: list[str] = field(default_factory=list)  # --budget: runs whose evaluation failed

    @property
    def runs(self) -> list[RunOutcome]:
        """Every run of this compare once: the report's, then the tuning trials not among them
        (a chosen setting's first-seed run is its trial, in both)."""
        trials = [o for t in self.tuned.trials.values() for o in t] if self.tuned else []
        reported = {o.run.run_dir for o in self.outcomes}
        return [*self.outcomes, *(o for o in trials if o.run.run_dir not in reported)]

    @property
    def failed(self) -> list[RunOutcome]:
        """Failed runs of the report, then failed tuning trials."""
        return [o for o in self.runs if o.status == "failed"]

    @property
    def stopped(self) -> list[RunOutcome]:
        """Runs and trials stopped unfinished by a signal: no failure, a rerun resumes them."""
        return [o for o in self.runs if o.status == "stopped"]


def _tune(config: str | os.PathLike | None, variants: Sequence[Variant], seeds: str | int | Sequence[int],
          out: str | os.PathLike, overrides: Sequence[str], settings: dict[str, list[Setting]],
          base_seed: int, run: Callable[[list[PlannedRun]], list[RunOutcome]]) -> TuneResult:
    """``--tune``: trials on the first seed, choice on validation, chosen settings on every seed."""
    overrides = tuple(overrides)
    trials: dict[tuple[str, str], PlannedRun] = {}

    def plan(variant: Variant, setting: Setting, seed: int) -> PlannedRun:
        # a final is planned from its setting's trial: the config file as compare read it at
        # the start (edited during the trials, the finals of the edit are refused unstarted)
        key = (variant.name, setting.slug)
        run = plan_run(config, variant, seed, out, overrides, setting, like=trials.get(key))  # one row per method
        trials.setdefault(key, run)
        return run

    return tuning.tune(variants, settings, resolve_seeds(seeds, base_seed), plan, run)


#: the lock of a compare's --out (one compare at a time there)
COMPARE_LOCK_NAME = "compare.lock"


@dataclass(frozen=True)
class CompareOptions:
    """What :func:`compare` runs and reports besides the config and ``out``: the options of
    ``cafedist compare`` (:meth:`from_args`), with its defaults."""

    algorithms: str | Sequence[str] = "all"  # "all" or names, comma-separated or a list
    seeds: str | int | Sequence[int] = 3  # a count (config seed + 0..k-1) or the seeds
    overrides: Sequence[str] = ()  # dotted overrides applied to every run
    jobs: int | None = None  # runs at once (None: execute's default)
    submit: ExecutorOptions | None = None  # --submit: every run a submitit job; None: subprocesses
    command: str | None = None  # the first line of results.md; None: the canonical command line
    thresholds: Sequence[float] = REPORT_THRESHOLDS  # the dynamic-inference thresholds reported
    grid: Sequence[str] = ()  # --grid KEY=v1,v2 specs
    tune: bool = False  # choose each method's setting on the validation split
    max_trials: int | None = None  # at most this many settings per method
    budgets: Sequence[str] = ()  # --budget specs or budget files (comma-separated allowed)

    @classmethod
    def from_args(cls, args: argparse.Namespace, submit: ExecutorOptions | None) -> "CompareOptions":
        """The options of a parsed ``cafedist compare`` command line (``submit``: :func:`_submit_options`)."""
        return cls(algorithms=args.algorithms, seeds=args.seeds, overrides=args.overrides, jobs=args.jobs,
                   submit=submit, command=_command_line(args) or None, grid=args.grid, tune=args.tune,
                   max_trials=args.max_trials, budgets=args.budget)


def compare(config: str | os.PathLike | None, out: str | os.PathLike,
            options: CompareOptions = CompareOptions()) -> CompareResult:
    """Run (or reuse) every (algorithm, setting, seed) and write the report into ``out``.

    Of the ``options``: ``grid`` holds ``KEY=v1,v2`` specs (``--grid``), ``max_trials`` caps the
    settings per method; ``tune`` chooses each method's setting on the validation split (:mod:`cafedist.tuning`).
    ``budgets`` (``--budget``: specs or budget files, comma-separated allowed) evaluates every
    finished run under each per-client inference budget (:mod:`cafedist.compare.budgets`).
    ``command`` is the first line of ``results.md`` (default: an equivalent ``cafedist
    compare`` command line). Failed runs are reported, not raised.
    """
    from cafedist.algorithms import ALGORITHMS

    if options.jobs is not None and options.jobs < 1:
        raise ConfigError(f"--jobs: expected >= 1, got {options.jobs}")
    check_dir_creatable(Path(out), "--out")
    if any((Path(out) / name).exists() for name in ("checkpoints", "summary.json", "metrics.jsonl")):
        raise ConfigError(f"--out {out} holds a training run; the comparison's report (results.md, "
                          f"accuracy_vs_macs.png, ...) would be written among its files; choose another --out")
    variants = resolve_algorithms(options.algorithms)
    axes = tuning.parse_grid(options.grid, [v.algorithm for v in variants], known=list(ALGORITHMS))
    check_ablation_axes(variants, [a.key for a in axes])
    settings = {v.name: tuning.settings_for(axes, v.algorithm, options.max_trials) for v in variants}
    budget_options = parse_budgets(options.budgets)
    overrides = options.overrides
    if options.tune:
        tuning.check_tunable(axes)
        overrides, base_seed = tuning.with_validation_split(config, overrides)
    # every method's config at every setting is loaded, then built as train would (a bad one
    # refused, naming the grid value) before --out is created by the lock: every load first,
    # so that a typo in any value fails before a store is prepared for the building
    configs = method_configs(config, variants, settings, overrides, axes, options.seeds)
    check_built(configs, axes, prepare=options.submit is None)
    if budget_options:
        check_runs(budget_options, [(c.variant.name, c.cfg) for c in configs], options.seeds,
                   prepare=options.submit is None)
    runs = None if options.tune else plan_runs(config, variants, options.seeds, out, overrides,
                                               settings if axes else None)
    # one compare per --out: two would train the same runs into each other's locks and
    # report the other's as failed
    with RunLock(Path(out), COMPARE_LOCK_NAME, holder="cafedist compare",
                 advice="wait for it to end or use another --out"):
        def run(runs: list[PlannedRun]) -> list[RunOutcome]:
            return execute(runs, jobs=options.jobs, submit=options.submit,
                           submit_folder=Path(out).resolve() / "submitit")

        tuned = None
        if options.tune:
            tuned = _tune(config, variants, options.seeds, out, overrides, settings, base_seed, run)
            if tuned.stopped:  # nothing chosen nor trained after them: no report (main says why)
                return CompareResult([], {}, tuned)
            outcomes = tuned.finals
        else:
            assert runs is not None
            log.info("compare: %d runs (%d algorithms, %d settings) in %s", len(runs), len(variants),
                     sum(map(len, settings.values())), Path(out) / "runs")
            outcomes = run(runs)
        command = options.command
        if command is None:
            command = _canonical_command(config, out, options, [b.budget for b in budget_options], overrides)
        evaluated, budget_errors = evaluate_outcomes(outcomes, budget_options) if budget_options else ({}, [])
        if not any(o.status in ("done", "skipped") for o in outcomes) and (Path(out) / "results.md").exists():
            # every run failed (e.g. refused by its run directory) or stopped: the report of an
            # earlier compare in ``out`` would be replaced by an empty one
            log.error("compare: no run finished; the report already in %s is left as it was", out)
            return CompareResult(outcomes, {}, tuned, budget_errors)
        paths = write_report(out, command, outcomes, options.thresholds, tuned, evaluated, budget_errors)
        return CompareResult(outcomes, paths, tuned, budget_errors)


def _canonical_command(config: str | os.PathLike | None, out: str | os.PathLike, options: CompareOptions,
                       budgets: Sequence[str], overrides: Sequence[str]) -> str:
    """A ``cafedist compare`` command line equivalent to ``options``: each parsed budget, and the
    overrides as run (with ``--tune``'s validation split)."""
    algos = options.algorithms if isinstance(options.algorithms, str) else ",".join(options.algorithms)
    seed_arg = options.seeds if isinstance(options.seeds, (str, int)) else ",".join(map(str, options.seeds))
    flags = [*(f for g in options.grid for f in ("--grid", g)), *(["--tune"] if options.tune else []),
             *(["--max-trials", str(options.max_trials)] if options.max_trials is not None else []),
             *(f for b in budgets for f in ("--budget", b))]
    return shlex.join(["cafedist", "compare", *(["--config", str(config)] if config else []),
                       "--algorithms", algos, "--seeds", str(seed_arg), *flags, "--out", str(out), *overrides])


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cafedist compare``."""
    p.add_argument("--config", type=config_file_arg,
                   help="YAML config shared by every run (algorithm.name is set per run)")
    p.add_argument("--algorithms", default="all",
                   help="'all' (every registered algorithm and the CAFEDistill ablations) or a comma-separated "
                        "list, e.g. cafedistill,fedavg,cafedistill-nokd (default all)")
    p.add_argument("--seeds", default="3",
                   help="number of seeds (config seed + 0..k-1) or a comma-separated list, e.g. 0,5,7 "
                        "(one given seed: 7,) (default 3)")
    p.add_argument("--out", required=True, type=user_path,
                   help="output directory: runs/<algorithm>/seed<seed>, results.*, plots")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at once (default 1; with --submit on Slurm: no limit); with several local runs "
                        "at once each gets cores/jobs threads unless OMP_NUM_THREADS is set")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every run, e.g. train.rounds=10")
    g = p.add_argument_group("grids and tuning (see `cafedist.tuning`)")
    g.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a parameter grid axis, values in YAML syntax (repeatable; the product of the axes that "
                        "apply to a method: algorithm.<name>.* keys only to that algorithm and its ablations); "
                        "without --tune every setting is its own row")
    g.add_argument("--tune", action="store_true",
                   help="train every setting on the first seed, choose per method by validation accuracy at the "
                        "last exit, then run the chosen setting on every seed (on a validation split: "
                        "data.val_fraction, 0.1 when the config has none)")
    g.add_argument("--max-trials", type=int, default=None, metavar="N",
                   help="at most N settings (trials) per method: the first N in grid order")
    b = p.add_argument_group("per-client inference budgets (as `cafedist eval RUN --budget`)")
    b.add_argument("--budget", action="append", default=[], metavar="SPEC|FILE", type=user_path,
                   help="after training, evaluate every run with each client's exit policy chosen on its "
                        "validation split within this budget: macs=F, loss=P or a per-client CSV/YAML file "
                        "(repeatable, or comma-separated); reports accuracy, MACs, clients within budget, "
                        "the global threshold at the same MACs, one global threshold chosen on calibration and one "
                        "that keeps every client's budget. "
                        "Needs data.val_fraction > 0")
    s = p.add_argument_group("submitit (each run one job; what is not given as `cafedist submit --help` says)")
    s.add_argument("--submit", action="store_true", help="run each (algorithm, seed) as a Slurm job via submitit")
    s.add_argument("--local", action="store_true", help="with --submit: submitit's local executor instead of Slurm")
    add_resource_arguments(s, with_submit=True)


def _submit_options(args: argparse.Namespace) -> ExecutorOptions | None:
    """``--submit`` and its resource flags: the executor options (``cafedist submit``'s defaults
    for what is not given)."""
    resources = resources_given(args)
    given = [f"--{name.replace('_', '-')}" for name in resources] + ["--local"] * bool(args.local)
    if not args.submit:
        if given:
            raise ConfigError(f"{given[0]}: only meaningful with --submit")
        return None
    require_submitit()  # before anything trains
    return ExecutorOptions(local=args.local, **resources)


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed when this process is the ``cafedist`` CLI, else "" (use the canonical form)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    # the console script, or `python -m cafedist` (this package's __main__.py, not another's:
    # `python -m pytest -k compare` would pass a test of the name alone)
    ours = argv0 is not None and (argv0.name == "cafedist" or (
        argv0.name == "__main__.py" and argv0.resolve().parent == Path(__file__).resolve().parents[1]))
    if ours and "compare" in sys.argv[1:]:
        return shlex.join(["cafedist", *sys.argv[1:]])
    return ""


def main(args: argparse.Namespace) -> int:
    """Entry point of ``cafedist compare``: 0 if every run finished, 1 if any failed, else 75
    (:data:`~cafedist.train.signals.REQUEUE_EXIT_CODE`) if any was stopped (a rerun resumes it)."""
    from cafedist.train.signals import REQUEUE_EXIT_CODE

    submit = _submit_options(args)
    # SIGTERM and SIGUSR1 unwind like Ctrl-C (cafedist.cli: every command but train), so the
    # running trainings are stopped with us
    result = compare(args.config, args.out, CompareOptions.from_args(args, submit))
    for o in result.failed:
        print(f"FAILED {o.run.label}: {o.message}")
    # a stopped trial holds the choice back (cafedist.tuning.tune): one line, no choice to print
    tune_stopped = result.tuned.stopped if result.tuned is not None else []
    if tune_stopped:
        print(f"compare --tune: {len(tune_stopped)} of {sum(result.tuned.counts().values())} trials stopped "
              f"({'; '.join(f'{o.run.label}: {o.message}' for o in tune_stopped)}), so no setting was chosen "
              "and no final run trained; rerun the same command to resume them")
    for o in [] if tune_stopped else result.stopped:
        print(f"stopped {o.run.label}: {o.message}")
    for e in result.budget_errors:
        print(f"FAILED {e}")
    if result.tuned is not None and not tune_stopped:
        for name in result.tuned.trials:
            setting = result.tuned.chosen_setting(name)
            chosen = "no trial finished" if setting is None else setting.label or "(config as given)"
            failed = result.tuned.failed(name)
            if setting is not None and failed:
                chosen += (f" (chosen among the trials that did not fail: {len(failed)} of "
                           f"{len(result.tuned.trials[name])} failed; a rerun retries them and may choose otherwise)")
            print(f"tuned {name}: {chosen}")
    if result.paths:
        extra = [p.name for k, p in result.paths.items() if k not in ("md", "csv")]
        print(f"wrote {result.paths['md']} and {result.paths['csv']} (+ {', '.join(extra)})")
    if result.failed:
        # of every run, trials included: failed trials are no part of the report's outcomes
        print(f"{len(result.failed)} of {len(result.runs)} runs failed")
        return 1
    if result.budget_errors:
        return 1
    if result.stopped:
        if not tune_stopped:
            print(f"{len(result.stopped)} of {len(result.runs)} runs stopped; rerun this compare to resume them")
        return REQUEUE_EXIT_CODE
    return 0



__all__ = ["ABLATIONS", "REFERENCE", "REPORT_THRESHOLDS", "CompareOptions", "CompareResult", "PlannedRun",
           "RunOutcome", "Stat", "Variant", "available_variants", "check_ablation_axes", "compare", "mean_std",
           "plan_runs", "resolve_algorithms", "resolve_seeds", "results_csv", "results_markdown", "summarize"]
