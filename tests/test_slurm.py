"""Slurm launchers against a real local Slurm (start it with ``bash .ci/slurm-up.sh`` as root).

Every cluster test compares with a plain single-process run of the same tiny config (digits,
4 clients, width-8 CNN): the sbatch template with 2 tasks, a submitit job, and runs preempted
mid-way (SIGUSR1 to the batch script; submitit's SIGUSR2) that are requeued and resume from the
checkpoint written at the signal must all end with identical model hashes and accuracies.

Without a usable cluster those tests skip with a loud reason; the submitit ``--local`` test and
the argument tests below run anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import fake_slurm

from cafedist import interrupts, jobs, submit
from cafedist.cli import main as cli_main
from cafedist.errors import ConfigError
from cafedist.rundir import RunDirBusy, RunLock

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "slurm" / "single_node.sbatch"
ROUNDS = 10
#: summary fields that legitimately depend on how the run was launched
LAUNCH_DEPENDENT = {"world_size", "wall_seconds"}
JOB_TIMEOUT_S = 150


# ----------------------------------------------------------------------------- cluster
def _cluster_problem() -> str | None:
    """Why the Slurm tests cannot run here (None if a node accepts 2-task jobs)."""
    hint = "start it with `sudo bash .ci/slurm-up.sh` (Debian 12: installs slurm-wlm + munge)"
    for tool in ("sinfo", "sbatch", "squeue", "scancel", "scontrol"):
        if shutil.which(tool) is None:
            return f"Slurm is not installed: `{tool}` is not on PATH; {hint}"
    try:
        res = subprocess.run(["sinfo", "-h", "-N", "-o", "%T %c"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return f"`sinfo` timed out: slurmctld is not answering; {hint}"
    if res.returncode != 0:
        return f"Slurm is not up: `sinfo` failed ({res.stderr.strip() or res.returncode}); {hint}"
    nodes = [line.split() for line in res.stdout.splitlines() if line.strip()]
    usable = [n for n in nodes if n[0].rstrip("*~#!%$@^-") in ("idle", "mixed", "allocated", "completing")]
    if not usable:
        return f"no Slurm node is up (sinfo node states: {[n[0] for n in nodes] or 'none'}); {hint}"
    if max(int(n[1]) for n in usable) < 2:
        return "the Slurm node advertises fewer than 2 CPUs; the tests run 2 tasks (SLURM_LOCAL_CPUS=4 .ci/slurm-up.sh)"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    problem = _cluster_problem()
    if problem:
        pytest.skip(f"SLURM TESTS SKIPPED -- {problem}")


# ----------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Config and data cache shared by the module (jobs run on this machine, so /tmp is fine)."""
    root = tmp_path_factory.mktemp("slurm")
    (root / "tiny.yaml").write_text(f"""\
seed: 0
data: {{dataset: digits, clients: 4, cache_dir: {root / 'cache'}}}
model: {{arch: cnn, options: {{width: 8}}}}
train: {{rounds: {ROUNDS}, local_epochs: 1}}
algorithm: {{name: cafedistill, cafedistill: {{proxy_size: 100}}}}
# checkpoints only at the end and on a stop signal: a resume must use the signal's checkpoint
checkpoint: {{every: 0, keep: 2}}
""")
    return root


def _job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def reference(workdir: Path) -> dict:
    """Plain single-process run of the config (also builds the data store once)."""
    out = workdir / "reference"
    res = subprocess.run([sys.executable, "-m", "cafedist", "train", "--config", str(workdir / "tiny.yaml"),
                          "--out", str(out), "--no-progress"], env=_job_env(PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def _assert_same_result(run_dir: Path, reference: dict, world_size: int) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == world_size
    assert summary["model_hashes"] == reference["model_hashes"]
    assert summary["acc_per_exit"] == reference["acc_per_exit"]
    assert set(summary) == set(reference)
    diff = [k for k in reference if k not in LAUNCH_DEPENDENT and summary[k] != reference[k]]
    assert not diff, f"summary fields differ from the single-process run: {diff}"


def _sbatch(workdir: Path, name: str, *args: str, **env: str) -> tuple[str, Path, Path]:
    """Submit the single-node template with 2 tasks (``env``: more knobs); returns (job id, run
    dir, log file)."""
    out, log = workdir / name, workdir / f"{name}.log"
    res = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--time=5", f"--output={log}",
                          f"--job-name=cafedist-test-{name}", *args, str(TEMPLATE)],
                         env=_job_env(CONFIG=str(workdir / "tiny.yaml"), OUT=str(out), **env),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"sbatch failed: {res.stderr}"
    return res.stdout.strip().split(";")[0], out, log


def _in_queue(job_id: str) -> bool:
    res = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    return res.returncode == 0 and bool(res.stdout.strip())


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text().splitlines()[-n:]) if path.is_file() else f"({path} missing)"


def _wait_gone(job_id: str, log: Path, timeout_s: float = JOB_TIMEOUT_S) -> None:
    """Wait until Slurm no longer lists the job (it ends; a requeued job stays listed)."""
    deadline = time.monotonic() + timeout_s
    while _in_queue(job_id):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], timeout=60)
            pytest.fail(f"job {job_id} still queued after {timeout_s:.0f} s; log:\n{_tail(log)}")
        time.sleep(0.5)


def _wait_rounds(run_dir: Path, rounds: int, job_id: str, log: Path) -> int:
    """Wait until the run logged ``rounds`` rounds (the job is then mid-run); returns them."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        done = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        if done >= rounds:
            assert done < ROUNDS - 2, f"the run got too far ({done} rounds) to be interrupted mid-run"
            return done
        if time.monotonic() > deadline or not _in_queue(job_id):
            subprocess.run(["scancel", job_id], timeout=60)
            pytest.fail(f"job {job_id} did not reach round {rounds}; log:\n{_tail(log)}")
        time.sleep(0.1)


def _resumed_round(text: str) -> int:
    """The round of the checkpoint the trainer says it resumed from."""
    m = re.search(r"resumed from \S*round_(\d+)", text)
    assert m, "the restarted job did not resume from a checkpoint"
    return int(m.group(1))


# ----------------------------------------------------------------------------- sbatch
def test_single_node_template_matches_single_process(slurm, workdir, reference):
    job, out, log = _sbatch(workdir, "template")
    _wait_gone(job, log)
    text = log.read_text()
    assert "training finished" in text, _tail(log)
    assert "launcher=slurm" in text and "world_size=2" in text  # really 2 srun tasks
    _assert_same_result(out, reference, world_size=2)


def test_template_does_not_requeue_a_cancelled_job(slurm, workdir):
    job, out, log = _sbatch(workdir, "cancel")
    _wait_rounds(out, 2, job, log)
    subprocess.run(["scancel", job], check=True, timeout=60)
    _wait_gone(job, log, timeout_s=60)
    text = log.read_text()
    # The ranks still checkpoint on SIGTERM, but a cancelled job must stay cancelled.
    assert "not requeued here" in text, _tail(log)
    assert "restart 1" not in text
    assert not (out / "summary.json").exists()
    assert any((out / "checkpoints").glob("round_*")), "no checkpoint written on SIGTERM"


def test_template_submitted_from_a_restarted_job_is_a_first_start(slurm, workdir, reference):
    """sbatch passes the submitting shell's environment on, and Slurm sets SLURM_RESTART_COUNT
    only on a restart: submitted from inside a job that Slurm had restarted, the template took
    the inherited count for its own and ran RESUME=none as auto (the finished run was kept)."""
    out = workdir / "inherited-restarts"
    shutil.copytree(workdir / "reference", out)  # a finished run for RESUME=none to move aside
    job, _, log = _sbatch(workdir, out.name, SLURM_RESTART_COUNT="2", RESUME="none")
    _wait_gone(job, log)
    text = log.read_text()
    assert f"job {job} restart 0 " in text and "--resume none" in text, _tail(log)
    assert "training finished" in text, _tail(log)
    assert len(list(out.glob("previous-*"))) == 1, "the finished run was continued, not started over"
    _assert_same_result(out, reference, world_size=2)


def test_template_forced_job_restarted_before_its_first_checkpoint_stays_forced(slurm, workdir, reference):
    """RESUME=force extending a finished run, restarted by Slurm before a round under the new
    config: the template ran the restart with --resume auto, refused by the old config.yaml."""
    out = workdir / "template-forced-restart"
    shutil.copytree(workdir / "reference", out)
    job, _, log = _sbatch(workdir, out.name, RESUME="force", EXTRA=f"train.rounds={ROUNDS + 2}")
    _requeue_as_it_starts(job)
    _wait_gone(job, log)
    text = log.read_text()
    assert "restart 1" in text and "training finished" in text, _tail(log)
    assert json.loads((out / "summary.json").read_text())["rounds"] == ROUNDS + 2


def test_template_start_over_stopped_before_it_moved_the_run_aside_starts_over_when_restarted(slurm, workdir,
                                                                                              reference):
    """RESUME=none onto a finished run, stopped (SIGUSR1: a time limit or preemption ahead)
    while its ranks were still starting, before the trainer moved the run aside: the job was not
    requeued (the earlier run's summary.json passed for its own), and a restart ran --resume
    auto, which found the earlier run finished instead of training the new one. Now the restart
    starts over; stopped again mid-run, the next restart resumes the new run's checkpoint (what
    --signal=B:USR1@120 does before a time limit: the batch script forwards the signal to the
    step, every rank checkpoints and exits 75, the script requeues the job)."""
    out = workdir / "start-over-stopped"
    shutil.copytree(workdir / "reference", out)  # the earlier run, finished
    # the first start's ranks wait in this stand-in PYTHON, before cafedist runs, for the signal
    held = workdir / f"{out.name}-held"
    held.mkdir()
    hold = workdir / f"{out.name}-python"
    hold.write_text(f"""#!/bin/sh
