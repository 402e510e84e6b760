"""``cafedist submit``: run ``cafedist train`` as a Slurm job (or a job array) through submitit.

::

    cafedist submit --config my.yaml --out runs/my --nodes 2 --tasks-per-node 4 --gpus-per-node 4
    cafedist submit --config my.yaml --out runs/seeds --array seed=0,1,2 --time 4:00:00
    cafedist submit --config my.yaml --out runs/my --local --tasks-per-node 2 --wait   # no Slurm

Every task of the job runs the trainer in-process (``cafedist.cli.main(["train", ...])``) with
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` exported by submitit's
``TorchDistributedEnvironment``, so the same code path serves Slurm and the local executor.

Preemption: the job's callable is a :class:`submitit.helpers.Checkpointable`. submitit's
preemption/time-limit signal (SIGUSR2, ``--signal-delay`` seconds before the end) is forwarded to
the trainer as SIGUSR1, so every rank finishes its round, writes a checkpoint and returns
:data:`~cafedist.train.signals.REQUEUE_EXIT_CODE`; rank 0 then hands over to submitit's own
handler, which pickles :meth:`TrainTask.checkpoint` (the same run with ``--resume auto``) and
runs ``scontrol requeue``. The requeued job resumes from the checkpoint. SIGTERM (e.g. Slurm
preemption with GraceTime) also makes the trainer checkpoint; the job is requeued only while
Slurm still reports it RUNNING, never after ``scancel``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission, TorchDistributedEnvironment

from cafedist.errors import CafeError, ConfigError
from cafedist.train.signals import REQUEUE_EXIT_CODE  # light module: no torch at submit time


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
        """The same run, resuming: what a requeued job must run (never ``--resume none``)."""
        return replace(self, resume="auto")


def parse_array(texts: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["seed=0,1,2", "train.lr=0.1,0.05"]`` -> ``[("seed", ["0","1","2"]), ...]``."""
    axes = []
    for text in texts:
        key, sep, values = text.partition("=")
        items = [v.strip() for v in values.split(",")]
        if not sep or not key.strip() or not all(items):
            raise ConfigError(f"--array {text!r}: expected KEY=V1,V2,... with a dotted config key, "
                              "e.g. seed=0,1,2 or train.lr=0.1,0.05")
        axes.append((key.strip(), items))
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--array: key given twice in {keys}: list all its values in one --array")
    return axes


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
        extra = tuple(f"{k}={v}" for k, v in pairs)
        runs.append(RunSpec(cfg, str(base / label), tuple(overrides) + extra, resume, label))
    return runs


def validate_runs(runs: Sequence[RunSpec]) -> None:
    """Load every run's config now, so a typo fails here instead of in a queued job."""
    from cafedist.config import load_config

    for run in runs:
        try:
            load_config(run.config, list(run.overrides))
        except ConfigError as exc:
            where = f" (array element {run.label})" if run.label else ""
            raise ConfigError(f"{exc}{where}") from None


