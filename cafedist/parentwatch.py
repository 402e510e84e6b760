"""Ranks die with their launcher: a rank whose torchrun/srun/mpiexec parent is gone stops at once.

torchrun starts every worker in a session of its own, so killing the launcher's process group
(a Ctrl-C on a wrapper script, a job step's teardown) used to leave the workers training to
the end and writing checkpoints and a summary while the user already reran the command. A rank
started by a launcher therefore asks the kernel to SIGKILL it when its parent dies
(``prctl(PR_SET_PDEATHSIG)`` on Linux) and, where that is unavailable, a watchdog thread polls
the parent pid and ends the process with :data:`ORPHAN_EXIT_CODE`. Either way nothing more is
written: checkpoints are atomic, so the last committed one stays valid for a resume.

Only a process whose parent is a launcher is guarded (:func:`launcher_parent`): a plain
``cafedist train`` from a shell is never stopped this way. The module imports no torch, so the
command line arms the guard first thing, before the seconds that importing torch takes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
from typing import Callable, Mapping

log = logging.getLogger("cafedist")

#: exit status of a rank that lost its launcher (128 + SIGHUP, "the controlling process died")
ORPHAN_EXIT_CODE = 129

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# launcher -> environment variables it sets in the processes it starts itself (as their parent)
_LAUNCHER_VARS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("torchrun", ("TORCHELASTIC_RUN_ID",)),  # set by the elastic agent for each worker
    ("srun", ("SLURM_STEP_ID",)),  # a task of a job step: slurmstepd is the parent (not the batch script)
    ("mpiexec", ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")),
)


def launcher_parent(env: Mapping[str, str] = os.environ) -> str | None:
    """The launcher that is this process's parent, judged from ``env`` (None: not launched).

    A bare ``RANK``/``WORLD_SIZE`` is not enough (processes started by hand from a shell set
    those too), nor are Slurm job variables without a step (a plain ``python`` in a batch script).
    """
    for name, variables in _LAUNCHER_VARS:
        if any(v in env for v in variables):
            if name == "srun" and "SLURM_PROCID" not in env:
                continue
            return name
    return None


def set_parent_death_signal(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)`` (0 clears it); False where the OS has no such call."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _leave_orphaned(parent: int) -> None:
    print(f"cafedist: error: the launcher (parent pid {parent}) is gone: stopping this rank without "
          f"writing anything more", file=sys.stderr, flush=True)
    os._exit(ORPHAN_EXIT_CODE)  # no finally blocks, no checkpoint, no summary


class ParentWatch:
    """Watchdog thread: calls ``on_orphan(parent)`` once the parent pid is no longer ``parent``."""

    def __init__(self, parent: int, interval: float = 1.0, getppid: Callable[[], int] = os.getppid,
                 on_orphan: Callable[[int], None] = _leave_orphaned):
        self.parent, self.interval = parent, interval
        self._getppid, self._on_orphan = getppid, on_orphan
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cafedist-parent-watch", daemon=True)
        self.pdeathsig = False  # whether the kernel signal is armed as well

    def start(self) -> "ParentWatch":
        """Start watching in a daemon thread."""
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self._getppid() != self.parent:  # reparented: the parent died
                self._on_orphan(self.parent)
                return

    @property
    def stopped(self) -> bool:
        """Whether the watch was stopped (the parent is no longer watched)."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Stop watching (and disarm the parent-death signal this module armed)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.pdeathsig:
            set_parent_death_signal(0)
            self.pdeathsig = False


_active: ParentWatch | None = None


def guard_launched_rank(env: Mapping[str, str] = os.environ, interval: float = 1.0) -> ParentWatch | None:
    """Under a launcher: arm SIGKILL on parent death and start the watchdog; the caller stops it.

    None when there is no launcher parent, or when an earlier caller's guard is still active.
    """
    global _active
    launcher = launcher_parent(env)
    if launcher is None or (_active is not None and not _active.stopped):
        return None
    parent = os.getppid()
    watch = ParentWatch(parent, interval=interval)
    watch.pdeathsig = set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died while the signal was being armed
        _leave_orphaned(parent)
    log.debug("rank guarded against losing its launcher (%s, parent pid %d, pdeathsig %s)",
              launcher, parent, watch.pdeathsig)
    _active = watch.start()
    return _active
