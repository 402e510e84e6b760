"""Personalized budgets (issue 12): exit policies, temperature scaling, the threshold search,
budget specs and files, and ``cafedist eval --budget`` end to end."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY
from conftest import cafedist_in_process as in_process

from cafedist.errors import ConfigError
from cafedist.eval.budget import choose_all, personalized_budgets
from cafedist.eval.budget_global import global_on_calibration, global_within_every_budget
from cafedist.eval.budget_report import TestCounts, accuracy_at_macs, client_row
from cafedist.eval.budget_run import BudgetOptions, format_budget, parse_policies, write_budget_csv
from cafedist.eval.budget_search import (
    CandidateStats,
    Choice,
    Split,
    choose_policy,
    fit_to_budget,
    pooled_split,
    static_fallback,
)
from cafedist.eval.budget_spec import Budget, check_feasible, parse_budget_spec
from cafedist.eval.policies import BETA_MAX, BETA_MIN, exit_scores, fit_temperatures

MACS = [1, 2]  # two exits: answering at exit 2 costs twice exit 1


def _logits(probs: list[list[list[float]]]) -> torch.Tensor:
    """[m][N][C] probabilities -> logits whose softmax gives them back."""
    return torch.tensor(probs, dtype=torch.float64).clamp_min(1e-12).log()


def _split(exit1: list[list[float]], y: list[int]) -> Split:
    """Exit 1 with the given probabilities; exit 2 always right and sure."""
    classes = len(exit1[0])
    exit2 = [[0.98 if c == label else 0.02 / (classes - 1) for c in range(classes)] for label in y]
    return Split(_logits([exit1, exit2]), torch.tensor(y))


# ----------------------------------------------------------------------------- policies
def test_scores_of_each_policy_on_known_distributions():
    logits = _logits([[[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.3, 0.2]]])
    soft = exit_scores(logits, "max-softmax")[0]
    ent = exit_scores(logits, "entropy")[0]
    margin = exit_scores(logits, "margin")[0]
    assert soft.tolist() == pytest.approx([1.0, 1 / 3, 0.5])
    assert ent[0] == pytest.approx(1.0) and ent[1] == pytest.approx(0.0, abs=1e-9)
    h = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert ent[2] == pytest.approx(1 - h / math.log(3))
    assert margin.tolist() == pytest.approx([1.0, 0.0, 0.2])
    with pytest.raises(ValueError, match="unknown exit policy"):
        exit_scores(logits, "variance")


def test_temperature_fit_recovers_the_temperature_that_made_the_labels():
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(2, 20000, 5, generator=g, dtype=torch.float64)
    y = torch.multinomial((z[0] / 2.0).softmax(-1), 1, generator=g).squeeze(1)  # exit 1: T = 2
    z[1] = z[0] * 0.5  # exit 2 = exit 1's logits already divided by 2: T = 1
    temps = fit_temperatures(z, y)
    assert temps[0] == pytest.approx(2.0, rel=0.05)
    assert temps[1] == pytest.approx(1.0, rel=0.05)
    assert torch.equal(temps, fit_temperatures(z, y))  # deterministic


def test_temperature_fit_is_bounded_and_neutral_without_data():
    separable = torch.tensor([[[5.0, -5.0], [-5.0, 5.0]]])  # NLL -> 0 as T -> 0: sharpen, within the bound
    assert 1 / BETA_MAX <= fit_temperatures(separable, torch.tensor([0, 1]))[0] < 0.5
    always_wrong = torch.tensor([[[5.0, -5.0], [-5.0, 5.0]]])  # NLL falls as T grows: stops at the bound
    assert fit_temperatures(always_wrong, torch.tensor([1, 0]))[0] == pytest.approx(1 / BETA_MIN, rel=1e-6)
    assert fit_temperatures(torch.zeros(3, 0, 4), torch.zeros(0, dtype=torch.long)).tolist() == [1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------- the threshold search
def test_search_sends_exactly_the_wrong_early_answers_deeper():
    # exit 1 is right on samples 0, 1 and wrong on 2, 3 (least confident); exit 2 is always right.
    cal = _split([[0.95, 0.05], [0.9, 0.1], [0.6, 0.4], [0.7, 0.3]], [0, 0, 1, 1])
    choice = choose_policy(cal, Budget("macs", 0.75), MACS, policies=["max-softmax"], temperature=False,
                           confidence=0.5)
    # optimum: θ in (0.7, 0.9] -> samples 2 and 3 at exit 2: accuracy 1, 1.5 MACs = 0.75 of the last exit
    assert choice.policy == "max-softmax" and 0.7 < choice.threshold <= 0.9
    assert choice.calibration_accuracy == 1.0 and choice.calibration_macs == 1.5
    # a tighter budget affords no sample at exit 2: everything leaves at exit 1
    tight = choose_policy(cal, Budget("macs", 0.6), MACS, policies=["max-softmax"], temperature=False,
                          confidence=0.5)
    assert tight.calibration_macs == 1.0 and tight.calibration_accuracy == 0.5


def test_search_picks_the_policy_that_ranks_the_mistakes_lowest():
    # sample 0: exit 1 torn between two classes (wrong), yet the higher max-softmax;
    # sample 1: exit 1 right with a clear margin. Only `margin` sends sample 0 deeper.
    cal = _split([[0.5, 0.5, 0.0], [0.45, 0.275, 0.275]], [1, 0])
    choice = choose_policy(cal, Budget("macs", 0.75), MACS, temperature=False, confidence=0.5)
    assert choice.policy == "margin" and choice.calibration_accuracy == 1.0


def test_loss_budget_takes_the_cheapest_policy_within_the_loss():
    cal = _split([[0.95, 0.05], [0.9, 0.1], [0.6, 0.4], [0.7, 0.3]], [0, 0, 1, 1])
    none_lost = choose_policy(cal, Budget("loss", 0.0), MACS, policies=["max-softmax"], temperature=False,
                              confidence=0.5)
    assert none_lost.calibration_accuracy == 1.0 and none_lost.calibration_macs == 1.5
    half_lost = choose_policy(cal, Budget("loss", 50.0), MACS, policies=["max-softmax"], temperature=False,
                              confidence=0.5)
    assert half_lost.calibration_macs == 1.0  # everything at exit 1 costs 50 points: allowed


def test_the_confidence_margin_keeps_a_distance_from_the_budget():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(200, generator=g, dtype=torch.float64) * 0.5 + 0.5
    labels = (torch.rand(200, generator=g, dtype=torch.float64) >= probs).long()  # exit 1 calibrated
    cal = _split([[p, 1 - p] for p in probs.tolist()], labels.tolist())
    plain = choose_policy(cal, Budget("macs", 0.75), MACS, policies=["max-softmax"], temperature=False,
                          confidence=0.5)
    careful = choose_policy(cal, Budget("macs", 0.75), MACS, policies=["max-softmax"], temperature=False,
                            confidence=0.95)
    assert 1.48 <= plain.calibration_macs <= 1.5  # the plain estimate goes right up to the budget
    # 95 %: mean + 1.645 sd / sqrt(n) within budget, sd of a 0/1-deep cost near 0.5
    assert careful.calibration_macs <= 1.5 - 1.6 * 0.5 / math.sqrt(200)
    assert careful.calibration_accuracy < plain.calibration_accuracy


def test_no_spread_on_a_small_calibration_split_is_not_taken_for_certainty():
    # exit 1 agrees with the last exit on all 10 samples: no observed loss, standard error 0
    cal = _split([[0.9, 0.1]] * 10, [0] * 10)
    plain = choose_policy(cal, Budget("loss", 1.0), MACS, temperature=False, confidence=0.5)
    careful = choose_policy(cal, Budget("loss", 1.0), MACS, temperature=False, confidence=0.95)
    assert plain.calibration_macs == 1.0  # the plain estimate: 0 points lost, everything at exit 1
    assert careful.threshold == 1.0 and careful.calibration_macs == 2.0  # 10 samples cannot certify 1 point
    # the data-independent candidates keep their exact cost: θ = 0 meets a budget of exactly exit 1
    floor = choose_policy(cal, Budget("macs", 0.5), MACS, temperature=False, confidence=0.95)
    assert floor.calibration_macs == 1.0 and floor.fallback is None


def test_equally_accurate_candidates_spend_the_macs_budget_and_go_to_the_first_policy_unscaled():
    # every exit is always right: every candidate is equally accurate, so the MACs budget decides
    # (spend more of it: all at exit 2), then the policy order (max-softmax, unscaled), then θ
    cal = _split([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]], [0, 0, 0])
    choice = choose_policy(cal, Budget("macs", 1.0), MACS, confidence=0.5)
    assert (choice.policy, choice.temperatures, choice.calibration_macs) == ("max-softmax", None, 2.0)
    assert choice.exits(cal).tolist() == [1, 1, 1] and choice.threshold <= 0.95  # the smallest such θ


def test_ties_between_candidates_break_as_documented():
    """Under a MACs budget the most accurate, then the one spending more; under a loss budget the
    cheapest, then the more accurate; then the smaller θ."""
    th = [0.1, 0.2, 0.3, 0.4]
    stats = CandidateStats(th, accuracy=torch.tensor([0.5, 0.75, 0.75, 0.75], dtype=torch.float64),
                           macs=torch.tensor([1.0, 1.2, 1.5, 1.5], dtype=torch.float64),
                           macs_ub=torch.zeros(4, dtype=torch.float64), loss_ub=torch.zeros(4, dtype=torch.float64))
    every = torch.ones(4, dtype=torch.bool)
    assert stats.best(every, "macs")[1] == 2  # 0.75 at 1.5 MACs beats 0.75 at 1.2; θ 0.3 before 0.4
    cheap = CandidateStats(th, accuracy=torch.tensor([1.0, 0.5, 0.75, 0.75], dtype=torch.float64),
                           macs=torch.tensor([2.0, 1.5, 1.5, 1.5], dtype=torch.float64),
                           macs_ub=torch.zeros(4, dtype=torch.float64), loss_ub=torch.zeros(4, dtype=torch.float64))
    assert cheap.best(every, "loss")[1] == 2  # 1.5 MACs at 0.75 beats 1.5 at 0.5; θ 0.3 before 0.4
    assert cheap.best(torch.tensor([True, False, False, False]), "loss")[1] == 0


def test_saturated_early_answers_may_leave_just_below_threshold_1():
    """A float64 softmax reaches exactly 1.0 at logit margins ~37; θ = 1 lets nothing leave,
    so the search also tries the largest float below 1, which lets just these leave."""
    exit1 = [[50.0, 0.0], [10.0, 0.0]]  # sure and right (score 1.0), very sure but wrong (0.99995)
    exit2 = [[8.0, 0.0], [0.0, 8.0]]  # always right
    cal = Split(torch.tensor([exit1, exit2], dtype=torch.float64), torch.tensor([0, 1]))
    choice = choose_policy(cal, Budget("loss", 0.0), MACS, policies=["max-softmax"], temperature=False,
                           confidence=0.5)
    assert choice.threshold < 1.0 and choice.exits(cal).tolist() == [0, 1]
    assert (choice.calibration_accuracy, choice.calibration_macs) == (1.0, 1.5)


def test_fitted_temperatures_are_chosen_when_they_rank_the_mistakes_lower():
    """Scaling reorders max-softmax scores: at T = 1 the wrong answers [1.5, 0, -10] (0.82) look
    surer than the right ones [2, 0, 0] (0.79); at the fitted T (about 0.6) they do not (0.93 > 0.92)."""
    exit1 = [[2.0, 0.0, 0.0]] * 20 + [[1.5, 0.0, -10.0]] * 2
    y = [0] * 20 + [1] * 2
    exit2 = [[8.0 if c == label else 0.0 for c in range(3)] for label in y]  # always right
    cal = Split(torch.tensor([exit1, exit2], dtype=torch.float64), torch.tensor(y))
    unscaled = choose_policy(cal, Budget("loss", 0.0), MACS, policies=["max-softmax"], temperature=False,
                             confidence=0.5)
    assert unscaled.calibration_macs == 2.0  # any θ that lets a right answer leave lets the wrong ones leave
    scaled = choose_policy(cal, Budget("loss", 0.0), MACS, policies=["max-softmax"], confidence=0.5)
    assert scaled.temperatures is not None and scaled.temperatures[0] < 0.72
    assert scaled.exits(cal).tolist() == [0] * 20 + [1] * 2 and scaled.calibration_accuracy == 1.0


def test_a_macs_budget_of_exactly_an_exits_share_admits_that_exit():
    """0.58 x 50 is 28.999999999999996 in floats: exit 2 costing 29 of 50 must fit macs=0.58."""
    assert Budget("macs", 0.58).holds(29.0, 0.0, 50.0)
    assert static_fallback(Budget("macs", 0.58), [10, 29, 50], "no calibration samples").static_exit == 1
    cal = _split([[0.9, 0.1]] * 4, [1] * 4)
    floor = choose_policy(cal, Budget("macs", 0.58), [29, 50], confidence=0.5)  # exactly exit 1
    assert floor.fallback is None and floor.calibration_macs == 29.0


# ----------------------------------------------------------------------------- the pooled scope
def test_pooled_threshold_moves_only_as_far_as_each_clients_budget_needs():
    population = Choice(policy="max-softmax", threshold=0.8)
    budget = Budget("macs", 0.75)  # at most 1.5 MACs per sample: two of four samples at exit 2
    # θ = 0.8 sends samples 2 and 3 deeper: within this client's budget, kept as it is
    fits = _split([[0.95, 0.05], [0.9, 0.1], [0.6, 0.4], [0.7, 0.3]], [0, 0, 1, 1])
    kept = fit_to_budget(population, fits, budget, MACS, confidence=0.5)
    assert (kept.policy, kept.threshold, kept.calibration_macs) == ("max-softmax", 0.8, 1.5)
    # here θ = 0.8 would send three deeper; the largest θ below it that sends two is 0.75
    # (the score of sample 1, which then leaves at exit 1)
    costly = _split([[0.95, 0.05], [0.75, 0.25], [0.6, 0.4], [0.7, 0.3]], [0, 0, 1, 1])
    moved = fit_to_budget(population, costly, budget, MACS, confidence=0.5)
    assert moved.threshold == pytest.approx(0.75) and (moved.calibration_macs, moved.calibration_accuracy) == (1.5, 1.0)


def test_pooled_threshold_under_a_loss_budget_rises_until_no_answer_is_lost():
    # exit 1 is wrong on sample 3 (score 0.7); θ = 0.65 answers it there: 25 points lost
    cal = _split([[0.95, 0.05], [0.9, 0.1], [0.6, 0.4], [0.7, 0.3]], [0, 0, 1, 1])
    choice = fit_to_budget(Choice(policy="max-softmax", threshold=0.65), cal, Budget("loss", 0.0), MACS,
                           confidence=0.5)
    assert 0.7 < choice.threshold <= 0.9  # the smallest θ above 0.7 that keeps sample 1 at exit 1
    assert choice.calibration_accuracy == 1.0 and choice.calibration_macs == 1.5


def test_pooled_scope_chooses_once_on_all_calibration_samples_and_fits_each_client():
    clients = _synthetic_clients(6, seed=3)
    macs = [1, 3, 6]
    budgets = [Budget("macs", 0.5)] * 4 + [Budget("macs", 0.8)] * 2
    table = [{"threshold": 1.0, "accuracy": 1.0, "mean_macs": 6.0}]
    section, _ = personalized_budgets(clients, budgets, macs, table, scope="pooled")
    pooled = pooled_split([cal for cal, _ in clients])
    for budget in (Budget("macs", 0.5), Budget("macs", 0.8)):  # one population choice per distinct budget
        expected = choose_policy(pooled, budget, macs)
        assert section["population"][budget.spec]["policy"] == expected.policy
        assert section["population"][budget.spec]["threshold"] == expected.threshold
    for budget, row in zip(budgets, section["clients"]):
        population = section["population"][budget.spec]
        assert row["policy"] == population["policy"] and row["threshold"] <= population["threshold"]
        assert row["calibration_macs_fraction"] <= budget.value + 1e-9
    by_client, _ = personalized_budgets(clients, budgets, macs, table, scope="client")
    assert "population" not in by_client and by_client["scope"] == "client"
    assert [r["threshold"] for r in by_client["clients"]] == [
        choose_policy(cal, b, macs).threshold for (cal, _), b in zip(clients, budgets)]
    with pytest.raises(ValueError, match="unknown policy scope 'global'"):
        personalized_budgets(clients, budgets, macs, table, scope="global")


def test_pooled_scope_fits_each_client_from_the_population_choice_of_its_own_budget():
    clients = _synthetic_clients(4, seed=3)
    macs = [1, 3, 6]
    budgets = [Budget("macs", 0.4), Budget("macs", 0.4), Budget("macs", 0.9), Budget("macs", 0.9)]
    choices, population = choose_all([cal for cal, _ in clients], budgets, macs, confidence=0.5)
    pooled = pooled_split([cal for cal, _ in clients])
    assert population == {b: choose_policy(pooled, b, macs, confidence=0.5) for b in set(budgets)}
    assert population[budgets[0]].threshold != population[budgets[2]].threshold  # the budgets matter
    assert choices == [fit_to_budget(population[b], cal, b, macs, confidence=0.5)
                       for (cal, _), b in zip(clients, budgets)]


def test_global_threshold_on_calibration_is_judged_against_each_clients_own_budget():
    easy = _split([[0.95, 0.05]] * 4, [0, 0, 0, 0])  # exit 1 sure and right
    hard = _split([[0.6, 0.4]] * 4, [1, 1, 1, 1])  # exit 1 unsure and wrong
    budget = Budget("macs", 0.75)  # at most 1.5 MACs per sample
    table = [{"threshold": 1.0, "accuracy": 1.0, "mean_macs": 2.0}]
    section, _ = personalized_budgets([(easy, easy), (hard, hard)], [budget] * 2, MACS, table, confidence=0.5)
    fair = section["global_on_calibration"]
    # pooled, a threshold in (0.6, 0.95] answers everything right at 1.5 MACs on average: within the
    # budget of the population, but the hard client pays 2 MACs per sample, over its own budget
    assert 0.6 < fair["threshold"] <= 0.95
    assert (fair["accuracy"], fair["mean_macs"], fair["macs_fraction"]) == (1.0, 1.5, 0.75)
    assert (fair["clients_within_budget"], fair["share_within_budget"]) == (1, 0.5)
    # the personalized policies keep both clients within budget
    assert section["clients_within_budget"] == 2
    # one threshold that keeps the hard client's budget too sends everything to exit 1
    everyone = section["global_within_every_budget"]
    assert everyone["threshold"] <= 0.6
    assert (everyone["accuracy"], everyone["macs_fraction"], everyone["clients_within_budget"]) == (0.5, 0.5, 2)
    mixed, _ = personalized_budgets([(easy, easy), (hard, hard)], [budget, Budget("macs", 1.0)], MACS, table,
                                    confidence=0.5)
    assert mixed["global_on_calibration"] is None  # "the same budget" is undefined when budgets differ
    # defined when budgets differ: the hard client may spend all of exit 2 now, so θ may be high
    assert mixed["global_within_every_budget"]["clients_within_budget"] == 2
    lines = format_budget({**mixed, "spec": "budgets.csv"})
    assert "  one global threshold chosen on calibration: not compared (the clients' budgets differ)" in lines
    assert lines[-1].startswith("  one global threshold that keeps every client's budget on calibration: "
                                "accuracy 100.00% at 75.0% of the last exit's MACs, 2/2 clients")
    assert format_budget({**section, "spec": "macs=0.75"})[-2].startswith(
        "  one global threshold chosen on calibration (no per-client budgets): accuracy 100.00% at 75.0%")
    empty = Split(torch.zeros(2, 0, 2), torch.zeros(0, dtype=torch.long))
    assert global_on_calibration([(empty, easy), (empty, hard)], budget, MACS) is None  # nothing to choose on


def test_global_threshold_within_every_budget_is_the_best_one_every_client_can_afford():
    easy = _split([[0.7, 0.3]] * 4, [0, 0, 0, 0])  # exit 1 right at confidence 0.7
    hard = _split([[0.9, 0.1]] * 2 + [[0.6, 0.4]] * 2, [0, 0, 1, 1])  # sure and right, or unsure and wrong
    budget = Budget("macs", 0.75)  # at most 1.5 MACs per sample, for each client
    # θ in (0.6, 0.7]: the hard client's unsure half goes deeper (1.5 MACs), the easy client stays at
    # exit 1: all right; a higher θ sends the easy client deeper (2 MACs), a lower one loses 2 samples
    everyone = global_within_every_budget([(easy, easy), (hard, hard)], [budget] * 2, MACS, confidence=0.5)
    assert 0.6 < everyone["threshold"] <= 0.7
    assert (everyone["accuracy"], everyone["mean_macs"], everyone["clients_within_budget"]) == (1.0, 1.25, 2)
    # a client without calibration samples constrains nothing (and is judged on test all the same)
    empty = Split(torch.zeros(2, 0, 2), torch.zeros(0, dtype=torch.long))
    alone = global_within_every_budget([(easy, easy), (empty, hard)], [budget] * 2, MACS, confidence=0.5)
    assert alone["threshold"] == global_within_every_budget([(easy, easy)], [budget], MACS, confidence=0.5)["threshold"]
    assert (alone["accuracy"], alone["clients_within_budget"]) == (0.75, 2)  # θ <= 0.6: all at exit 1
    # budgets of both kinds cannot share one rule; nothing to choose on without calibration samples
    assert global_within_every_budget([(easy, easy), (hard, hard)], [budget, Budget("loss", 1.0)], MACS) is None
    assert global_within_every_budget([(empty, easy), (empty, hard)], [budget] * 2, MACS) is None
    # a non-finite score never exits early: with exit 1's cost as the budget no threshold is feasible
    broken = Split(easy.logits.clone(), easy.y)
    broken.logits[0, 0] = float("nan")
    assert global_within_every_budget([(easy, easy), (broken, easy)], [Budget("macs", 0.5)] * 2, MACS) is None
    # the same through eval's entry point (pooled scope): every client falls back to a static exit
    section, _ = personalized_budgets([(easy, easy), (broken, easy)], [Budget("macs", 0.5)] * 2, MACS,
                                      [{"threshold": 1.0, "accuracy": 1.0, "mean_macs": 2.0}])
    assert [r["static_exit"] for r in section["clients"]] == [1, 1] and section["clients_within_budget"] == 2
    assert "not compared" in format_budget({**section, "spec": "macs=0.5"})[-2]


def test_client_without_calibration_data_gets_a_static_exit_that_keeps_its_budget(caplog):
    empty = Split(torch.zeros(3, 0, 2), torch.zeros(0, dtype=torch.long))
    test = Split(_logits([[[0.9, 0.1]], [[0.9, 0.1]], [[0.9, 0.1]]]), torch.tensor([0]))
    macs = [1, 2, 4]
    table = [{"threshold": 1.0, "accuracy": 1.0, "mean_macs": 4.0, "last_exit_macs": 4.0}]
    with caplog.at_level("WARNING", logger="cafedist"):
        section, curves = personalized_budgets([(empty, test), (empty, test)],
                                               [Budget("macs", 0.5), Budget("loss", 1.0)], macs, table)
    first, second = section["clients"]
    assert (first["policy"], first["static_exit"], first["fallback"]) == ("static", 2, "no calibration samples")
    assert first["test_macs_fraction"] == 0.5 and first["within_budget"] is True
    assert (second["static_exit"], second["within_budget"]) == (3, True)  # loss budget: the last exit
    assert section["fallback_clients"] == [0, 1] and curves == [[], []]
    assert "client 0: no calibration samples" in caplog.text


def test_printed_fallbacks_say_why_each_client_got_a_static_exit():
    """A client with calibration samples whose scores are not finite (NaN logits at exit 1)
    also gets a static exit: eval must not print that it had no calibration samples."""
    empty = Split(torch.zeros(2, 0, 2), torch.zeros(0, dtype=torch.long))
    nan = Split(torch.full((2, 3, 2), float("nan"), dtype=torch.float64), torch.tensor([0, 1, 0]))
    test = Split(_logits([[[0.9, 0.1]], [[0.9, 0.1]]]), torch.tensor([0]))
    table = [{"threshold": 1.0, "accuracy": 1.0, "mean_macs": 2.0, "last_exit_macs": 2.0}]
    section, _ = personalized_budgets([(empty, test), (nan, test), (empty, test)], [Budget("macs", 0.5)] * 3,
                                      MACS, table, scope="client")
    assert [r["fallback"] for r in section["clients"]] == ["no calibration samples", "no feasible policy on "
                                                           "calibration", "no calibration samples"]
    lines = [line for line in format_budget({**section, "spec": "macs=0.5"}) if "static fallback" in line]
    assert lines == ["  static fallback (no calibration samples) for clients [0, 2]",
                     "  static fallback (no feasible policy on calibration) for clients [1]"]


def test_the_order_policies_are_listed_in_does_not_change_the_choice():
    """``--policies`` names a set: ties between policies go to the POLICIES order however the
    user listed them (margin,max-softmax once chose differently from max-softmax,margin)."""
    assert parse_policies("margin, max-softmax,margin") == ["max-softmax", "margin"]
    assert BudgetOptions("macs=0.5", "margin,max-softmax") == BudgetOptions("macs=0.5", "max-softmax,margin")
    clients = _synthetic_clients(10)
    table = [{"threshold": 1.0, "accuracy": 1.0, "mean_macs": 4000.0, "last_exit_macs": 4000.0}]
    sections = [personalized_budgets(clients, [Budget("macs", 0.6)] * 10, [1000, 2500, 4000], table,
                                     policies=parse_policies(order), temperature=False, confidence=0.5,
                                     scope="client")[0]
                for order in ("max-softmax,entropy,margin", "margin,entropy,max-softmax")]
    assert sections[0] == sections[1]


def test_global_curve_is_read_at_the_same_mean_macs():
    table = [{"threshold": 0.5, "accuracy": 0.6, "mean_macs": 1.0},
             {"threshold": 0.9, "accuracy": 0.8, "mean_macs": 3.0},
             {"threshold": 1.0, "accuracy": 0.9, "mean_macs": 4.0}]
    assert accuracy_at_macs(table, 2.0) == {"accuracy": pytest.approx(0.7), "mean_macs": 2.0,
                                            "thresholds": [0.5, 0.9]}
    assert accuracy_at_macs(table, 0.5)["accuracy"] == 0.6  # clamped to the ends
    assert accuracy_at_macs(table, 9.0)["accuracy"] == 0.9


# ----------------------------------------------------------------------------- specs and files
def test_budget_specs_parse_and_bad_ones_say_what_is_expected():
    assert parse_budget_spec("macs=0.5") == Budget("macs", 0.5)
    assert parse_budget_spec(" LOSS = 1 ").spec == "loss=1"
    assert parse_budget_spec("macs=1") == Budget("macs", 1.0) and parse_budget_spec("loss=100").value == 100
    for bad, message in [("macs", "not understood"), ("flops=0.5", "not understood"),
                         ("macs=half", "not a number"), ("macs=0", "0 < F <= 1"), ("loss=-1", "0 <= P <= 100"),
                         ("macs=nan", "not a number"), ("macs=50", "fraction of the last exit's MACs"),
                         ("macs=inf", "not a number"), ("loss=200", "accuracy points"),
                         ("loss=1_0", "'1_0' is not a number")]:  # float() reads 1_0 as 10
        with pytest.raises(ConfigError, match=message):
            parse_budget_spec(bad)
    assert parse_budget_spec("macs=.5").spec == "macs=0.5" and parse_budget_spec("loss=1e-1").value == 0.1
    assert Budget("macs", 0.5000001).spec == "macs=0.5000001"  # distinct budgets keep distinct names


def test_a_budget_spec_is_canonical_and_a_file_named_like_one_is_the_file(tmp_path, monkeypatch):
    assert BudgetOptions("MACS=.50").budget == "macs=0.5" == BudgetOptions("macs=0.5").budget
    # -0 is 0 (float keeps the sign): one budget, named loss=0, not a second one named loss=-0
    assert BudgetOptions("loss=-0").budget == "loss=0" == BudgetOptions("loss=-0.0e3").budget
    monkeypatch.chdir(tmp_path)
    Path("loss=1.csv").write_text("default,macs=0.4\n")
    options = BudgetOptions("loss=1.csv")
    assert options.budget == "loss=1.csv" and options.per_client(2) == [Budget("macs", 0.4)] * 2
    Path("loss=1.csv").unlink()
    assert options.is_file and options.source == "loss=1.csv"  # decided once, when it was read
    Path("macs=0.5").write_text("not a budget file\n")  # a stray file is no budget file
    assert BudgetOptions("macs=0.5").per_client(1) == [Budget("macs", 0.5)]


def test_budget_below_exit_1_is_refused_with_the_floor():
    check_feasible([Budget("macs", 0.25)], [1, 2, 4])  # exactly exit 1: fine
    with pytest.raises(ConfigError, match=r"macs=0.2 is below exit 1's cost \(0.2500 of the last exit's MACs\)"):
        check_feasible([Budget("macs", 0.2)] * 3, [1, 2, 4])
    with pytest.raises(ConfigError, match="^budgets.csv: macs=0.1 for client 1 is below"):
        check_feasible([Budget("loss", 0.0), Budget("macs", 0.1)], [1, 2, 4], "budgets.csv")
    with pytest.raises(ConfigError, match="^--budget: macs=0.1 for clients 1, 2 is below"):
        check_feasible([Budget("loss", 0.0), Budget("macs", 0.1), Budget("macs", 0.2)], [1, 2, 4],
                       "--budget")


def test_a_budget_just_below_exit_1_is_told_apart_from_its_cost():
    """Exit 1 costs 2920/12952 = 0.2254478073 of the last exit: macs=0.2254 is refused, and the
    message must not print both as 0.2254 (nor round the budget up past the cost: 0.225448)."""
    macs = [2920, 8184, 12952]
    with pytest.raises(ConfigError, match=r"macs=0.2254 is below exit 1's cost \(0.22545 of the last"):
        check_feasible([Budget("macs", 0.2254)], macs)
    with pytest.raises(ConfigError, match=r"macs=0.2254478 is below exit 1's cost \(0.22545 of the last"):
        check_feasible([Budget("macs", 0.2254478)], macs)
    check_feasible([Budget("macs", 2920 / 12952)], macs)  # exactly exit 1's cost: fine


def test_budget_csv_file_with_header_comments_and_default(tmp_path):
    path = tmp_path / "budgets.csv"
    path.write_text("client,budget\n# phones\n0,macs=0.4\n\n2,loss=1\ndefault,macs=0.8\n")
    assert BudgetOptions(str(path)).per_client(4) == [Budget("macs", 0.4), Budget("macs", 0.8), Budget("loss", 1.0),
                                             Budget("macs", 0.8)]


def test_a_budget_file_is_read_once_when_the_options_are_made(tmp_path):
    """What eval checks before loading the models is what it evaluates: a file edited (or
    removed) meanwhile changes nothing, and compare keys kept results by the bytes read."""
    path = tmp_path / "budgets.csv"
    path.write_bytes(b"0,macs=0.4\ndefault,loss=1\n")
    options = BudgetOptions(str(path))
    path.unlink()
    assert options.per_client(3) == [Budget("macs", 0.4), Budget("loss", 1.0), Budget("loss", 1.0)]
    assert options.sha256 == hashlib.sha256(b"0,macs=0.4\ndefault,loss=1\n").hexdigest()
    assert BudgetOptions("macs=0.3").per_client(2) == [Budget("macs", 0.3)] * 2
    path.write_text("5,macs=0.4\n")
    with pytest.raises(ConfigError, match=r"budgets.csv: unknown client ids 5 \(this run has clients 0..1\)"):
        BudgetOptions(str(path)).per_client(2)


def test_budget_yaml_file(tmp_path):
    path = tmp_path / "budgets.yaml"
    path.write_text("0: macs=0.4\n1: loss=2\n")
    assert BudgetOptions(str(path)).per_client(2) == [Budget("macs", 0.4), Budget("loss", 2.0)]


@pytest.mark.parametrize("name, text, message", [
    ("b.csv", "client,budget\n0,macs=0.5\n1,macs=lots\n", r"b.csv:3: budget 'macs=lots'"),
    ("b.csv", "0,macs=0.5,extra\n", r"b.csv:1: expected 2 columns"),
    ("b.csv", "zero,macs=0.5\n", r"b.csv:1: client id 'zero' is not an integer"),
    ("b.csv", "0,macs=0.5\n0,loss=1\n", r"b.csv:2: client 0 is given a budget twice \(first at .*b.csv:1\)"),
    ("b.yaml", "0: macs=0.5\n1: [macs=0.5]\n", r"b.yaml:2: expected 'client id: budget'"),
    ("b.yaml", "0: macs=0.5\n  1: x: y\n", r"b.yaml:2: not valid YAML"),
    ("b.yaml", "0: flops=3\n", r"b.yaml:1: budget 'flops=3' not understood"),
    ("b.json", "{}", r"must end in .csv, .yaml or .yml"),
    ("b.csv", "# nothing\n", r"names no client"),
    ("b.csv", "1_0,macs=0.5\n", r"b.csv:1: client id '1_0' is not an integer"),  # int() would read 10
    ("b.csv", "\uff11,macs=0.5\n", r"b.csv:1: client id '\uff11' is not an integer"),  # a full-width 1
])
def test_malformed_budget_files_name_the_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        BudgetOptions(str(path)).per_client(2)


def test_budget_csv_with_a_byte_order_mark(tmp_path):
    """Spreadsheets' "CSV UTF-8" starts with a byte-order mark: the header is still a header."""
    path = tmp_path / "b.csv"
    path.write_bytes("client,budget\n0,macs=0.4\ndefault,macs=0.6\n".encode("utf-8-sig"))
    assert BudgetOptions(str(path)).per_client(2) == [Budget("macs", 0.4), Budget("macs", 0.6)]


