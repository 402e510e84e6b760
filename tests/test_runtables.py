"""compare's per-run tables read from run directories: their numbers, and damaged files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from cafedist import runtables


def test_a_metrics_line_with_bytes_that_are_no_utf8_is_passed_over_as_a_torn_one(tmp_path):
    """Damage in one run's metrics.jsonl ended compare in a traceback (UnicodeDecodeError)
    after every training, at each rerun, writing no report."""
    rows = [json.dumps({"round": r, "acc_per_exit": [0.1 * r, 0.2 * r]}).encode() + b"\n" for r in range(3)]
    (tmp_path / "metrics.jsonl").write_bytes(rows[0] + b"\xff\xfe damaged\n" + rows[1] + rows[2])
    assert [r["round"] for r in runtables.read_curve(tmp_path)] == [0, 1, 2]


def test_read_rounds_one_record_per_round_the_later_line_winning(tmp_path):
    """Shared by compare's curves, eval's conflict.png and the experiments' tables: a resumed
    run's redone round counts once (its later line), lines that are no record with an integer
    round are passed over, ``before`` keeps the rounds before it, and no file is no rounds."""
    from cafedist.run.metrics import read_rounds

    assert read_rounds(tmp_path) == []
    lines = [{"round": 0, "v": "a"}, {"round": 1, "v": "old"}, [1, 2], {"round": "2"}, {"round": 1.0},
             {"round": 1, "v": "redone"}, {"round": 2, "v": "b"}, {"round": 3, "v": "killed force"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"round": 4, "v')
    assert [r["v"] for r in read_rounds(tmp_path)] == ["a", "redone", "b", "killed force"]
    assert [r["v"] for r in read_rounds(tmp_path, before=3)] == ["a", "redone", "b"]


def test_a_runs_own_rows_end_at_its_summary_or_at_a_newer_checkpoint(tmp_path):
    """Which results are the run's as it stands (run.metrics.run_standing, shared by compare,
    the experiments' tables and scaling-report): a finished run's rows end at its summary's
    rounds (rows past them: a --resume force attempt killed before its first checkpoint);
    once such an extension has checkpointed past them, the summary describes models the run
    has gone past (no summary: it is unfinished) and its rows end at that checkpoint."""
    from cafedist.run.metrics import run_standing

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in range(7)))
    assert (run_standing(tmp_path).summary, run_standing(tmp_path).rounds) == (None, None)
    (tmp_path / "checkpoints" / "round_000001").mkdir(parents=True)
    assert run_standing(tmp_path).rounds == 2  # unfinished: up to its newest checkpoint
    (tmp_path / "summary.json").write_text(json.dumps({"rounds": 2, "acc_per_exit": [0.5]}))
    finished = run_standing(tmp_path)
    assert finished.summary == {"rounds": 2, "acc_per_exit": [0.5]} and finished.rounds == 2
    assert [r["round"] for r in finished.rows()] == [0, 1]
    (tmp_path / "checkpoints" / "round_000004").mkdir()  # the extension's checkpoint of round 4
    extended = run_standing(tmp_path)
    assert extended.summary is None and [r["round"] for r in extended.rows()] == [0, 1, 2, 3, 4]
    (tmp_path / "checkpoints" / "round_000004" / "SHARDS_ONLY").touch()  # pruned: no checkpoint to resume
    assert run_standing(tmp_path).rounds == 2


def _outcome(run_dir: Path, seed: int, summary: dict, curve: list[list[float]]) -> SimpleNamespace:
    """A finished run of row ``fedavg`` (compare's RunOutcome, duck-typed) whose test accuracy
    per exit in round r is ``curve[r]``."""
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "acc_per_exit": acc}) + "\n"
                                                   for r, acc in enumerate(curve)))
    run = SimpleNamespace(variant=SimpleNamespace(name="fedavg"), setting=SimpleNamespace(label=""), seed=seed,
                          run_dir=run_dir, row="fedavg", finished_summary=lambda: summary)
    return SimpleNamespace(run=run, status="done")


def test_runs_csv_puts_each_number_under_its_column_and_curves_average_the_seeds(tmp_path):
    summary = {"rounds": 2, "acc_per_exit": [0.5, 0.6], "bytes_per_client_per_round": 4096, "wall_seconds": 12.5,
               "dynamic": [{"threshold": 0.6, "accuracy": 0.55, "mean_macs": 1234.5, "macs_reduction": 0.3}]}
    outcomes = [_outcome(tmp_path / "seed0", 0, summary, [[0.1, 0.2], [0.3, 0.4]]),
                _outcome(tmp_path / "seed1", 1, summary, [[0.3, 0.4], [0.5, 0.8]])]
    section = {"accuracy": 0.7, "macs_fraction": 0.5, "share_within_budget": 1.0,
               "global_at_same_macs": {"accuracy": 0.6}}
    budgets = {str(tmp_path / "seed0"): {"macs=0.5": section,
                                         "macs=0.8": {**section, "accuracy": 0.75, "macs_fraction": 0.8}}}
    row = next(csv.DictReader(io.StringIO(runtables.runs_csv(outcomes, tmp_path, budgets))))
    assert (row["dynamic_accuracy_0.6"], row["dynamic_mean_macs_0.6"]) == ("0.55", "1234.5")
    assert (row["bytes_per_client_per_round"], row["wall_seconds"]) == ("4096", "12.5")
    assert (row["budget_accuracy@macs=0.5"], row["budget_macs_fraction@macs=0.5"]) == ("0.7", "0.5")
    assert (row["budget_accuracy@macs=0.8"], row["budget_macs_fraction@macs=0.8"]) == ("0.75", "0.8")
    assert (row["budget_global_accuracy@macs=0.8"], row["run_dir"]) == ("0.6", "seed0")
    # a row's curve per exit: the mean over its seeds, round by round (numbered by rounds completed)
    assert runtables.mean_curves(outcomes)["fedavg"][1] == [(1, pytest.approx(0.3)), (2, pytest.approx(0.6))]


def test_a_finished_runs_curve_ends_at_its_summary_not_at_a_killed_extension(tmp_path):
    """`train --resume force train.rounds=30` on a finished 2-round run, SIGKILLed before its
    first checkpoint, leaves rows of rounds 2.. (another config's) after the run's own, until
    the next train of the run drops them: compare reused the run (its summary.json still
    matches) and drew its curve on to round 5 with the extension's accuracies."""
    summary = {"rounds": 2, "acc_per_exit": [0.3, 0.4]}
    killed = [[0.9, 0.9]] * 4  # rounds 2..5 of the killed attempt
    outcomes = [_outcome(tmp_path / "seed0", 0, summary, [[0.1, 0.2], [0.3, 0.4], *killed]),
                _outcome(tmp_path / "seed1", 1, summary, [[0.1, 0.2], [0.3, 0.4]])]
    rows = list(csv.DictReader(io.StringIO(runtables.curves_csv(outcomes))))
    assert [(r["seed"], r["round"]) for r in rows if r["exit"] == "2"] == [("0", "0"), ("0", "1"), ("1", "0"),
                                                                           ("1", "1")]
    del outcomes[1]  # one seed: its rows alone make the mean curve
    assert runtables.mean_curves(outcomes)["fedavg"][1] == [(1, pytest.approx(0.2)), (2, pytest.approx(0.4))]
