"""``cafedist status RUN_OR_FOLDER...``: where each run stands, read from its files alone.

For every run directory given, or found below a folder given (a sweep's or compare's ``--out``),
one row: the algorithm, rounds done of the run's total (of a run no process trains, the rounds a
resume keeps: up to its newest checkpoint, none without one; rows a killed or failed session
wrote past it are the next train's to drop, and the state names them; of a live ``--resume
force`` attempt, whose config.yaml is rewritten only at its first checkpoint, the total it
recorded for its session meanwhile, from its start on), what is happening (``training`` by a
live process named from its lock, ``finished``, ``failed`` with the error that ended the last
training compare started (from its ``train.log``), ``stopped``, each of the last two with the
round a resume continues from, or why it would be refused (train's check of the newest
checkpoint against config.yaml: a file edited by hand since), ``no round finished``), the last
round's last-exit accuracy, an estimate of the time left while training (from the current
session's rounds once it has any: a resume may run on another machine; with the checkpoint
writes when rows record them, at the session's ``checkpoint.every``), and whether
``eval.json`` describes the newest checkpoint, its most recent budget and how many budgets it
keeps for those models.

Nothing is locked, loaded or written: status reads config.yaml, metrics.jsonl, summary.json,
the lock's record (and a live force attempt's record of its config, ``.config-pending.json``),
the checkpoint folders' names (and, of a run no process trains, the newest one's manifest),
train.log and eval.json, so it is cheap on a run that is training (the newest checkpoint is
named, not verified: ``cafedist eval`` verifies).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cafedist.compare import COMPARE_LOCK_NAME
from cafedist.config import Config, config_hash, read_run_config
from cafedist.errors import CafeError, ConfigError
from cafedist.paths import run_dir_arg
from cafedist.run.checkpoint import CheckpointDir, CheckpointRef, refusal
from cafedist.run.metrics import session_starts
from cafedist.rundir import MOVING_NAME, PREVIOUS_PREFIX, holder_record, holder_text, pending_config, unfinished_move
from cafedist.train.preflight import earlier_hashes
from cafedist.trainlog import last_session_error
from cafedist.typed import is_finite_number
from cafedist.units import hms

#: folders below a run that never hold another run (skipped when searching a folder)
_NOT_RUNS = ("checkpoints", "tensorboard", "client_state", "submitit")
#: rounds whose time the estimate of the time left is taken from (the newest ones)
_RECENT = 5


@dataclass
class RunStatus:
    """One run directory's state (:func:`run_status`)."""

    run_dir: str
    algorithm: str | None
    rounds_done: int  # of a run no process trains: the rounds a resume keeps (its newest checkpoint's)
    rounds: int | None
    state: str
    last_exit_accuracy: float | None
    seconds_left: float | None
    time_left_from: str | None  # whose rounds the estimate read: "this session" or "earlier session"
    checkpoint_round: int | None
    eval: str
    #: rounds its rows record: of a run no process trains also those past its newest checkpoint
    #: (or all, without one), which a resume trains again
    rounds_trained: int = 0
    #: the keys of the budgets eval.json keeps for its models (``budgets``), in the order evaluated
    budgets: list[str] = field(default_factory=list)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's readable records (a line torn by a kill, or damaged, ends the list)."""
    out: list[dict[str, Any]] = []
    try:
        # bytes that are no UTF-8 (a damaged file) become a line that is no JSON
        lines = (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            break
        if isinstance(record, dict) and isinstance(record.get("round"), int):
            out.append(record)
    return out


def _usable(value: Any) -> bool:
    """A number as train writes a round's time or an accuracy: finite and >= 0."""
    return is_finite_number(value) and value >= 0


def _eval_state(run_dir: Path, checkpoint_round: int | None) -> tuple[str, list[str]]:
    """The ``eval`` column: the round eval.json describes, its most recent budget (and of how
    many it keeps, where several) and whether it is stale; and the keys of the budgets it keeps."""
    report = _json(run_dir / "eval.json")
    if not isinstance(report, dict):
        return "none", []
    rnd = report.get("round")
    budget = report.get("budget")
    clients = budget.get("clients") if isinstance(budget, dict) else None
    specs = sorted({str(r.get("budget")) for r in clients if isinstance(r, dict)}) if isinstance(clients, list) else []
    kept = report.get("budgets")
    keys = [key for key, entry in kept.items() if isinstance(entry, dict)] if isinstance(kept, dict) else []
    # a count, not the keys: a budget file's key is its full path and digest, too wide for the table
    spec = f", budget {','.join(specs)}{f' (latest of {len(keys)})' if len(keys) > 1 else ''}" if specs else ""
    if checkpoint_round is None:  # checkpoints moved or deleted: nothing to tell staleness by
        fresh = ", no checkpoint left to compare it with"
    else:
        fresh = "" if rnd == checkpoint_round else f", stale: the newest checkpoint is round {checkpoint_round}"
    return f"round {rnd}{spec}{fresh}", keys


def _resume_refusal(run_dir: Path, cfg: Config) -> str | None:
    """Why ``cafedist train --resume auto`` under the run's config.yaml would refuse its newest
    checkpoint (train's own check, on the manifest unverified): a config.yaml edited by hand
    since, or checkpoints of another run; None when it would not (or there is none)."""
    ckpt = CheckpointDir(run_dir)
    newest = ckpt.candidates()
    if not newest:
        return None
    return refusal(ckpt, CheckpointRef.unverified(newest[0]), config_hash(cfg),
                   also_accept=earlier_hashes(cfg, run_dir), algorithm=cfg.algorithm.name)


def _resume_words(records: list[dict[str, Any]], checkpoint: int | None, refused: str | None) -> str | None:
    """Where a resume of a run no process trains continues (``refused``: why it would refuse the
    newest checkpoint, :func:`_resume_refusal`), and the rounds trained past that checkpoint,
    which it trains again; None when there is nothing to resume."""
    if refused is not None:
        words = f"a resume is refused: {refused}"
    elif checkpoint is not None:
        words = f"a resume continues after round {checkpoint}"
    elif records:
        words = "no checkpoint: a resume starts over"
    else:
        return None
    first = 0 if checkpoint is None else checkpoint + 1  # the first round a resume trains again
    last = records[-1]["round"] if records else -1
    if last >= first:
        span = f"round {first}" if last == first else f"rounds {first}..{last}"
        words += f"; {span} trained but not checkpointed"
    return words


def _stopped_state(records: list[dict[str, Any]], checkpoint: int | None, refused: str | None = None) -> str:
    """The state of a run no process trains, unfinished, whose last training reported no error
    (``records``: all its readable rows)."""
    words = _resume_words(records, checkpoint, refused)
    return "no round finished" if words is None else f"stopped ({words})"


def stopped_state(run_dir: str | Path) -> str:
    """How :func:`run_status` describes ``run_dir`` once its training stopped unfinished without
    an error (a signal, a requeue): where a resume continues. Reads no config."""
    run_dir = Path(run_dir)
    return _stopped_state(_records(run_dir), CheckpointDir(run_dir).newest_round())


def _recent(rows: list[dict[str, Any]], key: str) -> list[float]:
    """The usable ``key`` of the newest :data:`_RECENT` rows that record one."""
    return [r[key] for r in rows if _usable(r.get(key))][-_RECENT:]


def _checkpoints_left(every: int, rounds: int, done: int) -> int:
    """Checkpoints train writes in rounds ``done`` .. the last of ``rounds`` (every ``every``
    rounds, ``checkpoint.every``, and the last round)."""
    return sum(1 for r in range(done, rounds) if r == rounds - 1 or (every and (r + 1) % every == 0))


def _time_left(every: int, records: list[dict[str, Any]], holder: str | None, done: int,
               rounds: int) -> tuple[float | None, str | None]:
    """Seconds left of ``rounds``, checkpointed every ``every`` rounds (the median of the recent
    rounds' times per round left, plus that of the recorded checkpoint writes per checkpoint
    left) and whose rounds it read: the current session's once it finished one (a resume may
    run on another machine or thread count), else the earlier sessions' on the world size of
    their newest round. ``holder``: the lock record of the session training now (rows name theirs)."""
    # a round's time and an accuracy are finite and >= 0 as train writes them: anything else (a
    # damaged or edited file) gave an infinite, nan or negative estimate, which the table could
    # not print (a traceback) and --json wrote as Infinity/NaN, which is not JSON
    first = session_starts(records)[-1] if records else 0
    if records and "session" in records[-1] and records[-1]["session"] != holder:
        first = records[-1]["round"] + 1  # the live session has finished no round yet
    current = [r for r in records if r["round"] >= first]
    earlier = [r for r in records if r["round"] < first]
    # a run resumed on another number of ranks mixed the old session's round times into the median
    earlier = [r for r in earlier if r.get("world_size") == earlier[-1].get("world_size")] if earlier else []
    source, rows = ("this session", current) if _recent(current, "seconds") else ("earlier session", earlier)
    seconds = _recent(rows, "seconds")
    if not seconds:
        return None, None
    # checkpoints are written after a round's `seconds` were taken
    saves = _recent(current, "t_checkpoint") or _recent(earlier, "t_checkpoint")
    left = statistics.median(seconds) * max(rounds - done, 0)
    if saves:
        left += statistics.median(saves) * _checkpoints_left(every, rounds, done)
    return left, source


def run_status(run_dir: str | Path) -> RunStatus:
    """What ``run_dir``'s files say about it (module docstring). Raises ConfigError when its
    config.yaml cannot be read as a run config (CafeError: its record of a move aside)."""
    run_dir = Path(run_dir)
    moving = unfinished_move(run_dir)
    if moving is not None:  # neither half is a run to report on
        state = moving.removeprefix(f"{run_dir}: ")
        return RunStatus(str(run_dir), None, 0, None, state, None, None, None, None, "none")
    try:
        cfg = read_run_config(run_dir / "config.yaml")
    except CafeError as exc:
        raise ConfigError(f"{run_dir / 'config.yaml'}: not a usable run config ({exc})") from None
    records = _records(run_dir)
    checkpoint = CheckpointDir(run_dir).newest_round()
    summary = _json(run_dir / "summary.json")
    record = holder_record(run_dir)  # the live session's, which rows name theirs by
    holder = None if record is None else holder_text(record)
    trained = records[-1]["round"] + 1 if records else 0
    # of a run no process trains, rows past the newest checkpoint (all, without one) are the next
    # train's to drop: a killed or failed session's, maybe under --resume force of another config
    keep = -1 if checkpoint is None else checkpoint
    kept = records if holder is not None else [r for r in records if r["round"] <= keep]
    done = kept[-1]["round"] + 1 if kept else 0
    # --resume force onto another config rewrites config.yaml at its first checkpoint only
    pending = pending_config(run_dir, record)
    rounds = cfg.train.rounds if pending is None else pending.rounds
    error = last_session_error(run_dir)  # trainings that compare started log their output there
    left, source = None, None
    acc = kept[-1].get("acc_per_exit") if kept else None
    if holder is not None:
        state = f"training ({holder})"
        every = cfg.checkpoint.every if pending is None else pending.checkpoint_every
        left, source = _time_left(every, records, record, done, rounds)
    elif isinstance(summary, dict) and summary.get("config_hash") == config_hash(cfg):
        state = "finished"
        # summary.json is the record of a finished run: metrics.jsonl may be torn or trimmed
        done, acc = cfg.train.rounds, summary.get("acc_per_exit")
        trained = done
    elif error is not None:
        words = _resume_words(records, checkpoint, _resume_refusal(run_dir, cfg))
        state = f"failed ({error.removeprefix('cafedist: error: ')}{'' if words is None else '; ' + words})"
    else:
        state = _stopped_state(records, checkpoint, _resume_refusal(run_dir, cfg))
    last = acc[-1] if isinstance(acc, list) and acc and _usable(acc[-1]) else None
    evaluated, budgets = _eval_state(run_dir, checkpoint)
    return RunStatus(str(run_dir), cfg.algorithm.name, done, rounds, state, last, left, source,
                     checkpoint, evaluated, trained, budgets)


def _is_run(folder: Path) -> bool:
    """Whether ``folder`` is a run directory: it holds a config.yaml (or a run being moved
    aside, whose config.yaml may have moved already) and is no compare's ``--out`` (compare
    refuses an --out that holds a run: a config.yaml there is the user's, e.g. ``compare
    --config exp/config.yaml --out exp``, and its runs are below)."""
    return (((folder / "config.yaml").is_file() or (folder / MOVING_NAME).exists())
            and not (folder / COMPARE_LOCK_NAME).exists())


def find_runs(path: Path) -> Iterator[Path]:
    """``path`` if it is a run directory, else every run directory below it (sorted; a run's
    own folders and runs moved aside into ``previous-*`` are not searched). Links to folders
    are followed (a sweep folder of links to runs kept elsewhere), each real folder once."""
    if _is_run(path):
        yield path
        return
    seen: set[str] = set()  # folders followed through links: each once (a link to a parent loops)
    for top, dirs, _ in os.walk(path, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        if Path(top) != path and _is_run(Path(top)):
            dirs[:] = []
            yield Path(top)
            continue
        dirs[:] = sorted(d for d in dirs if d not in _NOT_RUNS and not d.startswith((PREVIOUS_PREFIX, ".")))


def _row(status: RunStatus) -> dict[str, str]:
    rounds = f"{status.rounds_done}/{'-' if status.rounds is None else status.rounds}"
    acc = "" if status.last_exit_accuracy is None else f"{status.last_exit_accuracy:.4f}"
    left = "" if status.seconds_left is None else hms(status.seconds_left)
    if left and status.time_left_from != "this session":
        left += f" ({status.time_left_from})"
    return {"run": status.run_dir, "algorithm": status.algorithm or "", "rounds": rounds, "state": status.state,
            "last-exit acc": acc, "time left": left, "eval": status.eval}


def _table(rows: list[dict[str, str]]) -> str:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``cafedist status`` options."""
    p.add_argument("paths", nargs="+", metavar="RUN_OR_FOLDER", type=run_dir_arg,
                   help="run directories, or folders to search for them (e.g. a sweep's or compare's --out)")
    p.add_argument("--json", action="store_true", help="one JSON object per run")


def main(args: argparse.Namespace) -> int:
    """Run ``cafedist status``."""
    runs: dict[Path, Path] = {}  # resolved -> as found (a run given twice, or inside a folder given, once)
    notes = []
    for text in args.paths:
        path = Path(text)
        if not path.is_dir():
            raise ConfigError(f"{path}: not a folder (expected a run directory or a folder holding runs)")
        found = list(find_runs(path))
        if not found and (path / "submitit").is_dir():  # `cafedist submit --out PATH` before any job started
            notes.append(f"{path}: no run has started in it yet; jobs were submitted into it (its submitit/ "
                         f"folder): `squeue --me` shows whether they wait")
            continue
        if not found and (path / COMPARE_LOCK_NAME).exists():  # a compare whose runs have not begun
            notes.append(f"{path}: no run of the comparison in it has started training yet (compare checks the "
                         f"configs and prepares the data first, or it was stopped before)")
            continue
        if not found:
            raise ConfigError(f"{path}: no run directory in it (none holds the config.yaml `cafedist train` writes)")
        for run in found:
            runs.setdefault(run.resolve(), run)
    statuses, unreadable = [], []
    for run in runs.values():
        try:
            statuses.append(run_status(run))
        except CafeError as exc:  # one broken run must not hide a sweep's others
            unreadable.append(str(exc))
    if statuses:
        print("\n".join(json.dumps(asdict(s)) for s in statuses) if args.json else
              _table([_row(s) for s in statuses]))
    if notes:  # on stderr: --json's output stays one object per run
        print("\n".join(f"cafedist: note: {text}" for text in notes), file=sys.stderr)
    if unreadable:
        print("\n".join(f"cafedist: error: {text}" for text in unreadable), file=sys.stderr)
        return 2
    return 0


__all__ = ["RunStatus", "add_arguments", "find_runs", "main", "run_status", "stopped_state"]
