"""cafedist: a cluster trainer for personalized federated learning with early-exit networks.

The package is organised as rooms that data flows through one way:
``data`` (loaders, partition, HDF5 store) -> ``models`` (early-exit networks) ->
``algorithms`` (what a client minimises, what it sends, how it is aggregated) ->
``dist`` (ranks, placement, collectives) -> ``train`` (clients, the round loop,
checkpoints) -> ``eval`` (per-exit and dynamic-inference metrics).
"""

__version__ = "0.1.0"

#: Bumped by hand whenever a code change alters what a run computes for an unchanged config
#: (a bug fix in an algorithm, a new default kept out of the config hash, ...). Summaries
#: record it, and ``cafedist compare`` reuses a finished run only when it matches: an older
#: run is moved aside (``--resume none``) and trained again. Summaries without it are 1.
#: 2: ``cafedistill`` with ``shared_body: true`` starts every client from one body (session 12).
#: 3: ``train.amp: fp16`` keeps each client's loss scale across phases and rounds (session 14).
#: 4: ``resnet18``'s GroupNorm groups hold at least 16 values on small maps (inputs of about 24 px or less; session 26).
RESULTS_VERSION = 4
