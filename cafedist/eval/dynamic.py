"""Dynamic (early-exit) inference: sweep a confidence threshold, count accuracy and MACs.

Rule: a sample leaves at the first exit whose max softmax probability ``conf >= θ``; the last
exit always answers. One deliberate refinement: **θ >= 1 means "no early exit"**. A float32
softmax saturates to exactly 1.0 once the logit margin exceeds ~17, so the literal rule would
still let confident samples leave early at θ = 1.0; with the refinement the top of the sweep
is always the static last-exit model (accuracy = last exit, MAC reduction = 0), which is what
an accuracy-vs-MACs curve and the fallback of :func:`mac_reduction_at_loss` need. A NaN
confidence never fires, so such a sample falls through to the last exit.

:func:`dynamic_counts` returns pure sums (correct, MACs, exit histogram, n) so that the
counts of many clients or ranks can be added (the gathered rows of
:func:`cafedist.eval.clients.final_evaluation`, or an all-reduce of each tensor)
before :func:`dynamic_table` divides once.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

# 0.0, 0.05, ..., 1.0; rounded so the values print and serialise as the decimals they name.
# A 0.05 grid from 0 to 1, refined above 0.95: trained exits are often confident, and the
# interesting trade-offs (within 1 point of the last exit) sit between 0.95 and 1.
THRESHOLDS: tuple[float, ...] = tuple(sorted(
    {round(i * 0.05, 2) for i in range(21)} | {0.96, 0.97, 0.98, 0.99, 0.995, 0.999, 0.9999}))

# Slack for "accuracy >= target" so that e.g. 0.98 vs 0.99 - 0.01 is not lost to rounding.
_ACC_EPS = 1e-9


def _thresholds_tensor(thresholds: Sequence[float]) -> Tensor:
    th = torch.as_tensor(list(thresholds), dtype=torch.float64)
    if th.dim() != 1 or th.numel() == 0 or bool(torch.isnan(th).any()):
        raise ValueError(f"thresholds must be a non-empty sequence of numbers, got {list(thresholds)!r}")
    return th


def _macs_tensor(macs_per_exit: Sequence[int], m: int) -> Tensor:
    macs = torch.as_tensor(list(macs_per_exit), dtype=torch.float64)
    if macs.dim() != 1 or macs.numel() != m:
        raise ValueError(f"macs_per_exit must have one entry per exit ({m}), got {list(macs_per_exit)!r}")
    if bool((macs < 0).any()):
        raise ValueError(f"macs_per_exit must be >= 0, got {list(macs_per_exit)!r}")
    return macs


def exit_indices(conf: Tensor, thresholds: Sequence[float] = THRESHOLDS) -> Tensor:
    """The exit each sample uses under each threshold: ``conf`` [m, N] -> [T, N] int64."""
    if conf.dim() != 2 or conf.shape[0] < 1:
        raise ValueError(f"expected conf of shape [m, N], got {tuple(conf.shape)}")
    th = _thresholds_tensor(thresholds).to(conf.device)
    m, n = conf.shape
    # fires[t, k, i]: exit k would answer sample i under threshold t (see module docstring).
    fires = conf[:-1].double().unsqueeze(0) >= th.view(-1, 1, 1)
    fires &= (th < 1.0).view(-1, 1, 1)
    last = torch.ones(th.numel(), 1, n, dtype=torch.bool, device=conf.device)
    fires = torch.cat([fires, last], dim=1).to(torch.uint8)
    # argmax returns the first maximal index, i.e. the shallowest exit that fires.
    return fires.argmax(dim=1)


def dynamic_counts(
    pred: Tensor,
    conf: Tensor,
    y: Tensor,
    macs_per_exit: Sequence[int],
    thresholds: Sequence[float] = THRESHOLDS,
) -> dict[str, Tensor]:
    """Counts of threshold-based early-exit inference for every threshold.

    ``pred``/``conf`` [m, N] from :func:`~cafedist.eval.exits.exit_predictions`, ``y`` [N],
    ``macs_per_exit`` [m] the cost of reaching each exit. Returns ``{"correct": [T] int64,
    "macs": [T] float64 (summed over samples), "exits": [T, m] int64 (histogram of the exit
    used), "n": scalar int64}`` on ``pred``'s device.
    """
    if pred.shape != conf.shape or pred.dim() != 2 or y.dim() != 1 or y.shape[0] != pred.shape[1]:
        raise ValueError(
            f"expected pred [m, N], conf [m, N], y [N], got {tuple(pred.shape)}, {tuple(conf.shape)}, {tuple(y.shape)}"
        )
    m, n = pred.shape
    device = pred.device
    macs = _macs_tensor(macs_per_exit, m).to(device)
    idx = exit_indices(conf.to(device), thresholds)  # [T, N]
    t = idx.shape[0]
    hit = pred == y.to(device).unsqueeze(0)  # [m, N]
    correct = hit.gather(0, idx).sum(dim=1, dtype=torch.int64)
    # Histogram per threshold in one bincount: offset each row's exit ids by t * m.
    offsets = torch.arange(t, device=device).unsqueeze(1) * m
    exits = torch.bincount((idx + offsets).flatten(), minlength=t * m).view(t, m).long()
    return {
        "correct": correct,
        "macs": exits.double() @ macs,  # exact: integer counts times integer MACs
        "exits": exits,
        "n": torch.tensor(n, dtype=torch.int64, device=device),
    }


def dynamic_table(
    counts: dict[str, Tensor],
    macs_per_exit: Sequence[int],
    thresholds: Sequence[float] = THRESHOLDS,
) -> list[dict]:
    """Turn (summed) counts into one JSON-ready row per threshold.

    Row keys: ``threshold``, ``accuracy``, ``mean_macs`` (per sample), ``macs_reduction``
    (1 - mean_macs / MACs of the last exit), ``exit_fractions`` (m floats summing to 1) and
    ``last_exit_macs`` (used by :func:`mac_reduction_at_loss`).
    """
    th = _thresholds_tensor(thresholds)
    exits = counts["exits"].cpu()
    macs = _macs_tensor(macs_per_exit, exits.shape[-1])
    n = int(counts["n"])
    if exits.shape != (th.numel(), macs.numel()) or counts["correct"].numel() != th.numel():
        raise ValueError(
            f"counts were made for {tuple(exits.shape)} (thresholds, exits), "
            f"table asked for ({th.numel()}, {macs.numel()})"
        )
    if n <= 0:
        raise ValueError("cannot build a dynamic-inference table from zero samples")
    last_macs = float(macs[-1])
    rows = []
    for threshold, correct, total_macs, hist in zip(
        th.tolist(), counts["correct"].tolist(), counts["macs"].tolist(), exits.tolist()
    ):
        mean_macs = total_macs / n
        rows.append({
            "threshold": threshold,
            "accuracy": correct / n,
            "mean_macs": mean_macs,
            "macs_reduction": 1.0 - mean_macs / last_macs if last_macs > 0 else 0.0,
            "exit_fractions": [h / n for h in hist],
            "last_exit_macs": last_macs,
        })
    return rows


def _last_exit_macs(table: list[dict]) -> float:
    """MACs of the last exit, from the rows (hand-built rows may lack the explicit key)."""
    row = table[0]
    if "last_exit_macs" in row:
        return float(row["last_exit_macs"])
    if row["macs_reduction"] < 1.0:
        return row["mean_macs"] / (1.0 - row["macs_reduction"])
    raise ValueError("table rows carry neither last_exit_macs nor a usable macs_reduction")


def mac_reduction_at_loss(table: list[dict], last_exit_accuracy: float, max_loss: float = 0.01) -> dict:
    """The cheapest threshold that loses at most ``max_loss`` accuracy against the last exit.

    Picks the row with the smallest ``mean_macs`` whose accuracy >= ``last_exit_accuracy -
    max_loss`` (ties: higher accuracy, then the earlier row). Returns ``{"threshold",
    "accuracy", "mean_macs", "macs_reduction", "accuracy_loss", "fallback"}`` where
    ``accuracy_loss = last_exit_accuracy - accuracy`` (negative if dynamic inference is
    better). If no row qualifies, falls back to θ = 1.0, i.e. the last exit alone (see the
    module docstring): its accuracy, its MACs, reduction 0, and ``fallback = True``.
    """
    if not table:
        raise ValueError("mac_reduction_at_loss needs a non-empty table")
    if max_loss < 0:
        raise ValueError(f"max_loss must be >= 0, got {max_loss}")
    target = last_exit_accuracy - max_loss - _ACC_EPS
    ok = [(row["mean_macs"], -row["accuracy"], i) for i, row in enumerate(table) if row["accuracy"] >= target]
    if ok:
        row = table[min(ok)[2]]
        return {
            "threshold": row["threshold"],
            "accuracy": row["accuracy"],
            "mean_macs": row["mean_macs"],
            "macs_reduction": row["macs_reduction"],
            "accuracy_loss": last_exit_accuracy - row["accuracy"],
            "fallback": False,
        }
    return {
        "threshold": 1.0,
        "accuracy": last_exit_accuracy,
        "mean_macs": _last_exit_macs(table),
        "macs_reduction": 0.0,
        "accuracy_loss": 0.0,
        "fallback": True,
    }
