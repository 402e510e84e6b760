"""Atomic file output: never leave a half-written file behind.

Everything cafedist writes that a user or a later run reads (stores, metrics summaries,
checkpoints, plots) goes through :func:`atomic_output`: the content is written to a
temporary name in the same directory, flushed and fsynced, then renamed over the target,
so a crash leaves either the old file or the new one, never a truncated one. Inside
:func:`replaced_together` the renames wait for the end of the block, so that files that
describe each other (eval.json and the figures it lists) are replaced as a set or not at all.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NoReturn

from cafedist.interrupts import deferred_interrupts

log = logging.getLogger("cafedist")


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, waiting_for: str) -> Iterator[None]:
    """Hold an exclusive POSIX (fcntl) lock on ``path`` (created if needed; left in place),
    saying at INFO that it waits for ``waiting_for`` when another process holds it.

    lockf (POSIX record locks) rather than flock, because it also works across nodes on
    NFS. The lock file is never deleted: deleting it would let a late process lock a new
    inode while another still holds the old one.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            _raise_unless_held(exc, path)
            log.info("waiting for %s (lock %s)", waiting_for, path)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
            except OSError as exc:
                _raise_unless_held(exc, path, held_is_error=True)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


#: what lockf says when another process holds the lock
_HELD_ERRNOS = frozenset({errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK})


def _raise_unless_held(exc: OSError, path: str | os.PathLike, held_is_error: bool = False) -> None:
    """Re-raise a failed lockf naming the lock file, unless it only says another process holds
    the lock: a file system without POSIX locks (NFS mounted nolock, Lustre without flock)
    refuses with ENOLCK or the like, which is no reason to wait and, unnamed, was a traceback."""
    if exc.errno in _HELD_ERRNOS and not held_is_error:
        return
    raise OSError(exc.errno, f"cannot lock this file ({exc.strerror}): its file system must support POSIX "
                             f"locks (an NFS mount without nolock, Lustre with flock)", str(path)) from None


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a power loss (best effort)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class _Batch:
    """What a :func:`replaced_together` block does when it ends without an exception."""

    renames: list[tuple[Path, Path]] = field(default_factory=list)  # (temporary, target)
    removals: list[Path] = field(default_factory=list)
    made: list[Path] = field(default_factory=list)  # folders made for the outputs: removed (if empty) on failure


#: the innermost active :func:`replaced_together` block (None outside one)
_BATCH: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar("cafedist_batch", default=None)


@contextlib.contextmanager
def replaced_together(remove: Iterable[Path] = (), first: Path | None = None) -> Iterator[None]:
    """Files written by :func:`atomic_output` inside this block replace their targets only when the
    block ends without an exception, and the files in ``remove`` are deleted then too; on an
    exception (a failed write, Ctrl-C) nothing is replaced or deleted and the temporary files
    are removed, with the folders made for them (if nothing else is in them: a failed first
    ``eval --budget`` leaves no empty ``RUN/budget/``). For outputs that describe each other
    (eval.json and the files it lists). The renames at the end run one after another: the set
    changes in a moment, not atomically: the files in ``remove`` go first, then ``first`` (the
    file listing the others) is renamed before them, so a kill amid the commit leaves no file
    that the listing does not name; a Ctrl-C, SIGTERM or SIGUSR1 that arrives during the commit
    is raised after it (:func:`~cafedist.interrupts.deferred_interrupts`), so only a SIGKILL can
    leave the set half replaced. A block inside another joins the outer one."""
    outer = _BATCH.get()
    if outer is not None:
        outer.removals.extend(remove)
        yield
        return
    batch = _Batch(removals=list(remove))
    token = _BATCH.set(batch)
    try:
        yield
    except BaseException:
        _discard(tmp for tmp, _ in batch.renames)
        _remove_made(batch.made)
        raise
    finally:
        _BATCH.reset(token)
    # a Ctrl-C or SIGTERM amid the renames is raised once they are all done: stopping between
    # two would leave a new listing beside the old files it describes (only a SIGKILL can)
    with deferred_interrupts():
        _commit(batch, first)


