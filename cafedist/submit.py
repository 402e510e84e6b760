"""``cafedist submit``: run ``cafedist train`` as a Slurm job (or a job array) through submitit.

::

    cafedist submit --config my.yaml --out runs/my --nodes 2 --tasks-per-node 4 --gpus-per-node 4
    cafedist submit --config my.yaml --out runs/seeds --array seed=0,1,2 --time 4:00:00
    cafedist submit --config my.yaml --out runs/my --local --tasks-per-node 2 --wait   # no Slurm

Every task of the job runs the trainer in-process (``cafedist.cli.main(["train", ...])``) with
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` exported by submitit's
``TorchDistributedEnvironment``, so the same code path serves Slurm and the local executor.
They train the config as submitted (:class:`ConfigCopy`), not the file as edited since.

Preemption: the job's callable is a :class:`submitit.helpers.Checkpointable`. submitit's
preemption/time-limit signal (SIGUSR2, ``--signal-delay`` seconds before the end) is forwarded to
the trainer as SIGUSR1, so every rank finishes its round, writes a checkpoint and returns
:data:`~cafedist.train.signals.REQUEUE_EXIT_CODE`; rank 0 then hands over to submitit's own
handler, which pickles :meth:`TrainTask.checkpoint` (the same run with ``--resume auto``, or
``force`` after ``force``) and runs ``scontrol requeue``. The requeued job resumes from the
checkpoint. SIGTERM (e.g. Slurm preemption with GraceTime) also makes the trainer checkpoint;
the job is requeued only while Slurm still reports it RUNNING, never after ``scancel``. A job
that Slurm requeues itself (an outside ``scontrol requeue``, preemption in requeue mode, a node
failure) restarts from its first pickle: it resumes too (``SLURM_RESTART_COUNT``), and its
stopped attempt leaves no result file, so that ``--wait`` goes on waiting for the restart. A
``--resume none`` stopped before the trainer moved the earlier run aside starts over when
restarted, either way (the job's token in the run directory: :meth:`TrainTask._slurm_start`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from cafedist import yamlio
from cafedist.errors import CafeError, ConfigError
from cafedist.fsutil import atomic_output, exclusive_lock
from cafedist.interrupts import children_take_ctrl_c
from cafedist.jobs import (
    CANCELLED_MARKER,
    ExecutorOptions,
    JobOutcome,
    add_resource_arguments,
    cancel_local_jobs,
    ensure_importable_in_jobs,
    key_values,
    require_submitit,
    wait_for,
)
from cafedist.paths import check_dir_creatable, config_file_arg, user_path

try:  # only submitting needs submitit; the CLI imports this module for its flags everywhere
    import submitit
    from submitit.helpers import Checkpointable, DelayedSubmission, TorchDistributedEnvironment
except ImportError:  # then main() stops at require_submitit() before a TrainTask is made
    submitit = None
    Checkpointable = object
from cafedist.train.signals import REQUEUE_EXIT_CODE  # light module: no torch at submit time

log = logging.getLogger("cafedist")


class _ErrorLineTee(io.TextIOBase):
    """Passes writes on to ``stream`` and keeps the last ``cafedist: error:`` line among them."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self._stream = stream
        self.error_line: str | None = None

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.startswith("cafedist: error:"):
                self.error_line = line
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()


class JobStopped(RuntimeError):
    """A job stopped on a signal with a checkpoint written, but will not be requeued."""


# ----------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class RunSpec:
    """One ``cafedist train`` invocation: what a job (or one array element) runs."""

    config: str | None
    out: str
    overrides: tuple[str, ...] = ()
    resume: str = "auto"
    label: str = ""  # array element name, e.g. "seed-1" (empty for a single run)

    def train_argv(self) -> list[str]:
        """Arguments of ``cafedist`` (the ``train`` subcommand and its options)."""
        argv = ["train", "--out", self.out, "--resume", self.resume, "--no-progress"]
        if self.config:
            argv[1:1] = ["--config", self.config]
        return argv + list(self.overrides)

    def resumed(self) -> "RunSpec":
        """The same run, resuming: what a requeued job must run. Never ``--resume none`` (it
        would start over again); ``force`` stays: a job stopped before its first checkpoint under
        the new config finds the run's old config.yaml, which ``auto`` refuses."""
        return replace(self, resume="force" if self.resume == "force" else "auto")


