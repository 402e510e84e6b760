"""submitit executors: the options of a job's resources, creating the executor, waiting for jobs.

:class:`ExecutorOptions` is the one description of where and with what a job runs, shared by
``cafedist submit`` (from its command line) and ``cafedist compare --submit``; its defaults are
those of ``cafedist submit --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from cafedist.errors import CafeError, ConfigError


@dataclass
class ExecutorOptions:
    """Resources and placement of submitted jobs (Slurm, or submitit's local executor)."""

    local: bool = False  # submitit's local executor (no Slurm; one node)
    nodes: int = 1
    tasks_per_node: int = 1  # ranks per node: one per GPU, or CPU ranks
    gpus_per_node: int = 0
    cpus_per_task: int = 1  # also the jobs' OMP_NUM_THREADS
    mem_gb: float | None = None
    time: str = "60"  # minutes or a Slurm time
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    slurm_arg: list[str] = field(default_factory=list)  # other sbatch options, KEY=VALUE
    signal_delay: int = 120  # seconds before the time limit at which a job checkpoints and requeues
    max_requeues: int = 20  # time-limit requeues allowed (preemptions do not count)
    array_parallelism: int | None = None  # at most this many array elements at once
    job_name: str | None = None  # default cafedist-<name of the run directory>
    python: str | None = None  # the jobs' interpreter (default: this one)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExecutorOptions:
        """The options of a parsed ``cafedist submit`` command line."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def parameters(self, out: str | Path) -> dict[str, Any]:
        """submitit ``update_parameters`` keywords (generic + ``slurm_*``) for runs under ``out``."""
        if self.nodes < 1 or self.tasks_per_node < 1 or self.cpus_per_task < 1 or self.gpus_per_node < 0:
            raise ConfigError("--nodes, --tasks-per-node and --cpus-per-task must be >= 1, --gpus-per-node >= 0")
        if self.mem_gb is not None and not (self.mem_gb > 0 and math.isfinite(self.mem_gb)):
            raise ConfigError(f"--mem-gb {self.mem_gb}: expected a number of GB > 0 (leave it out for the cluster's "
                              f"default)")
        for flag, value, least in (("--signal-delay", self.signal_delay, 0), ("--max-requeues", self.max_requeues, 0),
                                   ("--array-parallelism", self.array_parallelism, 1)):
            if value is not None and value < least:
                raise ConfigError(f"{flag} {value}: expected an integer >= {least}")
        if self.local and self.nodes != 1:
            raise ConfigError(f"--nodes {self.nodes}: the local executor (--local) runs on one node; use --nodes 1")
        if self.local and self.python and not _runs_here(self.python):  # Slurm's: found on the nodes
            raise ConfigError(f"--python {self.python}: no such executable here (the local executor runs the jobs "
                              f"with it)")
        params: dict[str, Any] = {
            "name": self.job_name or f"cafedist-{Path(out).name}",
            "timeout_min": parse_time(self.time),
            "nodes": self.nodes,
            "tasks_per_node": self.tasks_per_node,
            "cpus_per_task": self.cpus_per_task,
            "slurm_signal_delay_s": self.signal_delay,
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.mem_gb is not None:
            params["mem_gb"] = self.mem_gb
        for name in ("partition", "account", "qos", "constraint"):
            if getattr(self, name):
                params[f"slurm_{name}"] = getattr(self, name)
        if self.array_parallelism is not None:
            params["slurm_array_parallelism"] = self.array_parallelism
        # --requeue: `scontrol requeue` needs it on clusters with JobRequeue=0.
        params["slurm_additional_parameters"] = {"requeue": True, **key_values(self.slurm_arg, "--slurm-arg")}
        return params

    def executor(self, folder: str | Path, out: str | Path) -> Any:
        """A submitit executor writing pickles and logs to ``folder``, for runs under ``out``."""
        return make_executor(folder, self.local, self.parameters(out), self.python, self.max_requeues)


def _runs_here(python: str) -> bool:
    """Whether the command ``python`` names an executable here: its first word, as submitit's
    local executor splits it (``--python "apptainer exec img.sif python3"`` is a command, as
    submitit documents it, not one file)."""
    try:
        words = shlex.split(python)
    except ValueError:  # an unbalanced quote: the local executor cannot split it either
        return False
    return bool(words) and shutil.which(words[0]) is not None


#: the resource flags of ``cafedist submit`` and ``compare --submit``: ExecutorOptions field,
#: argparse type, help (the default, where there is one, is ExecutorOptions')
RESOURCE_FLAGS: tuple[tuple[str, Callable[[str], Any] | None, str], ...] = (
    ("nodes", int, "nodes"),
    ("tasks_per_node", int, "ranks per node: one per GPU, or CPU ranks"),
    ("gpus_per_node", int, "GPUs per node; 0: CPU"),
    ("cpus_per_task", int, "CPUs per rank; also OMP_NUM_THREADS"),
    ("mem_gb", float, "memory per node in GB (default: the cluster's)"),
    ("time", None, "time limit: minutes or a Slurm time, e.g. 4:00:00"),
    ("partition", None, "Slurm partition (default: the cluster's)"),
    ("account", None, "Slurm account"),
    ("qos", None, "Slurm QOS"),
    ("constraint", None, "Slurm node constraint"),
    ("slurm_arg", None, "any other sbatch option, e.g. --slurm-arg exclusive=true (repeatable)"),
    ("signal_delay", int, "seconds before the time limit at which the job is told to checkpoint and requeue"),
    ("max_requeues", int, "give up after this many time-limit requeues; preemptions do not count"),
)


def add_resource_arguments(group: Any, *, with_submit: bool = False) -> None:
    """The resource flags (:data:`RESOURCE_FLAGS`) on an argparse group: with the defaults of
    :class:`ExecutorOptions` (``cafedist submit``), or, ``with_submit``, each defaulting to
    None and described as meaningful only with ``--submit`` (``compare``: what is not given
    takes submit's default)."""
    defaults = ExecutorOptions()
    for name, kind, text in RESOURCE_FLAGS:
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        if with_submit:
            text = f"with --submit: {text}"
        elif default not in (None, []) and "default" not in text:
            text = f"{text} (default {default})"
        if name == "slurm_arg":
            group.add_argument(flag, action="append", default=[], metavar="KEY=VALUE", help=text)
        else:
            group.add_argument(flag, type=kind, default=None if with_submit else default, help=text)


def resources_given(args: argparse.Namespace) -> dict[str, Any]:
    """The resource flags given on a ``compare`` command line (:func:`add_resource_arguments`
    with ``with_submit``): ExecutorOptions field -> value, in :data:`RESOURCE_FLAGS` order."""
    return {name: getattr(args, name) for name, _, _ in RESOURCE_FLAGS if getattr(args, name) not in (None, [])}


@dataclass
class JobOutcome:
    """How one submitted job (or array element) ended."""

    job_id: str
    out: str
    ok: bool
    summary: dict[str, Any] | None = None
    error: str = ""

    @property
    def stopped(self) -> bool:
        """It was stopped by a signal and not requeued: cancelled (``cafedist.submit.JobStopped``)
        or its requeues used up (submitit's refusal). Its trainer checkpointed, unless the signal
        came while it started (then its last checkpoint, if any, stands): a rerun resumes it."""
        return not self.ok and any(why in self.error for why in ("JobStopped: ", "Job not requeued because: "))


def parse_time(text: str) -> int:
    """Slurm time (``MIN``, ``MIN:SEC``, ``H:MM:SS``, ``D-H``, ``D-H:MM``, ``D-H:MM:SS``) -> minutes (rounded up)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ConfigError(f"--time {text!r}: expected minutes or a Slurm time such as 90, 4:00:00 or 1-12:00:00")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-H[:M[:S]]
        seconds = ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = (a * 60 + b) * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:  # M
        seconds = a * 60
    if seconds <= 0:
        raise ConfigError(f"--time {text!r}: must be more than 0 minutes")
    return -(-seconds // 60)


def key_values(texts: Sequence[str], flag: str) -> dict[str, str]:
    """``["A=1", "B=2"]`` -> ``{"A": "1", "B": "2"}`` (ConfigError naming ``flag`` otherwise)."""
    out = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {text!r}: expected KEY=VALUE")
        out[key] = value
    return out


def require_submitit() -> Any:
    """The submitit module, imported only when jobs are submitted, so that everything else
    (train, eval, compare without ``--submit``; the CLI's flags) runs where it is missing;
    there a submission stops with one line saying what to install."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("submitting jobs needs submitit, which is not installed here "
                          "(pip install 'submitit>=1.5'; `cafedist train` runs without it)") from None
    return submitit


def make_executor(folder: str | Path, local: bool, params: dict[str, Any], python: str | None = None,
                  max_requeues: int = 20) -> Any:
    """A submitit AutoExecutor for Slurm (or the local executor) with ``params`` applied.

    ``max_requeues``: how many time-limit requeues submitit allows (its ``max_num_timeout``;
    preemptions do not count). Jobs shorter than ~50 min count every requeue as a time-out.
    """
    cluster = "local" if local else "slurm"
    kwargs: dict[str, Any] = {f"{cluster}_max_num_timeout": max_requeues}
    if python:
        kwargs[f"{cluster}_python"] = python
    try:
        executor = require_submitit().AutoExecutor(folder=str(folder), cluster=cluster, **kwargs)
    except RuntimeError as exc:  # e.g. no sbatch on PATH
        raise CafeError(f"cannot create the {cluster} executor: {exc} (use --local without Slurm)") from None
    executor.update_parameters(**params)
    return executor


def ensure_importable_in_jobs() -> None:
    """A source checkout (not an installed package): put it on the jobs' PYTHONPATH.

    Jobs inherit this process's environment (sbatch exports it; the local executor copies it),
    and they must import cafedist to unpickle the task.
    """
    from importlib import metadata

    try:
        metadata.distribution("cafedist")
        return
    except metadata.PackageNotFoundError:
        pass
    root = str(Path(__file__).resolve().parent.parent)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])


