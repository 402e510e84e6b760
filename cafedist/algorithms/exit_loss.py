"""How CAFEDistill's two formulations weigh CE and KD on each exit (one implementation).

The paper leaves the weighting of the local loss open, so each reading is an option of
``algorithm.cafedistill`` and ``algorithm.cafedistill-heads`` (docs/METHOD.md says which one
the defaults use and why):

* ``kd_weighting``: ``lam_tau2`` (Hinton: ``CE + lam * tau^2 * KL``), ``lam`` (``CE + lam * KL``)
  or ``convex`` (``(1 - lam) * CE + lam * tau^2 * KL`` on student exits; the last exit keeps
  its full CE);
* ``unselected``: what a shallow exit that is not a student this round receives: ``none``
  (no loss, the paper's reading) or ``ce`` (its CE, without KD, until it is selected);
* ``exit_weights``: one multiplier per exit (None: all 1), applied to every term of that exit;
* ``last_exit_kd`` (proxy-logit CAFEDistill only): the last exit also distils from the
  personalized teacher (an extension: the paper distils the shallow exits only).

The terms are produced in one fixed order (last-exit CE, shallow CEs, shallow KDs), so the
summed loss of the defaults is bit-identical to the formula written out by hand, and
:func:`per_exit` regroups the same tensors by exit for diagnostics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor

from cafedist.errors import ConfigError
from cafedist.typed import is_finite_number

KD_WEIGHTINGS = ("lam_tau2", "lam", "convex")
UNSELECTED = ("none", "ce")

#: one term of the local loss: (exit index, tensor)
Term = tuple[int, Tensor]


@dataclass(frozen=True)
class ExitLossRule:
    """The weighting options of one run (validated against the number of exits)."""

    lam: float
    tau: float
    kd_weighting: str = "lam_tau2"
    unselected: str = "none"
    exit_weights: tuple[float, ...] | None = None
    last_exit_kd: bool = False

    @classmethod
    def of(cls, section: str, params: object, num_exits: int) -> "ExitLossRule":
        """Build from an algorithm's params (fields ``lam, tau, kd_weighting, unselected,
        exit_weights``); raises :class:`ConfigError` naming ``algorithm.<section>.<field>``."""
        weights = params.exit_weights
        if weights is not None:
            # all zero trains nothing; an infinite weight makes every loss infinite
            if not isinstance(weights, (list, tuple)) or len(weights) != num_exits \
                    or not all(is_finite_number(w) and w >= 0 for w in weights) or not any(weights):
                raise ConfigError(f"algorithm.{section}.exit_weights: expected a list of {num_exits} finite "
                                  f"non-negative numbers (one per exit, not all 0) or null, got {weights!r}")
            weights = tuple(float(w) for w in weights)
        rule = cls(lam=params.lam, tau=params.tau, kd_weighting=params.kd_weighting,
                   unselected=params.unselected, exit_weights=weights)
        if rule.kd_weighting == "convex" and not 0 <= rule.lam <= 1:
            raise ConfigError(f"algorithm.{section}.lam: must be in [0, 1] with kd_weighting: convex, got {rule.lam}")
        return rule

    def terms(self, logits: Sequence[Tensor], y: Tensor, students: Tensor,
              kl: Callable[[int], Tensor] | None) -> list[Term]:
        """The loss terms of one step in their fixed order.

        ``students`` is the bool [m] mask (the last exit is always trained); ``kl(k)`` returns
        exit k's plain ``KL(teacher || softmax(z_k / tau))`` (batch mean), or ``kl`` is None
        when this step has no teacher.
        """
        m = len(logits)
        out: list[Term] = [(m - 1, F.cross_entropy(logits[-1], y))]
        convex = self.kd_weighting == "convex"
        for k in range(m - 1):
            if students[k]:
                ce = F.cross_entropy(logits[k], y)
                out.append((k, (1.0 - self.lam) * ce if convex else ce))
            elif self.unselected == "ce":
                out.append((k, F.cross_entropy(logits[k], y)))
        if kl is not None:
            lam, tau = self.lam, self.tau
            for k in range(m):
                if (students[k] if k < m - 1 else self.last_exit_kd):
                    # written as before the options existed, so the default loss keeps its bits
                    out.append((k, lam * kl(k) if self.kd_weighting == "lam" else lam * tau * tau * kl(k)))
        if self.exit_weights is not None:
            out = [(k, self.exit_weights[k] * t) for k, t in out]
        return out


def total(terms: Sequence[Term]) -> Tensor:
    """The local loss: the terms summed in order."""
    loss = terms[0][1]
    for _, t in terms[1:]:
        loss = loss + t
    return loss


def per_exit(terms: Sequence[Term], num_exits: int) -> list[Tensor | None]:
    """The same terms summed per exit (None: the exit gets no loss this step)."""
    out: list[Tensor | None] = [None] * num_exits
    for k, t in terms:
        out[k] = t if out[k] is None else out[k] + t
    return out


def weighting_checks(params: object) -> list[tuple[str, bool, str]]:
    """The (field, ok, expected) checks of the weighting options, for a Params' ``checks``."""
    return [("kd_weighting", params.kd_weighting in KD_WEIGHTINGS, f"one of {', '.join(KD_WEIGHTINGS)}"),
            ("unselected", params.unselected in UNSELECTED, f"one of {', '.join(UNSELECTED)}")]