def parse_array(texts: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["seed=0,1,2", "train.lr=0.1,0.05"]`` -> ``[("seed", ["0","1","2"]), ...]``."""
    axes = []
    for text in texts:
        key, sep, values = text.partition("=")
        items = [v.strip() for v in values.split(",")]
        if not sep or not key.strip() or not all(items):
            raise ConfigError(f"--array {text!r}: expected KEY=V1,V2,... with a dotted config key, "
                              "e.g. seed=0,1,2 or train.lr=0.1,0.05")
        parsed = [_value(text, item) for item in items]
        twice = next((items[i] for i, v in enumerate(parsed) if v in parsed[:i]), None)
        if twice is not None:
            raise ConfigError(f"--array {text!r}: value {twice} is given twice (the same run would train twice)")
        axes.append((key.strip(), items))
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--array: key given twice in {keys}: list all its values in one --array")
    return axes


def _value(text: str, item: str) -> object:
    """An array value as the override will read it (``01`` and ``1`` are one seed)."""
    try:
        return yamlio.load(item)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--array {text!r}: value {item!r} is not valid YAML{yamlio.problem(exc)}") from None


def _label(pairs: Sequence[tuple[str, str]]) -> str:
    """Run directory name of an array element: ``seed-1_train.lr-0.1`` (file-name safe)."""
    return "_".join(re.sub(r"[^A-Za-z0-9._-]", "_", f"{k}-{v}") for k, v in pairs)


def build_runs(config: str | None, out: str, overrides: Sequence[str] = (), arrays: Sequence[str] = (),
               resume: str = "auto") -> list[RunSpec]:
    """The runs to submit: one, or the cartesian product of the ``--array`` axes.

    Array element ``k`` writes to ``out/<label>`` (e.g. ``runs/x/seed-1``) with the array
    values appended to ``overrides``. Paths are made absolute, since a job may start elsewhere.
    """
    cfg = str(Path(config).resolve()) if config else None
    base = Path(out).resolve()
    axes = parse_array(arrays)
    if not axes:
        return [RunSpec(cfg, str(base), tuple(overrides), resume)]
    runs = []
    for values in itertools.product(*(vals for _, vals in axes)):
        pairs = [(k, v) for (k, _), v in zip(axes, values)]
        label = _label(pairs)
        if any(run.label == label for run in runs):  # the label makes every odd character '_'
            raise ConfigError(f"--array: two elements would write to the same run directory {base / label} "
                              f"(values that differ only in characters a folder name cannot hold)")
        extra = tuple(f"{k}={v}" for k, v in pairs)
        runs.append(RunSpec(cfg, str(base / label), tuple(overrides) + extra, resume, label))
    return runs


@dataclass(frozen=True)
class ConfigCopy:
    """The ``--config`` file as submitted, kept in the submission's folder as
    ``config-<digest>.yaml``: the jobs read their config when they start, and one waiting in
    the queue, an array element or a requeued restart must train the config that was
    submitted, not the file as edited since (e.g. for the next experiment). Named by its
    content, so that submissions sharing a ``--folder`` never overwrite each other's."""

    path: Path
    data: bytes

    @classmethod
    def of(cls, config: str, folder: Path) -> ConfigCopy:
        """The copy of ``config`` (read now) that a submission into ``folder`` keeps."""
        data = Path(config).read_bytes()
        return cls(folder / f"config-{hashlib.sha256(data).hexdigest()[:16]}.yaml", data)

    def write(self) -> None:
        """Write the copy (one already there is this one: same name, same content)."""
        if not self.path.is_file():
            with atomic_output(self.path) as tmp:
                tmp.write_bytes(self.data)


def validate_runs(runs: Sequence[RunSpec], dependency: bool = False, local: bool = False) -> None:
    """What ``train`` checks before it touches a run directory, checked now for every run, so
    that a typo in the config, an ``--out`` holding another run or a dataset without its
    ``data.root`` fails here instead of in a queued job (read-only). A run that a train holds
    now is only warned about, unless the job waits for another (``dependency``): queueing the
    next job of a chain is legitimate, but one that starts first is refused by train (``local``:
    the local executor starts it at once)."""
    from cafedist.config import load_config
    from cafedist.rundir import live_holder
    from cafedist.train.preflight import check_paths, plan_run_dir

    for run in runs:
        try:
            cfg = load_config(run.config, list(run.overrides))
            check_paths(cfg, Path(run.out))
            plan_run_dir(cfg, Path(run.out), run.resume)
        except CafeError as exc:
            where = f" (array element {run.label})" if run.label else ""
            raise type(exc)(f"{exc}{where}") from None
        holder = None if dependency else live_holder(run.out)
        if holder:
            advice = ("wait for it to end" if local else
                      "to queue the next one, add --slurm-arg dependency=afterany:<its job id>")
            log.warning("%s is being trained now (%s): a job that starts before it ends is refused; %s",
                        run.out, holder, advice)


# ----------------------------------------------------------------------------- in the job
def _in_submitit_job() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def _preempt_signal() -> signal.Signals:
    """submitit's preemption/time-limit signal (``SUBMITIT_PREEMPT_SIGNAL``, default USR2)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return signal.Signals[f"SIG{name}"]


def _restart_count() -> int:
    """How often Slurm has restarted this job before this attempt (``SLURM_RESTART_COUNT``; 0 outside Slurm)."""
    text = os.environ.get("SLURM_RESTART_COUNT", "")
    return int(text) if text.isdigit() else 0


def _slurm_job_fate(job_id: str) -> str:
    """What Slurm is doing with the job whose step just stopped: ``"running"`` (not ending: ours
    to requeue), ``"requeued"`` (Slurm requeues it itself: an outside ``scontrol requeue``,
    preemption in requeue mode) or ``"ending"`` (scancel, time limit).

    Once Slurm ends or requeues a job it is COMPLETING either way; a requeue is told by its
    ``Restarts`` count, already one more than this attempt's ``SLURM_RESTART_COUNT``."""
    try:
        text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                              timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "running"  # cannot tell: let submitit try (a failed requeue is reported by it)
    state = re.search(r"JobState=(\w+)", text)
    if state is None or state.group(1) == "RUNNING":
        return "running"
    restarts = re.search(r"Restarts=(\d+)", text)
    return "requeued" if restarts and int(restarts.group(1)) > _restart_count() else "ending"


class TrainTask(Checkpointable):
    """The job's callable: ``cafedist train`` in every task; requeued with :meth:`RunSpec.resumed`.

    ``env``: environment variables set in the task before training (e.g. OMP_NUM_THREADS).
    """

    def __init__(self, env: dict[str, str] | None = None):
        self.env = dict(env or {})
        self.starts = 1  # how often this job has been started: the requeued task counts one more

    def __call__(self, run: RunSpec) -> dict[str, Any]:
        """Run ``cafedist train`` for ``run`` in this task; returns ``{"out", "rank", "summary"}``.

        Raises :class:`JobStopped` if the trainer stopped on a signal and the job is not to be
        requeued (cancelled), ``RuntimeError`` if it failed; after a stop signal on a job that
        can be requeued, hands over to submitit's requeue (which exits this process). A job
        that Slurm restarted resumes (``force`` after ``force``, else ``auto``) once it has
        started its run over (:meth:`_slurm_start`).
        """
        from cafedist.cli import main as cafedist_main
        from cafedist.distributed.runtime import slurm_job_port

        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            run = self._slurm_start(run)
        os.environ.update(self.env)
        if "OMP_NUM_THREADS" in self.env and "torch" in sys.modules:
            import torch  # already imported: the variable alone would come too late

            torch.set_num_threads(int(self.env["OMP_NUM_THREADS"]))
        rank = 0
        if _in_submitit_job():
            if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and _restart_count() > 0 \
                    and "MASTER_PORT" not in os.environ:
                # submitit derives the port from the job id alone: a restart would meet its own
                # earlier start's store, still held by a process of it that is exiting
                os.environ["MASTER_PORT"] = str(slurm_job_port(int(os.environ["SLURM_JOB_ID"]), _restart_count()))
            # RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*: our runtime then sees an env:// launch, on
            # Slurm and in the local executor alike.
            rank = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True).rank
        preempt, previous = self._forward_preemption()
        stderr = _ErrorLineTee(sys.stderr)
        try:
            with contextlib.redirect_stderr(stderr):
                rc = cafedist_main(run.train_argv())
        finally:
            if preempt is not None:
                signal.signal(preempt, previous)
        if rc == REQUEUE_EXIT_CODE:
            self._requeue(run)
        if rc != 0:  # the error line travels in the exception, which is what the submitting side sees
            raise RuntimeError(f"cafedist train exited with status {rc} for {run.out}: "
                               f"{stderr.error_line or 'see the job stderr log'}")
        summary = None
        if rank == 0:
            path = Path(run.out) / "summary.json"
            summary = json.loads(path.read_text()) if path.is_file() else None
        return {"out": run.out, "rank": rank, "summary": summary}

    @staticmethod
    def _slurm_start(run: RunSpec) -> RunSpec:
        """What this start of a Slurm job runs. A restart (from the first pickle: an outside
        requeue, preemption in requeue mode, a node failure; or from :meth:`checkpoint`'s)
        continues, never starts over, the run this job began; but a ``--resume none`` stopped
        before it moved the earlier run aside starts over still: the run directory does not
        hold this job's token (:func:`cafedist.rundir.started_by_this_job`)."""
        from cafedist.rundir import started_by_this_job

        if _restart_count() > 0 and (run.resume != "none" or started_by_this_job(run.out)):
            return run.resumed()
        return run

    def checkpoint(self, run: RunSpec) -> DelayedSubmission:  # type: ignore[override]
        """Called by submitit on preemption/time-out: resubmit the same run, resuming once the
        trainer has carried out its run-directory plan in this process. Before that (a signal
        while the job was still starting) nothing was moved aside, so ``--resume none`` stays:
        ``auto`` would have continued the earlier run the user asked to start over."""
        from cafedist.train.startup import prepared_here

        again = copy.copy(self)
        again.starts = getattr(self, "starts", 1) + 1  # a pickle of a version before the count: 1
        return DelayedSubmission(again, run.resumed() if prepared_here(run.out) else run)

    # ----------------------------------------------------------------- signals
    @staticmethod
    def _forward_preemption() -> tuple[signal.Signals | None, Any]:
        """While training, turn submitit's preemption signal into the trainer's SIGUSR1."""
        if threading.current_thread() is not threading.main_thread():
            return None, None
        preempt = _preempt_signal()
        if preempt in (signal.SIGUSR1, signal.SIGTERM):
            return None, None  # the trainer handles these itself
        previous = signal.getsignal(preempt)

        def forward(signum: int, frame: Any) -> None:
            if callable(signal.getsignal(signal.SIGUSR1)):
                # The trainer's stop flag is installed: finish the round and checkpoint.
                signal.raise_signal(signal.SIGUSR1)
            elif callable(previous):
                # Training has not started (or is over): nothing to save, requeue right away.
                previous(signum, frame)

        signal.signal(preempt, forward)
        return preempt, previous

    def _requeue(self, run: RunSpec) -> None:
        """After exit code 75: requeue through submitit (rank 0), or stop this task."""
        if not _in_submitit_job():
            raise JobStopped(f"stopped by a signal, checkpoint written in {run.out} (not a submitit job: "
                             "nothing to requeue; rerun the same command to resume)")
        env = submitit.JobEnvironment()
        if env.cluster == "local" and (Path(env.paths.folder) / CANCELLED_MARKER).exists():
            raise JobStopped(f"stopped with the submitting command, checkpoint written in {run.out} "
                             "(submit the same command again to resume)")
        if env.cluster == "local" and getattr(self, "starts", 1) >= LOCAL_STARTS:
            # the local executor would not start it again: the job would end without a result
            raise JobStopped(f"stopped at its time limit (--time), checkpoint written in {run.out}; submitit's local "
                             f"executor starts a job at most {LOCAL_STARTS} times, so it is not requeued (submit the "
                             "same command again to resume; a longer --time restarts it less often)")
        fate = _slurm_job_fate(env.job_id) if env.cluster == "slurm" else "running"
        if fate == "requeued":
            # No result file: it would say this job ended, while its restart trains on
            # (`submit --wait` would report it failed). The restart resumes from the checkpoint.
            log.warning("stopped by a signal, checkpoint written in %s; Slurm is requeueing job %s, whose restart "
                        "resumes from it", run.out, env.job_id)
            raise SystemExit(REQUEUE_EXIT_CODE)
        if fate == "ending":
            raise JobStopped(f"stopped by a signal, checkpoint written in {run.out}; job {env.job_id} is being "
                             "cancelled or ended by Slurm, so it is not requeued (resubmit the same command to resume)")
        preempt = _preempt_signal()
        handler = signal.getsignal(preempt)  # submitit's again, restored after training
        if env.global_rank == 0 and callable(handler):
            # submitit's handler: pickles self.checkpoint(run), requeues, and exits the process.
            handler(preempt, None)
        # Other ranks: leave without a result file; the requeued job writes the real one.
        raise SystemExit(REQUEUE_EXIT_CODE)


