"""Deferring fatal signals to safe points, so that an interrupted write can clean up after itself.

Python raises KeyboardInterrupt for Ctrl-C wherever the interpreter happens to be — also
inside a weakref callback of h5py, where it is printed as "Exception ignored" and lost (the
command then finishes as if nothing happened) — and SIGTERM, the signal of ``kill``,
``timeout`` and Slurm, ends the process at once, leaving a half-written temporary file
behind. Inside :func:`deferred_interrupts` both are recorded instead and raised as
:class:`Interrupted` at the next ``check()`` and at the end of the block, where the code
around can remove what it was writing. :func:`noticed_interrupts` (around every command)
catches a Ctrl-C that Python lost and, for the commands but train, turns SIGTERM and SIGUSR1
into an exception like Ctrl-C's; :func:`children_take_ctrl_c` gives child processes a working
SIGINT; and :func:`forget_handled_interrupt` and :func:`keep_status_through_teardown` keep a
handled interrupt, or one during the interpreter's teardown, from ending the process by the
signal rather than with the command's exit status.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import threading
from typing import Callable, Iterator

#: the signals deferred, when they would otherwise end the process (their default handling):
#: Ctrl-C, and the stop signals of ``kill``, ``timeout`` and Slurm (``--signal=USR1@N``)
FATAL_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class Interrupted(KeyboardInterrupt):
    """A deferred SIGINT or SIGTERM, raised at a safe point; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _in_main_thread() -> bool:
    # signal handlers can be set (and run) only in the main thread
    return threading.current_thread() is threading.main_thread()


_noticed: list[int] = []  # the signals received under noticed_interrupts()


def _raise_interrupt(signum: int, frame: object) -> None:  # noqa: ARG001 - signal API
    _noticed.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(signum)


def _is_default(handler: object) -> bool:
    # SIGINT's default in Python is default_int_handler (KeyboardInterrupt); SIGTERM's SIG_DFL.
    # A handler installed by someone else (train's stop flag) is theirs: left alone.
    return handler in (signal.SIG_DFL, signal.default_int_handler, _raise_interrupt)


@contextlib.contextmanager
def noticed_interrupts(stop_signals: bool = False) -> Iterator[Callable[[], int | None]]:
    """Ctrl-C raises KeyboardInterrupt as always, and with ``stop_signals`` SIGTERM and SIGUSR1,
    which would end the process on the spot (leaving the temporary files of the outputs being
    written, e.g. eval's, or compare's trainings running), raise :class:`Interrupted` likewise,
    so that what is being written is cleaned up and what was started is stopped;
    both are also remembered: the yielded function returns the first one's number (None: none
    arrived), so a command whose KeyboardInterrupt Python lost (raised inside a callback and
    printed as "Exception ignored") can still end as interrupted. Main thread only, and only
    for a signal at its default handling."""
    _noticed.clear()
    defaults = {signal.SIGINT: signal.default_int_handler,
                **({signal.SIGTERM: signal.SIG_DFL, signal.SIGUSR1: signal.SIG_DFL} if stop_signals else {})}
    installed = [sig for sig, default in defaults.items()
                 if _in_main_thread() and signal.getsignal(sig) is default]
    for sig in installed:
        signal.signal(sig, _raise_interrupt)
    try:
        yield lambda: _noticed[0] if _noticed else None
    finally:
        for sig in installed:
            signal.signal(sig, defaults[sig])
        _noticed.clear()


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[Callable[[], None]]:
    """Record SIGINT/SIGTERM/SIGUSR1 (where they would end the process) until the block's next
    ``check()`` or its end, which raise :class:`Interrupted`, also when the block ends by
    another exception (chained to it). Outside the main thread signals cannot be handled: the
    block then defers nothing."""
    pending: list[int] = []

    def check() -> None:
        if pending:
            raise Interrupted(pending[0])

    if not _in_main_thread():
        yield check
        return
    previous = {sig: signal.getsignal(sig) for sig in FATAL_SIGNALS}
    for sig, handler in previous.items():
        if _is_default(handler):
            signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield check
    except Exception as exc:
        # a signal recorded while the block failed (a full disk amid a commit) is not dropped:
        # a caller that reports the failure and goes on (compare's runs) would ignore the Ctrl-C
        if pending:
            raise Interrupted(pending[0]) from exc
        raise
    finally:
        for sig, handler in previous.items():
            if _is_default(handler):
                signal.signal(sig, handler)
    check()


@contextlib.contextmanager
def children_take_ctrl_c() -> Iterator[None]:
    """Processes started inside the block get SIGINT at its default. A command started in the
    background of a script has SIGINT ignored, and its children inherit that: submitit's local
    executor would then ignore the SIGINT by which it cancels a job and leave it training."""
    ignored = _in_main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # reset to SIG_DFL in an exec'd child
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def forget_handled_interrupt() -> None:
    """Tell CPython that the KeyboardInterrupt just caught was handled.

    CPython marks a KeyboardInterrupt as unhandled when it ends code run from source text
    (``exec``/``eval`` of a string: dataclasses and namedtuple make their methods so, and
    modules with dataclasses are imported in the middle of a command, torch's by torch.export)
    even when a caller catches it later; under ``python -m`` the interpreter then ends by
    SIGINT a process that exits with 130 (seen from subprocess: -2). The mark is cleared at the
    start of every run of source text, as here."""
    exec("", {})


def _ignore_fatal_signals() -> None:
    if _in_main_thread():
        for sig in FATAL_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def keep_status_through_teardown() -> None:
    """Ignore SIGINT, SIGTERM and SIGUSR1 from the end of the exit handlers to the end of the
    process, so that its exit status is the command's. The interpreter's teardown after them
    (a second or more once torch is loaded) runs with every signal at its default action: a
    Ctrl-C there ended a command that had finished, or had been interrupted and cleaned up, by
    SIGINT. Exit handlers run last-registered first, so call this early: the joining of
    threads and the handlers registered later (torch's) come before it and can still be
    interrupted should they hang. For the process's entry point only."""
    atexit.register(_ignore_fatal_signals)


__all__ = ["FATAL_SIGNALS", "Interrupted", "children_take_ctrl_c", "deferred_interrupts", "forget_handled_interrupt",
           "keep_status_through_teardown", "noticed_interrupts"]
