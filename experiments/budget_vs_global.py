"""Per-client budgets against one global threshold, on test, for many finished runs.

    python experiments/budget_vs_global.py RUN_DIR [RUN_DIR ...] --out CSV [--budget macs=0.5]

For each run, what ``cafedist eval RUN --budget SPEC`` reports (default scope, nothing chosen on
test): the per-client policies' accuracy, MACs share and share of clients within budget; the
global threshold read on the test curve at the same mean MACs; and ``global_on_calibration``
(one threshold chosen on the pooled calibration splits for the same budget, judged against
each client's own budget). One more column set is hindsight and labelled so: the pooled policy
with each client's threshold fitted on its *test* split exactly to its budget (no margin), and
the global curve at those MACs — the ceiling of the pooled rule on that run. Appends one CSV
row per run and skips runs already in ``--out`` (resumable). docs/METHOD.md ("Against the global
threshold") quotes ``docs/results/budget_macs0.5_T100.csv``, written by this script for the
120 seed runs of the T = 100 study.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from budget_halvings import global_table, macs_budget

from cafedist.eval.budget import Choice, accuracy_at_macs, apply_choice, fit_to_budget, personalized_budgets
from cafedist.eval.budget_run import client_splits
from cafedist.eval.run import load_run

COLUMNS = ("run", "last_exit_accuracy", "pooled_accuracy", "pooled_macs_fraction", "pooled_share_within_budget",
           "global_at_same_macs_accuracy", "global_on_calibration_accuracy", "global_on_calibration_macs_fraction",
           "global_on_calibration_share_within_budget", "hindsight_test_fit_accuracy",
           "hindsight_test_fit_macs_fraction", "hindsight_test_fit_global_at_same_macs_accuracy")


def run_row(run_dir: str, spec: str, parser: argparse.ArgumentParser) -> dict[str, str]:
    """One CSV row (numbers formatted) for the finished run in ``run_dir``."""
    budget = macs_budget(parser, spec)
    with load_run(run_dir) as loaded:
        splits, macs = client_splits(loaded.run), list(loaded.run.macs)
    table = global_table([test for _, test in splits], macs)
    section, _ = personalized_budgets(splits, [budget] * len(splits), macs, table)
    fair = section["global_on_calibration"]
    population = next(iter(section["population"].values()))
    chosen = Choice(policy=population["policy"], threshold=population["threshold"],
                    temperatures=None if population["temperatures"] is None else tuple(population["temperatures"]))
    fitted = [apply_choice(fit_to_budget(chosen, test, budget, macs, confidence=0.5), test, macs)
              for _, test in splits]
    n = sum(r["n"] for r in fitted)
    fit_macs = sum(r["macs"] for r in fitted) / n
    values = [section["last_exit_accuracy"], section["accuracy"], section["macs_fraction"],
              section["share_within_budget"], section["global_at_same_macs"]["accuracy"], fair["accuracy"],
              fair["macs_fraction"], fair["share_within_budget"], sum(r["correct"] for r in fitted) / n,
              fit_macs / macs[-1], accuracy_at_macs(table, fit_macs)["accuracy"]]
    return {"run": run_dir, **{k: f"{v:.6f}" for k, v in zip(COLUMNS[1:], values)}}


def main() -> None:
    """Append a row per run not yet in ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="finished run directories trained with data.val_fraction > 0")
    parser.add_argument("--out", required=True, help="CSV to append to")
    parser.add_argument("--budget", default="macs=0.5")
    args = parser.parse_args()
    out = Path(args.out)
    done = {row["run"] for row in csv.DictReader(out.open())} if out.exists() else set()
    for run_dir in args.runs:
        if run_dir in done:
            continue
        row = run_row(run_dir, args.budget, parser)
        new = not out.exists()
        with out.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
            if new:
                writer.writeheader()
            writer.writerow(row)
        print(run_dir, flush=True)


if __name__ == "__main__":
    main()
