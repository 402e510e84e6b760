"""Gradient conflict with and without student selection at T = 100 (``experiments/conflict_T100.txt``).

    python experiments/conflict_tables.py runs/conflict_T100 --out docs/results
    python experiments/conflict_tables.py runs/arch_conflict_lr0.05 --out docs/results/arch \
        --prefix conflict_resnet18_lr0.05

Reads every finished run below the folder (one per variant of the sweep) and tells each run's
setting (dataset, Dirichlet α, and the architecture unless it is the 3-exit CNN) and arm from
its own ``config.yaml``: ``selection`` (CAFEDistill as shipped), ``no selection``
(``student_selection: false``: every exit a student from round 0), ``CE until selected``
(``unselected: ce``: every exit trained from round 0, only selected ones distil) and ``no
record`` (the control without ``train.diagnostics``); runs of other algorithms or variants, and
one arm twice for a seed (two lrs), are refused. It writes (PREFIX ``conflict_T100`` unless
``--prefix`` says otherwise)

- ``PREFIX_runs.csv``: one row per run: final validation and test accuracy per exit and,
  for the rounds before and after half the schedule and in its last quarter, the share of
  negative cosines and the mean cosine between exits' gradients, over trained pairs and over
  all pairs (:func:`sweep.conflict_means`: with the default ``schedule_span`` every exit is a
  student from round T/2 on, so the second half compares like with like);
- ``PREFIX_curves.csv`` and ``.png``: per setting and arm, the share of negative
  cosines per round over trained pairs, mean over seeds;

checks that each ``no record`` run trained what its ``selection`` twin did (the record must
change no model), and prints the markdown tables docs/RESULTS.md quotes: per setting and arm,
mean ± std over seeds; the seed-matched differences selection minus no selection (and minus CE
until selected); each exit pair's mean cosine after T/2.
Nothing is chosen from these numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

# experiments/ is on sys.path when run as a script
from sweep import conflict_means, conflict_window, finished_records, finished_summary, write_csv

from cafedist.config import read_run_config
from cafedist.stats import mean_se

ARMS = ("selection", "no selection", "CE until selected")
CONTROL = "no record"
#: the per-round fields a run's metrics rows must share with its twin (conflict and timings aside)
TRAINED_FIELDS = ("round", "loss", "acc_per_exit", "val_acc_per_exit")


def arm_of(cfg) -> str:
    """Which arm of the study a run's config is (another algorithm's run, or CAFEDistill without
    cross-client KD or with last-exit KD, is refused: it would have counted as ``selection``)."""
    if cfg.algorithm.name != "cafedistill":
        sys.exit(f"conflict_tables.py: algorithm {cfg.algorithm.name!r} is no arm of the conflict study "
                 f"(CAFEDistill with and without student selection)")
    params = cfg.algorithm.params.get(cfg.algorithm.name, {})  # what the file set; the rest are defaults
    if not params.get("cross_client_kd", True) or params.get("last_exit_kd", False):
        sys.exit("conflict_tables.py: a run with cross_client_kd: false or last_exit_kd: true is no arm of the "
                 "conflict study (give the study's runs a folder of their own)")
    if "conflict" not in cfg.train.diagnostics:
        return CONTROL
    if not params.get("student_selection", True):
        return "no selection"
    return "CE until selected" if params.get("unselected", "none") == "ce" else "selection"


def setting_of(cfg) -> str:
    """``mnist5k a0.3``: the dataset and its Dirichlet α, and the architecture when it is not the
    3-exit CNN (``digits a0.3 resnet18``)."""
    arch = "" if cfg.model.arch == "cnn" else f" {cfg.model.arch}"
    return f"{cfg.data.dataset} a{cfg.data.alpha:g}{arch}"


def exits_of(rows: list[dict]) -> list[int]:
    """The exits (1-based) the rows report test accuracy for."""
    return sorted({int(k[len("test_exit"):]) for r in rows for k in r if k.startswith("test_exit")})


def read_run(run_dir: Path) -> dict | None:
    """One finished run: setting, arm, seed, final accuracies, conflict means, per-round records."""
    summary = finished_summary(run_dir)
    if summary is None:
        return None
    cfg = read_run_config(run_dir / "config.yaml")
    records = finished_records(run_dir)
    row = {"setting": setting_of(cfg), "arm": arm_of(cfg), "seed": cfg.seed, "lr": cfg.train.lr,
           "rounds": summary["rounds"], "run": run_dir.name}
    for k, (v, t) in enumerate(zip(summary.get("val_acc_per_exit") or [None] * len(summary["acc_per_exit"]),
                                   summary["acc_per_exit"])):
        row[f"val_exit{k + 1}"], row[f"test_exit{k + 1}"] = v, t
    row.update(conflict_means(records, summary["rounds"]))
    # the last quarter: whether a difference after T/2 lasts, or fades once every exit has trained a while
    rounds = summary["rounds"]
    row.update({f"{k}_q4": v for k, v in conflict_window(records, rounds - rounds // 4, rounds).items()})
    row.update(pair_cosines(records, rounds // 2, rounds))
    return {"row": row, "records": records}


def pair_cosines(records: list[dict], lo: int, hi: int) -> dict[str, float | None]:
    """``cos_pair_0-1`` ...: each exit pair's mean cosine over all pairs' records of rounds
    ``lo <= round < hi`` (which exits grow more aligned: the shallow ones with each other, or
    with the last)."""
    window = [r["conflict"] for r in records if r.get("conflict") and lo <= r["round"] < hi]
    pairs = window[0]["pairs"] if window else []
    out: dict[str, float | None] = {}
    for pair in pairs:
        values = [c["all"][pair] for c in window if c["all"].get(pair) is not None]
        out[f"cos_pair_{pair}"] = statistics.fmean(values) if values else None
    return out


def same_training(a: list[dict], b: list[dict]) -> bool:
    """Whether two runs' metrics rows agree exactly in what training produced."""
    def trained(records: list[dict]) -> list[tuple]:
        return [tuple(json.dumps(r.get(k)) for k in TRAINED_FIELDS) for r in records]
    return trained(a) == trained(b)


