"""Who trains in a round and on which proxy items: drawn from the seed, identical on every rank."""

from __future__ import annotations

import torch
from torch import Tensor

from cafedist.rng import generator


def proxy_subset(seed: int, round_idx: int, total: int, size: int) -> Tensor:
    """The proxy items of round ``round_idx`` (sorted indices), identical on every rank."""
    size = min(size, total)
    return torch.randperm(total, generator=generator(seed, "proxy", round_idx))[:size].sort().values


def participating(seed: int, round_idx: int, n: int, per_round: float) -> Tensor:
    """Bool [n]: clients that train in ``round_idx`` (all when ``per_round`` is 1.0)."""
    k = n if per_round == 1.0 else (round(per_round * n) if per_round < 1 else int(per_round))
    k = max(1, min(n, k))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator(seed, "participation", round_idx))[:k]] = True
    return mask
