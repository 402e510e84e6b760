"""Where does one method lose to others at the last exit? Per-client gaps against client size.

    python experiments/per_client_gap.py cafedistill=runs/study/mnist5k-a0.3/runs/cafedistill/train.lr=0.05 \\
        fedper=runs/study/mnist5k-a0.3/runs/fedper/train.lr=0.02 ... [--seeds 0,1,2] [--exit -1]

The first NAME=DIR is the method under study, the others are compared with it. Each DIR holds
one finished run per seed (``seed0``, ``seed1``, ...: a ``cafedist compare`` layout). Clients
of all seeds are pooled (a seed changes the partition, so these are different clients) and
split into thirds by their number of training samples (read from each run's store); the
script prints, per comparison, the mean gap in points (first method minus the other, on each
client's own test split), on the smallest and the largest third, and its correlation with the
training-set size. Nothing is chosen from these numbers; docs/RESULTS.md quotes them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sweep import finished_summary  # experiments/ is on sys.path when run as a script

from cafedist.config import read_run_config
from cafedist.data.store import Store
from cafedist.errors import CafeError


def client_accuracy(run_dir: Path, exit_index: int) -> list[float] | None:
    """Each client's test accuracy at one exit, from the run's summary.json (None: the run is not
    finished: :func:`sweep.finished_summary`)."""
    summary = finished_summary(run_dir)
    return None if summary is None else [row[exit_index] for row in summary["acc_per_client"]]


def train_sizes(run_dir: Path) -> list[int]:
    """Each client's number of training samples, from the run's store (paths relative to the cwd)."""
    cfg = read_run_config(run_dir / "config.yaml")
    with Store(cfg.data.store_path(cfg.seed)) as store:
        return [train for train, _test in store.client_sizes()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("methods", nargs="+", metavar="NAME=DIR")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--exit", type=int, default=-1, help="exit index (default -1: the last)")
    args = parser.parse_args()
    bad = [item for item in args.methods if "=" not in item]
    if bad:
        parser.error(f"expected NAME=DIR (e.g. cafedistill=runs/study/mnist5k-a0.3/runs/cafedistill/train.lr=0.05), "
                     f"got {' '.join(bad)}")
    methods = dict(item.split("=", 1) for item in args.methods)
    missing = [folder for folder in methods.values() if not Path(folder).is_dir()]
    if missing:
        parser.error(f"no such run folder: {', '.join(missing)}")
    (base, base_dir), others = next(iter(methods.items())), list(methods.items())[1:]
    sizes: list[int] = []
    acc: dict[str, list[float | None]] = {name: [] for name in methods}
    for seed in (int(s) for s in args.seeds.split(",")):
        first = Path(base_dir) / f"seed{seed}"
        try:
            n = train_sizes(first)
        except CafeError as exc:  # the method under study lacks this seed's run, or its store
            parser.error(str(exc))
        sizes += n
        for name, folder in methods.items():
            run = Path(folder) / f"seed{seed}"
            acc[name] += client_accuracy(run, args.exit) or [None] * len(n)
    n = np.array(sizes)
    order = np.argsort(n, kind="stable")
    third = len(n) // 3
    small, large = set(order[:third].tolist()), set(order[-third:].tolist())
    print(f"{len(n)} clients; smallest third <= {n[order[third - 1]]} training samples, "
          f"largest third >= {n[order[-third]]}")
    for name, _folder in others:
        idx = [i for i in range(len(n)) if acc[name][i] is not None and acc[base][i] is not None]
        gap = np.array([100 * (acc[base][i] - acc[name][i]) for i in idx])
        in_small = np.array([i in small for i in idx])
        in_large = np.array([i in large for i in idx])
        corr = np.corrcoef(gap, n[idx])[0, 1] if len(idx) > 2 else float("nan")
        print(f"{base} - {name}: mean {gap.mean():+.1f}, smallest third {gap[in_small].mean():+.1f}, "
              f"largest third {gap[in_large].mean():+.1f}, correlation with training size {corr:+.2f} "
              f"({len(idx)} clients)")


if __name__ == "__main__":
    main()
