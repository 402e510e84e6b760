"""DS-FL: distillation-based semi-supervised FL with entropy reduction averaging (ERA).

Source: Itahara, Nishio, Koda, Morikura, Yamamoto, "Distillation-Based Semi-Supervised
Federated Learning for Communication-Efficient Collaborative Training with Non-IID Private
Data", IEEE Transactions on Mobile Computing 22(1), 2023 (online 2021,
doi 10.1109/TMC.2021.3070013), arXiv 2008.06180;
reference implementations: the authors' description and BlazeFL's DS-FL example
(``kitsuyaazuma/BlazeFL``). Each round the clients upload their soft labels (softmax
outputs) on an open unlabelled subset; the server aggregates them with ERA,
``softmax(mean_j p_j / T)`` with ``T = 0.1``, which sharpens the averaged soft labels
(lower entropy than the plain mean on non-IID data, the method's point); every client then
distils the global soft labels on the open subset (``KL(target || softmax(z))``) and trains
on its private data (CE).

Deviations: the open subset is this round's proxy subset P' and distillation runs at the
start of the next round (digest phase of :class:`~cafedist.algorithms.distill.ProxyDistillation`,
``digest_epochs`` passes of as many steps as the client has private batches); early exits:
exit k distils the ERA of every client's exit k by default (``targets_from``); the mean
runs over the clients that trained this round with finite logits (quarantine); the
server-side model of some DS-FL variants is not trained (clients are what we evaluate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cafedist.algorithms.distill import ProxyDistillation, ProxyDistillParams, mean_over
from cafedist.algorithms.proxy_math import kd_loss


@dataclass
class DSFLParams(ProxyDistillParams):
    """DS-FL hyperparameters (besides the shared proxy-distillation ones)."""


    era_temperature: float = 0.1  # ERA's softmax temperature (reference 0.1)

    def checks(self) -> list[tuple[str, bool, str]]:
        return super().checks() + [("era_temperature", self.era_temperature > 0, "> 0")]


def entropy_reduction_aggregate(probs: Tensor, keep: Tensor, temperature: float) -> Tensor:
    """ERA: ``softmax(mean_j probs_j / T)`` over the kept rows of ``probs`` [n, ..., C]."""
    return torch.softmax(mean_over(probs, keep) / temperature, dim=-1)


class DSFL(ProxyDistillation):
    """Clients distil the entropy-reduced average of everyone's proxy soft labels."""

    name = "dsfl"
    Params = DSFLParams

    def represent(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=-1)

    def combine(self, reps: Tensor, teachers: Tensor) -> Tensor:
        targets = entropy_reduction_aggregate(reps, teachers, self.params.era_temperature)
        return targets.unsqueeze(0).expand(reps.shape[0], *targets.shape)

    def digest_loss(self, student_logits: Tensor, target: Tensor) -> Tensor:
        return kd_loss(student_logits, target)
