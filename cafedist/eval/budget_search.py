"""The search for an exit policy within a budget, on one calibration split.

:func:`choose_policy`:

1. every candidate (policy, temperatures, threshold θ) is scored: policies from
   :mod:`cafedist.eval.policies`, each with T = 1 and (unless disabled) with per-exit
   temperatures fitted on the calibration split; thresholds from a fixed grid plus the
   calibration scores themselves, so the search sees every distinct behaviour;
2. a candidate is *feasible* if an upper confidence bound of its cost stays within the
   budget: for ``macs=F`` the mean MACs + z·sd/√n <= F × last-exit MACs; for ``loss=P`` the
   paired accuracy loss against the last exit + z·sd/√n <= P points (z from
   ``confidence``; one pseudo-sample at each end of the range keeps sd from being 0 on small
   splits, see :func:`_upper_bound`). The margin is there because the budget is checked on
   test: a threshold that only just meets the budget on calibration misses it on test
   about half the time;
3. among feasible candidates: under a MACs budget the most accurate, and among equally
   accurate ones the one spending more of the budget (a small calibration split often
   cannot tell candidates apart; deeper exits are the more accurate ones on average, and
   the budget is what the client is willing to spend); under a loss budget the cheapest
   (ties: more accurate). Remaining ties go to the earlier policy (``POLICIES`` order,
   unscaled before scaled), then the smaller θ. A feasible
   candidate always exists: θ = 0 (everything at exit 1) for a MACs budget at or above
   exit 1's cost (lower ones are refused up front), θ = 1 (last exit only) for a loss budget.

:func:`fit_to_budget` adapts a population's choice to one client by moving θ only; a client
without calibration samples gets :func:`static_fallback`, a static exit that needs no
calibration and still honours its budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import torch
from torch import Tensor

from cafedist.eval.budget_spec import Budget
from cafedist.eval.dynamic import THRESHOLDS, exit_indices
from cafedist.eval.policies import POLICIES, check_policy, exit_scores, fit_temperatures

_MAX_DATA_THRESHOLDS = 512  # more calibration scores than this: use this many quantiles
DEFAULT_CONFIDENCE = 0.95  # of the upper bound that keeps a budget on test (--budget-confidence)


@dataclass(frozen=True)
class Split:
    """One client's per-exit logits [m, N, C] on one split, with the labels [N]."""

    logits: Tensor
    y: Tensor

    @property
    def n(self) -> int:
        """Samples in the split."""
        return int(self.y.shape[0])

    def hits(self) -> Tensor:
        """[m, N] bool: whether each exit answers each sample right."""
        return self.logits.argmax(dim=-1).cpu() == self.y.cpu().unsqueeze(0)


def pooled_split(splits: Sequence[Split]) -> Split:
    """All clients' calibration samples as one split (the population's)."""
    return Split(torch.cat([s.logits for s in splits], dim=1), torch.cat([s.y for s in splits]))


def macs_tensor(macs_per_exit: Sequence[int]) -> Tensor:
    """The exits' MACs as float64 [m], to index by exit."""
    return torch.as_tensor([float(c) for c in macs_per_exit], dtype=torch.float64)


@dataclass(frozen=True)
class Choice:
    """A client's exit policy: ``policy`` with ``temperatures`` (None: unscaled) and ``threshold``;
    or, for a fallback, ``policy = "static"`` and every sample answered by exit ``static_exit``."""

    policy: str
    threshold: float | None
    temperatures: tuple[float, ...] | None = None
    static_exit: int | None = None
    calibration_accuracy: float | None = None
    calibration_macs: float | None = None
    fallback: str | None = None

    def temperature_tensor(self) -> Tensor | None:
        """The per-exit temperatures as float64 [m] (None: unscaled)."""
        return None if self.temperatures is None else torch.tensor(self.temperatures, dtype=torch.float64)

    def scores(self, split: Split) -> Tensor:
        """This policy's per-exit scores [m, N] on ``split`` (not for a static exit)."""
        return exit_scores(split.logits, self.policy, self.temperature_tensor()).cpu()

    def exits(self, split: Split) -> Tensor:
        """The exit (0-based) that answers each sample of ``split`` under this policy: [N]."""
        if self.static_exit is not None:
            return torch.full((split.n,), self.static_exit, dtype=torch.int64)
        return exit_indices(self.scores(split), [float(self.threshold)])[0].cpu()


