"""Tests for cafedist.eval.dynamic: threshold early exit as summable counts, table, MAC reduction."""

from __future__ import annotations

import pytest
import torch

from cafedist.eval import (
    THRESHOLDS,
    dynamic_counts,
    dynamic_table,
    exit_indices,
    mac_reduction_at_loss,
    per_exit_correct,
)

MACS = [10, 25, 60]

# 3 exits x 5 samples. Sample i's confidences per exit are in column i.
CONF = torch.tensor([
    [0.90, 0.30, 0.55, 1.00, 0.10],
    [0.95, 0.70, 0.40, 1.00, 0.20],
    [0.99, 0.80, 0.99, 1.00, 0.30],
])
PRED = torch.tensor([
    [1, 0, 2, 3, 0],
    [1, 1, 2, 3, 0],
    [1, 1, 0, 3, 4],
])
Y = torch.tensor([1, 1, 0, 3, 4])


def test_thresholds_constant():
    assert len(THRESHOLDS) == 28 and THRESHOLDS[0] == 0.0 and THRESHOLDS[-1] == 1.0
    assert list(THRESHOLDS) == sorted(THRESHOLDS)
    assert THRESHOLDS[0] == 0.0 and THRESHOLDS[-1] == 1.0 and THRESHOLDS[12] == 0.6


def test_threshold_zero_everyone_exits_first():
    c = dynamic_counts(PRED, CONF, Y, MACS, thresholds=[0.0])
    assert c["exits"].tolist() == [[5, 0, 0]]
    assert c["correct"].tolist() == [per_exit_correct(PRED, Y)[0].item()] == [2]
    assert c["macs"].tolist() == [5 * 10.0]
    assert int(c["n"]) == 5
    assert c["correct"].dtype == c["exits"].dtype == c["n"].dtype == torch.int64
    assert c["macs"].dtype == torch.float64


def test_threshold_above_one_everyone_uses_last_exit():
    c = dynamic_counts(PRED, CONF, Y, MACS, thresholds=[1.5])
    assert c["exits"].tolist() == [[0, 0, 5]]
    assert c["correct"].tolist() == [5]
    assert c["macs"].tolist() == [5 * 60.0]


def test_threshold_one_means_last_exit_even_for_saturated_confidence():
    # Sample 3 has conf exactly 1.0 at every exit (float32 softmax saturates); θ = 1.0 is
    # defined as "no early exit", so it still uses the last exit.
    idx = exit_indices(CONF, thresholds=[0.999, 1.0])
    assert idx[0, 3].item() == 0  # just below 1: the saturated exit 0 answers
    assert idx[1].tolist() == [2] * 5


def test_intermediate_threshold_known_answer():
    # θ = 0.6: s0 exit0, s1 exit1 (0.70), s2 exit2 (0.99), s3 exit0, s4 falls to last.
    c = dynamic_counts(PRED, CONF, Y, MACS, thresholds=[0.6])
    assert exit_indices(CONF, [0.6]).tolist() == [[0, 1, 2, 0, 2]]
    assert c["exits"].tolist() == [[2, 1, 2]]
    assert c["correct"].tolist() == [5]  # every chosen exit happens to be right
    assert c["macs"].tolist() == [10 + 25 + 60 + 10 + 60.0]


def test_nan_confidence_falls_through_to_last_exit():
    conf = CONF.clone()
    conf[:2, 0] = float("nan")
    assert exit_indices(conf, [0.0])[0, 0].item() == 2


def _reference_exits(conf: torch.Tensor, thresholds) -> list[list[int]]:
    """Plain-Python statement of the rule, to check the vectorised one against."""
    m, n = conf.shape
    out = []
    for th in thresholds:
        row = []
        for i in range(n):
            k = next((k for k in range(m - 1) if th < 1.0 and conf[k, i] >= th), m - 1)
            row.append(k)
        out.append(row)
    return out


def test_vectorised_rule_matches_reference_on_random_data():
    g = torch.Generator().manual_seed(1)
    conf = torch.rand(4, 50, generator=g)
    conf[:, :5] = 1.0
    assert exit_indices(conf).tolist() == _reference_exits(conf, THRESHOLDS)


