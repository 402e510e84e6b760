"""``bench aggregate``: CAFEDistill's coordinator step for n clients, time and peak memory.

Synthetic proxy logits with cluster structure (clients of one of 8 clusters
share a mean logit pattern, as non-IID clients with similar label mixes do), so the teacher
weights are as sparse or dense as they are in practice rather than trivially diagonal. The
aggregation gets what the loop gathers by default: the exits CAFEDistill reads (the last one).

* ``ratio_vs_matmul``: aggregation time over the time of the dominant similarity product
  ``[n, P'C] x [P'C, n]`` in float32, timed alternately with it (median of per-pair ratios);
* ``peak_mb``: how far the resident set rises above its level before the call, measured in a
  fresh process (Linux ``VmHWM`` reset; sees torch's allocations, which tracemalloc does not;
  a fresh process and ``MALLOC_MMAP_THRESHOLD_`` keep memory freed by earlier calls from
  hiding the peak), next to ``input_mb``, the size of the logits: linear in n when
  ``peak_mb / n`` is flat.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import torch
from torch import Tensor

from cafedist.algorithms import Algorithm, get_algorithm
from cafedist.algorithms.base import Setup
from cafedist.algorithms.proxy_math import cosine_similarity_rows, teacher_weights
from cafedist.bench.timing import interleaved, median, peak_rss_delta, synchronizer
from cafedist.childenv import child_env
from cafedist.errors import CafeError

CLUSTERS = 8


def synthetic_logits(n: int, m: int, proxy: int, classes: int, seed: int = 0) -> Tensor:
    """[n, m, P', C] float32: a per-cluster pattern (scale 3) plus per-client noise (scale 1)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLUSTERS, proxy, classes, generator=g) * 3
    out = torch.randn(n, m, proxy, classes, generator=g)
    out += centers[torch.arange(n) % CLUSTERS].unsqueeze(1)
    return out


def make_algo(n: int, m: int, proxy: int, classes: int, rounds: int = 20) -> Algorithm:
    """CAFEDistill with default parameters and uneven client sizes."""
    setup = Setup(num_clients=n, num_exits=m, num_classes=classes, rounds=rounds,
                  train_sizes=tuple(50 + (7 * i) % 100 for i in range(n)), seed=0, proxy_size=proxy)
    cls = get_algorithm("cafedistill")
    return cls(cls.Params(proxy_size=proxy), setup)


def sent_exits(algo: Algorithm, logits: Tensor) -> Tensor:
    """The exits the loop gathers by default (``comm.exits: used``): [n, e, P', C], contiguous."""
    return logits[:, algo.sent_exits()].contiguous()


def measure_peak(n: int, m: int, proxy: int, classes: int, rnd: int) -> int | None:
    """Peak extra resident bytes of one ``aggregate_logits`` call (run in a fresh process)."""
    algo = make_algo(n, m, proxy, classes)
    logits = sent_exits(algo, synthetic_logits(n, m, proxy, classes))
    with peak_rss_delta() as mem:
        algo.aggregate_logits(rnd, logits, torch.ones(n, dtype=torch.bool))
    return mem["bytes"]


def peak_in_subprocess(n: int, m: int, proxy: int, classes: int, rnd: int) -> int | None:
    """:func:`measure_peak` in a child process with the same thread count (None if unsupported)."""
    env = child_env(MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(torch.get_num_threads()))
    code = ("import torch; torch.set_num_threads(%d); from cafedist.bench.aggregate import measure_peak; "
            "print(measure_peak(%d, %d, %d, %d, %d))" % (torch.get_num_threads(), n, m, proxy, classes, rnd))
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError as exc:
        # killed (the OOM killer at large n on a small node) or failed: it was a traceback
        how = f"killed by signal {-exc.returncode}" if exc.returncode < 0 else f"exit {exc.returncode}"
        tail = ((exc.stderr or "").strip().splitlines() or ["no output"])[-1]
        raise CafeError(f"bench aggregate: the peak-memory run at n = {n} failed ({how}: {tail})") from None
    value = out.stdout.strip().splitlines()[-1]
    return None if value == "None" else int(value)


def bench_aggregate(quick: bool = False, sizes: tuple[int, ...] | None = None, proxy: int | None = None,
                    classes: int = 100, exits: int = 4, repeats: int | None = None, memory: bool = True,
                    device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Time, peak memory and ``ratio_vs_matmul`` of ``aggregate_logits`` for each n in ``sizes``."""
    sizes = sizes or ((64, 256) if quick else (64, 128, 256, 512, 1024))
    proxy = proxy or (200 if quick else 1000)
    repeats = repeats or 3
    rows = []
    for n in sizes:
        algo = make_algo(n, exits, proxy, classes)
        logits = sent_exits(algo, synthetic_logits(n, exits, proxy, classes)).to(device)
        active = torch.ones(n, dtype=torch.bool, device=logits.device)
        rnd = 3  # mid-schedule: a partial depth, so the greedy selection runs
        times = _time_vs_matmul(algo, rnd, logits, active, repeats)
        payload, report = algo.aggregate_logits(rnd, logits, active)
        peak = None
        if memory:
            peak = (peak_in_subprocess(n, exits, proxy, classes, rnd) if logits.device.type == "cpu"
                    else _cuda_peak(algo, rnd, logits, active))
        alpha_density = _alpha_density(algo, logits)
        row = {"benchmark": "aggregate", "n": n, "m": exits, "exits_sent": logits.shape[1], "proxy": proxy,
               "classes": classes, "device": str(logits.device),
               "threads": torch.get_num_threads(),
               "time_s": round(median(times["aggregate"]), 6), "matmul_s": round(median(times["matmul"]), 6),
               "ratio_vs_matmul": round(median([a / b for a, b in zip(times["aggregate"], times["matmul"])]), 3),
               "input_mb": round(logits.numel() * logits.element_size() / 2**20, 1),
               "peak_mb": None if peak is None else round(peak / 2**20, 1),
               "alpha_density": round(alpha_density, 3), "self_weight": round(report["self_weight"], 3)}
        if row["peak_mb"] is not None:
            row["peak_mb_per_client"] = round(row["peak_mb"] / n, 3)
        rows.append(row)
        del logits, payload  # free this size's inputs before the next, larger one is made
    return rows


def _time_vs_matmul(algo: Algorithm, rnd: int, logits: Tensor, active: Tensor,
                    repeats: int) -> dict[str, list[float]]:
    """Aggregation and the float32 similarity product [n, P'C] x [P'C, n], timed alternately."""
    n = logits.shape[0]
    q = torch.softmax(logits[:, -1], dim=2).reshape(n, -1).contiguous()
    def aggregate() -> Any:
        return algo.aggregate_logits(rnd, logits, active)
    return interleaved({"aggregate": aggregate, "matmul": lambda: q @ q.T}, repeats=repeats,
                       sync=synchronizer(logits.device))


def _cuda_peak(algo: Algorithm, rnd: int, logits: Tensor, active: Tensor) -> int:
    """Peak extra bytes the CUDA caching allocator hands out during one aggregation."""
    torch.cuda.synchronize(logits.device)
    base = torch.cuda.memory_allocated(logits.device)
    torch.cuda.reset_peak_memory_stats(logits.device)
    algo.aggregate_logits(rnd, logits, active)
    torch.cuda.synchronize(logits.device)
    return torch.cuda.max_memory_allocated(logits.device) - base


def _alpha_density(algo: Algorithm, logits: Tensor) -> float:
    """Share of non-zero teacher weights (how much of the target mixture is real work)."""
    n = logits.shape[0]
    q = torch.softmax(logits[:, -1], dim=2).reshape(n, -1)
    alpha = teacher_weights(cosine_similarity_rows(q), algo.setup.data_weights.to(q.device), algo.params.mu)
    return float((alpha > 0).to(torch.float64).mean())
