"""Writing torch objects to files without an in-memory copy, with errors a user can read.

``torch.save`` into a file object streams through the object's ``write``; when that write
fails (a full disk), torch replaces the OSError by an opaque RuntimeError ("unexpected pos").
:func:`save_torch_to` keeps the OSError and raises it instead, and hashes the bytes as they go
by, so a checkpoint's sha256 needs no second read of the file.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import IO, Any

import torch


class _HashingWriter(io.RawIOBase):
    """A write-only stream over ``fh`` that hashes what it writes and keeps the first OSError."""

    def __init__(self, fh: IO[bytes]) -> None:
        super().__init__()
        self._fh = fh
        self.sha256 = hashlib.sha256()
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            written = self._fh.write(view)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.sha256.update(view[:written])
        return written


def save_torch_to(obj: Any, fh: IO[bytes], path: str | Path) -> str:
    """``torch.save(obj)`` streamed into the open binary file ``fh`` (named ``path`` in errors);
    returns the sha256 of the bytes written. A failed write raises its OSError (ENOSPC,
    EDQUOT, ...) with ``path`` as its filename, not torch's RuntimeError."""
    writer = _HashingWriter(fh)
    try:
        torch.save(obj, writer)
    except (RuntimeError, OSError):  # torch wraps a failed write in a RuntimeError, except sometimes the first
        if writer.error is None:
            raise
        error = writer.error
        raise OSError(error.errno, error.strerror, str(path)) from None
    return writer.sha256.hexdigest()


__all__ = ["save_torch_to"]
