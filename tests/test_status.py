"""`cafedist status`: each run's state from its files, for run directories and folders of them."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TINY, cafedist, cafedist_in_process, env_for_tests

from cafedist.rundir import RunLock
from cafedist.status import find_runs, run_status


@pytest.fixture(scope="module")
def runs(tmp_path_factory, store_cache):
    """A folder holding a finished 3-round run and one stopped by SIGTERM in round 1 (after it)."""
    root = tmp_path_factory.mktemp("status")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY.format(rounds=3, clients=4, every=1, cache=store_cache))
    sweep = root / "sweep"
    cafedist_in_process("train", "--config", str(cfg), "--out", str(sweep / "done"), "--no-progress", check=True)
    proc = cafedist("train", "--config", str(cfg), "--out", str(sweep / "stopped"), "--no-progress",
                    env=env_for_tests(CAFEDIST_FAULT="term@local:1"))
    assert proc.returncode == 75, proc.stderr
    return sweep


def test_finished_stopped_and_training_runs(runs):
    done = run_status(runs / "done")
    assert (done.state, done.rounds_done, done.rounds, done.algorithm) == ("finished", 3, 3, "cafedistill")
    assert done.checkpoint_round == 2 and done.eval == "none" and done.seconds_left is None
    assert done.last_exit_accuracy == json.loads((runs / "done" / "summary.json").read_text())["acc_per_exit"][-1]
    stopped = run_status(runs / "stopped")
    assert stopped.state == "stopped (a resume continues after round 1)" and stopped.rounds_done == 2
    with RunLock(runs / "stopped"):  # this process, alive: as a training would hold it
        training = run_status(runs / "stopped")
    assert training.state.startswith("training (pid ") and training.seconds_left > 0


def test_a_failed_training_that_compare_logged_is_failed_until_a_later_session(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "stopped", run)
    failed = "=== 2026-01-01 00:00:00 cafedist train ...\ncafedist: error: training diverged (try a lower train.lr)\n"
    (run / "train.log").write_text(failed)
    assert run_status(run).state == "failed (training diverged (try a lower train.lr))"
    (run / "train.log").write_text(failed + "=== 2026-01-01 00:10:00 cafedist train ...\nstop signal received\n")
    assert run_status(run).state == "stopped (a resume continues after round 1)"


def test_eval_state_names_its_round_and_staleness(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "done", run)
    (run / "eval.json").write_text(json.dumps({"round": 2, "budget": {"clients": [{"budget": "macs=0.5"}]}}))
    assert run_status(run).eval == "round 2, budget macs=0.5"
    (run / "eval.json").write_text(json.dumps({"round": 1}))
    assert run_status(run).eval == "round 1, stale: the newest checkpoint is round 2"


def test_folders_are_searched_and_bad_paths_are_one_line(runs, tmp_path):
    # a run moved aside by --resume none, in a folder whose new run has no config.yaml yet (a
    # moved-aside folder inside a run directory is never reached: the search stops at the run)
    aside = runs / "restarted" / "previous-20260101-000000"
    aside.mkdir(parents=True, exist_ok=True)
    shutil.copy(runs / "done" / "config.yaml", aside / "config.yaml")
    assert [p.name for p in find_runs(runs)] == ["done", "stopped"]
    assert list(find_runs(runs / "restarted")) == []
    (tmp_path / "empty").mkdir()
    proc = cafedist_in_process("status", str(runs), str(runs / "done"), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["state"] for r in rows] == ["finished", "stopped (a resume continues after round 1)"]  # once each
    table = cafedist_in_process("status", str(runs / "stopped"), check=True).stdout.splitlines()
    assert table[0].split()[:4] == ["run", "algorithm", "rounds", "state"] and "2/3" in table[1]
    # a run whose config.yaml is unreadable: named on stderr, exit 2, the other runs still listed
    broken = tmp_path / "sweep" / "broken"
    broken.mkdir(parents=True)
    (broken / "config.yaml").write_text("train: {rounds: [}\n")
    shutil.copytree(runs / "stopped", tmp_path / "sweep" / "ok")
    proc = cafedist_in_process("status", str(tmp_path / "sweep"))
    assert proc.returncode == 2 and "ok" in proc.stdout and "broken" not in proc.stdout
    assert [ln for ln in proc.stderr.splitlines() if "error" in ln] == \
        [ln for ln in proc.stderr.splitlines() if ln.startswith(f"cafedist: error: {broken / 'config.yaml'}: ")]
    for path, expect in ((tmp_path / "nothing", "not a folder"), (tmp_path / "empty", "no run directory in it")):
        proc = cafedist_in_process("status", str(path))
        assert proc.returncode == 2 and expect in proc.stderr and "Traceback" not in proc.stderr


def test_a_sweep_submitted_but_not_started_is_a_note_not_an_error(tmp_path):
    """`cafedist status SWEEP` right after `cafedist submit --array ... --out SWEEP`, every job
    still queued: the folder holds only submitit/ (no run directory yet). It said "no run
    directory in it" and exited 2, an error for a state every sweep passes through."""
    sweep = tmp_path / "sweep"
    (sweep / "submitit" / "20261206-120000-1").mkdir(parents=True)
    proc = cafedist_in_process("status", str(sweep), "--json")
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert proc.stderr.strip() == f"cafedist: note: {sweep}: no run has started in it yet; jobs were submitted " \
                                  f"into it (its submitit/ folder): `squeue --me` shows whether they wait"
