"""pFedGraph-EE: personalized federated learning with an inferred collaboration graph.

Source: Ye, Ni, Wu, Wang, Chen, Wang, "Personalized Federated Learning with Inferred
Collaboration Graphs" (ICML 2023); reference code MediaBrain-SJTU/pFedGraph
(``pytorch/pfedgraph_cosine.py``, ``pytorch/pfedgraph_approx.py``, ``.../utils.py``).

Each round, after local training, rank 0:

1. measures ``d_ij = -cos(dw_i, dw_j)`` between the clients' model updates ``dw = w - w_0``
   since the common initialisation (``cos > 0.9`` counts as 1, as in the reference);
2. solves for every participating client the graph row
   ``a_i = argmin_{x in simplex} x^T (alpha I) x + (d_i - 2 alpha p)^T x`` with ``p`` the
   data-size weights of this round's participants -- in closed form, the Euclidean projection
   of ``p - d_i / (2 alpha)`` onto the simplex (the reference calls cvxpy per client);
3. sends client i its personalized aggregate ``u_i = sum_j a_ij w_j``, which *replaces* the
   client's model (as in the reference) and is the target of the local regulariser.

Local objective: ``CE(all exits) - lam * cos(w, u_i)`` (the ``approx`` variant of the
reference: cosine to the unnormalised aggregated model). Reference defaults alpha = 0.8,
lam = 0.01. Deviation: the reference code *adds* ``lam * cos`` (which pushes the model away
from its aggregate; see the repository's issue #1); we follow the paper's objective, which
rewards similarity. "-EE": CE summed over all exits; the graph is computed on the whole
early-exit network (the reference's ``difference_measure: all``). Graph rows are not kept
across rounds: the reference overwrites every participant's row each round and uses only
this round's participants, so a stored graph would never be read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cafedist.algorithms.base import Check, ClientView, LocalBatch
from cafedist.algorithms.common import exits_ce
from cafedist.algorithms.personalization import ParameterMixing, cosine_from_gram, gram_matrix, load_row
from cafedist.algorithms.proxy_math import simplex_qp_identity

TARGET = "graph.target"  # the client's latest personalized aggregate u_i (row)
SAME_DIRECTION = 0.9  # reference: a cosine above this counts as identical updates


@dataclass
class PFedGraphParams:
    """pFedGraph hyperparameters (reference defaults)."""

    alpha: float = 0.8  # graph QP: weight of ||x||^2 (keeps the graph from collapsing on itself)
    lam: float = 0.01  # weight of the cosine regulariser toward the aggregated model

    def checks(self) -> list[Check]:
        return [("alpha", self.alpha > 0, "> 0"), ("lam", self.lam >= 0, ">= 0")]


def graph_rows(cos: Tensor, p: Tensor, alpha: float, active: Tensor) -> Tensor:
    """Collaboration graph [n, n] from update cosines: one simplex QP per client (closed form)."""
    cos = torch.where(cos > SAME_DIRECTION, torch.ones_like(cos), cos)
    return simplex_qp_identity(-cos, p, alpha, active)


class PFedGraph(ParameterMixing):
    """Similarity-graph personalized aggregation with a cosine pull toward the aggregate."""

    name = "pfedgraph"
    Params = PFedGraphParams

    def local_loss(self, state: dict[str, Tensor], batch: LocalBatch) -> Tensor:
        loss = exits_ce(batch.logits, batch.y)
        target = state.get(TARGET)
        if target is None or self.params.lam == 0:
            return loss
        w = torch.cat([q.reshape(-1) for q in batch.module.parameters()])
        return loss - self.params.lam * F.cosine_similarity(w, target.to(w), dim=0)

    def mixing_weights(self, deltas: Tensor, active: Tensor) -> Tensor:
        cos = cosine_from_gram(gram_matrix(deltas))
        return graph_rows(cos, self.setup.data_weights, self.params.alpha, active)

    def take_mixture(self, client: ClientView, mixture: Tensor) -> None:
        load_row(client.model, self.layout.keys(), mixture)
        client.state[TARGET] = mixture.clone()
