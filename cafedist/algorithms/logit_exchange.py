"""The mixin of methods that exchange per-exit proxy logits and learn from targets built on them.

Such a method sends its clients' logits on this round's proxy subset P'(t) to rank 0
(:attr:`~cafedist.algorithms.base.Algorithm.exchanges_logits`), which turns them into per-client
targets over the same items; a client keeps them with :meth:`LogitExchange.keep_targets` and
distils on proxy batches drawn from them in later rounds. The loop finds the proxy subset the
targets belong to through :meth:`LogitExchange.targets_round`. CAFEDistill, its variants and
the proxy-distillation baselines (FedMD, DS-FL, KT-pFL) build on this.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cafedist.algorithms.base import Algorithm

TARGETS = "targets"  # the client's current targets over the proxy subset they were computed on
TARGETS_ROUND = "targets_round"  # int64 scalar: the round of that subset


class LogitExchange(Algorithm):
    """Base of logit-exchanging methods: proxy size, which exits are sent, where targets live.

    ``Params`` must have a ``proxy_size`` field (P' items per round). Subclasses say which
    exits :meth:`aggregate` reads (:meth:`proxy_exits`), which exits a client trains with CE
    (:meth:`students`), whether a phase draws proxy batches (``uses_proxy_batch``), and keep
    received targets with :meth:`keep_targets`.
    """

    exchanges_logits = True

    @classmethod
    def proxy_size(cls, params: Any, available: int) -> int:
        return min(params.proxy_size, available) if cls.needs_proxy(params) else 0

    def proxy_exits(self) -> tuple[int, ...]:
        """The exits whose proxy logits :meth:`aggregate` reads (default: all of them).

        The loop gathers only these (``comm.exits: used``, the default) or every exit
        (``comm.exits: all``), in increasing order either way, so an algorithm that reads only
        the last exit finds it at ``logits[:, -1]`` in both cases.
        """
        return tuple(range(self.setup.num_exits))

    def sent_exits(self, every_exit: bool = False) -> list[int]:
        """:meth:`proxy_exits`, checked, or every exit under ``comm.exits: all``.

        Raises ``ValueError`` naming the algorithm when ``proxy_exits`` breaks its contract
        (increasing, without repeats, within ``0..m-1``), since aggregations index from the end.
        """
        m = self.setup.num_exits
        if every_exit:
            return list(range(m))
        exits = list(self.proxy_exits())
        if not exits or exits != sorted(set(exits)) or exits[0] < 0 or exits[-1] >= m:
            raise ValueError(f"algorithm {self.name!r}: proxy_exits() must list exits in increasing order, "
                             f"without repeats, within 0..{m - 1}; got {exits}")
        return exits

    def students(self, state: dict[str, Tensor]) -> Tensor:
        """Bool mask [m] of exits trained with CE this round (the last exit always is)."""
        return torch.ones(self.setup.num_exits, dtype=torch.bool)

    def trained_exits(self, state: dict[str, Tensor]) -> Tensor:
        return self.students(state)

    @staticmethod
    def keep_targets(state: dict[str, Tensor], targets: Tensor, round_idx: int) -> None:
        """Store a client's received targets, computed on the proxy subset of ``round_idx``."""
        state[TARGETS] = targets
        state[TARGETS_ROUND] = torch.tensor(round_idx, dtype=torch.int64)

    def targets_round(self, state: dict[str, Tensor]) -> int | None:
        return int(state[TARGETS_ROUND]) if TARGETS_ROUND in state else None
