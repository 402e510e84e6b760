"""Federated algorithms behind one small interface (see :mod:`cafedist.algorithms.base`).

Adding an algorithm means adding one module that defines a subclass of
:class:`~cafedist.algorithms.base.Algorithm` and registering it in :data:`ALGORITHMS`.
"""

from __future__ import annotations

from cafedist.algorithms.base import Algorithm, ClientView, LocalBatch, Phase, Setup
from cafedist.algorithms.cafedistill import CAFEDistill
from cafedist.algorithms.fedavg import FedAvg, FedProx
from cafedist.errors import ConfigError

ALGORITHMS: dict[str, type[Algorithm]] = {
    CAFEDistill.name: CAFEDistill,
    FedAvg.name: FedAvg,
    FedProx.name: FedProx,
}


def get_algorithm(name: str, field_name: str = "algorithm.name") -> type[Algorithm]:
    """Look up an algorithm class by name, with a clear error listing the choices."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(f"{field_name}: unknown algorithm {name!r} "
                          f"(choices: {', '.join(sorted(ALGORITHMS))})") from None


__all__ = ["ALGORITHMS", "Algorithm", "ClientView", "LocalBatch", "Phase", "Setup", "get_algorithm"]
