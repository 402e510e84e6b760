"""Training: the run loop (:mod:`.loop`), the round as its steps (:mod:`.round`), local training
(:mod:`.local`, :mod:`.packed`), the coordinator exchange, shared-parameter averaging, round
records, and opt-in diagnostics. What a run is built from lives in :mod:`cafedist.run`."""