# ----------------------------------------------------------------------------- waiting
def _slurm_in_queue(job_id: str) -> bool:
    """True while Slurm lists the job (pending, running, completing or requeued)."""
    try:
        res = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                             timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return True
    return res.returncode == 0 and bool(res.stdout.strip())


def _is_slurm_job(job: Any) -> bool:
    return type(job).__name__ == "SlurmJob"


def _tasks(job: Any) -> list[Any]:
    """The job's tasks (submitit sub-jobs, each with its own result file); rank 0's first."""
    return [job.task(i) for i in range(job.num_tasks)] if job.num_tasks > 1 else [job]


def _finished(job: Any) -> bool:
    """All tasks wrote their result file. For Slurm jobs this avoids ``job.done()``, which
    polls ``sacct`` and only warns ("Bypassing sacct error") on clusters without accounting."""
    if not _is_slurm_job(job):
        return bool(job.done())
    return all(t.paths.result_pickle.exists() for t in _tasks(job))


#: written into a local job's folder before it is stopped: its trainer's checkpoint-and-exit then
#: ends the job instead of asking submitit's local executor to start it again
CANCELLED_MARKER = ".cafedist-cancelled"


def cancel_local_jobs(jobs: Sequence[Any], runs: Sequence[Any] = (), timeout_s: float = 120.0,
                      poll_s: float = 0.2) -> list[JobOutcome]:
    """Stop jobs of submitit's local executor and wait until they have ended: they are this
    process's children, which would otherwise train on after it, holding their runs' locks.

    They stop as a preemption stops a run: SIGTERM to each job's controller, which passes it to
    the tasks, and the trainer finishes its round and checkpoints (the marker keeps the local
    executor from starting the job again). A job still running after ``timeout_s`` (a long round,
    or a task that had not started training) is cancelled outright (SIGINT, then SIGKILL: back to
    its last checkpoint). Slurm jobs are not touched (they belong to the cluster, not to us).
    Returns how each local job ended, given ``runs`` (one per job)."""
    local = [job for job in jobs if not _is_slurm_job(job)]
    for job in local:
        with contextlib.suppress(OSError):  # a folder gone: the job cannot have started
            (Path(job.paths.folder) / CANCELLED_MARKER).touch()
        process = getattr(job, "_process", None)  # the controller, when this process started it
        with contextlib.suppress(OSError):  # ended already
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
    _wait_until_finished(local, timeout_s, poll_s)
    for job in local:
        if not _finished(job):
            with contextlib.suppress(Exception):  # a job that has ended meanwhile
                job.cancel(check=False)
    _wait_until_finished(local, 10.0, poll_s)  # the controller kills its tasks within a second or two
    for job in local:  # read by now; a job of a later submission whose id (a pid) is this one's must not see it
        if _finished(job):
            with contextlib.suppress(OSError):
                (Path(job.paths.folder) / CANCELLED_MARKER).unlink(missing_ok=True)
    return [_outcome(job, run) for job, run in zip(jobs, runs) if not _is_slurm_job(job) and _finished(job)]


