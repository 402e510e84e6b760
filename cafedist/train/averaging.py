"""Sample-weighted parameter averaging that gives the same bits on any number of ranks.

A float all-reduce sums in an order that depends on the world size, so FedAvg over 2 ranks
and over 4 ranks would differ in the last bits and the runs would drift apart. We instead
sum *fixed-point* integers: every client's weighted contribution is rounded to a multiple of
2^-FRACTION_BITS in int64, and integer addition is associative, so the all-reduced sum is
identical whatever the placement. The rounding (~1e-12 absolute) is far below float32
resolution for parameters of ordinary size.

Averages can be restricted to *holders*: a client contributes to (and receives) a parameter,
or an element of it, only where its mask is true (DepthFL's depth-truncated and ScaleFL's
width-scaled clients). The denominators ``sum_i w_i m_i`` need no communication: every rank
knows every client's weight and mask and sums them in client-id order.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from cafedist.errors import TrainingDiverged

FRACTION_BITS = 40
_SCALE = float(2 ** FRACTION_BITS)
_LIMIT = float(2 ** 62) / _SCALE  # |weighted value| beyond this would overflow int64


def to_fixed(x: Tensor) -> Tensor:
    """float tensor -> int64 fixed point (round to nearest)."""
    x = x.to(torch.float64)
    if x.numel() and not float(x.abs().max()) < _LIMIT:  # also catches NaN
        raise TrainingDiverged(f"a shared parameter reached {float(x.abs().max()):.3g}: training diverged "
                               f"(try a lower train.lr)")
    return torch.round(x * _SCALE).to(torch.int64)


def from_fixed(q: Tensor) -> Tensor:
    """int64 fixed point -> float64."""
    return q.to(torch.float64) / _SCALE


def weighted_sum(vectors: Sequence[Tensor], weights: Sequence[Tensor | float],
                 all_reduce_sum: Callable[[Tensor], Tensor], length: int, device: torch.device) -> Tensor:
    """``sum_i weights_i * vectors_i`` over this rank's vectors and every other rank's (float64).

    ``weights`` may be scalars or per-element tensors (weight times holding mask). A rank
    with no contributing client passes empty sequences and still joins the collective.
    """
    acc = torch.zeros(length, dtype=torch.int64, device=device)
    for vec, w in zip(vectors, weights):
        acc += to_fixed(vec.to(torch.float64) * w)
    return from_fixed(all_reduce_sum(acc))
