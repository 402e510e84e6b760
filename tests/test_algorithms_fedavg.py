"""FedAvg-EE / FedProx-EE on the real loop: averaging makes every client identical."""

import torch
from algo_harness import make_trainer, params_of

from cafedist.train.schedule import participating


def test_fedavg_clients_share_one_model_after_a_round(tmp_path):
    tr = make_trainer(tmp_path, "fedavg")
    before = params_of(tr.clients[0].model)
    assert all(params_of(c.model).keys() == before.keys() for c in tr.clients)
    tr.run_round(0)
    first = params_of(tr.clients[0].model)
    for c in tr.clients[1:]:
        for k, v in params_of(c.model).items():
            assert (v - first[k]).abs().max() < 1e-6, k
    assert any((first[k] - before[k]).abs().max() > 0 for k in first)


def test_fedprox_pulls_toward_the_round_start(tmp_path):
    far = make_trainer(tmp_path / "a", "fedprox", {"mu": 0.0})
    near = make_trainer(tmp_path / "b", "fedprox", {"mu": 10.0})
    start = params_of(far.clients[0].model)
    far.run_round(0)
    near.run_round(0)
    def drift(tr) -> float:
        return sum(float((v - start[k]).pow(2).sum()) for k, v in params_of(tr.clients[0].model).items())
    assert drift(near) < drift(far)


def test_fedavg_average_is_the_sample_weighted_mean_of_the_clients_that_trained(tmp_path):
    """With half the clients training, every client receives sum_i w_i theta_i / sum_i w_i over
    the clients that trained (the weights renormalised over them, not over everyone)."""
    tr = make_trainer(tmp_path, "fedavg", clients_per_round=0.5)
    active = participating(tr.cfg.seed, 0, tr.run.n, 0.5)
    assert 0 < int(active.sum()) < tr.run.n
    tr.local_updates(0, active)
    trained = {c.cid: params_of(c.model) for c in tr.clients if active[c.cid]}
    tr._aggregate(0, active, {"t_comm": 0.0})
    w = tr.setup.data_weights
    assert len(set(w.tolist())) > 1  # unequal clients: a plain mean would differ
    for k in trained[next(iter(trained))]:
        want = sum(float(w[cid]) * p[k].double() for cid, p in trained.items()) / float(w[active].sum())
        for c in tr.clients:
            assert torch.allclose(params_of(c.model)[k].double(), want, atol=1e-6), (c.cid, k)
