"""The final evaluation (cafedist.eval.clients): summary.json's per-exit accuracies pool every
client's samples (weighted by the client's size, as README.md says), and the dynamic sweep's
ends are the static first and last exits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import cafedist_in_process as in_process
from conftest import summary
from torch import nn

from cafedist.config import load_config
from cafedist.data import Store
from cafedist.data.store import ClientData
from cafedist.eval.clients import _val_row, pool_val


class _TwoExits(nn.Module):
    """Both exits answer the class whose one-hot input they are given."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x, 2 * x]


def test_validation_accuracy_is_counted_on_the_validation_split_and_pooled_by_samples():
    eye = torch.eye(3)
    data = ClientData(x_train=eye, y_train=torch.arange(3), x_test=eye, y_test=torch.tensor([1, 2, 0]),
                      x_val=eye[:2], y_val=torch.tensor([0, 1]))  # right on validation, wrong on test
    algo = SimpleNamespace(eval_model=lambda view: _TwoExits())
    assert _val_row(algo, SimpleNamespace(view=None, data=data), 2).tolist() == [2.0, 2.0, 2.0]
    # rows (n_val, correct per exit) of three clients; the last has no validation samples
    pooled, per_client = pool_val(torch.tensor([[2.0, 2.0, 1.0], [8.0, 4.0, 8.0], [0.0, 0.0, 0.0]],
                                               dtype=torch.float64))
    assert pooled == pytest.approx([0.6, 0.9]) and per_client == [[1.0, 0.5], [0.5, 1.0], None]


def test_summary_pools_the_clients_by_their_samples_and_the_sweep_ends_at_the_static_exits(tiny_config, tmp_path):
    out = tmp_path / "run"
    in_process("train", "--config", str(tiny_config(rounds=1)), "--out", str(out), "--no-progress",
               "data.val_fraction=0.2", check=True)
    s = summary(out)
    cfg = load_config(out / "config.yaml")
    with Store(cfg.data.store_path(cfg.seed)) as store:
        sizes = {"acc": [n_test for _, n_test in store.client_sizes()], "val_acc": store.val_sizes()}
    for key, n in sizes.items():
        assert len(set(n)) > 1  # clients of different sizes: weighted and plain means differ
        per_client = s[f"{key}_per_client"]
        weighted = [sum(acc[k] * w for acc, w in zip(per_client, n)) / sum(n) for k in range(3)]
        assert s[f"{key}_per_exit"] == pytest.approx(weighted, abs=1e-12), key
    macs, acc = s["macs_per_exit"], s["acc_per_exit"]
    first = s["dynamic"][0]  # θ = 0: every sample answered by exit 1
    assert (first["threshold"], first["mean_macs"], first["exit_fractions"]) == (0.0, macs[0], [1.0, 0.0, 0.0])
    assert first["accuracy"] == pytest.approx(acc[0], abs=1e-12)
    last = next(row for row in s["dynamic"] if row["threshold"] == 1.0)  # no early exit
    assert (last["mean_macs"], last["exit_fractions"], last["macs_reduction"]) == (macs[-1], [0.0, 0.0, 1.0], 0.0)
    assert last["accuracy"] == pytest.approx(acc[-1], abs=1e-12)
