"""Tables of a one-axis study of CAFEDistill's arms against FedPer: the proxy set's size
(``experiments/proxy_size.txt``), the number of clients (``experiments/clients.txt``), the
network's width (``experiments/width.txt``), the schedule's length (``experiments/schedule.txt``), the
local epochs a round (``experiments/local_epochs.txt``) or the share of clients that train each round
(``experiments/participation.txt``)::

    python experiments/sweep_axis_tables.py runs/proxy_size --axis proxy --out docs/results
    python experiments/sweep_axis_tables.py runs/clients --axis clients --out docs/results
    python experiments/sweep_axis_tables.py runs/width --axis width --out docs/results
    python experiments/sweep_axis_tables.py runs/schedule --axis rounds --choose-lr --out docs/results
    python experiments/sweep_axis_tables.py runs/local_epochs --axis epochs --choose-lr --out docs/results
    python experiments/sweep_axis_tables.py runs/participation --axis participation --choose-lr --out docs/results

Reads every finished run below the folder and tells each run's level on the axis (the proxy
share ``data.proxy_fraction``, ``data.clients``, ``model.options.width``, ``train.rounds``,
``train.local_epochs`` or ``train.clients_per_round`` as a share of the clients) and its arm from
its own ``config.yaml``:
``CAFEDistill`` (as shipped), ``no cross-client KD`` (``cross_client_kd: false``: each client's
own last exit its teacher), ``no selection`` (``student_selection: false``: every exit a student
from round 0), ``last-exit KD`` (``last_exit_kd: true``), ``FedPer`` and, where a
study runs it, ``FedAvg``. For the
folder's one setting (e.g. ``digits_a0.3``) it writes ``PREFIX_SETTING_runs.csv`` (one row per
run: proxy images, clients, architecture, width, rounds, local epochs, participation, mean
training samples per client, final validation and test accuracy per exit; PREFIX ``proxy_size``,
``clients``, ``width``, ``schedule``,
``local_epochs`` or ``participation``) and ``PREFIX_SETTING.png`` (test accuracy at exit 1 and at the last exit along
the axis, per arm), and prints the markdown
tables docs/RESULTS.md quotes: per level and arm, mean ± std over seeds; the seed-matched
differences (CAFEDistill minus each other arm; last-exit KD minus FedPer); and, per level,
CAFEDistill's and last-exit KD's last-exit gap to FedPer on the third of clients with the
fewest and the most training samples (clients of all seeds pooled).
Nothing is chosen from these numbers. With ``--choose-lr`` (several folders, e.g. a study and
its runs at each arm's other grid lr) each arm is read, per level, at the lr with the higher
mean validation accuracy at the last exit (compare --tune's metric; test accuracy is not read),
the choice printed first and every run kept in the CSV with a ``chosen`` column.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from conflict_tables import mean_se_cell, mean_std_cell  # experiments/ is on sys.path when run as a script
from per_client_gap import client_accuracy, train_sizes
from sweep import finished_summary, write_csv

from cafedist.config import Config, read_run_config
from cafedist.data.store import Store
from cafedist.errors import CafeError
from cafedist.models.cnn import CnnOptions

ARMS = ("CAFEDistill", "no cross-client KD", "no selection", "last-exit KD", "FedPer", "FedAvg")
#: seed-matched differences the tables read: (minuend, subtrahend)
CONTRASTS = (("CAFEDistill", "no cross-client KD"), ("CAFEDistill", "no selection"), ("CAFEDistill", "FedPer"),
             ("last-exit KD", "FedPer"),
             ("last-exit KD", "CAFEDistill"), ("CAFEDistill", "FedAvg"))


@dataclass(frozen=True)
class Axis:
    """What a study varies: the row key holding each run's level, how tables name it, the row
    key its figure's x axis reads, and the prefix of the files it writes."""

    column: str
    label: str
    plot_x: str
    xlabel: str
    prefix: str


AXES = {"proxy": Axis("proxy_fraction", "proxy share", "proxy_images", "proxy images (log scale)", "proxy_size"),
        "clients": Axis("clients", "clients", "clients", "clients (log scale)", "clients"),
        "width": Axis("width", "width", "width", "CNN width: channels of the first block (log scale)", "width"),
        "rounds": Axis("rounds", "rounds", "rounds", "rounds T (log scale)", "schedule"),
        "epochs": Axis("local_epochs", "local epochs", "local_epochs", "local epochs a round (log scale)",
                       "local_epochs"),
        "participation": Axis("participation", "clients a round (share)", "participation",
                              "share of clients that train each round (log scale)", "participation")}


