"""Stop signals (SIGTERM, SIGUSR1 from Slurm's ``--signal=USR1@N``) -> checkpoint and requeue.

A handler only sets a flag; the round loop checks it at the end of every round on every rank
(an all-reduce, so all ranks agree), writes a checkpoint and exits with
:data:`REQUEUE_EXIT_CODE`; after every other checkpoint it checks again, so a signal that came
while that checkpoint was written stops the run right after it. The sbatch templates requeue
the job on that code.
"""

from __future__ import annotations

import signal
import threading

#: exit status meaning "checkpoint written, please requeue me" (EX_TEMPFAIL from sysexits.h)
REQUEUE_EXIT_CODE = 75

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Set when a stop signal arrives; install with :meth:`install` in the main thread."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        self.signum = signum

    @property
    def requested(self) -> bool:
        """Whether a stop signal has arrived."""
        return self.signum is not None

    def install(self) -> "StopFlag":
        """Catch the stop signals (only the main thread may; elsewhere this does nothing)."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        """Give the stop signals their previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
