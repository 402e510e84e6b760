"""Per-run tables of a comparison, for plots and for committing next to the summary tables.

- ``runs.csv``: one row per run of the report (method, setting, seed, rounds, validation and
  test accuracy per exit, dynamic inference at θ = 0.6, bytes, wall seconds; with ``compare
  --budget``, each budget's numbers as ``<metric>@<budget>`` columns);
- ``trials.csv`` (``--tune``): one row per tuning trial, with whether it was chosen;
- ``curves.csv``: accuracy (test and, with a validation split, validation) per round and exit
  of every run, read from its ``metrics.jsonl``; ``curves.png``: its mean over seeds, one
  panel per exit, one line per row of the report.

Runs are read through compare's ``RunOutcome``/``PlannedRun`` (duck-typed: ``run.variant.name``,
``run.setting.label``, ``run.seed``, ``run.run_dir``, ``run.row``, ``run.finished_summary()``).
"""

from __future__ import annotations

import csv
import io
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from cafedist.run.metrics import read_rounds

#: the confidence threshold whose dynamic-inference accuracy and cost runs.csv records
RUNS_THRESHOLD = 0.6


@dataclass(frozen=True)
class RowInfo:
    """What results.csv/.md say about one row besides its statistics."""

    algorithm: str
    setting: str  # the overrides of the row's setting ("" without a grid)
    rounds: str  # train.rounds of its finished runs ("" if none finished)
    seeds: str  # the seeds that finished, space-separated
    trials: str  # --tune: trials the method's setting was chosen from ("" otherwise)


def row_infos(outcomes: Sequence[Any], trials: dict[str, int] | None = None) -> dict[str, RowInfo]:
    """Row key -> :class:`RowInfo`, from the outcomes of the runs a report is made of."""
    by_row: dict[str, list[Any]] = defaultdict(list)
    for o in outcomes:
        by_row[o.run.row].append(o)
    out = {}
    for row, group in by_row.items():
        done = [(o.run.seed, s) for o in group if (s := _summary(o)) is not None]
        rounds = sorted({str(s["rounds"]) for _, s in done})
        name = group[0].run.variant.name
        out[row] = RowInfo(name, group[0].run.setting.label, " ".join(rounds), " ".join(str(seed) for seed, _ in done),
                           str(trials[name]) if trials and name in trials else "")
    return out


def _summary(outcome: Any) -> dict | None:
    return outcome.run.finished_summary() if outcome.status != "failed" else None


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _num(value: Any) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def _per_exit(values: Sequence[float] | None, n_exits: int) -> list[str]:
    values = list(values or [])
    return [_num(values[k]) if k < len(values) else "" for k in range(n_exits)]


def _n_exits(summaries: Iterable[dict | None]) -> int:
    return max((len(s["acc_per_exit"]) for s in summaries if s), default=0)


def _exit_columns(prefix: str, n_exits: int) -> list[str]:
    return [f"{prefix}_exit{k + 1}" for k in range(n_exits)]


def _at_threshold(summary: dict, threshold: float) -> dict:
    return next((r for r in summary.get("dynamic", []) if abs(r["threshold"] - threshold) < 1e-9), {})


def runs_csv(outcomes: Sequence[Any], root: str | os.PathLike, budgets: dict[str, dict] | None = None) -> str:
    """``runs.csv``: one row per run (failed ones with their status and empty numbers), its
    run directory relative to ``root`` (the comparison's folder, where runs.csv lies; resolved
    like the run directories, so a symlink on the way does not add ``..`` steps);
    ``budgets`` (run directory -> {budget: eval section}, ``compare --budget``) adds each
    budget's :data:`~cafedist.compare.budgets.METRICS` as ``<metric>@<budget>`` columns."""
    from cafedist.compare.budgets import METRICS, numbers

    summaries = [_summary(o) for o in outcomes]
    m = _n_exits(summaries)
    labels = list(dict.fromkeys(b for run in (budgets or {}).values() for b in run))
    header = (["algorithm", "setting", "seed", "rounds", "status"] + _exit_columns("val_acc", m)
              + _exit_columns("test_acc", m)
              + [f"dynamic_accuracy_{RUNS_THRESHOLD:g}", f"dynamic_mean_macs_{RUNS_THRESHOLD:g}",
                 "bytes_per_client_per_round", "wall_seconds"]
              + [f"{m.metric}@{b}" for b in labels for m in METRICS] + ["run_dir"])
    rows = []
    for o, s in zip(outcomes, summaries):
        s = s or {}
        dyn = _at_threshold(s, RUNS_THRESHOLD) if s else {}
        mine = (budgets or {}).get(str(o.run.run_dir), {})
        cells = [numbers(mine[b]) if b in mine else {} for b in labels]
        rows.append([o.run.variant.name, o.run.setting.label, o.run.seed, _num(s.get("rounds")),
                     "finished" if s else o.status]
                    + _per_exit(s.get("val_acc_per_exit"), m) + _per_exit(s.get("acc_per_exit"), m)
                    + [_num(dyn.get("accuracy")), _num(dyn.get("mean_macs")),
                       _num(s.get("bytes_per_client_per_round")), _num(s.get("wall_seconds"))]
                    + [_num(c.get(m.metric)) for c in cells for m in METRICS]
                    + [os.path.relpath(o.run.run_dir, Path(root).resolve())])
    return _csv_text(header, rows)


