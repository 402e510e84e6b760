"""Running planned runs: local subprocesses (``--jobs`` at a time, stopped together on Ctrl-C or
SIGTERM) or submitit jobs (``--submit``, through :mod:`cafedist.submit` and :mod:`cafedist.jobs`)."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from cafedist import trainlog
from cafedist.childenv import child_env
from cafedist.compare.plan import PlannedRun
from cafedist.jobs import ExecutorOptions

log = logging.getLogger("cafedist")



# ----------------------------------------------------------------------------- running
#: "stopped": the training ended unfinished but resumable (a signal; compare's rerun resumes it)
Status = Literal["done", "skipped", "failed", "stopped"]


@dataclass
class RunOutcome:
    """How one planned run ended in this invocation."""

    run: PlannedRun
    status: Status
    message: str = ""
    seconds: float = 0.0


def _child_env(jobs: int) -> dict[str, str]:
    env = child_env()
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        # concurrent runs would each start one thread per core: share the cores instead
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


class _Children:
    """The training subprocesses running now, so that stopping compare stops them too: an
    orphaned run would go on writing into a directory the next compare may start again."""

    def __init__(self) -> None:
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def run(self, cmd: list[str], **kwargs: Any) -> int:
        """Start ``cmd`` and wait for it (refused once :meth:`stop_all` was called)."""
        with self._lock:
            if self._stopping:
                raise RuntimeError("compare is stopping: run not started")
            proc = subprocess.Popen(cmd, **kwargs)
            self._procs.add(proc)
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._procs.discard(proc)

    def stop_all(self) -> None:
        """SIGTERM every child (``train`` writes a checkpoint and exits) and wait for them."""
        with self._lock:
            self._stopping = True
            procs = list(self._procs)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop_all` was called (and no :meth:`reopen` since)."""
        return self._stopping

    def reopen(self) -> None:
        """Start runs again: a later compare in this process (Python callers, notebooks) is a
        new one, not the stopped one."""
        with self._lock:
            self._stopping = False


_CHILDREN = _Children()


def run_subprocess(run: PlannedRun, jobs: int = 1) -> RunOutcome:
    """``python -m cafedist train ...`` for ``run``; output appended to ``RUN_DIR/train.log``."""
    cmd = [sys.executable, "-m", "cafedist", *run.train_argv()]
    run.run_dir.mkdir(parents=True, exist_ok=True)
    logfile = run.run_dir / trainlog.NAME
    t0 = time.perf_counter()
    with open(logfile, "a") as fh:
        fh.write(trainlog.session_header(shlex.join(cmd)))
        fh.flush()
        start = fh.tell()  # this session's output follows: an earlier session's error is not its
        code = _CHILDREN.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_child_env(jobs),
                             stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    # its summary is written last: a train stopped after that (compare interrupted while the
    # child exits) finished its run, which a rerun also counts as done
    if run.finished_summary() is not None:
        return RunOutcome(run, "done", seconds=seconds)
    if _stopped(code):
        return RunOutcome(run, "stopped", _stopped_message(run), seconds)
    changed = run.config_changed()  # edited after the check before the start
    if changed is not None and code == 0:  # it finished, but not this run: it read the edit
        return RunOutcome(run, "failed", f"{_with_edit(None, changed)} (log: {logfile})", seconds)
    why = _signal_name(-code) if code < 0 else f"exit status {code}" if code else "no summary.json written"
    with open(logfile, "rb") as fh:
        fh.seek(max(start, fh.seek(0, os.SEEK_END) - 20000))
        tail = fh.read().decode(errors="replace")
    why = _with_edit(f"{why}: {trainlog.last_error(tail)}", changed)
    return RunOutcome(run, "failed", f"{why} (log: {logfile})", seconds)


