"""`cafedist status`: each run's state from its files, for run directories and folders of them."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import yaml
from conftest import TINY, cafedist, cafedist_in_process, env_for_tests, metrics

from cafedist.run.metrics import read_rounds, session_starts
from cafedist.rundir import RunLock
from cafedist.status import find_runs, run_status, stopped_state


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
    # its summary is the record: a metrics.jsonl torn (or trimmed) after the end changes nothing
    torn = runs.parent / "torn"
    shutil.copytree(runs / "done", torn)
    (torn / "metrics.jsonl").write_text((torn / "metrics.jsonl").read_text().splitlines()[0][:20])
    after = run_status(torn)
    assert (after.state, after.rounds_done, after.rounds, after.last_exit_accuracy) == \
        ("finished", 3, 3, done.last_exit_accuracy)
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
    assert run_status(run).state == \
        "failed (training diverged (try a lower train.lr); a resume continues after round 1)"
    (run / "train.log").write_text(failed + "=== 2026-01-01 00:10:00 cafedist train ...\nstop signal received\n")
    assert run_status(run).state == "stopped (a resume continues after round 1)"


def test_a_failed_run_says_how_far_it_trained_and_where_a_resume_continues(runs, tmp_path):
    """A training that failed in round 3 (its error names it) after a checkpoint of round 1 showed
    "2/3 failed (...)": the rounds a resume keeps, but not that it trained round 2 (lost) nor where
    a resume continues. Without any checkpoint it showed every row as done ("3/3 failed")."""
    run = tmp_path / "run"
    shutil.copytree(runs / "stopped", run)
    template = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({**template, "round": 2}) + "\n")
    (run / "train.log").write_text("=== 2026-01-01 00:00:00 cafedist train ...\n"
                                   "cafedist: error: every client's loss in round 3 is not finite\n")
    status = run_status(run)
    assert status.state == "failed (every client's loss in round 3 is not finite; a resume continues after " \
                           "round 1; round 2 trained but not checkpointed)"
    assert (status.rounds_done, status.rounds_trained, status.checkpoint_round) == (2, 3, 1)
    shutil.rmtree(run / "checkpoints")
    status = run_status(run)
    assert (status.rounds_done, status.last_exit_accuracy, status.rounds_trained) == (0, None, 3)
    assert status.state == "failed (every client's loss in round 3 is not finite; no checkpoint: a resume starts " \
                           "over; rounds 0..2 trained but not checkpointed)"


def test_a_run_killed_before_its_first_checkpoint_has_no_round_done(tiny_config, tmp_path):
    """Killed in round 2 with no checkpoint written (checkpoint.every 0: only at the end): status
    said "2/3 stopped (no checkpoint: a resume starts over)", counting rows that a resume drops
    as done rounds, with the last one's accuracy. Done are the rounds a resume keeps: none."""
    run = tmp_path / "run"
    proc = cafedist("train", "--config", str(tiny_config(every=0)), "--out", str(run), "--no-progress",
                    env=env_for_tests(CAFEDIST_FAULT="kill@local:2"))
    assert proc.returncode == -9 and not (run / "checkpoints").exists(), proc.stderr
    status = run_status(run)
    assert (status.rounds_done, status.rounds, status.last_exit_accuracy) == (0, 3, None)
    state = "stopped (no checkpoint: a resume starts over; rounds 0..1 trained but not checkpointed)"
    assert status.state == stopped_state(run) == state and status.rounds_trained == 2
    assert " 0/3 " in cafedist_in_process("status", str(run), check=True).stdout
    # as train does: a resume trains from round 0, its rows replacing the killed session's
    proc = cafedist_in_process("train", "--config", str(run / "config.yaml"), "--out", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert len({r["session"] for r in metrics(run)}) == 1


def test_a_live_resume_force_onto_more_rounds_shows_its_own_total(runs, tmp_path):
    """`train --resume force train.rounds=N` keeps config.yaml's old total until its first new
    checkpoint (here, with checkpoint.every 0, its last round): status said "12/3 training" with
    0:00:00 left. The attempt records its own total for its session meanwhile: it is shown."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    run = tmp_path / "run"
    shutil.copytree(runs / "stopped", run)
    proc = subprocess.Popen([sys.executable, "-m", "cafedist", "train", "--config", str(run / "config.yaml"),
                             "--out", str(run), "--no-progress", "--resume", "force", "train.rounds=2000",
                             "checkpoint.every=0"], cwd=ROOT, env=env_for_tests(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            rows = read_rounds(run)  # a line being written is passed over
            if len({r.get("session") for r in rows}) > 1 and rows[-1]["round"] >= 3:  # the live session's rows
                break
            time.sleep(0.2)
        status = run_status(run)
        assert proc.poll() is None, proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert status.state.startswith("training (pid ") and status.rounds == 2000 and status.rounds_done >= 4
    assert status.seconds_left > 0
    assert run_status(run).rounds == 2000  # its stop checkpointed a round: config.yaml is the new config's
    assert not (run / ".config-pending.json").exists()


def test_a_live_resume_force_shows_its_own_total_and_checkpoints_before_its_first_row(runs, tmp_path):
    """In a `--resume force train.rounds=40 checkpoint.every=7` attempt's first round (no row of
    its own yet), status showed config.yaml's old run: "2/3 training" with one round and one
    checkpoint (every 1) left. The attempt records its total and checkpoint.every for its session
    (.config-pending.json) until config.yaml is the new config's; a killed attempt's record is
    no live session's, and status shows the run as the kill left it."""
    import statistics
    import subprocess
    import sys
    import time

    from conftest import ROOT

    run = tmp_path / "run"
    shutil.copytree(runs / "stopped", run)
    before = run_status(run)
    proc = subprocess.Popen([sys.executable, "-m", "cafedist", "train", "--config", str(run / "config.yaml"),
                             "--out", str(run), "--no-progress", "--resume", "force", "train.rounds=40",
                             "checkpoint.every=7"], cwd=ROOT, env=env_for_tests(CAFEDIST_FAULT="stop@local:2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T":  # stopped in round 2
                break
            time.sleep(0.2)
        assert proc.poll() is None and len(read_rounds(run)) == 2
        status = run_status(run)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    rows = read_rounds(run)
    # rounds 2..39 left, checkpoints after rounds 6, 13, 20, 27, 34 and 39: 6 (every 1: 38)
    expected = statistics.median(r["seconds"] for r in rows) * 38 + rows[-1]["t_checkpoint"] * 6
    assert status.state.startswith("training (pid ") and (status.rounds_done, status.rounds) == (2, 40)
    assert status.seconds_left == pytest.approx(expected)
    after = run_status(run)  # killed: the run as it was, config.yaml the old config's
    assert (after.state, after.rounds_done, after.rounds) == (before.state, 2, 3)
    cafedist_in_process("train", "--config", str(run / "config.yaml"), "--out", str(run), "--no-progress",
                        check=True)
    assert sorted(p.name for p in run.glob(".*")) == []  # config.yaml written: the record went with it


@pytest.mark.parametrize("finished", [False, True])
def test_a_config_yaml_edited_since_is_a_resume_train_refuses_and_status_says_so(runs, tmp_path, finished):
    """status says what `train --resume auto` under the run's config.yaml does with its newest
    checkpoint, by train's own check: an edit that changes training (train.lr) is refused (a
    finished run then is no longer its summary's); one that does not (dist.timeout_s) is not."""
    run = tmp_path / "run"
    shutil.copytree(runs / ("done" if finished else "stopped"), run)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("timeout_s: 60.0", "timeout_s: 90.0"))
    assert run_status(run).state == ("finished" if finished else "stopped (a resume continues after round 1)")
    (run / "config.yaml").write_text(text.replace("lr: 0.05", "lr: 0.1"))
    newest = run / "checkpoints" / ("round_000002" if finished else "round_000001")
    assert run_status(run).state == f"stopped (a resume is refused: {newest}: written by a different config (use " \
                                    f"--resume force to continue anyway))"
    proc = cafedist_in_process("train", "--config", str(run / "config.yaml"), "--out", str(run), "--no-progress")
    assert proc.returncode != 0 and f"{newest}: written by a different config" in proc.stderr


@pytest.mark.parametrize("manifest", ["null", "[]", '"round 1"'])
def test_a_newest_manifest_that_is_json_but_no_object_is_no_traceback(runs, tmp_path, manifest):
    """status reads the newest manifest (unverified) to say whether a resume is refused: one
    that is JSON but no object (damaged, or edited by hand) was an AttributeError traceback,
    where train skips it as a checkpoint that does not verify."""
    run = tmp_path / "run"
    shutil.copytree(runs / "stopped", run)
    (run / "checkpoints" / "round_000001" / "MANIFEST.json").write_text(manifest)
    assert run_status(run).state == "stopped (a resume continues after round 1)"


def test_rows_past_the_newest_checkpoint_of_a_run_no_process_trains_are_not_counted(runs, tmp_path):
    """`train --resume force train.rounds=30 train.lr=0.2` on this 3-round run, SIGKILLed before
    its first checkpoint, leaves rows of another config until the next train drops them: status
    said "12/3" and the killed attempt's accuracy for a run that holds 2 rounds."""
    run = tmp_path / "run"
    shutil.copytree(runs / "stopped", run)
    kept = run_status(run)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.writelines(json.dumps({"round": r, "acc_per_exit": [0.99, 0.99, 0.99]}) + "\n" for r in range(2, 12))
    status = run_status(run)
    assert status.state == "stopped (a resume continues after round 1; rounds 2..11 trained but not checkpointed)"
    assert (status.rounds_done, status.rounds_trained, status.rounds) == (2, 12, 3)
    assert status.last_exit_accuracy == kept.last_exit_accuracy != 0.99
    with RunLock(run):  # a live session's rows are its progress: counted
        assert run_status(run).rounds_done == 12


def test_eval_state_names_its_round_and_staleness(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "done", run)
    (run / "eval.json").write_text(json.dumps({"round": 2, "budget": {"clients": [{"budget": "macs=0.5"}]}}))
    assert run_status(run).eval == "round 2, budget macs=0.5"
    (run / "eval.json").write_text(json.dumps({"round": 1}))
    assert run_status(run).eval == "round 1, stale: the newest checkpoint is round 2"
    # checkpoints moved or deleted: there is no newest round to compare with ("round None")
    shutil.rmtree(run / "checkpoints")
    assert run_status(run).eval == "round 1, no checkpoint left to compare it with"


def test_eval_state_counts_the_budgets_eval_json_keeps(runs, tmp_path):
    """eval.json keeps every budget `eval --budget` evaluated for its models (`budgets`, in the
    order evaluated; the most recent also as `budget`): status named only the most recent. The
    table says how many there are where there are several; --json lists their keys."""
    run = tmp_path / "run"
    shutil.copytree(runs / "done", run)
    device_file = f"{tmp_path / 'devices.csv'} sha256:{'ab' * 32}"
    entries = {key: {"key": key, "spec": spec, "clients": [{"budget": b} for b in budgets]}
               for key, spec, budgets in (("macs=0.5", "macs=0.5", ["macs=0.5"]),
                                          (device_file, "devices.csv", ["macs=0.25", "loss=1"]),
                                          ("loss=1", "loss=1", ["loss=1"]))}
    (run / "eval.json").write_text(json.dumps({"round": 2, "budget": entries["loss=1"], "budgets": entries}))
    status = run_status(run)
    assert status.eval == "round 2, budget loss=1 (latest of 3)"
    assert status.budgets == ["macs=0.5", device_file, "loss=1"]
    row = json.loads(cafedist_in_process("status", str(run), "--json", check=True).stdout)
    assert row["budgets"] == ["macs=0.5", device_file, "loss=1"]
    table = cafedist_in_process("status", str(run), check=True).stdout.splitlines()
    assert table[1].endswith("  round 2, budget loss=1 (latest of 3)") and "sha256" not in table[1]
    # one budget kept: nothing to count; none (or a damaged `budgets`): an empty list
    (run / "eval.json").write_text(json.dumps({"round": 1, "budget": entries["macs=0.5"],
                                               "budgets": {"macs=0.5": entries["macs=0.5"]}}))
    status = run_status(run)
    assert status.eval == "round 1, budget macs=0.5, stale: the newest checkpoint is round 2"
    assert status.budgets == ["macs=0.5"]
    for budgets in ({}, [3], {"macs=0.5": 3}):
        (run / "eval.json").write_text(json.dumps({"round": 2, "budgets": budgets}))
        assert (run_status(run).eval, run_status(run).budgets) == ("round 2", [])
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    (run / "eval.json").unlink()
    assert run_status(run).budgets == []


def test_damaged_metrics_and_eval_files_are_read_as_damaged_not_a_traceback(runs, tmp_path):
    """A metrics.jsonl with bytes that are no UTF-8 and an eval.json whose budget clients are no
    objects (damage, a hand edit): status ended in a traceback (UnicodeDecodeError,
    AttributeError), exit 1, and the sweep's other runs were not shown."""
    run = tmp_path / "sweep" / "run"
    shutil.copytree(runs / "stopped", run)
    rounds = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(rounds[0] + b"\xff\xfe damaged\n" + b"".join(rounds[1:]))
    (run / "eval.json").write_text(json.dumps({"round": 1, "budget": {"clients": [3, {"budget": "macs=0.5"}]}}))
    shutil.copytree(runs / "done", tmp_path / "sweep" / "other")
    proc = cafedist_in_process("status", str(tmp_path / "sweep"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    status = run_status(run)
    assert (status.rounds_done, status.state) == (1, "stopped (a resume continues after round 1)")  # up to the damage
    assert status.eval == "round 1, budget macs=0.5"
    assert "finished" in proc.stdout.splitlines()[1] and "other" in proc.stdout.splitlines()[1]


@pytest.mark.parametrize("users", ["a config file of the user's", "a run's config"])
def test_a_compare_out_holding_the_users_config_yaml_is_searched_for_its_runs(runs, tmp_path, users):
    """`compare --config exp/config.yaml --out exp`: status took exp for a run by its config.yaml,
    so `cafedist status exp` was an error (a hand-written config lacks sections train writes) or
    one row 'no round finished' for exp itself, and the comparison's runs below were not shown."""
    exp = tmp_path / "exp"
    shutil.copytree(runs / "done", exp / "runs" / "cafedistill" / "seed3")
    if users == "a run's config":
        shutil.copy(runs / "done" / "config.yaml", exp / "config.yaml")
    else:
        (exp / "config.yaml").write_text(yaml.safe_dump({"seed": 3, "train": {"rounds": 3}}))
    (exp / "compare.lock").touch()  # compare's, left in its --out
    for given in (exp, tmp_path):
        assert list(find_runs(given)) == [exp / "runs" / "cafedistill" / "seed3"]
    proc = cafedist_in_process("status", str(exp))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    [row] = proc.stdout.splitlines()[1:]
    assert row.startswith(str(exp / "runs" / "cafedistill" / "seed3")) and " finished " in row

def test_folders_are_searched_and_bad_paths_are_one_line(runs, tmp_path):
    # a run moved aside by --resume none, in a folder whose new run has no config.yaml yet (a
    # moved-aside folder inside a run directory is never reached: the search stops at the run)
    aside = runs / "restarted" / "previous-20260101-000000"
    aside.mkdir(parents=True, exist_ok=True)
    shutil.copy(runs / "done" / "config.yaml", aside / "config.yaml")
    assert [p.name for p in find_runs(runs)] == ["done", "stopped"]
    assert list(find_runs(runs / "restarted")) == []
    # a folder of links to runs kept elsewhere (and a link back up, which must not loop)
    linked = tmp_path / "linked"
    (linked / "group").mkdir(parents=True)
    (linked / "group" / "a").symlink_to(runs / "done")
    (linked / "b").symlink_to(runs / "stopped")
    (linked / "group" / "up").symlink_to(linked)
    assert [p.relative_to(linked).as_posix() for p in find_runs(linked)] == ["b", "group/a"]
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
    # an empty (or partial) config.yaml is no run of the default config ("0/20 no round finished")
    (broken / "config.yaml").write_text("")
    proc = cafedist_in_process("status", str(broken))
    assert proc.returncode == 2 and "0/20" not in proc.stdout
    assert "not a config.yaml train wrote: it lacks the sections seed, data, model" in proc.stderr
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


def test_a_comparison_whose_runs_have_not_begun_is_a_note_not_an_error(tmp_path):
    """`cafedist status OUT` while `cafedist compare --out OUT` checks its configs and prepares the
    data store (minutes for a large dataset), or after it was stopped before any run wrote its
    config: "no run directory in it", exit 2, an error for a state every comparison passes through."""
    out = tmp_path / "cmp"
    (out / "runs" / "fedavg" / "seed3").mkdir(parents=True)
    (out / "runs" / "fedavg" / "seed3" / "train.log").write_text("=== 2026-01-01 00:00:00 cafedist train ...\n")
    (out / "compare.lock").touch()
    proc = cafedist_in_process("status", str(out))
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert proc.stderr.strip() == f"cafedist: note: {out}: no run of the comparison in it has started training " \
                                  "yet (compare checks the configs and prepares the data first, or it was stopped " \
                                  "before)"
    (out / "compare.lock").unlink()  # a folder that is no comparison stays an error
    assert cafedist_in_process("status", str(out)).returncode == 2

def _strict_json(line: str) -> dict:
    """A JSON object as any JSON reader takes it: Python's NaN / Infinity are not JSON."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")
    return json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -30.0])
def test_a_damaged_round_time_or_accuracy_gives_no_estimate_and_valid_json(runs, tmp_path, value):
    """A metrics.jsonl whose `seconds` (or accuracy) is not a finite number >= 0 (train never
    writes one; a hand edit or damage does): the table ended in a traceback (exit 1) on inf
    and nan, --json printed `Infinity` / `NaN`, which no JSON reader takes, and a negative
    time showed as "-1:59:30" left."""
    run = tmp_path / "run"
    shutil.copytree(runs / "stopped", run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r["seconds"] = value
        r["acc_per_exit"] = [value] * len(r["acc_per_exit"])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with RunLock(run):  # training: the state in which the time left is estimated
        table = cafedist_in_process("status", str(run))
        as_json = cafedist_in_process("status", str(run), "--json")
    assert table.returncode == 0 and as_json.returncode == 0, table.stderr + as_json.stderr
    row = _strict_json(as_json.stdout)
    assert row["seconds_left"] is None and row["last_exit_accuracy"] is None
    assert row["state"].startswith("training (pid ") and row["rounds_done"] == 2
    assert " 2/3 " in table.stdout and not re.search(r"-\d+:\d\d:\d\d|nan|inf", table.stdout)


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_a_reader_that_stops_early_ends_it_quietly(runs, unbuffered):
    """`cafedist status SWEEP | head -1` (or `prepare --describe S | head`, `bench ... | head`):
    once the reader had gone, the next write raised BrokenPipeError, printed as a traceback with
    exit status 1. Now it ends quietly as a command killed by SIGPIPE does in a shell: 128 + 13."""
    import subprocess
    import sys

    from conftest import ROOT

    env = env_for_tests()
    env.pop("PYTHONUNBUFFERED")
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    proc = subprocess.Popen([sys.executable, "-m", "cafedist", "status", str(runs), str(runs / "done")], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before anything is written (imports take seconds)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == "", err


def test_time_left_is_read_from_rounds_on_the_current_world_size(runs, tmp_path):
    """A run resumed on another number of ranks: the median of its last 5 rounds mixed rounds
    timed on the old world size with the new ones (here 4 ranks' 100 s rounds with 1 rank's 1 s:
    50.5 s a round left). Rounds on another world size than the newest round's are left out."""
    run = tmp_path / "run"
    shutil.copytree(runs / "stopped", run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    records[0].update(seconds=100.0, world_size=4, clients_per_rank=[1, 1, 1, 1])
    records[1].update(seconds=1.0)
    records[1].pop("t_checkpoint")  # its checkpoint time: another test's subject
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with RunLock(run):
        assert run_status(run).seconds_left == pytest.approx(1.0)  # 1 round left at 1 s


def _resumed_run(runs, tmp_path, earlier: list[float], current: list[float], rounds: int = 10, every: int = 1,
                 t_checkpoint: float | None = None):
    """The stopped run resumed: ``earlier`` the round times of the session that wrote its
    checkpoints, ``current`` those of the live session (this process, holding the lock) that
    resumed from them; its config trains ``rounds`` rounds with a checkpoint ``every`` rounds
    (``t_checkpoint``: the seconds each row records for a checkpoint write). Rows name their
    session by its lock record, as train writes them."""
    run = tmp_path / "run"
    shutil.copytree(runs / "stopped", run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["rounds"], cfg["checkpoint"]["every"] = rounds, every
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    template = {**json.loads((run / "metrics.jsonl").read_text().splitlines()[0]), "train_rounds": rounds}
    extra = {} if t_checkpoint is None else {"t_checkpoint": t_checkpoint}
    rows = [{**template, "round": i, "seconds": s, "session": "otherhost 12 2026-01-01T00:00:00", **extra}
            for i, s in enumerate(earlier)]
    lock = RunLock(run).acquire()
    rows += [{**template, "round": len(earlier) + i, "seconds": s, "session": lock.record, **extra}
             for i, s in enumerate(current)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run, lock


def _status_then_release(run, lock):
    """``run``'s status and its status table while ``lock`` is held, then the lock released."""
    try:
        return run_status(run), cafedist_in_process("status", str(run)).stdout
    finally:
        lock.release()


def test_time_left_prefers_the_current_session_s_rounds(runs, tmp_path):
    """Right after a resume on a faster machine the estimate was the median of the last 5
    rounds, half of them the earlier session's 10 s ones: 33 s for 6 rounds left where the
    current session's 1 s rounds say 6 s. The current session's rounds are read once it has
    any, the earlier one's until then, and status says which."""
    status, table = _status_then_release(*_resumed_run(runs, tmp_path, earlier=[10.0, 10.0], current=[1.0, 1.0]))
    assert status.seconds_left == pytest.approx(6.0) and status.time_left_from == "this session"
    assert "0:00:06 " in table and "earlier session" not in table
    status, table = _status_then_release(*_resumed_run(runs, tmp_path / "none", earlier=[10.0, 10.0], current=[]))
    assert status.seconds_left == pytest.approx(80.0) and status.time_left_from == "earlier session"
    assert "0:01:20 (earlier session)" in table


def test_time_left_includes_the_recorded_checkpoint_writes(runs, tmp_path):
    """A round ends with a checkpoint every `checkpoint.every` rounds and at the last, written
    after its `seconds` were taken: rows that record the write (`t_checkpoint`) add it for each
    checkpoint left (rounds 2..9 with every=2: 4 checkpoints of 3 s besides 8 rounds of 1 s)."""
    status, _ = _status_then_release(*_resumed_run(runs, tmp_path, earlier=[1.0, 1.0], current=[], every=2,
                                                    t_checkpoint=3.0))
    assert status.seconds_left == pytest.approx(8 * 1.0 + 4 * 3.0)  # was 8 s



def test_time_left_is_the_median_of_the_newest_five_rounds(runs, tmp_path):
    """Rounds of 9 s then 1 s, one slow outlier last: the newest five (1, 1, 1, 1, 5) have a
    median of 1 s, so 3 rounds left are 3 s (their mean would say 5.4 s, the oldest five 27 s)."""
    status, _ = _status_then_release(*_resumed_run(runs, tmp_path, earlier=[1.0],
                                                    current=[9.0, 9.0, 9.0, 1.0, 1.0, 1.0, 1.0, 5.0], rounds=12))
    assert status.seconds_left == pytest.approx(3.0)


def test_time_left_counts_the_checkpoint_of_the_last_round(runs, tmp_path):
    """Rounds 2..9 with a checkpoint every 4: after rounds 3 and 7, and after the last (9)."""
    status, _ = _status_then_release(*_resumed_run(runs, tmp_path, earlier=[1.0, 1.0], current=[], every=4,
                                                    t_checkpoint=3.0))
    assert status.seconds_left == pytest.approx(8 * 1.0 + 3 * 3.0)

def test_train_names_each_row_s_session_and_the_checkpoint_before_it(runs, tmp_path):
    """A resumed run's rows tell its sessions apart (their lock records differ), and a row
    after a checkpoint records how long that checkpoint took to write."""
    run = tmp_path / "run"
    shutil.copytree(runs / "stopped", run)
    cafedist_in_process("train", "--config", str(run / "config.yaml"), "--out", str(run), "--no-progress",
                        check=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[1]["session"] != records[2]["session"] and session_starts(records) == [0, 2]
    assert records[2]["session"].split()[1] == str(os.getpid())
    assert {r["train_rounds"] for r in records} == {3}  # each session's train.rounds, for status
    # round 0's checkpoint was written in the first session, before round 1's row; the second
    # session's first row follows no checkpoint of its own
    assert records[1]["t_checkpoint"] >= 0 and not {"t_checkpoint"} & (records[0].keys() | records[2].keys())
    # rows of an older train, without a session, still split where the ranks changed
    plain = [{k: v for k, v in r.items() if k != "session"} for r in records]
    assert session_starts(plain) == [0]
    plain[2]["world_size"] = 2
    assert session_starts(plain) == [0, 2]


def test_a_run_of_no_known_total_shows_a_dash_not_none():
    """A run being moved aside (its config.yaml gone) has no total: '0/-', not '0/None'."""
    from cafedist.status import RunStatus, _row
    row = _row(RunStatus("r", None, 0, None, "being moved aside", None, None, None, None, ""))
    assert row["rounds"] == "0/-"
