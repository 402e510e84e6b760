"""The report of a comparison: statistics over seeds, results.md/.csv, plots and the per-run tables."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cafedist import provenance, runtables, tuning
from cafedist.compare.execute import RunOutcome
from cafedist.compare.paired import CONFIDENCE, PairedDiff, PairedReport, PairedRow, paired_differences, rows_by_seed
from cafedist.fsutil import remove_together, replaced_together, write_text_atomic
from cafedist.runtables import RowInfo
from cafedist.stats import mean_std
from cafedist.tuning import TuneResult
from cafedist.units import short_count

log = logging.getLogger("cafedist")

#: thresholds at which the report lists dynamic-inference accuracy and MACs
REPORT_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


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
    budget: str | None = None  # for per-client budget metrics: the --budget spec or file


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


def summarize_budgets(rows: dict[str, list[dict]]) -> list[Stat]:
    """Per row and budget (``rows``: row -> one {budget: eval section} per finished run, see
    :mod:`cafedist.compare.budgets`): its ``METRICS`` (accuracy, MACs fraction, share of clients
    within budget, the global thresholds'), each as mean/std over seeds."""
    from cafedist.compare.budgets import METRICS, numbers

    stats: list[Stat] = []
    for name, runs in rows.items():
        for budget in dict.fromkeys(b for run in runs for b in run):
            per_run = [numbers(run[budget]) for run in runs if budget in run]
            for m in METRICS:
                values = [v[m.metric] for v in per_run if v[m.metric] is not None]
                if values:
                    stats.append(Stat(name, m.metric, None, None, len(values), *mean_std(values), budget=budget))
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
#: the paired differences' own columns: last, so the others keep their places; empty on other lines
PAIRED_COLUMNS = ("reference", "reference_setting", "se", "ci_low", "ci_high", "at_or_above")
CSV_COLUMNS = ("algorithm", "metric", "exit", "threshold", "budget", "n_seeds", "mean", "std",
               "rounds", "seeds", "setting", "trials", *PAIRED_COLUMNS)


def results_csv(stats: Sequence[Stat], rows: dict[str, RowInfo] | None = None,
                paired: PairedReport | None = None) -> str:
    """Tidy CSV, one number per line (fractions, MACs, bytes and seconds as they are); the
    last columns say which runs a row is made of (``rows``: row key -> RowInfo). ``paired``
    adds the ``paired_diff_*`` lines: row − reference over the seeds both finished (``seeds``),
    with the reference row, the standard error, the confidence interval and the seeds at or above."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)

    def info(row: str) -> RowInfo:
        return (rows or {}).get(row) or RowInfo(row, "", "", "", "")

    def head(i: RowInfo, metric: str, exit_: int | None, th: float | None) -> list:
        return [i.algorithm, metric, "" if exit_ is None else exit_, "" if th is None else f"{th:g}"]

    for s in stats:
        i = info(s.algorithm)
        w.writerow([*head(i, s.metric, s.exit, s.threshold), s.budget or "", s.n, repr(s.mean),
                    "" if math.isnan(s.std) else repr(s.std), i.rounds, i.seeds, i.setting, i.trials,
                    *[""] * len(PAIRED_COLUMNS)])
    for d in paired.diffs if paired else ():
        i = info(d.row)
        w.writerow([*head(i, f"paired_diff_{d.metric}", d.exit, d.threshold), "", d.n, repr(d.mean), repr(d.std),
                    i.rounds, " ".join(map(str, d.seeds)), i.setting, i.trials,
                    paired.reference, d.reference_setting, repr(d.se), repr(d.low), repr(d.high), d.at_or_above])
    return buf.getvalue()


def _pm(s: Stat | None, scale: float = 100.0, digits: int = 2) -> str:
    if s is None:
        return "–"
    if math.isnan(s.std):
        return f"{s.mean * scale:.{digits}f}"
    return f"{s.mean * scale:.{digits}f} ± {s.std * scale:.{digits}f}"


class _Stats:
    """The stats of a comparison, looked up by (row, metric, exit, threshold, budget)."""

    def __init__(self, stats: Sequence[Stat]):
        self.stats = list(stats)
        self._index = {(s.algorithm, s.metric, s.exit, s.threshold, s.budget): s for s in stats}
        self.names = list(dict.fromkeys(s.algorithm for s in stats))  # the table rows, in order
        self.n_exits = max((s.exit for s in stats if s.metric == "accuracy"), default=0)
        self.budgets = list(dict.fromkeys(s.budget for s in stats if s.budget is not None))

    def get(self, name: str, metric: str, exit_: int | None = None, th: float | None = None,
            budget: str | None = None) -> Stat | None:
        return self._index.get((name, metric, exit_, th, budget))

    def seeds(self, name: str) -> int:
        """Seeds that finished for row ``name``."""
        return max(s.n for s in self.stats if s.algorithm == name)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_md_row(head), _md_row(["---"] * len(head)), *(_md_row(r) for r in rows)]


def _accuracy_section(st: _Stats, rows: dict[str, RowInfo] | None) -> list[str]:
    info = rows or {}
    tuned = any(i.trials for i in info.values())  # the chosen setting is not in the row's name
    exits = range(1, st.n_exits + 1)
    # an exit's MACs go in the header when every row's model costs the same there (a grid over
    # model.options gives rows other models); otherwise each cell names its own row's MACs
    macs = {k: {name: s.mean for name in st.names if (s := st.get(name, "exit_macs", k))} for k in exits}
    shared = {k: len(set(macs[k].values())) == 1 for k in exits}
    head = ["algorithm", "seeds"] + ["rounds"] * (rows is not None) + ["setting", "trials"] * tuned + [
        f"exit {k} ({short_count(next(iter(macs[k].values())))} MACs)" if shared[k] else f"exit {k}" for k in exits]

    def cell(name: str, k: int) -> str:
        acc = _pm(st.get(name, "accuracy", k))
        return acc if shared[k] or acc == "–" or name not in macs[k] else f"{acc} ({short_count(macs[k][name])} MACs)"

    body = []
    for name in st.names:
        row = info.get(name) or RowInfo(name, "", "", "", "")
        extra = [f"`{row.setting}`" if row.setting else "–", row.trials] if tuned else []
        rounds = [row.rounds or "–"] if rows is not None else []
        body.append([name, str(st.seeds(name)), *rounds, *extra] + [cell(name, k) for k in exits])
    return ["## Personalized accuracy per exit (%)", "", *_table(head, body)]


def _dynamic_section(st: _Stats, thresholds: Sequence[float]) -> list[str]:
    body = []
    for name in st.names:
        cells = []
        for th in thresholds:
            acc, macs = st.get(name, "dynamic_accuracy", th=th), st.get(name, "dynamic_mean_macs", th=th)
            cells.append(f"{_pm(acc)} / {short_count(macs.mean)}" if acc and macs else "–")
        body.append([name, *cells])
    return ["## Dynamic inference: accuracy (%) / mean MACs per sample at confidence threshold θ", "",
            "A sample leaves at the first exit whose softmax confidence is ≥ θ; the last exit always answers.", "",
            *_table(["algorithm"] + [f"θ = {th:g}" for th in thresholds], body)]


def _cost_section(st: _Stats) -> list[str]:
    body = []
    for name in st.names:
        b, w = st.get(name, "bytes_per_client_per_round"), st.get(name, "wall_seconds")
        body.append([name, _pm(st.get(name, "mac_reduction_at_1pt"), digits=1), short_count(b.mean) if b else "–",
                     _pm(w, scale=1.0, digits=1)])
    return ["## Cost", "",
            "MAC reduction: the cheapest threshold whose accuracy is within 1 point of the last exit, "
            "per seed, vs always running the last exit. Bytes: what one client sends plus receives "
            "in a round, averaged over the rounds. Wall time: training time of a run (of a resumed run: "
            "with the rounds its earlier sessions trained).", "",
            *_table(["algorithm", "MAC reduction at ≤ 1 pt loss (%)", "bytes / client / round", "wall time (s)"],
                    body)]


def _budget_section(st: _Stats) -> list[str]:
    from cafedist.compare.budgets import METRICS

    body = []
    for name in st.names:
        for budget in st.budgets:
            cells = [_pm(st.get(name, m.metric, budget=budget), digits=m.digits) for m in METRICS]
            if any(c != "–" for c in cells):
                body.append([name, f"`{budget}`", *cells])
    return ["## Per-client inference budgets", "",
            "Each client's exit policy chosen on calibration (validation) data within its own budget and "
            "checked on its test split, as `cafedist eval RUN --budget` does (pooled scope): test "
            "accuracy (%), mean MACs per sample (% of the last exit's), clients within budget on test (%), "
            "beside it one global threshold for all clients at the same mean MACs (accuracy, %), and "
            "one global threshold chosen on calibration for the same budget (accuracy, %, and clients "
            "within their own budget, %; where all clients share one budget), and one global threshold "
            "chosen on calibration to keep every client's own budget (accuracy, %, and MACs, %).", "",
            *_table(["algorithm", "budget", *(m.header for m in METRICS)], body)]


def _pts(fraction: float) -> str:
    """A signed difference in points, with a real minus sign."""
    return f"{fraction * 100:+.2f}".replace("-", "−")


def _paired_section(paired: PairedReport) -> list[str]:
    """Row − reference, paired by seed, for each row with 2 or more seeds shared."""
    def metric(d: PairedDiff) -> str:
        return f"last exit ({d.exit})" if d.threshold is None else f"θ = {d.threshold:g}"

    # the reference row is named only when some row reads against another than the plain one
    named = any(d.reference != paired.reference for d in paired.diffs)
    level = f"{CONFIDENCE * 100:g} %"
    body = [[d.row, *[d.reference] * named, metric(d), str(d.n), _pts(d.mean), f"{d.se * 100:.2f}",
             f"[{_pts(d.low)}, {_pts(d.high)}]", f"{d.at_or_above}/{d.n}"] for d in paired.diffs]
    head = ["algorithm", *["against"] * named, "accuracy", "seeds", "mean difference (pts)", "standard error (pts)",
            f"{level} CI (pts)", "at or above"]
    lines = [f"## Paired differences against {paired.reference}", "",
             f"Row − {paired.reference} in accuracy points on the seeds both finished, paired by seed (a seed gives "
             "both the same data partition and initialisation, so its difficulty cancels): the mean difference, its "
             "standard error (sample std / √n), its confidence interval from Student's t with n − 1 degrees of "
             "freedom, and on how many seeds the row is at or above the reference.", "",
             *_table(head, body), "",
             f"Paired by seed; a CI that excludes 0 marks a difference beyond seed-to-seed noise at {level}; "
             "not corrected for multiple comparisons (among many rows and thresholds some exclude 0 by chance)."]
    if named:
        lines += ["", "Under --grid a row reads against the reference's row whose setting agrees with its own on "
                  "every key both vary (the reference's only row where it has one)."]
    if paired.left_out:
        lines += ["", "Left out:", "", *(f"- {why}" for why in paired.left_out)]
    return lines


def results_markdown(command: str, stats: Sequence[Stat], outcomes: Sequence[RunOutcome],
                     thresholds: Sequence[float] = REPORT_THRESHOLDS, plots: Sequence[str] = (),
                     rows: dict[str, RowInfo] | None = None, tuning_lines: Sequence[str] = (),
                     budget_errors: Sequence[str] = (), summaries: dict[str, list[dict]] | None = None,
                     paired: PairedReport | None = None) -> str:
    """The ``results.md`` text: the command line first, then the tables, the ``tuning_lines``,
    failures and plots. ``rows`` (row key -> RowInfo) adds rounds, and with tuning the chosen
    setting and trial count, to the accuracy table; stats with a ``budget`` make the budget
    table, ``budget_errors`` lists the runs whose budget evaluation failed; ``summaries`` (as
    :func:`collect_summaries`) name the software and hardware the runs trained on; ``paired``
    with a difference adds the paired differences against the reference."""
    st = _Stats(stats)
    counts = {k: sum(o.status == k for o in outcomes) for k in ("done", "skipped", "failed", "stopped")}
    stopped = f", {counts['stopped']} stopped" if counts["stopped"] else ""  # rare: named only then
    seeds = sorted({o.run.seed for o in outcomes})
    # a row is an algorithm's setting under --grid: count the algorithms, and the rows if more
    algorithms = {o.run.variant.name for o in outcomes if o.run.row in st.names}
    settings = f" in {len(st.names)} settings" if len(st.names) != len(algorithms) else ""
    lines = ["```sh", command, "```", "",
             f"# Comparison: {len(algorithms)} algorithm(s){settings} × seeds {', '.join(map(str, seeds))}", "",
             f"{len(outcomes)} runs: {counts['done']} trained now, {counts['skipped']} reused (finished earlier "
             f"with the same config), {counts['failed']} failed{stopped}. Every number is the mean ± sample standard "
             "deviation (n − 1) over the seeds that finished; a seed changes the data partition, the "
             "initialisation and the sampling. Accuracy is personalized: each client's own test split, "
             "averaged over clients weighted by test size.", ""]
    lines += _stacks_section(summaries or {})
    if st.names:
        lines += [*_accuracy_section(st, rows), "", *_dynamic_section(st, thresholds), "", *_cost_section(st)]
    if paired is not None and paired.diffs:
        lines += ["", *_paired_section(paired)]
    if st.budgets:
        lines += ["", *_budget_section(st)]
    if budget_errors:
        lines += ["", "## Failed budget evaluations", ""] + [f"- {e}" for e in budget_errors]
    if tuning_lines:
        lines += [""] + list(tuning_lines)
    # stopped runs are unfinished but resumable (a rerun of the same compare continues them)
    for status, title in (("failed", "Failed runs"), ("stopped", "Stopped runs")):
        listed = [o for o in outcomes if o.status == status]
        if listed:
            lines += ["", f"## {title}", ""]
            lines += [f"- `{o.run.row}` seed {o.run.seed}: {o.message}" for o in listed]
    missing = sorted({o.run.row for o in outcomes} - set(st.names))
    if missing:
        lines += ["", f"No finished run, so not in the tables: {', '.join(missing)}."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _stacks_section(summaries: dict[str, list[dict]]) -> list[str]:
    """What the finished runs trained on (summary.json's ``environments``), with how many runs
    each stack trained; runs of code before the record are counted as such."""
    counts: Counter[str] = Counter()
    for runs in summaries.values():
        for summary in runs:
            envs = [e for e in summary.get("environments") or [] if isinstance(e, dict)]
            counts.update({provenance.describe(e) for e in envs} or {"not recorded (trained by earlier code)"})
    if not counts:
        return []
    if len(counts) == 1:
        [(stack, n)] = counts.items()
        return [f"Trained on: {stack} ({n} run{'s' if n != 1 else ''}).", ""]
    return [f"Trained on {len(counts)} software and hardware stacks (a run resumed on another counts under each; "
            "results are bit-reproducible on the stack that trained them):", "",
            *[f"- {stack}: {n} run{'s' if n != 1 else ''}" for stack, n in counts.most_common()], ""]


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def collect_summaries(outcomes: Sequence[RunOutcome]) -> dict[str, list[dict]]:
    """Report row (variant name, with its setting under --grid) -> the summaries of its
    finished runs (seed order), for every row run."""
    return _summaries_of(rows_by_seed(outcomes))


def _summaries_of(by_seed: dict[str, PairedRow]) -> dict[str, list[dict]]:
    """:func:`collect_summaries` from the rows :func:`~cafedist.compare.paired.rows_by_seed` read."""
    return {row: list(r.runs.values()) for row, r in by_seed.items()}


#: outputs a report has only sometimes (plots need a finished run, trials.csv a tuning): an
#: earlier report's are removed when the new one has none, so that no file describes other runs
OPTIONAL_OUTPUTS = ("accuracy_vs_macs.png", "per_exit_accuracy.png", "curves.png", "trials.csv")


def write_report(out: str | os.PathLike, command: str, outcomes: Sequence[RunOutcome],
                 thresholds: Sequence[float] = REPORT_THRESHOLDS, tuned: TuneResult | None = None,
                 budgets: dict[str, dict] | None = None, budget_errors: Sequence[str] = ()) -> dict[str, Path]:
    """Write ``results.md``, ``results.csv``, the per-run tables and (if any run finished) the
    plots into ``out``; with ``tuned`` (a tuning's result), also ``trials.csv`` and the tuning
    section; with ``budgets`` (run directory -> {budget: eval section}, ``--budget``) the
    per-client budget numbers. The files replace an earlier report's as one set, at the end
    (a kill while writing leaves the earlier report whole), and optional files of an earlier
    report (there was a results.md) that the new one lacks are removed with it."""
    out = Path(out)
    had_report = (out / "results.md").is_file()  # else a curves.png there is the user's, not a report's
    with replaced_together():
        paths = _write_report_files(out, command, outcomes, thresholds, tuned, budgets, budget_errors)
        if had_report:
            remove_together([out / name for name in OPTIONAL_OUTPUTS if out / name not in paths.values()])
    return paths


def _write_report_files(out: Path, command: str, outcomes: Sequence[RunOutcome], thresholds: Sequence[float],
                        tuned: TuneResult | None, budgets: dict[str, dict] | None,
                        budget_errors: Sequence[str]) -> dict[str, Path]:
    from cafedist.eval import plot_accuracy_vs_macs, plot_curves_per_exit, plot_per_exit_bars

    by_seed = rows_by_seed(outcomes)  # each summary read once
    summaries = _summaries_of(by_seed)
    stats = summarize(summaries, thresholds)
    paired = paired_differences(by_seed, thresholds)
    if budgets:
        by_row: dict[str, list[dict]] = {}
        for o in outcomes:
            if str(o.run.run_dir) in budgets:
                by_row.setdefault(o.run.row, []).append(budgets[str(o.run.run_dir)])
        stats += summarize_budgets(by_row)
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
    write_text_atomic(paths["runs"], runtables.runs_csv(outcomes, out, budgets))
    write_text_atomic(paths["curves"], runtables.curves_csv(outcomes))
    section: list[str] = []
    if tuned is not None:
        paths["trials"] = out / "trials.csv"
        write_text_atomic(paths["trials"], runtables.trials_csv(tuned.trials, tuned.chosen))
        section = tuning.tuning_markdown(tuned, tuned.seed)
    rows = runtables.row_infos(outcomes, tuned.counts() if tuned is not None else None)
    write_text_atomic(paths["csv"], results_csv(stats, rows, paired))
    write_text_atomic(paths["md"], results_markdown(command, stats, outcomes, thresholds, plots, rows, section,
                                                          budget_errors, summaries, paired))
    return paths
