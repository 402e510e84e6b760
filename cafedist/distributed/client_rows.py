"""Collectives over rows that belong to clients: results in client-id order, whoever hosts them.

A rank holds the rows of its clients (in placement order). :class:`ClientRows` gathers them to
rank 0 or to every rank and reorders them by client id, scatters rank 0's client-id-ordered
rows back to the ranks that host each client, and sums small counters; so everything above it
sees the same tensors on 1, 2 or 4 ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cafedist.distributed.comm import Comm

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (row shape, dtype)


def stack_rows(rows: list[Tensor], row_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A rank's client rows -> [k, *row_shape] on ``device``; a rank with no row to send (no
    client, or none active) still joins the collective with an empty [0, *row_shape]."""
    return torch.stack(rows).to(device) if rows else torch.empty(0, *row_shape, dtype=dtype, device=device)


class ClientRows:
    """Client-id-ordered collectives of one placement (``placement[r]``: the ids rank r hosts)."""

    def __init__(self, comm: Comm, placement: list[list[int]], device: torch.device):
        self.comm, self.device = comm, device
        self.placement = placement
        self.counts = [len(p) for p in placement]
        # where each rank-ordered row goes: its client's position among all ids, increasing
        position = {cid: i for i, cid in enumerate(sorted(c for p in placement for c in p))}
        self.rank_order = torch.tensor([position[c] for p in placement for c in p], dtype=torch.int64)

    def cohort(self, active: Tensor) -> ClientRows:
        """The same collectives over the clients ``active`` (bool [n]) only: rows [k, ...] in
        increasing client id, k the number of active clients (every rank knows who they are)."""
        keep = active.cpu()
        return ClientRows(self.comm, [[c for c in p if keep[c]] for p in self.placement], self.device)

    def gather(self, local: Tensor, transport_dtype: torch.dtype | None = None, to_all: bool = False) -> Tensor | None:
        """Rows of my clients -> [n, ...] in client-id order (rank 0 only unless ``to_all``)."""
        if to_all:
            rows = self.comm.all_gather_rows(local, self.counts, transport_dtype=transport_dtype)
        else:
            rows = self.comm.gather_rows_to_main(local, self.counts, transport_dtype=transport_dtype)
        if rows is None:
            return None
        out = torch.empty_like(rows)
        out[self.rank_order.to(rows.device)] = rows
        return out

    def scatter(self, rows: dict[str, Tensor] | None, spec: Spec) -> dict[str, Tensor]:
        """Rank 0's [n, ...] payloads (client-id order) -> this rank's rows, in my client order."""
        out = {}
        for key, (shape, dtype) in spec.items():
            src = rows[key][self.rank_order.to(rows[key].device)].to(self.device) if rows is not None else None
            out[key] = self.comm.scatter_rows(src, self.counts, shape_dtype=(tuple(shape), dtype))
        return out

    def sum_int(self, value: int) -> int:
        """``value`` summed over ranks (every rank gets the sum)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self.comm.all_reduce_sum_(t)
        return int(t.item())

    def wire_bytes(self) -> int:
        """Bytes put on the wire since the last call, summed over ranks (0 on one rank)."""
        sent = self.comm.reset_counters().get("bytes_sent", 0)
        total = self.sum_int(sent)
        self.comm.reset_counters()  # the reduction's own bytes are bookkeeping, not training traffic
        return total
