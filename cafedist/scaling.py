"""``cafedist scaling-report RUN_DIR...``: the table and plot of a scaling sweep.

Reads each run's ``metrics.jsonl`` (the loop's per-round timers and byte counters, written
by rank 0), plus ``summary.json`` and ``config.yaml`` when present, and writes
``scaling.md``, ``scaling.csv`` and ``scaling.png`` (atomically, via :mod:`cafedist.fsutil`).

Per run: ranks, clients per rank, mean round time (the first round of each training session
is skipped as warm-up when a run has more than 2 rounds: :func:`timed_rounds`), its split into
local training / communication / aggregation / evaluation (rank 0's timers; "other" is the
rest: proxy inference, bookkeeping), bytes per round, and the scaling
efficiency relative to the run with the smallest world size:

* **weak** scaling (clients per rank constant, total grows with the ranks):
  ``efficiency = t_base / t_N`` (1.0 = perfect: N times the work in the same time). With a
  fixed dataset, more clients means fewer samples per client, so when the runs' stores can be
  found the efficiency is normalised by the training samples of the busiest rank:
  ``(t_base / s_base) / (t_N / s_N)`` (column ``samples_per_rank``);
* **strong** scaling (total clients constant): ``efficiency = t_base / (t_N * N / N_base)``;
* otherwise the run is not comparable to the baseline and gets no efficiency.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cafedist import yamlio
from cafedist.errors import DataError
from cafedist.fsutil import atomic_output, replaced_together, write_text_atomic
from cafedist.paths import check_dir_creatable, refuse_empty_path, run_dir_arg, user_path
from cafedist.run.metrics import run_standing
from cafedist.rundir import unfinished_move
from cafedist.typed import is_finite_number, is_integer, is_number

TIMERS = ("t_local", "t_comm", "t_aggregate", "t_eval")
_REQUIRED = ("round", "seconds", "world_size", "clients_per_rank", *TIMERS)


@dataclass
class RunStats:
    """What the report needs from one run directory."""

    path: Path
    ranks: int
    clients_per_rank: list[int]
    rounds_used: int
    rounds_total: int
    round_s: float
    timers: dict[str, float]
    wire_bytes_per_round: float
    logical_bytes_per_round: float
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    samples_per_rank: int | None = None  # training samples of the busiest rank (None: store not found)

    @property
    def clients(self) -> int:
        return sum(self.clients_per_rank)


_NUMBERS = ("round", "seconds", "world_size", *TIMERS)
_OPTIONAL_NUMBERS = ("bytes_up", "bytes_down", "clients_trained", "wire_bytes")


def _check_types(rec: dict[str, Any], where: str) -> None:
    """The fields the report computes with must hold what train writes (a damaged or
    hand-edited file otherwise fails deep inside the arithmetic)."""
    for key in (*_NUMBERS, *(k for k in _OPTIONAL_NUMBERS if k in rec)):
        if not is_number(rec[key]):
            raise DataError(f"{where}: field {key!r} is {rec[key]!r}, expected a number")
        # every one is a count, a time or a size: a nan, infinity or negative value (which
        # train never writes) went into the means and printed nan or a negative efficiency
        if not is_finite_number(rec[key]) or rec[key] < 0:
            raise DataError(f"{where}: field {key!r} is {rec[key]!r}, expected a finite number >= 0")
    world = rec["world_size"]
    if not is_integer(world) or world < 1:
        # a world size of 0 divided by zero in the strong efficiency, 1.5 was read as 1
        raise DataError(f"{where}: field 'world_size' is {world!r}, expected an integer >= 1")
    cpr = rec["clients_per_rank"]
    if not (isinstance(cpr, list) and cpr and all(is_integer(c) for c in cpr)):
        raise DataError(f"{where}: field 'clients_per_rank' is {cpr!r}, expected a list of integers (one per rank)")
    if len(cpr) != world or min(cpr) < 0:
        # train writes one count per rank: another length made the run look like another world size
        raise DataError(f"{where}: field 'clients_per_rank' is {cpr!r}, expected {world} integers >= 0 (one per rank)")


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: not found (expected the metrics.jsonl of a run written by `cafedist train`)")
    records = []
    text = path.read_text(errors="replace")  # bytes that are no UTF-8 (damage): a line that is no JSON
    lines = text.splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if lineno == len(lines) and not text.endswith("\n"):
                # the record a training run is appending now (or one a kill tore): the
                # rounds before it are whole, as `cafedist status` and a resume read them
                break
            raise DataError(f"{path}:{lineno}: not a JSON object (expected one metrics record per line)") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in _REQUIRED if k not in rec]
        if missing:
            raise DataError(f"{path}:{lineno}: missing field {missing[0]!r} (written by an older cafedist?)")
        _check_types(rec, f"{path}:{lineno}")
        records.append(rec)
    if not records:
        raise DataError(f"{path}: no rounds recorded yet")
    return records


def _read_optional(path: Path, loader) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = loader(path.read_text())
    except (ValueError, yaml.YAMLError):
        raise DataError(f"{path}: unreadable (expected the file `cafedist train` writes)") from None
    return data if isinstance(data, dict) else {}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def busiest_rank_samples(config: dict[str, Any], ranks: int, run_dir: Path) -> int | None:
    """Training samples of the busiest rank under the loop's placement, from the run's store
    (a relative store path is relative to where train ran: from elsewhere the store is found
    through the absolute path the run's checkpoints record, as ``cafedist eval`` finds it)."""
    from cafedist.config import config_from_dict
    from cafedist.data.store import Store
    from cafedist.distributed.placement import place_clients
    from cafedist.errors import CafeError
    from cafedist.run.checkpoint import CheckpointDir

    try:
        cfg = config_from_dict(config)
        store = cfg.data.store_path(cfg.seed)
        recorded = CheckpointDir(run_dir).recorded_store()
        for candidate in (store, run_dir.parent / store, run_dir / store, recorded):
            if candidate is not None and candidate.is_file():
                with Store(candidate) as st:
                    sizes = [tr for tr, _ in st.client_sizes()]
                return max(sum(sizes[c] for c in part) for part in place_clients(sizes, ranks))
    except (CafeError, OSError, ValueError):
        return None
    return None


def timed_rounds(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rounds a run's times are averaged over: when it has more than 2, all but the first
    of each session (:func:`cafedist.run.metrics.session_starts`), which pays the warm-up of a
    process start (imports, compilation, caches); all when that leaves none."""
    from cafedist.run.metrics import session_starts

    starts = set(session_starts(records))
    warm = [r for r in records if r["round"] not in starts]
    return warm if len(records) > 2 and warm else records


def load_run(run_dir: str | Path) -> RunStats:
    """Summarise one run directory (mean over rounds, :func:`timed_rounds`)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DataError(f"{run}: not a directory (expected a run directory written by `cafedist train`)")
    moving = unfinished_move(run)
    if moving is not None:  # neither half is the run it timed
        raise DataError(moving)
    records = _read_metrics(run / "metrics.jsonl")
    summary = _read_optional(run / "summary.json", json.loads)
    standing = run_standing(run)
    if standing.summary is None:  # an extension has taken the run past it: unfinished
        summary = {}
    if standing.rounds is not None:
        # rows past the run's newest summary or checkpoint: a killed `--resume force` attempt's
        # (another config's, which the next train drops) or a session's not yet checkpointed
        records = [r for r in records if r["round"] < standing.rounds] or records
    used = timed_rounds(records)
    world = {int(r["world_size"]) for r in records}
    if len(world) > 1:
        raise DataError(f"{run / 'metrics.jsonl'}: world_size changes between rounds {sorted(world)} "
                        f"(a resume on another number of ranks): time one world size per run")
    cpr = [int(c) for c in records[-1]["clients_per_rank"]]
    config = _read_optional(run / "config.yaml", yamlio.load)
    logical = [(r.get("bytes_up", 0) + r.get("bytes_down", 0)) * r.get("clients_trained", sum(cpr)) for r in used]
    return RunStats(
        path=run, ranks=next(iter(world)), clients_per_rank=cpr, rounds_used=len(used), rounds_total=len(records),
        round_s=_mean([float(r["seconds"]) for r in used]),
        timers={k: _mean([float(r[k]) for r in used]) for k in TIMERS},
        wire_bytes_per_round=_mean([float(r.get("wire_bytes", 0)) for r in used]),
        logical_bytes_per_round=_mean([float(v) for v in logical]),
        config=config,
        summary=summary,
        samples_per_rank=busiest_rank_samples(config, next(iter(world)), run) if config else None,
    )


def run_labels(runs: list[RunStats]) -> list[str]:
    """How the report names each run: its folder's name, unless two runs share one (``a/seed0``
    and ``b/seed0``); then every run's path relative to the folder that holds them all."""
    paths = [Path(os.path.abspath(r.path)) for r in runs]
    names = {p.name for p in paths}
    if len(names) == len(set(paths)):  # the same run given twice is still one name
        return [_printable(p.name) for p in paths]
    # below the common folder of the runs' parents, so that no run is labelled "."
    top = Path(os.path.commonpath([p.parent for p in paths]))
    return [_printable(p.relative_to(top).as_posix()) for p in paths]


def _printable(name: str) -> str:
    """``name`` with a byte of a folder name that is no UTF-8 (a lone surrogate, which no UTF-8
    file can hold) shown as U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def scaling_table(runs: list[RunStats]) -> list[dict[str, Any]]:
    """One row per run, sorted by ranks, with weak/strong efficiency against the smallest world
    size; ``run`` names it (:func:`run_labels`)."""
    if not runs:
        return []
    labelled = sorted(zip(runs, run_labels(runs)), key=lambda rl: (rl[0].ranks, rl[0].clients))
    base = labelled[0][0]
    rows = []
    for r, label in labelled:
        mode, eff = _efficiency(base, r)
        split = {k[2:]: round(v, 4) for k, v in r.timers.items()}
        other = r.round_s - sum(r.timers.values())
        rows.append({
            "run": label, "ranks": r.ranks, "clients": r.clients,
            "clients_per_rank": "/".join(str(c) for c in r.clients_per_rank),
            "rounds": r.rounds_used, "samples_per_rank": r.samples_per_rank, "round_s": round(r.round_s, 4),
            **split, "other": round(max(other, 0.0), 4),
            "wire_mb_per_round": round(r.wire_bytes_per_round / 2**20, 3),
            "logical_mb_per_round": round(r.logical_bytes_per_round / 2**20, 3),
            "speedup": round(base.round_s / r.round_s, 3) if r.round_s > 0 else None,
            "mode": mode, "efficiency": None if eff is None else round(eff, 3),
        })
    return rows


def _efficiency(base: RunStats, run: RunStats) -> tuple[str, float | None]:
    """(mode, efficiency) of ``run`` relative to ``base``."""
    if run.round_s <= 0:
        return "n/a", None
    if run is base or (run.ranks == base.ranks and run.clients == base.clients):
        return "baseline", base.round_s / run.round_s
    if run.clients == base.clients:
        return "strong", base.round_s / (run.round_s * run.ranks / base.ranks)
    if max(run.clients_per_rank) == max(base.clients_per_rank) and \
            min(run.clients_per_rank) == min(base.clients_per_rank):
        if base.samples_per_rank and run.samples_per_rank:  # same clients per rank, maybe not same work
            return "weak", (base.round_s / base.samples_per_rank) / (run.round_s / run.samples_per_rank)
        return "weak", base.round_s / run.round_s
    return "n/a", None


# ----------------------------------------------------------------------------- outputs
_COLUMNS = ("run", "ranks", "clients", "clients_per_rank", "rounds", "samples_per_rank", "round_s", "local", "comm",
            "aggregate",
            "eval", "other", "wire_mb_per_round", "logical_mb_per_round", "speedup", "mode", "efficiency")


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The table as CSV text."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in _COLUMNS})
    return buf.getvalue()


def to_markdown(rows: list[dict[str, Any]], runs: list[RunStats]) -> str:
    """The table as Markdown, with what the columns mean and which scaling mode applies."""
    head = "| " + " | ".join(_COLUMNS) + " |\n|" + "|".join("---" for _ in _COLUMNS) + "|\n"
    body = "".join("| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in _COLUMNS) + " |\n"
                   for r in rows)
    modes = sorted({r["mode"] for r in rows if r["mode"] not in ("baseline", "n/a")})
    base = rows[0] if rows else None
    lines = ["# Scaling report", ""]
    if base:
        lines.append(f"Baseline: `{base['run']}` ({base['ranks']} rank(s), {base['clients']} clients). "
                     f"Scaling mode: {', '.join(modes) or 'none (no comparable runs)'}.")
        lines.append("")
    lines += [head + body,
              "Times are seconds per round on rank 0, averaged over the rounds counted "
              "(the first round of each session, round 0 and the one after a resume, skipped as warm-up when "
              "a run has more than 2 rounds); `other` = round time "
              "minus the four timers (proxy inference, bookkeeping). `wire_mb_per_round`: bytes all ranks "
              "put on the wire; `logical_mb_per_round`: per-client payload (up + down) x clients trained.",
              "Weak scaling (clients per rank constant): efficiency = t_base / t_N, normalised by the "
              "training samples of the busiest rank when known: (t_base / s_base) / (t_N / s_N). "
              "Strong scaling (total clients constant): efficiency = t_base / (t_N x N / N_base).", ""]
    unfinished = [f"`{label}`" for label, run in zip(run_labels(runs), runs) if not run.summary]
    if unfinished:
        # a sweep read while it trains: its times are of fewer rounds, and a run of 2 rounds or
        # fewer so far has its warm-up round averaged in
        lines.append(f"Note: {', '.join(unfinished)} not finished (no summary.json of its newest rounds): "
                     f"times of the rounds recorded so far; compare with care.")
    stacks = stack_difference(runs)
    if stacks is not None:
        lines.append(f"Note: the runs trained on different machines or software ({stacks}); their times compare "
                     "those too.")
    difference = config_difference(runs)
    if difference is not None:
        lines.append(f"Note: the runs' configs differ in more than the number of clients ({difference}); "
                     "compare with care.")
    return "\n".join(lines).rstrip() + "\n"


#: ``(section, field)`` of the config that a sweep may vary (weak scaling: the clients) or that
#: only say where the files are; any other difference makes the runs' times incomparable
_SWEEP_FIELDS = (("data", "clients"), ("data", "root"), ("data", "store"), ("data", "cache_dir"))


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without :data:`_SWEEP_FIELDS` and without the parameter sections of algorithms
    other than its own (as a run's identity leaves them out)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for section, key in _SWEEP_FIELDS:
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    algorithm = out.get("algorithm")
    if isinstance(algorithm, dict):
        out["algorithm"] = {k: v for k, v in algorithm.items() if k in ("name", algorithm.get("name"))}
    return out


def config_difference(runs: list[RunStats]) -> str | None:
    """``"RUN: field (a vs b)"``, the first field besides :data:`_SWEEP_FIELDS` in which a run's
    config differs from the first run's (runs without a config.yaml aside; ``algorithm.name``
    first); None if none does. Not the whole data section: another dataset is another workload."""
    from cafedist.train.preflight import dict_diff

    def name(config: dict[str, Any]) -> dict[str, Any]:
        algorithm = config.get("algorithm")
        return {"algorithm": {"name": algorithm.get("name") if isinstance(algorithm, dict) else algorithm}}

    known = [_comparable(r.config) for r in runs if r.config]
    names = [label for r, label in zip(runs, run_labels(runs)) if r.config]
    for run_name, config in zip(names[1:], known[1:]):
        difference = dict_diff(name(known[0]), name(config)) or dict_diff(known[0], config)
        if difference is not None:
            return f"{run_name}: {difference}"
    return None


#: what a run's recorded environments (summary.json, :mod:`cafedist.provenance`) say that
#: changes its times: the CPU models, the devices, the torch build
_TIMING_STACK = ("cpus", "devices", "torch")


def stack_difference(runs: list[RunStats]) -> str | None:
    """``"RUN: cpus (a vs b)"``, the first of :data:`_TIMING_STACK` in which a finished run's
    environments differ from the first finished run's (a scaling sweep that ran partly on
    other nodes times the nodes as well); None if none does, or nothing is recorded."""
    def stack(run: RunStats) -> dict[str, Any] | None:
        envs = run.summary.get("environments")
        if not isinstance(envs, list) or not envs or not all(isinstance(e, dict) for e in envs):
            return None
        out: dict[str, Any] = {}
        for key in _TIMING_STACK:
            values: set[str] = set()
            for env in envs:  # every session's: a run resumed on another node ran on both
                value = env.get(key)
                values.update(map(str, value) if isinstance(value, list) else [str(value)])
            out[key] = sorted(values)
        return out

    known = [(label, stack(r)) for r, label in zip(runs, run_labels(runs))]
    known = [(label, st) for label, st in known if st is not None]
    for label, st in known[1:]:
        for key in _TIMING_STACK:
            if st[key] != known[0][1][key]:
                return f"{label}: {key} ({', '.join(known[0][1][key])} vs {', '.join(st[key])})"
    return None


def bar_labels(rows: list[dict[str, Any]]) -> list[str]:
    """The plot's label of each row: ranks and clients per rank, and the run's name on top when
    two rows would otherwise share a label (matplotlib draws bars of one label on one spot)."""
    labels = [f"{r['ranks']}r\n{r['clients_per_rank']}" for r in rows]
    if len(set(labels)) == len(labels):
        return labels
    return [f"{r['run']}\n{label}" for r, label in zip(rows, labels)]


def plot(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Stacked round-time split per run (left) and efficiency vs ranks (right), as a PNG
    (a CafeError naming the extra to install when matplotlib is missing)."""
    from cafedist.eval.plots import _new_figure

    fig = _new_figure(width=10, height=4)
    ax1, ax2 = fig.subplots(1, 2)
    labels = bar_labels(rows)
    bottom = [0.0] * len(rows)
    for part in ("local", "comm", "aggregate", "eval", "other"):
        vals = [float(r[part]) for r in rows]
        ax1.bar(labels, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax1.set_ylabel("seconds per round (rank 0)")
    ax1.set_xlabel("ranks / clients per rank")
    ax1.legend(fontsize=8)
    ax1.set_title("round time split")
    for mode, marker in (("weak", "o-"), ("strong", "s-")):
        pts = [(r["ranks"], r["efficiency"]) for r in rows if r["mode"] in (mode, "baseline") and r["efficiency"]]
        if len(pts) > 1:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=f"{mode} scaling")
    ax2.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax2.set_xlabel("ranks")
    ax2.set_ylabel("efficiency")
    ax2.set_ylim(bottom=0)
    ax2.set_title("scaling efficiency")
    if ax2.lines[1:]:
        ax2.legend(fontsize=8)
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """Read the runs, write scaling.md / scaling.csv / scaling.png into ``out_dir``; returns the paths."""
    # a run named twice (`w1 w1`, `w1 ./w1`) is one run: it was one row per mention
    unique: dict[Path, str | Path] = {}
    for d in run_dirs:
        unique.setdefault(Path(d).resolve(), d)
    runs = [load_run(d) for d in unique.values()]
    rows = scaling_table(runs)
    out = Path(out_dir)
    paths = {"md": out / "scaling.md", "csv": out / "scaling.csv", "png": out / "scaling.png"}
    with replaced_together():  # a failed plot (no matplotlib) leaves an earlier report whole
        write_text_atomic(paths["md"], to_markdown(rows, runs))
        write_text_atomic(paths["csv"], to_csv(rows))
        plot(rows, paths["png"])
    return paths


# ----------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cafedist scaling-report``."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", type=run_dir_arg, help="run directories of one sweep")
    parser.add_argument("--out", default=None, type=user_path,
                        help="where to write scaling.md/.csv/.png (default: the first run's parent directory)")


def main(args: argparse.Namespace) -> int:
    """Write the report and print its table."""
    # the default folder may hold another sweep's report
    refuse_empty_path("--out", args.out, "a folder (omit --out for the first run's parent folder)")
    out = args.out or str(Path(args.run_dirs[0]).resolve().parent)
    check_dir_creatable(Path(out), "--out")
    paths = write_report(args.run_dirs, out)
    print(paths["md"].read_text(), end="")
    print(f"wrote {paths['md']}, {paths['csv']} and {paths['png']}")
    return 0
