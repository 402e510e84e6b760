"""CIFAR-10 / CIFAR-100 from the standard "python version" pickle folders.

- ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` (dicts with
  ``b'data'`` uint8 [N, 3072] and ``b'labels'``), ``batches.meta`` (``b'label_names'``).
- ``cifar-100-python/``: ``train``, ``test`` (``b'data'``, ``b'fine_labels'``), ``meta``
  (``b'fine_label_names'``).

Each row of ``b'data'`` is 1024 red, then 1024 green, then 1024 blue values of a 32x32 image
in row-major order, i.e. exactly ``reshape(N, 3, 32, 32)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cafedist.data.base import RawDataset, SourceFiles, channel_stats, int_labels, load_pickle, resolve_root
from cafedist.errors import DataError


@dataclass(frozen=True)
class _CifarFormat:
    name: str
    folder: str
    files: tuple[str, ...]
    label_key: bytes
    meta_file: str
    names_key: bytes
    num_classes: int
    layout: str

    def source_files(self, root: str | None) -> SourceFiles:
        """The folder under ``root`` and the files read from it: the batches, then the meta
        file where there is one."""
        folder = resolve_root(root, self.folder, self.name, self.files[0], self.layout)
        meta = folder / self.meta_file
        return SourceFiles(folder, tuple(folder / f for f in self.files) + ((meta,) if meta.exists() else ()))


CIFAR10 = _CifarFormat(
    "cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
    b"labels", "batches.meta", b"label_names", 10,
    "the CIFAR-10 python version: data_batch_1..5, test_batch")
CIFAR100 = _CifarFormat(
    "cifar100", "cifar-100-python", ("train", "test"), b"fine_labels", "meta", b"fine_label_names", 100,
    "the CIFAR-100 python version: train, test, meta")


def _read_batch(fmt: _CifarFormat, path) -> tuple[np.ndarray, np.ndarray]:
    batch = load_pickle(path, fmt.name, fmt.layout)
    if not isinstance(batch, dict) or b"data" not in batch or fmt.label_key not in batch:
        keys = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{fmt.name}: {path} lacks b'data'/{fmt.label_key!r} (found {keys}; expected {fmt.layout})")
    try:
        data = np.asarray(batch[b"data"])
    except (ValueError, TypeError):  # ragged rows
        data = np.empty(0, dtype=object)
    labels = int_labels(batch[fmt.label_key], f"{fmt.name}: {path}", fmt.num_classes)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"{fmt.name}: {path} has data {data.dtype} {data.shape} and {len(labels)} labels "
                        f"(expected uint8 [N, 3072] and N labels)")
    return data.reshape(-1, 3, 32, 32), labels


def _class_names(fmt: _CifarFormat, meta: object) -> list[str] | None:
    """The class names of a meta file, or None when it does not hold a list of them (they are a nicety)."""
    names = meta.get(fmt.names_key) if isinstance(meta, dict) else None
    if not isinstance(names, (list, tuple)) or len(names) != fmt.num_classes:
        return None
    return [n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in names]


def _load(fmt: _CifarFormat, root: str | None) -> RawDataset:
    source = fmt.source_files(root)
    batches, meta = source.files[:len(fmt.files)], source.files[len(fmt.files):]
    parts = [_read_batch(fmt, path) for path in batches]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    names = None
    if meta:  # class names are a nicety; the labels suffice
        names = _class_names(fmt, load_pickle(meta[0], fmt.name, fmt.layout))
    mean, std = channel_stats(x)
    return RawDataset(name=fmt.name, x=x, y=y, num_classes=fmt.num_classes, kind="image",
                      mean=mean, std=std, class_names=names, source=source)


def load_cifar10(root: str | None = None) -> RawDataset:
    """CIFAR-10 (train + test pooled) -> uint8 [60000, 3, 32, 32]; ``root`` = the folder or its parent."""
    return _load(CIFAR10, root)


def load_cifar100(root: str | None = None) -> RawDataset:
    """CIFAR-100 fine labels (train + test pooled) -> uint8 [60000, 3, 32, 32]; ``root`` = folder or parent."""
    return _load(CIFAR100, root)
