"""Atomic file output: never leave a half-written file behind.

Everything cafedist writes that a user or a later run reads (stores, metrics summaries,
checkpoints, plots) goes through :func:`atomic_output`: the content is written to a
temporary name in the same directory, flushed and fsynced, then renamed over the target,
so a crash leaves either the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


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


def _umask() -> int:
    """The process's umask. os.umask can only be read by setting it, so this sets it back at
    once; called once, at import, before any thread writes files."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


#: inside :func:`replaced_together`: the (temporary, target) pairs waiting to be renamed
_DEFERRED: contextvars.ContextVar[list[tuple[Path, Path]] | None] = contextvars.ContextVar("deferred", default=None)


@contextlib.contextmanager
def replaced_together() -> Iterator[None]:
    """Files written by :func:`atomic_output` inside this block replace their targets only
    when the block ends without an exception, one after the other; on an exception (a
    failed write, Ctrl-C) none does and the temporary files are removed. For outputs that
    describe each other (eval.json and the files it lists): a failure leaves the old set."""
    pending: list[tuple[Path, Path]] = []
    token = _DEFERRED.set(pending)
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    finally:
        _DEFERRED.reset(token)
    for i, (tmp, target) in enumerate(pending):
        try:
            os.replace(tmp, target)
        except BaseException as exc:
            for later, _ in pending[i:]:
                with contextlib.suppress(FileNotFoundError):
                    later.unlink()
            if isinstance(exc, OSError) and _is_temp_of(exc.filename, target):
                raise OSError(exc.errno, exc.strerror, str(target)) from exc
            raise
    for parent in dict.fromkeys(target.parent for _, target in pending):
        fsync_dir(parent)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched; inside
    :func:`replaced_together` the rename waits for the end of that block. An OSError
    about the temporary file names ``path`` instead (the name a user knows). The file gets the
    mode of the one it replaces, or that of a new file under the umask (mkstemp's temporary
    file is private to its owner, which would hide results from a cluster group).
    ``suffix`` keeps a file extension on the temp name for libraries that look at it
    (e.g. matplotlib picks the format from ``.png``).
    """
    target = Path(path)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            os.fchmod(fd, _mode_for(target))
        finally:
            os.close(fd)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        deferred = _DEFERRED.get()
        if deferred is not None:
            if target.is_dir():  # fail now, with the other outputs not yet replaced
                raise IsADirectoryError(21, "Is a directory", str(target))
            deferred.append((tmp, target))
            return
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if isinstance(exc, OSError) and _is_temp_of(exc.filename, target):
            raise OSError(exc.errno, exc.strerror, str(target)) from exc
        raise


def _is_temp_of(filename: object, target: Path) -> bool:
    """Whether an OSError's ``filename`` is one of :func:`atomic_output`'s temporary names
    for ``target``."""
    if not isinstance(filename, (str, os.PathLike)):
        return False
    name = Path(os.path.abspath(filename))
    return (name.parent == Path(os.path.abspath(target)).parent and name.name.startswith(f".{target.name}.")
            and ".tmp" in name.name)


def _mode_for(target: Path) -> int:
    """Permission bits for a file written over ``target``: its own, or a new file's."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_UMASK


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
