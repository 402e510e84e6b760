"""FedBABU-EE: heads frozen at their common random initialisation, only the body learned
federatedly; the heads are fine-tuned locally after the last round.

Source: Oh, Kim, Yun, "FedBABU: Toward Enhanced Representation for Federated Image
Classification" (ICLR 2022), reference repository jhoon-oh/FedBABU (and PFLlib's
``clientbabu.py``). During federated training the head is randomly initialised and never
updated; the body is trained and averaged. For personalization each client fine-tunes on its
own data for a few epochs (the paper evaluates after 5).

"-EE": the frozen head is every exit head (``heads.*``); the body is ``blocks.*``; the loss is
CE summed over exits. Deviations: the head of a shallow exit includes its small conv, which is
therefore frozen too (the last exit's head is exactly the linear classifier, as in the
paper); fine-tuning runs once, right after the aggregation of the last round, on every client
(also those idle in that round: each has received the final body, and every client is
evaluated), and updates the heads only by default -- the reference code fine-tunes body and
head (``finetune_body: true``).
"""

from __future__ import annotations

from dataclasses import dataclass

from cafedist.algorithms.base import Check, ClientView, Phase
from cafedist.algorithms.common import SharedBody, is_body, is_head


@dataclass
class FedBABUParams:
    """Length and scope of the final local fine-tuning."""

    finetune_epochs: int = 5
    finetune_body: bool = False  # also fine-tune the body (the reference code does)

    def checks(self) -> list[Check]:
        return [("finetune_epochs", self.finetune_epochs >= 0, ">= 0")]


class FedBABU(SharedBody):
    """Body trained and averaged with the heads frozen; heads fine-tuned after the last round."""

    name = "fedbabu"
    Params = FedBABUParams

    @classmethod
    def rounds_dependence(cls, params: FedBABUParams, rounds: int, done: int, new_rounds: int) -> list[str]:
        # the fine-tuning ran after what was the last round: an extension trains on from
        # fine-tuned models and fine-tunes again at its own end
        if done < rounds or params.finetune_epochs == 0:
            return []
        what = "body and heads" if params.finetune_body else "heads"
        return [f"fedbabu fine-tuned the {what} after round {rounds - 1}, the last of {rounds}: later rounds "
                f"continue from the fine-tuned models"]

    def local_phases(self, client: ClientView, round_idx: int) -> list[Phase]:
        return [Phase(name="body", trainable=is_body)]

    def post_phases(self, client: ClientView, round_idx: int, trained: bool) -> list[Phase]:
        if round_idx != self.setup.rounds - 1 or self.params.finetune_epochs == 0:
            return []
        return [Phase(name="finetune", epochs=self.params.finetune_epochs,
                      trainable=None if self.params.finetune_body else is_head)]
