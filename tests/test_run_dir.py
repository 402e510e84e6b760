"""Never lose a run (issue 13): validate before touching, one writer per run directory,
--resume none moves a run aside, --resume force keeps config.yaml until a new checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, cafedist, cafedist_in_process, env_for_tests, metrics, summary

from cafedist import RESULTS_VERSION, scaling
from cafedist.cli import main
from cafedist.compare import COMPARE_LOCK_NAME
from cafedist.config import read_run_config
from cafedist.errors import CafeError, CheckpointError, DataError
from cafedist.eval.run import LoadedRun, run_config_file, writing_outputs
from cafedist.run.metrics import run_standing
from cafedist.rundir import (
    LOCK_NAME,
    MOVING_NAME,
    START_TOKEN_NAME,
    RunDirBusy,
    RunLock,
    move_aside,
    outputs_lock,
    unfinished_move,
)
from cafedist.status import run_status


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file (hidden ones included) and directory under ``root`` -> sha256 (or 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``cafedist ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def train_tiny_run(base: Path, store_cache: Path) -> tuple[Path, Path]:
    """(config, run dir) of a finished 2-round tiny run in ``base``, a checkpoint after every round."""
    cfg = base / "tiny.yaml"
    cfg.write_text(TINY.format(rounds=2, clients=4, every=1, cache=store_cache))
    run = base / "finished"
    code, _, err = run_cli("train", "--config", str(cfg), "--out", str(run), "--no-progress")
    assert code == 0, err
    return cfg, run


@pytest.fixture(scope="module")
def finished(tmp_path_factory, store_cache) -> tuple[Path, Path]:
    """(config, run dir) of a finished 2-round tiny run with a checkpoint after every round."""
    return train_tiny_run(tmp_path_factory.mktemp("rundir"), store_cache)


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished[1], copy)
    return copy


def _one_error_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- item 1: --resume none
def test_failed_resume_none_leaves_the_run_untouched(finished, run_copy):
    before = tree_hashes(run_copy)
    code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--resume", "none",
                           "--no-progress", "model.arch=cnnn")
    assert code == 2
    _one_error_line(err, "model.arch")
    assert tree_hashes(run_copy) == before


def test_resume_none_moves_the_old_run_aside(finished, run_copy):
    before = tree_hashes(run_copy)
    code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--resume", "none",
                           "--no-progress", "seed=5")
    assert code == 0, err
    moved = [p for p in run_copy.iterdir() if p.name.startswith("previous-")]
    assert len(moved) == 1
    kept = tree_hashes(moved[0])  # the old run, byte for byte, one level down
    assert kept == {k: v for k, v in before.items() if k != LOCK_NAME}
    assert summary(run_copy)["model_hashes"] != json.loads((moved[0] / "summary.json").read_text())["model_hashes"]
    assert [r["round"] for r in metrics(run_copy)] == [0, 1]


def test_move_aside_never_overwrites_an_earlier_one(tmp_path):
    run = tmp_path / "r"
    for i in range(2):
        run.mkdir(exist_ok=True)
        (run / "config.yaml").write_text(f"v{i}")
        move_aside(run)
    assert sorted((p / "config.yaml").read_text() for p in run.iterdir()) == ["v0", "v1"]
    assert move_aside(run) is None  # nothing left to move


def test_move_aside_takes_every_output_of_the_run_and_nothing_else(tmp_path):
    """train's, eval's (also with --budget and the conflict diagnostic) and compare's kept budget results
    go with the run they describe; a file the user put there stays."""
    run = tmp_path / "r"
    run.mkdir()
    outputs = ("config.yaml", "summary.json", "eval.json", "accuracy_vs_macs.png", "conflict.png", "budget.csv",
               "budget.png", "budgets.json", "budget")
    for name in (*outputs, "notes.txt"):
        (run / name).write_text(name)
    (run / "budget").unlink()
    (run / "budget").mkdir()  # each budget's table and figure that eval keeps
    (run / "budget" / "macs-0.5.csv").write_text("x")
    moved = move_aside(run)
    assert moved is not None and sorted(p.name for p in moved.iterdir()) == sorted(outputs)
    assert sorted(p.name for p in run.iterdir()) == sorted([moved.name, "notes.txt"])


def test_move_aside_takes_the_exports_kept_in_the_run_directory(tmp_path):
    """A folder `cafedist export RUN --out RUN/NAME` wrote describes the run's models: it goes
    with them (it stayed, beside a new run it did not describe). A folder that only looks alike,
    an export still being written (hidden) and an earlier run moved aside stay."""
    run = tmp_path / "r"
    for folder in ("export", "v2", "mine", ".x.export-12ab", "previous-1"):
        (run / folder).mkdir(parents=True)
    (run / "config.yaml").write_text("run")
    for folder in ("export", "v2", ".x.export-12ab", "previous-1"):
        for name in ("export.json", "early_exit.py"):
            (run / folder / name).write_text(name)
    (run / "export" / "client_0000").mkdir()
    (run / "mine" / "export.json").write_text("{}")
    moved = move_aside(run)
    assert moved is not None and sorted(p.name for p in moved.iterdir()) == ["config.yaml", "export", "v2"]
    assert (moved / "export" / "client_0000").is_dir()
    assert sorted(p.name for p in run.iterdir()) == sorted([".x.export-12ab", "mine", moved.name, "previous-1"])
    (run / "v3").mkdir()
    for name in ("export.json", "early_exit.py"):
        (run / "v3" / name).write_text(name)
    assert move_aside(run) is None and (run / "v3").is_dir()  # an export alone is no run to start over from


class Killed(BaseException):
    """A SIGKILL, simulated: nothing of the process runs after it (no except, no finally of cafedist's)."""


def kill_at(monkeypatch, call: str, k: int) -> None:
    """The ``k``-th call (counted from 0) of ``os.<call>`` is where the process is killed."""
    real, done = getattr(os, call), []

    def dying(*args, **kwargs):
        if len(done) == k:
            raise Killed
        done.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(os, call, dying)


_RUN = {"config.yaml": "seed: 0\n", "metrics.jsonl": '{"round": 0}\n', "summary.json": "{}",
        "checkpoints/round_000000/model.pt": "weights", "eval.json": "{}", "export/export.json": "{}",
        "export/early_exit.py": "#"}
#: where a move aside of _RUN (six entries) can be killed: writing its record (the first os.replace),
#: before its folder is made (the second os.mkdir: the first is the record's exist_ok one of the run
#: directory), before each of the six renames, and before its record is removed (the one os.unlink)
KILL_POINTS = [("replace", 0), ("mkdir", 1), *(("replace", k) for k in range(1, 7)), ("unlink", 0)]


@pytest.mark.parametrize("call, k", KILL_POINTS)
def test_a_move_aside_killed_anywhere_is_finished_into_its_one_folder(tmp_path, monkeypatch, call, k):
    """A kill partway through moving a run aside (one rename per entry) left part of it in
    previous-A/ and the rest in the run directory, which the restart's --resume none moved into
    previous-B/: neither a whole run. Now nothing is moved before the move is recorded, the next
    move finishes the recorded one into its own folder, and meanwhile the readers see neither half
    as a run."""
    run = tmp_path / "r"
    for name, text in {**_RUN, "notes.txt": "mine"}.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    before = tree_hashes(run)
    with monkeypatch.context() as m:
        kill_at(m, call, k)
        with pytest.raises(Killed):
            move_aside(run)
    folders = list(run.glob("previous-*"))
    if (call, k) == ("replace", 0):  # killed before its record was in place: nothing moved
        assert folders == [] and unfinished_move(run) is None and tree_hashes(run) == before
    else:
        assert (run / MOVING_NAME).exists() and len(folders) == (call != "mkdir")
        for half in (run, *folders):  # the run directory, and the folder it moves into once made
            assert "moved" in unfinished_move(half), half
            with pytest.raises(CheckpointError, match="previous-"):
                run_config_file(half)  # eval, export, compare --budget
            with pytest.raises(DataError, match="previous-"):
                scaling.load_run(half)  # scaling-report
        assert run_standing(run).summary is None and run_standing(run).rows() == []  # compare, tables
        assert "being moved aside into previous-" in run_status(run).state
    moved = move_aside(run)  # the restart's --resume none (any train finishes it: see below)
    assert list(run.glob("previous-*")) == [moved] and folders in ([], [moved])
    assert tree_hashes(moved) == {k: v for k, v in before.items() if k != "notes.txt"}
    assert sorted(p.name for p in run.iterdir()) == sorted([moved.name, "notes.txt"])
    assert unfinished_move(run) is None and unfinished_move(moved) is None
    assert move_aside(run) is None


@pytest.mark.parametrize("record", ["{", '{"into": "../elsewhere", "names": ["config.yaml"]}', "[]"])
def test_a_record_of_a_move_aside_cafedist_did_not_write_moves_nothing(tmp_path, record):
    """A damaged or foreign .moving-aside is one clear error for train and the readers alike,
    and nothing is moved by it (a name outside the run directory never is)."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    (run / MOVING_NAME).write_text(record)
    before = tree_hashes(run)
    for step in (move_aside, unfinished_move, run_status):
        with pytest.raises(CafeError, match=re.escape(str(run / MOVING_NAME))):
            step(run)
    assert tree_hashes(run) == before


@pytest.mark.parametrize("renamed", [0, 1])
def test_a_half_moved_run_is_neither_trained_on_nor_read_and_any_train_finishes_the_move(finished, run_copy,
                                                                                       monkeypatch, renamed):
    """A --resume none killed after its record of the move, before any rename or after
    config.yaml's: a --resume auto resumed the checkpoints left behind (config.yaml gone) as if
    they were the run, status found no run and eval no config.yaml. Now each reader names the
    move, training into the folder it moves into is refused, and a train of the directory under
    any --resume finishes the move into the same folder and starts over, as asked."""
    before = tree_hashes(run_copy)
    with monkeypatch.context() as m:
        kill_at(m, "replace", 1 + renamed)
        with pytest.raises(Killed):
            move_aside(run_copy)
    [folder] = run_copy.glob("previous-*")
    code, _, err = run_cli("eval", str(run_copy))
    assert code == 2
    _one_error_line(err, "being moved aside into previous-", "`cafedist train`")
    code, out, err = run_cli("status", str(run_copy))
    assert code == 0 and "being moved aside into previous-" in out, out + err
    train = ("train", "--config", str(finished[0]), "--no-progress", "--resume", "auto")
    code, _, err = run_cli(*train, "--out", str(folder))
    assert code == 2
    _one_error_line(err, "is being moved into it")
    code, _, err = run_cli(*train, "--out", str(run_copy))
    assert code == 0, err
    assert list(run_copy.glob("previous-*")) == [folder] and not (run_copy / MOVING_NAME).exists()
    assert tree_hashes(folder) == {k: v for k, v in before.items() if k != LOCK_NAME}
    assert [r["round"] for r in metrics(run_copy)] == [0, 1]  # trained from the start, not resumed


def test_resume_none_moves_an_export_kept_in_the_run_directory_aside_with_it(finished, run_copy):
    """README's `cafedist export RUN --out RUN/export`, then `train --resume none`: the export is
    in previous-*/ with the run it describes, as it was; a file of the user's stays."""
    code, _, err = run_cli("export", str(run_copy), "--out", str(run_copy / "export"), "--threshold", "0.9",
                           "--clients", "0")
    assert code == 0, err
    (run_copy / "notes.txt").write_text("mine")
    exported = tree_hashes(run_copy / "export")
    code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--resume", "none",
                           "--no-progress", "seed=5")
    assert code == 0, err
    [moved] = [p for p in run_copy.iterdir() if p.name.startswith("previous-")]
    assert tree_hashes(moved / "export") == exported
    assert not (run_copy / "export").exists() and (run_copy / "notes.txt").read_text() == "mine"


