"""Tests for cafedist.eval.exits: per-exit predictions, correct counts, per-client tables."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cafedist.eval import exit_predictions, per_exit_correct


class TinyExitNet(nn.Module):
    """Stand-in for EarlyExitNet: m linear blocks, a linear head after each."""

    def __init__(self, m: int = 3, d: int = 5, c: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(m))
        self.heads = nn.ModuleList(nn.Linear(d, c) for _ in range(m))
        self.dropout = nn.Dropout(0.5)
        self.modes_seen: list[bool] = []

    def forward(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        self.modes_seen.append(self.training)
        out = []
        h = self.dropout(x)  # makes train-mode outputs differ from eval-mode ones
        for block, head in list(zip(self.blocks, self.heads))[:upto]:
            h = block(h)
            out.append(head(h))
        return out


def test_exit_predictions_match_direct_softmax_across_chunks():
    model = TinyExitNet(m=3)
    x = torch.randn(7, 5)
    pred, conf = exit_predictions(model, x, batch_size=3)  # 3 chunks, last one partial
    model.eval()
    with torch.no_grad():
        probs = torch.stack([z.softmax(-1) for z in model(x)])
    assert pred.shape == conf.shape == (3, 7)
    assert pred.dtype == torch.int64 and conf.dtype == torch.float32
    torch.testing.assert_close(conf, probs.max(-1).values)
    assert torch.equal(pred, probs.argmax(-1))
    assert bool(((conf > 0.25 - 1e-6) & (conf <= 1.0)).all())  # max of 4 probabilities


@pytest.mark.parametrize("training", [True, False])
def test_exit_predictions_uses_eval_mode_and_restores_previous_mode(training):
    model = TinyExitNet()
    model.train(training)
    exit_predictions(model, torch.randn(4, 5))
    assert model.modes_seen == [False]
    assert model.training is training
    assert all(mod.training is training for mod in model.modules())


def test_exit_predictions_restores_mode_on_error():
    model = TinyExitNet()
    model.train()
    with pytest.raises(RuntimeError):
        exit_predictions(model, torch.randn(4, 6))  # wrong feature size
    assert model.training


def test_exit_predictions_empty_input_and_bad_batch_size():
    model = TinyExitNet(m=2)
    pred, conf = exit_predictions(model, torch.randn(0, 5))
    assert pred.shape == conf.shape == (2, 0)
    with pytest.raises(ValueError, match="batch_size"):
        exit_predictions(model, torch.randn(3, 5), batch_size=0)


def test_exit_predictions_rejects_non_list_output():
    with pytest.raises(TypeError, match="list of per-exit logits"):
        exit_predictions(nn.Linear(5, 3), torch.randn(2, 5))


def test_per_exit_correct_counts():
    pred = torch.tensor([[0, 1, 2, 3], [0, 1, 1, 1], [3, 3, 3, 3]])
    y = torch.tensor([0, 1, 2, 3])
    assert per_exit_correct(pred, y).tolist() == [4, 2, 1]
    assert per_exit_correct(pred, y).dtype == torch.int64
    with pytest.raises(ValueError):
        per_exit_correct(pred, y[:3])