if [ "$1" = -m ] && [ -z "${{SLURM_RESTART_COUNT:-}}" ]; then touch "{held}/$SLURM_PROCID"; exec sleep 120; fi
exec {shlex.quote(sys.executable)} "$@"
""")
    hold.chmod(0o755)
    job, _, log = _sbatch(workdir, out.name, RESUME="none", PYTHON=str(hold))
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while len(list(held.iterdir())) < 2:
        assert time.monotonic() < deadline and _in_queue(job), f"the ranks were not held; log:\n{_tail(log)}"
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=60)
    while not list(out.glob("previous-*")):  # the restart moves the earlier run aside
        assert time.monotonic() < deadline and _in_queue(job), f"no restart started over; log:\n{_tail(log)}"
        time.sleep(0.2)
    _wait_rounds(out, 2, job, log)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=60)
    _wait_gone(job, log)
    text = log.read_text()
    starts = re.findall(r"restart (\d+) on .* --resume (\w+)", text)
    assert starts == [("0", "none"), ("1", "none"), ("2", "auto")], _tail(log)
    assert "forwarding SIGUSR1" in text and f"scontrol requeue {job}" in text, _tail(log)
    assert "training finished" in text, _tail(log)
    stopped_at = _resumed_round(text)
    assert 1 <= stopped_at < ROUNDS - 1
    # the stop checkpoint is kept next to the final one (checkpoint.every=0)
    assert (out / "checkpoints" / f"round_{stopped_at:06d}").is_dir()
    [earlier] = out.glob("previous-*")
    assert json.loads((earlier / "summary.json").read_text()) == reference
    _assert_same_result(out, reference, world_size=2)


def test_sweep_submits_without_the_restart_count(tmp_path):
    """Run from inside a restarted job, sweep.sh passed that job's SLURM_RESTART_COUNT to every
    job it submitted (no cluster needed: a stand-in sbatch records what it got)."""
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "sbatch"
    fake.write_text(f'#!/bin/sh\necho "${{SLURM_RESTART_COUNT-unset}}" >> {tmp_path / "seen"}\necho 7\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SLURM_RESTART_COUNT="2",
               OUT=str(tmp_path / "sweep"), SWEEP="1 2")
    res = subprocess.run(["bash", str(REPO / "slurm" / "sweep.sh")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "seen").read_text().split() == ["unset", "unset"]


def test_sweep_stopped_by_a_refused_sbatch_says_what_was_queued_and_leaves_no_empty_folder(tmp_path):
    """sbatch refused the second layout: the script stopped with sbatch's line alone, the empty
    run folder it had made stayed, and nothing said that the first layout was queued already."""
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "sbatch"
    fake.write_text('#!/bin/sh\ncase "$*" in *ntasks-per-node=2*) echo "sbatch: error: Invalid partition" >&2; '
                    'exit 1;; esac\necho 7\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", OUT=str(tmp_path / "sweep"),
               SWEEP="1 2 4")
    res = subprocess.run(["bash", str(REPO / "slurm" / "sweep.sh")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == ("slurm/sweep.sh: error: sbatch refused layout 1x2; submitted "
                                                   "before it: 1x1=job7")
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["n1"]  # no n2 left empty, n4 never made


def test_sweep_dry_run_prints_the_lines_it_would_submit(tmp_path):
    """DRY_RUN=1 printed `OUT=... sbatch ...` without the config, the overrides and the log file
    the real sweep gives its jobs: a line run from the shell the sweep was started from (its
    knobs given inline, as documented) trained configs/quickstart.yaml and logged to the cwd.
    Run as printed, the lines now submit what the sweep submits."""
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "sbatch"
    fake.write_text(f'#!/bin/sh\necho "CONFIG=$CONFIG OUT=$OUT EXTRA=$EXTRA PYTHON=$PYTHON $*" | '
                    f'sed "s/ --parsable//" >> {tmp_path / "seen"}\necho 7\n')
    fake.chmod(0o755)
    shell = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "OUT", "EXTRA", "PYTHON")}
    shell["PATH"] = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
    knobs = dict(CONFIG="my config.yaml", OUT=str(tmp_path / "sweep"), EXTRA="train.rounds=3 seed=1",
                 PYTHON="/opt/py/bin/python3", SWEEP="1 2x2")
    sweep = ["bash", str(REPO / "slurm" / "sweep.sh"), "--", "--time=5"]
    res = subprocess.run(sweep, env=dict(shell, **knobs), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    submitted = (tmp_path / "seen").read_text()
    (tmp_path / "seen").unlink()
    made = sorted(p.name for p in (tmp_path / "sweep").iterdir())
    shutil.rmtree(tmp_path / "sweep")  # the job logs go into the run folders: the lines make them too
    dry = subprocess.run(sweep, env=dict(shell, DRY_RUN="1", **knobs), capture_output=True, text=True,
                         timeout=60)
    assert dry.returncode == 0, dry.stderr
    for line in dry.stdout.splitlines():  # each as the user would run it: in the shell of the sweep
        subprocess.run(["bash", "-c", line], env=shell, check=True, capture_output=True, timeout=60)
    assert (tmp_path / "seen").read_text() == submitted
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == made == ["n1", "n4-nodes2"]


# ----------------------------------------------------------------------------- submitit
def _submit_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    submit.add_arguments(parser)
    return parser.parse_args(list(argv))


def _submit_one(workdir: Path, name: str, monkeypatch, local: bool = False, *extra: str):
    """Submit the tiny config as one 2-task job (``extra``: more ``cafedist submit`` flags)."""
    out = workdir / name
    # the jobs inherit our environment: make sure they import this checkout (restored after)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = _submit_args("--config", str(workdir / "tiny.yaml"), "--out", str(out), "--tasks-per-node", "2",
                        "--time", "5", *(["--local"] if local else []), *extra)
    runs = submit.build_runs(args.config, args.out, args.overrides, resume=args.resume)
    folder = workdir / f"submitit-{name}"
    executor = jobs.ExecutorOptions.from_args(args).executor(folder / "%j", args.out)
    [job] = submit.submit_runs(executor, runs, folder, env={"OMP_NUM_THREADS": "1"})
    return job, runs, out


def test_submitit_job_matches_single_process(slurm, workdir, reference, monkeypatch):
    job, runs, out = _submit_one(workdir, "submitit", monkeypatch)
    [outcome] = jobs.wait_for([job], runs, timeout_s=JOB_TIMEOUT_S, poll_s=0.5)
    assert outcome.ok, f"{outcome.error}\n{_tail(job.paths.stderr)}"
    assert outcome.summary["model_hashes"] == reference["model_hashes"]
    _assert_same_result(out, reference, world_size=2)


def test_submitit_preemption_requeues_and_resumes(slurm, workdir, reference, monkeypatch):
    job, runs, out = _submit_one(workdir, "submitit-preempt", monkeypatch)
    log = Path(job.paths.stderr)
    _wait_rounds(out, 2, str(job.job_id), log)
    # submitit's preemption/time-limit signal (USR2) reaches every task of the step; the task
    # turns it into the trainer's SIGUSR1, and rank 0 hands over to submitit's requeue.
    subprocess.run(["scancel", "--signal=USR2", str(job.job_id)], check=True, timeout=60)
    [outcome] = jobs.wait_for([job], runs, timeout_s=JOB_TIMEOUT_S, poll_s=0.5)
    assert outcome.ok, f"{outcome.error}\n{_tail(log)}"
    text = log.read_text()
    assert f"Requeued job {job.job_id}" in text, _tail(log)
    stopped_at = _resumed_round(text)
    assert 1 <= stopped_at < ROUNDS - 1
    _assert_same_result(out, reference, world_size=2)


def test_submitit_job_requeued_by_slurm_resumes_and_is_waited_for(slurm, workdir, reference, monkeypatch):
    """An outside `scontrol requeue` (as preemption in requeue mode, or a node failure with
    --requeue): Slurm restarts the job from its first pickle. A first start with --resume none
    started over on the restart (the progress moved aside once more), and the stopped attempt's
    result file made --wait report the job failed while its restart trained on. Requeued while
    it started, before the trainer moved the earlier run aside, the job continued that run on
    the restart (here: trained it under its config.yaml, with nothing moved aside)."""
    out = workdir / "submitit-requeued"
    out.mkdir()
    # a run (its config alone) for --resume none to move aside: metrics.jsonl is then the new run's
    shutil.copy(workdir / "reference" / "config.yaml", out / "config.yaml")
    job, runs, _ = _submit_one(workdir, out.name, monkeypatch, False, "--resume", "none")
    log = Path(job.paths.stderr)
    _requeue_as_it_starts(str(job.job_id))
    _wait_rounds(out, 2, str(job.job_id), log)
    subprocess.run(["scontrol", "requeue", str(job.job_id)], check=True, timeout=60)
    [outcome] = jobs.wait_for([job], runs, timeout_s=JOB_TIMEOUT_S, poll_s=0.5)
    assert outcome.ok, f"{outcome.error}\n{_tail(log)}"
    assert len(list(out.glob("previous-*"))) == 1, "the restart moved the run aside again"
    text = log.read_text()
    assert "Slurm is requeueing job" in text, _tail(log)
    assert 1 <= _resumed_round(text) < ROUNDS - 1
    _assert_same_result(out, reference, world_size=2)


def test_forced_job_restarted_before_its_first_checkpoint_stays_forced(slurm, workdir, reference, monkeypatch):
    """A `--resume force` job (a finished run extended) that Slurm restarts before it has
    checkpointed under the new config: the run's config.yaml is still the old one, and the
    restart, run with --resume auto, was refused as a run of a different config."""
    out = workdir / "forced-restart"
    shutil.copytree(workdir / "reference", out)
    job, runs, _ = _submit_one(workdir, out.name, monkeypatch, False, "--resume", "force",
                               f"train.rounds={ROUNDS + 2}")
    log = Path(job.paths.stderr)
    _requeue_as_it_starts(str(job.job_id))
    [outcome] = jobs.wait_for([job], runs, timeout_s=JOB_TIMEOUT_S, poll_s=0.5)
    assert outcome.ok, f"{outcome.error}\n{_tail(log)}"
    assert outcome.summary["rounds"] == ROUNDS + 2
    text = log.read_text()
    # it was restarted, before any round under force: the step was cancelled by the requeue, or
    # (a requeue that came before srun had its step) srun found the job pending again
    restarts = [text.index(m) for m in ("DUE TO JOB REQUEUE", "Unable to confirm allocation") if m in text]
    assert restarts, _tail(log)
    assert "--resume force: " in text[min(restarts):], _tail(log)


def _requeue_as_it_starts(job_id: str) -> None:
    """`scontrol requeue` the job as soon as it runs: its processes are still importing, so it
    restarts before a round is trained (as a node failure at start would restart it)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                         timeout=60).stdout.strip() != "RUNNING":
        assert time.monotonic() < deadline, f"job {job_id} did not start"
        time.sleep(0.05)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)