# ----------------------------------------------------------------------------- in the job
def _in_submitit_job() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def _preempt_signal() -> signal.Signals:
    """submitit's preemption/time-limit signal (``SUBMITIT_PREEMPT_SIGNAL``, default USR2)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return signal.Signals[f"SIG{name}"]


def _slurm_job_running(job_id: str) -> bool:
    """True if Slurm reports the job RUNNING (not COMPLETING after scancel/requeue/time limit)."""
    try:
        text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                              timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return True  # cannot tell: let submitit try (a failed requeue is reported by it)
    m = re.search(r"JobState=(\w+)", text)
    return m is None or m.group(1) == "RUNNING"


class TrainTask(Checkpointable):
    """The job's callable: ``cafedist train`` in every task; requeued with ``--resume auto``.

    ``env``: environment variables set in the task before training (e.g. OMP_NUM_THREADS).
    """

    def __init__(self, env: dict[str, str] | None = None):
        self.env = dict(env or {})

    def __call__(self, run: RunSpec) -> dict[str, Any]:
        """Run ``cafedist train`` for ``run`` in this task; returns ``{"out", "rank", "summary"}``.

        Raises :class:`JobStopped` if the trainer stopped on a signal and the job is not to be
        requeued (cancelled), ``RuntimeError`` if it failed; after a stop signal on a job that
        can be requeued, hands over to submitit's requeue (which exits this process).
        """
        from cafedist.cli import main as cafedist_main

        os.environ.update(self.env)
        if "OMP_NUM_THREADS" in self.env and "torch" in sys.modules:
            import torch  # already imported: the variable alone would come too late

            torch.set_num_threads(int(self.env["OMP_NUM_THREADS"]))
        rank = 0
        if _in_submitit_job():
            # RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*: our runtime then sees an env:// launch, on
            # Slurm and in the local executor alike.
            rank = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True).rank
        preempt, previous = self._forward_preemption()
        try:
            rc = cafedist_main(run.train_argv())
        finally:
            if preempt is not None:
                signal.signal(preempt, previous)
        if rc == REQUEUE_EXIT_CODE:
            self._requeue(run)
        if rc != 0:
            raise RuntimeError(f"cafedist train exited with status {rc} for {run.out} (see the job's stderr log)")
        summary = None
        if rank == 0:
            path = Path(run.out) / "summary.json"
            summary = json.loads(path.read_text()) if path.is_file() else None
        return {"out": run.out, "rank": rank, "summary": summary}

    def checkpoint(self, run: RunSpec) -> DelayedSubmission:  # type: ignore[override]
        """Called by submitit on preemption/time-out: resubmit the same run, resuming."""
        return DelayedSubmission(self, run.resumed())

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

    @staticmethod
    def _requeue(run: RunSpec) -> None:
        """After exit code 75: requeue through submitit (rank 0), or stop this task."""
        if not _in_submitit_job():
            raise JobStopped(f"stopped by a signal, checkpoint written in {run.out} (not a submitit job: "
                             "nothing to requeue; rerun the same command to resume)")
        env = submitit.JobEnvironment()
        if env.cluster == "slurm" and not _slurm_job_running(env.job_id):
            raise JobStopped(f"stopped by a signal, checkpoint written in {run.out}; job {env.job_id} is being "
                             "cancelled or ended by Slurm, so it is not requeued (resubmit the same command to resume)")
        preempt = _preempt_signal()
        handler = signal.getsignal(preempt)  # submitit's again, restored after training
        if env.global_rank == 0 and callable(handler):
            # submitit's handler: pickles self.checkpoint(run), requeues, and exits the process.
            handler(preempt, None)
        # Other ranks: leave without a result file; the requeued job writes the real one.
        raise SystemExit(REQUEUE_EXIT_CODE)


# ----------------------------------------------------------------------------- executor
@dataclass
class JobOutcome:
    """How one submitted job (or array element) ended."""

    job_id: str
    out: str
    ok: bool
    summary: dict[str, Any] | None = None
    error: str = ""


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


def _key_values(texts: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {text!r}: expected KEY=VALUE")
        out[key] = value
    return out


def executor_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """submitit ``update_parameters`` keywords from the command line (generic + ``slurm_*``)."""
    if args.nodes < 1 or args.tasks_per_node < 1 or args.cpus_per_task < 1 or args.gpus_per_node < 0:
        raise ConfigError("--nodes, --tasks-per-node and --cpus-per-task must be >= 1, --gpus-per-node >= 0")
    if args.local and args.nodes != 1:
        raise ConfigError(f"--nodes {args.nodes}: the local executor (--local) runs on one node; use --nodes 1")
    params: dict[str, Any] = {
        "name": args.job_name or f"cafedist-{Path(args.out).name}",
        "timeout_min": parse_time(args.time),
        "nodes": args.nodes,
        "tasks_per_node": args.tasks_per_node,
        "cpus_per_task": args.cpus_per_task,
        "slurm_signal_delay_s": args.signal_delay,
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(args, name):
            params[f"slurm_{name}"] = getattr(args, name)
    if args.array_parallelism:
        params["slurm_array_parallelism"] = args.array_parallelism
    # --requeue: `scontrol requeue` needs it on clusters with JobRequeue=0.
    params["slurm_additional_parameters"] = {"requeue": True, **_key_values(args.slurm_arg, "--slurm-arg")}
    return params


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
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster, **kwargs)
    except RuntimeError as exc:  # e.g. no sbatch on PATH
        raise CafeError(f"cannot create the {cluster} executor: {exc} (use --local without Slurm)") from None
    executor.update_parameters(**params)
    return executor


def _ensure_importable_in_jobs() -> None:
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


def submit_runs(executor: Any, runs: Sequence[RunSpec], env: dict[str, str] | None = None,
                as_array: bool | None = None) -> list[Any]:
    """Submit ``runs`` (a job array when there are several, or ``as_array``); returns submitit jobs."""
    task = TrainTask(env)
    _ensure_importable_in_jobs()
    if as_array or (as_array is None and len(runs) > 1):
        return list(executor.map_array(task, list(runs)))
    return [executor.submit(task, run) for run in runs]


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


def _finished(job: Any) -> bool:
    """All tasks wrote their result file. For Slurm jobs this avoids ``job.done()``, which
    polls ``sacct`` and only warns ("Bypassing sacct error") on clusters without accounting."""
    if not _is_slurm_job(job):
        return bool(job.done())
    tasks = [job.task(i) for i in range(job.num_tasks)] if job.num_tasks > 1 else [job]
    return all(t.paths.result_pickle.exists() for t in tasks)


def _outcome(job: Any, run: RunSpec) -> JobOutcome:
    try:
        results = job.results()
    except Exception as exc:  # noqa: BLE001 - submitit re-raises the job's exception
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        return JobOutcome(str(job.job_id), run.out, False, error=lines[-1] if lines else type(exc).__name__)
    summary = next((r.get("summary") for r in results if isinstance(r, dict) and r.get("summary")), None)
    return JobOutcome(str(job.job_id), run.out, True, summary=summary)


def wait_for(jobs: Sequence[Any], runs: Sequence[RunSpec], timeout_s: float | None = None,
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


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cafedist submit``."""
    p.add_argument("--config", help="YAML config file of the run(s)")
    p.add_argument("--out", required=True, help="run directory (with --array: parent of one directory per element)")
    p.add_argument("--resume", default="auto", choices=["auto", "none", "force"],
                   help="first start only: a requeued job always resumes (default auto)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.rounds=100")
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument("--tasks-per-node", type=int, default=1,
                   help="ranks per node: one per GPU, or CPU ranks (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0: CPU)")
    g.add_argument("--cpus-per-task", type=int, default=1, help="CPUs per rank; also OMP_NUM_THREADS (default 1)")
    g.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB (default: cluster default)")
    g.add_argument("--time", default="60", help="time limit: minutes or a Slurm time, e.g. 4:00:00 (default 60)")
    g.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    g.add_argument("--account", default=None, help="Slurm account")
    g.add_argument("--qos", default=None, help="Slurm QOS")
    g.add_argument("--constraint", default=None, help="Slurm node constraint")
    g.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --slurm-arg exclusive=true (repeatable)")
    g.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which the job is told to checkpoint and requeue "
                        "(default 120)")
    g.add_argument("--max-requeues", type=int, default=20,
                   help="give up after this many time-limit requeues (preemptions do not count; default 20)")
    s = p.add_argument_group("sweeps")
    s.add_argument("--array", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="job array over the values of a config key, e.g. seed=0,1,2; repeat for a grid "
                        "(cartesian product); element runs go to OUT/<key>-<value>")
    s.add_argument("--array-parallelism", type=int, default=None, help="at most this many array elements at once")
    j = p.add_argument_group("job")
    j.add_argument("--local", action="store_true", help="run with submitit's local executor (no Slurm; one node)")
    j.add_argument("--wait", action="store_true", help="wait for the job(s) and report their results")
    j.add_argument("--job-name", default=None, help="job name (default cafedist-<name of --out>)")
    j.add_argument("--folder", default=None,
                   help="submitit folder for pickles and logs (default OUT/submitit/<timestamp>: a fresh one per "
                        "submission, because job ids restart after a Slurm state wipe)")
    j.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the training processes (repeatable)")
    j.add_argument("--python", default=None, help="interpreter of the job (default: this one)")
    j.add_argument("--dry-run", action="store_true", help="print the runs and executor parameters, submit nothing")