def submit_runs(executor: Any, runs: Sequence[RunSpec], folder: str | Path, env: dict[str, str] | None = None,
                as_array: bool | None = None, owned: str | Path | None = None,
                config_copy: ConfigCopy | None = None) -> list[Any]:
    """Submit ``runs`` (a job array when there are several, or ``as_array``); returns submitit jobs.

    ``folder`` is the executor's (pickles and logs); ``owned`` the folder of this command that
    holds it (its ``--out``; default ``folder`` itself); ``config_copy``: the copy of the config
    that ``runs`` name, written into ``folder`` first. A submission the scheduler refuses (no
    controller, a bad partition, ...) is one CafeError line, and when no job was queued the
    attempt's files go again: the folders it created from ``owned`` down to ``folder``, or in
    an existing ``folder`` the temporary files submitit added (``.submission_file_*``,
    ``*.pkl``) and a config copy that was not there before, never another job's folder. An
    sbatch answer submitit cannot read, and anything else (Ctrl-C included), removes nothing:
    sbatch may have queued a job already."""
    task = TrainTask(env)
    ensure_importable_in_jobs()
    folder = Path(folder)
    # submissions take turns: what a refused attempt removes (the folders it made, the files
    # that appeared in the folder since it began) must be its own, not a concurrent one's. The
    # lock in the temporary directory orders those of a user on this host (also into different
    # folders under one new --out); the turn in the folder those from other hosts, users or
    # TMPDIRs; the thread lock those of this process, which POSIX locks do not tell apart
    with _THREADS, exclusive_lock(Path(tempfile.gettempdir()) / f"cafedist-submit-{os.getuid()}.lock",
                                  "another cafedist submission to finish"), \
            _turn_in(folder, Path(owned) if owned is not None else folder) as made:
        return _submit_attempt(executor, task, runs, folder, as_array, made, config_copy)