def test_budget_csv_holds_the_chosen_policy_exactly(tmp_path):
    """budget.csv's threshold was written in full but its temperatures with 6 digits: the threshold
    is one of the calibration scores under the fitted temperatures, so the rounded ones moved the
    sample that set it to another exit (seen on a 5-client digits run): the table's policy was not
    the one chosen. Every number of a row reads back as the float eval.json holds."""
    temps = (1.2345678901234567, 0.1 + 0.2, 3.0)
    choice = Choice("margin", 0.123456789012345, temperatures=temps, calibration_accuracy=2 / 3,
                    calibration_macs=1.0 / 3)
    row = client_row(0, Budget("macs", 0.5), choice, 3, TestCounts(2, 1.0, 3, 2), [1, 2, 3])
    write_budget_csv([row], tmp_path / "budget.csv")
    with open(tmp_path / "budget.csv", newline="") as fh:
        (read,) = csv.DictReader(fh)
    assert tuple(float(t) for t in read["temperatures"].split(";")) == temps
    assert float(read["threshold"]) == choice.threshold
    assert float(read["calibration_macs_fraction"]) == row["calibration_macs_fraction"]


def test_empty_or_directory_budget_argument_says_so(tmp_path):
    with pytest.raises(ConfigError, match="^--budget: empty; expected a budget spec"):
        BudgetOptions("").per_client(2)
    (tmp_path / "b.csv").mkdir()
    with pytest.raises(ConfigError, match=r"b.csv: a directory; expected a budget spec .* or a .csv/.yaml"):
        BudgetOptions(str(tmp_path / "b.csv")).per_client(2)


