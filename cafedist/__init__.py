"""cafedist: a cluster trainer for personalized federated learning with early-exit networks.

The package is organised as rooms that data flows through one way:
``data`` (loaders, partition, HDF5 store) -> ``models`` (early-exit networks) ->
``algorithms`` (what a client minimises, what it sends, how it is aggregated) ->
``dist`` (ranks, placement, collectives) -> ``train`` (clients, the round loop,
checkpoints) -> ``eval`` (per-exit and dynamic-inference metrics).
"""

__version__ = "0.1.0"
