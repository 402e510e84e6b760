"""docs/ALGORITHMS.md's two recipes, executed as written: each algorithm trains through the loop."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from algo_harness import make_trainer

from cafedist.algorithms import ALGORITHMS, Algorithm

DOC = Path(__file__).resolve().parents[1] / "docs" / "ALGORITHMS.md"


def _recipe(name: str) -> type[Algorithm]:
    """The class named ``name`` from the doc's Python blocks (each block run on its own)."""
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S):
        scope: dict = {}
        exec(compile(block, str(DOC), "exec"), scope)  # noqa: S102 - the doc's own example code
        if name in scope:
            return scope[name]
    raise AssertionError(f"{DOC}: no recipe defines {name}")


def test_logit_exchanging_recipe_distils_on_targets(tmp_path, monkeypatch):
    cls = _recipe("MeanTeacher")
    monkeypatch.setitem(ALGORITHMS, cls.name, cls)
    tr = make_trainer(tmp_path, cls.name, {"proxy_size": 24}, rounds=3)
    assert tr.run.proxy_size == 24
    seen = []
    real = tr.algo.local_loss

    def spy(state, batch):
        seen.append(batch.proxy_logits is not None)
        return real(state, batch)

    tr.algo.local_loss = spy
    for rnd in range(3):
        record = tr.run_round(rnd)
    assert not any(seen[:len(seen) // 3]) and all(seen[-5:])  # proxy batches once targets arrived
    for c in tr.clients:
        assert c.state["targets"].shape == (24, tr.setup.num_classes)
        assert tr.algo.targets_round(c.state) == 2
    assert record["bytes_up"] == 24 * tr.setup.num_classes * 4 and record["acc_per_exit"][-1] > 0.3


def test_parameter_sharing_recipe_averages_the_heads(tmp_path, monkeypatch):
    cls = _recipe("SharedHeads")
    monkeypatch.setitem(ALGORITHMS, cls.name, cls)
    tr = make_trainer(tmp_path, cls.name, rounds=2)
    assert tr.shared.keys and all(k.startswith("heads.") for k in tr.shared.keys)
    for rnd in range(2):
        tr.run_round(rnd)
    heads = [{k: p for k, p in c.model.named_parameters() if k.startswith("heads.")} for c in tr.clients]
    bodies = [{k: p for k, p in c.model.named_parameters() if k.startswith("blocks.")} for c in tr.clients]
    assert all(torch.equal(heads[0][k], h[k]) for h in heads[1:] for k in h)
    assert not all(torch.equal(bodies[0][k], b[k]) for b in bodies[1:] for k in b)


@pytest.mark.parametrize("name", ["MeanTeacher", "SharedHeads"])
def test_recipes_declare_only_the_base_contract(name):
    cls = _recipe(name)
    declared = set(dir(Algorithm))
    own = {k for k in vars(cls) if not k.startswith("_")} - {"name", "Params"}
    assert own <= declared | {"proxy_exits", "keep_targets"}, own - declared
