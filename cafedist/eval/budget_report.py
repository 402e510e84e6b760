"""Checking exit policies on test and reporting them: per-client rows, the overall numbers,
the global threshold curve read at the same mean MACs, and each client's curve for the figure.
Nothing here chooses anything: the choices come from :mod:`cafedist.eval.budget_search`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from cafedist.eval.budget_search import Choice, Split, macs_tensor
from cafedist.eval.budget_spec import Budget
from cafedist.eval.dynamic import dynamic_counts, dynamic_table


@dataclass(frozen=True)
class TestCounts:
    """One policy on one client's split: samples answered right, summed MACs, samples, and
    samples its last exit answers right."""

    __test__ = False  # not a pytest test class despite its name

    correct: int
    macs: float
    n: int
    last_correct: int


def apply_choice(choice: Choice, split: Split, macs_per_exit: Sequence[int]) -> TestCounts:
    """``choice`` run on ``split``."""
    idx = choice.exits(split)
    hit = split.hits()
    return TestCounts(correct=int(hit.gather(0, idx.unsqueeze(0)).sum()),
                      macs=float(macs_tensor(macs_per_exit)[idx].sum()), n=split.n, last_correct=int(hit[-1].sum()))


def within_budget(budget: Budget, accuracy: float, last_accuracy: float, mean_macs: float,
                  last_macs: float) -> bool:
    """Whether measured accuracy/MACs honour ``budget``."""
    return bool(budget.holds(mean_macs, last_accuracy - accuracy, last_macs))


def client_row(cid: int, budget: Budget, choice: Choice, n_cal: int, test: TestCounts,
               macs_per_exit: Sequence[int]) -> dict[str, Any]:
    """One JSON-ready row of the per-client budget table (its keys: :data:`ROW_KEYS`)."""
    last_macs = float(macs_per_exit[-1])
    n = test.n
    acc = test.correct / n if n else None
    last_acc = test.last_correct / n if n else None
    mean_macs = test.macs / n if n else None
    return {
        "client": cid,
        "budget": budget.spec,
        "policy": choice.policy,
        "temperatures": list(choice.temperatures) if choice.temperatures is not None else None,
        "threshold": choice.threshold,
        "static_exit": None if choice.static_exit is None else choice.static_exit + 1,  # 1-based like "exit k"
        "n_calibration": n_cal,
        "calibration_accuracy": choice.calibration_accuracy,
        "calibration_macs_fraction": None if choice.calibration_macs is None else choice.calibration_macs / last_macs,
        "n_test": n,
        "test_accuracy": acc,
        "test_mean_macs": mean_macs,
        "test_macs_fraction": None if mean_macs is None else mean_macs / last_macs,
        "last_exit_test_accuracy": last_acc,
        "within_budget": None if n == 0 else within_budget(budget, acc, last_acc, mean_macs, last_macs),
        "fallback": choice.fallback,
    }


#: the keys of a :func:`client_row`, in order (the columns of budget.csv)
ROW_KEYS: tuple[str, ...] = tuple(client_row(0, Budget("macs", 1.0), Choice("static", None), 0,
                                             TestCounts(0, 0.0, 0, 0), [1]))


def accuracy_at_macs(table: list[dict], mean_macs: float) -> dict[str, Any]:
    """The global-threshold curve (``dynamic_table`` rows) read at ``mean_macs``: linear
    interpolation between the two neighbouring thresholds (reachable by mixing them), clamped
    to the curve's ends. Rows with equal MACs keep the more accurate one."""
    points: dict[float, dict] = {}
    for row in table:
        kept = points.get(row["mean_macs"])
        if kept is None or row["accuracy"] > kept["accuracy"]:
            points[row["mean_macs"]] = row
    xs = sorted(points)
    if mean_macs <= xs[0] or mean_macs >= xs[-1]:
        row = points[xs[0] if mean_macs <= xs[0] else xs[-1]]
        return {"accuracy": row["accuracy"], "mean_macs": row["mean_macs"], "thresholds": [row["threshold"]]}
    hi = next(i for i, x in enumerate(xs) if x >= mean_macs)
    lo_row, hi_row = points[xs[hi - 1]], points[xs[hi]]
    w = (mean_macs - lo_row["mean_macs"]) / (hi_row["mean_macs"] - lo_row["mean_macs"])
    return {"accuracy": (1 - w) * lo_row["accuracy"] + w * hi_row["accuracy"], "mean_macs": mean_macs,
            "thresholds": [lo_row["threshold"], hi_row["threshold"]]}


def overall_result(rows: list[dict], tests: list[TestCounts], macs_per_exit: Sequence[int]) -> dict[str, Any]:
    """Overall numbers of one policy per client: pooled test accuracy and MACs (like
    ``acc_per_exit``), the client mean, the share of clients within budget, the fallbacks."""
    n = sum(t.n for t in tests)
    if n == 0:
        raise ValueError("no client has test samples: the budget report is undefined")
    mean_macs = sum(t.macs for t in tests) / n
    judged = [r["within_budget"] for r in rows if r["within_budget"] is not None]
    accs = [r["test_accuracy"] for r in rows if r["test_accuracy"] is not None]
    return {
        "accuracy": sum(t.correct for t in tests) / n,
        "client_mean_accuracy": sum(accs) / len(accs),
        "mean_macs": mean_macs,
        "macs_fraction": mean_macs / float(macs_per_exit[-1]),
        "last_exit_accuracy": sum(t.last_correct for t in tests) / n,
        "clients_within_budget": sum(judged),
        "share_within_budget": sum(judged) / len(judged) if judged else None,
        "fallback_clients": [r["client"] for r in rows if r["fallback"]],
    }


def summarize(rows: list[dict], tests: list[TestCounts], macs_per_exit: Sequence[int],
              global_table: list[dict]) -> dict[str, Any]:
    """:func:`overall_result` and the global threshold curve read at the same mean MACs."""
    result = overall_result(rows, tests, macs_per_exit)
    return {**result, "global_at_same_macs": accuracy_at_macs(global_table, result["mean_macs"])}


def client_curve(choice: Choice, split: Split, macs_per_exit: Sequence[int]) -> list[dict]:
    """The chosen policy's accuracy-vs-MACs curve on ``split`` over the threshold grid (for
    the figure only; nothing is chosen from it). A static fallback has no curve."""
    if choice.static_exit is not None or split.n == 0:
        return []
    pred = split.logits.argmax(dim=-1).cpu()
    counts = dynamic_counts(pred, choice.scores(split), split.y.cpu(), macs_per_exit)
    return dynamic_table(counts, macs_per_exit)


__all__ = ["ROW_KEYS", "TestCounts", "accuracy_at_macs", "apply_choice", "client_curve", "client_row",
           "overall_result", "summarize", "within_budget"]
