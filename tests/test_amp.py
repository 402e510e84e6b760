"""Mixed precision (``train.amp``): fp16's loss scale is client state like momentum."""

from __future__ import annotations

import torch
from algo_harness import load, make_trainer, params_of, save


def scales(tr) -> dict[int, float]:
    return {c.cid: c.scalers["main"].get_scale() for c in tr.clients}


def first_step_scales(monkeypatch) -> dict[int, float]:
    """The loss scale each client's first step starts with, by client id, from now on
    (clients are told apart by which client's phase the step belongs to)."""
    import cafedist.train.local as local

    firsts: dict[int, float] = {}
    run_phase = local.run_phase

    def recording(client, *args, **kwargs):
        if client.cid not in firsts:
            scale = torch.amp.GradScaler.scale

            def first(self: torch.amp.GradScaler, loss: torch.Tensor) -> torch.Tensor:
                firsts.setdefault(client.cid, self.get_scale())
                return scale(self, loss)

            with monkeypatch.context() as inner:
                inner.setattr(torch.amp.GradScaler, "scale", first)
                return run_phase(client, *args, **kwargs)
        return run_phase(client, *args, **kwargs)

    monkeypatch.setattr(local, "run_phase", recording)
    return firsts


def test_fp16_loss_scale_carries_over_rounds_and_survives_a_resume(tmp_path, monkeypatch):
    tr = make_trainer(tmp_path, "fedavg", amp="fp16")
    tr.run_round(0)
    tr.run_round(1)
    before = scales(tr)
    assert min(before.values()) < 65536  # some scale moved: else a fresh scaler would start alike
    with monkeypatch.context() as patch:
        starts = first_step_scales(patch)
        tr.run_round(2)
    # every client's first step of the round uses the scale its last round ended with (a fresh
    # scaler per phase would start again at 65536)
    assert starts == before

    save(tr, 2)
    resumed = make_trainer(tmp_path, "fedavg", amp="fp16")
    assert load(resumed) == 3
    assert scales(resumed) == scales(tr)
    tr.run_round(3)
    resumed.run_round(3)
    for a, b in zip(tr.clients, resumed.clients):
        assert all(torch.equal(p, params_of(b.model)[k]) for k, p in params_of(a.model).items())

