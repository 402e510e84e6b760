"""Flat parameter vectors: many tensors as one, and back (averaging, parameter-mixing methods)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten_into(flat: Tensor, tensors: Sequence[Tensor], where: Tensor | None = None) -> None:
    """Copy consecutive slices of ``flat`` into ``tensors`` in place (only where ``where`` is true)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        new = flat[offset:offset + n].view_as(t).to(t.dtype)
        if where is None:
            t.data.copy_(new)
        else:
            keep = where[offset:offset + n].view_as(t)
            t.data.copy_(torch.where(keep, new, t.data))
        offset += n