def _commit(batch: _Batch, first: Path | None) -> None:
    """:func:`replaced_together`'s end: the removals, then the renames (``first`` first)."""
    # stale files first: a kill amid the commit then leaves the old listing naming a missing
    # file (harmless), never a stale file that no listing names
    for path in batch.removals:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if first is not None:  # a stable sort: the others keep their order; named relative or absolute alike
        listing = os.path.abspath(first)
        batch.renames.sort(key=lambda pair: os.path.abspath(pair[1]) != listing)
    for i, (tmp, target) in enumerate(batch.renames):
        try:
            os.replace(tmp, target)
        except BaseException as exc:
            _discard(later for later, _ in batch.renames[i:])
            _raise_named(exc, target)
    for parent in dict.fromkeys(target.parent for _, target in batch.renames):
        fsync_dir(parent)


def remove_together(paths: Iterable[Path]) -> None:
    """Inside :func:`replaced_together`: delete ``paths`` when the block commits (for outputs
    that turn out to be stale only while the block writes the new ones)."""
    batch = _BATCH.get()
    if batch is None:
        raise RuntimeError("remove_together() outside replaced_together()")
    batch.removals.extend(paths)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = "", now: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched, and so are
    the folders above it: those made for it are removed again (if nothing else is in them;
    inside :func:`replaced_together`, when the block fails). Inside
    :func:`replaced_together` the rename waits for the end of that block, unless ``now``
    (for a caller that reads the file back at once). An OSError about the temporary file
    names ``path`` instead (the name a user knows). The file gets the mode of a new file
    under the process's umask. ``suffix`` keeps a file extension on the temp name for
    libraries that look at it (e.g. matplotlib picks the format from ``.png``).
    """
    target = Path(path)
    tmp: Path | None = None
    batch = None if now else _BATCH.get()
    made = [] if batch is None else batch.made  # a block's failure removes them with its temporary files
    try:
        made.extend(_missing_parents(target))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temp(target, suffix)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if batch is not None:
            if target.is_dir():  # fail now, while the block's other outputs are not replaced yet
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(target))
            batch.renames.append((tmp, target))
            return
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException as exc:
        if tmp is not None:
            _discard([tmp])
        if batch is None:
            _remove_made(made)
        _raise_named(exc, target)


def _missing_parents(target: Path) -> list[Path]:
    """The folders above ``target`` that do not exist yet, outermost first."""
    missing = []
    for parent in target.parents:
        if parent.exists():  # a file in the way: mkdir says so, naming it
            break
        missing.append(parent)
    return missing[::-1]


def _remove_made(folders: list[Path]) -> None:
    """Remove the folders :func:`atomic_output` made for outputs not written, innermost first,
    each only if empty: one that got anything else meanwhile stays (and so do those above it)."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _temp_name(target: Path, token: str, suffix: str) -> Path:
    return target.parent / f".{target.name}.{token}.tmp{suffix}"


def remove_stale_temps(target: str | os.PathLike, suffix: str = "") -> list[Path]:
    """Remove the temporary files :func:`atomic_output` left beside ``target`` when its
    process was killed (SIGKILL, a node failure). Only for a caller that knows no one else is
    writing ``target`` now (it holds the lock all writers take). Returns what was removed."""
    target = Path(target)
    pattern = re.compile(re.escape(_temp_name(target, "TOKEN", suffix).name).replace("TOKEN", "[0-9a-f]{8}") + "$")
    try:
        stale = [p for p in target.parent.iterdir() if pattern.match(p.name) and p.is_file()]
    except FileNotFoundError:
        return []
    _discard(stale)
    return stale


def _create_temp(target: Path, suffix: str) -> Path:
    """A new empty file beside ``target`` under a unique hidden name. Created with mode 0o666
    for the kernel to apply the current umask: mkstemp's 0600 would hide results from the
    user's group on a cluster."""
    for _ in range(100):
        tmp = _temp_name(target, secrets.token_hex(4), suffix)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target))


def _discard(paths: Iterable[Path]) -> None:
    for path in list(paths):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _raise_named(exc: BaseException, target: Path) -> NoReturn:
    """Re-raise ``exc``; an OSError about one of ``target``'s temporary files, or about no
    file at all, as one about ``target``."""
    filename = getattr(exc, "filename", None)
    if isinstance(exc, OSError) and filename is None and exc.errno is not None:  # e.g. a write to a full disk
        raise OSError(exc.errno, exc.strerror, str(target)) from exc
    if isinstance(exc, OSError) and isinstance(filename, (str, os.PathLike)):
        name = Path(os.path.abspath(filename))
        if name.parent == Path(os.path.abspath(target)).parent and name.name.startswith(f".{target.name}."):
            raise OSError(exc.errno, exc.strerror, str(target)) from exc
    raise exc


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
