"""``bench packed``: k same-architecture clients stepped together vs one after another.

The packed trainer (:func:`cafedist.train.packed.packed_local_update`) and the sequential
``local_update`` train identical copies of k synthetic clients (small ``cnn`` on 28x28, see
:mod:`cafedist.bench.synthetic`); runs alternate (ABAB) and ``speedup_vs_sequential`` is the
median of the per-pair time ratios. ``max_param_diff`` compares the two copies after one
more round from identical states: packed training must reproduce sequential training.
"""

from __future__ import annotations

from typing import Any

import torch

from cafedist.bench.synthetic import clone_cohort, make_cohort
from cafedist.bench.timing import interleaved, median, paired_speed_ratio, synchronizer
from cafedist.train.local import local_update
from cafedist.train.packed import packed_local_update


def max_param_diff(a, b) -> float:
    """Largest absolute difference between the parameters of two cohorts' main models."""
    with torch.no_grad():
        return max(float((pa - pb).abs().max()) for ca, cb in zip(a.clients, b.clients)
                   for pa, pb in zip(ca.model.parameters(), cb.model.parameters()))


def bench_packed(quick: bool = False, ks: tuple[int, ...] = (4, 16, 64), n_train: int | None = None,
                 scenario: str = "kd", repeats: int | None = None,
                 device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Samples/s of sequential vs packed local training for each k; ``speedup_vs_sequential``."""
    n_train = n_train or (32 if quick else 96)
    repeats = repeats or (3 if quick else 5)
    rows = []
    for k in ks:
        seq = make_cohort(k, n_train, scenario, device=device)
        pack = clone_cohort(seq)
        rounds = iter(range(1, 10**9))

        def sequential() -> None:
            rnd = next(rounds)
            for c in seq.clients:
                local_update(c, seq.algo, seq.train, rnd, 0, seq.proxy_x, seq.proxy_idx)

        def packed() -> None:
            packed_local_update(pack.clients, pack.algo, pack.train, next(rounds), 0, pack.proxy_x, pack.proxy_idx)

        times = interleaved({"sequential": sequential, "packed": packed}, repeats=repeats, sync=synchronizer(device))
        # equality: one more round from identical copies
        a = make_cohort(k, n_train, scenario, device=device)
        b = clone_cohort(a)
        for c in a.clients:
            local_update(c, a.algo, a.train, 0, 0, a.proxy_x, a.proxy_idx)
        packed_local_update(b.clients, b.algo, b.train, 0, 0, b.proxy_x, b.proxy_idx)
        samples = k * n_train * seq.train.local_epochs
        rows.append({"benchmark": "packed", "k": k, "scenario": scenario, "n_train": n_train,
                     "batch_size": seq.train.batch_size, "device": str(seq.proxy_x.device),
                     "threads": torch.get_num_threads(), "repeats": repeats,
                     "sequential_samples_per_s": round(samples / median(times["sequential"]), 1),
                     "packed_samples_per_s": round(samples / median(times["packed"]), 1),
                     "speedup_vs_sequential": round(paired_speed_ratio(times["packed"], times["sequential"]), 3),
                     "max_param_diff": max_param_diff(a, b)})
    return rows
