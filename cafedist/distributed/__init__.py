"""The distributed runtime: launch detection, client placement, collectives.

This package knows nothing about federated learning. It answers "who am I in the job"
(:mod:`~cafedist.distributed.runtime`), "which clients do I host" (:mod:`~cafedist.distributed.placement`)
and moves tensors between ranks with byte accounting and one-line errors
(:mod:`~cafedist.distributed.comm`); :mod:`~cafedist.distributed.client_rows` orders the rows
of a placement by their owners' ids.
"""

from cafedist.distributed.client_rows import ClientRows
from cafedist.distributed.comm import Comm
from cafedist.distributed.placement import place_clients
from cafedist.distributed.runtime import (
    LaunchInfo,
    Runtime,
    detect_launch,
    expand_nodelist,
    init_runtime,
    shutdown_runtime,
)

__all__ = [
    "ClientRows",
    "Comm",
    "LaunchInfo",
    "Runtime",
    "detect_launch",
    "expand_nodelist",
    "init_runtime",
    "place_clients",
    "shutdown_runtime",
]
