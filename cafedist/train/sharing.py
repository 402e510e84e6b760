"""Shared parameters: which ones the algorithm averages, who holds them, and the average itself.

FedAvg-style: sample-weighted over the clients that trained this round and hold a parameter
(or an element of it), in fixed point (:mod:`cafedist.train.averaging`), so the result is the
same on any number of ranks. Every holder receives the average, active or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cafedist.algorithms.base import Algorithm
from cafedist.flat import flatten, unflatten_into
from cafedist.run.client import Client
from cafedist.train.averaging import weighted_sum


@dataclass
class SharedParams:
    """The averaged parameters of a run: their names, total length and holding masks."""

    algo: Algorithm
    keys: list[str]  # averaged parameter names, in model order
    masks: dict[int, Tensor] | None  # per client id, bool [length]: what it holds (None: all hold all)
    length: int  # elements of the averaged parameters

    @classmethod
    def of(cls, algo: Algorithm, probe: nn.Module) -> SharedParams:
        """Ask ``algo.shared_mask`` about every parameter of ``probe`` for every client."""
        n = algo.setup.num_clients
        named = dict(probe.named_parameters())
        masks: dict[int, list[Tensor]] = {cid: [] for cid in range(n)}
        keys, elementwise = [], False
        for key, tensor in named.items():
            per_client = [algo.shared_mask(cid, key, tensor.detach()) for cid in range(n)]
            if not any(bool(m) if not isinstance(m, Tensor) else bool(m.any()) for m in per_client):
                continue
            keys.append(key)
            for cid, m in enumerate(per_client):
                if isinstance(m, Tensor):
                    elementwise = True
                    masks[cid].append(m.to(torch.bool).reshape(-1))
                else:
                    masks[cid].append(torch.full((tensor.numel(),), bool(m), dtype=torch.bool))
        length = sum(named[k].numel() for k in keys)  # extra models share the main architecture
        flat = {cid: torch.cat(parts) for cid, parts in masks.items()} if keys else None
        if flat is not None and not elementwise and all(bool(f.all()) for f in flat.values()):
            flat = None
        return cls(algo=algo, keys=keys, masks=flat, length=length)

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
        up = sum(int(masks[cid].sum()) for cid in trained) / len(trained)
        down = length if self.algo.non_holders_receive else sum(int(masks[cid].sum()) for cid in range(n)) / n
        return round(4 * up), round(4 * down)

    def average(self, clients: list[Client], active: Tensor, all_reduce_sum, device: torch.device) -> None:
        """Replace the shared parameters of my ``clients`` by the weighted average over the
        active holders on every rank (``all_reduce_sum``: the sum over ranks, in place)."""
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
        for c in clients:
            if active[c.cid]:
                sd = c.models[algo.shared_model].state_dict()
                vectors.append(flatten([sd[k] for k in keys]))
                m = masks[c.cid].to(device) if masks is not None else None
                weights.append(float(w[c.cid]) if m is None else m.to(torch.float64) * float(w[c.cid]))
        total = weighted_sum(vectors, weights, all_reduce_sum, length, device)
        held = den > 0
        avg = torch.where(held, total / torch.where(held, den, torch.ones_like(den)), torch.zeros_like(den))
        receive_all = masks is None or algo.non_holders_receive
        for c in clients:  # idle clients too: they download the current average
            sd = c.models[algo.shared_model].state_dict()
            where = held if receive_all else held & masks[c.cid].to(device)
            unflatten_into(avg, [sd[k] for k in keys], where=where)