def test_submitit_local_executor_runs_without_slurm(workdir, monkeypatch, capsys):
    """`cafedist submit --local --wait`: the laptop path, through the CLI (no Slurm needed)."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = workdir / "local"
    rc = cli_main(["submit", "--config", str(workdir / "tiny.yaml"), "--out", str(out), "--local",
                   "--tasks-per-node", "2", "--time", "5", "--wait", "train.rounds=3"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert re.search(r"job \S+ done: .*acc_per_exit \[", printed), printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["rounds"] == 3
    assert len(list((out / "submitit").glob("*/*/*_result.pkl"))) == 2  # one result per task


def test_sigterm_to_submit_local_wait_stops_its_local_job(workdir):
    """`submit --local --wait` stopped by SIGTERM: its local job is its child and must stop with it
    (it trained on after submit had gone, holding the run's lock), as a preemption stops it: with
    a checkpoint, and not started again by the local executor."""
    out, printed = workdir / "terminated", workdir / "terminated.out"
    with printed.open("w") as sink:  # a file, not a pipe: a job left running would hold a pipe open
        proc = subprocess.Popen([sys.executable, "-m", "cafedist", "submit", "--config", str(workdir / "tiny.yaml"),
                                 "--out", str(out), "--local", "--time", "5", "--wait", "train.rounds=2000"],
                                cwd=workdir, env=_job_env(PYTHONPATH=str(REPO)), stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # a round has been trained: the job runs
        assert proc.poll() is None and (out / "metrics.jsonl").exists(), printed.read_text()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, printed.read_text()
    assert re.search(r"job \S+ stopped: .*: stopped with the submitting command, checkpoint written",
                     printed.read_text()), printed.read_text()
    try:
        RunLock(out).acquire().release()  # the job has ended: nothing holds the run any more
    except RunDirBusy:
        subprocess.run(["pkill", "-9", "-f", str(out)], check=False)  # leave no job behind
        raise
    assert (out / "checkpoints" / "latest").exists(), "the local job stopped without a checkpoint"
    size = (out / "metrics.jsonl").stat().st_size
    time.sleep(3)
    assert (out / "metrics.jsonl").stat().st_size == size, "the local job trained on after submit stopped"


def _submitter(config: Path, home: Path, folder: Path, sbatch: str) -> subprocess.Popen:
    """``cafedist submit`` of ``config`` into ``folder`` in a process of its own, as from another
    login node: its own temporary directory and run under ``home``, and ``sbatch`` (a shell
    script body) as the sbatch on its PATH."""
    (home / "bin").mkdir(parents=True)
    (home / "tmp").mkdir()
    for tool, script in (("srun", "exit 0"), ("sbatch", sbatch)):
        (home / "bin" / tool).write_text(f"#!/bin/sh\n{script}\n")
        (home / "bin" / tool).chmod(0o755)
    env = _job_env(PYTHONPATH=str(REPO), TMPDIR=str(home / "tmp"),
                   PATH=f"{home / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return subprocess.Popen([sys.executable, "-m", "cafedist", "submit", "--config", str(config),
                             "--out", str(home / "run"), "--folder", str(folder)],
                            cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_submissions_into_one_new_folder_take_turns(workdir, tmp_path):
    """Two login nodes submit into one new --folder at once: the first is refused (after the
    second has queued its job), and its clean-up removed the folder it had made with the second
    job's files in it (the lock that serializes submissions was per host, in /tmp). Now the
    second waits for the first's turn in the folder, and its job keeps its files."""
    folder, started, go = tmp_path / "logs", tmp_path / "started", tmp_path / "go"
    refused = (f"touch {started}; i=0; while [ ! -e {go} ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done; "
               f"echo 'sbatch: error: Batch job submission failed: Invalid partition' >&2; exit 1")
    first = _submitter(workdir / "tiny.yaml", tmp_path / "first", folder, refused)
    second = None
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the first is in sbatch: its folder is made, its files written
        assert started.exists(), first.communicate()
        second = _submitter(workdir / "tiny.yaml", tmp_path / "second", folder, "echo 'Submitted batch job 4242'")
        waited = second.stderr.readline()  # at its turn's wait, or at its end
        go.touch()
        out2, err2 = second.communicate(timeout=120)
        _, err1 = first.communicate(timeout=120)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert err1.strip().splitlines() == ["cafedist: error: job submission failed: sbatch: error: Batch job "
                                         "submission failed: Invalid partition"]
    assert second.returncode == 0 and "submitted job 4242" in out2, waited + err2
    assert (folder / "4242" / "4242_submitted.pkl").is_file()
    # the job and the copy of the config it trains
    kept = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".submission_file_"))
    assert len(kept) == 2 and kept[0] == "4242" and re.fullmatch(r"config-\w+\.yaml", kept[1]), kept
    assert f"waiting for another submission into {folder} to finish" in waited


# ----------------------------------------------------------------------------- arguments
def test_array_runs_are_the_product_of_the_axes(tmp_path):
    runs = submit.build_runs("c.yaml", str(tmp_path / "sweep"), ["train.rounds=3"],
                             ["seed=0,1", "train.lr=0.1,0.05"], resume="none")
    assert [r.label for r in runs] == ["seed-0_train.lr-0.1", "seed-0_train.lr-0.05",
                                       "seed-1_train.lr-0.1", "seed-1_train.lr-0.05"]
    assert runs[3].out == str(tmp_path / "sweep" / "seed-1_train.lr-0.05")
    assert runs[3].overrides == ("train.rounds=3", "seed=1", "train.lr=0.05")
    argv = runs[0].train_argv()
    assert argv[:3] == ["train", "--config", str(Path("c.yaml").resolve())]
    assert argv[argv.index("--resume") + 1] == "none"
    # a requeued job always resumes, whatever the first start asked for
    assert runs[0].resumed().train_argv()[argv.index("--resume") + 1] == "auto"
    # ... and a forced one stays forced: requeued before its first checkpoint under the new
    # config, the run directory still holds the old config.yaml, which auto refused
    forced = submit.build_runs("c.yaml", str(tmp_path / "f"), resume="force")[0]
    assert forced.resumed().train_argv()[argv.index("--resume") + 1] == "force"


