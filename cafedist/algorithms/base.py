"""The small interface every federated algorithm implements; the round loop is generic.

An algorithm answers three questions, and nothing else:

* **local objective** -- what a client minimises on a private batch (and, for distillation
  methods, on a proxy batch): :meth:`Algorithm.local_loss`;
* **exchange** -- what leaves the client after local training: proxy-set logits of every
  exit (``exchanges_logits``) and/or parameters to be averaged (:meth:`Algorithm.shared_keys`);
* **aggregate** -- what the coordinator computes from the gathered logits
  (:meth:`Algorithm.aggregate_logits`, rank 0 only, batched tensor math over clients) and how
  a client takes its own share of the result (:meth:`Algorithm.receive`).

Per-client algorithm state (teacher targets, student masks, ...) is a ``dict[str, Tensor]``
kept in :class:`ClientState.algo` so that it is checkpointed with the client and travels with
it when clients are re-placed on another number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor


@dataclass(frozen=True)
class Setup:
    """Facts of the run an algorithm may depend on (identical on every rank)."""

    num_clients: int
    num_exits: int
    num_classes: int
    rounds: int
    train_sizes: tuple[int, ...]  # per client id
    seed: int

    @property
    def data_weights(self) -> Tensor:
        """Sample-size weights w (sum to 1), float64, indexed by client id."""
        w = torch.tensor(self.train_sizes, dtype=torch.float64)
        return w / w.sum()


@dataclass
class LocalBatch:
    """One local step's inputs to the loss: outputs on private data and (optionally) proxy data."""

    logits: list[Tensor]  # per exit, [B, C] on the private batch
    y: Tensor  # [B] labels
    proxy_logits: list[Tensor] | None = None  # per exit, [Bp, C] on the proxy batch
    proxy_pos: Tensor | None = None  # [Bp] rows of this client's current targets


@dataclass
class ClientState:
    """What an algorithm keeps per client between rounds (checkpointed with the client)."""

    algo: dict[str, Tensor] = field(default_factory=dict)


class Algorithm:
    """Base class; subclasses set ``name`` and ``Params`` and override what they need."""

    name: ClassVar[str] = ""
    Params: ClassVar[type] = object
    exchanges_logits: ClassVar[bool] = False  # gather per-exit proxy logits every round

    def __init__(self, params: Any, setup: Setup):
        self.params = params
        self.setup = setup

    # ---------------------------------------------------------------- client side
    def init_client_state(self, cid: int) -> dict[str, Tensor]:
        """Initial per-client algorithm state."""
        return {}

    def uses_proxy_batch(self, state: dict[str, Tensor]) -> bool:
        """Whether local steps of this client also need a proxy mini-batch this round."""
        return False

    def local_loss(self, state: dict[str, Tensor], batch: LocalBatch) -> Tensor:
        """The loss a client minimises on one local step."""
        raise NotImplementedError

    # ---------------------------------------------------------------- exchange
    def shared_keys(self, state_dict_keys: list[str]) -> list[str]:
        """Parameter names averaged over clients (sample-weighted) after local training."""
        return []

    # ---------------------------------------------------------------- coordinator (rank 0)
    def aggregate_logits(self, round_idx: int, logits: Tensor,
                         active: Tensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """From gathered proxy logits [n, m, P', C] (client-id order) compute per-client payloads.

        ``active`` (bool [n]) marks the clients that trained this round; only their rows of the
        payload are delivered, and inactive clients' logits are stale.

        Returns ``(payload, report)``: ``payload`` maps a name to a tensor whose first dimension
        is the client id (each client later receives only its own row); ``report`` holds small
        JSON-able facts for ``metrics.jsonl``.
        """
        raise NotImplementedError

    def payload_spec(self, proxy_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape (without the client dimension) and dtype of each payload entry."""
        return {}

    def receive(self, state: dict[str, Tensor], payload: dict[str, Tensor], round_idx: int) -> None:
        """Store this client's row of the aggregate (called on the client's own rank)."""

    def server_state(self) -> dict[str, Any]:
        """Coordinator state that must survive a resume (tensors and plain data only)."""
        return {}

    def load_server_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`server_state` returned."""

    def students(self, state: dict[str, Tensor]) -> Tensor:
        """Bool mask [m] of exits trained with CE this round (the last exit always is)."""
        mask = torch.ones(self.setup.num_exits, dtype=torch.bool)
        return mask
