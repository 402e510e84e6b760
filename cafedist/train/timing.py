"""Round timers that mean the same on a GPU as on the CPU.

CUDA kernels and NCCL collectives return once queued, so a plain wall clock would charge a
collective's transfer to whatever first waits for its result (the aggregation, say) and leave
``t_comm`` near zero. :func:`now` waits for the device's queued work first.
"""

from __future__ import annotations

import time

import torch


def now(device: torch.device) -> float:
    """``time.perf_counter()`` once ``device`` has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


__all__ = ["now"]
