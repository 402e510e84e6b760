"""Processes die with whoever started them: a launcher's rank, or a training that compare started.

torchrun starts every worker in a session of its own, so killing the launcher's process group
(a Ctrl-C on a wrapper script, a job step's teardown) used to leave the workers training to
the end and writing checkpoints and a summary while the user already reran the command. A rank
started by a launcher therefore asks the kernel to SIGKILL it when its parent dies
(``prctl(PR_SET_PDEATHSIG)`` on Linux) and, where that is unavailable, a watchdog thread polls
the parent pid and ends the process with :data:`ORPHAN_EXIT_CODE`. Either way nothing more is
written: checkpoints are atomic, so the last committed one stays valid for a resume.

A ``cafedist train`` that another cafedist process started (compare's trainings, a benchmark's
runs: :func:`cafedist.childenv.child_env` names the starter in :data:`PARENT_PID_VARIABLE`)
is stopped the gentle way instead: the watchdog sends it SIGTERM, so it writes a checkpoint at
the end of its round and exits as on any stop signal. A compare that was SIGKILLed (or
OOM-killed) used to leave its current training running, holding the run's lock against the
compare the user started next.

Only a process whose parent is a launcher (:func:`launcher_parent`) or its cafedist starter
(:func:`cafedist_parent`) is guarded: a plain ``cafedist train`` from a shell is never stopped
this way.
The module imports no torch, so the command line arms the guard first thing, before the
seconds that importing torch takes.
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

#: in the environment of a cafedist process that another one started: the starter's pid
PARENT_PID_VARIABLE = "CAFEDIST_PARENT_PID"

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


def cafedist_parent(env: Mapping[str, str] = os.environ) -> int | None:
    """The pid of the cafedist process that started this one (:data:`PARENT_PID_VARIABLE`):
    the parent, or a process gone already (it died before this one looked). None when there is
    none, or when it lives but is not the parent (the variable inherited by a grandchild)."""
    value = env.get(PARENT_PID_VARIABLE, "")
    if not value.isdigit():
        return None
    pid = int(value)
    if pid == os.getppid():
        return pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid
    except OSError:  # alive, another user's
        pass
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


def _stop_orphaned(parent: int) -> None:
    print(f"cafedist: the cafedist process that started this training (pid {parent}) is gone: "
          f"stopping at the end of this round", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # the stop signal: checkpoint, then exit


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


def guard_parent(env: Mapping[str, str] = os.environ, interval: float = 1.0) -> ParentWatch | None:
    """Arm the parent-death signal and start the watchdog; the caller stops it.

    Under a launcher: SIGKILL, nothing more written. Started by another cafedist process
    (:func:`cafedist_parent`): SIGTERM from the watchdog (within ``interval`` seconds), which
    ``train`` answers with a checkpoint. None when the parent is neither, or when an earlier
    caller's guard is still active.
    """
    global _active
    launcher, starter = launcher_parent(env), cafedist_parent(env)
    if launcher is not None:
        on_orphan, what, parent = _leave_orphaned, launcher, os.getppid()
    elif starter is not None:
        on_orphan, what, parent = _stop_orphaned, "cafedist", starter
    else:
        return None
    if _active is not None and not _active.stopped:
        return None
    watch = ParentWatch(parent, interval=interval, on_orphan=on_orphan)
    # the kernel's signal for a rank only: a stop that is gentle anyway can wait a poll, and the
    # watchdog says in the training's log why it stopped
    watch.pdeathsig = launcher is not None and set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died already (while the signal was being armed)
        on_orphan(parent)
    log.debug("guarded against losing its parent (%s, pid %d, pdeathsig %s)", what, parent, watch.pdeathsig)
    _active = watch.start()
    return _active