# ----------------------------------------------------------------------------- candidates
def candidate_thresholds(scores: Tensor) -> list[float]:
    """Thresholds worth trying for these calibration ``scores`` [m, N]: the fixed grid, 0, 1,
    just below 1 (lets saturated scores leave), and every score of an early exit — between
    two neighbouring scores nothing changes, so these cover every distinct behaviour (capped
    at ``_MAX_DATA_THRESHOLDS`` quantiles for large splits)."""
    early = scores[:-1].flatten().double().cpu()
    early = early[torch.isfinite(early)].unique()
    if early.numel() > _MAX_DATA_THRESHOLDS:
        early = early.quantile(torch.linspace(0, 1, _MAX_DATA_THRESHOLDS, dtype=torch.float64)).unique()
    values = set(THRESHOLDS) | {0.0, 1.0, math.nextafter(1.0, 0.0)} | set(early.clamp(0.0, 1.0).tolist())
    return sorted(values)


def _upper_bound(per_sample: Tensor, z: float, low: float, high: float, exact: Tensor) -> Tensor:
    """One-sided upper confidence bound of the mean of ``per_sample`` [T, N] (values in
    [low, high]): mean + z × standard error, after adding one pseudo-sample at ``low`` and one
    at ``high`` to each row. The pseudo-samples are a variance floor: on a small calibration
    split a candidate often shows no spread at all (no sample went deeper, no answer changed)
    and the plain standard error would claim certainty. Rows flagged in ``exact`` [T] do not
    depend on the data (the cost of θ = 0, all at exit 1; cost and loss of θ >= 1, the last
    exit) and keep their plain mean; so does everything at z = 0 (``confidence`` 0.5: the
    plain estimate)."""
    mean = per_sample.mean(dim=-1)
    if z == 0:
        return mean
    rows = per_sample.shape[0]
    padded = torch.cat([per_sample, torch.tensor([[low, high]], dtype=per_sample.dtype).expand(rows, 2)], dim=1)
    bound = padded.mean(dim=-1) + z * padded.std(dim=-1, correction=1) / math.sqrt(padded.shape[-1])
    return torch.where(exact, mean, bound)


def z_score(confidence: float) -> float:
    """The one-sided normal quantile of ``confidence`` (0 at 0.5: no margin)."""
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    return NormalDist().inv_cdf(confidence)


@dataclass(frozen=True)
class CandidateStats:
    """Calibration statistics of the candidate thresholds of one (policy, temperatures):
    ``thresholds`` and [T] tensors of accuracy, mean MACs and the upper confidence bounds of
    the MACs and of the accuracy loss against the last exit (a fraction)."""

    thresholds: list[float]
    accuracy: Tensor
    macs: Tensor
    macs_ub: Tensor
    loss_ub: Tensor

    def feasible(self, budget: Budget, last_macs: float) -> Tensor:
        """[T] bool: which candidates' upper bounds meet ``budget``."""
        return budget.holds(self.macs_ub, self.loss_ub, last_macs)

    def preference(self, kind: str) -> Tensor:
        """[T, 2] sort keys, the best smallest: under a MACs budget the most accurate, then the
        one spending more of the budget (module docstring); under a loss budget the cheapest,
        then the more accurate."""
        if kind == "macs":
            return torch.stack([-self.accuracy, -self.macs], dim=1)
        return torch.stack([self.macs, -self.accuracy], dim=1)

    def best(self, feasible: Tensor, kind: str) -> tuple[tuple[float, ...], int] | None:
        """The preferred candidate among the ``feasible`` ones (ties: the smaller θ), as (its
        sort key, its index); None when none is feasible."""
        keys = self.preference(kind)
        found = [(*keys[t].tolist(), t) for t in torch.nonzero(feasible).flatten().tolist()]
        if not found:
            return None
        key = min(found)
        return key[:-1], key[-1]

    def choice(self, t: int, policy: str, temperatures: Tensor | None) -> Choice:
        """Candidate ``t`` as a :class:`Choice`, with its calibration accuracy and MACs."""
        return Choice(policy=policy, threshold=self.thresholds[t],
                      temperatures=None if temperatures is None else tuple(float(x) for x in temperatures),
                      calibration_accuracy=float(self.accuracy[t]), calibration_macs=float(self.macs[t]))


def candidate_stats(cal: Split, macs: Tensor, policy: str, temps: Tensor | None, z: float,
                    extra: Sequence[float] = ()) -> CandidateStats:
    """Calibration statistics of every candidate threshold of one (policy, temperatures) on
    ``cal``, and of the ``extra`` thresholds (``macs``: :func:`macs_tensor`)."""
    scores = exit_scores(cal.logits, policy, temps).cpu()
    thresholds = sorted(set(candidate_thresholds(scores)) | set(extra))
    idx = exit_indices(scores, thresholds)  # [T, N]
    hit = cal.hits().double()  # [m, N]
    correct = hit.gather(0, idx)  # [T, N]
    cost = macs[idx]  # [T, N]
    th = torch.tensor(thresholds, dtype=torch.float64)
    last_only = th >= 1.0  # the last exit: cost and loss (0) known without data
    all_first = th <= 0.0  # everything at exit 1: its cost is known, its loss is not
    return CandidateStats(
        thresholds=thresholds,
        accuracy=correct.mean(dim=1),
        macs=cost.mean(dim=1),
        macs_ub=_upper_bound(cost, z, float(macs[0]), float(macs[-1]), last_only | all_first),
        # paired against the last exit on the same samples: far less noisy than two accuracies
        loss_ub=_upper_bound(hit[-1].unsqueeze(0) - correct, z, -1.0, 1.0, last_only),
    )


