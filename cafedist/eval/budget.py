"""Personalized dynamic inference: each client's most accurate exit policy within its budget.

For every client, on its **calibration split** (the validation split, ``data.val_fraction``)
and never on its test split. Two scopes decide where the policy comes from:

- ``pooled`` (the default): the (policy, temperatures, θ) is chosen once for the population
  by the search below on all clients' calibration splits pooled (per distinct budget), then
  each client keeps it or moves θ just far enough that its **own** budget holds on its own
  calibration split (:func:`fit_to_budget`: under a MACs budget the largest θ <= the pooled
  one, under a loss budget the smallest θ >= it). Every client gets a threshold of its own,
  and the choices that need data (which policy, which temperatures) are made on 10× more of
  it: on calibration splits of 7–50 samples the per-client search below loses about half a
  point to estimation noise, the pooled one does not (docs/METHOD.md, "Against the global
  threshold");
- ``client``: the search runs on each client's calibration split alone.

The search (:func:`choose_policy`), on one calibration split:

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

The chosen policy is then applied once to the client's test split, which reports its
accuracy, its MACs and whether the budget held there.

A client without calibration samples gets a static exit that needs no calibration and
still honours its budget — the last exit under a loss budget, the deepest exit within a
MACs budget — with a warning and ``fallback`` set in its row (in both scopes: without its
own samples nothing can check that a pooled threshold keeps its budget). A run without any
validation split is refused (see :func:`run_budget`): every client would be such a fallback.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Sequence

import torch
from torch import Tensor

from cafedist.eval.budget_spec import Budget
from cafedist.eval.dynamic import THRESHOLDS, dynamic_counts, dynamic_table, exit_indices
from cafedist.eval.policies import POLICIES, check_policy, exit_scores, fit_temperatures

log = logging.getLogger("cafedist")

_MAX_DATA_THRESHOLDS = 512  # more calibration scores than this: use this many quantiles
_EPS = 1e-9  # slack in budget comparisons, so e.g. exactly 0.5 of the MACs counts as within 0.5
#: the search's version: bump it when :func:`choose_policy` chooses differently or the budget
#: section holds something new, so that the results ``cafedist compare`` keeps per run
#: (cafedist.compare.budgets) are recomputed (3: ``global_on_calibration``; 4:
#: ``global_within_every_budget``)
SEARCH_VERSION = 4
#: where a client's policy is chosen (module docstring); the first is the default
SCOPES: tuple[str, ...] = ("pooled", "client")


@dataclass(frozen=True)
class Split:
    """One client's per-exit logits [m, N, C] on one split, with the labels [N]."""

    logits: Tensor
    y: Tensor

    @property
    def n(self) -> int:
        return int(self.y.shape[0])


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

    def exits(self, split: Split) -> Tensor:
        """The exit (0-based) that answers each sample of ``split`` under this policy: [N]."""
        if self.static_exit is not None:
            return torch.full((split.n,), self.static_exit, dtype=torch.int64)
        temps = None if self.temperatures is None else torch.tensor(self.temperatures, dtype=torch.float64)
        scores = exit_scores(split.logits, self.policy, temps)
        return exit_indices(scores, [float(self.threshold)])[0].cpu()


# ----------------------------------------------------------------------------- the search
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


def _candidates(cal: Split, macs: Tensor, policy: str, temps: Tensor | None, z: float,
                extra: Sequence[float] = ()) -> dict[str, Any]:
    """Calibration statistics of every threshold of one (policy, temperatures), and of the
    ``extra`` thresholds: [T] tensors."""
    scores = exit_scores(cal.logits, policy, temps).cpu()
    thresholds = sorted(set(candidate_thresholds(scores)) | set(extra))
    idx = exit_indices(scores, thresholds)  # [T, N]
    hit = (cal.logits.argmax(dim=-1).cpu() == cal.y.cpu().unsqueeze(0)).double()  # [m, N]
    correct = hit.gather(0, idx)  # [T, N]
    cost = macs[idx]  # [T, N]
    th = torch.tensor(thresholds, dtype=torch.float64)
    last_only = th >= 1.0  # the last exit: cost and loss (0) known without data
    all_first = th <= 0.0  # everything at exit 1: its cost is known, its loss is not
    return {
        "thresholds": thresholds,
        "accuracy": correct.mean(dim=1),
        "macs": cost.mean(dim=1),
        "macs_ub": _upper_bound(cost, z, float(macs[0]), float(macs[-1]), last_only | all_first),
        # paired against the last exit on the same samples: far less noisy than two accuracies
        "loss_ub": _upper_bound(hit[-1].unsqueeze(0) - correct, z, -1.0, 1.0, last_only),
    }