def trials_csv(trials: dict[str, list[Any]], chosen: dict[str, int | None]) -> str:
    """``trials.csv``: every tuning trial with its validation and test accuracy per exit and
    whether its setting was chosen (the choice read only the validation column of the last exit)."""
    flat = [(name, i, o) for name, outs in trials.items() for i, o in enumerate(outs)]
    summaries = [_summary(o) for _, _, o in flat]
    m = _n_exits(summaries)
    header = (["algorithm", "setting", "seed", "rounds", "status"] + _exit_columns("val_acc", m)
              + _exit_columns("test_acc", m) + ["chosen"])
    rows = []
    for (name, i, o), s in zip(flat, summaries):
        s = s or {}
        rows.append([name, o.run.setting.label, o.run.seed, _num(s.get("rounds")), "finished" if s else o.status]
                    + _per_exit(s.get("val_acc_per_exit"), m) + _per_exit(s.get("acc_per_exit"), m)
                    + ["yes" if chosen.get(name) == i else "no"])
    return _csv_text(header, rows)


def read_curve(run_dir: str | os.PathLike, rounds: int | None = None) -> list[dict]:
    """The evaluated rounds of a run: ``{"round", "acc_per_exit", "val_acc_per_exit"?}`` from
    its ``metrics.jsonl`` (:func:`cafedist.run.metrics.read_rounds`; with ``rounds``, its
    summary's, only the rounds before it: compare takes a summary for the run's only while
    :func:`~cafedist.run.metrics.run_standing` does, so its rounds are where the run's rows end)."""
    return [rec for rec in read_rounds(run_dir, rounds) if rec.get("acc_per_exit")]


def curves_csv(outcomes: Sequence[Any]) -> str:
    """``curves.csv``: algorithm, setting, seed, round, exit (1-based), acc, val_acc."""
    rows = []
    for o in outcomes:
        if (s := _summary(o)) is None:
            continue
        for rec in read_curve(o.run.run_dir, s.get("rounds")):
            val = rec.get("val_acc_per_exit") or []
            for k, acc in enumerate(rec["acc_per_exit"]):
                rows.append([o.run.variant.name, o.run.setting.label, o.run.seed, rec["round"], k + 1,
                             repr(acc), repr(val[k]) if k < len(val) else ""])
    return _csv_text(["algorithm", "setting", "seed", "round", "exit", "acc", "val_acc"], rows)


def mean_curves(outcomes: Sequence[Any]) -> dict[str, list[list[tuple[int, float]]]]:
    """Row key -> per exit, ``(round, mean test accuracy over the row's finished seeds)`` at
    every round all of them evaluated."""
    by_row: dict[str, list[list[dict]]] = defaultdict(list)
    for o in outcomes:
        if (s := _summary(o)) is not None:
            by_row[o.run.row].append(read_curve(o.run.run_dir, s.get("rounds")))
    out = {}
    for row, curves in by_row.items():
        curves = [c for c in curves if c]
        if not curves:
            continue
        common = sorted(set.intersection(*[{r["round"] for r in c} for c in curves]))
        at = [{r["round"]: r["acc_per_exit"] for r in c} for c in curves]
        n_exits = min(len(a[common[0]]) for a in at) if common else 0
        out[row] = [[(rnd + 1, statistics.fmean(a[rnd][k] for a in at)) for rnd in common] for k in range(n_exits)]
    return out