def test_counts_of_two_halves_sum_to_counts_of_whole():
    g = torch.Generator().manual_seed(2)
    m, n, c = 4, 40, 5
    pred = torch.randint(0, c, (m, n), generator=g)
    conf = torch.rand(m, n, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    macs = [3, 7, 12, 20]
    whole = dynamic_counts(pred, conf, y, macs)
    halves = [dynamic_counts(pred[:, s], conf[:, s], y[s], macs) for s in (slice(0, 17), slice(17, n))]
    summed = {key: halves[0][key] + halves[1][key] for key in halves[0]}
    assert summed.keys() == whole.keys()
    for key in whole:
        assert torch.equal(summed[key], whole[key]), key
    assert whole["exits"].sum(dim=1).tolist() == [n] * len(THRESHOLDS)


def test_dynamic_table_rows():
    thresholds = [0.0, 0.6, 1.0]
    table = dynamic_table(dynamic_counts(PRED, CONF, Y, MACS, thresholds), MACS, thresholds)
    assert [r["threshold"] for r in table] == thresholds
    first, mid, last = table
    assert first["accuracy"] == pytest.approx(2 / 5)
    assert first["mean_macs"] == pytest.approx(10.0)
    assert first["macs_reduction"] == pytest.approx(1 - 10 / 60)
    assert first["exit_fractions"] == [1.0, 0.0, 0.0]
    assert mid["accuracy"] == 1.0
    assert mid["mean_macs"] == pytest.approx(165 / 5)
    assert mid["exit_fractions"] == pytest.approx([0.4, 0.2, 0.4])
    # θ = 1.0 is the static last exit.
    assert last["accuracy"] == per_exit_correct(PRED, Y)[-1].item() / 5
    assert last["macs_reduction"] == 0.0
    assert last["last_exit_macs"] == 60.0


def test_dynamic_table_rejects_mismatch_and_empty():
    counts = dynamic_counts(PRED, CONF, Y, MACS, [0.0, 0.5])
    with pytest.raises(ValueError):
        dynamic_table(counts, MACS)  # 21 thresholds asked, counts for 2
    with pytest.raises(ValueError):
        dynamic_table(counts, MACS[:2], [0.0, 0.5])
    with pytest.raises(ValueError, match="zero samples"):
        dynamic_table(dynamic_counts(PRED[:, :0], CONF[:, :0], Y[:0], MACS), MACS)
    with pytest.raises(ValueError, match="macs_per_exit"):
        dynamic_counts(PRED, CONF, Y, [1, 2])


def _row(threshold, accuracy, mean_macs, last=100.0):
    return {"threshold": threshold, "accuracy": accuracy, "mean_macs": mean_macs,
            "macs_reduction": 1 - mean_macs / last, "exit_fractions": [], "last_exit_macs": last}


TABLE = [
    _row(0.0, 0.70, 20.0),
    _row(0.5, 0.982, 50.0),  # cheapest row within 1 pt of the last exit
    _row(0.6, 0.98, 60.0),
    _row(0.7, 0.985, 60.0),  # same MACs, better accuracy: wins the tie
    _row(1.0, 0.99, 100.0),
]


def test_mac_reduction_picks_cheapest_row_within_loss():
    best = mac_reduction_at_loss(TABLE, last_exit_accuracy=0.99, max_loss=0.01)
    assert best["threshold"] == 0.5
    assert best["mean_macs"] == 50.0
    assert best["macs_reduction"] == pytest.approx(0.5)
    assert best["accuracy_loss"] == pytest.approx(0.99 - 0.982)
    assert best["fallback"] is False


def test_mac_reduction_boundary_and_tie_break():
    # Exactly 1 pt below must count as within the budget despite float rounding.
    best = mac_reduction_at_loss([TABLE[2], TABLE[4]], last_exit_accuracy=0.99, max_loss=0.01)
    assert best["threshold"] == 0.6
    best = mac_reduction_at_loss([_row(0.6, 0.7, 60.0), _row(1.0, 0.8, 100.0)], 0.8, max_loss=0.1)
    assert best["threshold"] == 0.6  # 0.8 - 0.1 = 0.7000000000000001 in floats
    best = mac_reduction_at_loss(TABLE[2:], last_exit_accuracy=0.99, max_loss=0.01)
    assert best["threshold"] == 0.7  # ties on MACs with θ = 0.6, higher accuracy wins
    best = mac_reduction_at_loss(TABLE, last_exit_accuracy=0.99, max_loss=0.0)
    assert best["threshold"] == 1.0 and best["macs_reduction"] == 0.0
    assert best["fallback"] is False  # the θ = 1.0 row itself qualifies


def test_mac_reduction_falls_back_to_last_exit():
    best = mac_reduction_at_loss(TABLE[:3], last_exit_accuracy=0.995, max_loss=0.01)
    assert best == {"threshold": 1.0, "accuracy": 0.995, "mean_macs": 100.0,
                    "macs_reduction": 0.0, "accuracy_loss": 0.0, "fallback": True}
    with pytest.raises(ValueError):
        mac_reduction_at_loss([], 0.9)
    with pytest.raises(ValueError):
        mac_reduction_at_loss(TABLE, 0.9, max_loss=-0.1)


def test_end_to_end_table_then_reduction():
    thresholds = list(THRESHOLDS)
    table = dynamic_table(dynamic_counts(PRED, CONF, Y, MACS, thresholds), MACS, thresholds)
    last_acc = table[-1]["accuracy"]
    best = mac_reduction_at_loss(table, last_acc, max_loss=0.0)
    # Lossless and cheapest: every row with accuracy 1.0 qualifies; θ = 0.6 is the
    # smallest threshold that reaches it (lower ones let sample 2 leave at a wrong exit).
    assert best["accuracy"] == 1.0 and best["threshold"] == 0.6
    assert best["mean_macs"] == min(r["mean_macs"] for r in table if r["accuracy"] == 1.0)
    assert 0 < best["macs_reduction"] < 1
