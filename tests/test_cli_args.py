"""The command line itself: overrides anywhere among the options, one-line usage errors (issue 13 item 7)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, env_for_tests
from test_run_dir import run_cli


def test_overrides_may_sit_between_options(tiny_config, tmp_path):
    cfg = tiny_config(rounds=2)
    code, out, err = run_cli("train", "--config", str(cfg), "train.rounds=3", "--out", str(tmp_path / "r"),
                             "algorithm.name=fedavg", "--dry-run", "data.clients=3")
    assert code == 0, err
    assert "algorithm:  fedavg, 3 rounds, 3 of 3 clients per round" in out
    assert not (tmp_path / "r").exists()


def test_a_later_override_wins_wherever_it_sits(tiny_config, tmp_path):
    cfg = tiny_config(rounds=2)
    code, out, err = run_cli("train", "--config", str(cfg), "train.rounds=3", "--dry-run", "train.rounds=5")
    assert code == 0, err
    assert "5 rounds" in out


@pytest.mark.parametrize("argv,needle", [
    (["train", "--config", "c.yaml", "a=1", "--bogus", "b=2"],
     "cafedist train: error: unrecognized arguments: --bogus"),
    (["eval", "run", "extra"], "cafedist eval: error: unrecognized arguments: extra"),
    (["eval", "run", "--max-loss", "x"], "cafedist eval: error: argument --max-loss: invalid float value: 'x'"),
    (["nope"], "cafedist: error: argument COMMAND: invalid choice: 'nope'"),
])
def test_usage_errors_are_one_line(argv, needle):
    code, out, err = run_cli(*argv)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(needle), err


def test_everything_but_submitting_runs_without_submitit(tiny_config, tmp_path):
    """submitit is imported only to submit (the GPU check machine has none): train runs without
    it, and `submit` / `compare --submit` stop with one line before making anything."""
    blocked = ("import runpy, sys; sys.modules['submitit'] = None; sys.argv = ['cafedist', *sys.argv[1:]]; "
               "runpy.run_module('cafedist', run_name='__main__', alter_sys=True)")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", blocked, *args], cwd=ROOT, env=env_for_tests(),
                              capture_output=True, text=True, timeout=300)

    cfg = tiny_config(rounds=1)
    trained = run("train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").exists()
    for args, out in ((("submit", "--config", str(cfg), "--out", str(tmp_path / "job"), "--local"), "job"),
                      (("compare", "--config", str(cfg), "--algorithms", "fedavg", "--out", str(tmp_path / "cmp"),
                        "--submit", "--local"), "cmp")):
        proc = run(*args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip() == ("cafedist: error: submitting jobs needs submitit, which is not installed here "
                                       "(pip install 'submitit>=1.5'; `cafedist train` runs without it)")
        assert not (tmp_path / out).exists()
