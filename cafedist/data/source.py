"""Which source files a store was built from: recorded when it is built, checked when it is reused.

A store is identified by its partition (``params``) alone, so pointing ``data.root`` /
``--root`` at a corrected or different copy of a dataset would reuse the old store without a
word. A store built from files under a data root therefore records, in its root attribute
``source`` (outside ``params``: store names, paths and run identities are unchanged), the
dataset folder the loader resolved, how many files it read, a quick ``stamp`` (sha256 of the
sorted (path relative to that folder, size, mtime_ns) of those files: ``stat`` only) and a
``sha256`` of their contents (in the same order, each file framed by its path and size).

When a store is reused with a root given, the stamp of the files under that root is compared
first; only on a mismatch are their contents hashed (a copy or a touch changes dates, not
contents), and only other contents give one warning. The store is never changed or deleted:
runs may depend on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from cafedist.data.base import SourceFiles
from cafedist.data.registry import SOURCES
from cafedist.data.store import Store
from cafedist.errors import DataError

log = logging.getLogger(__name__)


def _entries(source: SourceFiles) -> list[tuple[str, Path]]:
    """``(path relative to the folder, path)`` of each file, sorted by the relative path."""
    return sorted((Path(os.path.relpath(path, source.folder)).as_posix(), path) for path in source.files)


def quick_stamp(source: SourceFiles) -> str:
    """sha256 of the sorted (relative path, size, mtime_ns) of the files: no content is read."""
    rows = [[rel, (st := path.stat()).st_size, st.st_mtime_ns] for rel, path in _entries(source)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def content_digest(source: SourceFiles) -> str:
    """sha256 over the files' bytes in relative-path order, each preceded by its path and size
    (so bytes moved from one file to the next change it)."""
    digest = hashlib.sha256()
    for rel, path in _entries(source):
        with open(path, "rb") as fh:
            digest.update(json.dumps([rel, os.fstat(fh.fileno()).st_size]).encode() + b"\n")
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def fingerprint(source: SourceFiles) -> dict[str, Any]:
    """The record a store keeps of its source files (its ``source`` attribute)."""
    return {"folder": os.path.abspath(source.folder), "files": len(source.files),
            "stamp": quick_stamp(source), "sha256": content_digest(source)}


def warn_if_other_source(store: Store, root: str | Path | None) -> None:
    """One warning when ``root`` holds other files of ``store``'s dataset than it was built from.

    Silent without a root, for a store without a record (built before stores kept one, or
    from bundled data) and when the dataset's folder cannot be found under ``root`` (the store
    is used as it always was). The store is only read.
    """
    recorded = store.source
    if root is None or recorded is None or store.dataset not in SOURCES:
        return
    try:
        source = SOURCES[store.dataset](str(root))
        if quick_stamp(source) == recorded.get("stamp"):
            return
        same = content_digest(source) == recorded.get("sha256")
    except (DataError, OSError) as exc:  # a root without the dataset: the store is all there is
        log.debug("store %s: source files not checked (%s)", store.path, exc)
        return
    if same:
        log.debug("store %s: the files in %s have other dates than when it was built, the same contents",
                  store.path, source.folder)
        return
    folder = os.path.abspath(source.folder)
    built_from = "" if recorded.get("folder") == folder else f" (built from {recorded.get('folder', '?')})"
    # not "delete it": the runs trained on it, and their eval, read the store by this name
    log.warning("store %s was built from other %s files than %s holds now%s: it is used as it is; to train on "
                "these files, give a new data.store", store.path, store.dataset, folder, built_from)
