"""FedAvg-EE and FedProx-EE: one global early-exit network, summed per-exit CE.

FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS 2017). FedProx: Li et al., "Federated Optimization in
Heterogeneous Networks" (MLSys 2020), proximal term ``mu/2 ||w - w_g||^2`` toward the global
weights received at the start of the round (reference default mu = 0.01). "-EE": the loss is
the sum of CE over all exits, as in the paper's baselines. Every parameter is averaged
(sample-weighted over the clients that trained), so "personalized" accuracy is the global
model evaluated on each client's own test split.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from cafedist.algorithms.base import Algorithm, Check, ClientView, LocalBatch
from cafedist.algorithms.common import exits_ce, proximal, snapshot


@dataclass
class FedAvgParams:
    """FedAvg has no hyperparameters beyond the training schedule."""


class FedAvg(Algorithm):
    """Sample-weighted averaging of all parameters after local training."""

    name = "fedavg"
    Params = FedAvgParams
    common_init = True

    def local_loss(self, state: dict[str, Tensor], batch: LocalBatch) -> Tensor:
        return exits_ce(batch.logits, batch.y)

    def shared_mask(self, cid: int, key: str, tensor: Tensor) -> bool:
        return True


@dataclass
class FedProxParams:
    """FedProx's proximal coefficient."""

    mu: float = 0.01

    def checks(self) -> list[Check]:
        return [("mu", self.mu >= 0, ">= 0")]


class FedProx(FedAvg):
    """FedAvg plus a proximal term toward the round's global weights."""

    name = "fedprox"
    Params = FedProxParams

    def on_local_start(self, client: ClientView, round_idx: int) -> None:
        client.state.update(snapshot(client.model))

    def local_loss(self, state: dict[str, Tensor], batch: LocalBatch) -> Tensor:
        return exits_ce(batch.logits, batch.y) + proximal(batch.module, state, self.params.mu)