def _with_edit(error: str | None, changed: str | None) -> str:
    """A failed run's line: its ``error`` (None: it ended without one), and ``changed``, the
    edit of its config file meanwhile (:meth:`PlannedRun.config_changed`), which a rerun must
    know of: without an error of its own, the run trained the edited config."""
    if changed is None:
        return error or "no summary.json written"
    if error is None:
        return f"{changed}; it trained the edited config"
    return f"{error}; {changed} (the training may have read the edit)"


def _signal_name(number: int) -> str:
    """``killed by SIGKILL`` for a child that signal ended (Popen's return code is its negative)."""
    try:
        return f"killed by {signal.Signals(number).name}"
    except ValueError:
        return f"killed by signal {number}"


def _stopped(code: int) -> bool:
    """Whether a train that exited with ``code`` was stopped rather than failed: it wrote its
    checkpoint and exited for a requeue (a stop signal), or compare itself is stopping and the
    child ended by a signal (its SIGTERM, or the terminal's Ctrl-C that reached both)."""
    from cafedist.train.signals import REQUEUE_EXIT_CODE

    interrupted = code < 0 or code > 128  # killed by a signal, or exited 128 + the signal
    return code == REQUEUE_EXIT_CODE or (_CHILDREN.stopping and interrupted)


def _stopped_message(run: PlannedRun) -> str:
    """A stopped run's state in the words of ``cafedist status`` (where a resume continues)."""
    from cafedist.status import stopped_state

    state = stopped_state(run.run_dir)
    return state if state.startswith("stopped") else f"stopped ({state})"


def run_submitit(runs: Sequence[PlannedRun], options: ExecutorOptions, folder: Path,
                 jobs: int | None = None) -> list[RunOutcome]:
    """Submit the runs as jobs through :mod:`cafedist.submit` and wait for them.

    Slurm: one job array, at most ``jobs`` elements at once (None: no limit). Local: waves of
    ``jobs`` (default 1) jobs, since the local executor starts everything it is given at once.
    The jobs' files go to a fresh ``<timestamp>-<pid>`` folder under ``folder`` (OUT/submitit).
    """
    from cafedist import submit
    from cafedist.interrupts import children_take_ctrl_c
    from cafedist.jobs import cancel_local_jobs, wait_for

    options = replace(options, job_name=options.job_name or "cafedist-compare",
                      array_parallelism=None if options.local else jobs)
    # a folder of this compare's own under OUT/submitit: an earlier compare's job of the same id
    # left its result file in OUT/submitit/<id>, which would end this job's wait at once
    owned, folder = folder, submit.fresh_folder(folder)
    executor = options.executor(folder / "%j", folder)
    env = {"OMP_NUM_THREADS": str(options.cpus_per_task)}
    specs = [submit.RunSpec(r.config, str(r.run_dir), r.overrides, label=r.label) for r in runs]
    wave = (jobs or 1) if options.local else len(specs)
    outcomes: list[RunOutcome] = []
    for start in range(0, len(specs), wave):
        part, part_runs = specs[start:start + wave], list(runs[start:start + wave])
        t0 = time.perf_counter()
        with children_take_ctrl_c():
            submitted = submit.submit_runs(executor, part, folder, env, owned=owned)
        for job, run in zip(submitted, part_runs):
            log.info("compare: %s submitted as job %s (logs: %s)", run.label, job.job_id, job.paths.stderr.parent)
        try:
            results = wait_for(submitted, part)
        except BaseException:  # Ctrl-C or SIGTERM: local jobs are our children and stop with us
            cancel_local_jobs(submitted)
            raise
        for res, run in zip(results, part_runs):
            seconds = time.perf_counter() - t0
            if run.finished_summary() is not None:  # as run_subprocess: the summary decides
                outcomes.append(RunOutcome(run, "done", seconds=seconds))
            elif res.stopped:  # checkpoint written, not requeued (scancel): resumable, as run_subprocess's 75
                outcomes.append(RunOutcome(run, "stopped", f"{_stopped_message(run)} (job {res.job_id})", seconds))
            else:
                msg = f"{_with_edit(res.error, run.config_changed())} (job {res.job_id})"
                outcomes.append(RunOutcome(run, "failed", msg, seconds))
    return outcomes