def negative_share_curves(runs: list[dict]) -> list[dict]:
    """Per setting, arm and round: the share of negative cosines over trained pairs and over all
    pairs, averaged over the seeds that have a record that round."""
    pooled: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: {"trained": [], "all": []})
    for run in runs:
        row = run["row"]
        if row["arm"] == CONTROL:
            continue
        for rec in run["records"]:
            c = rec.get("conflict")
            if not c:
                continue
            key = (row["setting"], row["arm"], rec["round"])
            for kind in ("trained", "all"):
                if c[f"neg_{kind}"] is not None:
                    pooled[key][kind].append(c[f"neg_{kind}"])
    return [{"setting": s, "arm": a, "round": r,
             **{f"neg_{kind}": statistics.fmean(v[kind]) if v[kind] else None for kind in ("trained", "all")},
             "seeds": len(v["all"])}
            for (s, a, r), v in sorted(pooled.items(), key=lambda kv: (kv[0][0], ARMS.index(kv[0][1]), kv[0][2]))]


def mean_std_cell(values: list[float | None], scale: float = 100.0, digits: int = 1) -> str:
    """Values (in % by default): mean ± sample std, the one value alone, "–" for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def _column(rows: list[dict], key: str) -> list[float | None]:
    return [r.get(key) for r in rows]


def _differences(pairs: list[tuple[dict, dict]], key: str) -> list[float]:
    """``a[key] - b[key]`` for each pair where both have the value."""
    return [a[key] - b[key] for a, b in pairs if a.get(key) is not None and b.get(key) is not None]


def _arm_groups(rows: list[dict]) -> list[tuple[tuple[str, str], list[dict]]]:
    """The rows of each (setting, arm), the control left out, by setting and in :data:`ARMS` order."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["arm"] != CONTROL:
            groups[(r["setting"], r["arm"])].append(r)
    return sorted(groups.items(), key=lambda kv: (kv[0][0], ARMS.index(kv[0][1])))


