"""``bench exits``: does answering at an early exit save the time its MACs promise?

MACs are what ``cafedist eval`` and ``--budget`` count; a deployed client pays in time. For
each architecture and batch size, a network (random weights, synthetic inputs: timings do not
depend on either) is exported as ``cafedist export`` exports it (one ``torch.export``
program per exit, run by :mod:`cafedist.deploy.early_exit`) and timed with every sample
answered at exit k (a static policy), side by side with the whole network in eager mode:

* ``time_fraction``: the early-exit model's time over the eager whole network's (median of
  paired ratios), beside ``macs_fraction``, exit k's MACs over the last exit's;
* at the last exit, ``time_fraction`` is the cost of running the network as staged programs
  (no sample leaves early) over running it eagerly: the overhead of the format itself.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from cafedist.bench.timing import interleaved, median, paired_speed_ratio
from cafedist.deploy import early_exit
from cafedist.deploy.export import export_stages, policy_spec, write_policy
from cafedist.eval.budget_search import Choice
from cafedist.models import build_model, macs_per_exit

#: (label, arch, input shape, options): the quick start's CNN and a CIFAR-sized ResNet-18
MODELS = (("cnn-mnist", "cnn", (1, 28, 28), {}), ("resnet18-cifar", "resnet18", (3, 32, 32), {"width": 16}))
BATCHES = (1, 64)
NUM_CLASSES = 10


def _exported(folder: Path, stages: list[str], macs: list[int], static_exit: int) -> early_exit.EarlyExitModel:
    """The exported network answering every sample at ``static_exit`` (0-based)."""
    write_policy(folder, policy_spec(Choice("static", None, static_exit=static_exit), stages, macs))
    return early_exit.load(folder)


def bench_exits(quick: bool = False, repeats: int | None = None,
                models: tuple[tuple[str, str, tuple[int, ...], dict], ...] = MODELS,
                batches: tuple[int, ...] = BATCHES) -> list[dict[str, Any]]:
    """Per model, batch size and exit: time and MACs of answering there, as fractions of the
    eager whole network's (module docstring)."""
    repeats = repeats or (15 if quick else 41)
    rows = []
    for label, arch, shape, options in models:
        torch.manual_seed(0)
        model = build_model(arch, shape, NUM_CLASSES, **options).eval()
        macs = macs_per_exit(model, shape)
        with tempfile.TemporaryDirectory(prefix="cafedist-bench-exits-") as tmp:
            folder = Path(tmp)
            stages = export_stages(model, torch.randn(2, *shape), folder)
            exported = [_exported(folder, stages, macs, k) for k in range(model.num_exits)]
            for batch in batches:
                x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))
                candidates = {"eager": lambda: model(x)}
                candidates.update({f"exit_{k + 1}": (lambda e=e: e(x)) for k, e in enumerate(exported)})
                with torch.no_grad():
                    times = interleaved(candidates, repeats=repeats, warmup=2)
                for k in range(model.num_exits):
                    mine = times[f"exit_{k + 1}"]
                    rows.append({"benchmark": "exits", "model": label, "batch": batch, "exit": k + 1,
                                 "threads": torch.get_num_threads(), "repeats": repeats,
                                 "ms_per_batch": round(1e3 * median(mine), 3),
                                 "eager_ms_per_batch": round(1e3 * median(times["eager"]), 3),
                                 "macs_fraction": round(macs[k] / macs[-1], 4),
                                 "time_fraction": round(1 / paired_speed_ratio(mine, times["eager"]), 4)})
    return rows


__all__ = ["BATCHES", "MODELS", "bench_exits"]
