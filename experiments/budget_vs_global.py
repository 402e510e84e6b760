"""Per-client budgets against one global threshold, on test, for many finished runs.

    python experiments/budget_vs_global.py RUN_DIR [RUN_DIR ...] --out CSV [--budget macs=0.5] [--confidence C]
    python experiments/budget_vs_global.py --summarize CSV [CSV ...]

For each run, what ``cafedist eval RUN --budget SPEC`` reports (default scope, nothing chosen on
test): the per-client policies' accuracy, MACs share and share of clients within budget; the
global threshold read on the test curve at the same mean MACs; and ``global_on_calibration``
(one threshold chosen on the pooled calibration splits for the same budget, judged against
each client's own budget); and ``global_within_every_budget`` (one threshold chosen on
calibration to keep every client's own budget: the alternative at equal per-client budgets;
CSVs written before session 12 lack these columns). One more column set is hindsight and labelled so: the pooled policy
with each client's threshold fitted on its *test* split exactly to its budget (no margin), and
the global curve at those MACs — the ceiling of the pooled rule on that run. Appends one CSV
row per run and skips runs already in ``--out`` (resumable). ``--summarize`` prints, per CSV,
the means over its runs that docs/METHOD.md ("Against the global threshold") quotes from
``docs/results/budget_macs*_T100.csv``, written by this script for the 120 seed runs of the
T = 100 study.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from budget_halvings import global_table, macs_budget

from cafedist.errors import CafeError
from cafedist.eval.budget import personalized_budgets
from cafedist.eval.budget_report import accuracy_at_macs, apply_choice
from cafedist.eval.budget_run import client_splits
from cafedist.eval.budget_search import Choice, fit_to_budget
from cafedist.eval.run import load_run
from cafedist.stats import mean_se

COLUMNS = ("run", "budget", "confidence", "last_exit_accuracy", "pooled_accuracy", "pooled_macs_fraction",
           "pooled_share_within_budget",
           "global_at_same_macs_accuracy", "global_on_calibration_accuracy", "global_on_calibration_macs_fraction",
           "global_on_calibration_share_within_budget", "hindsight_test_fit_accuracy",
           "hindsight_test_fit_macs_fraction", "hindsight_test_fit_global_at_same_macs_accuracy",
           "global_within_every_budget_accuracy", "global_within_every_budget_macs_fraction",
           "global_within_every_budget_share_within_budget")


def run_row(run_dir: str, spec: str, parser: argparse.ArgumentParser, confidence: float = 0.95) -> dict[str, str]:
    """One CSV row (numbers formatted) for the finished run in ``run_dir``."""
    budget = macs_budget(parser, spec)
    with load_run(run_dir) as loaded:
        splits, macs = client_splits(loaded.run), list(loaded.run.macs)
    table = global_table([test for _, test in splits], macs)
    section, _ = personalized_budgets(splits, [budget] * len(splits), macs, table, confidence=confidence)
    fair, everyone = section["global_on_calibration"], section["global_within_every_budget"]
    population = next(iter(section["population"].values()))
    chosen = Choice(policy=population["policy"], threshold=population["threshold"],
                    temperatures=None if population["temperatures"] is None else tuple(population["temperatures"]))
    fitted = [apply_choice(fit_to_budget(chosen, test, budget, macs, confidence=0.5), test, macs)
              for _, test in splits]
    n = sum(r.n for r in fitted)
    fit_macs = sum(r.macs for r in fitted) / n
    everyone = everyone or {}  # None: no threshold suits every client (left empty)
    values = [section["last_exit_accuracy"], section["accuracy"], section["macs_fraction"],
              section["share_within_budget"], section["global_at_same_macs"]["accuracy"], fair["accuracy"],
              fair["macs_fraction"], fair["share_within_budget"], sum(r.correct for r in fitted) / n,
              fit_macs / macs[-1], accuracy_at_macs(table, fit_macs)["accuracy"], everyone.get("accuracy"),
              everyone.get("macs_fraction"), everyone.get("share_within_budget")]
    return {"run": run_dir, "budget": spec, "confidence": f"{confidence:g}",
            **{k: "" if v is None else f"{v:.6f}" for k, v in zip(COLUMNS[3:], values)}}


def _points(diffs: list[float]) -> str:
    """Mean ± standard error of accuracy differences, in points."""
    mean, se = mean_se(diffs)
    return f"{100 * mean:+.2f} ± {100 * se:.2f}"


def summary(path: Path) -> str:
    """One CSV's runs in a few lines: each comparison's mean gap, MACs shares, clients within budget."""
    with path.open() as f:
        rows = [{k: v if k in ("run", "budget") else (float(v) if v else None) for k, v in row.items()}
                for row in csv.DictReader(f)]
    n = len(rows)
    gap = [r["pooled_accuracy"] - r["global_at_same_macs_accuracy"] for r in rows]
    deployed = [r["global_on_calibration_accuracy"] - r["pooled_accuracy"] for r in rows]
    ceiling = [r["hindsight_test_fit_accuracy"] - r["hindsight_test_fit_global_at_same_macs_accuracy"] for r in rows]

    def mean(key: str) -> float:
        return statistics.mean(r[key] for r in rows)

    def held(key: str) -> int:
        return sum(r[key] >= 0.9 - 1e-9 for r in rows)

    return "\n".join([
        f"{path} ({n} runs)",
        f"  per-client (pooled) minus global curve at the same MACs: {_points(gap)} points, "
        f"at or above on {sum(g >= -1e-9 for g in gap)}; MACs share {mean('pooled_macs_fraction'):.3f}; "
        f"clients within budget {mean('pooled_share_within_budget'):.2f} "
        f"(>= 0.9 on {held('pooled_share_within_budget')})",
        f"  global threshold chosen on calibration minus per-client: {_points(deployed)} points; MACs share "
        f"{mean('global_on_calibration_macs_fraction'):.3f}; clients within budget "
        f"{mean('global_on_calibration_share_within_budget'):.2f} (>= 0.9 on "
        f"{held('global_on_calibration_share_within_budget')})",
        f"  hindsight ceiling (θ fitted on test) minus global curve at its MACs: {_points(ceiling)} points; "
        f"MACs share {mean('hindsight_test_fit_macs_fraction'):.3f}",
        *_within_every_budget(rows),
    ])


def _within_every_budget(rows: list[dict]) -> list[str]:
    """The summary line of the one threshold within every client's budget, over the runs that
    have one (CSVs written before session 12 have no such column)."""
    rows = [r for r in rows if r.get("global_within_every_budget_accuracy") is not None]
    if not rows:
        return []
    gap = [r["pooled_accuracy"] - r["global_within_every_budget_accuracy"] for r in rows]
    macs = statistics.mean(r["global_within_every_budget_macs_fraction"] for r in rows)
    share = statistics.mean(r["global_within_every_budget_share_within_budget"] for r in rows)
    return [f"  per-client minus one global threshold within every client's budget ({len(rows)} runs): "
            f"{_points(gap)} points; its MACs share {macs:.3f}; clients within budget {share:.2f}"]


def main() -> None:
    """Append a row per run not yet in ``--out``; or ``--summarize`` CSVs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help="finished run directories trained with data.val_fraction > 0")
    parser.add_argument("--out", help="CSV to append to")
    parser.add_argument("--budget", default="macs=0.5")
    parser.add_argument("--confidence", type=float, default=0.95,
                        help="eval's --budget-confidence (0.5: no margin, the plain calibration estimates)")
    parser.add_argument("--summarize", nargs="+", type=Path, metavar="CSV", help="print these CSVs' summaries")
    args = parser.parse_args()
    if args.summarize:
        if args.runs or args.out:
            parser.error("--summarize reads CSVs only; give RUN_DIR ... --out CSV in a separate call")
        missing = [str(p) for p in args.summarize if not p.is_file()]
        if missing:
            parser.error(f"--summarize: no such CSV: {', '.join(missing)}")
        print("\n".join(summary(p) for p in args.summarize))
        return
    if not args.runs or not args.out:
        parser.error("give RUN_DIR ... and --out CSV, or --summarize CSV ...")
    out = Path(args.out)
    header, done = None, set()
    if out.exists():
        with out.open() as f:
            header = next(csv.reader(f), None)
            done = {tuple(row[:3]) for row in csv.reader(f) if row}
    if header is not None and header != list(COLUMNS):
        parser.error(f"{out} has other columns (written by an older version of this script): give a new --out")
    for run_dir in args.runs:
        if (run_dir, args.budget, f"{args.confidence:g}") in done:  # resumable per run and setting
            continue
        try:
            row = run_row(run_dir, args.budget, parser, args.confidence)
        except CafeError as exc:  # not a finished run directory: one line, the rows so far stay
            parser.error(str(exc))
        new = not out.exists() or out.stat().st_size == 0
        with out.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
            if new:
                writer.writeheader()
            writer.writerow(row)
        print(run_dir, flush=True)


if __name__ == "__main__":
    main()
