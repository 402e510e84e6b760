"""Atomic file output (:mod:`cafedist.fsutil`): modes, failures, and the names errors give."""

from __future__ import annotations

import errno
import os
import signal
import stat
from pathlib import Path

import pytest

from cafedist.fsutil import atomic_output, replaced_together, write_text_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("old_mode", [None, 0o600, 0o444])
def test_outputs_get_the_umask_mode_not_mkstemps_private_one(tmp_path, old_mode):
    """Results are readable by the user's group as usual; a file written by an older version
    (0600) or write-protected (0444) is replaced all the same (the rename needs only the
    folder to be writable)."""
    path = tmp_path / "eval.json"
    if old_mode is not None:
        path.write_text("old\n")
        path.chmod(old_mode)
    write_text_atomic(path, "{}\n")
    assert path.read_text() == "{}\n" and _mode(path) == 0o666 & ~_umask()


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


def test_replaced_together_replaces_and_removes_only_when_the_block_ends(tmp_path):
    a, b, stale = tmp_path / "eval.json", tmp_path / "budget.csv", tmp_path / "budget.png"
    for path in (a, b, stale):
        path.write_text("old\n")
    with pytest.raises(KeyboardInterrupt), replaced_together(remove=[stale]):
        write_text_atomic(a, "new\n")
        assert a.read_text() == "old\n"  # deferred
        raise KeyboardInterrupt
    assert [p.read_text() for p in (a, b, stale)] == ["old\n"] * 3
    assert sorted(os.listdir(tmp_path)) == ["budget.csv", "budget.png", "eval.json"]
    with replaced_together(remove=[stale]):
        write_text_atomic(a, "new\n")
        with replaced_together():  # joins the outer block
            write_text_atomic(b, "new\n")
        assert b.read_text() == "old\n"
        with atomic_output(tmp_path / "now.txt", now=True) as tmp:  # for a caller that reads it back
            tmp.write_text("x")
        assert (tmp_path / "now.txt").read_text() == "x"
    assert a.read_text() == b.read_text() == "new\n" and not stale.exists()


def test_a_failure_removes_the_folders_made_for_its_outputs_and_only_those(tmp_path):
    """A failed write (or block of them) left the folders it made for its outputs, empty (a
    failed `eval --budget` left RUN/budget/): they go with the temporary files; a folder that
    was there before stays, and so does one that got another file meanwhile."""
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(KeyboardInterrupt), replaced_together():
        write_text_atomic(tmp_path / "new" / "deep" / "a.csv", "x")
        write_text_atomic(kept / "b.csv", "x")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["kept"] and os.listdir(kept) == []
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "alone" / "c.csv") as tmp:  # outside a block
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == ["kept"]
    with pytest.raises(KeyboardInterrupt), replaced_together():
        write_text_atomic(tmp_path / "shared" / "d.csv", "x")
        (tmp_path / "shared" / "mine.txt").write_text("mine")
        raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["kept", "shared"] and os.listdir(tmp_path / "shared") == ["mine.txt"]
    with replaced_together():  # written: the folder stays
        write_text_atomic(tmp_path / "done" / "e.csv", "x")
    assert (tmp_path / "done" / "e.csv").read_text() == "x"


@pytest.mark.parametrize("named", ["absolute", "relative"])
def test_the_listing_file_is_replaced_first(tmp_path, monkeypatch, named):
    """A kill amid the commit must not leave a file the listing (eval.json) does not list; the
    listing may be named relative to the working directory and written by its absolute path
    (eval: RUN as typed, its outputs absolute)."""
    monkeypatch.chdir(tmp_path)
    order = []
    real = os.replace
    stale = tmp_path / "old.png"
    stale.write_text("old\n")
    monkeypatch.setattr(os, "replace", lambda src, dst: order.append((Path(dst).name, stale.exists()))
                        or real(src, dst))
    with replaced_together(remove=[stale], first=tmp_path / "eval.json" if named == "absolute" else Path("eval.json")):
        write_text_atomic(tmp_path / "budget.csv", "x\n")
        write_text_atomic(tmp_path / "budget.png", "x\n")
        write_text_atomic(tmp_path / "eval.json", "{}\n")
        write_text_atomic(tmp_path / "accuracy_vs_macs.png", "x\n")
    # the stale file goes before any rename (a kill mid-commit leaves no file nothing lists)
    assert order == [(name, False) for name in ("eval.json", "budget.csv", "budget.png", "accuracy_vs_macs.png")]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_amid_the_commit_waits_until_the_whole_set_is_replaced(tmp_path, monkeypatch, signum):
    """A Ctrl-C or a SIGTERM (kill, Slurm) arriving between two renames of the commit must not
    leave the new eval.json beside the budget.csv it replaced: the set is committed whole, and
    the interrupt raised after it."""
    from cafedist.interrupts import noticed_interrupts

    files = [tmp_path / name for name in ("eval.json", "budget.csv", "budget.png")]
    for path in files:
        path.write_text("old\n")
    real = os.replace

    def replace_then_signal(src, dst):
        real(src, dst)
        if Path(dst).name == "eval.json":
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(os, "replace", replace_then_signal)
    with pytest.raises(KeyboardInterrupt), noticed_interrupts(stop_signals=True), \
            replaced_together(first=files[0]):
        for path in files:
            write_text_atomic(path, "new\n")
    assert [p.read_text() for p in files] == ["new\n"] * 3
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in files)  # no temporary file left


def test_a_write_that_fails_without_a_file_name_names_the_target(tmp_path):
    """A full disk fails a write with ENOSPC and no file name: the error names the output."""
    path = tmp_path / "client_00003.pt"
    with pytest.raises(OSError) as info, atomic_output(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("exc, line", [
    (OSError(errno.ENOSPC, "No space left on device"), "cafedist: error: No space left on device"),
    (OSError(errno.ENOSPC, "No space left on device", "run/metrics.jsonl"),
     "cafedist: error: run/metrics.jsonl: No space left on device"),
])
def test_storage_errors_are_one_line_with_status_2(monkeypatch, capsys, exc, line):
    from cafedist import cli

    def fail(args):
        raise exc

    monkeypatch.setitem(cli.COMMANDS, "train", (*cli.COMMANDS["train"][:2], fail))
    assert cli.main(["train", "--config", "x.yaml"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]


def test_a_file_system_without_locks_is_one_line_naming_the_lock(tmp_path, monkeypatch, caplog, capsys):
    """lockf's ENOLCK (NFS mounted nolock) was taken for a lock another process holds: "waiting
    for ..." and then, from the blocking call, an OSError without a file name: a traceback.
    Now an error naming the lock file, as the CLI prints a path's OSError: one line, exit 2."""
    import fcntl

    from cafedist import cli
    from cafedist.fsutil import exclusive_lock

    def no_locks(fd, how):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    lock = tmp_path / "s.h5.lock"
    with pytest.raises(OSError, match="must support POSIX locks") as raised:
        with exclusive_lock(lock, "another process"):
            pass
    assert raised.value.filename == str(lock) and raised.value.errno == errno.ENOLCK
    assert "waiting for" not in caplog.text
    code = cli.main(["prepare", "--dataset", "digits", "--clients", "3", "--alpha", "0.5", "--proxy-fraction", "0.1",
                     "--out", str(tmp_path / "s.h5")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"cafedist: error: {lock}: cannot lock"), err
