"""One local-training path: packed training honours every train option sequential training does.

Every field of ``TrainConfig`` is either an option of local training (then packed and
sequential training must agree with it set to a non-default value, and both must move away
from the default) or belongs to the round (listed below with the reason). A new train option
fails here until it is classified, and an option the packed path ignores fails the agreement.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cafedist.bench.synthetic import clone_cohort, make_cohort
from cafedist.config import TrainConfig
from cafedist.run.client import make_optimizer
from cafedist.train.local import local_update
from cafedist.train.packed import packed_local_update

#: option -> a non-default value that changes what local training computes
LOCAL_OPTIONS = {"local_epochs": 2, "batch_size": 7, "proxy_batch_size": 3, "lr": 0.2, "momentum": 0.0,
                 "weight_decay": 0.05, "amp": "bf16"}
#: options the round applies around local training, identically for both paths
ROUND_OPTIONS = {
    "rounds", "eval_every", "clients_per_round",  # which rounds and clients train, when to evaluate
    "packed",  # chooses the path itself
    "optimizer_state",  # reset before local training, whatever the path (tests/test_readings.py)
    "compile",  # compiles the models at build time
    "diagnostics",  # read-only measurements after local training
    "resident_clients", "client_state",  # where clients live between uses (tests/test_residency.py)
}


def test_every_train_option_is_classified():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields == set(LOCAL_OPTIONS) | ROUND_OPTIONS, fields ^ (set(LOCAL_OPTIONS) | ROUND_OPTIONS)


def _cohort(train: TrainConfig):
    cohort = make_cohort(3, [11, 6, 9], "kd", shape=(1, 12, 12), width=4, num_classes=5, proxy_size=12,
                         batch_size=train.batch_size, proxy_batch_size=train.proxy_batch_size, seed=3)
    cohort.train = train
    for c in cohort.clients:
        c.optimizers = {k: make_optimizer(m, train) for k, m in c.models.items()}
    return cohort


def _train(cohort, packed: bool) -> list[torch.Tensor]:
    for rnd in range(2):
        if packed:
            packed_local_update(cohort.clients, cohort.algo, cohort.train, rnd, 5, cohort.proxy_x, cohort.proxy_idx)
        else:
            for c in cohort.clients:
                local_update(c, cohort.algo, cohort.train, rnd, 5, cohort.proxy_x, cohort.proxy_idx)
    return [torch.cat([p.detach().reshape(-1) for p in c.model.parameters()]) for c in cohort.clients]


def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("option", sorted(LOCAL_OPTIONS))
def test_packed_honours_each_local_option(option):
    base = TrainConfig(batch_size=4, proxy_batch_size=4)
    changed = dataclasses.replace(base, **{option: LOCAL_OPTIONS[option]})
    default, packed_default = _train(_cohort(base), packed=False), _train(_cohort(base), packed=True)
    seq_cohort = _cohort(changed)
    pack_cohort = clone_cohort(seq_cohort)
    pack_cohort.train = changed
    sequential, packed = _train(seq_cohort, packed=False), _train(pack_cohort, packed=True)
    effect = _distance(sequential, default)
    assert effect > 1e-3, f"{option} did not change sequential training"
    assert _distance(packed, packed_default) > 0.5 * effect, f"packed training ignores {option}"
    # and lands next to sequential training (bf16: both runs carry bf16 rounding of their own)
    assert _distance(packed, sequential) < (5e-2 if option == "amp" else 0.1 * effect), option


def test_stacked_sgd_step_is_torch_sgd_bit_for_bit():
    """The packed step is torch's own SGD on stacked tensors: equal bits to separate optimizers."""
    from cafedist.train.packed import _Stack

    g = torch.Generator().manual_seed(0)
    models = [torch.nn.Linear(4, 3) for _ in range(3)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01) for m in models]
    stack = _Stack.of(models, opts)
    for step in range(3):
        grads = {n: torch.randn(3, *p.shape, generator=g) for n, p in models[0].named_parameters()}
        members = None if step != 1 else torch.tensor([0, 2])
        who = range(3) if members is None else members.tolist()
        for i in who:
            for n, p in models[i].named_parameters():
                p.grad = grads[n][i].clone()
            opts[i].step()
        stack.step(members, {n: gr if members is None else gr[members] for n, gr in grads.items()})
    for i, m in enumerate(models):
        for n, p in m.named_parameters():
            assert torch.equal(stack.params[n][i], p.detach()), (i, n)