def test_resume_none_records_who_started_the_run_over(finished, run_copy, monkeypatch):
    """The sbatch templates tell a restart of their job that had started its run over (to be
    continued) from one stopped before it moved the earlier run aside (to start over still) by
    the token the start-over records, its Slurm job's (slurm/_run.sh); one outside Slurm removes
    an earlier's."""
    from cafedist.config import load_config
    from cafedist.train.startup import prepare_run_dir

    cfg, token = load_config(finished[0]), run_copy / START_TOKEN_NAME
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    prepare_run_dir(cfg, run_copy, "none")
    [moved] = run_copy.glob("previous-*")
    assert token.read_text() == "slurm-7" and (moved / "summary.json").exists()
    monkeypatch.setenv("SLURM_JOB_ID", "8")
    prepare_run_dir(cfg, run_copy, "auto")  # resuming it: still job 7's start
    assert token.read_text() == "slurm-7"
    monkeypatch.delenv("SLURM_JOB_ID")  # outside Slurm
    prepare_run_dir(cfg, run_copy, "none")
    assert not token.exists()


def test_every_output_written_about_a_run_moves_aside_with_it():
    """eval's outputs (eval.json, its figures, the --budget CSV and figure) and compare's kept
    budgets are all among the files --resume none moves: none stays beside a new run."""
    from cafedist.compare.budgets import BUDGETS_FILE
    from cafedist.eval.budget_run import BUDGET_OUTPUTS
    from cafedist.eval.run import _EVAL_OUTPUTS
    from cafedist.rundir import RUN_FILES

    assert {*_EVAL_OUTPUTS, *BUDGET_OUTPUTS.values(), BUDGETS_FILE} <= set(RUN_FILES)


