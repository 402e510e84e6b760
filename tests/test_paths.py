"""User paths checked before anything is written (cafedist/paths.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cafedist.errors import ConfigError
from cafedist.paths import check_dir_creatable, user_path


def test_a_missing_folder_in_a_writable_parent_passes_and_leaves_nothing(tmp_path):
    check_dir_creatable(tmp_path / "a" / "b", "--out")
    assert list(tmp_path.iterdir()) == []  # the probe folder is gone again, and nothing was made


def test_a_folder_below_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=r"^--out: cannot create .*/f/x: .*/f is a file, not a directory$"):
        check_dir_creatable(tmp_path / "f" / "x", "--out")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_parent_that_refuses_folders_is_refused_up_front():
    """access() says /proc is writable to root; only making a folder there tells it is not
    (submit --folder /proc/x passed its checks and failed at submission)."""
    with pytest.raises(ConfigError, match=r"^--folder: cannot create /proc/cafedist-x in /proc \(.+\)$"):
        check_dir_creatable(Path("/proc/cafedist-x"), "--folder")


def test_user_path_expands_a_leading_tilde_only():
    assert user_path("~/runs") == os.path.join(os.path.expanduser("~"), "runs")
    assert user_path("runs/~x") == "runs/~x"


@pytest.mark.parametrize("below", ["", "run"])
def test_a_link_to_a_missing_folder_is_refused(tmp_path, below):
    """`--out LINK` (or LINK/run) with LINK -> a folder not made yet passed, and train failed
    only after building the whole run, with 'cannot create the run's lock file (File exists)'."""
    (tmp_path / "link").symlink_to(tmp_path / "scratch" / "runs")
    out = tmp_path / "link" / below if below else tmp_path / "link"
    with pytest.raises(ConfigError, match=r"^--out: cannot create .*: .*/link is a link to .*/scratch/runs, which "
                                          r"does not exist \(create it first\)$"):
        check_dir_creatable(out, "--out")
    (tmp_path / "scratch" / "runs").mkdir(parents=True)
    check_dir_creatable(out, "--out")
