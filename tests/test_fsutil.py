"""Atomic file output (:mod:`cafedist.fsutil`): modes, failures, and the names errors give."""

from __future__ import annotations

import os
import stat

import pytest

from cafedist.fsutil import atomic_output, write_text_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_file_gets_the_umask_mode_not_mkstemps_private_one(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    write_text_atomic(tmp_path / "eval.json", "{}\n")
    assert _mode(tmp_path / "eval.json") == 0o666 & ~mask  # group/others can read results as usual


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "budget.csv"
    path.write_text("old\n")
    path.chmod(0o640)
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n" and _mode(path) == 0o640


def test_a_failure_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_output(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["summary.json"]


def test_an_os_error_names_the_target_not_the_temporary_file(tmp_path):
    target = tmp_path / "budget.png"
    (target / "inside").mkdir(parents=True)  # a directory where the file should go
    with pytest.raises(OSError) as info:
        write_text_atomic(target, "png")
    assert info.value.filename == str(target), info.value
    assert sorted(os.listdir(tmp_path)) == ["budget.png"]  # the temporary file is gone
