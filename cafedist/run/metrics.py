"""Run outputs written by rank 0: ``metrics.jsonl`` (a line per round) and TensorBoard events."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cafedist.fsutil import write_text_atomic

log = logging.getLogger("cafedist")


class MetricsLog:
    """Appends one JSON object per round; on resume drops rounds after the checkpoint."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._said: set[str] = set()  # metrics already reported as written null for not being finite
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional dependency

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard missing or broken: metrics.jsonl suffices
                self._tb = None

    def truncate_after(self, last_round: int) -> None:
        """Keep only lines with ``round <= last_round`` (a resumed run re-creates the rest)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["round"] <= last_round:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                break  # a torn last line from a kill: drop it and everything after
        write_text_atomic(self.path, "".join(k + "\n" for k in kept))

    def read(self) -> list[dict[str, Any]]:
        """Every round's record written so far ([] before the first)."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, record: dict[str, Any]) -> None:
        """Write one round's record, durably (fsync: a kill loses no finished round), and its
        numbers to TensorBoard where enabled."""
        not_finite: list[tuple[str, float]] = []
        line = json.dumps(_finite_or_null(record, not_finite))
        for name, value in not_finite:
            metric = re.split(r"[.\[]", name, maxsplit=1)[0]
            if metric not in self._said:
                self._said.add(metric)
                log.warning("round %s: %s is %r, not a finite number: metrics.jsonl records it as null "
                            "(said once per metric)", record.get("round"), name, value)
        with open(self.path, "a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self._tb is not None:
            step = record["round"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "round":
                    self._tb.add_scalar(k, v, step)
            for i, acc in enumerate(record.get("acc_per_exit") or []):
                self._tb.add_scalar(f"acc/exit{i + 1}", acc, step)

    def close(self) -> None:
        """Close the TensorBoard writer (the JSONL file is closed after every record)."""
        if self._tb is not None:
            self._tb.close()


def read_rounds(run_dir: str | os.PathLike, before: int | None = None) -> list[dict[str, Any]]:
    """A run's ``metrics.jsonl`` as one record per round, ascending, for readers of a run that
    may be damaged or still training (tables, plots): a line that is no JSON object with an
    integer ``round`` (torn by a kill, or damaged bytes) is passed over; later lines win (a
    resumed run rewrites the rounds it redoes). With ``before`` only the rounds before it: a
    finished run's summary's rounds, or an evaluated checkpoint's, whose rows are the model's
    own (rows past them are a killed ``--resume force`` attempt's, which the next train drops,
    or a live run's newer ones). [] without the file."""
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text(errors="replace").splitlines()
    except OSError:
        return []
    records: dict[int, dict[str, Any]] = {}
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and type(rec.get("round")) is int and (before is None or rec["round"] < before):
            records[rec["round"]] = rec
    return [records[r] for r in sorted(records)]


@dataclass(frozen=True)
class RunStanding:
    """A run directory's results as they describe the run now (:func:`run_standing`)."""

    run_dir: Path
    #: summary.json while it describes the run's newest models (None: none, or one an extension went past)
    summary: dict[str, Any] | None
    #: the rows of rounds below it are the run's own (None: every row)
    rounds: int | None

    def rows(self) -> list[dict[str, Any]]:
        """The run's own ``metrics.jsonl`` records (:func:`read_rounds` up to :attr:`rounds`)."""
        return read_rounds(self.run_dir, self.rounds)


def run_standing(run_dir: str | os.PathLike) -> RunStanding:
    """What of a run directory's results is the run as it stands, for readers of runs that may
    be training or stopped (compare's report, the experiments' tables, scaling-report).

    A finished run's summary.json covers its rounds; rows past them are a ``--resume force``
    attempt's that has not checkpointed yet (killed, another config's, which the next train
    drops). Once such an extension has checkpointed (its newest checkpoint is of a round the
    summary does not cover, and config.yaml is the new config's), the run is unfinished until
    the extension writes its own summary: the old one describes models the run has gone past,
    and the rows up to that checkpoint are the run's. Of any run, rows past its newest record
    (summary or checkpoint) are a session's that a kill rolls back. The newest checkpoint is
    named, not verified (cheap on a run that is training). Of a run being moved aside
    (:func:`~cafedist.rundir.unfinished_move`) nothing stands: the next train starts over."""
    from cafedist.run.checkpoint import CheckpointDir
    from cafedist.rundir import unfinished_move

    run_dir = Path(run_dir)
    if unfinished_move(run_dir) is not None:
        return RunStanding(run_dir, None, 0)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    summary = summary if isinstance(summary, dict) else None
    covered = summary.get("rounds") if summary is not None and type(summary.get("rounds")) is int else None
    newest = CheckpointDir(run_dir).newest_round()
    if newest is not None and (covered is None or newest >= covered):
        # no summary, or an extension's checkpoint past it
        return RunStanding(run_dir, summary if covered is None else None, newest + 1)
    return RunStanding(run_dir, summary, covered)


def _finite_or_null(value: Any, not_finite: list[tuple[str, float]], name: str = "") -> Any:
    """``value`` with every float that is not finite (nested in dicts and lists) as None:
    json.dumps would write it as NaN or Infinity, which is no JSON (jq and strict readers
    refuse the whole file). Each one replaced is added to ``not_finite`` as (its name, e.g.
    ``acc_per_exit[1]``, its value)."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        not_finite.append((name, value))
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v, not_finite, f"{name}.{k}" if name else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v, not_finite, f"{name}[{i}]") for i, v in enumerate(value)]
    return value


def session_starts(records: list[dict[str, Any]]) -> list[int]:
    """The first rounds of ``records``' training sessions, ascending: the first row's, and a
    row of another session than the one before (its ``session``: the lock record of the
    process that trained it) or, in rows written before train recorded that, on another world
    size or placement (a resume on other ranks)."""
    def who(row: dict[str, Any]) -> tuple[Any, ...]:
        return row.get("session"), row.get("world_size"), row.get("clients_per_rank")

    return [b["round"] for a, b in zip([None, *records], records) if a is None or who(a) != who(b)]
