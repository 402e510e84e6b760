"""A round's record in metrics.jsonl: how the gathered per-client rows become its numbers."""

import math

import pytest
import torch

from cafedist.train.records import round_metrics

NAN = math.nan


def test_loss_is_weighted_by_training_samples_and_accuracy_pools_the_test_samples():
    """loss: over the clients that trained (NaN: did not), each weighted by its training set;
    accuracy per exit: correct over test samples of all clients pooled, not a mean of client
    accuracies (which would weigh a client of 10 test samples like one of 30)."""
    # loss, n_test, correct at exit 1 and 2 | n_val, val correct at exit 1 and 2
    stats = torch.tensor([[0.5, 10, 5, 8, 4, 1, 2],
                          [NAN, 20, 10, 10, 6, 3, 6],
                          [2.0, 30, 3, 30, 0, 0, 0]], dtype=torch.float64)
    record = round_metrics(stats, (100, 50, 300), num_exits=2)
    assert record["loss"] == pytest.approx((0.5 * 100 + 2.0 * 300) / 400)
    assert record["acc_per_exit"] == pytest.approx([18 / 60, 48 / 60])
    assert record["val_acc_per_exit"] == pytest.approx([4 / 10, 8 / 10])


def test_a_round_not_evaluated_or_without_training_has_no_numbers_it_did_not_measure():
    stats = torch.tensor([[NAN, 10, NAN, NAN], [NAN, 20, NAN, NAN]], dtype=torch.float64)
    assert round_metrics(stats, (100, 50), num_exits=2) == {"loss": None}
