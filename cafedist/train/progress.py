"""A dependency-free progress line for rank 0: rounds done, last accuracy, ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from cafedist.units import hms


class Progress:
    """Prints ``round 7/20 [#######.............] last-exit acc 0.912  eta 0:01:05``."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream: TextIO | None = None):
        # sys.stderr of now, not of import time: it may have been replaced since (a closed one raises)
        stream = sys.stderr if stream is None else stream
        self.total, self.start, self.enabled, self.stream = total, start, enabled, stream
        self.t0 = time.perf_counter()
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()

    def update(self, done: int, info: str = "") -> None:
        """Show ``done`` of the total rounds finished, with ``info`` after the bar."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        width = 20
        filled = int(width * done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = (f"round {done}/{self.total} [{bar}] {info}  "
                f"elapsed {hms(elapsed)} eta {hms(eta)}")
        end = "" if self.tty and done < self.total else "\n"
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()
