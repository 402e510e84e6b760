"""FedMD: heterogeneous federated learning via model distillation, on early-exit networks.

Source: Li & Wang, "FedMD: Heterogenous Federated Learning via Model Distillation"
(NeurIPS 2019 workshop, arXiv 1910.03581); reference code ``diogenes0319/FedMD_clean``.
Each round the server averages the clients' class scores (logits) on a public alignment
subset into a *consensus*; each client then **digests** it (trains its logits toward the
consensus on the public subset, mean absolute error in the reference) and **revisits** its
private data (CE). Here the round is the two-phase :class:`~cafedist.algorithms.distill.ProxyDistillation`
(digest phase, revisit phase), the public set is the unlabelled proxy set and the alignment
subset is this round's proxy subset P'.

Deviations from the reference:

* no transfer learning on labelled public data (our proxy set is unlabelled), and the
  reference's initial training of every model on its private data is off by default
  (``warmup_rounds`` rounds of private training only; see :mod:`~cafedist.algorithms.distill`);
* early exits: by default exit k digests the consensus of every client's exit k
  (``targets_from: same``); ``targets_from: last`` makes every exit digest the last-exit
  consensus; the revisit phase is summed per-exit CE;
* the digest phase runs ``digest_epochs`` passes of as many steps as the client has private
  batches, each on ``train.proxy_batch_size`` proxy items drawn with replacement from P'
  (the reference iterates once over its 5,000 alignment items), with the client's own SGD;
* the consensus is the mean over the clients that trained this round and whose logits are
  finite (quarantine as in CAFEDistill); the reference averages every client.

Reference defaults kept: consensus = plain (unweighted) mean of raw logits; digest loss L1
(``digest_loss: mse`` for the squared-error variant); one digest epoch per round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from cafedist.algorithms.distill import ProxyDistillation, ProxyDistillParams, mean_over


@dataclass
class FedMDParams(ProxyDistillParams):
    """FedMD hyperparameters (besides the shared proxy-distillation ones)."""


    digest_loss: Literal["l1", "mse"] = "l1"  # reference: Keras mean_absolute_error on logits


class FedMD(ProxyDistillation):
    """Every client digests the mean of all clients' proxy logits, then revisits its data."""

    name = "fedmd"
    Params = FedMDParams

    def combine(self, reps: Tensor, teachers: Tensor) -> Tensor:
        consensus = mean_over(reps, teachers)  # [m', P', C]
        return consensus.unsqueeze(0).expand(reps.shape[0], *consensus.shape)

    def digest_loss(self, student_logits: Tensor, target: Tensor) -> Tensor:
        if self.params.digest_loss == "l1":
            return F.l1_loss(student_logits, target)
        return F.mse_loss(student_logits, target)