# ----------------------------------------------------------------------------- item 2: config.yaml
def test_failed_force_keeps_config_yaml_and_the_right_command_still_works(finished, run_copy):
    cfg = str(finished[0])
    before = tree_hashes(run_copy)
    for bad in ("model.options.widht=4", "model.options.width=8"):  # a typo; a model the checkpoint does not fit
        code, _, err = run_cli("train", "--config", cfg, "--out", str(run_copy), "--resume", "force",
                               "--no-progress", bad)
        assert code == 2
        _one_error_line(err, "model.options.widht" if "widht" in bad else "does not fit")
        assert tree_hashes(run_copy) == before
    code, _, err = run_cli("train", "--config", cfg, "--out", str(run_copy), "--no-progress")
    assert code == 0, err
    code, out, err = run_cli("eval", str(run_copy))
    assert code == 0, err


@pytest.mark.parametrize("first,then", [("fedavg", "fedper"), ("cafedistill", "dsfl")])
def test_another_algorithm_is_refused_alike_under_force_and_auto(tmp_path, tiny_config, first, then):
    """A run continues only under its own algorithm: another's state would not fit (FedAvg's
    average covers every parameter, FedPer's the body) or, worse, fit with another meaning
    (cafedistill's and DS-FL's client targets share a key, not a layout). One line at the
    resume, not a traceback in a round, and the run is left as it was; --resume force (refused
    where the checkpoint is loaded) and auto (refused by the plan) say the same."""
    cfg, run = str(tiny_config(rounds=2)), tmp_path / "run"
    code, _, err = run_cli("train", "--config", cfg, "--out", str(run), "--no-progress", f"algorithm.name={first}")
    assert code == 0, err
    before = tree_hashes(run)
    refusals = []
    for resume in ("force", "auto"):  # refused at the checkpoint's load, and by the plan before anything is built
        code, _, err = run_cli("train", "--config", cfg, "--out", str(run), "--no-progress", "--resume", resume,
                               f"algorithm.name={then}", "train.rounds=3")
        assert code == 2
        refusals.append(_one_error_line(err, f"{run} holds a run of algorithm {first}", "another --out"))
        assert tree_hashes(run) == before
    assert refusals[0] == refusals[1]  # one check, in the same words


def test_force_onto_another_algorithm_is_refused_where_no_manifest_names_it(tmp_path, tiny_config):
    """A run checkpointed before manifests named their algorithm: its config.yaml names it where
    that config wrote the checkpoint (same config hash). cafedistill's client targets fit DS-FL's
    key checks and failed in the first round with an IndexError (a traceback)."""
    cfg, run = str(tiny_config(rounds=2)), tmp_path / "run"
    code, _, err = run_cli("train", "--config", cfg, "--out", str(run), "--no-progress", "algorithm.name=cafedistill")
    assert code == 0, err
    for manifest in run.glob("checkpoints/*/MANIFEST.json"):
        recorded = json.loads(manifest.read_text())
        del recorded["algorithm"]
        manifest.write_text(json.dumps(recorded))
    before = tree_hashes(run)
    code, _, err = run_cli("train", "--config", cfg, "--out", str(run), "--no-progress", "--resume", "force",
                           "algorithm.name=dsfl", "train.rounds=3")
    assert code == 2
    _one_error_line(err, "a run of algorithm cafedistill", "another --out")
    assert tree_hashes(run) == before


@pytest.mark.parametrize("config_yaml", [True, False])
def test_auto_onto_another_algorithm_does_not_advise_force(tmp_path, tiny_config, config_yaml):
    """--resume auto refused a run of another algorithm as 'a different config ... or --resume
    force', advice that force then refused: the refusal names the algorithm, under auto too
    (also judged by the checkpoint's manifest where config.yaml is gone)."""
    cfg, run = str(tiny_config(rounds=2)), tmp_path / "run"
    code, _, err = run_cli("train", "--config", cfg, "--out", str(run), "--no-progress", "algorithm.name=fedavg")
    assert code == 0, err
    if not config_yaml:
        (run / "config.yaml").unlink()
    before = tree_hashes(run)
    code, _, err = run_cli("train", "--config", cfg, "--out", str(run), "--no-progress", "algorithm.name=fedper")
    assert code == 2
    assert "--resume force" not in _one_error_line(err, "a run of algorithm fedavg", "another --out")
    assert tree_hashes(run) == before


# ----------------------------------------------------------------------------- a run without config.yaml
def test_a_run_without_config_yaml_is_judged_by_its_checkpoints(finished, run_copy):
    (run_copy / "config.yaml").unlink()
    before = tree_hashes(run_copy)
    code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--no-progress", "seed=4")
    assert code == 2
    _one_error_line(err, "written by a different config (and", "has no config.yaml")
    assert tree_hashes(run_copy) == before  # no config.yaml of the refused config either
    code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--no-progress")
    assert code == 0, err  # its own config: resumed (nothing left to train), config.yaml back
    assert (run_copy / "config.yaml").is_file()
    assert summary(run_copy)["model_hashes"] == summary(finished[1])["model_hashes"]


def test_a_run_without_config_yaml_is_its_own_under_another_algorithms_section(finished, run_copy):
    """The manifest's run identity decides, not the full hash: a config that also sets another
    algorithm's parameters is this run's config, as it is with config.yaml in place (the
    finished run trains nothing, keeps its summary and gets config.yaml back)."""
    (run_copy / "config.yaml").unlink()
    kept = (run_copy / "summary.json").read_bytes()
    code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--no-progress",
                           "algorithm.fedprox.mu=0.5")
    assert code == 0, err
    assert "fedprox" in (run_copy / "config.yaml").read_text()
    assert json.loads((run_copy / "summary.json").read_bytes())["model_hashes"] == json.loads(kept)["model_hashes"]
    assert json.loads((run_copy / "summary.json").read_bytes())["wall_seconds"] == json.loads(kept)["wall_seconds"]
    assert [r["round"] for r in metrics(run_copy)] == [0, 1]


def test_config_yaml_of_a_killed_resume_under_another_algorithms_section_still_resumes(finished, run_copy):
    """A resume under a config file that differs only in another algorithm's section rewrites
    config.yaml at once, while the checkpoints keep the earlier file's hash until the next one:
    killed in between, the run was refused under the very file it had last accepted ("written
    by a different config"). Its checkpoints' manifests record the run identity, which is this
    run's: accepted (the finished run trains nothing and keeps its models), and status agrees."""
    from cafedist.config import dump_config, load_config
    from cafedist.status import run_status

    killed_resume = load_config(finished[0], ["algorithm.fedprox.mu=0.5"])
    (run_copy / "config.yaml").write_text(dump_config(killed_resume))  # what that resume left
    (run_copy / "summary.json").unlink()  # unfinished: status then asks whether a resume would load
    assert run_status(run_copy).state == "stopped (a resume continues after round 1)"
    code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--no-progress",
                           "algorithm.fedprox.mu=0.5")
    assert code == 0, err
    assert summary(run_copy)["model_hashes"] == summary(finished[1])["model_hashes"]


