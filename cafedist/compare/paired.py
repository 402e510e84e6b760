"""Paired differences against the reference method: every row's run of seed s shares the data
partition and initialisation of the reference's run of seed s, so row − reference per seed
cancels the seed's difficulty, which varies far more than the methods differ (Student's t
intervals: :mod:`cafedist.stats`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from cafedist.compare.execute import RunOutcome
from cafedist.compare.plan import REFERENCE
from cafedist.stats import mean_std, t_quantile
from cafedist.tuning import Setting

#: the two-sided confidence of the intervals
CONFIDENCE = 0.95


# ----------------------------------------------------------------------------- pairing
@dataclass(frozen=True)
class PairedRow:
    """A report row: its variant, grid setting and finished runs' summaries by seed."""

    variant: str
    setting: Setting
    runs: dict[int, dict] = field(default_factory=dict)  # seed -> summary.json


@dataclass(frozen=True)
class PairedDiff:
    """Row − reference of one accuracy over the seeds both finished."""

    row: str
    reference: str  # the reference's report row
    reference_setting: str  # its setting's label ("" without a grid)
    metric: str  # "accuracy" (the last exit) or "dynamic_accuracy"
    exit: int | None  # the row's last exit (1-based), for "accuracy"
    threshold: float | None  # for "dynamic_accuracy"
    seeds: tuple[int, ...]
    mean: float  # of the differences, as fractions
    std: float  # sample std of the differences
    se: float  # std / sqrt(n)
    low: float  # the CONFIDENCE interval of the mean difference (Student's t, n - 1 df)
    high: float
    at_or_above: int  # seeds on which the row is at or above the reference

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class PairedReport:
    """The paired differences of a comparison, and why rows were left out."""

    diffs: list[PairedDiff]
    left_out: list[str]  # one line per row, markdown
    reference: str = REFERENCE


def rows_by_seed(outcomes: Sequence[RunOutcome]) -> dict[str, PairedRow]:
    """Report row -> its :class:`PairedRow` (every row run, finished runs or none)."""
    out: dict[str, PairedRow] = {}
    for o in outcomes:
        row = out.setdefault(o.run.row, PairedRow(o.run.variant.name, o.run.setting))
        summary = o.run.finished_summary() if o.status != "failed" else None
        if summary is not None:
            row.runs[o.run.seed] = summary
    return out


def _partner(name: str, row: PairedRow, refs: dict[str, PairedRow]) -> tuple[str | None, str]:
    """The reference row ``row`` is read against, or None and why not. The reference's only
    row if it has one (no axis applies to it, or --tune chose its setting); else the one whose
    setting agrees with the row's on every key both vary, if exactly one does."""
    if len(refs) == 1:
        return next(iter(refs)), ""
    mine = dict(row.setting.pairs)
    fits = [k for k, r in refs.items() if all(mine.get(key, value) == value for key, value in r.setting.pairs)]
    if len(fits) == 1:
        return fits[0], ""
    labels = ", ".join(f"`{refs[k].setting.label}`" for k in (fits or refs))
    if fits:
        return None, f"`{name}`: the reference ran several settings that fit this row ({labels}); none is chosen for it"
    return None, f"`{name}`: the reference ran none of this row's settings (it ran {labels})"


def _accuracy(summary: dict, threshold: float | None) -> float | None:
    """The last exit's accuracy (``threshold`` None) or the dynamic accuracy at ``threshold``."""
    if threshold is None:
        return summary["acc_per_exit"][-1]
    hit = next((r for r in summary.get("dynamic", []) if abs(r["threshold"] - threshold) < 1e-9), None)
    return None if hit is None else hit["accuracy"]


def paired_stats(row: dict[int, float], ref: dict[int, float]) -> tuple[tuple[int, ...], float, float, float,
                                                                        float, float, int] | None:
    """Over the seeds both ``row`` and ``ref`` (seed -> value) have: seeds, mean, sample std
    and standard error of row − ref, the CONFIDENCE interval (low, high) and the count of
    seeds with row >= ref; None under 2 shared seeds."""
    seeds = tuple(sorted(row.keys() & ref.keys()))
    if len(seeds) < 2:
        return None
    diffs = [row[s] - ref[s] for s in seeds]
    mean, std = mean_std(diffs)
    se = std / math.sqrt(len(diffs))
    half = t_quantile(0.5 + CONFIDENCE / 2, len(diffs) - 1) * se
    return seeds, mean, std, se, mean - half, mean + half, sum(d >= 0 for d in diffs)


def _diffs(name: str, row: PairedRow, ref_name: str, ref: PairedRow,
           thresholds: Sequence[float]) -> list[PairedDiff]:
    out = []
    n_exits = len(next(iter(row.runs.values()))["acc_per_exit"])
    for th in (None, *thresholds):
        values = [{s: v for s, summary in r.runs.items() if (v := _accuracy(summary, th)) is not None}
                  for r in (row, ref)]
        stats = paired_stats(*values)
        if stats is not None:
            out.append(PairedDiff(name, ref_name, ref.setting.label, "accuracy" if th is None else "dynamic_accuracy",
                                  n_exits if th is None else None, th, *stats))
    return out


def _too_few(name: str, shared: list[int], ref_name: str) -> str:
    seeds = f" ({' '.join(map(str, shared))})" if shared else ""
    return f"`{name}`: {len(shared)} seed{'s' * (len(shared) != 1)} shared with `{ref_name}`{seeds}; 2 needed"


def paired_differences(rows: dict[str, PairedRow], thresholds: Sequence[float] | None = None,
                       reference: str = REFERENCE) -> PairedReport:
    """Each row other than ``reference``'s against its reference row (see :func:`_partner`),
    paired by seed: the last exit's accuracy and the dynamic accuracy at ``thresholds``
    (default the report's). Rows with finished runs but under 2 seeds shared with their
    reference row are left out, with why."""
    if thresholds is None:
        from cafedist.compare.report import REPORT_THRESHOLDS  # report imports this module

        thresholds = REPORT_THRESHOLDS
    refs = {k: r for k, r in rows.items() if r.variant == reference}
    if not refs:
        return PairedReport([], [], reference)
    diffs: list[PairedDiff] = []
    left_out: list[str] = []
    for name, row in rows.items():
        if row.variant == reference or not row.runs:  # a row with no finished run is named apart already
            continue
        ref_name, why = _partner(name, row, refs)
        if ref_name is None:
            left_out.append(why)
            continue
        mine = _diffs(name, row, ref_name, refs[ref_name], thresholds)
        if not mine:
            left_out.append(_too_few(name, sorted(row.runs.keys() & refs[ref_name].runs.keys()), ref_name))
        diffs += mine
    return PairedReport(diffs, left_out, reference)
