"""Per-client budget rules against the global threshold, measured on calibration data only.

    python experiments/budget_halvings.py RUN_DIR [RUN_DIR ...] [--budget macs=0.5] [--repeats 20]

Each client's calibration (validation) split is halved at random; a rule chooses every
client's policy on one half and is scored on the other half against the global max-softmax
curve of that half read at the same mean MACs (what ``cafedist eval --budget`` reports on
test). The test splits are never read. Prints, per run and overall, each rule's gap (points;
positive: the per-client policies are more accurate), MACs share and share of clients within
budget on the scoring half. docs/METHOD.md ("Against the global threshold") quotes its output.

The rules: ``pooled`` (the default scope of ``cafedist eval --budget``: the search on all
clients' halves pooled, then each client's θ moved until its own budget holds,
:func:`cafedist.eval.budget_search.fit_to_budget`), ``pooled-max-softmax`` (the same, max-softmax
only, with and without pooled temperatures), ``client`` (the search on each client's half alone,
:func:`cafedist.eval.budget_search.choose_policy`; ``--policy-scope client``), ``max-softmax`` (that
policy only, unscaled, per client), ``quarter`` (``client`` on a quarter of the split
instead of a half), ``cheapest-near-tie`` (the cheapest feasible candidate within 2
calibration samples of the most accurate) and ``hindsight`` (``client`` without margin,
choosing on the scoring half itself: an optimistic bound on what per-client thresholds can
reach) and ``pooled-hindsight-fit`` (``pooled``, but each client's θ fitted on its scoring half
without margin: what the pooled rule, which only lowers θ, reaches if every client's MACs were
known exactly). An experiment, not an interface: it reuses the budget search's parts
(``candidate_stats``, ``z_score``).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable, Sequence

import torch

from cafedist.errors import CafeError
from cafedist.eval.budget import choose_all, population_choices
from cafedist.eval.budget_report import accuracy_at_macs, apply_choice
from cafedist.eval.budget_run import client_splits
from cafedist.eval.budget_search import (
    Choice,
    Split,
    candidate_stats,
    choose_policy,
    fit_to_budget,
    macs_tensor,
    z_score,
)
from cafedist.eval.budget_spec import Budget, parse_budget_spec
from cafedist.eval.dynamic import dynamic_counts, dynamic_table
from cafedist.eval.policies import POLICIES, exit_scores, fit_temperatures
from cafedist.eval.run import load_run
from cafedist.stats import mean_se

# (every client's choice half, their scoring halves, budget, MACs) -> every client's choice
Rule = Callable[[Sequence[Split], Sequence[Split], Budget, Sequence[int]], list[Choice]]


def cheapest_near_tie(cal: Split, budget: Budget, macs_per_exit: Sequence[int], slack: float = 2.0) -> Choice:
    """The cheapest feasible candidate whose calibration accuracy is within ``slack`` samples of the best
    (without calibration samples: :func:`choose_policy`'s static fallback)."""
    if cal.n == 0:
        return choose_policy(cal, budget, macs_per_exit)
    z = z_score(0.95)
    macs = macs_tensor(macs_per_exit)
    fitted = fit_temperatures(cal.logits, cal.y)
    cands = []
    for policy in POLICIES:
        for temps in (None, fitted):
            st = candidate_stats(cal, macs, policy, temps, z)
            for t in torch.nonzero(st.feasible(budget, float(macs[-1]))).flatten().tolist():
                cands.append((float(st.accuracy[t]), float(st.macs[t]), policy, temps, st.thresholds[t]))
    best = max(c[0] for c in cands)
    _, _, policy, temps, threshold = min((c for c in cands if c[0] >= best - slack / cal.n - 1e-12),
                                         key=lambda c: (c[1], -c[0]))
    return Choice(policy=policy, threshold=threshold,
                  temperatures=None if temps is None else tuple(float(t) for t in temps))


def per_client(rule: Callable[[Split, Split, Budget, Sequence[int]], Choice]) -> Rule:
    """A rule that chooses for each client from its own halves alone."""
    return lambda firsts, seconds, bud, macs: [rule(a, b, bud, macs) for a, b in zip(firsts, seconds)]


def pooled(policies: Sequence[str] = POLICIES) -> Rule:
    """The pooled scope: the population's choice on all choice halves, fitted to each client's budget."""
    return lambda firsts, seconds, bud, macs: choose_all(firsts, [bud] * len(firsts), macs, policies)[0]


def pooled_hindsight_fit(firsts: Sequence[Split], seconds: Sequence[Split], bud: Budget,
                         macs: Sequence[int]) -> list[Choice]:
    """The pooled population choice (on the choice halves), each client's θ then fitted on its scoring
    half itself without margin: the pooled rule (which only lowers θ under a MACs budget) with
    perfect knowledge of every client's MACs."""
    population = population_choices(firsts, [bud], macs)[bud]
    return [fit_to_budget(population, b, bud, macs, confidence=0.5) for b in seconds]


RULES: dict[str, Rule] = {
    "pooled": pooled(),
    "pooled-max-softmax": pooled(("max-softmax",)),
    "client": per_client(lambda a, b, bud, macs: choose_policy(a, bud, macs)),
    "max-softmax": per_client(lambda a, b, bud, macs: choose_policy(a, bud, macs, ("max-softmax",), False)),
    "quarter": per_client(lambda a, b, bud, macs: choose_policy(Split(a.logits[:, : a.n // 2], a.y[: a.n // 2]),
                                                               bud, macs)),
    "cheapest-near-tie": per_client(lambda a, b, bud, macs: cheapest_near_tie(a, bud, macs)),
    "hindsight": per_client(lambda a, b, bud, macs: choose_policy(b, bud, macs, confidence=0.5)),
    "pooled-hindsight-fit": pooled_hindsight_fit,
}


def global_table(splits: Sequence[Split], macs: Sequence[int]) -> list[dict]:
    """The pooled max-softmax accuracy-vs-MACs curve of ``splits`` (as ``cafedist eval``)."""
    total = None
    for s in splits:
        c = dynamic_counts(s.logits.argmax(-1), exit_scores(s.logits, "max-softmax"), s.y, macs)
        total = c if total is None else {k: total[k] + c[k] for k in c}
    return dynamic_table(total, macs)


def score(choices: Sequence[Choice], halves: Sequence[Split], macs: Sequence[int],
          budget: Budget) -> tuple[float, float, float]:
    """(gap to the global curve in points, MACs share, share of clients within budget) on ``halves``."""
    results = [apply_choice(c, s, macs) for c, s in zip(choices, halves)]
    n = sum(r.n for r in results)
    accuracy, mean_macs = sum(r.correct for r in results) / n, sum(r.macs for r in results) / n
    within = [r.macs / r.n <= budget.macs_limit(macs[-1]) for r in results if r.n]
    gap = 100 * (accuracy - accuracy_at_macs(global_table(halves, macs), mean_macs)["accuracy"])
    return gap, mean_macs / macs[-1], sum(within) / len(within)


def halves(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample positions 0..n-1 split at random into two halves (the first gets n // 2)."""
    perm = torch.randperm(n, generator=g)
    return perm[: n // 2], perm[n // 2:]


def macs_budget(parser: argparse.ArgumentParser, text: str) -> Budget:
    """``--budget``: a ``macs=F`` spec (the scoring reads MACs budgets only)."""
    budget = parse_budget_spec(text)
    if budget.kind != "macs":
        parser.error(f"--budget: expected macs=F (these experiments score MACs budgets only), got {text!r}")
    return budget


def main(rules: dict[str, Rule] = RULES, description: str = __doc__) -> None:
    """Every rule of ``rules`` on ``--repeats`` random halvings of each run's calibration splits; prints per
    run and overall (other experiments pass their own rules and docstring)."""
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="finished run directories trained with data.val_fraction > 0")
    parser.add_argument("--budget", default="macs=0.5")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    budget = macs_budget(parser, args.budget)
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in rules}
    for run_dir in args.runs:
        try:
            with load_run(run_dir) as loaded:
                cals, macs = [cal for cal, _test in client_splits(loaded.run)], list(loaded.run.macs)
        except CafeError as exc:  # not a finished run directory: one line
            parser.error(str(exc))
        for rep in range(args.repeats):
            g = torch.Generator().manual_seed(rep)
            first, second = [], []
            for cal in cals:
                a, b = halves(cal.n, g)
                first.append(Split(cal.logits[:, a], cal.y[a]))
                second.append(Split(cal.logits[:, b], cal.y[b]))
            for name, rule in rules.items():
                results[name].append(score(rule(first, second, budget, macs), second, macs, budget))
        print(run_dir, {k: round(statistics.mean(r[0] for r in v[-args.repeats:]), 2) for k, v in results.items()},
              flush=True)
    print_table(results)


def print_table(results: dict[str, list[tuple[float, float, float]]]) -> None:
    """Each rule's mean gap ± standard error, MACs share and share within budget over all halvings."""
    width = max(len(name) for name in results) + 2
    print(f"{'rule':{width}s} {'gap (points)':>16s} {'MACs share':>11s} {'within':>7s}")
    for name, rows in results.items():
        gap, sem = mean_se([r[0] for r in rows])
        print(f"{name:{width}s} {gap:+8.2f} ± {sem:5.2f} {statistics.mean(r[1] for r in rows):11.3f} "
              f"{statistics.mean(r[2] for r in rows):7.2f}")


if __name__ == "__main__":
    main()