def test_a_run_without_config_yaml_hashes_its_newest_checkpoint_once(finished, run_copy, monkeypatch):
    """Deciding whose run it is (twice: before and under the lock), which earlier config hash
    it carries and loading it all verify the newest checkpoint: each file is hashed once."""
    import cafedist.run.checkpoint as checkpoint

    (run_copy / "config.yaml").unlink()
    hashed: list[str] = []
    real = checkpoint._hash_file
    monkeypatch.setattr(checkpoint, "_hash_file", lambda path: hashed.append(Path(path).name) or real(path))
    code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--no-progress")
    assert code == 0, err
    newest = json.loads((run_copy / "checkpoints" / "round_000001" / "MANIFEST.json").read_text())
    assert sorted(hashed) == sorted([*newest["files"], *newest.get("refs", {})])


def test_the_verification_memo_sees_a_replaced_file(tmp_path):
    """Inside the memo a file replaced by another of the same size (a new inode, as a
    re-committed checkpoint is) is hashed again; outside it nothing is remembered."""
    from cafedist.run.checkpoint import sha256_file, verification_memo

    f = tmp_path / "shard.pt"
    f.write_bytes(b"a" * 64)
    with verification_memo():
        first = sha256_file(f)
        spare = tmp_path / "new.pt"
        spare.write_bytes(b"b" * 64)
        spare.replace(f)
        assert sha256_file(f) != first
    f.write_bytes(b"c" * 64)
    assert sha256_file(f) == hashlib.sha256(b"c" * 64).hexdigest()


def test_results_without_config_yaml_or_checkpoints_are_never_overwritten(finished, run_copy):
    (run_copy / "config.yaml").unlink()
    shutil.rmtree(run_copy / "checkpoints")
    before = tree_hashes(run_copy)
    for resume in ("auto", "force"):
        code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--no-progress",
                               "--resume", resume)
        assert code == 2
        _one_error_line(err, "holds results (summary.json, metrics.jsonl) but no config.yaml", "--resume none")
        assert tree_hashes(run_copy) == before


def test_a_users_own_config_in_out_is_not_replaced(finished, run_copy, tmp_path):
    folder = tmp_path / "exp"
    folder.mkdir()
    mine = folder / "config.yaml"
    mine.write_text("# my experiment\n" + finished[0].read_text())
    for config in (mine, finished[0]):  # given as --config, or not: train would replace it all the same
        for resume in ("auto", "force"):
            code, _, err = run_cli("train", "--config", str(config), "--out", str(folder), "--no-progress",
                                   "--resume", resume)
            assert code == 2
            _one_error_line(err, f"{mine} has comments, so train did not write it")
            assert mine.read_text().startswith("# my experiment")
            assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]
    # a file of the user's without comments: it lacks sections every config.yaml train wrote has
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("seed: 7\ndata: {dataset: digits}\n")
    code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(other), "--no-progress")
    assert code == 2
    _one_error_line(err, "lacks the sections train writes (model, train, algorithm, comm, dist, checkpoint)")
    assert (other / "config.yaml").read_text() == "seed: 7\ndata: {dataset: digits}\n"
    # a run's own config.yaml (the resolved config train wrote) may be given back to train, also
    # one written before fields were added (it no longer matches today's resolved text) with a
    # '#' inside a value (no comment)
    own = run_copy / "config.yaml"
    text = "".join(line for line in own.read_text().splitlines(keepends=True)
                   if "optimizer_state:" not in line and "proxy_users:" not in line)
    own.write_text(text.replace("  root: null\n", "  root: '/nowhere #1'\n"))
    assert "#1" in own.read_text()
    code, _, err = run_cli("train", "--config", str(own), "--out", str(run_copy), "--no-progress")
    assert code == 0, err


def test_eval_refuses_models_of_another_config_than_config_yaml(finished, run_copy):
    """An edited config.yaml would describe models it did not train (another seed would even
    score them on another data split): eval must refuse, not print numbers under it."""
    text = (run_copy / "config.yaml").read_text()
    assert "  lr: 0.05\n" in text
    (run_copy / "config.yaml").write_text(text.replace("  lr: 0.05\n", "  lr: 0.1\n"))
    before = tree_hashes(run_copy)
    code, _, err = run_cli("eval", str(run_copy))
    assert code == 2
    assert "written by a different config than" in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert tree_hashes(run_copy) == before


def test_eval_refuses_a_store_replaced_by_another_partition(finished, tmp_path):
    from cafedist.data.prepare import prepare_store
    from cafedist.data.spec import PartitionSpec

    store = tmp_path / "mine.h5"
    run = tmp_path / "run"
    code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run), "--no-progress",
                           f"data.store={store}", "train.rounds=1")
    assert code == 0, err
    prepare_store(store, PartitionSpec("digits", clients=4, alpha=0.1, proxy_fraction=0.1, seed=3))  # another alpha
    code, _, err = run_cli("eval", str(run))
    assert code == 2
    assert "exists with params" in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert not (run / "eval.json").exists()


def _rebuild_digits_store(store: Path, monkeypatch, change_a_pixel: bool) -> None:
    """Build ``store`` again from scratch with the tiny run's partition, from digits as bundled or
    with one pixel of one sample changed (as a store rebuilt from edited or re-downloaded files)."""
    from cafedist.data import prepare as prepare_mod
    from cafedist.data.spec import PartitionSpec

    original = prepare_mod.load_dataset

    def edited(*args, **kwargs):
        raw = original(*args, **kwargs)
        raw.x[0, 0, 0, 0] = 255 - raw.x[0, 0, 0, 0]
        return raw
    store.unlink()
    with monkeypatch.context() as m:
        if change_a_pixel:
            m.setattr(prepare_mod, "load_dataset", edited)
        prepare_mod.prepare_store(store, PartitionSpec("digits", clients=4, alpha=0.5, proxy_fraction=0.1,
                                                       min_size=20, seed=3))


def test_a_store_rebuilt_from_other_data_is_refused_by_eval_export_and_resume(finished, tmp_path, monkeypatch):
    """A store is matched by its partition, so one deleted and built again under its name from
    other files (a dataset re-downloaded or edited since) was taken for the run's: eval and
    export scored the models on samples they were never trained or tested on, and a resume
    trained them on the new samples, silently. The checkpoint records the data it was trained
    on; each refuses in one line naming the checkpoint and the store, and writes nothing."""
    store, run = tmp_path / "mine.h5", tmp_path / "run"
    train = ("train", "--config", str(finished[0]), "--out", str(run), "--no-progress", f"data.store={store}",
             "train.rounds=1")
    code, _, err = run_cli(*train)
    assert code == 0, err
    _rebuild_digits_store(store, monkeypatch, change_a_pixel=True)
    before = tree_hashes(run)
    for argv in (("eval", str(run)), ("export", str(run), "--out", str(tmp_path / "exp"), "--threshold", "0.9"),
                 train, (*train[:-1], "train.rounds=2", "--resume", "force")):
        code, _, err = run_cli(*argv)
        assert code == 2, (argv, err)
        _one_error_line(err, "round_000000", f"was trained on other data than {store} holds now")
    assert tree_hashes(run) == before and not (tmp_path / "exp").exists()
    _rebuild_digits_store(store, monkeypatch, change_a_pixel=False)  # the same data again: the run's store
    code, _, err = run_cli("eval", str(run))
    assert code == 0, err