def arms_table(rows: list[dict]) -> str:
    """Per setting and arm: seeds, conflict (negative share, %) before and after T/2, mean cosine
    after T/2, and test accuracy per exit, mean ± std over seeds."""
    exits = exits_of(rows)
    head = ["setting", "arm", "seeds", "neg. trained, r < T/2", "neg. all, r < T/2", "neg., r ≥ T/2",
            "neg., r ≥ 3T/4", "mean cos, r ≥ T/2", *[f"test e{k}" for k in exits]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (setting, arm), group in _arm_groups(rows):
        cells = [setting, arm, str(len(group)), mean_std_cell(_column(group, "neg_trained_h1")),
                 mean_std_cell(_column(group, "neg_all_h1")), mean_std_cell(_column(group, "neg_all_h2")),
                 mean_std_cell(_column(group, "neg_all_q4")),
                 mean_std_cell(_column(group, "cos_all_h2"), scale=1.0, digits=3),
                 *[mean_std_cell(_column(group, f"test_exit{k}")) for k in exits]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_se_cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """Differences (in points by default): mean ± standard error (as study_tables' seed-matched tables)."""
    if len(values) < 2:
        return "–" if not values else f"{scale * values[0]:+.{digits}f}"
    mean, se = mean_se(values)
    return f"{scale * mean:+.{digits}f} ± {scale * se:.{digits}f}"


def paired_table(rows: list[dict], arm: str = "no selection") -> str:
    """Seed-matched differences, selection minus ``arm``, per setting: the negative share after
    T/2 and in the last quarter (points; < 0: selection conflicts less), the mean cosine after
    T/2 (> 0: selection conflicts less) and the test accuracy per exit (points), mean ±
    standard error over the seeds both arms have."""
    by_key = {(r["setting"], r["arm"], r["seed"]): r for r in rows}
    exits = exits_of(rows)
    head = ["setting", "seeds", "Δ neg., r ≥ T/2 (per seed)", "Δ neg., r ≥ T/2", "Δ neg., r ≥ 3T/4",
            "Δ mean cos, r ≥ T/2", *[f"Δ test e{k}" for k in exits]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for setting in sorted({r["setting"] for r in rows}):
        pairs = [(by_key[(setting, "selection", s)], by_key[(setting, arm, s)])
                 for (st, a, s) in sorted(by_key) if st == setting and a == "selection" and (setting, arm, s) in by_key]
        if not pairs:
            continue
        per_seed = ", ".join(f"{100 * d:+.1f}" for d in _differences(pairs, "neg_all_h2"))
        lines.append("| " + " | ".join([setting, str(len(pairs)), per_seed,
                                        mean_se_cell(_differences(pairs, "neg_all_h2")),
                                        mean_se_cell(_differences(pairs, "neg_all_q4")),
                                        mean_se_cell(_differences(pairs, "cos_all_h2"), scale=1.0, digits=3),
                                        *[mean_se_cell(_differences(pairs, f"test_exit{k}"))
                                          for k in exits]]) + " |")
    return "\n".join(lines)


def pairs_table(rows: list[dict]) -> str:
    """Per setting and arm: each exit pair's mean cosine after T/2, mean ± sd over seeds."""
    pairs = sorted({k[len("cos_pair_"):] for r in rows for k in r if k.startswith("cos_pair_")})
    head = ["setting", "arm", *[f"cos {p.replace('-', '–')}, r ≥ T/2" for p in pairs]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (setting, arm), group in _arm_groups(rows):
        cells = [setting, arm, *[mean_std_cell(_column(group, f"cos_pair_{p}"), scale=1.0, digits=3) for p in pairs]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves: list[dict], path: Path, window: int = 5) -> None:
    """One panel per setting: the share of negative cosines over trained pairs per round, one
    line per arm (a running mean over ``window`` rounds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({c["setting"] for c in curves})
    cols = min(len(settings), 2)
    rows = -(-len(settings) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(settings):]:
        ax.set_visible(False)
    for ax, setting in zip(axes.flat, settings):
        for arm in ARMS:
            pts = [(c["round"], c["neg_trained"]) for c in curves
                   if c["setting"] == setting and c["arm"] == arm and c["neg_trained"] is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            smooth = [statistics.fmean(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, [100 * y for y in smooth], label=arm)
        ax.axvline(50, color="grey", lw=0.6, ls=":")
        ax.set_title(setting.replace(" a", ", α = "), fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel(f"negative cosines, trained pairs (%)\n(running mean of {window} rounds)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("runs", type=Path, help="the sweep's --out folder")
    ap.add_argument("--out", type=Path, required=True, help="where the CSVs and the figure go")
    ap.add_argument("--prefix", default="conflict_T100", help="the files' name prefix (default conflict_T100)")
    args = ap.parse_args()
    if not args.runs.is_dir():
        sys.exit(f"conflict_tables.py: {args.runs}: not a folder (expected the sweep's --out)")
    runs = [r for r in (read_run(d) for d in sorted(p for p in args.runs.iterdir() if p.is_dir())) if r is not None]
    if not runs:
        sys.exit(f"conflict_tables.py: {args.runs}: no finished run (no summary.json below it); nothing written")
    rows = [r["row"] for r in runs]
    seen: dict[tuple, list[str]] = defaultdict(list)
    for r in rows:
        seen[(r["setting"], r["arm"], r["seed"])].append(r["run"])
    for (setting, arm, seed), names in sorted(seen.items()):
        if len(names) > 1:  # e.g. one arm at two lrs: the tables pair by setting, arm and seed only
            sys.exit(f"conflict_tables.py: {args.runs} holds {len(names)} runs of {setting}, {arm}, seed {seed} "
                     f"({', '.join(names)}); give each lr its own folder; nothing written")
    for control in (r for r in runs if r["row"]["arm"] == CONTROL):
        c = control["row"]
        twins = [r for r in runs if r["row"]["arm"] == "selection" and r["row"]["setting"] == c["setting"]
                 and r["row"]["seed"] == c["seed"]]
        for twin in twins:
            verdict = "the same" if same_training(control["records"], twin["records"]) else "NOT the same"
            print(f"control {c['run']} vs {twin['row']['run']}: training {verdict} with and without the record")
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / f"{args.prefix}_runs.csv", rows)
    curves = negative_share_curves(runs)
    write_csv(args.out / f"{args.prefix}_curves.csv", curves)
    plot_curves(curves, args.out / f"{args.prefix}_curves.png")
    print(arms_table(rows))
    print()
    print(paired_table(rows))
    print()
    print(paired_table(rows, "CE until selected"))
    print()
    print(pairs_table(rows))


if __name__ == "__main__":
    main()