#: how often submitit's local executor starts a job (its controller's retries), whatever
#: ``--max-requeues`` allows
LOCAL_STARTS = 6

_THREADS = threading.Lock()
#: the lock file of a submission's turn in its folder, removed when the turn ends (one a killed
#: submission left is the next turn's to take)
TURN_LOCK = ".cafedist-submit.lock"


@contextlib.contextmanager
def _turn_in(folder: Path, owned: Path) -> Iterator[Path | None]:
    """This submission's turn in ``folder``: the folders from ``owned`` down to ``folder`` made
    (yields the highest one this call made, None when all were there) and the lock in
    ``folder`` held. The lock file goes at the end (a user's folder is left as it was); a
    submission that waited on a lock file that is no longer in place (gone at the end of a turn,
    or with the folder a refused attempt made) starts over."""
    lock = folder / TURN_LOCK
    while True:
        made = _make_folders(folder, owned)
        with contextlib.ExitStack() as turn:
            try:
                pinned = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
                # closed last: closing any descriptor of the file drops this process's lock on it;
                # open, it keeps the inode, whose number no new lock file can then take
                turn.callback(os.close, pinned)
                # whoever may write into the folder may take the lock (a lock needs the file open
                # for writing): another user of a shared folder waits rather than fails. Only the
                # file's owner may, so a lock file another one made is left as it is
                with contextlib.suppress(OSError):
                    os.fchmod(pinned, stat.S_IMODE(os.stat(folder).st_mode) & 0o666)
                turn.enter_context(exclusive_lock(lock, f"another submission into {folder} to finish"))
            except FileNotFoundError:  # the folder went with a refused attempt meanwhile
                continue
            if _names(lock, pinned):
                try:
                    yield made
                finally:
                    # only this turn's file: a refused attempt's clean-up may have taken it with the
                    # folder, and the next submission made both again for its own turn. One that
                    # stays (another user's, in a sticky folder) is the next turn's to take: no error
                    if _names(lock, pinned):
                        with contextlib.suppress(OSError):
                            lock.unlink(missing_ok=True)
                return


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` is still the file open as ``fd``."""
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _make_folders(folder: Path, owned: Path) -> Path | None:
    """Make ``folder`` and the folders above it; return the highest one from ``owned`` down
    that this call made (mkdir tells, also when another submission makes them at the same
    time), or None. Folders above ``owned`` may be shared: never counted."""
    chain = [p for p in reversed([folder, *folder.parents]) if p == owned or owned in p.parents] or [folder]
    chain[0].parent.mkdir(parents=True, exist_ok=True)
    made = None
    for level in chain:
        try:
            level.mkdir()
        except FileExistsError:
            if not level.is_dir() and os.path.lexists(level):  # a file, or a link to a missing folder
                raise NotADirectoryError(errno.ENOTDIR, "not a folder (a file, or a link to a missing folder)",
                                         str(level)) from None
            continue  # there, or removed again by a refused attempt this instant (the turn starts over)
        made = made or level
    return made


def _submit_attempt(executor: Any, task: TrainTask, runs: Sequence[RunSpec], folder: Path, as_array: bool | None,
                    made: Path | None, config_copy: ConfigCopy | None) -> list[Any]:
    """:func:`submit_runs` in its turn; ``made``: the highest folder this submission made."""
    before = set(folder.iterdir()) if made is None else set()
    utils = require_submitit().core.utils
    refused = (utils.FailedJobError, subprocess.CalledProcessError, OSError)
    submitted: list[Any] = []
    said = io.StringIO()  # submitit prints a refusing sbatch's stderr before raising: the error line has it
    try:
        with contextlib.redirect_stderr(said), _without_restart_count():
            if config_copy is not None:
                config_copy.write()
            if as_array or (as_array is None and len(runs) > 1):
                submitted.extend(executor.map_array(task, list(runs)))
            else:
                for run in runs:
                    submitted.append(executor.submit(task, run))
    except refused as exc:
        if not submitted:
            _remove_attempt(folder, made, before, config_copy.path if config_copy else None)
        why = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        queued = (f" ({len(submitted)} job(s) were submitted before it: "
                  f"{', '.join(str(j.job_id) for j in submitted)})") if submitted else ""
        raise CafeError(f"job submission failed: {why[:500]}{queued}") from None
    except utils.FailedSubmissionError as exc:  # sbatch said something else than a job id: it may have queued
        raise CafeError(f"job submission unclear: {' '.join(str(exc).split())[:300]}; a job may be queued "
                        f"(check squeue before submitting again; its files are in {folder})") from None
    sys.stderr.write(said.getvalue())  # on success, whatever submitit said is the user's to see
    return submitted


@contextlib.contextmanager
def _without_restart_count() -> Iterator[None]:
    """Submit without this process's ``SLURM_RESTART_COUNT`` (a submission from inside a restarted
    job): sbatch would pass it on, and the new job's first start would count as a restart."""
    count = os.environ.pop("SLURM_RESTART_COUNT", None)
    try:
        yield
    finally:
        if count is not None:
            os.environ["SLURM_RESTART_COUNT"] = count


def _remove_attempt(folder: Path, made: Path | None, before: set[Path], config_copy: Path | None) -> None:
    """Remove what a refused submission wrote (see :func:`submit_runs`)."""
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
        return
    for path in set(folder.iterdir()) - before if folder.is_dir() else ():
        if path.is_file() and (path.name.startswith(".submission_file_") or path.suffix == ".pkl"
                               or path == config_copy):
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cafedist submit``."""
    p.add_argument("--config", type=config_file_arg, help="YAML config file of the run(s)")
    p.add_argument("--out", required=True, type=user_path,
                   help="run directory (with --array: parent of one directory per element)")
    p.add_argument("--resume", default="auto", choices=["auto", "none", "force"],
                   help="first start (default auto); a requeued job resumes: with force after force, else auto "
                        "(none stays none until the earlier run was moved aside)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.rounds=100")
    add_resource_arguments(p.add_argument_group("resources"))
    s = p.add_argument_group("sweeps")
    s.add_argument("--array", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="job array over the values of a config key, e.g. seed=0,1,2; repeat for a grid "
                        "(cartesian product); element runs go to OUT/<key>-<value>")
    s.add_argument("--array-parallelism", type=int, default=None, help="at most this many array elements at once")
    j = p.add_argument_group("job")
    j.add_argument("--local", action="store_true", help="run with submitit's local executor (no Slurm; one node)")
    j.add_argument("--wait", action="store_true", help="wait for the job(s) and report their results")
    j.add_argument("--job-name", default=None, help="job name (default cafedist-<name of --out>)")
    j.add_argument("--folder", default=None, type=user_path,
                   help="submitit folder for pickles, logs and the config copy the jobs train (default "
                        "OUT/submitit/<timestamp>-<pid>: a fresh one per submission, because job ids restart after a "
                        "Slurm state wipe)")
    j.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the training processes (repeatable)")
    j.add_argument("--python", default=None, help="interpreter of the job (default: this one)")
    j.add_argument("--dry-run", action="store_true", help="print the runs and executor parameters, submit nothing")


def _job_env(args: argparse.Namespace) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(args.cpus_per_task))}
    env.update(key_values(args.env, "--env"))
    return env


def fresh_folder(parent: Path) -> Path:
    """``parent/<timestamp>-<pid>``: a submission's own submitit folder. Job ids recur (Slurm's
    restart after a state wipe, the local executor's are pids), and a ``%j`` folder reused from
    an earlier job holds its result file, which submitit would return for the new job at once."""
    return parent / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def _default_folder(out: str) -> Path:
    return fresh_folder(Path(out).resolve() / "submitit")


def _report(outcome: JobOutcome) -> None:
    if outcome.ok and outcome.summary:
        acc = ", ".join(f"{a:.4f}" for a in outcome.summary.get("acc_per_exit", []))
        print(f"job {outcome.job_id} done: {outcome.out}  acc_per_exit [{acc}]")
    elif outcome.ok:
        print(f"job {outcome.job_id} done: {outcome.out}")
    elif outcome.stopped:  # resumable, as compare --submit counts it (the error says how)
        print(f"job {outcome.job_id} stopped: {outcome.out}: {outcome.error}")
    else:
        print(f"job {outcome.job_id} FAILED: {outcome.out}: {outcome.error}")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``cafedist submit`` (0: submitted, or with --wait: every job succeeded; with
    --wait 1 if a job failed, else 75 if one was stopped and not requeued: the command resumes it)."""
    require_submitit()
    runs = build_runs(args.config, args.out, args.overrides, args.array, args.resume)
    # as sbatch gets it (key_values also refuses a malformed --slurm-arg before anything is checked)
    queued_after = bool(key_values(args.slurm_arg, "--slurm-arg").get("dependency"))
    validate_runs(runs, dependency=queued_after, local=args.local)
    options = ExecutorOptions.from_args(args)
    params = options.parameters(args.out)
    env = _job_env(args)
    folder = Path(args.folder).resolve() if args.folder else _default_folder(args.out)
    check_dir_creatable(folder, "--folder" if args.folder else "--out")
    if args.dry_run:  # with the user's --config: the copy a submission would keep is not written
        print(json.dumps({"cluster": "local" if args.local else "slurm", "folder": str(folder / "%j"),
                          "parameters": params, "env": env,
                          "runs": [{"out": r.out, "argv": r.train_argv()} for r in runs]}, indent=2))
        return 0
    config_copy = ConfigCopy.of(args.config, folder) if args.config else None
    if config_copy is not None:  # what the jobs train, whenever they start (ConfigCopy)
        runs = [replace(run, config=str(config_copy.path)) for run in runs]
    executor = options.executor(folder / "%j", args.out)
    out = Path(args.out).resolve()  # this command's own folder; a --folder elsewhere is the user's
    with children_take_ctrl_c():  # local jobs: started in a script's background, they stay cancellable
        jobs = submit_runs(executor, runs, folder, env, as_array=bool(args.array),
                           owned=out if folder == out or out in folder.parents else folder, config_copy=config_copy)
    for job, run in zip(jobs, runs):
        print(f"submitted job {job.job_id}: {run.out}  (logs: {job.paths.stderr.parent})")
    if not args.wait:
        return 0
    try:
        outcomes = wait_for(jobs, runs, on_done=_report)
    except BaseException:
        # Ctrl-C or SIGTERM while waiting: local jobs are this process's children and stop with it
        # (they checkpoint); Slurm jobs belong to the cluster and go on, as without --wait
        for stopped in cancel_local_jobs(jobs, runs):
            why = stopped.error.split("JobStopped: ", 1)[-1] if stopped.error else "it had finished"
            print(f"job {stopped.job_id} stopped: {stopped.out}: {why}")
        raise
    failed = [o for o in outcomes if not o.ok and not o.stopped]
    stopped = [o for o in outcomes if o.stopped]
    if failed:
        print(f"{len(failed)} of {len(outcomes)} job(s) failed")
    elif stopped:
        print(f"{len(stopped)} of {len(outcomes)} job(s) stopped; the same command resumes them")
    return 1 if failed else REQUEUE_EXIT_CODE if stopped else 0