def _z(confidence: float) -> float:
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    return NormalDist().inv_cdf(confidence)


def _feasible(stats: dict[str, Any], budget: Budget, last_macs: float) -> Tensor:
    """[T] bool: which candidates' upper confidence bounds (:func:`_candidates`) meet ``budget``."""
    if budget.kind == "macs":
        return stats["macs_ub"] <= budget.value * last_macs * (1 + _EPS)
    return 100.0 * stats["loss_ub"] <= budget.value + _EPS


def _preference(stats: dict[str, Any], kind: str) -> Tensor:
    """[T, 2] sort keys of the candidates (:func:`_candidates`), the best smallest: under a MACs
    budget the most accurate, then the one spending more of the budget (module docstring);
    under a loss budget the cheapest, then the more accurate."""
    if kind == "macs":
        return torch.stack([-stats["accuracy"], -stats["macs"]], dim=1)
    return torch.stack([stats["macs"], -stats["accuracy"]], dim=1)


def static_fallback(budget: Budget, macs_per_exit: Sequence[int], reason: str) -> Choice:
    """The static exit that honours ``budget`` without calibration: the last exit for a loss
    budget, the deepest exit whose cost fits a MACs budget (exit 1 always does once
    :func:`~cafedist.eval.budget_spec.check_feasible` has passed)."""
    last = len(macs_per_exit) - 1
    k = last
    if budget.kind == "macs":
        limit = budget.value * macs_per_exit[-1] * (1 + _EPS)
        k = max((i for i, c in enumerate(macs_per_exit) if c <= limit), default=0)
    return Choice(policy="static", threshold=None, static_exit=k, fallback=reason)


def choose_policy(
    cal: Split,
    budget: Budget,
    macs_per_exit: Sequence[int],
    policies: Sequence[str] = POLICIES,
    temperature: bool = True,
    confidence: float = 0.95,
) -> Choice:
    """The most accurate (MACs budget) or cheapest (loss budget) policy and threshold within
    ``budget`` on the calibration split ``cal`` (see the module docstring for the rules)."""
    if cal.n == 0:
        return static_fallback(budget, macs_per_exit, "no calibration samples")
    z = _z(confidence)
    macs = torch.as_tensor([float(c) for c in macs_per_exit], dtype=torch.float64)
    last_macs = float(macs[-1])
    variants: list[tuple[str, Tensor | None]] = []
    fitted = fit_temperatures(cal.logits, cal.y) if temperature else None
    for policy in policies:
        variants.append((check_policy(policy), None))
        if fitted is not None:
            variants.append((policy, fitted))
    best: tuple | None = None
    for v, (policy, temps) in enumerate(variants):
        stats = _candidates(cal, macs, policy, temps, z)
        feasible = _feasible(stats, budget, last_macs)
        keys = _preference(stats, budget.kind)
        for t in torch.nonzero(feasible).flatten().tolist():
            key = (*keys[t].tolist(), v, t)  # ties: earlier variant, then smaller threshold
            if best is None or key < best[0]:
                best = (key, policy, temps, stats["thresholds"][t],
                        float(stats["accuracy"][t]), float(stats["macs"][t]))
    if best is None:  # unreachable after check_feasible; kept so a bug cannot break the budget
        return static_fallback(budget, macs_per_exit, "no feasible policy on calibration")
    _, policy, temps, threshold, acc, mean_macs = best
    return Choice(policy=policy, threshold=threshold,
                  temperatures=None if temps is None else tuple(float(t) for t in temps),
                  calibration_accuracy=acc, calibration_macs=mean_macs)


def fit_to_budget(population: Choice, cal: Split, budget: Budget, macs_per_exit: Sequence[int],
                  confidence: float = 0.95) -> Choice:
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
    macs = torch.as_tensor([float(c) for c in macs_per_exit], dtype=torch.float64)
    temps = None if population.temperatures is None else torch.tensor(population.temperatures, dtype=torch.float64)
    theta = float(population.threshold)
    stats = _candidates(cal, macs, population.policy, temps, _z(confidence), extra=(theta,))
    feasible = _feasible(stats, budget, float(macs[-1])).tolist()
    ths = stats["thresholds"]
    if budget.kind == "macs":
        t = max((i for i, th in enumerate(ths) if th <= theta and feasible[i]), default=None)
    else:
        t = min((i for i, th in enumerate(ths) if th >= theta and feasible[i]), default=None)
    if t is None:  # unreachable: θ = 0 (MACs) and θ = 1 (loss) are exact and feasible
        return static_fallback(budget, macs_per_exit, "no feasible threshold on calibration")
    return Choice(policy=population.policy, threshold=ths[t], temperatures=population.temperatures,
                  calibration_accuracy=float(stats["accuracy"][t]), calibration_macs=float(stats["macs"][t]))


