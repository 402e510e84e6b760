"""Ranks die with their launcher (issue 13 item 4): parent-death signal, watchdog, real torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, cafedist_in_process, env_for_tests, metrics, torchrun

from cafedist.parentwatch import (
    ORPHAN_EXIT_CODE,
    PARENT_PID_VARIABLE,
    ParentWatch,
    cafedist_parent,
    guard_parent,
    launcher_parent,
)


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, None),  # started by hand from a shell
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}, None),  # python in a batch script
    ({"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none"}, "torchrun"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}, "srun"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, "mpiexec"),
    ({"PMI_RANK": "0", "PMI_SIZE": "2"}, "mpiexec"),
])
def test_only_a_launcher_parent_is_watched(env, expected):
    assert launcher_parent(env) == expected


def test_a_plain_run_is_not_guarded():
    assert guard_parent({}) is None


def test_a_cafedist_starter_is_known_by_the_pid_it_gave(tmp_path):
    assert cafedist_parent({PARENT_PID_VARIABLE: str(os.getppid())}) == os.getppid()
    # inherited by a grandchild: its starter lives, but is not the parent
    assert cafedist_parent({PARENT_PID_VARIABLE: str(os.getpid())}) is None
    assert cafedist_parent({PARENT_PID_VARIABLE: "x"}) is None
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()  # reaped: that pid is free (reused within this test: vanishingly unlikely)
    assert cafedist_parent({PARENT_PID_VARIABLE: str(gone.pid)}) == gone.pid  # died before the child looked



def _gone_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()  # reaped: that pid is free (reused within this test: vanishingly unlikely)
    return gone.pid


def test_a_launched_rank_dies_with_its_launcher_even_if_its_cafedist_starter_is_gone(monkeypatch):
    # a torchrun that `bench scaling` started: its ranks inherit the bench's pid; once the bench
    # is gone they still belong to torchrun (SIGKILL with it), not to the bench (SIGTERM now)
    import cafedist.parentwatch as pw
    seen = []
    monkeypatch.setattr(pw, "set_parent_death_signal", lambda sig: (seen.append(("pdeathsig", sig)), True)[1])
    monkeypatch.setattr(pw, "_stop_orphaned", lambda parent: seen.append(("stop", parent)))
    monkeypatch.setattr(pw, "_leave_orphaned", lambda parent: seen.append(("leave", parent)))
    watch = pw.guard_parent({"TORCHELASTIC_RUN_ID": "x", PARENT_PID_VARIABLE: str(_gone_pid())}, interval=60)
    try:
        assert watch is not None and watch.parent == os.getppid() and watch.pdeathsig
        assert seen == [("pdeathsig", signal.SIGKILL)]
    finally:
        watch.stop()


def test_a_training_whose_starter_died_before_it_looked_stops_at_once(monkeypatch):
    import cafedist.parentwatch as pw
    seen = []
    monkeypatch.setattr(pw, "_stop_orphaned", seen.append)
    gone = _gone_pid()
    watch = pw.guard_parent({PARENT_PID_VARIABLE: str(gone)}, interval=60)  # no watchdog poll within the test
    try:
        assert seen == [gone]
    finally:
        watch.stop()


def test_watchdog_fires_once_the_parent_changes():
    ppid = [100]
    fired = threading.Event()
    seen = []
    watch = ParentWatch(100, interval=0.01, getppid=lambda: ppid[0],
                        on_orphan=lambda parent: (seen.append(parent), fired.set())).start()
    time.sleep(0.1)
    assert not fired.is_set()  # a parent that stays alive is left alone
    ppid[0] = 1  # reparented: the launcher died
    assert fired.wait(5)
    watch.stop()
    assert seen == [100]


# the middle process plays a launcher that dies; its child must notice without the kernel's help
ORPHAN = textwrap.dedent("""
    import os, sys, time
    import cafedist.parentwatch as pw
    pw.set_parent_death_signal = lambda sig: False  # as on an OS without prctl: the watchdog alone
    pw.guard_parent({"TORCHELASTIC_RUN_ID": "x"}, interval=0.05)
    print("ready", flush=True)
    time.sleep(60)
    print("still running", flush=True)
""")
LAUNCHER = textwrap.dedent("""
    import subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    print(child.pid, flush=True)
""")


def test_watchdog_stops_an_orphaned_rank_without_the_kernel_signal():
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, ORPHAN], cwd=ROOT, env=env_for_tests(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=50)  # EOF on stderr: the orphan (which shares it) has ended too
    assert time.monotonic() - t0 < 45
    assert "the launcher (parent pid" in err and "without writing anything more" in err, err
    assert ORPHAN_EXIT_CODE == 129


# a training that compare started: the watchdog stops it with SIGTERM (a checkpoint), not SIGKILL
TRAINING = textwrap.dedent("""
    import os, signal, sys, time
    import cafedist.parentwatch as pw
    signal.signal(signal.SIGTERM, lambda *a: (print("stopping gently", file=sys.stderr, flush=True), sys.exit(75)))
    assert pw.guard_parent(os.environ, interval=0.05) is not None
    print("ready", flush=True)
    time.sleep(60)
    print("still running", flush=True)
""")
COMPARE = textwrap.dedent("""
    import subprocess, sys
    from cafedist.childenv import child_env
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True, env=child_env())
    assert child.stdout.readline().strip() == "ready"
""")


def test_a_training_whose_compare_died_stops_with_a_checkpoint():
    proc = subprocess.Popen([sys.executable, "-c", COMPARE, TRAINING], cwd=ROOT, env=env_for_tests(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=50)
    assert time.monotonic() - t0 < 45
    assert "(pid " in err and "is gone: stopping at the end of this round" in err, err
    assert "stopping gently" in err, err


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has stopped; only its parent's wait is missing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_torchrun_workers_die_when_the_launcher_group_is_killed(tiny_config, tmp_path):
    rounds = 12
    cfg = tiny_config(rounds=rounds, every=1)
    out = tmp_path / "run"
    cmd = torchrun(2) + ["-m", "cafedist", "train", "--config", str(cfg), "--out", str(out), "--no-progress"]
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env_for_tests(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoints" / "round_000000").exists():
            assert agent.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.05)
        workers = _children(agent.pid)
        assert len(workers) == 2
        os.killpg(agent.pid, signal.SIGKILL)  # the launcher's group only: workers have sessions of their own
        agent.wait()
        deadline = time.monotonic() + 15
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), "workers outlived their launcher"
    finally:
        for w in _children(agent.pid) + locals().get("workers", []):
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    rows = len(metrics(out))
    time.sleep(1.0)
    assert len(metrics(out)) == rows < rounds and not (out / "summary.json").exists()
    # a rerun right after: one writer, every round exactly once
    cafedist_in_process("train", "--config", str(cfg), "--out", str(out), "--no-progress", check=True)
    assert [r["round"] for r in metrics(out)] == list(range(rounds))
