"""``bench comm``: bytes per client per round, CAFEDistill vs FedAvg (exact counts, no timing).

* FedAvg: every parameter up and the average back, float32: ``2 * 4 * n_params`` (the
  same count ``summary.json`` uses for ``fedavg_bytes_per_client_per_round``);
* CAFEDistill up: the proxy logits the loop gathers, ``e * P' * C`` values in the wire dtype
  (``comm.logits_dtype``), where ``e`` is what ``comm.exits`` selects: ``used`` (default) =
  the algorithm's ``proxy_exits()`` (CAFEDistill reads the last exit only), ``all`` = every
  exit; down: the algorithm's real ``payload_spec()`` (targets [P', C] float32 and the
  student mask), independent of the model size and of n.
"""

from __future__ import annotations

from math import prod
from typing import Any

import torch

from cafedist.algorithms import get_algorithm
from cafedist.algorithms.base import Setup
from cafedist.models import build_model

_WIRE = {"float32": torch.float32, "float16": torch.float16}


def bench_comm(quick: bool = False, arch: str = "resnet18", input_shape: tuple[int, ...] = (3, 32, 32),
               classes: int = 100, proxy: int = 1000) -> list[dict[str, Any]]:
    """Bytes per client per round and ``ratio_vs_fedavg`` for float32/float16 logits."""
    model = build_model(arch, input_shape, classes)
    n_params = sum(p.numel() for p in model.parameters())
    m = model.num_exits
    setup = Setup(num_clients=1, num_exits=m, num_classes=classes, rounds=1, train_sizes=(1,), seed=0,
                  proxy_size=proxy)
    cafedistill = get_algorithm("cafedistill")
    algo = cafedistill(cafedistill.Params(proxy_size=proxy), setup)
    down = sum(prod(shape) * dtype.itemsize for shape, dtype in algo.payload_spec().values())
    fedavg = 2 * 4 * n_params
    rows = []
    for comm_exits, exits in (("used", len(algo.sent_exits())), ("all", m)):
        for name, dtype in _WIRE.items():
            up = exits * proxy * classes * dtype.itemsize
            rows.append({"benchmark": "comm", "arch": arch, "classes": classes, "proxy": proxy, "m": m,
                         "n_params": n_params, "logits_dtype": name, "comm_exits": comm_exits,
                         "bytes_up": up, "bytes_down": down, "bytes_per_client_per_round": up + down,
                         "fedavg_bytes_per_client_per_round": fedavg,
                         "ratio_vs_fedavg": round((up + down) / fedavg, 5)})
    return rows