def fixed_keys(axis: Axis) -> list[str]:
    """The row keys every run of one study must share: the architecture and the other axes' levels."""
    return ["arch", *[a.column for a in AXES.values() if a is not axis]]


def arm_of(cfg: Config) -> str:
    """Which arm of the study a run's config is (another algorithm's run is refused: it would
    have counted as CAFEDistill)."""
    baselines = {"fedper": "FedPer", "fedavg": "FedAvg"}
    if cfg.algorithm.name in baselines:
        return baselines[cfg.algorithm.name]
    if cfg.algorithm.name != "cafedistill":
        sys.exit(f"sweep_axis_tables.py: algorithm {cfg.algorithm.name!r} is no arm of these studies "
                 f"(CAFEDistill and its variants, {', '.join(baselines.values())})")
    params = cfg.algorithm.params.get(cfg.algorithm.name, {})  # what the file set; the rest are defaults
    if not params.get("cross_client_kd", True):
        return "no cross-client KD"
    if not params.get("student_selection", True):
        return "no selection"
    return "last-exit KD" if params.get("last_exit_kd", False) else "CAFEDistill"


def proxy_count(cfg: Config) -> int:
    """The number of proxy images of the run's store (paths relative to the cwd)."""
    with Store(cfg.data.store_path(cfg.seed)) as store:
        return int(store.load_proxy().shape[0])


def model_width(cfg: Config) -> int | None:
    """The CNN's ``width`` option (its default when the config leaves it out); for other
    architectures whatever the config sets, or None."""
    default = CnnOptions().width if cfg.model.arch == "cnn" else None
    return cfg.model.options.get("width", default)


def participation_share(cfg: Config) -> float:
    """The share of clients that train each round: ``train.clients_per_round`` is a fraction
    (<= 1) or a count (> 1); 10 of 40 and 0.25 are one level."""
    per_round = cfg.train.clients_per_round
    return per_round if per_round <= 1 else per_round / cfg.data.clients


def read_run(run_dir: Path) -> dict | None:
    """One finished run's row and its clients' (training samples, last-exit test accuracy)."""
    summary = finished_summary(run_dir)
    if summary is None:
        return None
    cfg = read_run_config(run_dir / "config.yaml")
    sizes = train_sizes(run_dir)
    row = {"setting": f"{cfg.data.dataset}_a{cfg.data.alpha:g}", "proxy_fraction": cfg.data.proxy_fraction,
           "clients": cfg.data.clients, "arch": cfg.model.arch, "width": model_width(cfg), "arm": arm_of(cfg),
           "seed": cfg.seed,
           "lr": cfg.train.lr,
           "rounds": cfg.train.rounds, "local_epochs": cfg.train.local_epochs,
           "participation": participation_share(cfg), "proxy_images": proxy_count(cfg),
           "train_per_client": float(np.mean(sizes)), "run": run_dir.name}
    vals = summary.get("val_acc_per_exit") or [None] * len(summary["acc_per_exit"])
    for k, (v, t) in enumerate(zip(vals, summary["acc_per_exit"])):
        row[f"val_exit{k + 1}"], row[f"test_exit{k + 1}"] = v, t
    return {"row": row, "clients": list(zip(sizes, client_accuracy(run_dir, -1)))}


def _read_or_exit(run_dir: Path) -> dict | None:
    """:func:`read_run`, a run it cannot read (e.g. its store not where its config says, relative
    to the working directory the sweep ran in) one line naming the run, not a traceback."""
    try:
        return read_run(run_dir)
    except CafeError as exc:
        sys.exit(f"sweep_axis_tables.py: {run_dir}: {exc} (run it from the directory the sweep ran in)")