def pooled_split(splits: Sequence[Split]) -> Split:
    """All clients' calibration samples as one split (the population's)."""
    return Split(torch.cat([s.logits for s in splits], dim=1), torch.cat([s.y for s in splits]))


# ----------------------------------------------------------------------------- test check and report
def apply_choice(choice: Choice, split: Split, macs_per_exit: Sequence[int]) -> dict[str, Any]:
    """Correct count, summed MACs, n and the last exit's correct count of ``choice`` on ``split``."""
    idx = choice.exits(split)
    hit = split.logits.argmax(dim=-1).cpu() == split.y.cpu().unsqueeze(0)
    macs = torch.as_tensor([float(c) for c in macs_per_exit], dtype=torch.float64)
    return {
        "correct": int(hit.gather(0, idx.unsqueeze(0)).sum()),
        "macs": float(macs[idx].sum()),
        "n": split.n,
        "last_correct": int(hit[-1].sum()),
    }


def within_budget(budget: Budget, accuracy: float, last_accuracy: float, mean_macs: float,
                  last_macs: float) -> bool:
    """Whether measured accuracy/MACs honour ``budget``."""
    if budget.kind == "macs":
        return mean_macs <= budget.value * last_macs * (1 + _EPS)
    return 100.0 * (last_accuracy - accuracy) <= budget.value + _EPS


def client_row(cid: int, budget: Budget, choice: Choice, n_cal: int, test: dict[str, Any],
               macs_per_exit: Sequence[int]) -> dict[str, Any]:
    """One JSON-ready row of the per-client budget table."""
    last_macs = float(macs_per_exit[-1])
    n = test["n"]
    acc = test["correct"] / n if n else None
    last_acc = test["last_correct"] / n if n else None
    mean_macs = test["macs"] / n if n else None
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


def overall_result(rows: list[dict], tests: list[dict], macs_per_exit: Sequence[int]) -> dict[str, Any]:
    """Overall numbers of one policy per client: pooled test accuracy and MACs (like
    ``acc_per_exit``), the client mean, the share of clients within budget, the fallbacks."""
    n = sum(t["n"] for t in tests)
    if n == 0:
        raise ValueError("no client has test samples: the budget report is undefined")
    mean_macs = sum(t["macs"] for t in tests) / n
    judged = [r["within_budget"] for r in rows if r["within_budget"] is not None]
    accs = [r["test_accuracy"] for r in rows if r["test_accuracy"] is not None]
    return {
        "accuracy": sum(t["correct"] for t in tests) / n,
        "client_mean_accuracy": sum(accs) / len(accs),
        "mean_macs": mean_macs,
        "macs_fraction": mean_macs / float(macs_per_exit[-1]),
        "last_exit_accuracy": sum(t["last_correct"] for t in tests) / n,
        "clients_within_budget": sum(judged),
        "share_within_budget": sum(judged) / len(judged) if judged else None,
        "fallback_clients": [r["client"] for r in rows if r["fallback"]],
    }


def summarize(rows: list[dict], tests: list[dict], macs_per_exit: Sequence[int],
              global_table: list[dict]) -> dict[str, Any]:
    """:func:`overall_result` and the global threshold curve read at the same mean MACs."""
    result = overall_result(rows, tests, macs_per_exit)
    return {**result, "global_at_same_macs": accuracy_at_macs(global_table, result["mean_macs"])}


def client_curve(choice: Choice, split: Split, macs_per_exit: Sequence[int]) -> list[dict]:
    """The chosen policy's accuracy-vs-MACs curve on ``split`` over the threshold grid (for
    the figure only; nothing is chosen from it). A static fallback has no curve."""
    if choice.static_exit is not None or split.n == 0:
        return []
    temps = None if choice.temperatures is None else torch.tensor(choice.temperatures, dtype=torch.float64)
    scores = exit_scores(split.logits, choice.policy, temps).cpu()
    pred = split.logits.argmax(dim=-1).cpu()
    counts = dynamic_counts(pred, scores, split.y.cpu(), macs_per_exit)
    return dynamic_table(counts, macs_per_exit)


