"""``cafedist`` with two algorithms that fail on one rank only, for tests/test_rank_failure.py.

``python tests/failing_ranks.py train ...`` (plainly, or as the script of torchrun or mpiexec)
registers them, then runs the command line as ``python -m cafedist`` does:

* ``badrows``: its ``aggregate`` (rank 0 alone) returns no ``back`` row, which ``check_rows``
  refuses, as it would a third-party aggregate's bug;
* ``rank1bug``: FedAvg whose ``local_loss`` raises on rank 1 only (a client-side bug).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cafedist.algorithms import ALGORITHMS
from cafedist.algorithms.base import Algorithm
from cafedist.algorithms.fedavg import FedAvg


class BadRows(Algorithm):
    """Uploads one float per client; aggregate, on rank 0, returns no payload."""

    name = "badrows"

    def upload_spec(self):
        return {"n": ((), torch.float32)}

    def upload(self, client):
        return {"n": torch.zeros(())}

    def payload_spec(self):
        return {"back": ((2,), torch.float32)}

    def aggregate(self, round_idx, gathered, active):
        return {}, {}


class Rank1Bug(FedAvg):
    """FedAvg, but local training raises on rank 1."""

    name = "rank1bug"

    def local_loss(self, state, batch):
        if dist.is_initialized() and dist.get_rank() == 1:
            raise RuntimeError("client-side bug on rank 1")
        return super().local_loss(state, batch)


if __name__ == "__main__":
    ALGORITHMS.update({BadRows.name: BadRows, Rank1Bug.name: Rank1Bug})
    from cafedist.cli import run

    run()
