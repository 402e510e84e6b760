"""``synthetic``: generated users for benchmarks and scale tests only (no accuracy meaning).

``users`` users of ``samples_per_user`` 8x8 grayscale images each (``side`` sets the size),
labels skewed per user (two dominant classes of ``classes``), images a fixed per-class
pattern plus noise, all drawn from one fixed seed: the same dataset every time, with no file
to read. It records its users, so ``data.partition: natural`` makes one client per user,
which is how ``cafedist bench memory`` builds 10,000-client runs through the normal store.
Never use it to claim a result: it is labelled synthetic wherever it appears.
"""

from __future__ import annotations

import numpy as np

from cafedist.data.base import RawDataset, channel_stats
from cafedist.errors import ConfigError


def load_synthetic(root: str | None = None, users: int = 1000, samples_per_user: int = 16, side: int = 8,
                   classes: int = 10) -> RawDataset:
    """The synthetic dataset (``root`` is ignored); see the module docstring."""
    for name, value, low in (("users", users, 2), ("samples_per_user", samples_per_user, 1), ("side", side, 4),
                             ("classes", classes, 2)):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"data.options.{name}: expected an integer >= {low} for dataset synthetic, got {value!r}")
    rng = np.random.default_rng(20261127)
    n = users * samples_per_user
    pattern = rng.integers(0, 256, size=(classes, 1, side, side))
    favourite = rng.integers(0, classes, size=(users, 2))
    pick = rng.random(n) < 0.8  # 80 % of a user's samples come from its two favourite classes
    owner = np.repeat(np.arange(users), samples_per_user)
    y = np.where(pick, favourite[owner, rng.integers(0, 2, size=n)], rng.integers(0, classes, size=n))
    noise = rng.normal(0.0, 40.0, size=(n, 1, side, side))
    x = np.clip(pattern[y] + noise, 0, 255).astype(np.uint8)
    mean, std = channel_stats(x)
    width = len(str(users - 1))
    user_samples = {f"u{u:0{width}d}": np.arange(u * samples_per_user, (u + 1) * samples_per_user, dtype=np.int64)
                    for u in range(users)}
    return RawDataset(name="synthetic", x=x, y=y.astype(np.int64), num_classes=classes, kind="image", mean=mean,
                      std=std, class_names=[str(c) for c in range(classes)], user_samples=user_samples)