def arms_table(rows: list[dict], axis: Axis) -> str:
    """Per level and arm: seeds, proxy images, training samples per client, test accuracy per
    exit (mean ± std over seeds)."""
    exits = sorted(int(k[len("test_exit"):]) for k in rows[0] if k.startswith("test_exit"))
    head = [axis.label, "arm", "seeds", "proxy images", "train / client", *[f"test e{k}" for k in exits]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    groups: dict[tuple[float, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r[axis.column], r["arm"])].append(r)
    for (level, arm), group in sorted(groups.items(), key=lambda kv: (kv[0][0], ARMS.index(kv[0][1]))):
        cells = [f"{level:g}", arm, str(len(group)), f"{np.mean([r['proxy_images'] for r in group]):.0f}",
                 f"{np.mean([r['train_per_client'] for r in group]):.0f}",
                 *[mean_std_cell([r[f"test_exit{k}"] for r in group]) for k in exits]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def contrast_table(rows: list[dict], axis: Axis) -> str:
    """Per level and contrast: seed-matched test differences per exit (points, mean ±
    standard error over the seeds both arms have)."""
    exits = sorted(int(k[len("test_exit"):]) for k in rows[0] if k.startswith("test_exit"))
    by_key = {(r[axis.column], r["arm"], r["seed"]): r for r in rows}
    head = [axis.label, "difference", "seeds", *[f"Δ test e{k}" for k in exits]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for level in sorted({r[axis.column] for r in rows}):
        for a, b in CONTRASTS:
            pairs = [(by_key[(level, a, s)], by_key[(level, b, s)]) for (lv, arm, s) in sorted(by_key)
                     if lv == level and arm == a and (level, b, s) in by_key]
            if not pairs:
                continue
            cells = [f"{level:g}", f"{a} − {b}", str(len(pairs)),
                     *[mean_se_cell([x[f"test_exit{k}"] - y[f"test_exit{k}"] for x, y in pairs]) for k in exits]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def thirds_gaps(runs: list[dict], a: str, b: str, axis: Axis) -> dict[float, tuple[float, float, int]]:
    """Per level: arm ``a`` minus arm ``b`` at the last exit (points), on the third of
    clients with the fewest and with the most training samples (clients of all seeds pooled:
    a seed changes the partition, and both arms of a seed level it) and the number of clients."""
    by_key = {(r["row"][axis.column], r["row"]["arm"], r["row"]["seed"]): r for r in runs}
    out = {}
    for level in sorted({k[0] for k in by_key}):
        sizes, gaps = [], []
        for (lv, arm, seed), run in sorted(by_key.items()):
            other = by_key.get((level, b, seed))
            if lv != level or arm != a or other is None:
                continue
            for (n, acc_a), (_n, acc_b) in zip(run["clients"], other["clients"]):
                sizes.append(n)
                gaps.append(100 * (acc_a - acc_b))
        if len(gaps) < 3:
            continue
        order = np.argsort(sizes, kind="stable")
        third = len(order) // 3
        g = np.array(gaps)
        out[level] = (float(g[order[:third]].mean()), float(g[order[-third:]].mean()), len(gaps))
    return out


def thirds_table(runs: list[dict], axis: Axis) -> str:
    """The last-exit gap to FedPer on the smallest and the largest third of clients, per level."""
    head = [axis.label, "difference", "pooled clients", "smallest third", "largest third"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for a in ("CAFEDistill", "last-exit KD"):
        for level, (small, large, n) in thirds_gaps(runs, a, "FedPer", axis).items():
            lines.append(f"| {level:g} | {a} − FedPer | {n} | {small:+.1f} | {large:+.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], axis: Axis, path: Path) -> None:
    """Test accuracy at exit 1 and at the last exit along the axis, mean ± std per arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = max(int(k[len("test_exit"):]) for k in rows[0] if k.startswith("test_exit"))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharex=True)
    sizes = sorted({r[axis.plot_x] for r in rows})
    for ax, k in zip(axes, (1, last)):
        for i, arm in enumerate(ARMS):
            groups: dict[float, list[dict]] = defaultdict(list)
            for r in rows:
                if r["arm"] == arm:
                    groups[r[axis.plot_x]].append(r)
            if not groups:
                continue
            xs = sorted(groups)
            means = [100 * np.mean([r[f"test_exit{k}"] for r in groups[x]]) for x in xs]
            stds = [100 * np.std([r[f"test_exit{k}"] for r in groups[x]]) for x in xs]
            dodge = 1.03 ** (i - (len(ARMS) - 1) / 2)  # arms side by side at each size
            ax.errorbar([x * dodge for x in xs], means, yerr=stds, marker="o", capsize=3, label=arm,
                        color=f"C{i}")  # one colour per arm in every setting's figure
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(x) for x in sizes])
        ax.minorticks_off()
        ax.set_xlabel(axis.xlabel)
        ax.set_ylabel(f"test accuracy, exit {k} (%)")
        ax.set_title(f"exit {k}" + (" (last)" if k == last else ""))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def choose_lrs(runs: list[dict], axis: Axis) -> tuple[list[dict], str]:
    """Per level and arm, the runs of the lr whose mean validation accuracy at the last exit is
    the highest (compare --tune's metric; ties to the smaller lr), over the seeds every lr of
    that arm and level has; and the markdown table of the choice. Test accuracy is not read."""
    groups: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        groups[(r["row"][axis.column], r["row"]["arm"])][r["row"]["lr"]].append(r)
    chosen, lines = [], [f"| {axis.label} | arm | lr | seeds | val e_last (common seeds) | chosen |",
                         "|" + " --- |" * 6]
    for (level, arm), by_lr in sorted(groups.items(), key=lambda kv: (kv[0][0], ARMS.index(kv[0][1]))):
        common = set.intersection(*({r["row"]["seed"] for r in rs} for rs in by_lr.values()))
        score = {lr: float(np.mean([_last_val(r["row"]) for r in rs if r["row"]["seed"] in common]))
                 if common else float("-inf") for lr, rs in by_lr.items()}
        best = max(sorted(by_lr), key=lambda lr: score[lr])  # max keeps the first of equals: the smaller lr
        chosen += by_lr[best]
        for lr in sorted(by_lr):
            lines.append(f"| {level:g} | {arm} | {lr:g} | {len(by_lr[lr])} | {100 * score[lr]:.1f} ({len(common)}) | "
                         f"{'yes' if lr == best else ''} |")
    return chosen, "\n".join(lines)


def _last_val(row: dict) -> float:
    """A row's validation accuracy at its last exit."""
    last = max(int(k[len("val_exit"):]) for k in row if k.startswith("val_exit"))
    return row[f"val_exit{last}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", type=Path, nargs="+", help="the sweep's --out folder(s)")
    parser.add_argument("--axis", choices=sorted(AXES), required=True,
                        help="what the study varies: the proxy level, the number of clients, the CNN's width, "
                             "the rounds or the local epochs a round")
    parser.add_argument("--choose-lr", action="store_true",
                        help="where an arm ran at several lrs at one level, read the lr with the higher mean "
                             "validation accuracy at the last exit (the CSV keeps every run, marked 'chosen')")
    parser.add_argument("--out", type=Path, required=True, help="folder for the CSV and the figure")
    args = parser.parse_args()
    axis = AXES[args.axis]
    for root in args.roots:
        if not root.is_dir():
            parser.error(f"no such run folder: {root}")
    where = " and ".join(map(str, args.roots))
    runs = [r for root in args.roots for r in (_read_or_exit(d) for d in sorted(root.iterdir()) if d.is_dir()) if r]
    if not runs:
        sys.exit(f"sweep_axis_tables.py: no finished runs below {where}")
    settings = sorted({r["row"]["setting"] for r in runs})
    if len(settings) > 1:  # the tables pair arms by level and seed only
        sys.exit(f"sweep_axis_tables.py: {where} holds runs of several settings ({', '.join(settings)}); "
                 f"give each its own folder")
    for key in fixed_keys(axis):
        levels = sorted({r["row"][key] for r in runs}, key=str)
        if len(levels) > 1:
            sys.exit(f"sweep_axis_tables.py: {where} holds runs with several {key} "
                     f"({', '.join(map(str, levels))}) where --axis {args.axis} varies only {axis.column}; "
                     f"give each its own folder")
    seen: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        seen[(r["row"][axis.column], r["row"]["arm"], r["row"]["seed"])].append(r["row"])
    # the tables pair one run per level, arm and seed: several are one too many, unless at
    # different lrs that --choose-lr chooses among
    dupes = [(key, rows) for key, rows in seen.items() if len(rows) > 1]
    same_lr = [(key, rows) for key, rows in dupes if len({r["lr"] for r in rows}) < len(rows)]
    if same_lr or (dupes and not args.choose_lr):
        (level, arm, seed), rows = (same_lr or dupes)[0]
        fix = ("the same run twice: give each folder once" if same_lr
               else "pass --choose-lr to read each arm at the lr validation prefers")
        lrs = ", ".join(f"{r['lr']:g}" for r in rows)
        sys.exit(f"sweep_axis_tables.py: {where} holds {len(rows)} runs of {axis.column} {level:g}, {arm}, "
                 f"seed {seed} (lr {lrs}); {fix}")
    every = [r["row"] for r in runs]  # the CSV's rows: every run read
    choice = ""
    if args.choose_lr:
        picked, choice = choose_lrs(runs, axis)
        ids = {id(r) for r in picked}
        for r in runs:
            r["row"]["chosen"] = id(r) in ids
        runs = picked

    def order(row: dict) -> tuple:
        return row[axis.column], ARMS.index(row["arm"]), row["seed"], row["lr"]
    rows = sorted((r["row"] for r in runs), key=order)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / f"{axis.prefix}_{settings[0]}_runs.csv", sorted(every, key=order))
    plot(rows, axis, args.out / f"{axis.prefix}_{settings[0]}.png")
    print(*filter(None, [choice, arms_table(rows, axis), contrast_table(rows, axis), thirds_table(runs, axis)]),
          sep="\n\n")


if __name__ == "__main__":
    main()