# ----------------------------------------------------------------------------- choices
def static_fallback(budget: Budget, macs_per_exit: Sequence[int], reason: str) -> Choice:
    """The static exit that honours ``budget`` without calibration: the last exit for a loss
    budget, the deepest exit whose cost fits a MACs budget (exit 1 always does once
    :func:`~cafedist.eval.budget_spec.check_feasible` has passed)."""
    k = len(macs_per_exit) - 1
    if budget.kind == "macs":
        limit = budget.macs_limit(macs_per_exit[-1])
        k = max((i for i, c in enumerate(macs_per_exit) if c <= limit), default=0)
    return Choice(policy="static", threshold=None, static_exit=k, fallback=reason)


def choose_policy(
    cal: Split,
    budget: Budget,
    macs_per_exit: Sequence[int],
    policies: Sequence[str] = POLICIES,
    temperature: bool = True,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Choice:
    """The most accurate (MACs budget) or cheapest (loss budget) policy and threshold within
    ``budget`` on the calibration split ``cal`` (see the module docstring for the rules)."""
    if cal.n == 0:
        return static_fallback(budget, macs_per_exit, "no calibration samples")
    z = z_score(confidence)
    macs = macs_tensor(macs_per_exit)
    variants: list[tuple[str, Tensor | None]] = []
    fitted = fit_temperatures(cal.logits, cal.y) if temperature else None
    for policy in policies:
        variants.append((check_policy(policy), None))
        if fitted is not None:
            variants.append((policy, fitted))
    best: tuple | None = None
    for v, (policy, temps) in enumerate(variants):
        stats = candidate_stats(cal, macs, policy, temps, z)
        found = stats.best(stats.feasible(budget, float(macs[-1])), budget.kind)
        if found is None:
            continue
        key = (*found[0], v, found[1])  # ties: earlier variant, then smaller threshold
        if best is None or key < best[0]:
            best = (key, stats.choice(found[1], policy, temps))
    if best is None:  # unreachable after check_feasible; kept so a bug cannot break the budget
        return static_fallback(budget, macs_per_exit, "no feasible policy on calibration")
    return best[1]


def fit_to_budget(population: Choice, cal: Split, budget: Budget, macs_per_exit: Sequence[int],
                  confidence: float = DEFAULT_CONFIDENCE) -> Choice:
    """The population's choice (policy, temperatures, θ; from :func:`choose_policy` on the
    pooled calibration splits) adapted to one client: θ moved just far enough that the
    client's own ``budget`` holds on its calibration split ``cal`` with ``confidence`` —
    under a MACs budget the largest feasible θ <= the population's (a lower θ answers more
    samples early), under a loss budget the smallest feasible θ >= it. θ = 0 and θ = 1 are
    always candidates, so one exists after :func:`~cafedist.eval.budget_spec.check_feasible`
    unless scores are not finite. Without calibration samples, or when the population's own
    choice is a static exit (nothing was feasible on the pooled splits, e.g. NaN scores): the
    static fallback (nothing could check the budget)."""
    if cal.n == 0:
        return static_fallback(budget, macs_per_exit, "no calibration samples")
    if population.threshold is None:
        return static_fallback(budget, macs_per_exit, population.fallback or "no feasible threshold on calibration")
    macs = macs_tensor(macs_per_exit)
    temps = population.temperature_tensor()
    theta = float(population.threshold)
    stats = candidate_stats(cal, macs, population.policy, temps, z_score(confidence), extra=(theta,))
    feasible = stats.feasible(budget, float(macs[-1])).tolist()
    ths = stats.thresholds
    if budget.kind == "macs":
        t = max((i for i, th in enumerate(ths) if th <= theta and feasible[i]), default=None)
    else:
        t = min((i for i, th in enumerate(ths) if th >= theta and feasible[i]), default=None)
    if t is None:  # unreachable: θ = 0 (MACs) and θ = 1 (loss) are exact and feasible
        return static_fallback(budget, macs_per_exit, "no feasible threshold on calibration")
    return stats.choice(t, population.policy, temps)


__all__ = ["DEFAULT_CONFIDENCE", "CandidateStats", "Choice", "Split", "candidate_stats", "candidate_thresholds",
           "choose_policy", "fit_to_budget", "macs_tensor", "pooled_split", "static_fallback", "z_score"]