@pytest.mark.parametrize("bad", ["seed", "seed=", "seed=1,,2", "=1,2"])
def test_bad_array_is_a_one_line_config_error(bad):
    with pytest.raises(ConfigError, match="--array"):
        submit.parse_array([bad])


def test_an_array_never_trains_one_run_twice(tmp_path):
    """A value given twice, also as another spelling of it (01 is seed 1), and two values whose
    folder names coincide (a/b and a_b) would train the same run or share a directory."""
    for axis, needle in (("seed=0,0", "value 0 is given twice"), ("seed=1,01", "value 01 is given twice"),
                         ("train.lr=0.1,1e-1", "value 1e-1 is given twice")):
        with pytest.raises(ConfigError, match=needle):
            submit.parse_array([axis])
    with pytest.raises(ConfigError, match="two elements would write to the same run directory"):
        submit.build_runs(None, str(tmp_path / "sweep"), arrays=["data.root=a/b,a_b"])


@pytest.mark.parametrize("text,minutes", [("90", 90), ("1:30", 2), ("4:00:00", 240), ("1-12", 2160),
                                          ("1-0:30", 1470), ("0:0:30", 1)])
def test_parse_time_accepts_slurm_formats(text, minutes):
    assert jobs.parse_time(text) == minutes


def test_parse_time_rejects_nonsense():
    for bad in ("abc", "0", "1:2:3:4"):
        with pytest.raises(ConfigError, match="--time"):
            jobs.parse_time(bad)


