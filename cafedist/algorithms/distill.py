"""Shared machinery of the distillation baselines (FedMD, DS-FL, KT-pFL, cafedistill-heads).

Not an algorithm itself (it registers nothing): the proxy-distillation base class
:class:`ProxyDistillation` gives FedMD, DS-FL and KT-pFL their common round, so each of those
modules only says how the coordinator turns the gathered proxy outputs into targets
(:meth:`ProxyDistillation.combine`) and how a client's exit is pulled toward them
(:meth:`ProxyDistillation.digest_loss`):

1. **digest** phase (from round 1 on): every step draws a proxy mini-batch of the subset the
   client's targets were computed on and pulls every exit toward its target rows
   (FedMD's "digest", DS-FL's and KT-pFL's "distillation" step);
2. **revisit** phase: summed per-exit CE on the private data (the "-EE" convention);
3. every client evaluates all exits on this round's proxy subset; the logits are gathered to
   rank 0 in client-id order (the same per-exit gather path as CAFEDistill);
4. rank 0: clients with non-finite or exploding logits (:func:`healthy_clients`) and clients
   that did not train this round teach no one; the remaining "teachers" are combined into
   one target row per client; each client receives only its own row.

``targets_from`` chooses what an exit distils from: ``"same"`` (exit k of every client
teaches exit k: each exit is one of the network's outputs) or ``"last"`` (every exit distils
from the combination of the clients' last exits, as CAFEDistill does).

Two knobs that are ours, not the papers' (defaults leave the methods as published):
``warmup_rounds`` trains on private data only for the first rounds (the references of FedMD
and KT-pFL train every model on its private data before collaborating; the round budget is
shared, so the default is 0), and ``digest_weight`` scales the digest loss, i.e. the digest
phase's learning rate relative to ``train.lr`` (the references use separate optimizers per
phase; here both phases share the client's SGD and its momentum buffer). From a cold start
the first targets are near-uniform (barely trained, disagreeing clients) and a full-strength
digest keeps pulling every exit toward them: on the quickstart config FedMD, DS-FL and KT-pFL
stay at the majority-class accuracy for several rounds with ``digest_weight: 1`` and learn
steadily with ``0.1``.

:func:`mean_over` is reusable by other methods; the student schedule
lives in :mod:`cafedist.algorithms.students`, the shared math in :mod:`cafedist.algorithms.proxy_math`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from cafedist.algorithms.base import Check, ClientView, LocalBatch, Phase, Spec
from cafedist.algorithms.common import exits_ce
from cafedist.algorithms.logit_exchange import TARGETS, LogitExchange
from cafedist.algorithms.proxy_math import healthy_clients

DIGEST = "digest"  # phase name: match the received targets on proxy batches
REVISIT = "revisit"  # phase name: CE on the private data


# ----------------------------------------------------------------------------- parameters
@dataclass
class ProxyDistillParams:
    """Fields every proxy-distillation baseline shares (subclasses add their own)."""


    proxy_size: int = 1000  # P' = min(proxy_size, |P|) proxy items per round (as CAFEDistill)
    digest_epochs: int = 1  # epochs of the digest phase (reference: one pass of logit matching)
    warmup_rounds: int = 0  # rounds of private training only before the first digest
    digest_weight: float = 1.0  # multiplies the digest loss (a digest learning rate relative to train.lr)
    targets_from: Literal["same", "last"] = "same"  # exit k distils from exit k, or from the last exits
    logit_bound: float = 1.0e4  # |logit| above this quarantines a client as teacher

    def checks(self) -> list[Check]:
        """``(field, ok, expected)`` triples; subclasses extend the list."""
        return [("proxy_size", self.proxy_size >= 1, ">= 1"),
                ("digest_epochs", self.digest_epochs >= 1, ">= 1"),
                ("warmup_rounds", self.warmup_rounds >= 0, ">= 0"),
                ("digest_weight", self.digest_weight > 0, "> 0"),
                ("logit_bound", self.logit_bound > 0, "> 0")]


# ----------------------------------------------------------------------------- shared math
def mean_over(rows: Tensor, keep: Tensor) -> Tensor:
    """Mean of the rows [n, ...] where ``keep`` (bool [n]) holds; zeros when none does."""
    w = keep.to(rows.dtype).view(-1, *([1] * (rows.dim() - 1)))
    return (rows * w).sum(0) / keep.sum().clamp_min(1).to(rows.dtype)


# ----------------------------------------------------------------------------- base class
class ProxyDistillation(LogitExchange):
    """Digest the received targets on proxy data, revisit the private data, exchange proxy logits.

    Subclasses set ``name``/``Params`` and implement :meth:`represent` (what a client's proxy
    logits become before combining), :meth:`combine` (teachers -> per-client targets) and
    :meth:`digest_loss`.
    """

    # local_loss reads only logits, labels and state tensors: cafedist.train.packed may vmap it
    vmappable_loss = True

    # ---------------------------------------------------------------- subclass hooks
    def represent(self, logits: Tensor) -> Tensor:
        """Per-client proxy outputs [n, m', P', C] (float64) -> what is combined (default: logits)."""
        return logits

    def combine(self, reps: Tensor, teachers: Tensor) -> Tensor:
        """Per-client targets [n, m', P', C] from ``reps`` (rows of non-teachers are zero)."""
        raise NotImplementedError

    def digest_loss(self, student_logits: Tensor, target: Tensor) -> Tensor:
        """Loss pulling one exit's proxy logits [Bp, C] toward its target rows [Bp, C]."""
        raise NotImplementedError

    # ---------------------------------------------------------------- client side
    def target_exits(self) -> int:
        """m': how many exits' targets a client receives (1 when all distil from the last)."""
        return self.setup.num_exits if self.params.targets_from == "same" else 1

    def local_phases(self, client: ClientView, round_idx: int) -> list[Phase]:
        revisit = Phase(name=REVISIT)
        if TARGETS not in client.state or round_idx < self.params.warmup_rounds:
            return [revisit]  # nothing to digest yet, or still warming up on private data
        return [Phase(name=DIGEST, epochs=self.params.digest_epochs), revisit]

    def uses_proxy_batch(self, client: ClientView, phase: Phase) -> bool:
        return phase.name == DIGEST and TARGETS in client.state

    def local_loss(self, state: dict[str, Tensor], batch: LocalBatch) -> Tensor:
        if batch.phase != DIGEST:
            return exits_ce(batch.logits, batch.y)
        targets = state[TARGETS][:, batch.proxy_pos]  # [m', Bp, C]
        shared = targets.shape[0] == 1  # every exit distils from the last exits' combination
        loss = sum(self.digest_loss(z, targets[0 if shared else k]) for k, z in enumerate(batch.proxy_logits))
        return self.params.digest_weight * loss

    # ---------------------------------------------------------------- coordinator
    def proxy_exits(self) -> tuple[int, ...]:
        m = self.setup.num_exits
        return tuple(range(m)) if self.params.targets_from == "same" else (m - 1,)

    def payload_spec(self) -> Spec:
        return {"targets": ((self.target_exits(), self.setup.proxy_size, self.setup.num_classes), torch.float32)}

    def aggregate(self, round_idx: int, gathered: dict[str, Tensor],
                  active: Tensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
        logits = gathered["logits"]  # [n, e, P', C], client-id order, e >= len(proxy_exits())
        n = logits.shape[0]
        finite = healthy_clients(logits, self.params.logit_bound)
        # clients that did not train this round hold stale logits: they teach no one
        teachers = finite & active.to(device=finite.device, dtype=torch.bool)
        source = logits if self.params.targets_from == "same" else logits[:, -1:]
        keep, zero = teachers.view(n, 1, 1, 1), torch.zeros((), dtype=torch.float64, device=logits.device)
        source = torch.where(keep, source.to(torch.float64), zero)  # NaN never enters the math
        reps = torch.where(keep, self.represent(source), zero)
        targets = self.combine(reps, teachers)
        report = {"quarantined": [int(i) for i in torch.nonzero(~finite).flatten()],
                  "teachers": int(teachers.sum()), **self.combine_report()}
        return {"targets": targets.to(torch.float32)}, report

    def combine_report(self) -> dict[str, Any]:
        """Small JSON-able facts of the last :meth:`combine` for the metrics line."""
        return {}

    def receive(self, client: ClientView, payload: dict[str, Tensor], round_idx: int) -> None:
        self.keep_targets(client.state, payload["targets"], round_idx)