def test_the_data_refusal_tells_another_partition_from_a_rebuilt_store(tmp_path):
    """A checkpoint recording another partition than the store's was said to have met 'a store of
    the same partition built again'; one recording no data (older manifests) is not refused."""
    from types import SimpleNamespace

    from cafedist.run.checkpoint import CheckpointDir, CheckpointRef, refusal

    store = SimpleNamespace(path=tmp_path / "s.h5", params={"seed": 3}, data_digest=lambda: "now")
    ckpt = CheckpointDir(tmp_path)

    def why(**manifest) -> str | None:
        ref = CheckpointRef(ckpt.root / "round_000001", 1, {"config_hash": "h", **manifest})
        return refusal(ckpt, ref, "h", store=store)
    assert why() is None and why(store_data="now", partition={"seed": 3}) is None
    assert "holds now (a store of the same partition built again since" in why(store_data="then",
                                                                              partition={"seed": 3})
    assert "holds now (another partition)" in why(store_data="then", partition={"seed": 4})


@pytest.mark.parametrize("override", ["train.rounds=1", "train.lr=0.2"])
def test_force_with_nothing_left_to_train_is_refused(finished, run_copy, override):
    """Under a config that trains no round, summary.json would be rewritten to describe models
    that config never trained."""
    before = tree_hashes(run_copy)
    code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--resume", "force",
                           "--no-progress", override)
    assert code == 2
    _one_error_line(err, "nothing would be trained under it")
    assert tree_hashes(run_copy) == before


@pytest.mark.parametrize("override,named", [
    ("data.alpha=0.1", "data.alpha (0.5 vs 0.1)"), ("data.val_fraction=0.2", "data.val_fraction (0.0 vs 0.2)"),
    ("seed=4", "seed (3 vs 4)"), ("data.clients=5", "data.clients (4 vs 5)")])
@pytest.mark.parametrize("config_yaml", [True, False])
def test_force_onto_another_data_partition_is_refused(finished, run_copy, override, named, config_yaml):
    """The models would go on training on other clients' samples and be calibrated and tested
    on splits holding samples they trained on (a leak no result would show): one line naming
    the change, the run untouched. More rounds or another lr on the same partition still go.
    Without config.yaml (deleted by hand) the refusal was skipped: the checkpoint's manifest
    records its partition."""
    if not config_yaml:
        (run_copy / "config.yaml").unlink()
    before = tree_hashes(run_copy)
    force = ("train", "--config", str(finished[0]), "--out", str(run_copy), "--resume", "force", "--no-progress",
             "train.rounds=3")
    code, _, err = run_cli(*force, override)
    assert code == 2
    _one_error_line(err, f"--resume force cannot change the data partition (first difference: {named})")
    assert tree_hashes(run_copy) == before
    code, _, err = run_cli(*force, "train.lr=0.2")
    assert code == 0, err


def test_force_onto_the_same_partition_in_another_cache_goes_on(finished, run_copy, tmp_path):
    """A store of its own elsewhere (another machine's cache) holds the same partition."""
    code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--resume", "force",
                           "--no-progress", "train.rounds=3", f"data.cache_dir={tmp_path / 'elsewhere'}")
    assert code == 0, err


def test_extending_a_run_warns_that_its_eval_json_is_of_earlier_models(finished, run_copy, caplog):
    code, _, err = run_cli("eval", str(run_copy))
    assert code == 0, err
    before = (run_copy / "eval.json").read_bytes()
    with caplog.at_level(logging.WARNING, logger="cafedist"):
        code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--resume", "force",
                               "--no-progress", "train.rounds=3")
    assert code == 0, err
    assert f"{run_copy}/eval.json describes earlier models (round 1); run `cafedist eval" in caplog.text
    assert (run_copy / "eval.json").read_bytes() == before  # the user's to redo, not deleted


def test_force_finishes_a_run_stopped_between_its_final_checkpoint_and_config_yaml(finished, run_copy):
    old = (run_copy / "config.yaml").read_text()
    code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--resume", "force",
                           "--no-progress", "train.rounds=3")
    assert code == 0, err
    (run_copy / "config.yaml").write_text(old)  # as if killed right after the final checkpoint
    code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--resume", "force",
                           "--no-progress", "train.rounds=3")
    assert code == 0, err
    assert "rounds: 3" in (run_copy / "config.yaml").read_text()
    assert run_cli("eval", str(run_copy))[0] == 0


def test_rerunning_a_finished_run_keeps_its_summary(finished, run_copy):
    before = (run_copy / "summary.json").read_bytes()
    code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--no-progress")
    assert code == 0, err
    assert (run_copy / "summary.json").read_bytes() == before  # its wall time too
    (run_copy / "summary.json").unlink()  # a lost summary is written again
    code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--no-progress")
    assert code == 0, err
    assert summary(run_copy)["model_hashes"] == json.loads(before)["model_hashes"]


def test_rerunning_a_run_of_older_code_keeps_its_results_version(finished, run_copy, caplog):
    """A rerun rewrote the summary of a run trained before a RESULTS_VERSION bump with the new
    version, without training: compare then reused the old code's results as current."""
    assert summary(run_copy)["results_version"] == RESULTS_VERSION > 1
    for path in (run_copy / "checkpoints").glob("round_*/MANIFEST.json"):  # as older code wrote them
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "results_version"}))
    (run_copy / "summary.json").write_text(json.dumps({**summary(run_copy), "results_version": 1}))
    caplog.set_level(logging.WARNING, logger="cafedist")
    code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--no-progress")
    assert code == 0, err
    assert summary(run_copy)["results_version"] == 1
    assert f"trained by code of results version 1 (now {RESULTS_VERSION})" in caplog.text


def test_errors_found_by_building_store_or_model_leave_no_run_dir(finished, tmp_path):
    cfg = str(finished[0])
    out = tmp_path / "fresh"
    for bad in ("model.arch=transformer", "model.options.width=0", f"data.store={tmp_path / 'absent' / 'x.h5'}"):
        argv = ["train", "--config", cfg, "--out", str(out), "--no-progress", bad]
        if bad.startswith("data.store"):
            (tmp_path / "absent").mkdir()
            (tmp_path / "absent" / "x.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
        code, _, err = run_cli(*argv)
        assert code == 2, err
        assert not out.exists(), bad
    code, _, err = run_cli("train", "--config", cfg, "--out", str(out), "--no-progress", "train.rounds=1")
    assert code == 0, err


def test_force_writes_config_yaml_only_after_the_first_new_checkpoint(finished, run_copy):
    old = (run_copy / "config.yaml").read_text()
    # round 2 is killed before its checkpoint: the run directory still describes the old config
    proc = cafedist("train", "--config", str(finished[0]), "--out", str(run_copy), "--resume", "force",
                    "--no-progress", "train.rounds=4", env=env_for_tests(CAFEDIST_FAULT="kill@checkpoint:2"))
    assert proc.returncode < 0, proc.stderr[-2000:]
    assert (run_copy / "config.yaml").read_text() == old
    code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--resume", "force",
                           "--no-progress", "train.rounds=4")
    assert code == 0, err
    assert "rounds: 4" in (run_copy / "config.yaml").read_text()
    assert [r["round"] for r in metrics(run_copy)] == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- item 3: one writer
