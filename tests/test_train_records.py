"""A round's record in metrics.jsonl: how the gathered per-client rows become its numbers."""

import json
import math
import statistics

import pytest
import torch
from conftest import cafedist_in_process, metrics, summary

from cafedist.errors import TrainingDiverged
from cafedist.run.metrics import MetricsLog
from cafedist.train.records import diverged_clients, round_metrics

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


@pytest.mark.parametrize("bad", [NAN, math.inf, -math.inf])
def test_an_infinite_loss_is_a_divergence_as_nan_is_and_metrics_jsonl_stays_json(tmp_path, bad):
    """A client whose loss is +inf was named diverged, but its loss was still averaged into the
    round's (an infinite loss), and metrics.jsonl got `"loss": Infinity`, which is no JSON (jq
    and strict readers refuse the file). It counts as NaN does: out of the loss, in `diverged`."""
    stats = torch.tensor([[0.5, 10, 5, 8], [bad, 20, 10, 10]], dtype=torch.float64)
    assert diverged_clients(stats[:, 0], torch.tensor([True, True]), 0) == [1]
    record = {"round": 0, **round_metrics(stats, (100, 50), num_exits=2), "diverged": [1]}
    assert record["loss"] == 0.5
    # the writer too: any other number that is not finite is written as null, not NaN/Infinity
    log = MetricsLog(tmp_path, tensorboard=False)
    log.append({**record, "self_weight": bad, "conflict": {"cos": [[bad, 0.25]]}})

    def refuse(name: str) -> None:
        raise AssertionError(f"metrics.jsonl holds {name}, which is no JSON")

    line = (tmp_path / "metrics.jsonl").read_text()
    written = json.loads(line, parse_constant=refuse)
    assert written == {**record, "self_weight": None, "conflict": {"cos": [[None, 0.25]]}}


def test_a_metric_written_as_null_for_not_being_finite_is_said_once(tmp_path, caplog):
    """A number that is not finite went into metrics.jsonl as null without a word: a user saw
    gaps in a curve or table and no reason. One warning per metric names it, its value and the
    round (the first); later rounds' of the same metric are not repeated."""
    log = MetricsLog(tmp_path, tensorboard=False)
    with caplog.at_level("WARNING", logger="cafedist"):
        log.append({"round": 3, "loss": 0.5, "self_weight": NAN, "conflict": {"cos": [[0.25, math.inf]]}})
        log.append({"round": 4, "loss": 0.5, "self_weight": NAN, "acc_per_exit": [0.5, -math.inf]})
    said = [r.getMessage() for r in caplog.records]
    assert said == ["round 3: self_weight is nan, not a finite number: metrics.jsonl records it as null "
                    "(said once per metric)",
                    "round 3: conflict.cos[0][1] is inf, not a finite number: metrics.jsonl records it as null "
                    "(said once per metric)",
                    "round 4: acc_per_exit[1] is -inf, not a finite number: metrics.jsonl records it as null "
                    "(said once per metric)"]
    assert [r.levelname for r in caplog.records] == ["WARNING"] * 3


def test_divergence_of_a_partial_cohort_says_it_was_the_clients_trained_not_every_client():
    """With partial participation the run stops when the clients drawn for a round all have a
    non-finite loss; the message said "every client's loss", as if all of them had diverged,
    when (clients_per_round: 0.1) one client of ten had trained."""
    losses = torch.tensor([NAN, 1.0, NAN, NAN], dtype=torch.float64)  # client 2 trained: NaN; 1, 3 idle
    with pytest.raises(TrainingDiverged, match=r"^the loss of every client trained in round 4 \(1 of 4: client 2\) "
                                               r"is not finite: training diverged"):
        diverged_clients(losses, torch.tensor([False, False, True, False]), 4)
    every = torch.tensor([NAN, math.inf], dtype=torch.float64)
    with pytest.raises(TrainingDiverged, match=r"^every client's loss in round 0 is not finite: training diverged"):
        diverged_clients(every, torch.tensor([True, True]), 0)
    assert diverged_clients(losses, torch.tensor([False, True, True, False]), 4) == [2]


def test_summary_bytes_are_the_mean_over_the_rounds_not_the_last_rounds_draw(tiny_config, tmp_path):
    """DepthFL clients hold different depths and, under partial participation, a round's upload
    is averaged over the clients that trained then: the bytes vary by round, and the run's
    bytes per client per round (what `compare` tabulates) is their mean, not whichever cohort
    the last round drew."""
    run = tmp_path / "run"
    cafedist_in_process("train", "--config", str(tiny_config(rounds=6)), "--out", str(run), "--no-progress",
                        "algorithm.name=depthfl", "train.clients_per_round=0.5", check=True)
    per_round = [r["bytes_up"] + r["bytes_down"] for r in metrics(run)]
    assert len(set(per_round)) > 1  # else the test could not tell the mean from the last round
    s = summary(run)
    assert s["bytes_per_client_per_round"] == round(statistics.fmean(per_round))
    assert s["ratio_to_fedavg"] == s["bytes_per_client_per_round"] / s["fedavg_bytes_per_client_per_round"]