def test_budget_file_with_unknown_or_missing_clients(tmp_path):
    path = tmp_path / "b.csv"
    path.write_text("0,macs=0.5\n7,macs=0.5\n")
    with pytest.raises(ConfigError, match=r"unknown client ids 7 \(this run has clients 0..3\)"):
        BudgetOptions(str(path)).per_client(4)
    path.write_text("4,macs=0.5\ndefault,macs=0.6\n")  # ids are 0-based: 4 of 4 clients is none of them
    with pytest.raises(ConfigError, match=r"unknown client ids 4 \(this run has clients 0..3\)"):
        BudgetOptions(str(path)).per_client(4)
    path.write_text("0,macs=0.5\n")
    with pytest.raises(ConfigError, match=r"no budget for clients 1, 2, 3 \(name them or add a 'default'"):
        BudgetOptions(str(path)).per_client(4)
    with pytest.raises(ConfigError, match=r"no budget for client 1 \("):
        BudgetOptions(str(path)).per_client(2)
    with pytest.raises(ConfigError, match="neither a budget spec .* nor an existing file"):
        BudgetOptions(str(tmp_path / "missing.csv")).per_client(4)


# ----------------------------------------------------------------------------- cafedist eval --budget
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two 1-round runs of 4 clients: with a validation split and without one."""
    root = tmp_path_factory.mktemp("budget_runs")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY.format(rounds=1, clients=4, every=1, cache=root / "stores"))
    runs = {}
    for name, frac in (("val", 0.2), ("noval", 0.0)):
        runs[name] = root / name
        in_process("train", "--config", str(cfg), "--out", str(runs[name]), "--no-progress",
                   f"data.val_fraction={frac}", check=True)
    return runs


def test_eval_budget_writes_the_table_csv_and_figure(tiny_runs):
    run = tiny_runs["val"]
    proc = in_process("eval", str(run), "--budget", "macs=0.5", check=True)
    assert "clients within budget on test" in proc.stdout
    assert "personalized policies (pooled scope): accuracy" in proc.stdout
    assert "global threshold at the same mean MACs: accuracy" in proc.stdout
    assert "one global threshold chosen on calibration (no per-client budgets): accuracy" in proc.stdout
    report = json.loads((run / "eval.json").read_text())
    section = report["budget"]
    for key in ("spec", "share_within_budget", "clients_within_budget", "accuracy", "mean_macs", "macs_fraction",
                "client_mean_accuracy", "global_at_same_macs", "global_on_calibration", "confidence", "policies",
                "clients"):
        assert key in section, key
    assert section["spec"] == "macs=0.5" and len(section["clients"]) == 4
    row = section["clients"][0]
    for key in ("policy", "threshold", "temperatures", "calibration_accuracy", "test_accuracy", "test_mean_macs",
                "within_budget"):
        assert key in row, key
    assert 0.0 <= section["share_within_budget"] <= 1.0
    assert {r["policy"] for r in section["clients"]} <= {"max-softmax", "entropy", "margin"}
    with open(run / "budget.csv", newline="") as fh:
        assert [r["client"] for r in csv.DictReader(fh)] == ["0", "1", "2", "3"]
    assert (run / "budget.png").read_bytes()[:4] == b"\x89PNG"
    assert report["paths"]["budget_csv"].endswith("budget.csv")


def _fresh_copy(run: Path, where: Path) -> Path:
    """A copy of the run ``run`` without the outputs of any eval."""
    subprocess.run(["cp", "-a", str(run), str(where)], check=True)
    for name in ("eval.json", "budget.csv", "budget.png"):
        (where / name).unlink(missing_ok=True)
    shutil.rmtree(where / "budget", ignore_errors=True)
    return where


def _report(run: Path) -> dict:
    return json.loads((run / "eval.json").read_text())


def test_eval_keeps_every_budget_evaluated_for_the_models(tiny_runs, tmp_path):
    """A second ``eval --budget`` replaced the first's table, figure and eval.json section: each
    budget is now kept under its own key and files, the most recent also under the current names;
    the same budget again replaces only its own entry (and becomes the most recent)."""
    run = _fresh_copy(tiny_runs["val"], tmp_path / "run")
    in_process("eval", str(run), "--budget", "macs=0.5", check=True)
    first = _report(run)["budget"]
    proc = in_process("eval", str(run), "--budget", "loss=1", check=True)
    assert "keeps the budget evaluated earlier for these models: macs=0.5" in proc.stdout
    report = _report(run)
    assert list(report["budgets"]) == ["macs=0.5", "loss=1"] and report["budget"] == report["budgets"]["loss=1"]
    assert report["budgets"]["macs=0.5"]["clients"] == first["clients"]
    for key, name in (("macs=0.5", "macs-0.5"), ("loss=1", "loss-1")):
        paths = report["budgets"][key]["paths"]
        assert paths == {"budget_csv": str(run.absolute() / "budget" / f"{name}.csv"),
                         "budget_plot": str(run.absolute() / "budget" / f"{name}.png")}
        with open(paths["budget_csv"], newline="") as fh:
            assert {r["budget"] for r in csv.DictReader(fh)} == {key}
        assert Path(paths["budget_plot"]).read_bytes()[:4] == b"\x89PNG"
    # the most recent under the names earlier versions wrote, listed where they listed them
    assert (run / "budget.csv").read_bytes() == (run / "budget" / "loss-1.csv").read_bytes()
    assert (run / "budget.png").read_bytes() == (run / "budget" / "loss-1.png").read_bytes()
    assert report["paths"]["budget_csv"] == str(run.absolute() / "budget.csv")
    in_process("eval", str(run), "--budget", "MACS=.50", check=True)  # the same budget, spelt otherwise
    report = _report(run)
    assert list(report["budgets"]) == ["loss=1", "macs=0.5"] and report["budget"]["spec"] == "macs=0.5"
    assert (run / "budget.csv").read_bytes() == (run / "budget" / "macs-0.5.csv").read_bytes()
    assert sorted(p.name for p in (run / "budget").iterdir()) == ["loss-1.csv", "loss-1.png", "macs-0.5.csv",
                                                                   "macs-0.5.png"]


def test_a_budget_file_is_kept_by_its_path_and_content(tiny_runs, tmp_path):
    run = _fresh_copy(tiny_runs["val"], tmp_path / "run")
    budgets = tmp_path / "my devices.csv"
    budgets.write_text("client,budget\n0,macs=0.5\ndefault,loss=1\n")
    in_process("eval", str(run), "--budget", str(budgets), check=True)
    budgets.write_text("client,budget\n0,macs=0.75\ndefault,loss=1\n")  # edited: another budget
    in_process("eval", str(run), "--budget", str(budgets), check=True)
    report = _report(run)
    digests = [hashlib.sha256(text.encode()).hexdigest() for text in
               ("client,budget\n0,macs=0.5\ndefault,loss=1\n", "client,budget\n0,macs=0.75\ndefault,loss=1\n")]
    assert list(report["budgets"]) == [f"{budgets.resolve()} sha256:{d}" for d in digests]
    assert [e["sha256"] for e in report["budgets"].values()] == digests
    assert [Path(e["paths"]["budget_csv"]).name for e in report["budgets"].values()] == \
        [f"file-my_devices-{d[:12]}.csv" for d in digests]
    assert all(Path(p).is_file() for e in report["budgets"].values() for p in e["paths"].values())


def test_eval_without_budget_keeps_the_budgets_of_the_same_models(tiny_runs, tmp_path):
    """A plain eval dropped the budget section and removed budget.csv/png, although its models
    are the ones the tables describe."""
    run = _fresh_copy(tiny_runs["val"], tmp_path / "run")
    in_process("eval", str(run), "--budget", "macs=0.5", check=True)
    before = _report(run)
    plain = in_process("eval", str(run), check=True)
    assert "keeps the budget evaluated earlier for these models: macs=0.5" in plain.stdout
    assert "clients within budget on test" not in plain.stdout  # this eval evaluated no budget
    assert "budget.csv" not in plain.stdout.splitlines()[-1]  # nor wrote its table
    report = _report(run)
    assert report["budgets"] == before["budgets"] and report["budget"] == before["budget"]
    assert (run / "budget.csv").is_file() and (run / "budget" / "macs-0.5.png").is_file()


@pytest.mark.parametrize("edit", [{"model_hashes": {"0": "0" * 64}}, {"checkpoint": "/x/checkpoints/round_000007"},
                                  {"environment": {"torch": "1.0"}}])
@pytest.mark.parametrize("budget", [[], ["--budget", "loss=1"]])
def test_budgets_of_other_models_are_dropped_with_their_files(tiny_runs, tmp_path, edit, budget):
    """An eval.json whose models (or result-changing environment) are not the ones evaluated
    now: its budgets are not carried into the new one, and their tables and figures go; a
    file of the user's in budget/ that no eval wrote stays."""
    run = _fresh_copy(tiny_runs["val"], tmp_path / "run")
    in_process("eval", str(run), "--budget", "macs=0.5", check=True)
    report = _report(run)
    for key, value in edit.items():
        report[key] = {**report[key], **value} if isinstance(value, dict) and key == "environment" else value
    (run / "eval.json").write_text(json.dumps(report))
    (run / "budget" / "notes.csv").write_text("mine\n")
    proc = in_process("eval", str(run), *budget, check=True)
    assert "dropping the budget tables of an earlier `eval --budget` in eval.json: they describe other models" \
        in proc.stderr
    report = _report(run)
    assert list(report.get("budgets", {})) == (["loss=1"] if budget else [])
    assert not (run / "budget" / "macs-0.5.csv").exists() and not (run / "budget" / "macs-0.5.png").exists()
    assert (run / "budget" / "notes.csv").read_text() == "mine\n"
    assert (run / "budget.csv").exists() == bool(budget) and (run / "budget.png").exists() == bool(budget)


