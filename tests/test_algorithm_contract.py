"""What the algorithm contract refuses, in one line naming the algorithm.

* the registry (``check_algorithm``): a class the config or the loop could not use;
* in a round: phases the loop would run wrongly, a vmappable loss that reads ``batch.module``
  under packing, exchange rows that do not match their spec.
"""

from __future__ import annotations

import dataclasses

import pytest

from cafedist.algorithms import ALGORITHMS, Algorithm, check_algorithm
from cafedist.algorithms.base import Check
from cafedist.algorithms.logit_exchange import LogitExchange


# ----------------------------------------------------------------------------- registration
@dataclasses.dataclass
class _NoDefault:
    k: int


@dataclasses.dataclass
class _BadDefault:
    k: int = 0

    def checks(self) -> list[Check]:
        return [("k", self.k > 0, "> 0")]


@dataclasses.dataclass
class _Unresolvable:
    k: "NotAType" = 0  # noqa: F821 - the unresolvable annotation under test


class _PlainParams:
    k = 0


def _cls(base: type = Algorithm, **attrs) -> type:
    return type("Candidate", (base,), {"name": "candidate", **attrs})


@pytest.mark.parametrize("cls, message", [
    (_cls(name="my.algo"), "name must be letters, digits"),
    (_cls(name="my algo"), "name must be letters, digits"),
    (_cls(name="all"), "not 'name' or 'all'"),
    (_cls(name="name"), "not 'name' or 'all'"),
    (_cls(Params=_PlainParams), "Params must be a dataclass"),
    (_cls(Params=_NoDefault), "_NoDefault.k needs a default"),
    (_cls(Params=_BadDefault), "the default k=0 fails its own check"),
    (_cls(Params=_Unresolvable), "annotations of _Unresolvable do not resolve"),
    (_cls(cohort_exchange=True), "aggregate_cohort is not implemented"),
    (_cls(LogitExchange), "Params needs a proxy_size field"),
])
def test_the_registry_refuses_an_unusable_algorithm_in_one_line(cls, message):
    with pytest.raises(RuntimeError, match=message) as err:
        check_algorithm(cls)
    assert "\n" not in str(err.value) and f"algorithm {cls.name!r}" in str(err.value)


def test_every_registered_algorithm_passes_registration():
    for cls in ALGORITHMS.values():
        check_algorithm(cls)
