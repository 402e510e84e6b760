"""Personalized dynamic inference: each client's most accurate exit policy within its budget.

For every client, on its **calibration split** (the validation split, ``data.val_fraction``)
and never on its test split. Two scopes decide where the policy comes from:

- ``pooled`` (the default): the (policy, temperatures, θ) is chosen once for the population
  by the search (:func:`~cafedist.eval.budget_search.choose_policy`) on all clients'
  calibration splits pooled (per distinct budget), then each client keeps it or moves θ just
  far enough that its **own** budget holds on its own calibration split
  (:func:`~cafedist.eval.budget_search.fit_to_budget`: under a MACs budget the largest θ <=
  the pooled one, under a loss budget the smallest θ >= it). Every client gets a threshold of
  its own, and the choices that need data (which policy, which temperatures) are made on 10×
  more of it: on calibration splits of 7–50 samples the per-client search loses about half a
  point to estimation noise, the pooled one does not (docs/METHOD.md, "Against the global
  threshold");
- ``client``: the search runs on each client's calibration split alone.

The chosen policy is then applied once to the client's test split, which reports its
accuracy, its MACs and whether the budget held there (:mod:`cafedist.eval.budget_report`),
beside two global thresholds (:mod:`cafedist.eval.budget_global`).

A client without calibration samples gets a static exit that needs no calibration and
still honours its budget — the last exit under a loss budget, the deepest exit within a
MACs budget — with a warning and ``fallback`` set in its row (in both scopes: without its
own samples nothing can check that a pooled threshold keeps its budget). A run without any
validation split is refused (see :func:`~cafedist.eval.budget_run.run_budget`): every client
would be such a fallback.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from cafedist.eval.budget_global import PooledCalibration
from cafedist.eval.budget_report import apply_choice, client_curve, client_row, summarize
from cafedist.eval.budget_search import DEFAULT_CONFIDENCE, Choice, Split, choose_policy, fit_to_budget, pooled_split
from cafedist.eval.budget_spec import Budget
from cafedist.eval.policies import POLICIES

log = logging.getLogger("cafedist")

#: the search's version: bump it when :func:`~cafedist.eval.budget_search.choose_policy`
#: chooses differently or the budget section holds something new, so that the results
#: ``cafedist compare`` keeps per run (cafedist.compare.budgets) are recomputed (3:
#: ``global_on_calibration``; 4: ``global_within_every_budget``)
SEARCH_VERSION = 4
#: where a client's policy is chosen (module docstring); the first is the default
SCOPES: tuple[str, ...] = ("pooled", "client")


def population_choices(cals: Sequence[Split], budgets: Sequence[Budget], macs_per_exit: Sequence[int],
                       policies: Sequence[str] = POLICIES, temperature: bool = True,
                       confidence: float = DEFAULT_CONFIDENCE, pooled: Split | None = None) -> dict[Budget, Choice]:
    """The pooled scope's population choice for each distinct budget: :func:`choose_policy`
    on every client's calibration samples together (a client with none adds nothing);
    ``pooled``: those samples already pooled (:func:`pooled_split` of ``cals``)."""
    pooled = pooled_split(cals) if pooled is None else pooled
    return {b: choose_policy(pooled, b, macs_per_exit, policies, temperature, confidence)
            for b in dict.fromkeys(budgets)}


def choose_all(cals: Sequence[Split], budgets: Sequence[Budget], macs_per_exit: Sequence[int],
               policies: Sequence[str] = POLICIES, temperature: bool = True, confidence: float = DEFAULT_CONFIDENCE,
               scope: str = SCOPES[0], pooled: Split | None = None) -> tuple[list[Choice], dict[Budget, Choice]]:
    """Every client's choice under ``scope`` (module docstring) from its calibration split
    ``cals[cid]`` and budget, and the population's choice per budget (empty for "client");
    ``pooled``: as for :func:`population_choices`."""
    if scope not in SCOPES:
        raise ValueError(f"unknown policy scope {scope!r}; expected one of {', '.join(SCOPES)}")
    if scope == "client":
        return [choose_policy(cal, b, macs_per_exit, policies, temperature, confidence)
                for cal, b in zip(cals, budgets)], {}
    population = population_choices(cals, budgets, macs_per_exit, policies, temperature, confidence, pooled)
    fitted = [fit_to_budget(population[b], cal, b, macs_per_exit, confidence) for cal, b in zip(cals, budgets)]
    return fitted, population


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
    confidence: float = DEFAULT_CONFIDENCE,
    scope: str = SCOPES[0],
) -> tuple[dict[str, Any], list[list[dict]]]:
    """Choose, check and report every client's policy: ``splits[cid] = (calibration, test)``;
    ``scope`` "pooled" or "client" (module docstring).

    Returns the ``budget`` section of eval.json (``clients``: one row per client, and the
    overall numbers; under the pooled scope also ``population``: the pooled choice per budget;
    ``global_on_calibration``: :meth:`~cafedist.eval.budget_global.PooledCalibration.on_calibration`
    when every client has the same budget, else None; ``global_within_every_budget``:
    :meth:`~cafedist.eval.budget_global.PooledCalibration.within_every_budget`) and each
    client's test curve for the figure.
    """
    if len(splits) != len(budgets):
        raise ValueError(f"{len(splits)} clients but {len(budgets)} budgets")
    calibration = PooledCalibration(splits, macs_per_exit, confidence)
    choices, population = choose_all([cal for cal, _ in splits], budgets, macs_per_exit, policies, temperature,
                                     confidence, scope, calibration.pooled)
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
    section["global_on_calibration"] = calibration.on_calibration(budgets[0]) if uniform else None
    # the alternative at equal per-client budgets: one threshold low enough for every client's budget
    section["global_within_every_budget"] = calibration.within_every_budget(budgets)
    return section, curves


__all__ = ["SCOPES", "SEARCH_VERSION", "choose_all", "personalized_budgets", "population_choices"]
