"""What a run is made of, for every command that touches one (train, dry-run, eval).

:mod:`~cafedist.run.build` builds a rank's part of a run from its config (store, placement,
algorithm, clients); :mod:`~cafedist.run.client` is the unit of state; :mod:`~cafedist.run.checkpoint`
saves and restores clients; :mod:`~cafedist.run.metrics` holds the round records. Training
(:mod:`cafedist.train`) and evaluation (:mod:`cafedist.eval`) both stand on this package and
never on each other.
"""
