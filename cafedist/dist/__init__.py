"""The distributed runtime: launch detection, client placement, collectives.

This package knows nothing about federated learning. It answers "who am I in the job"
(:mod:`~cafedist.dist.runtime`), "which clients do I host" (:mod:`~cafedist.dist.placement`)
and moves tensors between ranks with byte accounting and one-line errors
(:mod:`~cafedist.dist.comm`).
"""

from cafedist.dist.comm import Comm
from cafedist.dist.placement import place_clients, rank_of_clients
from cafedist.dist.runtime import (
    LaunchInfo,
    Runtime,
    detect_launch,
    expand_nodelist,
    init_runtime,
    shutdown_runtime,
)

__all__ = [
    "Comm",
    "LaunchInfo",
    "Runtime",
    "detect_launch",
    "expand_nodelist",
    "init_runtime",
    "place_clients",
    "rank_of_clients",
    "shutdown_runtime",
]
