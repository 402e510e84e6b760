"""The command line itself: overrides anywhere among the options, one-line usage errors (issue 13 item 7)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, cafedist_in_process, env_for_tests
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


LAUNCHES = {"torchrun": {"RANK": "{rank}", "WORLD_SIZE": "2", "LOCAL_RANK": "{rank}"},
            "srun": {"SLURM_PROCID": "{rank}", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "{rank}",
                     "SLURM_NODELIST": "node[1-2]"},
            "mpiexec": {"OMPI_COMM_WORLD_RANK": "{rank}", "OMPI_COMM_WORLD_SIZE": "2"}}


@pytest.mark.parametrize("launcher", sorted(LAUNCHES))
def test_a_one_process_command_under_a_launcher_runs_on_rank_0_only(launcher, tiny_config, tmp_path):
    """`srun cafedist eval RUN` in a job of 4 tasks evaluated (and wrote the same files) 4 times,
    `srun cafedist submit` queued the jobs once per task: the other ranks leave it to rank 0."""
    def under(rank: int, *args: str) -> subprocess.CompletedProcess:  # in this process, under the launcher's variables
        env = env_for_tests(**{k: v.format(rank=rank) for k, v in LAUNCHES[launcher].items()})
        return cafedist_in_process(*args, env=env)

    missing = str(tmp_path / "no-such-run")
    rank0, rank1 = under(0, "status", missing), under(1, "status", missing)
    assert rank0.returncode == 2 and missing in rank0.stderr  # rank 0 runs the command
    assert (rank1.returncode, rank1.stdout, rank1.stderr) == (0, "", "")
    rank1 = under(1, "submit", "--config", str(tiny_config()), "--out", str(tmp_path / "jobs"), "--local")
    assert (rank1.returncode, rank1.stdout, rank1.stderr) == (0, "", "")
    assert not (tmp_path / "jobs").exists()


PATH_OPTIONS = [  # (command line, where the parsed path is): every option naming a file or folder
    (["train", "--config", "~/c.yaml", "--out=~/r"], ["config", "out"]),
    (["eval", "~/r", "--budget=~/b.csv"], ["run_dir", "budget"]),
    (["export", "~/r", "--out=~/e", "--budget=~/b.csv"], ["run_dir", "out", "budget"]),
    (["status", "~/r", "~/s"], ["paths"]),
    (["compare", "--config", "~/c.yaml", "--out=~/o", "--budget=~/b.yaml"], ["config", "out", "budget"]),
    (["submit", "--config", "~/c.yaml", "--out=~/o", "--folder=~/f"], ["config", "out", "folder"]),
    (["prepare", "--dataset", "cifar10", "--root=~/raw", "--out=~/s.h5"], ["root", "out"]),
    (["prepare", "--describe=~/s.h5"], ["describe"]),
    (["scaling-report", "~/a", "~/b", "--out=~/rep"], ["run_dirs", "out"]),
]


@pytest.mark.parametrize("argv,dests", PATH_OPTIONS, ids=[a[0] for a, _ in PATH_OPTIONS])
def test_a_leading_tilde_in_a_path_option_is_the_home_folder(argv, dests, monkeypatch, tmp_path):
    """`--out=~/runs/a` (no shell expands that `~`) made a folder named `~` in the working directory."""
    from cafedist.cli import _parse, build_parser

    monkeypatch.setenv("HOME", str(tmp_path))
    args = _parse(build_parser(), argv)
    for dest in dests:
        value = getattr(args, dest)
        for path in value if isinstance(value, list) else [value]:
            assert path.startswith(str(tmp_path) + "/"), (dest, path)