def test_a_second_writer_is_refused_while_the_lock_is_held(finished, run_copy):
    before = tree_hashes(run_copy)
    with RunLock(run_copy) as lock:
        assert lock.path.read_text().split()[1] == str(__import__("os").getpid())
        held = tree_hashes(run_copy)
        code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--no-progress")
        assert code == 2
        _one_error_line(err, "in use by another cafedist train", f"pid {__import__('os').getpid()}")
        assert tree_hashes(run_copy) == held
        code, _, err = run_cli("eval", str(run_copy))  # eval takes no lock
        assert code == 0, err
    assert (run_copy / LOCK_NAME).read_text() == ""  # released: no holder recorded
    assert tree_hashes(run_copy)[LOCK_NAME] == before[LOCK_NAME]


def test_two_trainings_on_one_directory_one_is_refused(tiny_config, tmp_path):
    cfg = tiny_config(rounds=4, every=1)
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "cafedist", "train", "--config", str(cfg), "--out", str(out),
                              "--no-progress"], cwd=ROOT, env=env_for_tests(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "round_000000").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # mid-run, holding the lock, for as long as the second one needs
    try:
        second = cafedist_in_process("train", "--config", str(cfg), "--out", str(out), "--no-progress")
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert second.returncode == 2, second.stderr[-2000:]
    errors = [ln for ln in second.stderr.splitlines() if not ln.startswith("[cafedist r")]
    assert len(errors) == 1 and "in use by another cafedist train" in errors[0], second.stderr
    assert [r["round"] for r in metrics(out)] == list(range(4))


def test_a_stale_lock_is_taken_over_with_a_message(finished, run_copy, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_copy / LOCK_NAME).write_text(f"{__import__('socket').gethostname()} {dead.pid} 2020-01-01T00:00:00\n")
    with caplog.at_level(logging.WARNING, logger="cafedist"):
        lock = RunLock(run_copy).acquire()
    lock.release()
    assert f"stale lock of pid {dead.pid}" in caplog.text and "no longer running" in caplog.text


def test_lock_refusal_names_the_holder(tmp_path):
    with RunLock(tmp_path / "r"):
        with pytest.raises(RunDirBusy, match=r"in use by another cafedist train \(pid \d+ on "):
            RunLock(tmp_path / "r").acquire()


# ----------------------------------------------------------------------------- item 5: eval's round
def test_eval_names_the_round_and_checkpoint_it_evaluated(finished, run_copy, monkeypatch):
    monkeypatch.chdir(run_copy.parent)  # RUN given relative: eval.json's paths are still absolute
    code, out, err = run_cli("eval", run_copy.name)
    assert code == 0, err
    report = json.loads((run_copy / "eval.json").read_text())
    assert (report["round"], report["final_round"], report["partial"]) == (1, 1, False)
    assert report["checkpoint"] == str(run_copy / "checkpoints" / "round_000001")
    assert report["run_dir"] == str(run_copy) and report["paths"]["json"] == str(run_copy / "eval.json")
    assert f"evaluated round 1 (final round 1) from checkpoint {report['checkpoint']}" in out
    assert report["acc_per_exit"] == summary(run_copy)["acc_per_exit"]


def test_eval_finds_a_relative_store_from_elsewhere_through_its_checkpoint(run_copy, store_cache, tmp_path,
                                                                          monkeypatch, caplog):
    config = run_copy / "config.yaml"
    assert str(store_cache) in config.read_text()
    config.write_text(config.read_text().replace(str(store_cache), "stores"))  # as if trained in another folder
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    caplog.set_level(logging.INFO, logger="cafedist")
    code, _, err = run_cli("eval", str(run_copy))  # the manifest records where the store was
    assert code == 0, err
    store = read_run_config(run_copy / "config.yaml").data.store_path(3).name
    assert f"using {store_cache / store}, where training wrote it" in caplog.text
    assert f"loaded {run_copy / 'checkpoints' / 'round_000001'}" in caplog.text and "resumed" not in caplog.text
    newest = run_copy / "checkpoints" / "round_000001" / "MANIFEST.json"
    newest.write_text("{")  # broken: an older checkpoint's manifest still says where the store is
    code, _, err = run_cli("eval", str(run_copy), "--allow-partial")
    assert code == 0, err
    for manifest in (run_copy / "checkpoints").glob("round_*/MANIFEST.json"):
        if manifest != newest:
            manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items()
                                            if k != "store"}))
    code, _, err = run_cli("eval", str(run_copy), "--allow-partial")  # checkpoints of an earlier version
    assert code == 2
    _one_error_line(err, "the run's data store is missing (a relative path, here "
                    f"{tmp_path / 'elsewhere' / 'stores' / store}", "run from the directory train ran in")


