"""Round timers that mean the same on a GPU as on the CPU.

CUDA kernels and NCCL collectives return once queued, so a plain wall clock would charge a
collective's transfer to whatever first waits for its result (the aggregation, say) and leave
``t_comm`` near zero. :func:`now` waits for the device's queued work first.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch


def now(device: torch.device) -> float:
    """``time.perf_counter()`` once ``device`` has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextlib.contextmanager
def timed(timers: dict[str, float], key: str, device: torch.device) -> Iterator[None]:
    """Add the seconds the block takes (:func:`now` on ``device`` at both ends) to ``timers[key]``."""
    start = now(device)
    yield
    timers[key] += now(device) - start


__all__ = ["now", "timed"]
