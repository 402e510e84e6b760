"""``bench local``: cafedist's ``local_update`` against a plain hand-written PyTorch loop.

Both train the same model (same initial weights) on the same on-device data with the same
batch size, shuffling and SGD; the plain loop writes the loss out by hand with
``F.cross_entropy`` / ``F.kl_div``, as one would for this one model and loss. Scenarios ``ce``
and ``kd`` (see :mod:`cafedist.bench.synthetic`). Runs alternate cafedist / plain (ABAB) and
``ratio_vs_plain`` is the median of the per-pair throughput ratios.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cafedist.bench.synthetic import SCENARIOS, make_cohort
from cafedist.bench.timing import interleaved, median, paired_speed_ratio, synchronizer
from cafedist.config import TrainConfig
from cafedist.run.client import make_optimizer
from cafedist.train.local import local_update


def plain_loop(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, train: TrainConfig,
               g: torch.Generator, proxy: tuple[Tensor, Tensor, float, float] | None = None) -> float:
    """The hand-written reference: shuffle, slice, forward, loss, backward, step.

    ``proxy = (proxy inputs, targets, tau, lam)`` adds a proxy batch per step and the KD term
    on every shallow exit (all exits get cross-entropy then, as in scenario ``kd``).
    """
    n, bs = x.shape[0], train.batch_size
    # summed on the device like local_update does: a .item() per step would stall a GPU
    total, steps = torch.zeros((), dtype=torch.float64, device=x.device), 0
    for _ in range(train.local_epochs):
        perm = torch.randperm(n, generator=g).to(x.device)
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            xb, yb = x[idx], y[idx]
            if proxy is None:
                loss = F.cross_entropy(model(xb)[-1], yb)
            else:
                px, targets, tau, lam = proxy
                pos = torch.randint(0, targets.shape[0], (train.proxy_batch_size,), generator=g).to(x.device)
                outs = model(torch.cat([xb, px[pos]]))
                b = xb.shape[0]
                loss = sum(F.cross_entropy(o[:b], yb) for o in outs)
                for o in outs[:-1]:
                    kd = F.kl_div(F.log_softmax(o[b:] / tau, dim=1), targets[pos], reduction="batchmean")
                    loss = loss + lam * tau * tau * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().to(torch.float64)
            steps += 1
    return float(total) / max(steps, 1)


def bench_local(quick: bool = False, repeats: int | None = None, n_train: int | None = None,
                scenarios: tuple[str, ...] = SCENARIOS, device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Samples/s of ``local_update`` vs the plain loop per scenario (``ratio_vs_plain`` >= 0.97 wanted)."""
    # many short alternating runs (one epoch of 256 samples each) beat a few long ones on a shared box
    repeats = repeats or (21 if quick else 41)
    n_train = n_train or 256
    rows = []
    for scenario in scenarios:
        cohort = make_cohort(1, n_train, scenario, device=device)
        c, algo, train = cohort.clients[0], cohort.algo, cohort.train
        # the plain loop trains its own copy: same weights, same data, same optimizer settings
        plain_model = copy.deepcopy(c.model)
        plain_opt = make_optimizer(plain_model, train)
        g = torch.Generator().manual_seed(1)
        proxy = None
        if scenario == "kd":
            p = algo.params
            proxy = (cohort.proxy_x[cohort.proxy_idx], c.state["targets"], p.tau, p.lam)
        rounds = iter(range(10**9))
        times = interleaved({
            "cafedist": lambda: local_update(c, algo, train, next(rounds), 0, cohort.proxy_x, cohort.proxy_idx),
            "plain": lambda: plain_loop(plain_model, plain_opt, c.data.x_train, c.data.y_train, train, g, proxy),
        }, repeats=repeats, sync=synchronizer(device))
        samples = n_train * train.local_epochs
        ours, ref = samples / median(times["cafedist"]), samples / median(times["plain"])
        rows.append({"benchmark": "local", "scenario": scenario, "n_train": n_train,
                     "batch_size": train.batch_size, "device": str(device), "repeats": repeats,
                     "threads": torch.get_num_threads(),
                     "samples_per_s": round(ours, 1), "plain_samples_per_s": round(ref, 1),
                     "ratio_vs_plain": round(paired_speed_ratio(times["cafedist"], times["plain"]), 4)})
    return rows
