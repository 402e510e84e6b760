"""Tables of the T = 100 study (``experiments/study_T100.sh``) for docs/results and docs/RESULTS.md.

    python experiments/study_tables.py mnist5k-a0.3 [--study runs/study] [--results-md docs/RESULTS.md]

For one setting it writes, under ``docs/results/`` (``-`` in the setting's name becomes ``_``):

- ``study_T100_<setting>_runs.csv``: every finished run (lr trials and seeds), final validation
  and test accuracy per exit, with ``rounds`` and ``seed`` columns (``sweep.py --collect``);
- ``study_T100_<setting>_curves.csv``: the same runs' accuracy per exit every evaluated round;
- ``study_T100_<setting>_trials.csv``: ``cafedist compare``'s tuning record (which lr won,
  on validation), and ``..._curves.png``, its plot of test accuracy per exit vs round (mean
  over seeds); both absent until the compare has written its report.

and replaces, in RESULTS.md, the blocks between ``<!-- study:<setting>:runs -->`` and
``<!-- /study:<setting>:runs -->`` (one row per run) and ``<!-- study:<setting>:seeds -->`` /
``<!-- /study:<setting>:seeds -->`` (each method at its chosen lr: mean ± sample sd over its
seeds) and ``<!-- study:<setting>:paired -->`` / ``<!-- /study:<setting>:paired -->``
(CAFEDistill minus each other method, seed by seed — a seed gives every method the same
partition — mean ± standard error over the seeds) when those markers exist (the last two only
once the compare has chosen). The chosen lr comes from the compare's trials.csv, never from
test accuracy. A setting without finished runs under ``--study`` is refused, so the committed
tables are never replaced by empty ones.
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from sweep import finished_runs, tabulate_runs  # experiments/ is on sys.path when run as a script

from cafedist.stats import mean_se
from cafedist.tuning import Setting

ROOT = Path(__file__).resolve().parent.parent


def collect(study_dir: Path, setting: str, results: Path) -> list[dict]:
    """Write the setting's CSVs into ``results``; return the per-run rows."""
    stem = f"study_T100_{setting.replace('-', '_')}"  # mnist5k-a0.3 -> study_T100_mnist5k_a0.3
    with tempfile.TemporaryDirectory() as tmp:
        tabulate_runs(finished_runs(study_dir / "runs"), Path(tmp))  # sweep.py --collect, in-process
        for name in ("variants", "curves"):
            shutil.copy(Path(tmp) / f"{name}.csv",
                        results / f"{stem}_{'runs' if name == 'variants' else name}.csv")
    for name, suffix in (("trials.csv", "trials.csv"), ("curves.png", "curves.png")):  # written by compare's report
        if (study_dir / name).is_file():
            shutil.copy(study_dir / name, results / f"{stem}_{suffix}")
    with open(results / f"{stem}_runs.csv") as f:
        return list(csv.DictReader(f))


def chosen_settings(study_dir: Path) -> dict[str, str]:
    """``method -> chosen setting`` (e.g. ``train.lr=0.05``) from the compare's trials.csv."""
    trials = study_dir / "trials.csv"
    if not trials.is_file():
        return {}
    with open(trials) as f:
        return {r["algorithm"]: r["setting"] for r in csv.DictReader(f) if r["chosen"] == "yes"}


def setting_folder(label: str) -> str:
    """The folder compare trains a setting in (:attr:`cafedist.tuning.Setting.slug`), from its
    trials.csv label: keys there are separated by spaces, in the folder by commas (or hashed)."""
    pairs = tuple(tuple(pair.split("=", 1)) for pair in re.split(r" (?=[A-Za-z_][\w.-]*=)", label) if pair)
    return Setting(pairs).slug


def chosen_runs(rows: list[dict], method: str, setting: str) -> list[dict]:
    """The per-run rows of ``method`` at ``setting`` (one per seed; a method no grid axis
    applies to, setting "", trains in ``method/seedN``)."""
    folder = setting_folder(setting)
    prefix = f"{method}/{folder}/" if folder else f"{method}/seed"
    return [r for r in rows if r["variant"].startswith(prefix)]


def _pct(value: str) -> str:
    return "" if value == "" else f"{100 * float(value):.1f}"


