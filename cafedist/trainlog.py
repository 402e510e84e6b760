"""``RUN_DIR/train.log``: the output of the trainings ``cafedist compare`` starts, appended one
session after another, each after a header line (:func:`session_header`)."""

from __future__ import annotations

import re
import time
from pathlib import Path

NAME = "train.log"
_HEADER = "=== "
#: the line train logs when it resumes (:func:`cafedist.run.checkpoint.load_checkpoint`)
_RESUMED = re.compile(r"\bresumed from .* \(round (\d+), written by ")


def session_header(command: str) -> str:
    """The line that starts a session: its time and command."""
    return f"{_HEADER}{time.strftime('%Y-%m-%d %H:%M:%S')} {command}\n"


def last_error(text: str) -> str:
    """The line of a train log that says what went wrong (its last error line, else its last line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("cafedist: error:") or "Error" in ln.split(":")[0]]
    return (errors or lines or ["(no output)"])[-1]


def last_session_error(run_dir: Path) -> str | None:
    """The ``cafedist: error:`` line that ended the log's last session, if one did (None: no
    log, or its last session reported no error)."""
    try:
        text = (run_dir / NAME).read_text(errors="replace")
    except OSError:
        return None
    session = text[text.rfind(_HEADER):] if _HEADER in text else text
    errors = [ln.strip() for ln in session.splitlines() if ln.startswith("cafedist: error:")]
    return errors[-1] if errors else None


def resumed_rounds(run_dir: Path) -> list[int]:
    """The round each resume the log records continued after, in the log's order (none
    without a log, or for sessions that started afresh)."""
    try:
        text = (run_dir / NAME).read_text(errors="replace")
    except OSError:
        return []
    return [int(m.group(1)) for m in _RESUMED.finditer(text)]


__all__ = ["NAME", "last_error", "last_session_error", "resumed_rounds", "session_header"]
