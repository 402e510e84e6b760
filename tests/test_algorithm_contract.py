"""What every registered algorithm must pass, whatever it does (a new one is picked up here).

In-process, on the harness's tiny digits problem with half the clients training each round:

* a run whose clients are parked between uses (``train.resident_clients: 1``, on disk) and that is
  checkpointed after round 1 and resumed by a fresh trainer equals the plain run, bit for bit:
  every piece of per-client state lives in ``client.state`` (or a model, or an optimizer), the
  coordinator's in ``server_state``, and hooks that may not change a client do not;
* an algorithm that declares ``vmappable_loss`` trains packed as it trains sequentially.

And what the contract refuses, in one line naming the algorithm: at registration
(``check_algorithm``) a class the config or the loop could not use; in a round, phases the loop
would run wrongly, a vmappable loss that reads ``batch.module`` under packing, and exchange rows
that do not match their spec.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from algo_harness import load, make_trainer, save
from conftest import TIMING_KEYS

from cafedist.algorithms import ALGORITHMS, Algorithm, check_algorithm
from cafedist.algorithms.base import Check, Phase
from cafedist.algorithms.common import is_body, is_head
from cafedist.algorithms.logit_exchange import LogitExchange
from cafedist.run.client import model_hash

ROUNDS = 3


def _params(name: str) -> dict:
    fields = {f.name for f in dataclasses.fields(ALGORITHMS[name].Params)}
    return {"proxy_size": 24} if "proxy_size" in fields else {}


def _state(tr) -> dict[int, tuple]:
    """Every client's model hashes and algorithm state (host copies), by client id."""
    return {c.cid: ({k: model_hash(m) for k, m in c.models.items()},
                    {k: v.detach().cpu().clone() for k, v in c.state.items()})
            for c in tr.pool.each(tr.pool.ids, modify=False)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[c][0] == b[c][0] and a[c][1].keys() == b[c][1].keys()
        and all(torch.equal(a[c][1][k], b[c][1][k]) for k in a[c][1]) for c in a)


def _record(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in TIMING_KEYS}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_parked_and_resumed_run_equals_the_plain_run(name, tmp_path):
    opts = {"clients_per_round": 0.5, "rounds": ROUNDS}
    plain = make_trainer(tmp_path, name, _params(name), **opts)
    expected = [_record(plain.run_round(r)) for r in range(ROUNDS)]
    final = _state(plain)
    plain.pool.close()

    # parked on disk: parked in host memory on a CPU, a loaded client's state tensors are the
    # parked ones (no copy to make), so a hook changing them in place (add_, copy_) would change
    # the parked copy too and go unseen here, while on a GPU, or parked on disk, it is lost
    parked = {"resident_clients": 1, "client_state": "disk"}
    first = make_trainer(tmp_path, name, _params(name), **parked, **opts)
    first.run_dir = tmp_path / "resumed"
    got = [_record(first.run_round(r)) for r in range(2)]
    save(first, 1)
    first.pool.close()
    second = make_trainer(tmp_path, name, _params(name), **parked, **opts)
    second.run_dir = tmp_path / "resumed"
    assert load(second) == 2
    got.append(_record(second.run_round(2)))
    assert got == expected, (
        f"{name}: parked and resumed, the run's records differ from the plain run's: per-client state "
        "kept outside client.state, coordinator state missing from server_state, or a hook that "
        "changed a client where it may not (docs/ALGORITHMS.md, 'What the loop relies on')")
    assert _same(_state(second), final), f"{name}: parked and resumed, the clients' models or state differ"
    second.pool.close()


@pytest.mark.parametrize("name", [n for n, cls in ALGORITHMS.items() if cls.vmappable_loss])
def test_a_vmappable_loss_trains_packed_as_sequentially(name, tmp_path):
    trained = {}
    for packed in ("off", "on"):
        tr = make_trainer(tmp_path, name, _params(name), rounds=2, packed=packed)
        assert tr.use_packed == (packed == "on"), f"{name}: packing refused"
        for r in range(2):
            tr.run_round(r)
        trained[packed] = [dict(c.model.named_parameters()) for c in tr.clients]
    for seq, pk in zip(trained["off"], trained["on"]):
        for k in seq:
            torch.testing.assert_close(pk[k], seq[k], rtol=1e-3, atol=1e-4,
                                       msg=lambda m, k=k: f"{name}: packed training differs at {k}: {m}")


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


def test_a_logit_exchange_with_its_own_proxy_size_needs_no_such_parameter():
    """An override of proxy_size as a staticmethod (build_run calls it on the class, so it
    works) has no ``__func__``: registration ended in an AttributeError traceback at import."""
    for own in (classmethod(lambda cls, params, available: min(8, available)),
                staticmethod(lambda params, available: min(8, available))):
        check_algorithm(_cls(LogitExchange, proxy_size=own))


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



class _CallsModule(Algorithm):
    """A vmappable loss that runs ``batch.module`` (a stand-in that returned None would train on)."""

    name = "calls-module"
    vmappable_loss = True
    use = staticmethod(lambda batch: batch.module(batch.x))

    def local_loss(self, state, batch):
        extra = self.use(batch)
        return sum(torch.nn.functional.cross_entropy(z, batch.y) for z in batch.logits) + (0 if extra is None else 0)


class _IteratesModule(_CallsModule):
    name = "iterates-module"
    use = staticmethod(lambda batch: [m for m in batch.module] or None)


@pytest.mark.parametrize("cls,used", [(_CallsModule, "batch.module(...)"), (_IteratesModule, "iter(batch.module)")])
def test_a_vmappable_loss_calling_or_iterating_the_module_is_named_under_packing(tmp_path, monkeypatch, cls, used):
    monkeypatch.setitem(ALGORITHMS, cls.name, cls)
    tr = make_trainer(tmp_path / "packed", cls.name, rounds=1, packed="on")
    with pytest.raises(TypeError, match=f"{cls.name!r} declares vmappable_loss, but its local_loss used "
                                        f"{re.escape(used)} under packed training"):
        tr.run_round(0)


class _OwnNoneBug(Algorithm):
    """A vmappable loss with a bug of its own about a None (not the module): its own error must show."""

    name = "own-none-bug"
    vmappable_loss = True

    def local_loss(self, state, batch):
        return sum(torch.nn.functional.cross_entropy(z, batch.y) for z in batch.logits) * state.get("scale").sum()


def test_a_vmappable_losss_own_error_is_not_reported_as_a_read_of_the_module(tmp_path, monkeypatch):
    """Any AttributeError/TypeError mentioning NoneType was reported as 'reads batch.module'."""
    monkeypatch.setitem(ALGORITHMS, _OwnNoneBug.name, _OwnNoneBug)
    tr = make_trainer(tmp_path / "packed", _OwnNoneBug.name, rounds=1, packed="on")
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'sum'") as caught:
        tr.run_round(0)
    assert "vmappable_loss" not in str(caught.value)


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