def test_eval_of_an_earlier_round_is_refused_unless_allowed_and_then_flagged(finished, run_copy):
    data = bytearray((run_copy / "checkpoints" / "round_000001" / "client_00002.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (run_copy / "checkpoints" / "round_000001" / "client_00002.pt").write_bytes(bytes(data))
    code, _, err = run_cli("eval", str(run_copy))
    assert code == 2
    _one_error_line(err, "round 0", "not the final round 1", "--allow-partial")
    assert not (run_copy / "eval.json").exists()
    code, out, err = run_cli("eval", str(run_copy), "--allow-partial")
    assert code == 0, err
    assert "WARNING: round 0 is NOT the run's final round 1" in err
    report = json.loads((run_copy / "eval.json").read_text())
    assert (report["round"], report["final_round"], report["partial"]) == (0, 1, True)
    assert report["checkpoint"].endswith("round_000000")
    assert report["model_hashes"] != summary(run_copy)["model_hashes"]


def _other_section_config(tmp_path: Path, store_cache: Path, mu: float) -> Path:
    """A fedavg run whose config file also carries a cafedistill section (as a shared
    `compare` config does)."""
    path = tmp_path / f"mu{mu}.yaml"
    text = TINY.format(rounds=4, clients=4, every=1, cache=store_cache)
    assert "cafedistill: {proxy_size: 64}" in text
    path.write_text(text.replace("cafedistill: {proxy_size: 64}", f"cafedistill: {{proxy_size: 64, mu: {mu}}}"))
    return path


def test_another_algorithms_section_does_not_make_a_run_foreign(tmp_path, store_cache):
    """Changing only the section of an algorithm the run does not use (e.g. a default that
    changed in cafedist) neither refuses the run directory nor its checkpoints, and compare
    still reuses the finished run. Only the stopped run is a process of its own (its fault sends
    it SIGTERM); the other trainings run in this process."""
    from cafedist.compare.plan import Variant, plan_run

    first, second = _other_section_config(tmp_path, store_cache, 0.5), _other_section_config(tmp_path, store_cache, 2.0)
    ref = tmp_path / "ref"
    cafedist_in_process("train", "--config", str(first), "--out", str(ref), "--no-progress", "algorithm.name=fedavg",
                        check=True)
    out = tmp_path / "run"
    stopped = cafedist("train", "--config", str(first), "--out", str(out), "--no-progress", "algorithm.name=fedavg",
                       env=env_for_tests(CAFEDIST_FAULT="term@local:2"))
    assert stopped.returncode == 75
    resumed = cafedist_in_process("train", "--config", str(second), "--out", str(out), "--no-progress",
                                  "algorithm.name=fedavg", check=True)
    assert "resumed" in resumed.stderr
    assert summary(out)["model_hashes"] == summary(ref)["model_hashes"]
    # the finished reference, planned again under the second file, is reused as it is
    variant = Variant("fedavg", "fedavg", ("algorithm.name=fedavg",))
    planned = plan_run(str(second), variant, 3, tmp_path / "cmp")
    planned.run_dir = ref
    assert planned.config_hash != summary(ref)["config_hash"] and planned.finished_summary() is not None
    # rerunning the finished reference under the second file trains nothing and keeps its summary
    # (its wall time), with the hash of the config.yaml it now has
    kept = summary(ref)
    cafedist_in_process("train", "--config", str(second), "--out", str(ref), "--no-progress", "algorithm.name=fedavg",
                        check=True)
    assert summary(ref) == {**kept, "config_hash": planned.config_hash} and kept["wall_seconds"] > 0
    assert planned.finished_summary() is not None
    # a change that matters is still a different config
    refused = cafedist_in_process("train", "--config", str(second), "--out", str(out), "--no-progress",
                                  "algorithm.name=fedavg", "train.lr=0.2")
    assert refused.returncode == 2 and "different config" in refused.stderr and "train.lr" in refused.stderr


def test_different_config_names_a_field_that_decides_the_run(tmp_path):
    """The refusal names the first difference among the fields that make a run another run, not
    one that never does (data.cache_dir differs too, and alone would resume)."""
    from cafedist.config import dump_config, load_config
    from cafedist.errors import CheckpointError
    from cafedist.train.preflight import plan_run_dir

    quickstart = ROOT / "configs" / "quickstart.yaml"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(load_config(quickstart)))
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n')
    moved = load_config(quickstart, ["data.cache_dir=/elsewhere"])
    assert plan_run_dir(moved, run_dir, "auto") is not None  # same run: no refusal
    with pytest.raises(CheckpointError, match=r"first difference: train\.lr") as refused:
        plan_run_dir(load_config(quickstart, ["data.cache_dir=/elsewhere", "train.lr=0.123"]), run_dir, "auto")
    assert "cache_dir" not in str(refused.value)
    # a field the hash leaves out at its default shows both values, not None
    (run_dir / "config.yaml").write_text(dump_config(load_config(quickstart, ["data.val_fraction=0"])))
    with pytest.raises(CheckpointError, match=r"first difference: data\.val_fraction \(0\.0 vs 0\.1\)"):
        plan_run_dir(load_config(quickstart), run_dir, "auto")


def test_different_config_names_a_number_written_another_way(tmp_path):
    """1 and 1.0 in a list or a free-form option make another config hash (another run), and the
    refusal names that field, where it said 'first difference: ?'."""
    from cafedist.config import dump_config, load_config
    from cafedist.train.preflight import plan_run_dir

    quickstart = ROOT / "configs" / "quickstart.yaml"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    weights = "algorithm.cafedistill.exit_weights"
    (run_dir / "config.yaml").write_text(dump_config(load_config(quickstart, [f"{weights}=[1, 1, 2]"])))
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n')
    with pytest.raises(CheckpointError, match=r"first difference: algorithm\.cafedistill\.exit_weights "
                                              r"\(\[1, 1, 2\] vs \[1\.0, 1, 2\]\)"):
        plan_run_dir(load_config(quickstart, [f"{weights}=[1.0, 1, 2]"]), run_dir, "auto")


def test_plan_run_dir_reads_and_parses_config_yaml_once(tmp_path, monkeypatch):
    """Whether train wrote config.yaml (no comments, every section) and which config it holds
    are told from one read and one parse of the file (it was read twice and parsed three times),
    with the same outcomes: the run's own config is planned, a user's file refused."""
    from cafedist import yamlio
    from cafedist.config import dump_config, load_config
    from cafedist.errors import ConfigError
    from cafedist.train.preflight import RunDirPlan, plan_run_dir

    quickstart = load_config(ROOT / "configs" / "quickstart.yaml")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg_file = run_dir / "config.yaml"
    cfg_file.write_text(dump_config(quickstart))
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n')
    reads, parses = [], []
    real_read, real_parse = Path.read_bytes, yamlio.ConfigLoader.get_single_node
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or real_read(self))
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self.name) or real_read(self).decode())
    monkeypatch.setattr(yamlio.ConfigLoader, "get_single_node", lambda self: parses.append(1) or real_parse(self))
    assert plan_run_dir(quickstart, run_dir, "auto") is RunDirPlan.WRITE
    assert (reads.count("config.yaml"), len(parses)) == (1, 1)
    cfg_file.write_text("# mine\n" + dump_config(quickstart))
    with pytest.raises(ConfigError, match="has comments, so train did not write it"):
        plan_run_dir(quickstart, run_dir, "auto")
    assert (reads.count("config.yaml"), len(parses)) == (2, 2)


# ----------------------------------------------------------------------------- what is written about a run's models
# the outputs lock keeps evals, compare --budget and --resume none from mixing runs' results
def test_resume_none_waits_for_no_eval_but_refuses_while_one_writes(finished, run_copy):
    """An eval holding the outputs lock would write the old run's results into the new run."""
    with outputs_lock(run_copy):
        code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--no-progress",
                               "--resume", "none")
    assert code == 2
    _one_error_line(err, "is in use by another cafedist eval, export or compare --budget", "then start over")
    assert not any(p.name.startswith("previous-") for p in run_copy.iterdir())


def test_eval_refuses_to_write_about_a_run_started_over_since_it_loaded(run_copy):
    loaded = LoadedRun(run=None, restored=None, done=1, final=1, incarnation=-1)  # another checkpoints folder
    with pytest.raises(CheckpointError, match="started over .* while its models were read; nothing written"):
        with writing_outputs(run_copy, loaded, {}):
            pass


def test_eval_refuses_to_write_into_a_run_a_killed_start_over_left_half_moved(run_copy, monkeypatch):
    """An eval that loaded the models, then waited for the outputs lock while a --resume none
    moved the run aside and was killed after config.yaml's rename: checkpoints/ (the
    incarnation) is still there, but writing would split the old run's outputs across two
    previous-* folders."""
    from cafedist.eval.run import _incarnation
    loaded = LoadedRun(run=None, restored=None, done=1, final=1, incarnation=_incarnation(run_copy))
    with monkeypatch.context() as m:
        kill_at(m, "replace", 1)  # config.yaml moved, the rest not
        with pytest.raises(Killed):
            move_aside(run_copy)
    outputs_lock(run_copy).acquire().release()  # the lock's file is eval's to make
    before = tree_hashes(run_copy)
    with pytest.raises(CheckpointError, match="started over .* while its models were read; nothing written"):
        with writing_outputs(run_copy, loaded, {}):
            pass
    assert tree_hashes(run_copy) == before


