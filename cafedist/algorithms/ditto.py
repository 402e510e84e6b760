"""Ditto-EE: a global model trained by FedAvg and, next to it, a personal model regularised
toward it.

Source: Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization" (ICML 2021), reference repository litian96/ditto (and PFLlib's
``clientditto.py``). Each round a client (1) trains its personal model ``v`` on
``F_i(v) + lam/2 ||v - w^t||^2``, where ``w^t`` is the global model it holds at the start of
the round, then (2) trains its copy of the global model with plain local SGD; the global
copies are averaged (FedAvg) and the personal model is what the client uses (evaluated).
The personal model starts as a copy of the initial global model, as in the reference.
The paper tunes ``lam`` in {0.05 .. 2}; 0.1 is our default.

"-EE": both models are the same early-exit network and both losses are CE summed over exits.
Deviations: the proximal term is added to the loss (so weight decay and momentum see it)
rather than applied as the reference's perturbed gradient step; the personal phase runs
``personal_epochs`` epochs (default ``train.local_epochs``) where the reference counts steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cafedist.algorithms.base import Algorithm, Check, ClientView, LocalBatch, Phase
from cafedist.algorithms.common import exits_ce, proximal, snapshot

_SYNCED = "ditto.synced"  # client state flag: the personal model was initialised from the global one


@dataclass
class DittoParams:
    """Strength of the pull toward the global model, and the personal schedule."""

    lam: float = 0.1
    personal_epochs: int | None = None  # None: train.local_epochs

    def checks(self) -> list[Check]:
        return [("lam", self.lam >= 0, ">= 0"),
                ("personal_epochs", self.personal_epochs is None or self.personal_epochs >= 1, ">= 1 or null")]


class Ditto(Algorithm):
    """Personal model ("main", evaluated) regularised toward a FedAvg global model ("global")."""

    name = "ditto"
    Params = DittoParams
    common_init = True
    extra_models = ("global",)
    shared_model = "global"

    def on_local_start(self, client: ClientView, round_idx: int) -> None:
        personal, global_ = client.models["main"], client.models["global"]
        if _SYNCED not in client.state:
            personal.load_state_dict(global_.state_dict())
            client.state[_SYNCED] = torch.ones((), dtype=torch.bool)
        client.state.update(snapshot(global_))  # w^t: the regularisation target of this round

    def local_phases(self, client: ClientView, round_idx: int) -> list[Phase]:
        return [Phase(name="personal", model="main", epochs=self.params.personal_epochs),
                Phase(name="global", model="global")]

    def local_loss(self, state: dict[str, Tensor], batch: LocalBatch) -> Tensor:
        loss = exits_ce(batch.logits, batch.y)
        if batch.phase == "personal":
            loss = loss + proximal(batch.module, state, self.params.lam)
        return loss

    def shared_mask(self, cid: int, key: str, tensor: Tensor) -> bool:
        return True
