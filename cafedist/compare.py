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
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from cafedist import runtables, tuning
from cafedist.errors import ConfigError
from cafedist.fsutil import write_text_atomic
from cafedist.runtables import RowInfo
from cafedist.tuning import NO_SETTING, Setting, TuneResult
from cafedist.units import short_count

log = logging.getLogger("cafedist")

#: thresholds at which the report lists dynamic-inference accuracy and MACs
REPORT_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)

#: the method every other row is read against: listed first, its ablations next to it
REFERENCE = "cafedistill"

#: pseudo-algorithms: name -> (registered algorithm, parameters of its section to set)
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "cafedistill-nokd": ("cafedistill", {"cross_client_kd": False}),
    "cafedistill-nosel": ("cafedistill", {"student_selection": False}),
}

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # so children import this cafedist from any cwd


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
        if base in ALGORITHMS and name not in out:
            sets = tuple(f"algorithm.{base}.{k}={_yaml_scalar(v)}" for k, v in params.items())
            out[name] = Variant(name, base, (f"algorithm.name={base}", *sets))

    def rank(name: str) -> tuple[int, str]:
        if name == REFERENCE:
            return 0, name
        return (1 if name in ABLATIONS and ABLATIONS[name][0] == REFERENCE else 2), name

    return {name: out[name] for name in sorted(out, key=rank)}


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

    def __post_init__(self) -> None:
        self.row = self.row or self.variant.name

    @property
    def label(self) -> str:
        return f"{self.variant.name}{f' [{self.setting.label}]' if self.setting.pairs else ''} seed{self.seed}"

    def train_argv(self) -> list[str]:
        """Arguments of ``cafedist`` (``train`` and its options) for this run."""
        from cafedist.submit import RunSpec

        return RunSpec(self.config, str(self.run_dir), self.overrides).train_argv()

    def finished_summary(self) -> dict | None:
        """The run's summary if it is finished with this very config, else None."""
        path = self.run_dir / "summary.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return summary if summary.get("config_hash") == self.config_hash else None


def plan_run(config: str | os.PathLike | None, variant: Variant, seed: int, out: str | os.PathLike,
             overrides: Sequence[str] = (), setting: Setting = NO_SETTING, row: str = "") -> PlannedRun:
    """One run, its directory (``runs/<variant>[/<setting>]/seed<seed>``) and its resolved
    config (validated now, so a typo fails before anything starts)."""
    from cafedist.config import config_hash, load_config

    config_path = str(Path(config).resolve()) if config else None
    # later overrides win: the setting, the variant (an ablation's switch must hold) and the
    # seed are what compare controls
    ovr = (*overrides, *setting.overrides, *variant.overrides, f"seed={seed}")
    cfg = load_config(config_path, list(ovr))
    run_dir = Path(out).resolve() / "runs" / variant.name
    run_dir = (run_dir / setting.slug if setting.pairs else run_dir) / f"seed{seed}"
    return PlannedRun(variant, seed, run_dir, config_path, ovr, config_hash(cfg), setting, row)


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


# ----------------------------------------------------------------------------- running
Status = Literal["done", "skipped", "failed"]


@dataclass
class RunOutcome:
    """How one planned run ended in this invocation."""

    run: PlannedRun
    status: Status
    message: str = ""
    seconds: float = 0.0


