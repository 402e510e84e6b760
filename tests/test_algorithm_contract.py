"""What the algorithm contract refuses, in one line naming the algorithm.

* the registry (``check_algorithm``): a class the config or the loop could not use;
* in a round: phases the loop would run wrongly, a vmappable loss that reads ``batch.module``
  under packing, exchange rows that do not match their spec.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from algo_harness import make_trainer

from cafedist.algorithms import ALGORITHMS, Algorithm, check_algorithm
from cafedist.algorithms.base import Check, Phase
from cafedist.algorithms.common import is_body, is_head
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


# ----------------------------------------------------------------------------- one-line errors in a round
class _ReadsModule(Algorithm):
    """Declares a vmappable loss but reads ``batch.module``, which packed training does not give."""

    name = "reads-module"
    vmappable_loss = True

    def local_loss(self, state, batch):
        return sum(torch.nn.functional.cross_entropy(z, batch.y) for z in batch.logits) \
            + 0 * sum(p.sum() for p in batch.module.parameters())


def test_a_vmappable_loss_reading_the_module_is_named_under_packing(tmp_path, monkeypatch):
    monkeypatch.setitem(ALGORITHMS, _ReadsModule.name, _ReadsModule)
    make_trainer(tmp_path / "seq", _ReadsModule.name, rounds=1, packed="off").run_round(0)  # fine sequentially
    tr = make_trainer(tmp_path / "packed", _ReadsModule.name, rounds=1, packed="on")
    with pytest.raises(TypeError, match="'reads-module' declares vmappable_loss.*never batch.module.*"
                                        "set vmappable_loss = False"):
        tr.run_round(0)


class _TwinPhases(Algorithm):
    name = "twin-phases"

    def local_phases(self, client, round_idx):
        return [Phase(name="a", trainable=is_head), Phase(name="a", trainable=is_body)]


class _UnknownModel(Algorithm):
    name = "unknown-model"

    def local_phases(self, client, round_idx):
        return [Phase(model="global")]  # without extra_models = ("global",)


@pytest.mark.parametrize("cls, packed, message", [
    (_TwinPhases, "off", "'twin-phases': two phases named 'a' in one round"),
    (_TwinPhases, "on", "'twin-phases': two phases named 'a' in one round"),
    (_UnknownModel, "off", "'unknown-model': phase 'train' trains model 'global', which a client does not hold"),
    (_UnknownModel, "on", "'unknown-model': phase 'train' trains model 'global', which a client does not hold"),
])
def test_phases_the_loop_would_run_wrongly_are_one_error(cls, packed, message, tmp_path, monkeypatch):
    monkeypatch.setitem(ALGORITHMS, cls.name, cls)
    monkeypatch.setattr(cls, "vmappable_loss", packed == "on")  # the default loss is vmappable: packed runs it
    tr = make_trainer(tmp_path, cls.name, rounds=1, packed=packed)
    with pytest.raises(ValueError, match=message):
        tr.run_round(0)


class _Rows(Algorithm):
    """Uploads one float per client and sends one back; ``shape``/``drop`` break one side."""

    name = "rows"
    up_shape: tuple[int, ...] = ()
    drop: bool = False

    def upload_spec(self):
        return {"n": ((), torch.float32)}

    def upload(self, client):
        return {"n": torch.zeros(self.up_shape)}

    def payload_spec(self):
        return {"back": ((2,), torch.float32)}

    def aggregate(self, round_idx, gathered, active):
        return ({} if self.drop else {"back": torch.zeros(gathered["n"].shape[0], 2)}), {}


@pytest.mark.parametrize("attrs, message", [
    ({"up_shape": (3,)}, r"'rows': upload\['n'\] is \(3,\) torch.float32, its spec says \(\) torch.float32"),
    ({"drop": True}, "'rows': aggregate returned no 'back'"),
])
def test_rows_that_do_not_match_their_spec_are_one_error(attrs, message, tmp_path, monkeypatch):
    cls = type("Rows", (_Rows,), attrs)
    monkeypatch.setitem(ALGORITHMS, cls.name, cls)
    tr = make_trainer(tmp_path, cls.name, rounds=1)
    with pytest.raises(ValueError, match=message):
        tr.run_round(0)


def test_rows_that_match_their_spec_pass(tmp_path, monkeypatch):
    monkeypatch.setitem(ALGORITHMS, _Rows.name, _Rows)
    assert make_trainer(tmp_path, _Rows.name, rounds=1).run_round(0)["bytes_down"] == 8
