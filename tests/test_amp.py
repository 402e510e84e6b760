"""Mixed precision (``train.amp``): fp16's loss scale is client state like momentum."""

from __future__ import annotations

import torch
from algo_harness import load, make_trainer, params_of, record_loss_scales, save


def scales(tr) -> dict[int, float]:
    return {c.cid: c.scalers["main"].get_scale() for c in tr.clients}


def test_fp16_loss_scale_carries_over_rounds_and_survives_a_resume(tmp_path, monkeypatch):
    tr = make_trainer(tmp_path, "fedavg", amp="fp16")
    tr.run_round(0)
    after_first = scales(tr)
    with monkeypatch.context() as patch:
        starts = record_loss_scales(patch)
        tr.run_round(1)
    # the second round's first step of every client uses the scale the first round ended
    # with (a fresh scaler per phase would start again at 65536)
    steps_per_client = len(starts) // len(tr.clients)
    assert [starts[i * steps_per_client] for i in range(len(tr.clients))] == list(after_first.values())
    tr.run_round(2)
    assert min(scales(tr).values()) < 65536  # the scale moved: else the checks below prove nothing

    save(tr, 2)
    resumed = make_trainer(tmp_path, "fedavg", amp="fp16")
    assert load(resumed) == 3
    assert scales(resumed) == scales(tr)
    tr.run_round(3)
    resumed.run_round(3)
    for a, b in zip(tr.clients, resumed.clients):
        assert all(torch.equal(p, params_of(b.model)[k]) for k, p in params_of(a.model).items())