def test_dry_run_maps_options_to_submitit(tmp_path, workdir, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # then the jobs' thread count is --cpus-per-task
    rc = cli_main(["submit", "--config", str(workdir / "tiny.yaml"), "--out", str(tmp_path / "s"),
                   "--nodes", "2", "--tasks-per-node", "4", "--gpus-per-node", "4", "--cpus-per-task", "8",
                   "--partition", "gpu", "--time", "2:00:00", "--array", "seed=0,1", "--slurm-arg", "exclusive=true",
                   "--dry-run", "train.rounds=7"])
    assert rc == 0
    plan = json.loads(capsys.readouterr().out)
    params = plan["parameters"]
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"], params["cpus_per_task"]) == (2, 4, 4, 8)
    assert params["timeout_min"] == 120 and params["slurm_partition"] == "gpu" and params["name"] == "cafedist-s"
    assert params["slurm_additional_parameters"] == {"requeue": True, "exclusive": "true"}
    assert plan["env"]["OMP_NUM_THREADS"] == "8"
    assert [Path(r["out"]).name for r in plan["runs"]] == ["seed-0", "seed-1"]
    assert plan["runs"][1]["argv"][-2:] == ["train.rounds=7", "seed=1"]
    # the user's config file: the copy a submission keeps is not written by a dry run
    assert plan["runs"][0]["argv"][plan["runs"][0]["argv"].index("--config") + 1] == str(workdir / "tiny.yaml")
    assert not (tmp_path / "s").exists()
    # a thread count set for this shell is the jobs' too; --env adds variables
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cli_main(["submit", "--config", str(workdir / "tiny.yaml"), "--out", str(tmp_path / "t"),
                     "--cpus-per-task", "8", "--env", "CUBLAS_WORKSPACE_CONFIG=:4096:8", "--account", "lab",
                     "--qos", "high", "--constraint", "a100", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["env"] == {"OMP_NUM_THREADS": "3", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    params = plan["parameters"]
    assert (params["slurm_account"], params["slurm_qos"], params["slurm_constraint"]) == ("lab", "high", "a100")
    assert cli_main(["submit", "--config", str(workdir / "tiny.yaml"), "--out", str(tmp_path / "t"),
                     "--env", "CUBLAS", "--dry-run"]) == 2
    assert "--env 'CUBLAS': expected KEY=VALUE" in capsys.readouterr().err


def test_config_errors_are_caught_before_submitting(tmp_path, workdir, capsys):
    rc = cli_main(["submit", "--config", str(workdir / "tiny.yaml"), "--out", str(tmp_path / "s"),
                   "--array", "train.rounds=2,zero", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "array element train.rounds-zero" in err and len(err.strip().splitlines()) == 1


def test_submit_warns_when_a_train_holds_the_run_unless_the_job_waits_for_another(tmp_path, workdir, caplog):
    """A job that starts while another train holds the run is refused; queueing the next job of a
    chain is legitimate, so submit warns (once per run) and says how to chain it."""
    out = tmp_path / "held"
    argv = ["submit", "--config", str(workdir / "tiny.yaml"), "--out", str(out), "--dry-run"]
    lock = RunLock(out).acquire()
    try:
        assert cli_main(argv) == 0
        warned = [r.getMessage() for r in caplog.records if "being trained now" in r.getMessage()]
        assert len(warned) == 1 and f"pid {os.getpid()}" in warned[0] and "dependency=afterany" in warned[0]
        caplog.clear()
        assert cli_main(argv + ["--slurm-arg", "dependency=afterany:123"]) == 0
        assert not [r for r in caplog.records if "being trained now" in r.getMessage()]
        assert cli_main(argv + ["--local"]) == 0  # starts at once: no chain to queue
        assert "wait for it to end" in caplog.records[-1].getMessage()
    finally:
        lock.release()
    caplog.clear()
    assert cli_main(argv) == 0  # released: the record is empty
    for record in (f"{socket.gethostname()} {2**22 + 12345} 2026-01-01T00:00:00\n", "garbage\n"):  # killed, unreadable
        (out / "run.lock").write_text(record)
        assert cli_main(argv) == 0
    assert not [r for r in caplog.records if "being trained now" in r.getMessage()]


def test_local_executor_is_single_node(tmp_path):
    with pytest.raises(ConfigError, match="--nodes 2"):
        args = _submit_args("--out", str(tmp_path), "--local", "--nodes", "2")
        jobs.ExecutorOptions.from_args(args).parameters(args.out)


def test_local_python_that_does_not_exist_is_refused(tmp_path, workdir, capsys):
    """The local executor's controller could not start the job: its traceback came after
    `submit` had said "submitted" and exited 0 (with --wait: a job FAILED)."""
    rc = cli_main(["submit", "--config", str(workdir / "tiny.yaml"), "--out", str(tmp_path / "run"), "--local",
                   "--python", str(tmp_path / "nopython")])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"cafedist: error: --python {tmp_path / 'nopython'}: no such executable here (the local executor runs the "
        f"jobs with it)"]
    assert not (tmp_path / "run").exists()


def test_local_python_may_be_a_command(tmp_path):
    """submitit's --python is a command it splits (a container's python, an interpreter with
    flags): the check for one file refused every such command that the local executor runs."""
    for python in (f"{shlex.quote(sys.executable)} -X utf8", f"env OMP_NUM_THREADS=1 {shlex.quote(sys.executable)}"):
        args = _submit_args("--out", str(tmp_path), "--local", "--python", python)
        jobs.ExecutorOptions.from_args(args).parameters(args.out)  # accepted
    for python in (f"{tmp_path / 'nopython'} -X utf8", "'unbalanced", " "):
        args = _submit_args("--out", str(tmp_path), "--local", "--python", python)
        with pytest.raises(ConfigError, match="no such executable here"):
            jobs.ExecutorOptions.from_args(args).parameters(args.out)


@pytest.mark.parametrize("flags,needle", [(("--mem-gb", "-1"), "--mem-gb -1.0"), (("--mem-gb", "0"), "--mem-gb 0.0"),
                                          (("--signal-delay", "-5"), "--signal-delay -5"),
                                          (("--max-requeues", "-1"), "--max-requeues -1"),
                                          (("--array-parallelism", "0"), "--array-parallelism 0")])
def test_resource_flags_out_of_range_are_refused(tmp_path, flags, needle):
    """They were passed on to sbatch as given (a negative memory) or silently dropped (0)."""
    args = _submit_args("--out", str(tmp_path), *flags)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        jobs.ExecutorOptions.from_args(args).parameters(args.out)


SUBMITIT_REPORT = """Job (task=0) failed during processing with trace:
----------------------
Traceback (most recent call last):
  File "/x/submitit/core/submission.py", line 55, in process_job
    result = delayed.result()
RuntimeError: cafedist train exited with status 2 for /r/run: cafedist: error: /r/run is in use by another writer
----------------------
You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:
  - /r/run/submitit/1/1_0_log.err
  - /r/run/submitit/1/1_0_log.out"""


def test_a_failed_jobs_reason_is_its_error_line_not_its_log_path():
    assert jobs.job_error(SUBMITIT_REPORT).endswith("cafedist: error: /r/run is in use by another writer")
    other = SUBMITIT_REPORT.replace("RuntimeError: cafedist train exited with status 2 for /r/run: cafedist: error: "
                                    "/r/run is in use by another writer", "ValueError: bad thing")
    assert jobs.job_error(other) == "ValueError: bad thing"
    assert jobs.job_error("") == ""


def test_a_cancelled_jobs_reason_is_its_stop_line_not_its_log_path():
    """A job cancelled mid-run ends with JobStopped, which the markers above did not match:
    `submit --wait` printed the last line of the report, the path of its log, as its reason."""
    stopped = ("cafedist.submit.JobStopped: stopped by a signal, checkpoint written in /r/run; job 1 is being "
               "cancelled or ended by Slurm, so it is not requeued (resubmit the same command to resume)")
    report = SUBMITIT_REPORT.replace(SUBMITIT_REPORT.splitlines()[5], stopped)
    assert jobs.job_error(report) == stopped


def test_a_job_that_ended_without_a_result_says_so_not_a_line_of_its_log():
    """A local job killed (SIGKILL: out of memory) or whose --python could not start leaves no
    result; submitit's report quotes the job's log, and `submit --wait` gave its last line as the
    reason ("[cafedist r0] INFO runtime: ...", or the report's "-----" separator)."""
    head = ("Job 9892 (task: 0) with path /r/s/9892/9892_0_result.pkl\n"
            "has not produced any output (state: FINISHED)\n")
    killed = head + "Error stream produced:\n" + "-" * 40 + "\n[cafedist r0] INFO runtime: launcher=torchrun\n"
    silent = head + "No error stream produced. Look at stdout: /r/s/9892/9892_0_log.out\n" + "-" * 40 + "\n"
    for report in (killed, silent):
        assert jobs.job_error(report, logs="/r/s/9892/9892_0_log.err") == (
            "the job ended without a result (state FINISHED): killed (out of memory?) or it could not start; "
            "logs: /r/s/9892/9892_0_log.err")
    # a reason in the log it quotes is still the reason
    failed = head + "Error stream produced:\n" + "-" * 40 + "\nTraceback (most recent call last):\n  x\n" \
        "ModuleNotFoundError: No module named 'submitit'\n"
    assert jobs.job_error(failed, logs="x") == "ModuleNotFoundError: No module named 'submitit'"



def test_a_job_that_ended_without_a_result_names_its_own_log():
    """The reason names where to look: the job's stderr log, as submitit keeps it."""
    def results():
        raise RuntimeError("Job 7 (task: 0) with path /r/7_0_result.pkl\nhas not produced any output (state: "
                           "FINISHED)\nNo error stream produced.\n")
    job = argparse.Namespace(job_id="7", results=results, paths=argparse.Namespace(stderr=Path("/r/7/7_0_log.err")))
    outcome = jobs._outcome(job, argparse.Namespace(out="/o"))
    assert not outcome.ok and outcome.error.endswith("could not start; logs: /r/7/7_0_log.err")


def test_a_failed_local_job_reports_the_runs_error(workdir, monkeypatch, capsys):
    """The run refuses to start (another writer holds it): the FAILED line says so."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = workdir / "held"
    out.mkdir()
    lock = RunLock(out).acquire()
    try:
        rc = cli_main(["submit", "--config", str(workdir / "tiny.yaml"), "--out", str(out), "--local",
                       "--time", "5", "--wait", "train.rounds=1"])
    finally:
        lock.release()
    printed = capsys.readouterr().out
    assert rc != 0
    assert re.search(r"job \S+ FAILED: .*cafedist: error: .*in use by another cafedist train", printed), printed


def _child_takes_ctrl_c() -> bool:
    probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() \
        == "True"


def test_local_jobs_started_from_a_background_compare_can_be_cancelled():
    """Started in the background of a script, compare has SIGINT ignored; the local executor's
    controller inherited that and ignored the SIGINT that cancels it, training on after compare."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert not _child_takes_ctrl_c()
        with interrupts.children_take_ctrl_c():
            assert _child_takes_ctrl_c()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


class _FakeLocalJob:
    """A local job's surface as cancel_local_jobs sees it; ``stops_on``: the signal it ends on."""

    def __init__(self, folder: Path, stops_on: int):
        self.paths = argparse.Namespace(folder=folder)
        self._process = self
        self.stops_on, self.signals, self.cancelled, self.polls = stops_on, [], False, 0

    def poll(self):
        return 0 if self.done() else None

    def send_signal(self, signum):
        assert (self.paths.folder / jobs.CANCELLED_MARKER).exists() or not self.paths.folder.exists(), \
            "signalled before its marker was written"
        self.signals.append(signum)

    def cancel(self, check=True):
        self.cancelled = True

    def done(self):
        self.polls += 1
        stopped = self.cancelled or self.stops_on in self.signals
        return stopped and self.polls > 2  # ends a moment after the signal


def test_cancel_local_jobs_stops_them_as_a_preemption_but_leaves_slurm_jobs_alone(tmp_path):
    class SlurmJob(_FakeLocalJob):
        pass

    local, cluster = _FakeLocalJob(tmp_path / "1", signal.SIGTERM), SlurmJob(tmp_path / "2", signal.SIGTERM)
    local.paths.folder.mkdir()
    jobs.cancel_local_jobs([local, cluster], timeout_s=5, poll_s=0.01)
    assert local.signals == [signal.SIGTERM] and not local.cancelled and local.polls >= 3
    # the marker told its trainer not to ask to be requeued; once the job has ended it goes, so
    # that a later job given the same id (a process id) in the same folder is not taken for it
    assert not (local.paths.folder / jobs.CANCELLED_MARKER).exists()
    assert not cluster.signals and not cluster.cancelled and not (tmp_path / "2").exists()


def test_cancel_local_jobs_cancels_a_job_that_does_not_stop_on_sigterm(tmp_path):
    job = _FakeLocalJob(tmp_path / "gone", stops_on=-1)  # its folder is gone, too
    started = time.monotonic()
    jobs.cancel_local_jobs([job], timeout_s=0.5, poll_s=0.01)
    assert job.signals == [signal.SIGTERM] and job.cancelled and job.done()
    assert time.monotonic() - started < 5


def test_wait_reports_rank_0s_reason_when_the_other_ranks_left_no_result(tmp_path, monkeypatch):
    """submitit refused to requeue (--max-requeues used up): rank 0's result says so, the other
    ranks stopped without one; `submit --wait` said 'left the queue without a result (killed or
    cancelled?)' instead."""
    reason = "submitit.core.utils.UncompletedJobError: Job not requeued because: timed-out too many times."

    class Paths:
        def __init__(self, task: int):
            self.result_pickle = tmp_path / f"7_{task}_result.pkl"
            self.stderr = tmp_path / f"7_{task}_log.err"

    class Task:
        job_id, num_tasks = "7", 1

        def __init__(self, task: int):
            self.paths = Paths(task)

        def results(self):
            raise RuntimeError(f"Job (task=0) failed during processing with trace:\n----\n{reason}\n----\n"
                               f"or at paths:\n  - {self.paths.stderr}")

    class SlurmJob(Task):
        num_tasks = 2

        def task(self, i: int) -> Task:
            return Task(i)

    Paths(0).result_pickle.write_bytes(b"")  # rank 0's; rank 1 wrote none
    monkeypatch.setattr(jobs, "_slurm_in_queue", lambda job_id: False)
    [outcome] = jobs.wait_for([SlurmJob(0)], [argparse.Namespace(out="/r/run")], poll_s=0, grace_s=0)
    assert (outcome.ok, outcome.job_id, outcome.error) == (False, "7", reason)


def test_a_local_job_at_its_last_start_stops_with_a_reason(tmp_path, monkeypatch):
    """submitit's local executor starts a job at most 6 times, whatever --max-requeues says: a
    run longer than that many --time limits handed its 6th stop to submitit's requeue, the job
    ended without a result, and `submit --wait` reported it killed or unable to start (reproduced:
    --local --time 1 --signal-delay 52). It stops saying why, its checkpoint written."""
    folder = tmp_path / "logs"
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_FOLDER", str(folder / "%j"))
    for name, value in (("JOB_ID", "123"), ("NTASKS", "1"), ("JOB_NUM_NODES", "1"), ("NODEID", "0"),
                        ("GLOBALID", "0"), ("LOCALID", "0")):
        monkeypatch.setenv(f"SUBMITIT_LOCAL_{name}", value)
    monkeypatch.setattr(signal, "getsignal", lambda signum: signal.SIG_DFL)  # no submitit handler: the test's
    [run] = submit.build_runs(None, str(tmp_path / "run"))
    task = submit.TrainTask()
    for _ in range(5):  # the restarts the local executor makes
        with pytest.raises(SystemExit) as stop:
            task._requeue(run)
        assert stop.value.code == 75
        task = task.checkpoint(run).function
    with pytest.raises(submit.JobStopped, match="starts a job at most 6 times"):
        task._requeue(run)
    from submitit.local.local import Controller

    assert inspect.signature(Controller.run).parameters["max_retry"].default == submit.LOCAL_STARTS


def test_a_start_over_stopped_before_the_trainer_moved_the_run_aside_starts_over_again(tmp_path, workdir):
    """--resume none, and the preemption signal came while the job was still starting (before
    the trainer's stop flag): submitit requeued it with --resume auto, and the restart continued
    the earlier run the user had asked to start over. It resumes only once the trainer has
    carried out the run directory's plan (moved the earlier run aside) in this process."""
    from cafedist.config import load_config
    from cafedist.train.startup import prepare_run_dir

    out = tmp_path / "run"
    [run] = submit.build_runs(str(workdir / "tiny.yaml"), str(out), resume="none")
    task = submit.TrainTask()
    assert task.checkpoint(run).args[0].resume == "none"  # nothing moved aside yet: start over still
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"round": 0}\n')  # the earlier run
    prepare_run_dir(load_config(run.config, list(run.overrides)), out, "none")
    assert not (out / "metrics.jsonl").exists()  # moved aside
    assert task.checkpoint(run).args[0].resume == "auto"  # from here on: resume the new run
    [forced] = submit.build_runs(str(workdir / "tiny.yaml"), str(tmp_path / "other"), resume="force")
    assert task.checkpoint(forced).args[0].resume == "force"


#: (first --resume, the job's restarts, who recorded the start-over in the run directory, --resume
#: of this start) for a job that Slurm restarted, under the sbatch templates and under submit
RESTART_CASES = [
    ("none", 1, "own", "auto"),  # the job had started the run over: continue it
    ("none", 1, None, "none"),  # stopped before it moved the earlier run aside: start over still
    ("none", 1, "inherited", "none"),  # the token of the job it was submitted from is not its own
    ("none", 0, "own", "none"),
    ("auto", 1, None, "auto"),
    ("force", 1, None, "force"),
]

#: what a submitit task (task 1 of a 2-task job 331 on one node) finds in its environment
_SLURM_TASK_ENV = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "331", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
                   "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1",
                   "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost"}


@pytest.mark.parametrize("resume, restarts, recorded, expected", RESTART_CASES)
def test_a_restarted_submitit_start_over_continues_only_the_run_it_started(tmp_path, monkeypatch, resume, restarts,
                                                                           recorded, expected):
    """--resume none, restarted by Slurm (from the first pickle, or from checkpoint()'s, whose
    --resume none the restart turned into auto as well) before the trainer moved the earlier run
    aside: the restart continued the earlier run, or reported it finished, instead of starting over."""
    import cafedist.cli
    from cafedist.rundir import record_start, start_token

    monkeypatch.setattr(os, "environ", dict(os.environ))  # the task exports RANK, MASTER_* ...
    seen = []
    monkeypatch.setattr(cafedist.cli, "main",
                        lambda argv: seen.append((argv[argv.index("--resume") + 1], start_token())) or 0)
    for key, value in {**_SLURM_TASK_ENV, "SLURM_CLUSTER_NAME": "c", "SLURM_RESTART_COUNT": str(restarts)}.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if recorded == "inherited":  # the start-over of the job it was submitted from
        record_start(run_dir, "slurm-330")
    run = submit.RunSpec(str(tmp_path / "c.yaml"), str(run_dir), (), resume)
    if recorded == "own":  # as the job's first start recorded it
        monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
        submit.TrainTask()(run)
        record_start(run_dir, start_token())
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))
    submit.TrainTask()(run)
    assert seen[-1] == (expected, "slurm-331")


def test_a_job_submitted_from_a_restarted_job_is_not_a_restart(tmp_path, monkeypatch):
    """sbatch passes the submitting shell's environment on: from inside a job that Slurm had
    restarted, SLURM_RESTART_COUNT reached the new job, whose first start then counted as a
    restart (--resume none ran as auto: the run it was to start over was continued)."""
    seen = []

    class Executor:
        def submit(self, task, run):
            seen.append(os.environ.get("SLURM_RESTART_COUNT"))
            return argparse.Namespace(job_id="1")

    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    runs = submit.build_runs(None, str(tmp_path / "run"), resume="none")
    submit.submit_runs(Executor(), runs, tmp_path / "run" / "submitit")
    assert seen == [None]
    assert os.environ["SLURM_RESTART_COUNT"] == "2"  # this process's own is left as it was


def test_a_job_trains_the_config_as_submitted_not_as_edited_since(tmp_path, workdir, monkeypatch, capsys):
    """The jobs read --config when they start: one waiting in the queue (or an array element,
    or a requeued restart) trained the file as edited after the submission, e.g. for the next
    experiment (reproduced on Slurm: submitted width 8, edited to 4 while pending, trained 4).
    They read the copy the submission keeps in its folder instead."""
    from submitit.core import utils as submitit_utils

    from cafedist.config import load_config

    fake_slurm(tmp_path / "bin", "echo 'Submitted batch job 4242'", monkeypatch)
    config = tmp_path / "my.yaml"
    config.write_text((workdir / "tiny.yaml").read_text())
    folder = tmp_path / "logs"
    assert cli_main(["submit", "--config", str(config), "--out", str(tmp_path / "runs"), "--folder", str(folder),
                     "--array", "seed=0,1"]) == 0
    assert "submitted job 4242" in capsys.readouterr().out
    config.write_text(config.read_text().replace("width: 8", "width: 4"))  # the next experiment's
    runs = [submitit_utils.pickle_load(folder / f"4242_{i}" / f"4242_{i}_submitted.pkl").args[0] for i in (0, 1)]
    assert [r.label for r in runs] == ["seed-0", "seed-1"]
    for run in runs:
        assert load_config(run.config, list(run.overrides)).model.options["width"] == 8
        assert load_config(run.resumed().config).model.options["width"] == 8  # a requeued restart's


def test_compare_submit_never_takes_an_earlier_jobs_result_for_its_own(tmp_path, workdir, monkeypatch, capsys):
    """compare --submit kept every job's files in OUT/submitit/<job id>: a job id met again in
    the same --out (Slurm's ids restart after a state wipe; the local executor's are pids) found
    the earlier job's result file there, and compare reported its run FAILED ("no summary.json
    written") at once, wrote its report and exited while the job trained on (reproduced on the
    local Slurm). Each compare submits into a folder of its own, as `submit` does."""
    from submitit.core import utils as submitit_utils

    fake_slurm(tmp_path / "bin", "echo 'Submitted batch job 4242'", monkeypatch)
    out = tmp_path / "cmp"
    stale = out / "submitit" / "4242" / "4242_0_result.pkl"
    stale.parent.mkdir(parents=True)
    submitit_utils.cloudpickle_dump(("success", {"out": "elsewhere", "rank": 0, "summary": None}), stale)
    finished_at_once = []

    def wait_for(submitted, runs):
        finished_at_once.extend(jobs._finished(job) for job in submitted)
        return [jobs.JobOutcome(str(job.job_id), run.out, False, error="not waited for") for job, run in
                zip(submitted, runs)]

    monkeypatch.setattr(jobs, "wait_for", wait_for)
    cli_main(["compare", "--config", str(workdir / "tiny.yaml"), "--algorithms", "fedavg", "--seeds", "1",
              "--out", str(out), "--submit"])
    assert "(job 4242)" in capsys.readouterr().out  # the job was submitted
    assert finished_at_once == [False]
    assert stale.is_file()  # the earlier job's files stay as they were


@pytest.mark.parametrize("why", [
    "cafedist.submit.JobStopped: stopped by a signal, checkpoint written in RUN; job 4243 is being cancelled or "
    "ended by Slurm, so it is not requeued (resubmit the same command to resume)",
    "submitit.core.utils.UncompletedJobError: Job not requeued because: timed-out too many times."])
def test_compare_submit_counts_a_job_stopped_with_its_checkpoint_as_stopped_not_failed(why, tmp_path, workdir,
                                                                                        monkeypatch, capsys):
    """A job whose trainer stopped on a signal, wrote its checkpoint and was not requeued
    (scancel, or its requeues used up: --max-requeues) is a stopped run, as a local compare's:
    compare listed it under "Failed runs" and exited 1 (reproduced on the local Slurm with
    scancel, and with --max-requeues 0 and submitit's USR2). It is listed as stopped and compare
    exits 75; a rerun resumes it."""
    fake_slurm(tmp_path / "bin", "echo 'Submitted batch job 4243'", monkeypatch)
    out = tmp_path / "cmp"

    def wait_for(submitted, runs):
        return [jobs.JobOutcome(str(job.job_id), run.out, False, error=why.replace("RUN", run.out))
                for job, run in zip(submitted, runs)]

    monkeypatch.setattr(jobs, "wait_for", wait_for)
    code = cli_main(["compare", "--config", str(workdir / "tiny.yaml"), "--algorithms", "fedavg", "--seeds", "1",
                     "--out", str(out), "--submit"])
    assert "FAILED" not in capsys.readouterr().out
    assert code == 75
    assert "stopped" in (out / "runs.csv").read_text().splitlines()[1].split(",")


@pytest.mark.parametrize("why, code", [
    ("cafedist.submit.JobStopped: stopped by a signal, checkpoint written in RUN; job 4244 is being cancelled or "
     "ended by Slurm, so it is not requeued (resubmit the same command to resume)", 75),
    ("submitit.core.utils.UncompletedJobError: Job not requeued because: timed-out too many times.", 75),
    ("RuntimeError: cafedist: error: train.lr: expected > 0", 1)])
def test_submit_wait_reports_a_stopped_job_as_stopped_as_compare_does(why, code, tmp_path, workdir, monkeypatch,
                                                                      capsys):
    """`submit --wait` said FAILED and exited 1 for a job stopped with its checkpoint and not
    requeued, where `compare --submit` counts it as stopped (exit 75): now alike; a job that
    failed is still FAILED, exit 1."""
    fake_slurm(tmp_path / "bin", "echo 'Submitted batch job 4244'", monkeypatch)
    out = tmp_path / "s"

    def wait_for(submitted, runs, on_done=None):
        outcomes = [jobs.JobOutcome(str(job.job_id), run.out, False, error=why.replace("RUN", run.out))
                    for job, run in zip(submitted, runs)]
        for o in outcomes:
            on_done(o)
        return outcomes

    monkeypatch.setattr(submit, "wait_for", wait_for)
    assert cli_main(["submit", "--config", str(workdir / "tiny.yaml"), "--out", str(out), "--wait"]) == code
    printed = capsys.readouterr().out
    assert ("FAILED" in printed) == (code == 1), printed
    assert code == 1 or re.search(r"job 4244 stopped: .*\n1 of 1 job\(s\) stopped; the same command resumes them",
                                  printed), printed


def test_a_folder_that_links_to_a_missing_folder_is_an_error_not_a_hang(tmp_path):
    """A submission folder that is a symbolic link to a folder that does not exist (compare's
    OUT/submitit linked to a scratch space not mounted or not made yet; `submit` resolves its
    --folder first): the turn in the folder made it (mkdir: it exists) and opened its lock (no
    such folder), over and over, at full CPU and forever; before the turn, submitit's mkdir
    failed and the submission said so in one line. Nothing is submitted, nothing is removed."""
    folder = tmp_path / "logs"
    folder.symlink_to(tmp_path / "missing")
    script = f"""
import argparse, sys
from pathlib import Path
from cafedist import submit

class Executor:
    def submit(self, task, run):
        sys.exit("submitted")

runs = submit.build_runs(None, {str(tmp_path / 'run')!r}, resume="none")
try:
    submit.submit_runs(Executor(), runs, Path({str(folder)!r}))
except OSError as exc:
    print("refused:", exc)
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env=_job_env(PYTHONPATH=str(REPO)))
    assert res.returncode == 0 and res.stdout.startswith("refused:") and str(folder) in res.stdout, res
    assert folder.is_symlink() and not (tmp_path / "missing").exists()


def test_a_turn_leaves_a_lock_file_that_is_not_its_own(tmp_path):
    """A refused attempt removes the folder it made, lock file and all; a submission that made
    the folder again meanwhile has a lock file of its own there, in its turn. The turn's end
    removed that one (by name): a third submission then took a turn beside the second's."""
    folder = tmp_path / "logs"
    with submit._turn_in(folder, folder) as made:
        assert made == folder
        shutil.rmtree(folder)  # the refused attempt's clean-up
        folder.mkdir()
        (folder / submit.TURN_LOCK).write_text("")  # the next submission's, in its turn
    assert (folder / submit.TURN_LOCK).exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="takes another user's identity (root)")
