"""DepthFL: depth-scaled clients, mutual self-distillation between exits, layer-wise averaging.

Source: Kim, Yu, Kim, Moon, "DepthFL: Depthwise Federated Learning for Heterogeneous
Clients" (ICLR 2023); reference: the Flower baseline ``baselines/depthfl`` (adap/flower).
Clients are split into equal groups holding the first 1, 2, ..., m blocks of the network
with their exits (the reference: client ``i`` holds ``i // (n / 4) + 1`` of 4 blocks; here
``equal_groups`` by client id over m depths, identical for n divisible by m). A client of
depth d trains blocks and exits ``0..d-1`` with, for every exit i,
``CE(z_i, y) + w_t * mean_{j != i} KL(softmax(z_j).detach() || softmax(z_i))`` (temperature 1),
``w_t = exp(-5 (1 - min(t, R) / R)^2)``. Each layer is averaged over the clients that hold it
(``shared_mask`` False beyond a client's depth), so a layer no active client holds is left
untouched.

Deviations:

* no FedDyn: the reference trains with FedDyn's dynamic regulariser (alpha = 0.1); we average
  with plain (sample-weighted) FedAvg, like every other baseline here, so the comparison
  isolates depth scaling and self-distillation;
* the ramp-up length R is ``rampup * train.rounds`` (reference: 300 of 1000 rounds, so
  ``rampup`` defaults to 0.3) instead of a fixed 300 rounds, so short runs reach full KD;
* evaluation: DepthFL learns one global model; every client keeps a copy of it
  (``non_holders_receive``: a shallow client receives the holders' average of the layers it
  does not train) and is evaluated with it at every exit on its own test split, as
  FedAvg-EE is. This needs the loop to honour ``Algorithm.non_holders_receive``; without it a
  shallow client's deep layers keep their initial weights;
* no learning-rate decay and no classifier ensembling at test time (we report each exit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cafedist.algorithms.base import Check, ClientView, LocalBatch, Setup
from cafedist.algorithms.common import DepthScaled, equal_groups, exits_ce, mutual_distillation

_KD_WEIGHT = "depthfl.kd_weight"  # client state: w_t of the current round


@dataclass
class DepthFLParams:
    """DepthFL's self-distillation switch and ramp-up."""

    kd: bool = True  # mutual self-distillation between the client's exits
    rampup: float = 0.3  # w_t reaches 1 after rampup * train.rounds rounds (reference 300 / 1000)

    def checks(self) -> list[Check]:
        return [("rampup", 0 <= self.rampup <= 1, "in [0, 1]")]


def consistency_weight(round_idx: int, rampup_rounds: float) -> float:
    """``exp(-5 (1 - min(t, R) / R)^2)``: the sigmoid-shaped ramp-up of the KD weight (1 when R = 0)."""
    if rampup_rounds <= 0:
        return 1.0
    phase = 1.0 - min(float(round_idx), rampup_rounds) / rampup_rounds
    return math.exp(-5.0 * phase * phase)


class DepthFL(DepthScaled):
    """Depth-truncated clients, layer-wise averaging over holders, mutual self-distillation."""

    name = "depthfl"
    Params = DepthFLParams

    def __init__(self, params: DepthFLParams, setup: Setup):
        super().__init__(params, setup)
        self.depths = [g + 1 for g in equal_groups(setup.num_clients, setup.num_exits)]

    @classmethod
    def rounds_dependence(cls, params: DepthFLParams, rounds: int, done: int, new_rounds: int) -> list[str]:
        # round 0's weight is exp(-5) under any ramp; a later one differs while either ramp runs
        if not params.kd or params.rampup == 0 or done < 2 or params.rampup * max(rounds, new_rounds) <= 1:
            return []
        return [f"depthfl's self-distillation weight ramped up over rampup {params.rampup} x {rounds} rounds "
                f"in rounds 0-{done - 1}"]

    def on_local_start(self, client: ClientView, round_idx: int) -> None:
        w = consistency_weight(round_idx, self.params.rampup * self.setup.rounds) if self.params.kd else 0.0
        client.state[_KD_WEIGHT] = torch.tensor(w, dtype=torch.float64)

    def local_loss(self, state: dict[str, Tensor], batch: LocalBatch) -> Tensor:
        loss = exits_ce(batch.logits, batch.y)
        w = float(state.get(_KD_WEIGHT, 0.0))
        if w > 0 and len(batch.logits) > 1:
            loss = loss + w * sum(mutual_distillation(batch.logits))
        return loss