def test_eval_without_budget_removes_a_table_no_entry_describes(tiny_runs, tmp_path):
    """budget.csv/png of an eval.json without kept budgets (an older version's) would describe
    nothing the new eval.json lists; a file of the user's with that name, which no eval wrote, stays."""
    run = _fresh_copy(tiny_runs["val"], tmp_path / "run")
    in_process("eval", str(run), "--budget", "macs=0.5", check=True)
    report = _report(run)
    del report["budgets"]  # as an earlier version wrote it
    (run / "eval.json").write_text(json.dumps(report))
    plain = in_process("eval", str(run), check=True)
    assert not (run / "budget.csv").exists() and not (run / "budget.png").exists()
    assert "removing budget.csv, budget.png of an earlier `eval --budget`" in plain.stderr
    assert "budget" not in _report(run)
    (run / "budget.csv").write_text("client,budget\ndefault,macs=0.5\n")
    in_process("eval", str(run), check=True)
    assert (run / "budget.csv").read_text() == "client,budget\ndefault,macs=0.5\n"


def test_a_failed_eval_leaves_every_output_of_the_run_as_it_was(tiny_runs):
    """eval.json lists budget.csv and budget.png: a failure writing any of them (here the
    figure's name is taken by a directory) must not leave a new table beside the old report."""
    run = tiny_runs["val"]
    in_process("eval", str(run), "--budget", "macs=0.5", check=True)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    (run / "budget.png").unlink()
    (run / "budget.png" / "inside").mkdir(parents=True)
    del before["budget.png"]
    try:
        proc = in_process("eval", str(run), "--budget", "loss=1")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == f"cafedist: error: {run / 'budget.png'}: Is a directory"
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # no temporary file either
    finally:
        (run / "budget.png" / "inside").rmdir()
        (run / "budget.png").rmdir()


