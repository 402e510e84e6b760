"""FedAvg-EE / FedProx-EE on the real loop: averaging makes every client identical."""

from algo_harness import make_trainer, params_of


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
