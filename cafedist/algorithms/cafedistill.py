"""CAFEDistill: conflict-aware federated exit distillation over a public proxy set.

Source: Liu, Zhou, Tong, "CAFEDistill: Learning Personalized and Dynamic Models through
Federated Early-Exit Network Distillation", arXiv 2601.10015 (2026). No reference code was
released; ``docs/METHOD.md`` lists what follows the paper and what is our reading.

One round (the loop in :mod:`cafedist.train.round` drives it):

1. local update: CE on the last exit and on this round's student exits, plus
   ``lam * KL(T_i || softmax(z_i^k / tau))`` on proxy items for every student exit k (the
   weighting is an option, :mod:`cafedist.algorithms.exit_loss`), where ``T_i`` is the
   personalized teacher received last round;
2. every client evaluates all exits on this round's proxy subset P'(t) (keyed by seed and
   round, identical on every rank) and the logits are gathered to rank 0 in client-id order;
3. rank 0 (:meth:`CAFEDistill.aggregate_logits`, batched over clients):
   a. teacher weights per client, one small QP solved in closed form
      ``alpha_i = proj_simplex(w - d_i / (2 mu))``, ``d_ij = 1 - cos(q_i, q_j)``;
   b. targets ``T_i = sum_j alpha_ij softmax(z_j^m / tau)`` (an exact mixture of distributions);
   c. students of the next round: depth-prioritized (shallow exits first), the partial depth
      filled greedily by similarity (conflict-aware);
   d. quarantine: clients with non-finite or exploding logits are no teachers this round;
4. each client receives only its own targets and student mask (client-decoupled).

Deviation from the paper: the paper's client-decoupled step averages teacher *head
parameters*; exchanging proxy logits lets us mix the teachers' *distributions* exactly.
Our reading of the selection: the similarity used by the greedy step is the cosine similarity
of the clients' last-exit proxy probabilities (the same matrix as the QP), because the last
exit is trained from round 0 while a not-yet-selected shallow exit is still untrained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from cafedist.algorithms.base import Check, ClientView, LocalBatch, Phase, Setup, Spec
from cafedist.algorithms.common import is_body, is_head
from cafedist.algorithms.exit_loss import ExitLossRule, weighting_checks
from cafedist.algorithms.logit_exchange import TARGETS, LogitExchange
from cafedist.algorithms.proxy_math import (
    cosine_similarity_matrix,
    cosine_similarity_rows,
    healthy_clients,
    kd_loss,
    mix_targets,
    softmax_into,
    teacher_weights,
)
from cafedist.algorithms.students import ScheduledStudents, student_masks

#: what the teacher QP and the student selection compare: the clients' last-exit proxy
#: probabilities, or the parameters of their last exit heads (what public summaries of the paper say)
SIMILARITIES = ("output", "head_params")


@dataclass
class CAFEDistillParams:
    """CAFEDistill hyperparameters (defaults from ``docs/METHOD.md``)."""

    tau: float = 3.0  # distillation temperature
    lam: float = 1.0  # weight of the KD term
    mu: float = 0.5  # QP regulariser: small -> own teacher only, large -> data-size weights
    proxy_size: int = 1000  # P' = min(proxy_size, |P|) proxy items per round
    schedule_span: float = 0.5  # R(t) = min(t / (schedule_span * T), 1); 0.5 gives the paper's 2t/T
    cross_client_kd: bool = True  # ablation "no cross-client KD": False = local KD only
    student_selection: bool = True  # ablation "no student selection": False = all exits always
    logit_bound: float = 1.0e4  # |logit| above this quarantines a client as teacher
    shared_body: bool = False  # FedAvg the body parameters as well (paper's shared-backbone variant)
    # our readings of what the paper leaves open (docs/METHOD.md, algorithms/exit_loss.py)
    # lam: CE + lam KL (the default: +0.7 points of last-exit validation accuracy over lam_tau2 on two
    # seeds, no loss jump; docs/METHOD.md) | lam_tau2: CE + lam tau^2 KL (Hinton) | convex
    kd_weighting: str = "lam"
    unselected: str = "none"  # what a not-yet-selected shallow exit gets: none | ce
    exit_weights: list | None = None  # one loss multiplier per exit (None: all 1)
    similarity: str = "output"  # QP/selection similarity: output (last-exit proxy probs) | head_params
    # the last exit distils from the personalized teacher too (ours, not the paper's: there only
    # the shallow exits do, so the last exit sees other clients only through shared layers)
    last_exit_kd: bool = False

    def checks(self) -> list[Check]:
        return [
            ("tau", self.tau > 0, "> 0"),
            ("lam", self.lam >= 0, ">= 0"),
            ("mu", self.mu > 0, "> 0"),
            ("proxy_size", self.proxy_size >= 1, ">= 1"),
            ("schedule_span", 0 < self.schedule_span <= 1, "in (0, 1]"),
            ("logit_bound", self.logit_bound > 0, "> 0"),
            ("similarity", self.similarity in SIMILARITIES, f"one of {', '.join(SIMILARITIES)}"),
            *weighting_checks(self),
        ]


# ----------------------------------------------------------------------------- algorithm
class CAFEDistill(ScheduledStudents, LogitExchange):
    """Personalized early-exit networks taught by a per-client mixture of last exits."""

    name = "cafedistill"
    Params = CAFEDistillParams
    # local_loss reads only logits, labels and state tensors: cafedist.train.packed may vmap it
    vmappable_loss = True
    # idle clients teach no one and receive nothing: the exchange needs the active ones only
    cohort_exchange = True

    def __init__(self, params: CAFEDistillParams, setup: Setup):
        super().__init__(params, setup)
        self.loss_rule = dataclasses.replace(ExitLossRule.of("cafedistill", params, setup.num_exits),
                                             last_exit_kd=params.last_exit_kd)
        self._buffer: Tensor | None = None
        self._head_numel = 0

    def bind_model(self, model: nn.Module) -> None:
        self._head_numel = sum(p.numel() for k, p in model.named_parameters() if is_head(k, self.setup.num_exits - 1))

    def _workspace(self, like: Tensor) -> Tensor:
        """A float32 buffer shaped like ``like``, kept between rounds on CPU.

        Rank 0 needs one [n, P', C] scratch tensor per round; on CPU allocating it afresh costs
        page faults comparable to the softmax written into it. GPUs' caching allocator already
        reuses memory, so nothing is kept there.
        """
        buf = self._buffer
        if buf is None or buf.shape != like.shape or buf.device != like.device:
            buf = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        self._buffer = buf if buf.device.type == "cpu" else None
        return buf

    # ---------------------------------------------------------------- client side
    def uses_proxy_batch(self, client: ClientView, phase: Phase) -> bool:
        state = client.state
        distils = self.params.last_exit_kd or bool(self.students(state)[:-1].any())
        return distils and TARGETS in state and self.params.lam > 0

    def _terms(self, state: dict[str, Tensor], batch: LocalBatch) -> list:
        kl = None
        if batch.proxy_logits is not None:
            tau, teacher = self.params.tau, state[TARGETS][batch.proxy_pos]

            def kl(k: int) -> Tensor:
                return kd_loss(batch.proxy_logits[k], teacher, tau, tau_squared=False)  # the rule weights it

        return self.loss_rule.terms(batch.logits, batch.y, self.students(state), kl)

    def shared_mask(self, cid: int, key: str, tensor: Tensor) -> bool:
        return self.params.shared_body and is_body(key)

    @property
    def common_init(self) -> bool:  # type: ignore[override]  # a class constant elsewhere
        """A shared body is averaged from round 0: clients start from one model, as every
        body-averaging method does (an average of unrelated random bodies stalls training)."""
        return self.params.shared_body

    # ---------------------------------------------------------------- coordinator
    def proxy_exits(self) -> tuple[int, ...]:
        return (self.setup.num_exits - 1,)  # teachers and similarities are last-exit only

    def upload_spec(self) -> Spec:
        if self.params.similarity != "head_params":
            return {}
        if not self._head_numel:  # an empty row would make every client look alike
            raise RuntimeError("cafedistill: the last head's size is unknown (bind_model was never called)")
        return {"head": ((self._head_numel,), torch.float32)}

    def upload(self, client: ClientView) -> dict[str, Tensor]:
        if self.params.similarity != "head_params":
            return {}
        head = client.model.heads[self.setup.num_exits - 1]
        return {"head": parameters_to_vector(head.parameters()).detach().to(torch.float32)}

    def payload_spec(self) -> Spec:
        return {"targets": ((self.setup.proxy_size, self.setup.num_classes), torch.float32),
                "students": ((self.setup.num_exits,), torch.uint8)}

    def aggregate(self, round_idx: int, gathered: dict[str, Tensor],
                  active: Tensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return self._aggregate(round_idx, gathered, active, None)

    def aggregate_cohort(self, round_idx: int, gathered: dict[str, Tensor],
                         cohort: Tensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
        # the cohort is the federation of this round: teachers, weights and the schedule's
        # student counts are taken over it (with every client active, the same as aggregate)
        return self._aggregate(round_idx, gathered, None, cohort)

    def _aggregate(self, round_idx: int, gathered: dict[str, Tensor], active: Tensor | None,
                   cohort: Tensor | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
        heads = gathered.get("head")
        sim = None
        if heads is not None:
            # similarity of the last heads' parameters; a client with broken heads compares as zero
            finite = healthy_clients(heads, self.params.logit_bound).to(heads.device)
            safe = torch.where(finite.unsqueeze(1), heads.to(torch.float64),
                               torch.zeros((), dtype=torch.float64, device=heads.device))
            sim = cosine_similarity_matrix(safe)
        return self.aggregate_logits(round_idx, gathered["logits"], active, sim=sim, cohort=cohort)

    def aggregate_logits(self, round_idx: int, logits: Tensor, active: Tensor | None = None,
                         sim: Tensor | None = None, cohort: Tensor | None = None
                         ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Teacher weights, targets and the next round's students from logits [n, e, P', C].

        ``e`` exits in increasing order, the last exit last (e = 1 by default, see
        :meth:`proxy_exits`); the health check covers every exit given. ``sim`` replaces the
        similarity of the last-exit probabilities (``similarity: head_params``). ``cohort``:
        the rows are those of these client ids only (:meth:`aggregate_cohort`).

        With no healthy teacher at all (every row quarantined or idle) the targets are zero
        rows, and the KD term, a sum weighted by the targets, is 0 that round.

        Cost: the similarity Gram product (float32, symmetric half) and the target mixture
        ``alpha @ probs`` are the two O(n^2 P' C) steps; softmaxes and the health check are
        single passes over the data. Peak memory ~2 copies of [n, P', C].
        """
        p = self.params
        n, m = logits.shape[0], self.setup.num_exits
        finite = healthy_clients(logits, p.logit_bound)
        # clients that did not train this round send stale logits: they teach no one
        healthy = finite if active is None else finite & active.to(finite.device)
        last = logits[:, -1].float()  # [n, P', C]: the last exit (a view when the logits are float32)
        # similarity on plain probabilities (discriminative); teachers at temperature tau.
        # One buffer serves both: the teacher softmax overwrites the similarity's in place.
        probs = softmax_into(self._workspace(last), last)
        if not bool(healthy.all()):
            probs[~healthy] = 1.0 / probs.shape[2]  # broken logits compare as uniform
        # similarity: head_params gives it (computed by the caller)
        sim = cosine_similarity_rows(probs.reshape(n, -1)) if sim is None else sim.to(probs.device)
        if p.cross_client_kd:
            weights = self.setup.data_weights if cohort is None else self.setup.data_weights[cohort.cpu()]
            alpha = teacher_weights(sim, weights.to(sim.device), p.mu, healthy)
        else:
            alpha = torch.eye(n, dtype=torch.float64, device=sim.device)
        teacher_probs = softmax_into(probs, last, p.tau)
        if not bool(healthy.all()):
            teacher_probs[~healthy] = 0.0
        targets = mix_targets(alpha, teacher_probs)
        del teacher_probs
        if not p.cross_client_kd:
            # local KD of an unhealthy client would copy its own broken logits: use uniform
            targets[~healthy] = 1.0 / targets.shape[2]
        if not p.student_selection:
            students = torch.ones(n, m, dtype=torch.bool)
        else:
            students = student_masks(round_idx + 1, self.setup.rounds, n, m, sim, p.schedule_span, healthy)
        report = {
            "n_students_next": int(students[:, : m - 1].sum()),
            "quarantined": [int(i if cohort is None else cohort[i]) for i in torch.nonzero(~finite).flatten()],
            "self_weight": float(torch.diagonal(alpha).mean()) if n else None,
        }
        return {"targets": targets, "students": students.to(torch.uint8)}, report

    def receive(self, client: ClientView, payload: dict[str, Tensor], round_idx: int) -> None:
        self.keep_targets(client.state, payload["targets"], round_idx)
        client.state["students"] = payload["students"].to(torch.bool)
