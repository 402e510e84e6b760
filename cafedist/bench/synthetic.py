"""Synthetic clients for the benchmarks: random 28x28 data on the device, a small ``cnn``.

Two scenarios of a CAFEDistill client:

* ``ce``: round 0 (cross-entropy on the last exit only, no proxy batch);
* ``kd``: a later round (every shallow exit a student, a proxy batch per step with KD on it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from cafedist.algorithms import Algorithm, get_algorithm
from cafedist.algorithms.base import Setup
from cafedist.config import TrainConfig
from cafedist.data.store import ClientData
from cafedist.models import build_model
from cafedist.run.client import Client, build_client_model, make_optimizer

SCENARIOS = ("ce", "kd")


@dataclass
class Cohort:
    """Clients ready for ``local_update`` / ``packed_local_update``, and what those need."""

    clients: list[Client]
    algo: Algorithm
    train: TrainConfig
    proxy_x: Tensor | None
    proxy_idx: Tensor | None


def make_cohort(k: int, n_train: int | list[int], scenario: str = "kd", *, shape: tuple[int, ...] = (1, 28, 28),
                width: int = 16, num_classes: int = 10, proxy_size: int = 256, batch_size: int = 32,
                proxy_batch_size: int = 32, local_epochs: int = 1, seed: int = 0,
                device: str | torch.device = "cpu") -> Cohort:
    """``k`` clients with ``n_train`` samples each (or a list of sizes), in scenario ``ce`` or ``kd``."""
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    sizes = [n_train] * k if isinstance(n_train, int) else list(n_train)
    g = torch.Generator().manual_seed(seed)
    train = TrainConfig(batch_size=batch_size, proxy_batch_size=proxy_batch_size, local_epochs=local_epochs)
    setup = Setup(num_clients=k, num_exits=3, num_classes=num_classes, rounds=10, train_sizes=tuple(sizes),
                  seed=seed, local_epochs=local_epochs, proxy_size=proxy_size)
    cafedistill = get_algorithm("cafedistill")
    algo = cafedistill(cafedistill.Params(proxy_size=proxy_size), setup)
    proxy_x = torch.randn(2 * proxy_size, *shape, generator=g).to(device)
    proxy_idx = torch.randperm(2 * proxy_size, generator=g)[:proxy_size].sort().values.to(device)
    clients = []
    for cid, n in enumerate(sizes):
        model = build_client_model(lambda: build_model("cnn", shape, num_classes, width=width), seed, cid).to(device)
        data = ClientData(x_train=torch.randn(n, *shape, generator=g).to(device),
                          y_train=torch.randint(0, num_classes, (n,), generator=g).to(device),
                          x_test=torch.zeros(0, *shape, device=device),
                          y_test=torch.zeros(0, dtype=torch.int64, device=device))
        state = algo.init_client_state(cid)
        if scenario == "kd":
            state = {"students": torch.ones(model.num_exits, dtype=torch.bool),
                     "targets": torch.softmax(torch.randn(proxy_size, num_classes, generator=g), dim=1).to(device),
                     "targets_round": torch.tensor(0)}
        clients.append(Client(cid=cid, models={"main": model}, optimizers={"main": make_optimizer(model, train)},
                              data=data, state=state))
    return Cohort(clients, algo, train, proxy_x, proxy_idx)


def clone_cohort(cohort: Cohort) -> Cohort:
    """An independent copy (same weights, data, state; fresh optimizers with copied state)."""
    clients = []
    for c in cohort.clients:
        models = {k: copy.deepcopy(m) for k, m in c.models.items()}
        opts = {}
        for k, m in models.items():
            opt = make_optimizer(m, cohort.train)
            opt.load_state_dict(c.optimizers[k].state_dict())
            opts[k] = opt
        clients.append(Client(cid=c.cid, models=models, optimizers=opts, data=c.data,
                              state={k: v.clone() for k, v in c.state.items()}))
    return Cohort(clients, cohort.algo, cohort.train, cohort.proxy_x, cohort.proxy_idx)