def test_another_user_waits_for_the_turn_in_a_shared_folder():
    """A folder shared by a group (or everyone): the lock file of a submission's turn was
    writable by its owner only, so another user's submission failed at once with `Permission
    denied` where it was to wait (and failed for good where a killed submission left it)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="cafedist-shared-"))  # pytest's tmp_path is its owner's only
    try:
        folder.chmod(0o777)
        _another_user_in_the_turn(folder)
        # a sticky folder (as /tmp), with the lock file a killed submission of its owner left: the
        # other user takes the turn, and cannot remove the file at its end (which is no error:
        # the submission went through)
        folder.chmod(0o1777)
        (folder / submit.TURN_LOCK).touch(0o666)
        (folder / submit.TURN_LOCK).chmod(0o666)
        _another_user_in_the_turn(folder, own_turn=False)
    finally:
        shutil.rmtree(folder)


def _another_user_in_the_turn(folder: Path, own_turn: bool = True) -> None:
    """Another user's turn in ``folder``: while this process holds one (``own_turn``), else alone."""
    read, write = os.pipe()
    with submit._turn_in(folder, folder) if own_turn else contextlib.nullcontext():
        pid = os.fork()
        if pid == 0:  # another user, as from another login
            os.close(read)
            try:
                os.setgid(65534)
                os.setuid(65534)
                with submit._turn_in(folder, folder):
                    os.write(write, b"turn")
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                os.write(write, f"{type(exc).__name__}: {exc}".encode())
            os._exit(0)
        os.close(write)
        time.sleep(1.0)  # the other submission waits meanwhile
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as said:
        assert said.read() == b"turn"
    assert (folder / submit.TURN_LOCK).exists() != own_turn


