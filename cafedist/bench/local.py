"""``bench local``: cafedist's ``local_update`` against a plain hand-written PyTorch loop.

Both train the same model (same initial weights) on the same on-device data with the same
batch size, shuffling and SGD; the plain loop writes the loss out by hand with
``F.cross_entropy`` / ``F.kl_div``. Two scenarios:

* ``ce``: round 0 of CAFEDistill (cross-entropy on the last exit only, no proxy batch);
* ``kd``: a later round (every shallow exit a student, a proxy batch per step, KD on it).

Runs alternate cafedist / plain (ABAB) and the ratio of median throughputs is reported.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cafedist.algorithms.base import Setup
from cafedist.algorithms.cafedistill import CAFEDistill, CAFEDistillParams
from cafedist.bench.timing import interleaved, median
from cafedist.config import TrainConfig
from cafedist.data.store import ClientData
from cafedist.models import build_model
from cafedist.train.client import Client, local_update, make_optimizer


@dataclass
class LocalCase:
    """One scenario: a client ready for ``local_update`` and what the plain loop needs."""

    client: Client
    algo: CAFEDistill
    train: TrainConfig
    proxy_x: Tensor | None
    proxy_idx: Tensor | None


def make_case(scenario: str, n_train: int = 512, width: int = 16, num_classes: int = 10,
              proxy_size: int = 256, train: TrainConfig | None = None, seed: int = 0) -> LocalCase:
    """A synthetic 28x28 client (data on CPU) in scenario ``ce`` or ``kd``."""
    if scenario not in ("ce", "kd"):
        raise ValueError(f"scenario must be 'ce' or 'kd', got {scenario!r}")
    g = torch.Generator().manual_seed(seed)
    shape = (1, 28, 28)
    torch.manual_seed(seed)
    model = build_model("cnn", shape, num_classes, width=width)
    train = train or TrainConfig(batch_size=32, proxy_batch_size=32, local_epochs=1)
    data = ClientData(x_train=torch.randn(n_train, *shape, generator=g),
                      y_train=torch.randint(0, num_classes, (n_train,), generator=g),
                      x_test=torch.zeros(0, *shape), y_test=torch.zeros(0, dtype=torch.int64))
    setup = Setup(num_clients=1, num_exits=model.num_exits, num_classes=num_classes, rounds=10,
                  train_sizes=(n_train,), seed=seed)
    algo = CAFEDistill(CAFEDistillParams(proxy_size=proxy_size), setup)
    state = algo.init_client_state(0)
    proxy_x = proxy_idx = None
    if scenario == "kd":
        state = {"students": torch.ones(model.num_exits, dtype=torch.bool),
                 "targets": torch.softmax(torch.randn(proxy_size, num_classes, generator=g), dim=1),
                 "targets_round": torch.tensor(0)}
        proxy_x = torch.randn(2 * proxy_size, *shape, generator=g)
        proxy_idx = torch.randperm(2 * proxy_size, generator=g)[:proxy_size].sort().values
    client = Client(cid=0, model=model, optimizer=make_optimizer(model, train), data=data, state=state)
    return LocalCase(client, algo, train, proxy_x, proxy_idx)


def plain_loop(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, train: TrainConfig,
               g: torch.Generator, proxy: tuple[Tensor, Tensor, float, float] | None = None) -> float:
    """The hand-written reference: shuffle, slice, forward, loss, backward, step.

    ``proxy = (proxy inputs, targets, tau, lam)`` adds the KD term on every shallow exit,
    written out directly (what an expert would write for this one model and loss).
    """
    n, bs = x.shape[0], train.batch_size
    total, steps = 0.0, 0
    for _ in range(train.local_epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            xb, yb = x[idx], y[idx]
            if proxy is None:
                outs = model(xb)
                loss = F.cross_entropy(outs[-1], yb)
            else:
                px, targets, tau, lam = proxy
                pos = torch.randint(0, targets.shape[0], (train.proxy_batch_size,), generator=g)
                outs = model(torch.cat([xb, px[pos]]))
                b = xb.shape[0]
                loss = sum(F.cross_entropy(o[:b], yb) for o in outs)
                for o in outs[:-1]:
                    kd = F.kl_div(F.log_softmax(o[b:] / tau, dim=1), targets[pos], reduction="batchmean")
                    loss = loss + lam * tau * tau * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss)
            steps += 1
    return total / max(steps, 1)


def bench_local(quick: bool = False, repeats: int | None = None, n_train: int | None = None,
                scenarios: tuple[str, ...] = ("ce", "kd")) -> list[dict[str, Any]]:
    """Samples/s of ``local_update`` vs the plain loop, per scenario; ``ratio_vs_plain`` >= 0.97 wanted."""
    repeats = repeats or (7 if quick else 15)
    n_train = n_train or (256 if quick else 1024)
    rows = []
    for scenario in scenarios:
        case = make_case(scenario, n_train=n_train)
        c = case.client
        # the plain loop trains its own copy: same weights, same data, same optimizer settings
        plain_model = copy.deepcopy(c.model)
        plain_opt = make_optimizer(plain_model, case.train)
        g = torch.Generator().manual_seed(1)
        proxy = None
        if scenario == "kd":
            p = case.algo.params
            proxy = (case.proxy_x[case.proxy_idx], c.state["targets"], p.tau, p.lam)
        rnd = iter(range(10**9))
        times = interleaved({
            "cafedist": lambda: local_update(c, case.algo, case.train, next(rnd), 0, case.proxy_x, case.proxy_idx),
            "plain": lambda: plain_loop(plain_model, plain_opt, c.data.x_train, c.data.y_train, case.train, g, proxy),
        }, repeats=repeats)
        samples = n_train * case.train.local_epochs
        ours, ref = samples / median(times["cafedist"]), samples / median(times["plain"])
        rows.append({"benchmark": "local", "scenario": scenario, "n_train": n_train,
                     "batch_size": case.train.batch_size, "repeats": repeats,
                     "threads": torch.get_num_threads(),
                     "samples_per_s": round(ours, 1), "plain_samples_per_s": round(ref, 1),
                     "ratio_vs_plain": round(ours / ref, 4)})
    return rows
