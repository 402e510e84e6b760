"""The paper's dynamic-inference claim, read off finished runs: what threshold θ = 0.6 costs and saves.

    cafedist eval RUN_DIR            # once per run: writes RUN_DIR/eval.json
    python experiments/theta_tradeoff.py RUN_DIR [RUN_DIR ...] [--theta 0.6] [--loss 2.01]

For each run it reads eval.json's global max-softmax sweep (test split) and prints, averaged
over the runs that share a parent folder (the seeds of one ``cafedist compare`` setting): the
accuracy cost of θ in points against the run's own last exit, the MACs it saves, and the
largest MACs saving whose cost stays within ``--loss`` points (the paper: θ = 0.6 costs 2.01
points for 37.15 % fewer MACs). That threshold is chosen on the test sweep itself: a best case in
hindsight, not a threshold a deployment could pick in advance (``cafedist eval --budget`` picks on
calibration data). docs/RESULTS.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def tradeoff(run_dir: Path, theta: float, loss: float) -> tuple[float, float, float]:
    """(cost of θ in points, % fewer MACs at θ, % fewer MACs at the best threshold within ``loss`` points)."""
    report = json.loads((run_dir / "eval.json").read_text())
    sweep, last = report["dynamic"], report["acc_per_exit"][-1]
    at_theta = min(sweep, key=lambda r: abs(r["threshold"] - theta))
    within = [r for r in sweep if 100 * (last - r["accuracy"]) <= loss + 1e-9]
    best = max(within, key=lambda r: r["macs_reduction"])  # θ >= 1 (the last exit alone) is always within
    return 100 * (last - at_theta["accuracy"]), 100 * at_theta["macs_reduction"], 100 * best["macs_reduction"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories evaluated by `cafedist eval`")
    parser.add_argument("--theta", type=float, default=0.6)
    parser.add_argument("--loss", type=float, default=2.01, help="accuracy points below the last exit")
    args = parser.parse_args()
    missing = [str(run) for run in args.runs if not (run / "eval.json").is_file()]
    if missing:
        parser.error(f"no eval.json in {', '.join(missing)} (run `cafedist eval RUN_DIR` on each first)")
    groups: dict[Path, list[tuple[float, float, float]]] = {}
    for run in args.runs:
        groups.setdefault(run.parent, []).append(tradeoff(run, args.theta, args.loss))
    for parent, rows in groups.items():
        cost, saved, best = (statistics.mean(r[i] for r in rows) for i in range(3))
        print(f"{parent}: θ = {args.theta:g} costs {cost:.2f} points for {saved:.1f} % fewer MACs; "
              f"within {args.loss:g} points: {best:.1f} % fewer ({len(rows)} runs)")


if __name__ == "__main__":
    main()