def _template_shell(tmp_path: Path, script: str, state: str = "RUNNING", restarts: int = 0,
                    **env: str) -> subprocess.CompletedProcess:
    """``script`` run after sourcing slurm/_run.sh as job 1 of cluster c into ``tmp_path/run``,
    restarted ``restarts`` times, with a stand-in scontrol (it reports ``state``, and says what
    it was asked to do)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\n[ \"$1\" = show ] || {{ echo \"scontrol $*\"; exit 0; }}\n"
                                      f"echo 'JobId=1 JobState={state} Restarts={restarts}'\n")
    (bin_dir / "scontrol").chmod(0o755)
    full = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "1", "SLURM_CLUSTER_NAME": "c",
            "PYTHON": sys.executable, "OUT": str(tmp_path / "run"), **env}
    full.pop("SLURM_RESTART_COUNT", None)
    if restarts:
        full["SLURM_RESTART_COUNT"] = str(restarts)
    script = f"source {shlex.quote(str(REPO / 'slurm' / '_run.sh'))}; {script}"
    return subprocess.run(["bash", "-c", script], env=full, capture_output=True, text=True, timeout=30)


#: what `cafedist train --resume none` does once it has moved the earlier run aside (startup.prepare_run_dir)
_RECORD_START = ("\"$PYTHON\" -c 'import os, pathlib; from cafedist.rundir import record_start, start_token; "
                 "record_start(pathlib.Path(os.environ[\"OUT\"]), start_token())'")


@pytest.mark.parametrize("resume, restarts, recorded, expected", RESTART_CASES)
def test_a_restarted_start_over_continues_only_the_run_it_started(tmp_path, resume, restarts, recorded, expected):
    """RESUME=none, the job stopped before the trainer moved the earlier run aside (a signal in
    its first seconds, a node failure): its restart ran --resume auto and continued the earlier
    run, or reported it finished, instead of starting over. A restart continues only a run
    whose start-over recorded this job's token."""
    (tmp_path / "run").mkdir()
    if recorded is not None:  # what the first start recorded ("inherited": the job it was submitted from)
        first = _template_shell(tmp_path, _RECORD_START, RESUME=resume,
                                SLURM_JOB_ID="0" if recorded == "inherited" else "1")
        assert first.returncode == 0, first.stderr
    proc = _template_shell(tmp_path, '_cafedist_train_args; echo "${_CAFEDIST_ARGS[*]}"', restarts=restarts,
                           RESUME=resume)
    assert proc.returncode == 0, proc.stderr
    assert f"--resume {expected} " in proc.stdout.splitlines()[-1], proc.stdout


