"""Run outputs written by rank 0: ``metrics.jsonl`` (a line per round) and TensorBoard events."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from cafedist.fsutil import write_text_atomic

log = logging.getLogger("cafedist")


class MetricsLog:
    """Appends one JSON object per round; on resume drops rounds after the checkpoint."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
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
        with open(self.path, "a") as fh:
            fh.write(json.dumps(_finite_or_null(record)) + "\n")
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


def _finite_or_null(value: Any) -> Any:
    """``value`` with every float that is not finite (nested in dicts and lists) as None:
    json.dumps would write it as NaN or Infinity, which is no JSON (jq and strict readers
    refuse the whole file)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def session_starts(records: list[dict[str, Any]]) -> list[int]:
    """The first rounds of ``records``' training sessions, ascending: the first row's, and a
    row of another session than the one before (its ``session``: the lock record of the
    process that trained it) or, in rows written before train recorded that, on another world
    size or placement (a resume on other ranks)."""
    def who(row: dict[str, Any]) -> tuple[Any, ...]:
        return row.get("session"), row.get("world_size"), row.get("clients_per_rank")

    return [b["round"] for a, b in zip([None, *records], records) if a is None or who(a) != who(b)]
