"""``RUN_DIR/train.log``: the output of the trainings ``cafedist compare`` starts, appended one
session after another, each after a header line (:func:`session_header`)."""

from __future__ import annotations

import time
from pathlib import Path

NAME = "train.log"
_HEADER = "=== "


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


__all__ = ["NAME", "last_error", "last_session_error", "session_header"]
