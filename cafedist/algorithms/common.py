"""Machinery shared by several algorithms: parameter splits, proximal terms, KD losses.

Keep every piece here once; algorithm modules combine them (``duplicates`` must find no
twins across ``cafedist/algorithms``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def is_head(key: str) -> bool:
    """True for exit-head parameters (``heads.*``), False for the body (``blocks.*``)."""
    return key.startswith("heads.")


def is_body(key: str) -> bool:
    """True for body parameters (``blocks.*``)."""
    return not is_head(key)


def exits_ce(logits: list[Tensor], y: Tensor, weights: list[float] | None = None) -> Tensor:
    """Cross-entropy summed over exits (optionally weighted per exit)."""
    ws = weights or [1.0] * len(logits)
    return sum(w * F.cross_entropy(z, y) for w, z in zip(ws, logits))


def kd_kl(student_logits: Tensor, teacher_probs: Tensor, tau: float) -> Tensor:
    """``tau^2 * KL(teacher || softmax(student / tau))``, batch mean (Hinton et al.)."""
    log_student = F.log_softmax(student_logits / tau, dim=1)
    return tau * tau * F.kl_div(log_student, teacher_probs, reduction="batchmean")


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Detached copies of a module's parameters, keyed ``ref.<name>`` for client state."""
    return {f"ref.{k}": p.detach().clone() for k, p in module.named_parameters()}


def proximal(module: nn.Module, state: dict[str, Tensor], mu: float, select=None) -> Tensor:
    """``mu/2 * ||w - w_ref||^2`` over parameters with a ``ref.<name>`` snapshot in ``state``."""
    total = None
    for name, p in module.named_parameters():
        ref = state.get(f"ref.{name}")
        if ref is None or (select is not None and not select(name)):
            continue
        term = (p - ref).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros((), device=next(module.parameters()).device)
    return 0.5 * mu * total