def _tree(run: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) below ``run``."""
    return {p.relative_to(run).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(run.rglob("*"))}


@pytest.mark.parametrize("failure", ["refused", "figure name taken", "budget folder there, empty"])
def test_a_failed_eval_budget_creates_no_budget_folder(tiny_runs, tmp_path, failure):
    """A failed ``eval --budget`` on a run without RUN/budget/ (its first) left that folder
    behind, empty: the table's temporary file was made in it before the figure failed. A failed
    command leaves the run directory as it was: no folder it made, and a folder that was there
    before stays (even empty)."""
    run = _fresh_copy(tiny_runs["val"], tmp_path / "run")
    in_process("eval", str(run), check=True)  # an earlier plain eval: eval.json, no budget
    if failure == "budget folder there, empty":
        (run / "budget").mkdir()
    if failure != "refused":
        (run / "budget.png" / "inside").mkdir(parents=True)  # the figure cannot be written
    before = _tree(run)
    proc = in_process("eval", str(run), "--budget", "macs=0.01" if failure == "refused" else "macs=0.5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert _tree(run) == before


def test_eval_refuses_a_budget_file_it_would_overwrite(tiny_runs):
    run = tiny_runs["val"]
    (run / "budget.csv").write_text("client,budget\ndefault,macs=0.5\n")
    proc = in_process("eval", str(run), "--budget", str(run / "budget.csv"))
    assert proc.returncode == 2 and "would overwrite it" in proc.stderr, proc.stderr
    assert (run / "budget.csv").read_text() == "client,budget\ndefault,macs=0.5\n"
    (run / "budget.csv").unlink()


def test_eval_refuses_a_budget_file_among_its_kept_tables(tiny_runs, tmp_path):
    run = _fresh_copy(tiny_runs["val"], tmp_path / "run")
    (run / "budget").mkdir()
    (run / "budget" / "devices.csv").write_text("client,budget\ndefault,macs=0.5\n")
    proc = in_process("eval", str(run), "--budget", str(run / "budget" / "devices.csv"))
    assert proc.returncode == 2 and "eval keeps its per-client tables in budget/" in proc.stderr, proc.stderr
    assert not (run / "eval.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--budget", "macs=0.01"], "macs=0.01 is below exit 1's cost"),
    (["--budget", "macs=lots"], "budget 'macs=lots': 'lots' is not a number"),
    (["--budget", "macs=0.5", "--policies", "softmax"], "--policies: expected a comma-separated subset"),
    (["--budget", "macs=0.5", "--policy-scope", "global"], "--policy-scope: invalid choice: 'global'"),
    (["--budget", "macs=0.5", "--budget", "loss=1"], "--budget: given 2 times; eval takes one"),
    (["--budget", "macs=0.5,loss=1"], "--budget macs=0.5,loss=1: eval takes one budget (cafedist compare takes"),
    (["--budget-confidence", "0.9"], "--budget-confidence: only used with --budget"),
    (["--budget", "macs=0.5", "--policies", ""], "--policies: expected a comma-separated subset"),
    (["--policies", "margin", "--no-temperature", "--policy-scope", "pooled"],
     "--policies, --no-temperature, --policy-scope: only used with --budget"),
])
def test_eval_budget_errors_are_one_line_with_status_2(tiny_runs, args, message):
    proc = in_process("eval", str(tiny_runs["val"]), *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # before loading


def test_eval_budget_file_with_an_unknown_client_is_refused(tiny_runs, tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("0: macs=0.5\n9: macs=0.5\ndefault: loss=1\n")
    proc = in_process("eval", str(tiny_runs["val"]), "--budget", str(path))
    assert proc.returncode == 2 and "unknown client ids 9" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # refused before the checkpoint is loaded


def test_eval_budget_without_a_calibration_split_is_refused(tiny_runs):
    proc = in_process("eval", str(tiny_runs["noval"]), "--budget", "macs=0.5")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "has none (trained with data.val_fraction = 0)" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tiny_runs["noval"] / "budget.csv").exists()


# ----------------------------------------------------------------------------- the figure
def _synthetic_clients(count: int, seed: int = 0) -> list[tuple[Split, Split]]:
    """Clients whose 3 exits get better with depth and whose exit 1 is calibrated-ish."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        splits = []
        for n in (30, 60):
            y = torch.randint(0, 4, (n,), generator=g)
            logits = torch.randn(3, n, 4, generator=g, dtype=torch.float64)
            for k, strength in enumerate((1.0, 2.5, 4.0)):
                logits[k, torch.arange(n), y] += strength * torch.rand(n, generator=g, dtype=torch.float64) * 2
            splits.append(Split(logits, y))
        out.append((splits[0], splits[1]))
    return out