def test_a_restart_continues_the_run_it_started_over_under_a_python_that_prints(tmp_path):
    """The template took the token file's name from what $PYTHON printed: a wrapper (or a
    sitecustomize) printing one line more made the name two lines, the token never matched, and
    a restart started over the run its job had trained. A PYTHON that cannot answer continues."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".start-token").write_text("slurm-1")
    chatty = tmp_path / "chatty-python"
    chatty.write_text(f"#!/bin/sh\necho 'module loaded'\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    chatty.chmod(0o755)
    old = tmp_path / "old-python"  # a cafedist from before the token: started_by cannot be imported
    old.write_text(f"#!/bin/sh\ncase \"$2\" in *started_by*) exit 1;; esac\n"
                   f"exec {shlex.quote(sys.executable)} \"$@\"\n")
    old.chmod(0o755)
    show = '_cafedist_train_args; echo "${_CAFEDIST_ARGS[*]}"'
    for python in (str(chatty), str(old)):
        proc = _template_shell(tmp_path, show, restarts=1, RESUME="none", PYTHON=python)
        assert "--resume auto " in proc.stdout.splitlines()[-1], (python, proc.stdout, proc.stderr)
    (tmp_path / "run" / ".start-token").write_text("slurm-0")  # another job's start-over
    proc = _template_shell(tmp_path, show, restarts=1, RESUME="none", PYTHON=str(chatty))
    assert "--resume none " in proc.stdout.splitlines()[-1], proc.stdout


#: what `cafedist train --resume none` does on rank 0 (prepare_run_dir, run for real): the config
#: is ``CFG`` (:func:`_tiny_config`), the run directory ``OUT``
_START_OVER = ("import os, pathlib; from cafedist.config import load_config; "
               "from cafedist.train.startup import prepare_run_dir; "
               "prepare_run_dir(load_config(os.environ['CFG']), pathlib.Path(os.environ['OUT']), 'none')")
#: the same as a step of the job
_START_OVER_STEP = f'"$PYTHON" -c {shlex.quote(_START_OVER)}'


def _tiny_config(tmp_path: Path) -> str:
    (tmp_path / "c.yaml").write_text("data: {dataset: digits, clients: 4}\ntrain: {rounds: 3}\n")
    return str(tmp_path / "c.yaml")


def test_a_start_over_whose_step_lacked_the_token_is_continued_when_restarted(tmp_path):
    """`sbatch --export=CONFIG=...,OUT=...` (a list without ALL, or NONE) sets SLURM_EXPORT_ENV
    in the job, so srun gives the training step those variables (and Slurm's own) alone, not a
    token the batch shell exported: the trainer recorded none, and every restart of the job (each
    preemption or time limit) started the run over, moving its trained rounds aside. The
    trainer's part is run for real here (prepare_run_dir), in such a step's environment."""
    (tmp_path / "run").mkdir()
    kept = " ".join(f"{name}=\"${name}\"" for name in ("PATH", "HOME", "PYTHONPATH", "SLURM_JOB_ID", "OUT", "CFG"))
    first = _template_shell(tmp_path, f"env -i {kept} {_START_OVER_STEP}", RESUME="none", CFG=_tiny_config(tmp_path))
    assert first.returncode == 0, first.stderr
    restart = _template_shell(tmp_path, '_cafedist_train_args; echo "${_CAFEDIST_ARGS[*]}"', restarts=1,
                              RESUME="none")
    assert restart.returncode == 0, restart.stderr
    assert "--resume auto " in restart.stdout.splitlines()[-1], restart.stdout


def test_the_templates_take_the_start_token_from_cafedist_alone(tmp_path):
    """The token's format stood twice, in cafedist.rundir.slurm_job_token and in slurm/_run.sh
    (which exported it to the steps and compared with it): a change to one, not the other, and a
    step that recorded one form made every restart start its trained run over. The format is
    changed here in Python alone (a sitecustomize stands in for the edit): the start-over records
    it, and its restart finds its own token and continues."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import cafedist.rundir as r\n"
                                           "r.slurm_job_token = lambda environ: 'job:' + environ['SLURM_JOB_ID']\n")
    path = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    (tmp_path / "run").mkdir()
    first = _template_shell(tmp_path, _START_OVER_STEP, RESUME="none", CFG=_tiny_config(tmp_path), PYTHONPATH=path)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "run" / ".start-token").read_text() == "job:1"
    restart = _template_shell(tmp_path, '_cafedist_train_args; echo "${_CAFEDIST_ARGS[*]}"', restarts=1,
                              RESUME="none", PYTHONPATH=path)
    assert restart.returncode == 0, restart.stderr
    assert "--resume auto " in restart.stdout.splitlines()[-1], restart.stdout


@pytest.mark.parametrize("killed", ["move_aside", "record_start"])
def test_a_start_over_killed_before_it_recorded_its_token_starts_over_and_loses_nothing(tmp_path, killed):
    """SIGKILL (a node failure, the OOM killer) of a RESUME=none start just before it moved the
    earlier run aside, or between that move and the record of its token, while OUT still holds
    the token of the job that started the earlier run over: the restart finds no token of its
    own, so it starts over (never continues, nor reports finished, the earlier run), and moves
    nothing twice: the earlier run stays whole in its one previous-* folder. Recorded before the
    move, the token would make a restart continue the earlier run."""
    run = tmp_path / "run"
    run.mkdir()
    earlier = {"config.yaml": "seed: 0\n", "metrics.jsonl": '{"round": 0}\n', "summary.json": "{}"}
    for name, text in earlier.items():
        (run / name).write_text(text)
    (run / ".start-token").write_text("slurm-0")  # job 0 started the earlier run over
    kill = f"import os, cafedist.train.startup as s; s.{killed} = lambda *a: os._exit(137); "  # at its call
    die = f'"$PYTHON" -c {shlex.quote(kill + _START_OVER)}'
    cfg = _tiny_config(tmp_path)
    first = _template_shell(tmp_path, die, RESUME="none", CFG=cfg)
    assert first.returncode == 137, first.stderr
    assert (run / ".start-token").read_text() == "slurm-0"
    show = '_cafedist_train_args; echo "${_CAFEDIST_ARGS[*]}"'
    restart = _template_shell(tmp_path, show, restarts=1, RESUME="none")
    assert "--resume none " in restart.stdout.splitlines()[-1], restart.stdout
    assert "no start-over of this job's" in restart.stdout  # it may have moved the earlier run aside
    again = _template_shell(tmp_path, _START_OVER_STEP, restarts=1, RESUME="none", CFG=cfg)
    assert again.returncode == 0, again.stderr
    [moved] = run.glob("previous-*")
    assert {name: (moved / name).read_text() for name in earlier} == earlier
    assert not any((run / name).exists() for name in ("metrics.jsonl", "summary.json"))
    assert (run / ".start-token").read_text() == "slurm-1"
    restart = _template_shell(tmp_path, show, restarts=2, RESUME="none")
    assert "--resume auto " in restart.stdout.splitlines()[-1], restart.stdout


def test_a_start_over_stopped_before_it_began_is_requeued_beside_the_earlier_runs_summary(tmp_path):
    """A stop signal that ended the step of a RESUME=none start before the trainer moved the
    earlier run aside: its summary.json passed for this run's own, and the job was not requeued
    but reported "training failed"."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")  # the earlier run's
    finish = "_cafedist_signal=USR1; _cafedist_resume=none; _cafedist_finish 138"
    proc = _template_shell(tmp_path, finish, RESUME="none")
    assert proc.returncode == 75 and "scontrol requeue 1" in proc.stdout, proc.stdout
    started = _template_shell(tmp_path, f"{_RECORD_START}; {finish}", RESUME="none")  # this run's summary
    assert started.returncode == 138 and "training failed" in started.stdout, started.stdout


@pytest.mark.parametrize("rc, said", [(75, "checkpoint written"), (138, "stopped by a signal (exit code 138")])
def test_the_templates_say_checkpoint_written_only_when_the_trainer_wrote_one(tmp_path, rc, said):
    """A stop signal that ends the step before cafedist can act on it (while it starts: exit
    138, SIGUSR1's) is requeued like cafedist's own 75, but the log said "checkpoint written"
    for it too, which this start never wrote. Driven with a stand-in scontrol (state CANCELLED:
    the path that logs and exits without requeueing)."""
    proc = _template_shell(tmp_path, f"_cafedist_signal=USR1; _cafedist_finish {rc}", state="CANCELLED")
    assert proc.returncode == rc, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "job is CANCELLED" in line]
    assert len(lines) == 1 and said in lines[0], proc.stdout
    assert rc == 75 or "checkpoint written" not in proc.stdout


def test_a_restarted_submitit_job_rendezvous_on_another_port_than_its_first_start(tmp_path, monkeypatch):
    """submitit derives MASTER_PORT from the job id alone, so a job Slurm restarted met on the
    port of its earlier start, still held by a process of it that was exiting (seen: rank 0 of
    the restart could not listen, rank 1 waited until the time limit). A restart's tasks now
    share a port of their own; a MASTER_PORT the user exported is kept."""
    import cafedist.cli

    # the task exports RANK, MASTER_* ... into os.environ: a copy keeps them from later tests
    monkeypatch.setattr(os, "environ", dict(os.environ))
    seen = []
    monkeypatch.setattr(cafedist.cli, "main", lambda argv: seen.append(os.environ["MASTER_PORT"]) or 0)
    run = submit.RunSpec(str(tmp_path / "c.yaml"), str(tmp_path / "run"), ())
    for restarts in ("0", "1", "1"):
        for key, value in _SLURM_TASK_ENV.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
        monkeypatch.delenv("MASTER_PORT", raising=False)
        submit.TrainTask()(run)
    assert seen[0] != seen[1] == seen[2]  # the restart's own port, the same for every task of it
    monkeypatch.setenv("MASTER_PORT", "31234")
    submit.TrainTask()(run)
    assert seen[-1] == "31234"
