"""Measurement helpers shared by the benchmarks: interleaved timing and peak memory.

Machines are noisy (2 shared cores here, busy GPUs elsewhere), so every ratio a benchmark
reports comes from candidates timed *side by side*: short runs alternate A, B, A, B, ..., and
the ratio is the median of the per-pair ratios, so a burst of background load hits both
candidates of a pair alike and bursts that hit one pair only are voted out.
"""

from __future__ import annotations

import re
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def resolve_device(spec: str) -> torch.device:
    """``--device`` of a benchmark, resolved as training resolves ``dist.device`` (``auto``: the
    first GPU when CUDA is available, else the CPU); on a GPU with training's deterministic
    kernel settings, so the timings are of the kernels a run uses."""
    from cafedist.distributed.runtime import deterministic_cuda
    from cafedist.distributed.runtime import resolve_device as resolve_run_device
    from cafedist.errors import ConfigError, DistError

    try:
        device = resolve_run_device(spec, name="--device")
    except DistError as exc:
        raise ConfigError(str(exc)) from None
    if device.type == "cuda":
        deterministic_cuda()
    return device


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """What makes a timing honest on ``device``: CUDA kernels run asynchronously, so the clock
    is read only after the device has finished; on the CPU there is nothing to wait for."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int,
                warmup: int = 1, sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Time each candidate ``repeats`` times in round-robin order (ABAB...); seconds per run.

    ``warmup`` untimed rounds first (lazy initialisation, allocator and cache warm-up).
    ``sync`` (see :func:`synchronizer`) is called before starting and before stopping each
    clock, so asynchronous GPU work is inside the run that launched it.
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    return times


def median(values: list[float]) -> float:
    """Median of a non-empty list (the robust centre of repeated timings)."""
    return float(statistics.median(values))


def paired_speed_ratio(ours: list[float], reference: list[float]) -> float:
    """Median over repeats of ``reference_i / ours_i`` (> 1: ours is faster).

    Each pair ran back to back, so it shares the machine's load of that moment; the median of
    per-pair ratios is steadier than the ratio of two medians when the load comes in bursts.
    """
    return median([r / o for o, r in zip(ours, reference)])


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def peak_memory_supported() -> bool:
    """Whether this OS lets us reset and read the peak resident set size (Linux >= 4.0)."""
    if _status_kib("VmHWM") is None:
        return False
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@contextmanager
def peak_rss_delta() -> Iterator[dict[str, int | None]]:
    """Measure how far the peak RSS rises above the RSS at entry, in bytes.

    Linux only: writing ``5`` to ``/proc/self/clear_refs`` resets the high-water mark
    (``VmHWM``) to the current RSS, so the peak covers this block alone. Unlike tracemalloc,
    this sees torch's own allocations. Yields a dict whose ``"bytes"`` is filled on exit
    (None where unsupported).
    """
    out: dict[str, int | None] = {"bytes": None}
    ok = peak_memory_supported()
    start = _status_kib("VmRSS") if ok else None
    try:
        yield out
    finally:
        peak = _status_kib("VmHWM") if ok else None
        if start is not None and peak is not None:
            out["bytes"] = max(0, peak - start) * 1024
