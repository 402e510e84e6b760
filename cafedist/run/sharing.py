"""Shared parameters: which ones the algorithm averages, who holds them, and the average itself.

FedAvg-style: sample-weighted over the clients that trained this round and hold a parameter
(or an element of it), in fixed point (:mod:`cafedist.train.averaging`), so the result is the
same on any number of ranks. Every holder receives the average, active or not: the clients on
the device at once, a parked client when it is next materialized (:meth:`SharedParams.catch_up`
from the newest average of every element and the round it was set), which gives the same bits
without touching thousands of idle clients every round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cafedist.algorithms.base import Algorithm
from cafedist.flat import flatten, unflatten_into
from cafedist.run.client import Client
from cafedist.run.residency import ClientPool
from cafedist.train.averaging import weighted_sum


class HoldingMasks:
    """What each client holds of the averaged parameters: bool [length] per client id, built
    on demand from one entry per parameter (a bool or an element mask), so thousands of
    clients cost a few bytes each rather than a mask each."""

    def __init__(self, entries: list[list[bool | Tensor]], numels: list[int]):
        self._entries, self._numels = entries, numels

    def __getitem__(self, cid: int) -> Tensor:
        return torch.cat([e.reshape(-1) if isinstance(e, Tensor) else torch.full((n,), e, dtype=torch.bool)
                          for e, n in zip(self._entries[cid], self._numels)])

    def count(self, cid: int) -> int:
        """Elements client ``cid`` holds."""
        return sum(int(e.sum()) if isinstance(e, Tensor) else n * bool(e)
                   for e, n in zip(self._entries[cid], self._numels))


@dataclass
class SharedParams:
    """The averaged parameters of a run: their names, total length and holding masks."""

    algo: Algorithm
    keys: list[str]  # averaged parameter names, in model order
    masks: HoldingMasks | None  # per client id, bool [length]: what it holds (None: all hold all)
    length: int  # elements of the averaged parameters
    # the newest average of every element (float64) and the round that set it (-1: never)
    latest: Tensor | None = None
    stamp: Tensor | None = None
    last_round: int = -1  # the newest round with an average

    @classmethod
    def of(cls, algo: Algorithm, probe: nn.Module) -> SharedParams:
        """Ask ``algo.shared_mask`` about every parameter of ``probe`` for every client."""
        n = algo.setup.num_clients
        named = dict(probe.named_parameters())
        entries: list[list[bool | Tensor]] = [[] for _ in range(n)]
        keys, numels, everyone_all = [], [], True
        for key, tensor in named.items():
            per_client = [algo.shared_mask(cid, key, tensor.detach()) for cid in range(n)]
            per_client = [m.to(torch.bool) if isinstance(m, Tensor) else bool(m) for m in per_client]
            if not any(bool(m.any()) if isinstance(m, Tensor) else m for m in per_client):
                continue
            keys.append(key)
            numels.append(tensor.numel())
            for cid, m in enumerate(per_client):
                everyone_all = everyone_all and (bool(m.all()) if isinstance(m, Tensor) else m)
                entries[cid].append(m)
        length = sum(numels)  # extra models share the main architecture
        masks = HoldingMasks(entries, numels) if keys and not everyone_all else None
        return cls(algo=algo, keys=keys, masks=masks, length=length)

    def bytes_per_client(self, active: Tensor) -> tuple[int, int]:
        """Bytes one client sends and receives for the averaged parameters (float32): what it
        holds, averaged over the clients that trained, up; what it is given, averaged over all
        clients, down (everything under ``non_holders_receive``, e.g. DepthFL's global model)."""
        if not self.keys:
            return 0, 0
        length, masks, n = self.length, self.masks, self.algo.setup.num_clients
        if masks is None:
            return length * 4, length * 4
        trained = [cid for cid in range(n) if active[cid]] or list(range(n))
        up = sum(masks.count(cid) for cid in trained) / len(trained)
        down = length if self.algo.non_holders_receive else sum(masks.count(cid) for cid in range(n)) / n
        return round(4 * up), round(4 * down)

    def average(self, pool: ClientPool, active: Tensor, rnd: int, all_reduce_sum, device: torch.device) -> None:
        """Set the shared parameters of my clients to the weighted average over the active
        holders on every rank (``all_reduce_sum``: the sum over ranks, in place): now for the
        resident ones, at their next materialization for the parked ones."""
        keys, masks, length, algo = self.keys, self.masks, self.length, self.algo
        w = algo.setup.data_weights * active.to(torch.float64)
        # denominators: every rank knows every client's weight and mask (client-id order)
        if masks is None:
            den = torch.full((length,), float(w.sum()), dtype=torch.float64)
        else:
            den = torch.zeros(length, dtype=torch.float64)
            for cid in range(algo.setup.num_clients):
                if w[cid] > 0:
                    den += masks[cid].to(torch.float64) * w[cid]
        den = den.to(device)
        vectors, weights = [], []
        for c in pool.each([cid for cid in pool.ids if active[cid]], modify=False):
            sd = c.models[algo.shared_model].state_dict()
            vectors.append(flatten([sd[k] for k in keys]))
            m = masks[c.cid].to(device) if masks is not None else None
            weights.append(float(w[c.cid]) if m is None else m.to(torch.float64) * float(w[c.cid]))
        total = weighted_sum(vectors, weights, all_reduce_sum, length, device)
        held = den > 0
        avg = torch.where(held, total / torch.where(held, den, torch.ones_like(den)), torch.zeros_like(den))
        if self.latest is None:
            self.latest = torch.zeros(length, dtype=torch.float64, device=device)
            self.stamp = torch.full((length,), -1, dtype=torch.int64, device=device)
        self.latest = torch.where(held, avg, self.latest)
        self.stamp = torch.where(held, torch.full_like(self.stamp, rnd), self.stamp)
        self.last_round = rnd
        for c in pool.resident():  # idle clients too: they download the current average
            self.catch_up(c)

    def catch_up(self, client: Client) -> None:
        """Give ``client`` every element averaged since its ``shared_round`` (exactly what it
        would hold had it received each round's average when it was made)."""
        if not self.keys or self.latest is None or client.shared_round >= self.last_round:
            return
        where = self.stamp > client.shared_round
        if not (self.masks is None or self.algo.non_holders_receive):
            where = where & self.masks[client.cid].to(where.device)
        sd = client.models[self.algo.shared_model].state_dict()
        unflatten_into(self.latest, [sd[k] for k in self.keys], where=where)
        client.shared_round = self.last_round

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (the same on every rank)."""
        return {"latest": self.latest, "stamp": self.stamp, "last_round": self.last_round} \
            if self.latest is not None else {}

    def load_state(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore :meth:`state` (an older checkpoint has none: every client held every average).
        One of another set of averaged parameters (another algorithm's, ``--resume force``) is a
        ValueError, unless this algorithm averages nothing: then it has nothing to apply to."""
        if state and self.keys:
            latest, stamp = state["latest"], state["stamp"]
            if latest.numel() != self.length or stamp.numel() != self.length:
                raise ValueError(f"the checkpoint's average covers {latest.numel()} parameter elements, "
                                 f"this algorithm averages {self.length} (written by another algorithm?)")
            self.latest, self.stamp = latest.to(device), stamp.to(device)
            self.last_round = int(state["last_round"])
