"""What a run records about the software and machines it trained on (cafedist/provenance.py)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from cafedist import provenance
from cafedist.train.startup import _with_environment

STACK = {"cafedist": "0.1.0", "python": "3.11.7", "torch": "2.13.0", "numpy": "2.0", "cuda": None, "cudnn": None}


def test_an_environment_summarizes_the_ranks_machines():
    machines = [{"host": "n2", "cpu": "EPYC", "device": "H100"}, {"host": "n1", "cpu": "EPYC", "device": "H100"},
                {"host": "n1", "cpu": "Xeon", "device": "A100"}]
    env = provenance.environment(STACK, machines)
    assert env == {**STACK, "hosts": ["n1", "n2"], "cpus": ["EPYC", "Xeon"], "devices": ["A100", "H100"]}


def test_this_process_software_and_machine():
    soft = provenance.software()
    assert soft["torch"] == torch.__version__ and soft["cuda"] == torch.version.cuda
    assert set(provenance.machine(torch.device("cpu"))) == {"host", "cpu", "device"}
    assert provenance.machine(torch.device("cpu"))["device"] == "cpu"


def test_only_result_changing_fields_are_differences():
    before = provenance.environment(STACK, [{"host": "a", "cpu": "EPYC", "device": "cpu"}])
    moved = provenance.environment({**STACK, "python": "3.12.0"}, [{"host": "b", "cpu": "EPYC", "device": "cpu"}])
    assert provenance.result_differences(before, moved) == []  # another host or Python: the same bits
    other = provenance.environment({**STACK, "torch": "2.14.0"}, [{"host": "a", "cpu": "Xeon", "device": "cpu"}])
    assert provenance.result_differences(before, other) == ["torch: 2.13.0 -> 2.14.0", "cpus: EPYC -> Xeon"]
    assert provenance.result_differences({"torch": "2.13.0"}, other) == ["torch: 2.13.0 -> 2.14.0"]  # older record


def test_a_stack_is_recorded_once_whatever_nodes_it_ran_on():
    first = provenance.environment(STACK, [{"host": "a", "cpu": "EPYC", "device": "cpu"}])
    requeued = provenance.environment(STACK, [{"host": "b", "cpu": "EPYC", "device": "cpu"}])
    assert _with_environment(None, first) == [first]
    assert _with_environment([first], requeued) == [first]  # a requeue onto another node of the cluster
    newer = provenance.environment({**STACK, "torch": "2.14.0"}, [{"host": "b", "cpu": "EPYC", "device": "cpu"}])
    assert _with_environment([first], newer) == [first, newer]
    assert _with_environment("garbage", first) == [first]  # a malformed record is no stack


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_reading_the_checkout_state_writes_nothing_into_it(tmp_path):
    """Every run's rank 0 asks git for the checkout's commit and whether it changed. A plain
    `git status` refreshes the index: it takes .git/index.lock and rewrites .git/index whenever a
    file's stat data is stale, so a sweep's jobs wrote into the user's repository, and a
    `git commit` of the user's at that moment failed on the lock. Now it is read-only."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "f.py").write_text("x = 1\n")
    git("add", "f.py")
    git("commit", "-qm", "one")
    later = os.stat(tmp_path / "f.py").st_mtime_ns + 10**10
    os.utime(tmp_path / "f.py", ns=(later, later))  # same content, stale stat data in the index
    index = tmp_path / ".git" / "index"
    before = (index.read_bytes(), index.stat().st_mtime_ns)
    assert provenance._git_state(tmp_path) == {"commit": git("rev-parse", "HEAD"), "dirty": False}
    assert (index.read_bytes(), index.stat().st_mtime_ns) == before
    assert not (tmp_path / ".git" / "index.lock").exists()


def test_the_checkout_is_read_whatever_git_repository_the_environment_names(tmp_path, monkeypatch):
    """A GIT_DIR exported in the user's shell (for another repository) made git answer for that
    one: the run recorded a commit that is not the code's."""
    def git(repo, *args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True,
                              env={k: v for k, v in os.environ.items() if not k.startswith("GIT_")}).stdout.strip()

    code, other = tmp_path / "code", tmp_path / "other"
    for repo, text in ((code, "x = 1\n"), (other, "y = 2\n")):
        repo.mkdir()
        git(repo, "init", "-q")
        (repo / "f.py").write_text(text)
        git(repo, "add", "f.py")
        git(repo, "commit", "-qm", repo.name)
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(other))
    assert provenance._git_state(code) == {"commit": git(code, "rev-parse", "HEAD"), "dirty": False}