def execute(runs: Sequence[PlannedRun], jobs: int | None = None, submit: ExecutorOptions | None = None,
            submit_folder: Path | None = None,
            runner: Callable[[PlannedRun, int], RunOutcome] = run_subprocess) -> list[RunOutcome]:
    """Run what is not finished yet, ``jobs`` at a time (default: 1 locally, no limit on Slurm);
    returns one outcome per run, in plan order. ``runner`` runs one plan locally."""
    outcomes: dict[int, RunOutcome] = {}
    todo = []
    for i, run in enumerate(runs):
        if run.finished_summary() is not None:
            outcomes[i] = RunOutcome(run, "skipped", "finished earlier with the same config")
            log.info("compare: [%d/%d] %s: skipped (finished, summary.json matches the config)",
                     i + 1, len(runs), run.label)
        else:
            why = run.outdated()
            if why is not None:
                log.warning("compare: [%d/%d] %s: %s: moved aside to previous-<time>/ and trained again",
                            i + 1, len(runs), run.label, why)
            todo.append(i)
    if todo and submit is not None:
        for i in todo:
            _refuse_unstartable(runs, i, outcomes)
        todo = [i for i in todo if i not in outcomes]
        folder = submit_folder or runs[0].run_dir.parents[2] / "submitit"
        for i, res in zip(todo, run_submitit([runs[i] for i in todo], submit, folder, jobs) if todo else ()):
            outcomes[i] = res
            _log_outcome(i, len(runs), res)
    elif todo:
        jobs = jobs or 1

        def one(i: int) -> None:
            if _refuse_unstartable(runs, i, outcomes):
                return
            log.info("compare: [%d/%d] %s: running", i + 1, len(runs), runs[i].label)
            outcomes[i] = runner(runs[i], jobs)
            _log_outcome(i, len(runs), outcomes[i])

        pool = ThreadPoolExecutor(max_workers=jobs)
        try:
            list(pool.map(one, todo))
        except BaseException:  # Ctrl-C or SIGTERM: start nothing more, stop what runs (it checkpoints)
            pool.shutdown(wait=False, cancel_futures=True)
            _CHILDREN.stop_all()
            raise
        finally:
            pool.shutdown(wait=True)
            _CHILDREN.reopen()  # every thread of this compare has ended
    return [outcomes[i] for i in range(len(runs))]


def _refuse_unstartable(runs: Sequence[PlannedRun], i: int, outcomes: dict[int, RunOutcome]) -> bool:
    """Fail run ``i`` unstarted when its config file was edited since compare planned it (a
    training reads the file as it is then: it would train another config under this run's row),
    or when its directory holds a run it may not continue (``train`` would refuse it with
    advice for ``--resume``, which compare has no flag for)."""
    why = runs[i].config_changed()
    if why is not None:
        message = (f"{why}; not started: restore the file and rerun compare to finish this comparison (the "
                   f"edited config needs another --out)")
    else:
        held = runs[i].held_by_another()
        if held is None:
            return False
        message = (f"{held}; not started: compare continues only runs of its own config, so use another --out, or "
                   f"move that folder away and rerun compare")
    outcomes[i] = RunOutcome(runs[i], "failed", message)
    _log_outcome(i, len(runs), outcomes[i])
    return True


def _log_outcome(i: int, total: int, res: RunOutcome) -> None:
    if res.status == "failed":
        log.error("compare: [%d/%d] %s: FAILED: %s", i + 1, total, res.run.label, res.message)
    elif res.status == "stopped":  # resumable: no failure
        log.warning("compare: [%d/%d] %s: %s", i + 1, total, res.run.label, res.message)
    else:
        log.info("compare: [%d/%d] %s: done in %.1f s", i + 1, total, res.run.label, res.seconds)
