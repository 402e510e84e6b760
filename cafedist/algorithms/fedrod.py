"""FedRoD-EE: a shared generic predictor and a personal one on top of it, at every exit.

Source: Chen & Chao, "On Bridging Generic and Personalized Federated Learning for Image
Classification" (ICLR 2022); reference code hongyouc/Fed-RoD and PFLlib's FedRoD
(TsingZ0/PFLlib, ``clientrod.py``, the linear-personal-head variant).

* The ``"main"`` model is the generic part: body and every exit head, averaged over the
  participants each round (sample-weighted). It is trained with the *balanced softmax* loss
  at every exit: ``CE(z_k + log n_c, y)`` with n_c the client's class counts, so the shared
  heads learn class-balanced posteriors whatever the local label skew.
* Each exit k has a personal classifier p_k, a Linear on the exit's features f_k (the input
  of the generic head's final Linear), kept in the extra model ``"personal"`` (only its
  heads' final Linears are used). It is trained with ``CE(g_k(f_k).detach() + p_k(f_k), y)``
  with the generic part frozen, and the client answers with ``g_k(f_k) + p_k(f_k)``
  (:meth:`FedRoD.eval_model`).

Deviations: the personal classifiers are trained *after* this round's aggregation (a post
phase, ``personal_epochs``, default the local epochs) on the received generic model -- the
one they are evaluated with -- while PFLlib interleaves both updates step by step on the
pre-aggregation features. The class counts n_c are the client's train-label counts, given
with the run's ``Setup`` (``label_counts``), as in the reference code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cafedist.algorithms.base import Algorithm, Check, ClientView, LocalBatch, Phase
from cafedist.algorithms.personalization import (
    classifier_names,
    classifier_prefixes,
    feature_tap,
    final_linear,
)
from cafedist.models.base import ExitStage

COUNTS = "rod.counts"  # float64 [C]: the client's training-label counts
GENERIC = "rod.generic."  # prefix: copies of the generic classifiers for the personal phase


@dataclass
class FedRoDParams:
    """FedRoD hyperparameters."""

    personal_epochs: int | None = None  # epochs of personal-classifier training; None: train.local_epochs

    def checks(self) -> list[Check]:
        return [("personal_epochs", self.personal_epochs is None or self.personal_epochs >= 1, ">= 1 or null")]


def balanced_softmax_ce(logits: Tensor, y: Tensor, counts: Tensor) -> Tensor:
    """Balanced softmax loss (Ren et al. 2020): CE of logits shifted by the log class counts."""
    # a class never seen gets a very negative (not infinite) offset: same softmax, no inf arithmetic
    return F.cross_entropy(logits + counts.clamp_min(1e-12).log().to(logits.dtype), y)


class GenericPlusPersonal(nn.Module):
    """The combined predictor: exit k answers ``g_k(f_k) + p_k(f_k)``."""

    def __init__(self, generic: nn.Module, personal: nn.Module):
        super().__init__()
        self.generic = generic
        self.personal = personal

    def forward(self, x: Tensor, upto: int | None = None) -> list[Tensor]:
        tap = feature_tap(self.generic)
        outs = self.generic(x, upto=upto)
        return [z + final_linear(self.personal.heads[k])(tap.features[k]) for k, z in enumerate(outs)]

    def exit_stages(self) -> list[nn.Module]:
        """The generic network's stages (:meth:`EarlyExitNet.exit_stages`) with each head
        answering ``g_k(f_k) + p_k(f_k)`` in the order :meth:`forward` adds them, for
        ``cafedist export``: a copy of the generic head whose final Linear is
        :class:`SummedClassifiers` of it and the personal one (parameters copied)."""
        stages = []
        for k, stage in enumerate(self.generic.exit_stages()):
            head = copy.deepcopy(stage.head)
            for module in head.modules():  # the copy must not feed the generic model's feature tap
                module._forward_pre_hooks.clear()
            fc = final_linear(stage.head)
            path = next(name for name, module in stage.head.named_modules() if module is fc)
            parent, _, leaf = path.rpartition(".")
            generic_fc = final_linear(head)
            personal_fc = copy.deepcopy(final_linear(self.personal.heads[k]))
            setattr(head.get_submodule(parent) if parent else head, leaf,
                    SummedClassifiers(generic_fc, personal_fc))
            stages.append(ExitStage(stage.block, head))
        return stages


class SummedClassifiers(nn.Module):
    """``generic(f) + personal(f)``: FedRoD's answer from one exit's features."""

    def __init__(self, generic: nn.Module, personal: nn.Module) -> None:
        super().__init__()
        self.generic = generic
        self.personal = personal

    def forward(self, features: Tensor) -> Tensor:
        return self.generic(features) + self.personal(features)


class FedRoD(Algorithm):
    """Generic body and heads by FedAvg with balanced softmax, personal classifiers per exit."""

    name = "fedrod"
    Params = FedRoDParams
    common_init = True
    extra_models = ("personal",)
    uses_label_counts = True

    def init_client_state(self, cid: int) -> dict[str, Tensor]:
        if not self.setup.label_counts:
            raise ValueError("fedrod: the run's Setup carries no label_counts (build it from a store with run.build)")
        return {COUNTS: torch.tensor(self.setup.label_counts[cid], dtype=torch.float64)}

    def shared_mask(self, cid: int, key: str, tensor: Tensor) -> bool:
        return True  # the whole "main" model is generic

    def eval_model(self, client: ClientView) -> nn.Module:
        return GenericPlusPersonal(client.model, client.models["personal"])

    def local_loss(self, state: dict[str, Tensor], batch: LocalBatch) -> Tensor:
        if batch.phase == "personal":
            return self._personal_loss(state, batch)
        counts = state[COUNTS].to(batch.y.device)
        return sum(balanced_softmax_ce(z, batch.y, counts) for z in batch.logits)

    # ---------------------------------------------------------------- personal part
    def post_phases(self, client: ClientView, round_idx: int, trained: bool) -> list[Phase]:
        if not trained:  # a client that did not train this round is left untouched
            return []
        generic, personal = client.model, client.models["personal"]
        names = classifier_names(generic)
        # the personal model mirrors the generic feature path, so its forward yields p_k(f_k)
        own = dict(personal.named_parameters())
        with torch.no_grad():
            for key, p in generic.named_parameters():
                if key in names:
                    client.state[GENERIC + key] = p.detach().clone()
                else:
                    own[key].copy_(p)
        feature_tap(personal)
        return [Phase(name="personal", model="personal", epochs=self.params.personal_epochs,
                      trainable=frozenset(names).__contains__)]

    def _personal_loss(self, state: dict[str, Tensor], batch: LocalBatch) -> Tensor:
        feats = feature_tap(batch.module).features
        terms = []
        for k, prefix in enumerate(classifier_prefixes(batch.module)):
            f = feats[k].detach()
            bias = state.get(f"{GENERIC}{prefix}.bias")
            generic = F.linear(f, state[f"{GENERIC}{prefix}.weight"].to(f), None if bias is None else bias.to(f))
            terms.append(F.cross_entropy(generic + batch.logits[k], batch.y))
        return sum(terms)
