"""KT-pFL: parameterized knowledge transfer for personalized FL, on early-exit networks.

Source: Zhang, Guo, Ma, Wang, Xu, Wu, "Parameterized Knowledge Transfer for Personalized
Federated Learning" (NeurIPS 2021, arXiv 2111.02862); reference code ``cugzj/KT-pFL``
(``src/engine_kt_pfl.py``). The server keeps a *knowledge coefficient matrix* ``c`` [n, n]
(client i's weight on client j's knowledge). Each round the clients upload soft
predictions ``s_j = softmax(z_j / tau)`` on a public subset; the server takes gradient steps
on ::

    sum_i  MSE(s_i, sum_j c_ij s_j)  +  rho * ||c_i - 1/n||^2

and sends client i its personalized soft targets ``sum_j c_ij s_j``; the client distils them
on the public subset (``tau^2 KL(target || softmax(z / tau))``), then trains on its private
data (CE). ``c`` is coordinator state, checkpointed (:meth:`KTpFL.server_state`).

Deviations from the reference:

* after each gradient step every row of ``c`` is projected onto the probability simplex
  (projected gradient descent; the reference instead applies ``softmax(5 c_i)`` after one
  step with a gradient-magnitude-adaptive learning rate), so ``c_i`` is a true mixture;
* "MSE" is the squared error summed over classes (and exits) and averaged over proxy items,
  and the penalty is the squared norm as written in the paper (the reference averages both
  over elements, which leaves the data term negligible next to the penalty);
* the distillation loss carries Hinton's ``tau^2`` factor (the reference's element-mean KL
  omits it: only a rescaling of the step);
* early exits: by default exit k of client i distils ``sum_j c_ij s_j^k`` (one ``c`` for all
  depths, learned on the concatenation of the exits' soft predictions; ``targets_from``);
* the reference's pre-training on private data is off by default (``warmup_rounds``);
* the public subset is this round's proxy subset P'; distillation runs at the start of the
  next round (digest phase of :class:`~cafedist.algorithms.distill.ProxyDistillation`);
* only clients that trained this round with finite logits teach and update their row; a
  learner's row is optimised over the simplex of those teachers (weights on the others
  become 0), and a client's targets use its row renormalised over the teachers.

Reference defaults: ``tau = 10`` (``Temp``), ``rho = 0.7`` (``penalty_ratio``), ``c``
initialised to ``1/n``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cafedist.algorithms.base import Setup
from cafedist.algorithms.distill import ProxyDistillation, ProxyDistillParams
from cafedist.algorithms.proxy_math import kd_loss, project_rows_to_simplex


@dataclass
class KTpFLParams(ProxyDistillParams):
    """KT-pFL hyperparameters (besides the shared proxy-distillation ones)."""


    tau: float = 10.0  # softmax temperature of the soft predictions and of distillation
    rho: float = 0.7  # penalty pulling each row of c toward uniform 1/n
    coef_steps: int = 5  # projected gradient steps on c per round
    coef_lr: float = 0.1  # step size of those steps

    def checks(self) -> list[tuple[str, bool, str]]:
        return super().checks() + [("tau", self.tau > 0, "> 0"), ("rho", self.rho >= 0, ">= 0"),
                                   ("coef_steps", self.coef_steps >= 0, ">= 0"),
                                   ("coef_lr", self.coef_lr > 0, "> 0")]


def coefficient_objective(coef: Tensor, soft: Tensor, items: int, rho: float,
                          rows: Tensor | None = None) -> Tensor:
    """``sum_i ||s_i - sum_j c_ij s_j||^2 / items + rho ||c_i - 1/n||^2`` over ``rows`` (bool [n]).

    ``soft`` [n, D] holds each client's flattened soft predictions (zero rows for clients
    that teach nothing), ``items`` the number of proxy items D covers.
    """
    n = coef.shape[0]
    residual = soft - coef @ soft
    per_row = residual.pow(2).sum(1) / items + rho * (coef - 1.0 / n).pow(2).sum(1)
    return per_row.sum() if rows is None else per_row[rows].sum()


def learn_coefficients(coef: Tensor, soft: Tensor, items: int, teachers: Tensor, rho: float,
                       steps: int, lr: float) -> Tensor:
    """Projected gradient steps on :func:`coefficient_objective` for the teachers' rows.

    Rows of clients that are not teachers are returned unchanged; a teacher's row stays on
    the simplex over the teachers' columns.
    """
    coef = coef.to(torch.float64).clone()
    soft = soft.to(torch.float64)
    for _ in range(steps):
        with torch.enable_grad():
            var = coef.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(coefficient_objective(var, soft, items, rho, teachers), var)
        stepped = project_rows_to_simplex(coef - lr * grad, active=teachers)
        coef = torch.where(teachers.unsqueeze(1), stepped, coef)
    return coef


def renormalised(coef: Tensor, teachers: Tensor) -> Tensor:
    """Rows of ``coef`` restricted to the teachers' columns and rescaled to sum to 1.

    A row with no weight on any teacher falls back to the uniform mixture of the teachers.
    """
    masked = coef * teachers.unsqueeze(0).to(coef.dtype)
    total = masked.sum(1, keepdim=True)
    uniform = teachers.to(coef.dtype).unsqueeze(0) / teachers.sum().clamp_min(1)
    return torch.where(total > 0, masked / total.clamp_min(1e-300), uniform.expand_as(masked))


class KTpFL(ProxyDistillation):
    """Personalized soft targets from a learned, checkpointed knowledge coefficient matrix."""

    name = "ktpfl"
    Params = KTpFLParams

    def __init__(self, params: KTpFLParams, setup: Setup):
        super().__init__(params, setup)
        n = setup.num_clients
        self.coef = torch.full((n, n), 1.0 / n, dtype=torch.float64)
        self._report: dict[str, Any] = {}

    def represent(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits / self.params.tau, dim=-1)

    def combine(self, reps: Tensor, teachers: Tensor) -> Tensor:
        p = self.params
        n, items = reps.shape[0], reps.shape[2]
        soft = reps.reshape(n, -1)
        start = self.coef.to(soft.device)
        coef = learn_coefficients(start, soft, items, teachers, p.rho, p.coef_steps, p.coef_lr)
        self.coef = coef.cpu()
        mix = renormalised(coef, teachers)
        self._report = {
            "coef_self": float(torch.diagonal(coef).mean()),
            "coef_objective": float(coefficient_objective(coef, soft, items, p.rho, teachers)),
        }
        return (mix @ soft).reshape(reps.shape)

    def combine_report(self) -> dict[str, Any]:
        return dict(self._report)

    def digest_loss(self, student_logits: Tensor, target: Tensor) -> Tensor:
        return kd_loss(student_logits, target, self.params.tau)

    def server_state(self) -> dict[str, Any]:
        return {"coef": self.coef.clone()}

    def load_server_state(self, state: dict[str, Any]) -> None:
        if "coef" in state:
            coef = state["coef"]
            if tuple(coef.shape) != tuple(self.coef.shape):
                # a checkpoint of another number of clients (--resume force onto a changed
                # data.clients): refused here, as a misfit, not at the first round's matmul
                raise ValueError(f"ktpfl's coefficient matrix is {list(coef.shape)} in the checkpoint, "
                                 f"{list(self.coef.shape)} for {self.coef.shape[0]} clients")
            self.coef = coef.to(torch.float64).cpu().clone()
