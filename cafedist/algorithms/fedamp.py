"""FedAMP-EE: federated attentive message passing on early-exit networks.

Source: Huang, Chu, Zhou, Wang, Liu, Pei, Zhang, "Personalized Cross-Silo Federated Learning
on Non-IID Data" (AAAI 2021). Reference implementations: PFLlib (TsingZ0/PFLlib,
``serveramp.py`` / ``clientamp.py`` / ``HeurFedAMP``) and the FedAMP baseline of pFedGraph's
repository (MediaBrain-SJTU/pFedGraph, ``fedamp/utils.py``).

Each round every client uploads its parameters; rank 0 builds for client i a personalized
cloud model ``u_i = sum_j xi_ij w_j`` with attention weights xi (rows sum to 1) and sends it
back; the client then minimises ``CE(all exits) + lam/2 ||w - u_i||^2`` (the paper's squared
norm; PFLlib's term is an unsquared norm of detached tensors, which has no gradient) starting
from its own model (the model itself is not replaced by ``u_i``, as in both references). Two
attentions:

* ``attention: cosine`` (default; the paper's HeurFedAMP for deep networks): self weight
  ``xi_ii = self_weight``, and ``xi_ij = (1 - self_weight) exp(sigma cos_ij) /
  sum_{h != i} exp(sigma cos_ih)``. Defaults sigma = 10, self_weight = 0.3, lam = 1 as in
  pFedGraph's FedAMP baseline (PFLlib's HeurFedAMP default xi = 1 would disable collaboration).
* ``attention: distance`` (the paper's FedAMP): ``xi_ij = alpha_k A'(||w_i - w_j||^2)`` with
  ``A'(x) = exp(-x / sigma) / sigma`` (``kernel_sigma``), ``xi_ii = 1 - sum_{j != i} xi_ij``;
  PFLlib defaults alpha_k = kernel_sigma = 1 (and ``lam`` plays PFLlib's ``lamda / alphaK``).

Deviations: the cosine is taken between the clients' *updates since the common
initialisation* (as in pFedGraph's FedAMP; PFLlib uses raw weights), because clients upload
updates (:class:`~cafedist.algorithms.personalization.ParameterMixing`); squared distances are
identical either way. With ``attention: distance``, if the off-diagonal weights of a row sum
to more than 1 (alpha_k too large for the paper's condition) they are rescaled to sum to 1
instead of giving a negative self weight. Only clients that trained this round take part
(rows and columns of the others are zero). "-EE": CE is summed over all exits and the
attention is computed on the whole early-exit network (body and every exit head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from cafedist.algorithms.base import Check, ClientView, LocalBatch
from cafedist.algorithms.common import exits_ce, proximal
from cafedist.algorithms.personalization import (
    ParameterMixing,
    cosine_from_gram,
    gram_matrix,
    split_row,
    sq_distances_from_gram,
)


@dataclass
class FedAMPParams:
    """FedAMP hyperparameters (defaults: pFedGraph's FedAMP baseline / PFLlib, see module doc)."""

    lam: float = 1.0  # proximal weight toward the personalized cloud model u_i
    attention: Literal["cosine", "distance"] = "cosine"
    sigma: float = 10.0  # cosine attention: exp(sigma * cos)
    self_weight: float = 0.3  # cosine attention: xi_ii
    alpha_k: float = 1.0  # distance attention: message-passing step alpha_k
    kernel_sigma: float = 1.0  # distance attention: A'(x) = exp(-x / sigma) / sigma

    def checks(self) -> list[Check]:
        return [
            ("lam", self.lam >= 0, ">= 0"),
            ("sigma", self.sigma >= 0, ">= 0"),
            ("self_weight", 0 <= self.self_weight <= 1, "in [0, 1]"),
            ("alpha_k", self.alpha_k > 0, "> 0"),
            ("kernel_sigma", self.kernel_sigma > 0, "> 0"),
        ]


def _others(active: Tensor) -> Tensor:
    """Bool [n, n]: j is an active client other than i."""
    n = active.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=active.device)
    return active.unsqueeze(0).expand(n, n) & ~eye


def cosine_attention(sim: Tensor, active: Tensor, sigma: float, self_weight: float) -> Tensor:
    """HeurFedAMP weights [n, n]: ``xi_ii = self_weight``, the rest a softmax of ``sigma cos``.

    A client with no active peer keeps its own model (``xi_ii = 1``).
    """
    others = _others(active)
    logits = torch.where(others, sigma * sim.to(torch.float64), torch.full_like(sim, -torch.inf, dtype=torch.float64))
    has_peer = others.any(dim=1, keepdim=True)
    soft = torch.softmax(torch.where(has_peer, logits, torch.zeros_like(logits)), dim=1) * others
    self_w = torch.where(has_peer.squeeze(1), torch.full_like(soft[:, 0], self_weight), torch.ones_like(soft[:, 0]))
    return (1.0 - self_w).unsqueeze(1) * soft + torch.diag(self_w)


def kernel_attention(sq_dist: Tensor, active: Tensor, alpha_k: float, sigma: float) -> Tensor:
    """FedAMP weights [n, n]: ``xi_ij = alpha_k exp(-d_ij / sigma) / sigma``, ``xi_ii = 1 - sum``."""
    others = _others(active)
    xi = torch.where(others, alpha_k * torch.exp(-sq_dist.to(torch.float64) / sigma) / sigma,
                     torch.zeros_like(sq_dist, dtype=torch.float64))
    total = xi.sum(dim=1, keepdim=True)
    xi = xi / total.clamp_min(1.0)  # keep xi_ii >= 0 when alpha_k is too large
    return xi + torch.diag(1.0 - xi.sum(dim=1))


class FedAMP(ParameterMixing):
    """Attention-weighted personalized cloud models and a proximal pull toward them."""

    name = "fedamp"
    Params = FedAMPParams

    def local_loss(self, state: dict[str, Tensor], batch: LocalBatch) -> Tensor:
        # proximal() is zero until the first u_i has arrived (no ``ref.*`` entries yet)
        return exits_ce(batch.logits, batch.y) + proximal(batch.module, state, self.params.lam)

    def mixing_weights(self, deltas: Tensor, active: Tensor) -> Tensor:
        p = self.params
        gram = gram_matrix(deltas)
        if p.attention == "cosine":
            return cosine_attention(cosine_from_gram(gram), active, p.sigma, p.self_weight)
        return kernel_attention(sq_distances_from_gram(gram), active, p.alpha_k, p.kernel_sigma)

    def take_mixture(self, client: ClientView, mixture: Tensor) -> None:
        keys = self.layout.keys()
        client.state.update({f"ref.{k}": v.clone() for k, v in split_row(mixture, self.layout, keys).items()})
