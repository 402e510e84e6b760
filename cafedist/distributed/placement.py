"""Which rank hosts which clients: balanced by training-set size, deterministic.

Placement is a pure function of (client sizes, world size), so every rank computes the same
answer without communicating, and a resumed run on a different number of ranks simply
re-places the clients.
"""

from __future__ import annotations

import heapq
from typing import Sequence

from cafedist.errors import DistError


def place_clients(sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """Assign client ids ``0..len(sizes)-1`` to ``world_size`` ranks; returns one list per rank.

    Greedy longest-processing-time: clients in order of decreasing size (ties: lower id
    first) each go to the least-loaded rank (ties: fewer clients, then lower rank; the
    client count only matters for zero-size clients and keeps every rank non-empty).
    Each rank's list is sorted by client id. Raises :class:`DistError` when there are more
    ranks than clients, since a rank without a client would idle.
    """
    n = len(sizes)
    if world_size < 1:
        raise DistError(f"world_size={world_size}: need at least 1 rank")
    if n == 0:
        raise DistError(f"cannot place 0 clients on {world_size} ranks: there are no clients")
    if world_size > n:
        raise DistError(f"cannot place {n} clients on {world_size} ranks: use at most {n} ranks")
    for cid, size in enumerate(sizes):
        if int(size) != size or size < 0:
            raise DistError(f"client {cid} has size {size!r}: expected a non-negative integer")

    # Heap entries (load, number of clients, rank): popping gives the least-loaded rank.
    heap = [(0, 0, rank) for rank in range(world_size)]
    placement: list[list[int]] = [[] for _ in range(world_size)]
    for cid in sorted(range(n), key=lambda c: (-int(sizes[c]), c)):
        load, count, rank = heapq.heappop(heap)
        placement[rank].append(cid)
        heapq.heappush(heap, (load + int(sizes[cid]), count + 1, rank))
    return [sorted(ids) for ids in placement]


