"""Run named variants of one config (``cafedist train`` per variant) and tabulate them.

A one-factor sweep is not a product grid, so ``cafedist compare --grid`` does not fit it::

    python experiments/sweep.py experiments/readings_mnist5k_a03.txt --out runs/readings --jobs 2

The variants file holds one variant a line: ``NAME  --config FILE  key=value ...`` (``#``
starts a comment). Every variant runs into ``OUT/NAME`` with ``--resume auto``, so an
interrupted sweep continues where it stopped and a finished variant is not redone (``train``
itself checks that a run directory holds the same config; a run that a ``--resume force``
extension has taken past its summary.json is no finished one: ``train`` is run on it). Then ``OUT/variants.csv`` (final
validation and test accuracy per exit, conflict means) and ``OUT/curves.csv`` (per round) are
written; ``--collect DIR --out TABLES`` writes the same two tables for every finished run below
DIR (e.g. a ``cafedist compare`` folder whose report is not written yet). The sweep exits 1 when a
variant failed (its log: ``OUT/NAME.log``).
Settings are chosen on validation accuracy only; test accuracy is reported beside it.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def read_variants(path: Path) -> list[tuple[str, list[str]]]:
    """``(name, train arguments)`` per non-comment line of the variants file."""
    out = []
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append((words[0], words[1:]))
    return out


def finished(args: list[str], run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run of this variant's config (``cafedist compare``'s
    test): a summary that still describes the run (:func:`finished_summary`: not one a ``--resume
    force`` extension has taken the run past) written for this config, or for the same run under
    an earlier config file."""
    from cafedist.config import config_hash, load_config
    from cafedist.errors import CafeError
    from cafedist.train.preflight import earlier_hashes

    try:
        summary = finished_summary(run_dir)  # a CafeError (a broken record of a move aside): train says it
        if summary is None:
            return False
        config = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
        if "--config" in args:
            config = args[args.index("--config") + 1]
        cfg = load_config(config, [a for a in args if "=" in a and not a.startswith("-")])
    except (OSError, ValueError, IndexError, CafeError):
        return False
    return summary.get("config_hash") in (config_hash(cfg), *earlier_hashes(cfg, run_dir))


def run(name: str, args: list[str], out: Path) -> tuple[str, int]:
    """One variant: ``cafedist train`` (resumes an unfinished run, skips one finished with this
    config; ``train`` refuses a run directory holding another config)."""
    run_dir = out / name
    if finished(args, run_dir):
        return name, 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cafedist", "train", *args, "--out", str(run_dir), "--no-progress"]
    with open(out / f"{name}.log", "a") as log:
        return name, subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def tabulate(variants: list[tuple[str, list[str]]], out: Path, tables: Path | None = None) -> None:
    """``variants.csv`` and ``curves.csv`` (in ``tables``, default ``out``) from the finished runs."""
    tabulate_runs([(name, out / name, " ".join(a for a in args if "=" in a)) for name, args in variants],
                  tables or out)


def finished_runs(root: Path) -> list[tuple[str, Path, str]]:
    """Every finished run below ``root`` (e.g. a ``cafedist compare`` folder), named by its path
    (:func:`finished_summary`: a run an extension has taken past its summary.json is not)."""
    return [(str(f.parent.relative_to(root)), f.parent, "") for f in sorted(root.rglob("summary.json"))
            if finished_summary(f.parent) is not None]


def tabulate_runs(runs: list[tuple[str, Path, str]], tables: Path) -> None:
    """``variants.csv`` and ``curves.csv`` in ``tables`` for ``(name, run_dir, overrides)`` runs."""
    rows, curves = [], []
    for name, run_dir, overrides in runs:
        s = finished_summary(run_dir)
        if s is None:
            continue
        row = {"variant": name, "overrides": overrides, "rounds": s["rounds"], "seed": _seed(run_dir),
               "wall_seconds": s["wall_seconds"]}
        for k, (v, t) in enumerate(zip(s.get("val_acc_per_exit") or [None] * len(s["acc_per_exit"]),
                                       s["acc_per_exit"])):
            row[f"val_exit{k + 1}"] = _r(v)
            row[f"test_exit{k + 1}"] = _r(t)
        records = finished_records(run_dir)
        row.update(conflict_means(records, s["rounds"]))
        rows.append(row)
        for rec in records:
            curves.append({"variant": name, "seed": row["seed"], "rounds": s["rounds"], "round": rec["round"],
                           "loss": _r(rec.get("loss")),
                           **{f"val_exit{k + 1}": _r(v) for k, v in enumerate(rec.get("val_acc_per_exit") or [])},
                           **{f"test_exit{k + 1}": _r(v) for k, v in enumerate(rec.get("acc_per_exit") or [])}})
    tables.mkdir(parents=True, exist_ok=True)
    write_csv(tables / "variants.csv", rows)
    write_csv(tables / "curves.csv", curves)