def test_a_broken_move_record_above_a_run_is_not_the_runs_business(tmp_path):
    """unfinished_move reads a parent's .moving-aside only for a previous-* folder: a broken one
    in a folder holding runs made every run below it unreadable."""
    (tmp_path / MOVING_NAME).write_text("{half")
    (tmp_path / "run").mkdir()
    assert unfinished_move(tmp_path / "run") is None
    with pytest.raises(CafeError, match=re.escape(str(tmp_path / MOVING_NAME))):
        unfinished_move(tmp_path / "previous-20260101-000000")


def test_a_second_eval_waits_and_a_killed_evals_temporary_files_go(run_copy):
    stale = run_copy / ".eval.json.0123abcd.tmp"
    stale.write_text("{half")
    lock = outputs_lock(run_copy).acquire()
    threading.Timer(3.0, lock.release).start()
    t0 = time.monotonic()
    code, _, err = run_cli("eval", str(run_copy))
    assert code == 0, err
    assert time.monotonic() - t0 >= 3.0  # waited for the holder
    assert not stale.exists()
    assert json.loads((run_copy / "eval.json").read_text())["round"] == 1


def test_one_compare_per_out(finished, tmp_path):
    out = tmp_path / "cmp"
    with RunLock(out, COMPARE_LOCK_NAME, holder="cafedist compare"):
        code, _, err = run_cli("compare", "--config", str(finished[0]), "--algorithms", "fedavg", "--seeds", "1",
                               "--out", str(out))
    assert code == 2
    _one_error_line(err, "is in use by another cafedist compare")
    assert sorted(p.name for p in out.iterdir()) == [COMPARE_LOCK_NAME]
    for tune in ([], ["--tune", "--grid", "train.lr=0.1,0.2"]):  # a bad config creates no --out (the lock would)
        code, _, err = run_cli("compare", "--config", str(finished[0]), "--algorithms", "fedavg", "--seeds", "1",
                               "--out", str(tmp_path / "new"), "train.roundz=2", *tune)
        assert code == 2 and "train.roundz" in err and not (tmp_path / "new").exists()


@pytest.mark.parametrize("bound", [None, 1])  # 1: every client parked after loading, none resident
def test_compare_budgets_refuse_models_trained_on_since_the_summary(finished, run_copy, bound):
    from cafedist.compare.budgets import run_budgets
    from cafedist.eval.budget_run import BudgetOptions

    if bound is not None:  # train.resident_clients is not part of the run's identity
        text = (run_copy / "config.yaml").read_text()
        assert "  resident_clients: null\n" in text
        (run_copy / "config.yaml").write_text(text.replace("  resident_clients: null\n",
                                                           f"  resident_clients: {bound}\n"))
    summary = json.loads((run_copy / "summary.json").read_text())
    summary["model_hashes"] = {k: "0" * 16 for k in summary["model_hashes"]}
    with pytest.raises(CheckpointError, match="not the models of the summary.json compare read"):
        run_budgets(run_copy, summary, [BudgetOptions("macs=0.5")])
    assert not (run_copy / "budgets.json").exists()


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` read-only for this process: chmod for a user, a read-only bind mount for root
    (whom file modes do not stop); skips the test where neither can be had."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    mount = shutil.which("mount")
    if mount is None or subprocess.run([mount, "--bind", str(path), str(path)], capture_output=True).returncode:
        pytest.skip("root without bind mounts: no way to make a directory read-only")
    try:
        if subprocess.run([mount, "-o", "remount,ro,bind", str(path)], capture_output=True).returncode:
            pytest.skip("root without read-only remounts: no way to make a directory read-only")
        yield
    finally:
        subprocess.run([shutil.which("umount") or "umount", str(path)], capture_output=True)


def test_eval_of_a_run_directory_it_cannot_write_is_refused_before_loading(run_copy, caplog):
    """eval writes into the run directory: an archived or someone else's run it cannot write is
    refused in one line before the models are loaded and evaluated, not after."""
    before = tree_hashes(run_copy)
    caplog.set_level(logging.INFO, logger="cafedist")
    with read_only(run_copy):
        code, _, err = run_cli("eval", str(run_copy))
    assert code == 2
    _one_error_line(err, f"{run_copy}: cannot write into the run directory", "eval writes eval.json")
    assert "loaded" not in caplog.text  # no checkpoint was read
    assert tree_hashes(run_copy) == before


def test_eval_of_a_run_without_a_checkpoint_yet_says_so(run_copy):
    shutil.rmtree(run_copy / "checkpoints")
    code, _, err = run_cli("eval", str(run_copy))
    assert code == 2  # a finished run whose checkpoints are gone is not told to wait for them
    _one_error_line(err, "the run finished (summary.json) but has no checkpoint", "moved or deleted")
    (run_copy / "summary.json").unlink()  # a run that has not finished a checkpoint interval yet
    code, _, err = run_cli("eval", str(run_copy))
    assert code == 2
    _one_error_line(err, "no checkpoint yet to evaluate (a run writes its first after 1 round(s)")


def test_a_refused_second_train_leaves_the_runners_parked_clients(finished, run_copy):
    """The parked clients of a run training with client_state: disk are its working state: a
    second train refused by the lock once deleted them on its way out (the first then died)."""
    parked = run_copy / "client_state" / "rank00000" / "client_000001.pt"
    parked.parent.mkdir(parents=True)
    parked.write_bytes(b"the runner's state")
    with RunLock(run_copy):  # the run training now
        code, _, err = run_cli("train", "--config", str(finished[0]), "--out", str(run_copy), "--no-progress",
                               "train.resident_clients=1", "train.client_state=disk")
    assert code == 2
    _one_error_line(err, "is in use by another cafedist train")
    assert parked.read_bytes() == b"the runner's state"


@pytest.mark.parametrize("before,after,named", [
    (["data.dataset=femnist", "data.partition=natural"], ["data.dataset=digits"],
     "data.dataset ('femnist' vs 'digits')"),
    (["data.dataset=femnist"], ["data.dataset=femnist", "data.partition=natural"],
     "data.partition ('dirichlet' vs 'natural')")])
def test_force_onto_another_dataset_or_partition_kind_names_that_field(tmp_path, before, after, named):
    """Not the first field of the changed record in sorted order, whose meaning the change of
    kind took away: 'data.alpha (0.5 vs None)'."""
    from cafedist.config import dump_config, load_config
    from cafedist.train.preflight import plan_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(load_config(None, before)))
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n')
    with pytest.raises(CheckpointError, match=re.escape(f"data partition (first difference: {named})")):
        plan_run_dir(load_config(None, after), run_dir, "force")