def population_choices(cals: Sequence[Split], budgets: Sequence[Budget], macs_per_exit: Sequence[int],
                       policies: Sequence[str] = POLICIES, temperature: bool = True,
                       confidence: float = 0.95) -> dict[Budget, Choice]:
    """The pooled scope's population choice for each distinct budget: :func:`choose_policy`
    on every client's calibration samples together (a client with none adds nothing)."""
    pooled = pooled_split(cals)
    return {b: choose_policy(pooled, b, macs_per_exit, policies, temperature, confidence)
            for b in dict.fromkeys(budgets)}


def choose_all(cals: Sequence[Split], budgets: Sequence[Budget], macs_per_exit: Sequence[int],
               policies: Sequence[str] = POLICIES, temperature: bool = True, confidence: float = 0.95,
               scope: str = SCOPES[0]) -> tuple[list[Choice], dict[Budget, Choice]]:
    """Every client's choice under ``scope`` (module docstring) from its calibration split
    ``cals[cid]`` and budget, and the population's choice per budget (empty for "client")."""
    if scope not in SCOPES:
        raise ValueError(f"unknown policy scope {scope!r}; expected one of {', '.join(SCOPES)}")
    if scope == "client":
        return [choose_policy(cal, b, macs_per_exit, policies, temperature, confidence)
                for cal, b in zip(cals, budgets)], {}
    population = population_choices(cals, budgets, macs_per_exit, policies, temperature, confidence)
    fitted = [fit_to_budget(population[b], cal, b, macs_per_exit, confidence) for cal, b in zip(cals, budgets)]
    return fitted, population


def global_on_calibration(splits: Sequence[tuple[Split, Split]], budget: Budget, macs_per_exit: Sequence[int],
                          confidence: float = 0.95) -> dict[str, Any] | None:
    """One unscaled max-softmax threshold for every client (the policy of eval's global curve),
    chosen on all calibration splits pooled so that ``budget`` holds for the population — what
    a deployment without per-client budgets would use — and checked on test like the
    personalized policies (:func:`overall_result`): its accuracy and MACs, and for how many clients
    their *own* budget holds (one threshold lets hard clients spend more than easy ones).
    None without calibration samples (nothing to choose on)."""
    pooled = pooled_split([cal for cal, _ in splits])
    if pooled.n == 0:
        return None
    choice = choose_policy(pooled, budget, macs_per_exit, ("max-softmax",), temperature=False, confidence=confidence)
    return _one_threshold_on_test(choice, splits, [budget] * len(splits), macs_per_exit)


def _one_threshold_on_test(choice: Choice, splits: Sequence[tuple[Split, Split]], budgets: Sequence[Budget],
                           macs_per_exit: Sequence[int]) -> dict[str, Any]:
    """One threshold ``choice`` for every client, checked on test: its threshold, accuracy,
    MACs and for how many clients their own budget holds (:func:`overall_result`)."""
    tests = [apply_choice(choice, test, macs_per_exit) for _, test in splits]
    rows = [client_row(cid, budget, choice, cal.n, result, macs_per_exit)
            for cid, ((cal, _), budget, result) in enumerate(zip(splits, budgets, tests))]
    overall = overall_result(rows, tests, macs_per_exit)
    keys = ("accuracy", "mean_macs", "macs_fraction", "clients_within_budget", "share_within_budget")
    return {"threshold": choice.threshold, **{k: overall[k] for k in keys}}


