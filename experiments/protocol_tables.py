"""Does the reporting protocol change the T = 100 study's ranking? (docs/RESULTS.md, *The
reporting protocol*)::

    python experiments/protocol_tables.py docs/results --out docs/results

The study reports each run's test accuracy at its final round. FL papers also report the best
round's, chosen on test (the maximum of the test curve over the evaluated rounds), or early-stop
on a validation split. If CAFEDistill's curves peak higher or more often than the baselines',
the protocol alone could move the margins. From the committed per-round curves of the study
(``study_T100_SETTING_curves.csv`` and ``..._last_exit_kd_curves.csv``; only each method's chosen
lr, as its ``..._trials.csv`` marks it) every run is read three ways:

- ``final``: test accuracy at the last round (the study's protocol);
- ``val_best``: test accuracy at the evaluated round whose validation accuracy at the last exit
  is the highest (ties: the later round), one round for every exit (one deployable model);
- ``test_max``: per exit, the highest test accuracy over the evaluated rounds (hindsight on the
  test split: an upper bound on what choosing a round can give, never a choice this project
  makes).

Writes ``protocol_T100_runs.csv`` (one row per run and protocol) and prints, per setting, each
method's mean ± std over seeds under each protocol, and CAFEDistill's seed-matched difference to
every other method under each protocol (mean ± standard error).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

from conflict_tables import mean_se_cell, mean_std_cell  # experiments/ is on sys.path when run as a script
from sweep import write_csv

SETTINGS = ("mnist5k_a0.3", "mnist5k_a0.1", "digits_a0.3", "digits_a0.1")
PROTOCOLS = ("final", "val_best", "test_max")
OURS = "cafedistill"


def chosen_lrs(trials_csv: Path) -> dict[str, str]:
    """Method -> the setting label (e.g. ``train.lr=0.05``) its tuning chose."""
    with open(trials_csv) as fh:
        return {r["algorithm"]: r["setting"] for r in csv.DictReader(fh) if r["chosen"] == "yes"}


def read_curves(curves_csv: Path, chosen: dict[str, str], rename: str | None = None) -> dict[tuple, list[dict]]:
    """(method, seed) -> the evaluated rounds (those with accuracies) of every run at its chosen
    setting, in round order; ``rename`` names the method of a file whose runs are one variant."""
    runs: dict[tuple, list[dict]] = defaultdict(list)
    with open(curves_csv) as fh:
        for r in csv.DictReader(fh):
            method, setting, _ = r["variant"].split("/")
            if chosen.get(method) != setting or not r.get("test_exit1"):
                continue
            exits = sorted(int(k[len("test_exit"):]) for k in r if k.startswith("test_exit") and r[k])
            runs[(rename or method, int(r["seed"]))].append(
                {"round": int(r["round"]), "val": [float(r[f"val_exit{k}"]) for k in exits],
                 "test": [float(r[f"test_exit{k}"]) for k in exits]})
    return {key: sorted(rounds, key=lambda x: x["round"]) for key, rounds in runs.items()}


def val_best(rounds: list[dict]) -> dict:
    """The evaluated round of the highest last-exit validation accuracy, the later of equals."""
    return max(reversed(rounds), key=lambda x: x["val"][-1])  # max() keeps the first: scan from the end


def read_protocols(rounds: list[dict]) -> dict[str, list[float]]:
    """One run's test accuracy per exit under each protocol (see the module docstring)."""
    final = rounds[-1]
    exits = len(final["test"])
    return {"final": final["test"], "val_best": val_best(rounds)["test"],
            "test_max": [max(x["test"][k] for x in rounds) for k in range(exits)]}


def setting_rows(results: Path, setting: str) -> list[dict]:
    """The CSV's rows of one setting: one per run and protocol."""
    runs = read_curves(results / f"study_T100_{setting}_curves.csv",
                       chosen_lrs(results / f"study_T100_{setting}_trials.csv"))
    kd = results / f"study_T100_{setting}_last_exit_kd_curves.csv"
    if kd.exists():
        runs.update(read_curves(kd, chosen_lrs(results / f"study_T100_{setting}_last_exit_kd_trials.csv"),
                                rename="last_exit_kd"))
    rows = []
    for (method, seed), rounds in sorted(runs.items()):
        round_read = {"final": rounds[-1]["round"], "val_best": val_best(rounds)["round"], "test_max": ""}
        for protocol, accs in read_protocols(rounds).items():
            rows.append({"setting": setting, "method": method, "seed": seed, "protocol": protocol,
                         "round": round_read[protocol],
                         **{f"test_exit{k + 1}": a for k, a in enumerate(accs)}})
    return rows


def last_exit(row: dict) -> int:
    """The number of a row's last exit (its highest ``test_exitK``)."""
    return max(int(k[len("test_exit"):]) for k in row if k.startswith("test_exit"))


def methods_table(rows: list[dict]) -> str:
    """Per method, test accuracy at exit 1 and the last exit under each protocol, mean ± std."""
    last = last_exit(rows[0])
    head = ["method", "seeds", *[f"{p} e1 / e{last}" for p in PROTOCOLS]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    by = defaultdict(list)
    for r in rows:
        by[(r["method"], r["protocol"])].append(r)
    for method in sorted({r["method"] for r in rows}, key=lambda m: (m != OURS, m)):
        cells = [" / ".join(mean_std_cell([r[f"test_exit{k}"] for r in by[(method, p)]]) for k in (1, last))
                 for p in PROTOCOLS]
        lines.append(f"| {method} | {len(by[(method, 'final')])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def contrast_table(rows: list[dict]) -> str:
    """CAFEDistill minus every other method, seed-matched, at exit 1 and the last exit under each
    protocol (mean ± standard error over the seeds both have)."""
    last = last_exit(rows[0])
    head = ["CAFEDistill −", "seeds", *[f"{p} Δe1 / Δe{last}" for p in PROTOCOLS]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    at = {(r["method"], r["seed"], r["protocol"]): r for r in rows}
    for other in sorted({r["method"] for r in rows} - {OURS}):
        seeds = sorted({s for (m, s, _) in at if m == other} & {s for (m, s, _) in at if m == OURS})
        cells = []
        for p in PROTOCOLS:
            cells.append(" / ".join(
                mean_se_cell([at[(OURS, s, p)][f"test_exit{k}"] - at[(other, s, p)][f"test_exit{k}"]
                              for s in seeds]) for k in (1, last)))
        lines.append(f"| {other} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="the folder of the study's committed CSVs (docs/results)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--out", type=Path, required=True, help="folder for protocol_T100_runs.csv")
    args = parser.parse_args()
    missing = [s for s in args.settings if not (args.results / f"study_T100_{s}_curves.csv").exists()]
    if missing:
        sys.exit(f"protocol_tables.py: {args.results} holds no study_T100_{missing[0]}_curves.csv")
    every = []
    for setting in args.settings:
        rows = setting_rows(args.results, setting)
        every += rows
        print(f"### {setting}\n\n{methods_table(rows)}\n\n{contrast_table(rows)}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "protocol_T100_runs.csv", every)


if __name__ == "__main__":
    main()
