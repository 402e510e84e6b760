"""Client placement: balanced, deterministic, every rank busy, clear errors."""

from __future__ import annotations

import random

import pytest

from cafedist.distributed import place_clients
from cafedist.errors import DistError


def loads(sizes: list[int], placement: list[list[int]]) -> list[int]:
    return [sum(sizes[c] for c in ids) for ids in placement]


def test_lpt_balances_by_size() -> None:
    sizes = [10, 9, 8, 7, 1]
    # 10->r0, 9->r1, 8->r1 (17), 7->r0 (17), 1->r0 (tie on load and count: lower rank)
    assert place_clients(sizes, 2) == [[0, 3, 4], [1, 2]]


def test_uneven_five_clients_on_two_ranks() -> None:
    sizes = [100, 100, 100, 100, 100]
    placement = place_clients(sizes, 2)
    assert sorted(len(p) for p in placement) == [2, 3]
    assert sorted(c for p in placement for c in p) == list(range(5))
    assert placement[0] == [0, 2, 4]  # ties go to the lower rank first


def test_each_rank_sorted_every_client_once_and_balanced() -> None:
    rng = random.Random(0)
    sizes = [rng.randint(1, 1000) for _ in range(37)]
    placement = place_clients(sizes, 5)
    assert all(ids == sorted(ids) and ids for ids in placement)
    assert sorted(c for ids in placement for c in ids) == list(range(37))
    spread = max(loads(sizes, placement)) - min(loads(sizes, placement))
    assert spread <= max(sizes)  # LPT guarantee: never worse than one client's size
    assert spread < sum(sizes) / 5 / 4  # and in practice far better than round-robin


def test_deterministic_and_independent_of_call_order() -> None:
    sizes = [5, 5, 3, 3, 3, 8, 0, 1]
    # by hand: largest first (8: client 5 to rank 0; 5, 5: ranks 1, 2; 3, 3 to the lighter ranks
    # 1, 2; the third 3 to rank 0, load 11), then 1 and 0 to the ranks with fewer clients
    expected = [[4, 5], [0, 2, 7], [1, 3, 6]]
    assert place_clients(sizes, 3) == expected
    place_clients([9, 1, 1, 7], 2)  # another call in between changes nothing (no state kept)
    assert place_clients(tuple(sizes), 3) == expected


def test_zero_size_clients_still_fill_every_rank() -> None:
    placement = place_clients([50, 0, 0], 3)
    assert all(placement) and placement == [[0], [1], [2]]


def test_one_rank_gets_everything() -> None:
    assert place_clients([3, 1, 2], 1) == [[0, 1, 2]]


@pytest.mark.parametrize("sizes, world, msg", [
    ([1, 2, 3], 4, "cannot place 3 clients on 4 ranks: use at most 3 ranks"),
    ([], 1, "cannot place 0 clients"),
    ([1, 2], 0, "world_size=0"),
    ([1, -2], 1, "client 1 has size -2"),
    ([1, 2.5], 1, "client 1 has size 2.5"),
])
def test_errors(sizes: list, world: int, msg: str) -> None:
    with pytest.raises(DistError, match=msg):
        place_clients(sizes, world)
