"""How a dataset becomes a federated store: the partition's parameters and their one set of defaults.

``data.*`` in a run config and ``cafedist prepare``'s flags both describe a
:class:`PartitionSpec`, with the defaults of :class:`~cafedist.config.DataConfig`;
:func:`cafedist.data.prepare.partition_params` validates it into the record a store keeps
(and is compared against).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from cafedist.config import DataConfig


@dataclass(frozen=True)
class PartitionSpec:
    """Dataset, Dirichlet label skew (or the natural partition by user), proxy/test/validation
    shares, minimum client size, seed. ``alpha``/``proxy_fraction`` apply to ``dirichlet`` only."""

    dataset: str
    clients: int
    alpha: float  # Dirichlet concentration of the label skew
    proxy_fraction: float  # share of all samples set aside as the unlabeled proxy set
    test_fraction: float = DataConfig.test_fraction
    val_fraction: float = DataConfig.val_fraction
    min_size: int = DataConfig.min_size
    seed: int = 0
    loader_options: Mapping[str, Any] | None = None  # e.g. agnews {vocab_size, max_len}
    partition: str = DataConfig.partition  # "dirichlet" | "natural" (one client per source user)
    proxy_users: int | None = DataConfig.proxy_users  # natural: users feeding the proxy set (None = all left)

    @classmethod
    def of(cls, data: DataConfig, seed: int) -> PartitionSpec:
        """The partition a run config asks for (``data.*`` and the run's seed)."""
        return cls(data.dataset, clients=data.clients, alpha=data.alpha, proxy_fraction=data.proxy_fraction,
                   test_fraction=data.test_fraction, val_fraction=data.val_fraction, min_size=data.min_size,
                   seed=seed, loader_options=data.options or None, partition=data.partition,
                   proxy_users=data.proxy_users)