def global_within_every_budget(splits: Sequence[tuple[Split, Split]], budgets: Sequence[Budget],
                               macs_per_exit: Sequence[int], confidence: float = 0.95) -> dict[str, Any] | None:
    """One unscaled max-softmax threshold for every client (the global curve's policy) that
    keeps *every* client's own budget on its own calibration split, with the same upper
    confidence bound as the personalized policies: the fair alternative at equal per-client
    budgets, where :func:`global_on_calibration` holds only the population's mean. Among the
    thresholds feasible for every client (a client without calibration samples constrains
    nothing) the pooled calibration splits pick as :func:`choose_policy` does (MACs: most
    accurate, then more spent; loss: cheapest, then more accurate), and the choice is checked
    on test like the personalized policies. None without calibration samples, when the
    budgets are of both kinds (one threshold cannot be judged by both rules), or when no
    threshold is feasible for every client (non-finite calibration scores make even θ = 0
    send samples past exit 1).

    It is as low as the client that needs the lowest threshold: a hard client, or one whose
    small calibration split leaves a wide margin (the same margin keeps each personalized
    policy within its own client's budget, but binds only that client there)."""
    kinds = {b.kind for b in budgets}
    pooled = pooled_split([cal for cal, _ in splits])
    if pooled.n == 0 or len(kinds) != 1:
        return None
    z = _z(confidence)
    macs = torch.as_tensor([float(c) for c in macs_per_exit], dtype=torch.float64)
    stats = _candidates(pooled, macs, "max-softmax", None, z)
    thresholds = stats["thresholds"]
    everyone = torch.ones(len(thresholds), dtype=torch.bool)
    for (cal, _), budget in zip(splits, budgets):
        if cal.n:
            own = _candidates(cal, macs, "max-softmax", None, z, extra=thresholds)
            at = {th: i for i, th in enumerate(own["thresholds"])}
            everyone &= _feasible(own, budget, float(macs[-1]))[[at[th] for th in thresholds]]
    keys = _preference(stats, next(iter(kinds)))
    feasible = torch.nonzero(everyone).flatten().tolist()
    if not feasible:  # θ = 0 (MACs) and θ = 1 (loss) are feasible unless scores are not finite
        return None
    t = min(feasible, key=lambda i: (*keys[i].tolist(), i))
    return _one_threshold_on_test(Choice(policy="max-softmax", threshold=thresholds[t]), splits, budgets,
                                  macs_per_exit)


def _choice_json(choice: Choice) -> dict[str, Any]:
    return {"policy": choice.policy, "threshold": choice.threshold,
            "temperatures": None if choice.temperatures is None else list(choice.temperatures),
            "calibration_accuracy": choice.calibration_accuracy}


def personalized_budgets(
    splits: Sequence[tuple[Split, Split]],
    budgets: Sequence[Budget],
    macs_per_exit: Sequence[int],
    global_table: list[dict],
    policies: Sequence[str] = POLICIES,
    temperature: bool = True,
    confidence: float = 0.95,
    scope: str = SCOPES[0],
) -> tuple[dict[str, Any], list[list[dict]]]:
    """Choose, check and report every client's policy: ``splits[cid] = (calibration, test)``;
    ``scope`` "pooled" or "client" (module docstring).

    Returns the ``budget`` section of eval.json (``clients``: one row per client, and the
    overall numbers; under the pooled scope also ``population``: the pooled choice per budget;
    ``global_on_calibration``: :func:`global_on_calibration` when every client has the same
    budget, else None) and each client's test curve for the figure.
    """
    if len(splits) != len(budgets):
        raise ValueError(f"{len(splits)} clients but {len(budgets)} budgets")
    choices, population = choose_all([cal for cal, _ in splits], budgets, macs_per_exit, policies, temperature,
                                     confidence, scope)
    rows, tests, curves = [], [], []
    for cid, ((cal, test), budget, choice) in enumerate(zip(splits, budgets, choices)):
        if choice.fallback:
            log.warning("client %d: %s: static exit %d for budget %s", cid, choice.fallback,
                        choice.static_exit + 1, budget.spec)
        result = apply_choice(choice, test, macs_per_exit)
        rows.append(client_row(cid, budget, choice, cal.n, result, macs_per_exit))
        tests.append(result)
        curves.append(client_curve(choice, test, macs_per_exit))
    section = {"scope": scope, "confidence": confidence, "policies": list(policies), "temperature": temperature,
               **summarize(rows, tests, macs_per_exit, global_table), "clients": rows}
    if population:
        section["population"] = {b.spec: _choice_json(c) for b, c in population.items()}
    # the fair alternative without per-client budgets; defined when every client has the same budget
    uniform = len(set(budgets)) == 1
    section["global_on_calibration"] = (global_on_calibration(splits, budgets[0], macs_per_exit, confidence)
                                        if uniform else None)
    # the alternative at equal per-client budgets: one threshold low enough for every client's budget
    section["global_within_every_budget"] = global_within_every_budget(splits, budgets, macs_per_exit, confidence)
    return section, curves


__all__ = ["SCOPES", "SEARCH_VERSION", "Choice", "Split", "accuracy_at_macs", "apply_choice", "candidate_thresholds",
           "choose_all", "choose_policy", "client_row", "fit_to_budget", "global_on_calibration",
           "global_within_every_budget",
           "overall_result", "personalized_budgets", "population_choices", "pooled_split", "static_fallback",
           "summarize", "within_budget"]
