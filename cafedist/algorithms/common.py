"""Machinery shared by several algorithms: parameter splits, proximal terms, KD losses.

* parameter predicates (:func:`is_head`, :func:`is_body`, :func:`exit_index`), the
  :class:`SharedBody` base of the shared-body / personal-heads family and the
  :class:`DepthScaled` base of the depth-scaled family;
* losses: per-exit CE, Hinton KD, proximal terms, mutual self-distillation between exits;
* :func:`equal_groups`: deterministic assignment of clients to resource levels.

Keep every piece here once; algorithm modules combine them (``duplicates`` must find no
twins across ``cafedist/algorithms``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cafedist.algorithms.base import Algorithm, ClientView, LocalBatch, Phase
from cafedist.algorithms.proxy_math import kd_loss


def is_head(key: str, exit_: int | None = None) -> bool:
    """True for exit-head parameters (``heads.*``; of exit ``exit_`` only, when given), False for
    the body (``blocks.*``). The one test of what a head parameter is."""
    return key.startswith("heads." if exit_ is None else f"heads.{exit_}.")


def is_body(key: str) -> bool:
    """True for body parameters (``blocks.*``)."""
    return not is_head(key)


def exits_ce(logits: list[Tensor], y: Tensor, weights: list[float] | None = None) -> Tensor:
    """Cross-entropy summed over exits (optionally weighted per exit)."""
    ws = weights or [1.0] * len(logits)
    return sum(w * F.cross_entropy(z, y) for w, z in zip(ws, logits))


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


# ----------------------------------------------------------------------------- layer structure
def exit_index(key: str) -> int:
    """The exit a parameter belongs to: ``k`` for ``blocks.k.*`` (the body feeding exit k) and
    ``heads.k.*``. Depth-scaled clients (DepthFL, ScaleFL) hold exactly the keys with
    ``exit_index(key) < depth``."""
    parts = key.split(".", 2)
    if len(parts) < 2 or parts[0] not in ("blocks", "heads") or not parts[1].isdigit():
        raise ValueError(f"not an early-exit network parameter: {key!r}")
    return int(parts[1])


def equal_groups(n: int, k: int, order: Tensor | None = None) -> list[int]:
    """Group ``0..k-1`` of each client id, for ``n`` clients split into ``k`` groups as equal
    as possible. Clients are taken in ``order`` (a permutation of ids; default: by id): the
    client at position ``p`` joins group ``p * k // n``, so group sizes differ by at most one
    (for n divisible by k: ``p // (n / k)``, the DepthFL reference's split).
    """
    if n < 1 or k < 1:
        raise ValueError(f"need n >= 1 clients and k >= 1 groups, got n={n}, k={k}")
    ids = range(n) if order is None else [int(i) for i in order]
    groups = [0] * n
    for pos, cid in enumerate(ids):
        groups[cid] = pos * k // n
    return groups


# ----------------------------------------------------------------------------- self-distillation
def mutual_distillation(logits: list[Tensor], tau: float = 1.0) -> list[Tensor]:
    """Per exit ``i``: ``mean_{j != i} tau^2 KL(softmax(z_j / tau).detach() || softmax(z_i / tau))``.

    Every exit learns from all the others while no exit is pushed by its own teaching
    (the teachers are detached), as in DepthFL's mutual self-distillation. One exit: no term.
    """
    m = len(logits)
    if m < 2:
        return [z.new_zeros(()) for z in logits]
    teachers = [F.softmax(z.detach() / tau, dim=1) for z in logits]
    return [sum(kd_loss(zi, teachers[j], tau) for j in range(m) if j != i) / (m - 1)
            for i, zi in enumerate(logits)]


# ----------------------------------------------------------------------------- shared body, personal heads
class SharedBody(Algorithm):
    """Base of the body-sharing family (FedPer, FedRep, FedBABU): every client starts from the
    same weights, trains with CE summed over exits, and the body (``blocks.*``) is averaged
    (sample-weighted over the active clients) while the exit heads stay personal."""

    common_init = True

    def local_loss(self, state: dict[str, Tensor], batch: LocalBatch) -> Tensor:
        return exits_ce(batch.logits, batch.y)

    def shared_mask(self, cid: int, key: str, tensor: Tensor) -> bool:
        return is_body(key)


# ----------------------------------------------------------------------------- depth-scaled clients
class DepthScaled(Algorithm):
    """Base of the resource-scaled family (DepthFL, ScaleFL): one global early-exit network of
    which client ``c`` trains only blocks and exits ``0..depth(c)-1``; each layer is averaged
    over the active clients that hold it. Every client keeps a copy of the global model
    (``non_holders_receive``: the loop must also copy the holders' average into the layers a
    client does not hold), so it is evaluated at every exit like FedAvg-EE.

    Subclasses set ``self.depths`` (one entry per client id) in ``__init__``.
    """

    common_init = True
    non_holders_receive = True
    depths: list[int]

    def depth(self, cid: int) -> int:
        """Number of blocks (and exits) client ``cid`` holds and trains."""
        return self.depths[cid]

    def local_phases(self, client: ClientView, round_idx: int) -> list[Phase]:
        return [Phase(upto=self.depth(client.cid))]

    def shared_mask(self, cid: int, key: str, tensor: Tensor) -> bool | Tensor:
        return exit_index(key) < self.depth(cid)
