"""FedRep-EE: personal heads trained first with the body frozen, then the shared body.

Source: Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations for
Personalized Federated Learning" (ICML 2021), reference repository lgcollins/FedRep (and
PFLlib's ``clientrep.py``). Every round each client (1) trains its head for ``head_epochs``
with the representation frozen, then (2) trains the representation for
``train.local_epochs`` with the head frozen; only the representation is averaged.

"-EE": the representation is the body (``blocks.*``), the heads are all exit heads
(``heads.*``); both phases minimise CE summed over exits. Deviations: the reference trains
the head for 10 local epochs (``head_epochs`` defaults to 1 here to keep a round as cheap as
the other baselines; set 10 for the reference schedule); the optimizer (SGD with the run's
momentum and weight decay) and its momentum buffers are shared by the two phases, while the
reference builds a separate optimizer per phase.
"""

from __future__ import annotations

from dataclasses import dataclass

from cafedist.algorithms.base import Check, ClientView, Phase
from cafedist.algorithms.common import SharedBody, is_body, is_head


@dataclass
class FedRepParams:
    """FedRep's head schedule (the body phase uses ``train.local_epochs``)."""

    head_epochs: int = 1  # reference: 10

    def checks(self) -> list[Check]:
        return [("head_epochs", self.head_epochs >= 1, ">= 1")]


class FedRep(SharedBody):
    """Heads first (body frozen), then the body (heads frozen); body averaged."""

    name = "fedrep"
    Params = FedRepParams

    def local_phases(self, client: ClientView, round_idx: int) -> list[Phase]:
        return [Phase(name="heads", epochs=self.params.head_epochs, trainable=is_head),
                Phase(name="body", trainable=is_body)]