def _last_error(text: str) -> str:
    """The line of a train log that says what went wrong (its last error line, else its last line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("cafedist: error:") or "Error" in ln.split(":")[0]]
    return (errors or lines or ["(no output)"])[-1]


def _child_env(jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(_PACKAGE_ROOT), *[p for p in parts if p != str(_PACKAGE_ROOT)]])
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        # concurrent runs would each start one thread per core: share the cores instead
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


class _Children:
    """The training subprocesses running now, so that stopping compare stops them too: an
    orphaned run would go on writing into a directory the next compare may start again."""

    def __init__(self) -> None:
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def run(self, cmd: list[str], **kwargs: Any) -> int:
        """Start ``cmd`` and wait for it (refused once :meth:`stop_all` was called)."""
        with self._lock:
            if self._stopping:
                raise RuntimeError("compare is stopping: run not started")
            proc = subprocess.Popen(cmd, **kwargs)
            self._procs.add(proc)
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._procs.discard(proc)

    def stop_all(self) -> None:
        """SIGTERM every child (``train`` writes a checkpoint and exits) and wait for them."""
        with self._lock:
            self._stopping = True
            procs = list(self._procs)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()


_CHILDREN = _Children()


def run_subprocess(run: PlannedRun, jobs: int = 1) -> RunOutcome:
    """``python -m cafedist train ...`` for ``run``; output appended to ``RUN_DIR/train.log``."""
    cmd = [sys.executable, "-m", "cafedist", *run.train_argv()]
    run.run_dir.mkdir(parents=True, exist_ok=True)
    logfile = run.run_dir / "train.log"
    t0 = time.perf_counter()
    with open(logfile, "a") as fh:
        fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        fh.flush()
        code = _CHILDREN.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_child_env(jobs),
                             stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    if code == 0 and run.finished_summary() is not None:
        return RunOutcome(run, "done", seconds=seconds)
    why = f"exit status {code}" if code else "no summary.json written"
    tail = logfile.read_text(errors="replace")[-20000:]
    return RunOutcome(run, "failed", f"{why}: {_last_error(tail)} (log: {logfile})", seconds)


@dataclass
class SubmitOptions:
    """``--submit``: one submitit job per run, on Slurm or (``local``) as local processes.

    Fields left ``None`` take ``cafedist submit``'s defaults.
    """

    local: bool = False
    time: str | None = None
    partition: str | None = None
    nodes: int | None = None
    tasks_per_node: int | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    slurm_arg: list[str] = field(default_factory=list)


def run_submitit(runs: Sequence[PlannedRun], options: SubmitOptions, folder: Path,
                 jobs: int | None = None) -> list[RunOutcome]:
    """Submit the runs as jobs through :mod:`cafedist.submit` and wait for them.

    Slurm: one job array, at most ``jobs`` elements at once (None: no limit). Local: waves of
    ``jobs`` (default 1) jobs, since the local executor starts everything it is given at once.
    """
    from cafedist import submit
    from cafedist.jobs import ExecutorOptions, wait_for

    given = {key: value for key, value in vars(options).items() if value is not None and value != []}
    executor_options = ExecutorOptions(**given, job_name="cafedist-compare",
                                       array_parallelism=None if options.local else jobs)
    executor = executor_options.executor(folder / "%j", folder)
    env = {"OMP_NUM_THREADS": str(executor_options.cpus_per_task)}
    specs = [submit.RunSpec(r.config, str(r.run_dir), r.overrides, label=r.label) for r in runs]
    wave = (jobs or 1) if options.local else len(specs)
    outcomes: list[RunOutcome] = []
    for start in range(0, len(specs), wave):
        part, part_runs = specs[start:start + wave], list(runs[start:start + wave])
        t0 = time.perf_counter()
        submitted = submit.submit_runs(executor, part, env)
        for job, run in zip(submitted, part_runs):
            log.info("compare: %s submitted as job %s (logs: %s)", run.label, job.job_id, job.paths.stderr.parent)
        for res, run in zip(wait_for(submitted, part), part_runs):
            ok = res.ok and run.finished_summary() is not None
            msg = "" if ok else (res.error or "no summary.json written") + f" (job {res.job_id})"
            outcomes.append(RunOutcome(run, "done" if ok else "failed", msg, time.perf_counter() - t0))
    return outcomes


def execute(runs: Sequence[PlannedRun], jobs: int | None = None, submit: SubmitOptions | None = None,
            submit_folder: Path | None = None,
            runner: Callable[[PlannedRun, int], RunOutcome] = run_subprocess) -> list[RunOutcome]:
    """Run what is not finished yet, ``jobs`` at a time (default: 1 locally, no limit on Slurm);
    returns one outcome per run, in plan order. ``runner`` runs one plan locally."""
    outcomes: dict[int, RunOutcome] = {}
    todo = []
    for i, run in enumerate(runs):
        if run.finished_summary() is not None:
            outcomes[i] = RunOutcome(run, "skipped", "finished earlier with the same config")
            log.info("compare: [%d/%d] %s: skipped (finished, summary.json matches the config)",
                     i + 1, len(runs), run.label)
        else:
            todo.append(i)
    if todo and submit is not None:
        folder = submit_folder or runs[0].run_dir.parents[2] / "submitit"
        for i, res in zip(todo, run_submitit([runs[i] for i in todo], submit, folder, jobs)):
            outcomes[i] = res
            _log_outcome(i, len(runs), res)
    elif todo:
        jobs = jobs or 1

        def one(i: int) -> None:
            log.info("compare: [%d/%d] %s: running", i + 1, len(runs), runs[i].label)
            outcomes[i] = runner(runs[i], jobs)
            _log_outcome(i, len(runs), outcomes[i])

        pool = ThreadPoolExecutor(max_workers=jobs)
        try:
            list(pool.map(one, todo))
        except BaseException:  # Ctrl-C or SIGTERM: start nothing more, stop what runs (it checkpoints)
            pool.shutdown(wait=False, cancel_futures=True)
            _CHILDREN.stop_all()
            raise
        finally:
            pool.shutdown(wait=True)
    return [outcomes[i] for i in range(len(runs))]


def _log_outcome(i: int, total: int, res: RunOutcome) -> None:
    if res.status == "failed":
        log.error("compare: [%d/%d] %s: FAILED: %s", i + 1, total, res.run.label, res.message)
    else:
        log.info("compare: [%d/%d] %s: done in %.1f s", i + 1, total, res.run.label, res.seconds)


# ----------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Stat:
    """One number of the report: mean and sample std over seeds of a metric of a variant."""

    algorithm: str
    metric: str
    exit: int | None  # 1-based, for per-exit metrics
    threshold: float | None  # for dynamic-inference metrics
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1); NaN for a single seed


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN when there is only one value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def _row_at(table: list[dict], threshold: float) -> dict | None:
    return next((row for row in table if abs(row["threshold"] - threshold) < 1e-9), None)


def summarize(summaries: dict[str, list[dict]], thresholds: Sequence[float] = REPORT_THRESHOLDS) -> list[Stat]:
    """Per variant: accuracy per exit, dynamic accuracy/MACs at ``thresholds``, MAC reduction at
    <= 1 point loss, bytes per client per round and wall time, each as mean/std over seeds."""
    stats: list[Stat] = []
    for name, runs in summaries.items():
        if not runs:
            continue

        def add(metric: str, values: list[float], exit_: int | None = None, th: float | None = None) -> None:
            if values:
                stats.append(Stat(name, metric, exit_, th, len(values), *mean_std(values)))

        for k in range(max(len(s["acc_per_exit"]) for s in runs)):
            add("accuracy", [s["acc_per_exit"][k] for s in runs if k < len(s["acc_per_exit"])], exit_=k + 1)
            add("exit_macs", [s["macs_per_exit"][k] for s in runs if k < len(s["macs_per_exit"])], exit_=k + 1)
        for th in thresholds:
            rows = [r for r in (_row_at(s["dynamic"], th) for s in runs) if r is not None]
            add("dynamic_accuracy", [r["accuracy"] for r in rows], th=th)
            add("dynamic_mean_macs", [r["mean_macs"] for r in rows], th=th)
            add("dynamic_macs_reduction", [r["macs_reduction"] for r in rows], th=th)
        add("mac_reduction_at_1pt", [s["mac_reduction_at_1pt"]["macs_reduction"] for s in runs])
        add("bytes_per_client_per_round", [s["bytes_per_client_per_round"] for s in runs])
        add("wall_seconds", [s["wall_seconds"] for s in runs])
    return stats


def mean_curve(runs: list[dict]) -> list[dict]:
    """The seeds' dynamic-inference tables averaged threshold by threshold (thresholds all share)."""
    common = [row["threshold"] for row in runs[0]["dynamic"]
              if all(_row_at(s["dynamic"], row["threshold"]) is not None for s in runs)]
    curve = []
    for th in common:
        rows = [_row_at(s["dynamic"], th) for s in runs]
        curve.append({"threshold": th, "accuracy": statistics.fmean(r["accuracy"] for r in rows),
                      "mean_macs": statistics.fmean(r["mean_macs"] for r in rows)})
    return curve


