"""The two global thresholds eval reports beside the personalized policies.

Both are one unscaled max-softmax threshold for every client (the policy of eval's global
curve), chosen on all clients' calibration splits pooled and checked on test like the
personalized policies (:func:`~cafedist.eval.budget_report.overall_result`):

- :meth:`PooledCalibration.on_calibration` (``global_on_calibration``): the population's
  budget holds on the pooled splits — what a deployment without per-client budgets would use;
  one threshold lets hard clients spend more than easy ones, so it reports for how many clients
  their *own* budget holds;
- :meth:`PooledCalibration.within_every_budget` (``global_within_every_budget``): every
  client's own budget holds on its own split, with the personalized policies' margin — the
  alternative at equal per-client budgets.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Sequence

import torch

from cafedist.eval.budget_report import apply_choice, client_row, overall_result
from cafedist.eval.budget_search import (
    DEFAULT_CONFIDENCE,
    CandidateStats,
    Choice,
    Split,
    candidate_stats,
    macs_tensor,
    pooled_split,
    static_fallback,
    z_score,
)
from cafedist.eval.budget_spec import Budget

GLOBAL_POLICY = "max-softmax"  # unscaled: the global curve's policy


class PooledCalibration:
    """Every client's (calibration, test) splits, with the calibration splits pooled once and
    the global policy's candidates scored on them once, for both global thresholds."""

    def __init__(self, splits: Sequence[tuple[Split, Split]], macs_per_exit: Sequence[int],
                 confidence: float = DEFAULT_CONFIDENCE):
        self.splits = list(splits)
        self.macs_per_exit = list(macs_per_exit)
        self.z = z_score(confidence)
        self.macs = macs_tensor(macs_per_exit)
        self.pooled = pooled_split([cal for cal, _ in self.splits])

    @cached_property
    def _stats(self) -> CandidateStats:
        return candidate_stats(self.pooled, self.macs, GLOBAL_POLICY, None, self.z)

    def on_calibration(self, budget: Budget) -> dict[str, Any] | None:
        """The threshold for which ``budget`` holds on the pooled calibration splits, chosen as
        :func:`~cafedist.eval.budget_search.choose_policy` chooses, checked on test against
        each client's own budget. None without calibration samples (nothing to choose on)."""
        if self.pooled.n == 0:
            return None
        found = self._stats.best(self._stats.feasible(budget, float(self.macs[-1])), budget.kind)
        choice = (self._stats.choice(found[1], GLOBAL_POLICY, None) if found is not None
                  else static_fallback(budget, self.macs_per_exit, "no feasible policy on calibration"))
        return self._on_test(choice, [budget] * len(self.splits))

    def within_every_budget(self, budgets: Sequence[Budget]) -> dict[str, Any] | None:
        """The threshold that keeps *every* client's own budget on its own calibration split,
        with the same upper confidence bound as the personalized policies. Among the thresholds
        feasible for every client (a client without calibration samples constrains nothing)
        the pooled splits pick as :func:`~cafedist.eval.budget_search.choose_policy` does
        (MACs: most accurate, then more spent; loss: cheapest, then more accurate), and the
        choice is checked on test. None without calibration samples, when the budgets are of
        both kinds (one threshold cannot be judged by both rules), or when no threshold is
        feasible for every client (non-finite calibration scores make even θ = 0 send samples
        past exit 1).

        It is as low as the client that needs the lowest threshold: a hard client, or one whose
        small calibration split leaves a wide margin (the same margin keeps each personalized
        policy within its own client's budget, but binds only that client there)."""
        kinds = {b.kind for b in budgets}
        if self.pooled.n == 0 or len(kinds) != 1:
            return None
        thresholds = self._stats.thresholds
        everyone = torch.ones(len(thresholds), dtype=torch.bool)
        for (cal, _), budget in zip(self.splits, budgets):
            if cal.n:
                own = candidate_stats(cal, self.macs, GLOBAL_POLICY, None, self.z, extra=thresholds)
                at = {th: i for i, th in enumerate(own.thresholds)}
                everyone &= own.feasible(budget, float(self.macs[-1]))[[at[th] for th in thresholds]]
        found = self._stats.best(everyone, next(iter(kinds)))
        if found is None:  # θ = 0 (MACs) and θ = 1 (loss) are feasible unless scores are not finite
            return None
        return self._on_test(Choice(policy=GLOBAL_POLICY, threshold=thresholds[found[1]]), budgets)

    def _on_test(self, choice: Choice, budgets: Sequence[Budget]) -> dict[str, Any]:
        """One threshold ``choice`` for every client, checked on test: its threshold, accuracy,
        MACs and for how many clients their own budget holds."""
        tests = [apply_choice(choice, test, self.macs_per_exit) for _, test in self.splits]
        rows = [client_row(cid, budget, choice, cal.n, result, self.macs_per_exit)
                for cid, ((cal, _), budget, result) in enumerate(zip(self.splits, budgets, tests))]
        overall = overall_result(rows, tests, self.macs_per_exit)
        keys = ("accuracy", "mean_macs", "macs_fraction", "clients_within_budget", "share_within_budget")
        return {"threshold": choice.threshold, **{k: overall[k] for k in keys}}


def global_on_calibration(splits: Sequence[tuple[Split, Split]], budget: Budget, macs_per_exit: Sequence[int],
                          confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Any] | None:
    """:meth:`PooledCalibration.on_calibration` of ``splits``."""
    return PooledCalibration(splits, macs_per_exit, confidence).on_calibration(budget)


def global_within_every_budget(splits: Sequence[tuple[Split, Split]], budgets: Sequence[Budget],
                               macs_per_exit: Sequence[int],
                               confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Any] | None:
    """:meth:`PooledCalibration.within_every_budget` of ``splits``."""
    return PooledCalibration(splits, macs_per_exit, confidence).within_every_budget(budgets)


__all__ = ["GLOBAL_POLICY", "PooledCalibration", "global_on_calibration", "global_within_every_budget"]