def _wait_until_finished(jobs: Sequence[Any], timeout_s: float, poll_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(not _finished(job) for job in jobs) and time.monotonic() < deadline:
        time.sleep(poll_s)


#: the last line of a Python traceback: the exception's (dotted) class name, a colon, its message
_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*: \S")
#: submitit's report of a job that wrote no result (killed, or its interpreter never ran), which
#: quotes the job's log: the log's last line is then no reason
_NO_RESULT = re.compile(r"has not produced any output \(state: ([^)]*)\)")


def job_error(text: str, logs: str | os.PathLike = "") -> str:
    """The line that says why a job failed, from submitit's report of its exception (which
    holds the job's traceback and ends with the paths of its logs): the run's own ``cafedist:
    error:`` line when there is one, else the exception's line of the traceback, else, for a
    job that wrote no result, that it ended without one (``logs``: where to look), else the
    last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for marker in ("cafedist: error:", "Error: ", "Exception: "):
        found = [ln for ln in lines if marker in ln]
        if found:
            return found[-1]
    # an exception named otherwise (cafedist.submit.JobStopped: ...): the traceback's last line
    # of the form "dotted.Name: message", which the log paths after it never are
    found = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
    if found:
        return found[-1]
    no_result = _NO_RESULT.search(text)
    if no_result:
        return (f"the job ended without a result (state {no_result.group(1)}): killed (out of memory?) or it could "
                f"not start; logs: {logs}")
    return lines[-1] if lines else ""


def _outcome(job: Any, run: Any) -> JobOutcome:
    try:
        results = job.results()
    except Exception as exc:  # noqa: BLE001 - submitit re-raises the job's exception
        error = job_error(str(exc), logs=job.paths.stderr) or type(exc).__name__
        return JobOutcome(str(job.job_id), run.out, False, error=error)
    summary = next((r.get("summary") for r in results if isinstance(r, dict) and r.get("summary")), None)
    return JobOutcome(str(job.job_id), run.out, True, summary=summary)


def wait_for(jobs: Sequence[Any], runs: Sequence[Any], timeout_s: float | None = None,
             poll_s: float = 2.0, grace_s: float = 20.0,
             on_done: Callable[[JobOutcome], None] | None = None) -> list[JobOutcome]:
    """Wait until every job ends; a Slurm job that left the queue without writing results for
    ``grace_s`` seconds counts as failed (so this works without ``sacct``/accounting).

    ``timeout_s`` bounds the whole wait (a :class:`TimeoutError` names the unfinished jobs).
    """
    start = time.monotonic()
    pending = dict(enumerate(jobs))
    outcomes: dict[int, JobOutcome] = {}
    gone_since: dict[int, float] = {}
    while pending:
        for i, job in list(pending.items()):
            if _finished(job):
                outcomes[i] = _outcome(job, runs[i])
            elif _is_slurm_job(job) and not _slurm_in_queue(str(job.job_id)):
                first = gone_since.setdefault(i, time.monotonic())
                if time.monotonic() - first < grace_s:
                    continue
                lead = _tasks(job)[0]
                if lead.paths.result_pickle.exists():
                    # rank 0 said how the job ended (e.g. submitit would not requeue it: too many
                    # time-outs); the other ranks stopped without a result of their own
                    outcomes[i] = _outcome(lead, runs[i])
                else:
                    outcomes[i] = JobOutcome(str(job.job_id), runs[i].out, False,
                                             error=f"job left the queue without a result (killed or cancelled?); "
                                                   f"logs: {job.paths.stderr}")
            else:
                continue
            del pending[i]
            if on_done is not None:
                on_done(outcomes[i])
        if pending:
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                ids = ", ".join(str(j.job_id) for j in pending.values())
                raise TimeoutError(f"jobs still running after {timeout_s:.0f} s: {ids}")
            time.sleep(poll_s)
    return [outcomes[i] for i in range(len(jobs))]