@pytest.mark.parametrize("count", [10, 100])
def test_budget_figure_for_10_and_100_clients(tmp_path, count, saved_figures):
    pytest.importorskip("matplotlib")
    from cafedist.eval.budget_plots import plot_budget
    from cafedist.eval.dynamic import dynamic_counts, dynamic_table

    macs = [1_000, 2_500, 4_000]
    clients = _synthetic_clients(count)
    pooled = [torch.cat([test.logits for _, test in clients], dim=1), torch.cat([test.y for _, test in clients])]
    probs = pooled[0].softmax(-1)
    table = dynamic_table(dynamic_counts(probs.argmax(-1), probs.max(-1).values, pooled[1], macs), macs)
    budgets = [Budget("macs", 0.5) if i % 3 else Budget("loss", 2.0) for i in range(count)]
    section, curves = personalized_budgets(clients, budgets, macs, table)
    section["spec"] = "mixed"
    out = tmp_path / f"budget_{count}.png"
    plot_budget(section, curves, table, out, title=f"{count} synthetic clients")
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert len(curves) == count and all(curves)
    left, right = saved_figures[0].axes
    faint = [line for line in left.get_lines() if line.get_label().startswith("_") and len(line.get_xdata())]
    assert len(faint) == count  # one line per client, at its test curve (% of the last exit's MACs)
    assert faint[0].get_ydata() == pytest.approx([100 * r["accuracy"] for r in curves[0]])
    # readable at 100: one translucent colour for all, so the lines read as a band
    alphas = {line.get_alpha() for line in faint}
    assert (len(alphas), max(alphas)) == ((1, 0.55) if count == 10 else (1, 0.2))
    chosen = [float(v) for c in left.collections if c.get_label().startswith("_") and len(c.get_offsets())
              for v in c.get_offsets()[0]]
    rows = [r for r in section["clients"] if r["within_budget"] is not None]
    assert chosen == pytest.approx([v for r in rows for v in (100 * r["test_macs_fraction"], 100 * r["test_accuracy"])])
    slack = [c.get_offsets()[0][1] for c in right.collections if len(c.get_offsets())]
    assert sorted(slack) == pytest.approx(slack) and len(slack) == len(rows)  # sorted, one per client
    assert len(right.texts) == (count if count <= 20 else 0)  # ids named only where they stay legible