def runs_table(rows: list[dict]) -> str:
    """Markdown: one row per run, test then validation accuracy per exit (%)."""
    lines = ["| run | seed | test e1 | test e2 | test e3 | val e1 | val e2 | val e3 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: r["variant"]):
        cells = [_pct(r[k]) for k in ("test_exit1", "test_exit2", "test_exit3", "val_exit1", "val_exit2", "val_exit3")]
        lines.append(f"| {r['variant']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_table(rows: list[dict], chosen: dict[str, str]) -> str:
    """Markdown: each method at its chosen setting, mean ± sample sd over its seeds (one seed: the value)."""
    lines = ["| method (chosen) | seeds | test e1 | test e2 | test e3 | val e3 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for method, setting in chosen.items():
        picked = chosen_runs(rows, method, setting)
        if not picked:
            continue
        cells = []
        for key in ("test_exit1", "test_exit2", "test_exit3", "val_exit3"):
            values = [100 * float(r[key]) for r in picked if r[key] != ""]
            if not values:
                cells.append("")
                continue
            cells.append(f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
                         if len(values) > 1 else f"{values[0]:.1f}")
        lines.append(f"| {method} ({setting.split('=', 1)[-1]}) | {len(picked)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(rows: list[dict], chosen: dict[str, str], reference: str = "cafedistill") -> str:
    """Markdown: ``reference`` minus each other method at their chosen settings, seed-matched
    test accuracy differences per exit (points, mean ± standard error over the shared seeds)."""
    exits = ("test_exit1", "test_exit2", "test_exit3")

    def by_seed(method: str) -> dict[str, dict]:
        return {r["seed"]: r for r in chosen_runs(rows, method, chosen[method])}

    if reference not in chosen:
        return ""
    ref = by_seed(reference)
    lines = [f"| {reference} minus | seeds | exit 1 | exit 2 | exit 3 |", "| --- | --- | --- | --- | --- |"]
    for method in chosen:
        other = by_seed(method)
        seeds = sorted(set(ref) & set(other))
        if method == reference or not seeds:
            continue
        cells = []
        for key in exits:
            diffs = [100 * (float(ref[s][key]) - float(other[s][key])) for s in seeds
                     if ref[s][key] != "" and other[s][key] != ""]
            if not diffs:
                cells.append("")
                continue
            mean, se = mean_se(diffs)
            cells.append(f"{mean:+.1f} ± {se:.1f}" if len(diffs) > 1 else f"{mean:+.1f}")
        lines.append(f"| {method} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_block(text: str, marker: str, body: str) -> str:
    """``text`` with the lines between ``<!-- marker -->`` and ``<!-- /marker -->`` set to ``body``."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if start not in text or end not in text:
        return text
    a = text.index(start) + len(start)
    return text[:a] + "\n" + body + "\n" + text[text.index(end):]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("setting", help="e.g. mnist5k-a0.3 (a folder of --study)")
    parser.add_argument("--study", type=Path, default=ROOT / "runs" / "study")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--results-md", type=Path, default=ROOT / "docs" / "RESULTS.md")
    args = parser.parse_args()
    study_dir = args.study / args.setting
    if not finished_runs(study_dir / "runs"):  # never overwrite the committed tables with empty ones
        parser.error(f"{study_dir / 'runs'}: no finished runs of setting {args.setting} "
                     f"(run `bash experiments/study_T100.sh {args.setting}` first, or give --study)")
    args.results.mkdir(parents=True, exist_ok=True)
    rows = collect(study_dir, args.setting, args.results)
    chosen = chosen_settings(study_dir)
    runs, seeds, paired = runs_table(rows), seeds_table(rows, chosen), paired_table(rows, chosen)
    text = replace_block(args.results_md.read_text(), f"study:{args.setting}:runs", runs)
    if chosen:
        text = replace_block(text, f"study:{args.setting}:seeds", seeds)
        text = replace_block(text, f"study:{args.setting}:paired", paired)
    else:  # an unfinished compare has chosen nothing yet: keep the seed tables as they are
        print(f"study_tables.py: no {study_dir / 'trials.csv'} yet (the compare has not chosen); "
              "the seeds and paired tables are left as they are", file=sys.stderr)
    args.results_md.write_text(text)
    print(runs, seeds, paired, sep="\n\n")


if __name__ == "__main__":
    main()