def finished_summary(run_dir: Path) -> dict | None:
    """A finished run's summary.json (None: no run, an unfinished one, or one that a ``--resume
    force`` extension has taken past its summary: :func:`cafedist.run.metrics.run_standing`)."""
    from cafedist.run.metrics import run_standing

    return run_standing(run_dir).summary


def finished_records(run_dir: Path) -> list[dict]:
    """The ``metrics.jsonl`` records of a finished run's rounds (its summary's), one per round
    (:func:`cafedist.run.metrics.run_standing`, as compare's curves read them)."""
    from cafedist.run.metrics import run_standing

    return run_standing(run_dir).rows()


def conflict_means(records: list[dict], rounds: int) -> dict[str, float | None]:
    """Means over rounds of the conflict record (``train.diagnostics: [conflict]``), for the
    first and the second half of the schedule (selection withholds exits in the first half
    with the default ``schedule_span`` 0.5): the mean cosine over exit pairs and the share of
    negative pairs, over the trained pairs and over all pairs."""
    out: dict[str, float | None] = {}
    for half, (lo, hi) in (("h1", (0, rounds // 2)), ("h2", (rounds // 2, rounds))):
        out.update({f"{k}_{half}": v for k, v in conflict_window(records, lo, hi).items()})
    return out


def conflict_window(records: list[dict], lo: int, hi: int) -> dict[str, float | None]:
    """``cos_trained``, ``neg_trained``, ``cos_all``, ``neg_all``: the conflict record's means
    over rounds ``lo <= round < hi`` (None where no round has the value)."""
    window = [r["conflict"] for r in records if r.get("conflict") and lo <= r["round"] < hi]
    out: dict[str, float | None] = {}
    for kind in ("trained", "all"):
        cos = [v for c in window for v in c[kind].values() if v is not None]
        neg = [c[f"neg_{kind}"] for c in window if c[f"neg_{kind}"] is not None]
        out[f"cos_{kind}"] = _r(sum(cos) / len(cos)) if cos else None
        out[f"neg_{kind}"] = _r(sum(neg) / len(neg)) if neg else None
    return out


def markdown_table(rows: list[dict], exits: int = 3) -> str:
    """A markdown table of finished runs: rounds, seed, test and validation accuracy per exit (%)."""
    head = ["run", "rounds", "seed", *[f"test e{k}" for k in range(1, exits + 1)],
            *[f"val e{k}" for k in range(1, exits + 1)]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["variant"], str(r["rounds"]), str(r["seed"])]
        for kind in ("test", "val"):
            cells += [f"{100 * float(r[f'{kind}_exit{k}']):.1f}" if r.get(f"{kind}_exit{k}") not in (None, "") else "–"
                      for k in range(1, exits + 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seed(run_dir: Path) -> int | None:
    from cafedist.config import read_run_config

    return read_run_config(run_dir / "config.yaml").seed


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 5)


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` as CSV, the columns in the order they first appear."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", type=Path, nargs="?", help="the variants file (not with --collect)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only-table", action="store_true", help="tabulate the finished runs, run nothing")
    ap.add_argument("--collect", type=Path, help="tabulate every finished run below this folder into --out")
    a = ap.parse_args()
    if a.collect and not a.collect.is_dir():
        ap.error(f"--collect {a.collect}: no such folder")
    if not a.collect and a.variants is None:
        ap.error("give the variants file (or --collect DIR)")
    if a.variants is not None and not a.variants.is_file():
        ap.error(f"{a.variants}: no such variants file")
    if a.collect:
        tabulate_runs(finished_runs(a.collect), a.out)
        with open(a.out / "variants.csv") as f:
            print(markdown_table(list(csv.DictReader(f))))
        return
    variants = read_variants(a.variants)
    a.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    if not a.only_table:
        with ThreadPoolExecutor(a.jobs) as pool:
            for name, rc in pool.map(lambda v: run(v[0], v[1], a.out), variants):
                print(f"{name}: {'ok' if rc == 0 else f'FAILED (exit {rc}, see {a.out / name}.log)'}", flush=True)
                failed += rc != 0
                tabulate(variants, a.out)
    tabulate(variants, a.out)
    if failed:
        sys.exit(f"sweep.py: {failed} of {len(variants)} variants failed (see their logs in {a.out})")


if __name__ == "__main__":
    main()