# ----------------------------------------------------------------------------- report
CSV_COLUMNS = ("algorithm", "metric", "exit", "threshold", "n_seeds", "mean", "std",
               "rounds", "seeds", "setting", "trials")


def results_csv(stats: Sequence[Stat], rows: dict[str, RowInfo] | None = None) -> str:
    """Tidy CSV, one number per line (fractions, MACs, bytes and seconds as they are); the
    last columns say which runs a row is made of (``rows``: row key -> RowInfo)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for s in stats:
        info = (rows or {}).get(s.algorithm) or RowInfo(s.algorithm, "", "", "", "")
        w.writerow([info.algorithm, s.metric, "" if s.exit is None else s.exit,
                    "" if s.threshold is None else f"{s.threshold:g}", s.n, repr(s.mean),
                    "" if math.isnan(s.std) else repr(s.std), info.rounds, info.seeds, info.setting, info.trials])
    return buf.getvalue()


def _pm(s: Stat | None, scale: float = 100.0, digits: int = 2) -> str:
    if s is None:
        return "–"
    if math.isnan(s.std):
        return f"{s.mean * scale:.{digits}f}"
    return f"{s.mean * scale:.{digits}f} ± {s.std * scale:.{digits}f}"


def results_markdown(command: str, stats: Sequence[Stat], outcomes: Sequence[RunOutcome],
                     thresholds: Sequence[float] = REPORT_THRESHOLDS, plots: Sequence[str] = (),
                     rows: dict[str, RowInfo] | None = None, tuning_lines: Sequence[str] = ()) -> str:
    """The ``results.md`` text: the command line first, then the tables, the ``tuning_lines``,
    failures and plots. ``rows`` (row key -> RowInfo) adds rounds, and with tuning the chosen
    setting and trial count, to the accuracy table."""
    index = {(s.algorithm, s.metric, s.exit, s.threshold): s for s in stats}
    names = list(dict.fromkeys(s.algorithm for s in stats))
    n_exits = max((s.exit for s in stats if s.metric == "accuracy"), default=0)

    def get(name: str, metric: str, exit_: int | None = None, th: float | None = None) -> Stat | None:
        return index.get((name, metric, exit_, th))

    counts = {k: sum(o.status == k for o in outcomes) for k in ("done", "skipped", "failed")}
    seeds = sorted({o.run.seed for o in outcomes})
    lines = ["```sh", command, "```", "",
             f"# Comparison: {len(names)} algorithm(s) × seeds {', '.join(map(str, seeds))}", "",
             f"{len(outcomes)} runs: {counts['done']} trained now, {counts['skipped']} reused (finished earlier "
             f"with the same config), {counts['failed']} failed. Every number is the mean ± sample standard "
             "deviation (n − 1) over the seeds that finished; a seed changes the data partition, the "
             "initialisation and the sampling. Accuracy is personalized: each client's own test split, "
             "averaged over clients weighted by test size.", ""]
    info = rows or {}
    tuned = any(i.trials for i in info.values())  # the chosen setting is not in the row's name
    if names:
        head = ["algorithm", "seeds"] + ["rounds"] * (rows is not None) + ["setting", "trials"] * tuned + [
            f"exit {k} ({short_count(get(names[0], 'exit_macs', k).mean)} MACs)"
            if get(names[0], "exit_macs", k) else f"exit {k}" for k in range(1, n_exits + 1)]
        lines += ["## Personalized accuracy per exit (%)", "", _md_row(head), _md_row(["---"] * len(head))]
        for name in names:
            n = max(s.n for s in stats if s.algorithm == name)
            row = info.get(name) or RowInfo(name, "", "", "", "")
            extra = [f"`{row.setting}`" if row.setting else "–", row.trials] if tuned else []
            rounds = [row.rounds or "–"] if rows is not None else []
            lines.append(_md_row([name, str(n), *rounds, *extra]
                                 + [_pm(get(name, "accuracy", k)) for k in range(1, n_exits + 1)]))
        lines += ["", "## Dynamic inference: accuracy (%) / mean MACs per sample at confidence threshold θ", "",
                  "A sample leaves at the first exit whose softmax confidence is ≥ θ; the last exit always answers.",
                  ""]
        head = ["algorithm"] + [f"θ = {th:g}" for th in thresholds]
        lines += [_md_row(head), _md_row(["---"] * len(head))]
        for name in names:
            cells = []
            for th in thresholds:
                acc, macs = get(name, "dynamic_accuracy", th=th), get(name, "dynamic_mean_macs", th=th)
                cells.append(f"{_pm(acc)} / {short_count(macs.mean)}" if acc and macs else "–")
            lines.append(_md_row([name] + cells))
        lines += ["", "## Cost", "",
                  "MAC reduction: the cheapest threshold whose accuracy is within 1 point of the last exit, "
                  "per seed, vs always running the last exit. Bytes: what one client sends plus receives "
                  "in a round. Wall time: training time of a run (of its last resumed part, if it was resumed).",
                  ""]
        head = ["algorithm", "MAC reduction at ≤ 1 pt loss (%)", "bytes / client / round", "wall time (s)"]
        lines += [_md_row(head), _md_row(["---"] * len(head))]
        for name in names:
            b, w = get(name, "bytes_per_client_per_round"), get(name, "wall_seconds")
            lines.append(_md_row([name, _pm(get(name, "mac_reduction_at_1pt"), digits=1),
                                  short_count(b.mean) if b else "–", _pm(w, scale=1.0, digits=1)]))
    if tuning_lines:
        lines += [""] + list(tuning_lines)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- `{o.run.row}` seed {o.run.seed}: {o.message}" for o in failed]
    missing = sorted({o.run.row for o in outcomes} - set(names))
    if missing:
        lines += ["", f"No finished run, so not in the tables: {', '.join(missing)}."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def collect_summaries(outcomes: Sequence[RunOutcome]) -> dict[str, list[dict]]:
    """Report row (variant name, with its setting under --grid) -> the summaries of its
    finished runs (seed order), for every row run."""
    out: dict[str, list[dict]] = {}
    for o in outcomes:
        out.setdefault(o.run.row, [])
        summary = o.run.finished_summary() if o.status != "failed" else None
        if summary is not None:
            out[o.run.row].append(summary)
    return out


def write_report(out: str | os.PathLike, command: str, outcomes: Sequence[RunOutcome],
                 thresholds: Sequence[float] = REPORT_THRESHOLDS, tuned: TuneResult | None = None) -> dict[str, Path]:
    """Write ``results.md``, ``results.csv``, the per-run tables and (if any run finished) the
    plots into ``out``; with ``tuned`` (a tuning's result), also ``trials.csv`` and the tuning section."""
    from cafedist.eval import plot_accuracy_vs_macs, plot_curves_per_exit, plot_per_exit_bars

    out = Path(out)
    summaries = collect_summaries(outcomes)
    stats = summarize(summaries, thresholds)
    finished = {name: runs for name, runs in summaries.items() if runs}
    paths = {"csv": out / "results.csv", "md": out / "results.md"}
    plots: list[str] = []
    if finished:
        curves = {name: mean_curve(runs) for name, runs in finished.items()}
        per_exit = {name: [s.mean for s in stats if s.algorithm == name and s.metric == "accuracy"]
                    for name in finished}
        exit_macs = {name: runs[0]["macs_per_exit"] for name, runs in finished.items()}
        paths["accuracy_vs_macs"] = out / "accuracy_vs_macs.png"
        paths["per_exit_accuracy"] = out / "per_exit_accuracy.png"
        # the static exits as extra points only while the legend stays readable
        points = {n: (per_exit[n], exit_macs[n]) for n in finished} if len(finished) <= 4 else None
        plot_accuracy_vs_macs(curves, paths["accuracy_vs_macs"], per_exit=points,
                              title="accuracy vs MACs (mean over seeds)")
        plot_per_exit_bars(per_exit, paths["per_exit_accuracy"], title="personalized accuracy per exit")
        plots = [paths["accuracy_vs_macs"].name, paths["per_exit_accuracy"].name]
        rounds_curves = runtables.mean_curves(outcomes)
        if rounds_curves:
            paths["curves_png"] = out / "curves.png"
            plot_curves_per_exit(rounds_curves, paths["curves_png"], ylabel="test accuracy (%)",
                                 title="personalized accuracy vs rounds completed (mean over seeds)")
            plots.append(paths["curves_png"].name)
    paths.update(runs=out / "runs.csv", curves=out / "curves.csv")
    write_text_atomic(paths["runs"], runtables.runs_csv(outcomes))
    write_text_atomic(paths["curves"], runtables.curves_csv(outcomes))
    section: list[str] = []
    if tuned is not None:
        paths["trials"] = out / "trials.csv"
        write_text_atomic(paths["trials"], runtables.trials_csv(tuned.trials, tuned.chosen))
        section = tuning.tuning_markdown(tuned, tuned.seed)
    rows = runtables.row_infos(outcomes, tuned.counts() if tuned is not None else None)
    write_text_atomic(paths["csv"], results_csv(stats, rows))
    write_text_atomic(paths["md"], results_markdown(command, stats, outcomes, thresholds, plots, rows, section))
    return paths


# ----------------------------------------------------------------------------- API and CLI
@dataclass
class CompareResult:
    """What :func:`compare` did: every run's outcome and the files it wrote."""

    outcomes: list[RunOutcome]
    paths: dict[str, Path]
    tuned: TuneResult | None = None  # --tune: the trials and the choice

    @property
    def failed(self) -> list[RunOutcome]:
        """Failed runs of the report, then failed tuning trials."""
        trials = [o for t in self.tuned.trials.values() for o in t] if self.tuned else []
        return [o for o in [*self.outcomes, *trials] if o.status == "failed"]


def _tune(config: str | os.PathLike | None, variants: Sequence[Variant], seeds: str | int | Sequence[int],
          out: str | os.PathLike, overrides: Sequence[str], settings: dict[str, list[Setting]],
          axes: Sequence[tuning.GridAxis], run: Callable[[list[PlannedRun]], list[RunOutcome]]) -> TuneResult:
    """``--tune``: trials on the first seed, choice on validation, chosen settings on every seed."""
    from cafedist.config import load_config

    base = load_config(str(Path(config).resolve()) if config else None, list(overrides))
    tuning.check_tunable(base.data.val_fraction, axes)
    overrides = tuple(overrides)

    def plan(variant: Variant, setting: Setting, seed: int) -> PlannedRun:
        return plan_run(config, variant, seed, out, overrides, setting)  # one row per method

    return tuning.tune(variants, settings, resolve_seeds(seeds, base.seed), plan, run)


def compare(config: str | os.PathLike | None, out: str | os.PathLike, algorithms: str | Sequence[str] = "all",
            seeds: str | int | Sequence[int] = 3, overrides: Sequence[str] = (), jobs: int | None = None,
            submit: SubmitOptions | None = None, command: str | None = None,
            thresholds: Sequence[float] = REPORT_THRESHOLDS, grid: Sequence[str] = (), tune: bool = False,
            budget: int | None = None) -> CompareResult:
    """Run (or reuse) every (algorithm, setting, seed) and write the report into ``out``.

    ``grid`` holds ``KEY=v1,v2`` specs (``--grid``), ``budget`` caps the settings per method;
    ``tune`` chooses each method's setting on the validation split (:mod:`cafedist.tuning`).
    ``command`` is the first line of ``results.md`` (default: an equivalent ``cafedist
    compare`` command line). Failed runs are reported, not raised.
    """
    from cafedist.algorithms import ALGORITHMS

    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs: expected >= 1, got {jobs}")
    variants = resolve_algorithms(algorithms)
    axes = tuning.parse_grid(grid, [v.algorithm for v in variants], known=list(ALGORITHMS))
    settings = {v.name: tuning.settings_for(axes, v.algorithm, budget) for v in variants}

    def run(runs: list[PlannedRun]) -> list[RunOutcome]:
        return execute(runs, jobs=jobs, submit=submit, submit_folder=Path(out).resolve() / "submitit")

    tuned = None
    if tune:
        overrides = tuning.with_validation_split(config, overrides)
        tuned = _tune(config, variants, seeds, out, overrides, settings, axes, run)
        outcomes = tuned.finals
    else:
        runs = plan_runs(config, variants, seeds, out, overrides, settings if axes else None)
        log.info("compare: %d runs (%d algorithms, %d settings) in %s", len(runs), len(variants),
                 sum(map(len, settings.values())), Path(out) / "runs")
        outcomes = run(runs)
    if command is None:
        algos = algorithms if isinstance(algorithms, str) else ",".join(algorithms)
        seed_arg = seeds if isinstance(seeds, (str, int)) else ",".join(map(str, seeds))
        flags = [*(f for g in grid for f in ("--grid", g)), *(["--tune"] if tune else []),
                 *(["--budget", str(budget)] if budget is not None else [])]
        command = shlex.join(["cafedist", "compare", *(["--config", str(config)] if config else []),
                              "--algorithms", algos, "--seeds", str(seed_arg), *flags, "--out", str(out), *overrides])
    paths = write_report(out, command, outcomes, thresholds, tuned)
    return CompareResult(outcomes, paths, tuned)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cafedist compare``."""
    p.add_argument("--config", help="YAML config shared by every run (algorithm.name is set per run)")
    p.add_argument("--algorithms", default="all",
                   help="'all' (every registered algorithm and the CAFEDistill ablations) or a comma-separated "
                        "list, e.g. cafedistill,fedavg,cafedistill-nokd (default all)")
    p.add_argument("--seeds", default="3",
                   help="number of seeds (config seed + 0..k-1) or a comma-separated list, e.g. 0,5,7 "
                        "(one given seed: 7,) (default 3)")
    p.add_argument("--out", required=True, help="output directory: runs/<algorithm>/seed<seed>, results.*, plots")
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
    g.add_argument("--budget", type=int, default=None, metavar="N",
                   help="at most N settings (trials) per method: the first N in grid order")
    s = p.add_argument_group("submitit (see `cafedist submit --help`)")
    s.add_argument("--submit", action="store_true", help="run each (algorithm, seed) as a Slurm job via submitit")
    s.add_argument("--local", action="store_true", help="with --submit: submitit's local executor instead of Slurm")
    s.add_argument("--time", default=None, help="with --submit: time limit per run, minutes or H:MM:SS")
    s.add_argument("--partition", default=None, help="with --submit: Slurm partition")
    s.add_argument("--nodes", type=int, default=None, help="with --submit: nodes per run")
    s.add_argument("--tasks-per-node", type=int, default=None, help="with --submit: ranks per node")
    s.add_argument("--gpus-per-node", type=int, default=None, help="with --submit: GPUs per node")
    s.add_argument("--cpus-per-task", type=int, default=None, help="with --submit: CPUs per rank")
    s.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="with --submit: any other sbatch option (repeatable)")


_SUBMIT_FIELDS = ("time", "partition", "nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task")


def _submit_options(args: argparse.Namespace) -> SubmitOptions | None:
    given = [f"--{f.replace('_', '-')}" for f in _SUBMIT_FIELDS if getattr(args, f) is not None]
    given += ["--local"] * bool(args.local) + ["--slurm-arg"] * bool(args.slurm_arg)
    if not args.submit:
        if given:
            raise ConfigError(f"{given[0]}: only meaningful with --submit")
        return None
    return SubmitOptions(local=args.local, slurm_arg=list(args.slurm_arg),
                         **{f: getattr(args, f) for f in _SUBMIT_FIELDS})


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed when this process is the ``cafedist`` CLI, else "" (use the canonical form)."""
    argv0 = Path(sys.argv[0]).name if sys.argv else ""
    if argv0 in ("cafedist", "__main__.py") and "compare" in sys.argv[1:]:
        return shlex.join(["cafedist", *sys.argv[1:]])
    return ""


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``cafedist compare``: 0 if every run finished, 1 if any failed."""
    submit = _submit_options(args)
    # SIGTERM (kill, Slurm) unwinds like Ctrl-C, so the running trainings are stopped with us
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        result = compare(args.config, args.out, args.algorithms, args.seeds, args.overrides, jobs=args.jobs,
                         submit=submit, command=_command_line(args) or None, grid=args.grid, tune=args.tune,
                         budget=args.budget)
    finally:
        signal.signal(signal.SIGTERM, previous)
    for o in result.failed:
        print(f"FAILED {o.run.label}: {o.message}")
    if result.tuned is not None:
        for name in result.tuned.trials:
            setting = result.tuned.chosen_setting(name)
            print(f"tuned {name}: " + ("no trial finished" if setting is None else setting.label or "(config as given)"))
    extra = [p.name for k, p in result.paths.items() if k not in ("md", "csv")]
    print(f"wrote {result.paths['md']} and {result.paths['csv']} (+ {', '.join(extra)})")
    if result.failed:
        print(f"{len(result.failed)} of {len(result.outcomes)} runs failed")
        return 1
    return 0