def test_budget_figure_marks_both_overall_results():
    """The left panel marks the per-client policies' overall point and, with one shared budget,
    the calibrated global threshold's, at the numbers eval.json holds."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from cafedist.eval.budget_plots import _draw_curves
    from cafedist.eval.dynamic import dynamic_counts, dynamic_table

    macs = [1_000, 2_500, 4_000]
    clients = _synthetic_clients(4, seed=1)
    logits = torch.cat([test.logits for _, test in clients], dim=1)
    y = torch.cat([test.y for _, test in clients])
    probs = logits.softmax(-1)
    table = dynamic_table(dynamic_counts(probs.argmax(-1), probs.max(-1).values, y, macs), macs)
    section, curves = personalized_budgets(clients, [Budget("macs", 0.5)] * 4, macs, table)
    fair = section["global_on_calibration"]
    fig, ax = plt.subplots()
    try:
        _draw_curves(ax, section, curves, table)
        marks = {c.get_label(): c.get_offsets().tolist() for c in ax.collections if not c.get_label().startswith("_")}
    finally:
        plt.close(fig)
    assert marks["per-client policies, all clients"] == [[pytest.approx(100 * section["macs_fraction"]),
                                                          pytest.approx(100 * section["accuracy"])]]
    label = f"one threshold chosen on calibration ({fair['clients_within_budget']}/4 clients within budget)"
    assert marks[label] == [[pytest.approx(100 * fair["macs_fraction"]), pytest.approx(100 * fair["accuracy"])]]


def test_a_kept_budgets_file_name_stays_in_the_budget_folder():
    """eval removes the tables of budgets it drops by the names their keys give: a key edited by
    hand into eval.json must not name a file outside RUN/budget/, nor a hidden one."""
    from cafedist.eval.budget_keep import budget_key, budget_name

    assert budget_name("macs=0.5") == "macs-0.5" and budget_name("loss=1e-05") == "loss-1e-05"
    assert budget_name(budget_key("/a/my devices.csv", "ab" * 32)) == "file-my_devices-abababababab"
    for key in ("../../config", "/etc/x", "..", ".hidden=1", "/a/b.csv sha256:../../x"):
        name = budget_name(key)
        assert "/" not in name and not name.startswith(".") and name, (key, name)


def test_export_finds_the_one_budget_of_an_eval_json_written_before_budgets_were_kept(tmp_path):
    """An older eval.json has a ``budget`` section but no ``budgets``: asking for its spec in
    another spelling finds it; another spec is one error naming what it holds."""
    from cafedist.errors import ConfigError
    from cafedist.eval.budget_keep import select_budget
    section = {"spec": "macs=0.5", "sha256": None, "clients": []}
    report = {"budget": section}
    assert select_budget(report, "MACS=.50", tmp_path / "eval.json") is section
    with pytest.raises(ConfigError, match="no budget macs=0.25 was evaluated.*holds: macs=0.5"):
        select_budget(report, "macs=0.25", tmp_path / "eval.json")