def _job_env(args: argparse.Namespace) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(args.cpus_per_task))}
    env.update(_key_values(args.env, "--env"))
    return env


def _default_folder(out: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(out).resolve() / "submitit" / f"{stamp}-{os.getpid()}"


def _report(outcome: JobOutcome) -> None:
    if outcome.ok and outcome.summary:
        acc = ", ".join(f"{a:.4f}" for a in outcome.summary.get("acc_per_exit", []))
        print(f"job {outcome.job_id} done: {outcome.out}  acc_per_exit [{acc}]")
    elif outcome.ok:
        print(f"job {outcome.job_id} done: {outcome.out}")
    else:
        print(f"job {outcome.job_id} FAILED: {outcome.out}: {outcome.error}")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``cafedist submit`` (0: submitted, or with --wait: every job succeeded)."""
    runs = build_runs(args.config, args.out, args.overrides, args.array, args.resume)
    validate_runs(runs)
    params = executor_parameters(args)
    env = _job_env(args)
    folder = Path(args.folder).resolve() if args.folder else _default_folder(args.out)
    if args.dry_run:
        print(json.dumps({"cluster": "local" if args.local else "slurm", "folder": str(folder / "%j"),
                          "parameters": params, "env": env,
                          "runs": [{"out": r.out, "argv": r.train_argv()} for r in runs]}, indent=2))
        return 0
    executor = make_executor(folder / "%j", args.local, params, args.python, args.max_requeues)
    jobs = submit_runs(executor, runs, env, as_array=bool(args.array))
    for job, run in zip(jobs, runs):
        print(f"submitted job {job.job_id}: {run.out}  (logs: {job.paths.stderr.parent})")
    if not args.wait:
        return 0
    outcomes = wait_for(jobs, runs, on_done=_report)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        print(f"{len(failed)} of {len(outcomes)} job(s) failed")
    return 1 if failed else 0
