"""`cafedist compare`: planning, statistics, report files, resume, failure isolation, submitit."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cafedist, cafedist_in_process, env_for_tests, summary

from cafedist import provenance
from cafedist.algorithms import ALGORITHMS
from cafedist.cli import main as cli_main
from cafedist.compare import (
    ABLATIONS,
    REPORT_THRESHOLDS,
    PlannedRun,
    RunOutcome,
    Stat,
    Variant,
    available_variants,
    check_ablation_axes,
    mean_std,
    plan_runs,
    resolve_algorithms,
    resolve_seeds,
    results_csv,
    results_markdown,
    summarize,
)
from cafedist.compare.paired import PairedReport, PairedRow, paired_differences
from cafedist.config import load_config
from cafedist.errors import ConfigError
from cafedist.stats import mean_se, t_quantile
from cafedist.tuning import NO_SETTING, Setting


# ----------------------------------------------------------------------------- planning (no training)
def test_all_means_every_registered_algorithm_and_the_ablations():
    names = [v.name for v in resolve_algorithms("all")]
    assert set(names) == set(ALGORITHMS) | set(ABLATIONS)
    assert names[0] == "cafedistill" and names[1:3] == sorted(ABLATIONS)  # the method, then its ablations
    assert len(names) == len(set(names))


def test_algorithm_list_keeps_order_drops_duplicates_and_rejects_unknown_names():
    assert [v.name for v in resolve_algorithms("fedavg, cafedistill,fedavg")] == ["fedavg", "cafedistill"]
    with pytest.raises(ConfigError, match="--algorithms: unknown algorithm 'fedavgg'"):
        resolve_algorithms("cafedistill,fedavgg")
    with pytest.raises(ConfigError, match="--algorithms"):
        resolve_algorithms(" , ")


def test_seeds_are_a_count_from_the_config_seed_or_an_explicit_list():
    assert resolve_seeds("3", 10) == [10, 11, 12]
    assert resolve_seeds(2, 0) == [0, 1]
    assert resolve_seeds("0,5,7", 10) == [0, 5, 7]
    assert resolve_seeds([4, 4, 2], 10) == [4, 2]
    for bad in ("0", "x", "1,a"):
        with pytest.raises(ConfigError, match="--seeds"):
            resolve_seeds(bad, 0)


def test_an_algorithm_registered_under_an_ablations_name_is_refused(monkeypatch):
    """It used to replace the ablation silently: ``--algorithms cafedistill-nokd`` ran the
    registered class, and the report still read it as CAFEDistill without cross-client KD."""
    from cafedist import algorithms
    from cafedist.algorithms.fedavg import FedAvg

    impostor = type("NoKD", (FedAvg,), {"name": "cafedistill-nokd"})
    monkeypatch.setitem(algorithms.ALGORITHMS, "cafedistill-nokd", impostor)
    with pytest.raises(RuntimeError, match=r"algorithm 'cafedistill-nokd' \(.*NoKD\) is registered under the name "
                                           r"of compare's ablation .*cross_client_kd=False.*rename"):
        available_variants()


def test_ablation_runs_are_cafedistill_with_one_switch_off(tiny_config, tmp_path):
    cfg = tiny_config(rounds=2)
    variants = [available_variants()[n] for n in ("cafedistill-nokd", "cafedistill-nosel", "fedavg")]
    runs = plan_runs(cfg, variants, "1", tmp_path / "out", ["train.rounds=1", "seed=9", "algorithm.name=fedprox"])
    assert [(r.variant.name, r.seed) for r in runs] == [("cafedistill-nokd", 9), ("cafedistill-nosel", 9),
                                                       ("fedavg", 9)]
    assert runs[0].run_dir == (tmp_path / "out" / "runs" / "cafedistill-nokd" / "seed9").resolve()
    resolved = [load_config(r.config, list(r.overrides)) for r in runs]
    assert [c.algorithm.name for c in resolved] == ["cafedistill", "cafedistill", "fedavg"]  # compare's wins
    assert all(c.train.rounds == 1 for c in resolved)  # the user's override applies to every run
    nokd, nosel = resolved[0].algorithm_params(), resolved[1].algorithm_params()
    assert (nokd.cross_client_kd, nokd.student_selection) == (False, True)
    assert (nosel.cross_client_kd, nosel.student_selection) == (True, False)
    assert len({r.config_hash for r in runs}) == 3


def test_a_grid_over_the_switch_an_ablation_fixes_is_refused(tiny_config, tmp_path, capsys):
    """Each row would have trained the ablation's value under a label naming the other."""
    code = cli_main(["compare", "--config", str(tiny_config()), "--algorithms", "cafedistill,cafedistill-nokd",
                     "--grid", "algorithm.cafedistill.cross_client_kd=true,false", "--out", str(tmp_path / "cmp")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--grid algorithm.cafedistill.cross_client_kd: cafedistill-nokd is cafedistill with cross_client_kd " \
           "fixed to false" in err[0]
    assert not (tmp_path / "cmp").exists()
    check_ablation_axes([available_variants()["cafedistill-nokd"]], ["algorithm.cafedistill.student_selection",
                                                                      "train.lr"])  # other keys vary it


@pytest.mark.parametrize("tune", [[], ["--tune"]])
def test_a_grid_value_that_makes_the_model_invalid_is_refused_before_anything_runs(tiny_config, tmp_path, capsys,
                                                                                  tune):
    """Every run of {width: 0} failed on its own (its run folder left behind, holding a train.log)."""
    out = tmp_path / "cmp"
    code = cli_main(["compare", "--config", str(tiny_config(rounds=1)), "--algorithms", "fedavg,fedprox", "--seeds",
                     "1", "--grid", "model.options={width: 4},{width: 0}", *tune, "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert code == 2 and err == ["cafedist: error: --grid model.options={width: 0}: model.options.width: expected an "
                                 "integer >= 1, got 0 (method fedavg)"]
    assert not out.exists()  # no run folder, no compare.lock


def test_a_refused_grid_value_is_named_as_typed(tiny_config, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = cli_main(["compare", "--config", str(tiny_config(rounds=1)), "--algorithms", "fedavg", "--seeds", "1",
                     "--grid", "train.lr=0.05,.nan", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["cafedist: error: --grid train.lr=.nan: train.lr: expected a finite number, got nan"]
    assert not out.exists()


def test_a_grid_typo_is_refused_before_any_setting_is_built(tiny_config, tmp_path, capsys, monkeypatch):
    """Every value is loaded before any is built: building a setting prepares the first seed's
    store (minutes for a real dataset), which a typo in a later value must not wait for."""
    from cafedist.train import plan

    built = []
    monkeypatch.setattr(plan, "check_buildable", lambda cfg, **kwargs: built.append(cfg.train.lr) or True)
    code = cli_main(["compare", "--config", str(tiny_config(rounds=1)), "--algorithms", "fedavg", "--seeds", "1",
                     "--grid", "train.lr=0.05,.nan", "--out", str(tmp_path / "cmp")])
    assert code == 2 and built == []
    assert capsys.readouterr().err.strip().endswith("--grid train.lr=.nan: train.lr: expected a finite number, got nan")


def test_a_bad_override_fails_before_anything_runs(tiny_config, tmp_path, capsys):
    code = cli_main(["compare", "--config", str(tiny_config()), "--algorithms", "fedavg", "--seeds", "1",
                     "--out", str(tmp_path / "out"), "train.roundz=2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cafedist: error:" in err and "train.roundz" in err
    assert not (tmp_path / "out" / "runs").exists()


# ----------------------------------------------------------------------------- statistics (synthetic summaries)
def _fake_summary(accs: list[float], dyn_acc: float, macs: float, red: float, nbytes: int, wall: float) -> dict:
    table = [{"threshold": th, "accuracy": dyn_acc + th / 100, "mean_macs": macs * (1 + th), "macs_reduction": red}
             for th in (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    return {"acc_per_exit": accs, "macs_per_exit": [10, 20, 30], "dynamic": table,
            "mac_reduction_at_1pt": {"macs_reduction": red}, "bytes_per_client_per_round": nbytes,
            "wall_seconds": wall}


def test_summarize_gives_mean_and_sample_std_over_seeds():
    runs = [_fake_summary([0.5, 0.6, 0.7], 0.4, 10.0, 0.2, 100, 3.0),
            _fake_summary([0.7, 0.6, 0.9], 0.6, 20.0, 0.4, 100, 5.0),
            _fake_summary([0.6, 0.9, 0.8], 0.5, 30.0, 0.3, 100, 4.0)]
    stats = {(s.metric, s.exit, s.threshold): s for s in summarize({"a": runs, "b": runs[:1], "c": []})
             if s.algorithm == "a"}
    acc1 = stats[("accuracy", 1, None)]
    assert acc1.n == 3 and acc1.mean == pytest.approx(0.6) and acc1.std == pytest.approx(0.1)
    assert stats[("accuracy", 2, None)].std == pytest.approx(statistics.stdev([0.6, 0.6, 0.9]))
    dyn = stats[("dynamic_accuracy", None, 0.7)]
    assert dyn.mean == pytest.approx(0.507) and dyn.std == pytest.approx(0.1)
    assert stats[("dynamic_mean_macs", None, 0.5)].mean == pytest.approx(30.0)
    assert stats[("mac_reduction_at_1pt", None, None)].mean == pytest.approx(0.3)
    assert stats[("bytes_per_client_per_round", None, None)].std == 0.0
    assert stats[("wall_seconds", None, None)].mean == pytest.approx(4.0)
    assert {th for (m, _, th) in stats if m == "dynamic_accuracy"} == set(REPORT_THRESHOLDS)
    # one seed: no spread to report (NaN, shown without "±"); no finished seed: no rows at all
    single = summarize({"b": runs[:1]})
    assert all(s.n == 1 and math.isnan(s.std) for s in single)
    assert summarize({"c": []}) == []
    md = results_markdown("cafedist compare X", single, [])
    assert "| b | 1 | 50.00 | 60.00 | 70.00 |" in md



def test_results_markdown_cells_are_mean_and_sample_std_in_points_over_the_seeds_that_finished():
    """Accuracy cells are mean ± sample std in points, wall time in seconds, bytes the mean;
    the seeds column counts the seeds that finished, also when a metric lacks one of them
    (here a dynamic threshold one seed's table does not hold)."""
    runs = [_fake_summary([0.5, 0.6, 0.7], 0.4, 10.0, 0.2, 100, 3.0),
            _fake_summary([0.5, 0.6, 0.9], 0.4, 10.0, 0.2, 300, 5.0)]
    runs[1]["dynamic"] = [r for r in runs[1]["dynamic"] if r["threshold"] != 0.5]
    md = results_markdown("cafedist compare X", summarize({"a": runs}), [])
    assert "| a | 2 | 50.00 ± 0.00 | 60.00 ± 0.00 | 80.00 ± 14.14 |" in md  # sd of 70 and 90: 14.14
    assert "| a | 20.0 ± 0.0 | 200 | 4.0 ± 1.4 |" in md

def test_the_accuracy_table_names_each_rows_macs_when_the_rows_models_differ():
    # a grid over model.options makes rows of other models: the header's MACs held only the first row's
    small = _fake_summary([0.5, 0.6, 0.7], 0.4, 10.0, 0.2, 100, 3.0)
    wide = {**_fake_summary([0.6, 0.7, 0.8], 0.4, 10.0, 0.2, 100, 3.0), "macs_per_exit": [10, 40, 90]}
    md = results_markdown("cafedist compare X", summarize({"w4": [small], "w8": [wide]}), [])
    assert "| algorithm | seeds | exit 1 (10 MACs) | exit 2 | exit 3 |" in md
    assert "| w4 | 1 | 50.00 | 60.00 (20 MACs) | 70.00 (30 MACs) |" in md
    assert "| w8 | 1 | 60.00 | 70.00 (40 MACs) | 80.00 (90 MACs) |" in md
    # the same model in every row: the MACs once, in the header
    md = results_markdown("cafedist compare X", summarize({"a": [small], "b": [small]}), [])
    assert "| algorithm | seeds | exit 1 (10 MACs) | exit 2 (20 MACs) | exit 3 (30 MACs) |" in md
    assert "| b | 1 | 50.00 | 60.00 | 70.00 |" in md


def test_results_markdown_names_every_stack_the_runs_trained_on():
    """A table mixing runs of several stacks (another torch, CPU, GPU) is not reproducible
    from one: results.md lists each, with its runs; runs of earlier code count as unrecorded."""
    def env(torch_version, cpu):
        return {"cafedist": "0.1.0", "git": {"commit": "0123456789ab", "dirty": True}, "python": "3.11.7",
                "torch": torch_version, "numpy": "2.0.0", "cuda": None, "cudnn": None, "hosts": ["n1"],
                "cpus": [cpu], "devices": ["cpu"]}
    run = _fake_summary([0.5, 0.6, 0.7], 0.4, 10.0, 0.2, 100, 3.0)
    a, b = env("2.13.0", "AMD EPYC"), env("2.14.0", "Intel Xeon")
    summaries = {"x": [{**run, "environments": [a]}, {**run, "environments": [a, b]}], "y": [dict(run)]}
    md = results_markdown("cafedist compare X", summarize(summaries), [], summaries=summaries)
    assert "Trained on 3 software and hardware stacks" in md
    assert ("- cafedist 0.1.0 (git 0123456, changed), Python 3.11.7, torch 2.13.0, numpy 2.0.0, CUDA none; "
            "CPU AMD EPYC; device cpu: 2 runs") in md
    assert "- cafedist 0.1.0 (git 0123456, changed), Python 3.11.7, torch 2.14.0, numpy 2.0.0, CUDA none; " \
           "CPU Intel Xeon; device cpu: 1 run" in md
    assert "- not recorded (trained by earlier code): 1 run" in md
    one = {"x": [{**run, "environments": [a]}]}
    assert "Trained on: cafedist 0.1.0 (git 0123456, changed)" in results_markdown(
        "cafedist compare X", summarize(one), [], summaries=one)


def test_mean_std_matches_statistics():
    assert mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(statistics.stdev([1, 2, 4])))
    m, s = mean_std([5.0])
    assert m == 5.0 and math.isnan(s)


def test_results_markdown_lists_failures_and_algorithms_without_results(tmp_path):
    run = PlannedRun(Variant("x", "fedavg"), 4, tmp_path, None, (), "h")
    md = results_markdown("cafedist compare --out D", [], [RunOutcome(run, "failed", "exit status 2: boom")])
    assert md.splitlines()[:3] == ["```sh", "cafedist compare --out D", "```"]
    assert "- `x` seed 4: exit status 2: boom" in md
    assert "No finished run, so not in the tables: x." in md


def test_the_heading_counts_algorithms_not_grid_rows(tmp_path):
    """One algorithm in two grid settings was "# Comparison: 2 algorithm(s)"."""
    outcomes = [RunOutcome(PlannedRun(Variant("fedavg", "fedavg"), 0, tmp_path / lr, None, (), "h",
                                      row=f"fedavg [train.lr={lr}]"), "done") for lr in ("0.1", "0.2")]
    stats = [Stat(o.run.row, "accuracy", 1, None, 1, 0.5, math.nan) for o in outcomes]
    md = results_markdown("cafedist compare --out D", stats, outcomes)
    assert "# Comparison: 1 algorithm(s) in 2 settings × seeds 0" in md
    md = results_markdown("cafedist compare --out D", stats[:1], outcomes[:1])
    assert "# Comparison: 1 algorithm(s) × seeds 0" in md


# ----------------------------------------------------------------------------- paired differences (synthetic)
@pytest.mark.parametrize("df, value", [(1, 12.706), (4, 2.776), (9, 2.262), (29, 2.045)])
def test_student_t_quantiles_match_the_table(df, value):
    assert t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)
    assert t_quantile(0.025, df) == pytest.approx(-value, abs=5e-4)


def test_mean_and_standard_error_as_the_experiments_report_them():
    mean, se = mean_se([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and se == pytest.approx(math.sqrt(7 / 3) / math.sqrt(3))
    assert mean_se([0.5])[0] == 0.5 and math.isnan(mean_se([0.5])[1])


def test_student_t_quantiles_match_the_closed_forms():
    assert t_quantile(0.9, 1) == pytest.approx(math.tan(math.pi * 0.4), rel=1e-9)  # Cauchy
    for p in (0.6, 0.975, 0.999):  # df = 2: (2p - 1) / sqrt(2p(1 - p))
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-12)
    assert t_quantile(0.975, 10**6) == pytest.approx(1.959966, abs=1e-5)  # the normal's


def _paired_row(variant: str, last_acc: dict[int, float], setting: Setting = NO_SETTING) -> PairedRow:
    """A row whose seed s has last-exit accuracy ``last_acc[s]`` (dynamic: that - 0.1 + θ/100)."""
    return PairedRow(variant, setting, {s: _fake_summary([0.1, 0.2, a], a - 0.1, 10.0, 0.2, 100, 1.0)
                                        for s, a in last_acc.items()})


def test_a_constant_lead_on_every_seed_has_no_spread():
    ref = {0: 0.5, 1: 0.7, 2: 0.6, 3: 0.8}
    rows = {"cafedistill": _paired_row("cafedistill", ref),
            "fedavg": _paired_row("fedavg", {s: a + 0.02 for s, a in ref.items()})}
    report = paired_differences(rows)
    assert {(d.row, d.metric, d.threshold) for d in report.diffs} == {
        ("fedavg", "accuracy", None), *(("fedavg", "dynamic_accuracy", th) for th in REPORT_THRESHOLDS)}
    for d in report.diffs:
        assert d.reference == "cafedistill" and d.seeds == (0, 1, 2, 3) and d.n == 4 and d.at_or_above == 4
        assert d.mean == pytest.approx(0.02) and d.std == pytest.approx(0.0, abs=1e-12)
        assert d.se == pytest.approx(0.0, abs=1e-12)
        assert (d.low, d.high) == pytest.approx((0.02, 0.02), abs=1e-9)
    assert report.left_out == []


def test_differences_pair_by_seed_not_position_and_rows_with_under_two_shared_seeds_are_left_out():
    rows = {"cafedistill": _paired_row("cafedistill", {1: 0.5, 2: 0.9, 3: 0.6}),
            "fedavg": _paired_row("fedavg", {2: 0.95, 3: 0.5, 4: 0.1}),
            "fedprox": _paired_row("fedprox", {3: 0.7, 5: 0.6}),
            "scaffold": _paired_row("scaffold", {})}  # no finished run: already named apart
    report = paired_differences(rows, thresholds=())
    [d] = report.diffs
    diffs = [0.95 - 0.9, 0.5 - 0.6]  # seeds 2 and 3
    assert d.row == "fedavg" and d.exit == 3 and d.seeds == (2, 3) and d.n == 2 and d.at_or_above == 1
    assert d.mean == pytest.approx(statistics.fmean(diffs)) and d.std == pytest.approx(statistics.stdev(diffs))
    assert d.se == pytest.approx(statistics.stdev(diffs) / math.sqrt(2))
    assert (d.low, d.high) == pytest.approx((d.mean - 12.7062 * d.se, d.mean + 12.7062 * d.se), rel=1e-4)
    assert report.left_out == ["`fedprox`: 1 seed shared with `cafedistill` (3); 2 needed"]
    md = results_markdown("cafedist compare X", summarize({k: list(r.runs.values()) for k, r in rows.items()}), [],
                          thresholds=(), paired=report)
    section = md.split("## Paired differences against cafedistill", 1)[1]
    assert "| algorithm | accuracy | seeds | mean difference (pts) | standard error (pts) | 95 % CI (pts) " \
           "| at or above |" in section
    assert "| fedavg | last exit (3) | 2 | −2.50 | 7.50 | [−97.80, +92.80] | 1/2 |" in section
    assert "a CI that excludes 0" in section and "not corrected for multiple comparisons" in section
    assert "Left out:\n\n- `fedprox`: 1 seed shared with `cafedistill` (3); 2 needed\n" in section
    # results.csv: the difference as a fraction, its n and seeds, the reference and the interval
    [line] = [r for r in csv.DictReader(io.StringIO(results_csv([], None, report)))
              if r["metric"] == "paired_diff_accuracy"]
    assert (line["algorithm"], line["exit"], line["n_seeds"], line["seeds"], line["reference"],
            line["reference_setting"], line["at_or_above"]) == ("fedavg", "3", "2", "2 3", "cafedistill", "", "1")
    assert [float(line[k]) for k in ("mean", "std", "se", "ci_low", "ci_high")] == pytest.approx(
        [d.mean, d.std, d.se, d.low, d.high], rel=1e-12)



def test_a_seed_on_which_the_row_ties_the_reference_counts_as_at_or_above():
    rows = {"cafedistill": _paired_row("cafedistill", {0: 0.5, 1: 0.7, 2: 0.6}),
            "fedavg": _paired_row("fedavg", {0: 0.5, 1: 0.6, 2: 0.7})}
    [d] = paired_differences(rows, thresholds=()).diffs
    assert d.at_or_above == 2  # seed 0 ties, seed 2 is above, seed 1 below

def test_no_paired_section_without_the_reference_or_two_shared_seeds():
    one_seed = {"cafedistill": _paired_row("cafedistill", {1: 0.5}), "fedavg": _paired_row("fedavg", {1: 0.6})}
    assert paired_differences(one_seed).diffs == []
    md = results_markdown("cafedist compare X", [], [], paired=paired_differences(one_seed))
    assert "Paired differences" not in md  # a one-seed comparison has nothing to pair
    no_ref = {"fedavg": _paired_row("fedavg", {1: 0.5, 2: 0.6}), "fedprox": _paired_row("fedprox", {1: 0.6, 2: 0.7})}
    assert paired_differences(no_ref) == PairedReport([], [])


def test_a_grid_row_pairs_with_the_reference_row_of_its_setting_and_never_guesses():
    def setting(**pairs: str) -> Setting:
        return Setting(tuple((k.replace("_", "."), v) for k, v in pairs.items()))

    ref = {1: 0.5, 2: 0.6}
    lr = {f"cafedistill [train.lr={v}]": _paired_row("cafedistill", ref, setting(train_lr=v)) for v in ("0.1", "0.2")}
    rows = {**lr,
            "fedavg [train.lr=0.2]": _paired_row("fedavg", ref, setting(train_lr="0.2")),
            "fedprox [train.lr=0.1 mu=1]": _paired_row("fedprox", ref, setting(train_lr="0.1", mu="1")),
            "fedavg-plain": _paired_row("fedavg", ref)}  # the reference varies lr: which one is not ours to say
    report = paired_differences(rows, thresholds=())
    assert {d.row: d.reference for d in report.diffs} == {"fedavg [train.lr=0.2]": "cafedistill [train.lr=0.2]",
                                                          "fedprox [train.lr=0.1 mu=1]": "cafedistill [train.lr=0.1]"}
    assert report.diffs[0].reference_setting == "train.lr=0.2"
    md = results_markdown("cafedist compare X", [], [], thresholds=(), paired=report)
    assert "| fedavg [train.lr=0.2] | cafedistill [train.lr=0.2] | last exit (3) | 2 | +0.00 | 0.00 |" in md
    assert "every key both vary" in md
    assert report.left_out == ["`fedavg-plain`: the reference ran several settings that fit this row "
                               "(`train.lr=0.1`, `train.lr=0.2`); none is chosen for it"]
    # one reference row (no axis applies to it, or --tune chose its setting): every row reads against it
    rows = {"cafedistill": _paired_row("cafedistill", ref),
            "fedprox [mu=1]": _paired_row("fedprox", ref, setting(mu="1")),
            "cafedistill-nokd [mu=1]": _paired_row("cafedistill-nokd", ref, setting(mu="1"))}
    assert {d.row: d.reference for d in paired_differences(rows, thresholds=()).diffs} == {
        "fedprox [mu=1]": "cafedistill", "cafedistill-nokd [mu=1]": "cafedistill"}


# ----------------------------------------------------------------------------- end to end (real runs)
# the outer `cafedist compare` runs in this process (cafedist_in_process); it trains its runs in subprocesses
def _csv(path) -> dict[tuple, dict]:
    with open(path) as fh:
        return {(r["algorithm"], r["metric"], r["exit"], r["threshold"]): r for r in csv.DictReader(fh)}


def _check_stat(rows: dict, key: tuple, values: list[float]) -> None:
    row = rows[key]
    assert int(row["n_seeds"]) == len(values)
    assert float(row["mean"]) == pytest.approx(statistics.fmean(values), rel=1e-12, abs=1e-12)
    assert float(row["std"]) == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-12)


@pytest.mark.slow
def test_compare_end_to_end_resume_and_a_failing_algorithm(tiny_config, tmp_path):
    cfg = tiny_config(rounds=2)
    out = tmp_path / "cmp"
    algos = "cafedistill,fedavg,fedprox"
    # fedprox cannot run: its run directories hold an unreadable config (train refuses to touch them)
    for seed in (3, 4):
        bad = out / "runs" / "fedprox" / f"seed{seed}"
        bad.mkdir(parents=True)
        (bad / "config.yaml").write_text("seed: [unclosed\n")
    args = ("compare", "--config", str(cfg), "--algorithms", algos, "--seeds", "2", "--out", str(out), "--jobs", "2")
    proc = cafedist_in_process(*args)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "FAILED fedprox seed3" in proc.stdout and "FAILED fedprox seed4" in proc.stdout
    assert "2 of 6 runs failed" in proc.stdout

    runs = {(a, s): out / "runs" / a / f"seed{s}" for a in ("cafedistill", "fedavg") for s in (3, 4)}
    sums = {k: summary(d) for k, d in runs.items()}
    assert {(a, s): v["algorithm"] for (a, s), v in sums.items()} == {k: k[0] for k in runs}
    assert all(json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])["round"] == 1 for d in runs.values())
    for name in ("results.md", "results.csv", "accuracy_vs_macs.png", "per_exit_accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*.tmp*")), "a temporary file was left behind"

    md = (out / "results.md").read_text()
    assert md.splitlines()[1].startswith("cafedist compare --config ")
    # what the four finished runs trained on, from their summaries (all on this one stack)
    [stack] = {provenance.describe(e) for v in sums.values() for e in v["environments"]}
    assert f"Trained on: {stack} (4 runs)." in md and f"torch {torch.__version__}" in stack
    assert "--algorithms cafedistill,fedavg,fedprox" in md
    assert "- `fedprox` seed 3:" in md and "unreadable" in md and "not in the tables: fedprox" in md

    rows = _csv(out / "results.csv")
    for algo in ("cafedistill", "fedavg"):
        s3, s4 = sums[(algo, 3)], sums[(algo, 4)]
        for k in range(3):
            _check_stat(rows, (algo, "accuracy", str(k + 1), ""), [s3["acc_per_exit"][k], s4["acc_per_exit"][k]])
        for th in REPORT_THRESHOLDS:
            at = [next(r for r in s["dynamic"] if abs(r["threshold"] - th) < 1e-9) for s in (s3, s4)]
            _check_stat(rows, (algo, "dynamic_accuracy", "", f"{th:g}"), [r["accuracy"] for r in at])
            _check_stat(rows, (algo, "dynamic_mean_macs", "", f"{th:g}"), [r["mean_macs"] for r in at])
        _check_stat(rows, (algo, "mac_reduction_at_1pt", "", ""),
                    [s["mac_reduction_at_1pt"]["macs_reduction"] for s in (s3, s4)])
        _check_stat(rows, (algo, "bytes_per_client_per_round", "", ""),
                    [s["bytes_per_client_per_round"] for s in (s3, s4)])
        _check_stat(rows, (algo, "wall_seconds", "", ""), [s["wall_seconds"] for s in (s3, s4)])
        acc = statistics.fmean([s3["acc_per_exit"][2], s4["acc_per_exit"][2]])
        assert f"| {algo} | 2 | " in md and f"{100 * acc:.2f} ± " in md
    assert not any(k[0] == "fedprox" for k in rows)
    # fedavg against the reference, paired by seed (fedprox has no finished run: no line)
    diffs = [sums[("fedavg", s)]["acc_per_exit"][-1] - sums[("cafedistill", s)]["acc_per_exit"][-1] for s in (3, 4)]
    paired = rows[("fedavg", "paired_diff_accuracy", "3", "")]
    assert (paired["n_seeds"], paired["seeds"], paired["reference"], paired["at_or_above"]) == (
        "2", "3 4", "cafedistill", str(sum(d >= 0 for d in diffs)))
    _check_stat(rows, ("fedavg", "paired_diff_accuracy", "3", ""), diffs)
    half = 12.7062 * statistics.stdev(diffs) / math.sqrt(2)
    assert [float(paired["ci_low"]), float(paired["ci_high"])] == pytest.approx(
        [statistics.fmean(diffs) - half, statistics.fmean(diffs) + half], rel=1e-4, abs=1e-12)
    assert {k[0] for k in rows if k[1].startswith("paired_diff")} == {"fedavg"}
    assert rows[("cafedistill", "accuracy", "3", "")]["reference"] == ""  # the columns of the other lines stay
    section = md.split("## Paired differences against cafedistill\n", 1)[1]
    assert f"| fedavg | last exit (3) | 2 | {100 * statistics.fmean(diffs):+.2f}".replace("-", "−") in section
    assert "| fedavg | θ = 0.5 | 2 |" in section and "Left out" not in section

    # rerun once fedprox's directories are usable: finished runs are reused untouched, fedprox trains
    for seed in (3, 4):
        (out / "runs" / "fedprox" / f"seed{seed}" / "config.yaml").unlink()
    mtimes = {k: (d / "summary.json").stat().st_mtime_ns for k, d in runs.items()}
    proc = cafedist_in_process(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("skipped (finished") == 4
    assert {k: (d / "summary.json").stat().st_mtime_ns for k, d in runs.items()} == mtimes
    assert summary(out / "runs" / "fedprox" / "seed4")["algorithm"] == "fedprox"
    md = (out / "results.md").read_text()
    assert "2 trained now, 4 reused" in md and "| fedprox | 2 | " in md and "Failed runs" not in md
    assert "| fedprox | last exit (3) | 2 |" in md  # now paired with the reference too

    # a run finished by code of another RESULTS_VERSION is moved aside and trained again
    stale = out / "runs" / "fedprox" / "seed3"
    old = json.loads((stale / "summary.json").read_text())
    (stale / "summary.json").write_text(json.dumps(dict(old, results_version=0)))
    proc = cafedist_in_process(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULTS_VERSION changed" in proc.stderr and proc.stderr.count("skipped (finished") == 5
    assert summary(stale)["results_version"] == summary(out / "runs" / "fedprox" / "seed4")["results_version"]
    assert [p.name.startswith("previous-") for p in stale.iterdir() if p.is_dir() and p.name != "checkpoints"] == [True]


def test_a_run_extended_from_a_total_its_training_depended_on_is_trained_again(tiny_config, tmp_path):
    """A run that --resume force extended from another train.rounds carries the new config's
    hash, but differs from a run trained for that total from the start where what it trained
    depended on the old total (its summary's rounds_changes say so): compare trains it again
    rather than put it in a table beside runs trained from the start. An extension where
    nothing depended on the total is the longer run bit for bit (tests/test_train_resume.py)
    and is reused."""
    from cafedist import RESULTS_VERSION
    from cafedist.compare.plan import plan_run

    run = plan_run(str(tiny_config()), available_variants()["cafedistill"], 3, tmp_path / "out")
    run.run_dir.mkdir(parents=True)
    base = {"config_hash": run.config_hash, "results_version": RESULTS_VERSION}
    change = {"after_round": 1, "from": 2, "to": 3}
    for changes, reusable in (([], True), ([{**change, "depended": []}], True),
                              ([{**change, "depended": ["the progressive exit schedule ..."]}], False)):
        (run.run_dir / "summary.json").write_text(json.dumps({**base, "rounds_changes": changes}))
        assert (run.finished_summary() is not None) == reusable
        assert (run.outdated() is None) == reusable
        assert ("--resume" in run.train_argv() and "none" in run.train_argv()) == (not reusable)
    assert "extended by --resume force" in run.outdated()


def test_a_run_whose_extension_checkpointed_past_its_summary_is_not_reused(tiny_config, tmp_path):
    """`train --resume force train.rounds=...` on a finished run, stopped after its first
    checkpoint: summary.json still matches compare's config, but the run has gone past the
    models it describes (config.yaml is the new config's). compare reported the run finished,
    with the old summary's numbers and its curve cut at the old rounds; once the extension
    ended it refused the same directory as another config's run."""
    from cafedist import RESULTS_VERSION
    from cafedist.compare.plan import plan_run

    run = plan_run(str(tiny_config(rounds=2)), available_variants()["fedavg"], 3, tmp_path / "out")
    (run.run_dir / "checkpoints" / "round_000001").mkdir(parents=True)
    (run.run_dir / "summary.json").write_text(json.dumps({"config_hash": run.config_hash, "rounds": 2,
                                                           "results_version": RESULTS_VERSION}))
    assert run.finished_summary() is not None
    (run.run_dir / "checkpoints" / "round_000003").mkdir()
    assert run.finished_summary() is None


def test_an_unfinished_run_that_could_not_stand_is_started_over(tiny_config, tmp_path):
    """A run stopped partway whose newest checkpoint already says it cannot stand in the
    comparison (--resume force extended it from a total its training depended on, or code of
    another RESULTS_VERSION trained it) is started over, not resumed: resumed, it would finish
    as such a run, be reported failed ("no summary.json written", beside its summary.json) and
    be trained again from the start by the next compare all the same."""
    from cafedist import RESULTS_VERSION
    from cafedist.compare.plan import plan_run

    run = plan_run(str(tiny_config()), available_variants()["cafedistill"], 3, tmp_path / "out")
    newest = run.run_dir / "checkpoints" / "round_000002"
    newest.mkdir(parents=True)
    change = {"after_round": 1, "from": 2, "to": 4}
    base = {"round": 2, "config_hash": run.config_hash, "results_version": RESULTS_VERSION}
    for manifest, reason in (({**base, "rounds_changes": []}, None),
                             ({**base, "rounds_changes": [{**change, "depended": []}]}, None),
                             ({**base, "rounds_changes": [{**change, "depended": ["the exit schedule ..."]}]},
                              "extended by --resume force"),
                             ({**base, "results_version": RESULTS_VERSION - 1}, "RESULTS_VERSION changed"),
                             ({**base, "config_hash": "another config's"}, None)):  # not this run: train says so
        (newest / "MANIFEST.json").write_text(json.dumps(manifest))
        assert run.finished_summary() is None
        why = run.outdated()
        assert (why is None) if reason is None else (reason in (why or "")), (manifest, why)
        assert ("none" in run.train_argv()) == (reason is not None)


@pytest.mark.slow
def test_compare_through_submitit_local_executor(tiny_config, tmp_path):
    out = tmp_path / "sub"
    proc = cafedist("compare", "--config", str(tiny_config(rounds=1)), "--algorithms", "fedavg", "--seeds", "1",
                    "--out", str(out), "--submit", "--local", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitted as job" in proc.stderr
    assert summary(out / "runs" / "fedavg" / "seed3")["rounds"] == 1
    assert "| fedavg | 1 | " in (out / "results.md").read_text()


def test_submit_options_need_submit(tiny_config, tmp_path, capsys):
    code = cli_main(["compare", "--config", str(tiny_config()), "--algorithms", "fedavg", "--seeds", "1",
                     "--out", str(tmp_path / "o"), "--local"])
    assert code == 2 and "--local: only meaningful with --submit" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_compare_submit_takes_every_resource_flag_of_submit(tiny_config, tmp_path, capsys):
    """One list of resource flags serves both commands: compare --submit once lacked --account,
    --qos, --mem-gb, ...; what is not given takes submit's defaults."""
    from cafedist.cli import build_parser
    from cafedist.compare import _submit_options
    from cafedist.jobs import RESOURCE_FLAGS, ExecutorOptions

    parser = build_parser()
    for command in ("submit", "compare"):
        parsed = parser.parse_args([command, "--out", "x"])
        assert all(hasattr(parsed, name) for name, _, _ in RESOURCE_FLAGS), command
    args = parser.parse_args(["compare", "--out", str(tmp_path / "o"), "--submit", "--account", "lab", "--mem-gb", "8",
                              "--max-requeues", "3", "--slurm-arg", "exclusive=true"])
    if importlib.util.find_spec("submitit") is None:
        pytest.skip("submitit is not installed")
    options = _submit_options(args)
    assert (options.account, options.mem_gb, options.max_requeues, options.slurm_arg) == ("lab", 8.0, 3,
                                                                                         ["exclusive=true"])
    assert (options.time, options.nodes, options.signal_delay) == (ExecutorOptions.time, ExecutorOptions.nodes,
                                                                   ExecutorOptions.signal_delay)
    code = cli_main(["compare", "--config", str(tiny_config()), "--algorithms", "fedavg", "--seeds", "1",
                     "--out", str(tmp_path / "p"), "--qos", "high"])
    assert code == 2 and "--qos: only meaningful with --submit" in capsys.readouterr().err


def _trainers_in(run_dir) -> list[int]:
    """Pids of live processes whose command line names ``run_dir`` (Linux /proc)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(run_dir) in cmd and " train " in cmd:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
# SIGUSR1 (Slurm's --signal=USR1@N, as for train) ended compare on the spot: its training went on, orphaned;
# SIGINT (Ctrl-C) logged the run it stopped as 'FAILED: exit status 75'
# SIGKILL (the OOM killer, kill -9): the training went on alone, holding the run's lock against the next compare
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGKILL])
def test_stopping_compare_stops_its_training_runs(tiny_config, tmp_path, sig):
    out = tmp_path / "stop"
    run_dir = out / "runs" / "fedavg" / "seed3"
    proc = subprocess.Popen([sys.executable, "-m", "cafedist", "compare", "--config", str(tiny_config(rounds=2000)),
                             "--algorithms", "fedavg", "--seeds", "1", "--out", str(out)],
                            cwd=ROOT, env=env_for_tests(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "training never started"
            time.sleep(0.2)
        assert _trainers_in(run_dir)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        deadline = time.monotonic() + 60  # a killed compare waits for nothing: its training stops on its own
        while _trainers_in(run_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
    orphans = _trainers_in(run_dir)
    for pid in orphans:  # a failing run's orphan: this test's, ended by its pid
        os.kill(pid, signal.SIGKILL)
    assert orphans == []  # no orphan keeps writing into the run directory
    log = (run_dir / "train.log").read_text()
    assert "stop signal received" in log  # it checkpointed, so a rerun resumes
    if sig == signal.SIGKILL:
        assert proc.returncode == -sig and "is gone: stopping at the end of this round" in log
        return
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "FAILED" not in err and "fedavg seed3: stopped (a resume continues after round " in err  # as status says
    assert not (out / "results.md").exists()


@pytest.mark.parametrize("value,fmt,text", [(12952, ".2f", "12.95K"), (500, ".2f", "500"), (2.18e6, ".3g", "2.18M"),
                                            (999_999, ".3g", "1M"), (999.7, ".3g", "1K"), (3e9, ".2f", "3.00G")])
def test_short_count_picks_the_unit_after_rounding(value, fmt, text):
    from cafedist.units import short_count

    assert short_count(value, fmt) == text


# ----------------------------------------------------------------------------- grids and tuning
def test_tune_without_a_validation_split_carves_one_and_says_so(tiny_config, tmp_path, caplog):
    from cafedist.tuning import with_validation_split

    cfg = str(tiny_config())
    with caplog.at_level("WARNING", logger="cafedist"):
        expected = (("train.rounds=1", "data.val_fraction=0.1"), 3)  # TINY has seed 3
        assert with_validation_split(cfg, ["train.rounds=1"]) == expected
    assert "no validation split" in caplog.text
    assert with_validation_split(cfg, ["data.val_fraction=0.2", "seed=4"]) == (("data.val_fraction=0.2", "seed=4"), 4)


def test_tune_grid_over_data_is_one_clear_error(tiny_config, tmp_path, capsys):
    code = cli_main(["compare", "--config", str(tiny_config()), "--algorithms", "fedavg", "--grid",
                     "data.alpha=0.1,0.3", "--tune", "--out", str(tmp_path / "out"), "train.rounds=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("cafedist: error: --grid data.alpha:")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_tune_picks_each_methods_setting_on_validation_then_runs_it_on_every_seed(tiny_config, tmp_path):
    out = tmp_path / "tune"
    args = ("compare", "--config", str(tiny_config(rounds=2)), "--algorithms", "fedavg,cafedistill",
            "--grid", "train.lr=0.02,0.05", "--tune", "--seeds", "2", "--out", str(out),
            "train.rounds=2", "data.val_fraction=0.1")
    proc = cafedist_in_process(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "4 runs: 4 trained now, 0 reused" in (out / "results.md").read_text()  # seed 3's were the trials
    with open(out / "trials.csv") as fh:
        trials = list(csv.DictReader(fh))
    assert [(t["algorithm"], t["setting"], t["seed"]) for t in trials] == [
        (a, f"train.lr={lr}", "3") for a in ("fedavg", "cafedistill") for lr in ("0.02", "0.05")]
    chosen = {}
    for algo in ("fedavg", "cafedistill"):
        mine = [t for t in trials if t["algorithm"] == algo]
        best = max(mine, key=lambda t: float(t["val_acc_exit3"]))  # max() keeps the first on ties
        assert [t["chosen"] for t in mine] == ["yes" if t is best else "no" for t in mine]
        chosen[algo] = best["setting"]
        assert f"tuned {algo}: {best['setting']}" in proc.stdout
    with open(out / "results.csv") as fh:
        results = list(csv.DictReader(fh))
    for algo in ("fedavg", "cafedistill"):
        rows = [r for r in results if r["algorithm"] == algo]
        assert rows and all(r["setting"] == chosen[algo] and r["trials"] == "2" and r["rounds"] == "2"
                            and r["seeds"] == "3 4" for r in rows)
        last = next(r for r in rows if r["metric"] == "accuracy" and r["exit"] == "3")
        seeds = [summary(out / "runs" / algo / chosen[algo] / f"seed{s}") for s in (3, 4)]
        assert float(last["mean"]) == pytest.approx(statistics.fmean(s["acc_per_exit"][2] for s in seeds))
    with open(out / "runs.csv") as fh:
        runs = list(csv.DictReader(fh))
    assert [(r["algorithm"], r["setting"], r["seed"]) for r in runs] == [
        (a, chosen[a], s) for a in ("fedavg", "cafedistill") for s in ("3", "4")]
    with open(out / "curves.csv") as fh:
        curves = list(csv.DictReader(fh))
    assert len(curves) == 4 * 2 * 3 and all(c["val_acc"] for c in curves)  # runs x rounds x exits
    md = (out / "results.md").read_text()
    assert "## Tuning" in md and "Unequal" not in md and f"`{chosen['fedavg']}`" in md
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the first seed's final run is the chosen trial: 4 trials + 2 new runs of seed 4, nothing else
    assert len(list((out / "runs").glob("*/*/seed*/summary.json"))) == 6
    # rerun: every trial and run is finished with the same config, nothing trains again
    proc = cafedist_in_process(*args)
    assert proc.returncode == 0 and "running" not in proc.stderr
    assert proc.stderr.count("skipped (finished") == 4 + 4


@pytest.mark.slow
def test_grid_without_tune_reports_every_setting_and_seed(tiny_config, tmp_path):
    out = tmp_path / "grid"
    proc = cafedist_in_process("compare", "--config", str(tiny_config(rounds=1)), "--algorithms",
                               "fedavg,cafedistill-nokd", "--grid", "algorithm.cafedistill.mu=0.1,2", "--seeds", "1",
                               "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _csv(out / "results.csv")  # fedavg: no axis applies, one row; the ablation: one row per mu
    with open(out / "results.csv") as fh:
        settings = {(r["algorithm"], r["setting"]) for r in csv.DictReader(fh)}
    assert settings == {("fedavg", ""), ("cafedistill-nokd", "algorithm.cafedistill.mu=0.1"),
                        ("cafedistill-nokd", "algorithm.cafedistill.mu=2")}
    assert rows[("fedavg", "accuracy", "3", "")]["trials"] == ""
    assert (out / "runs" / "fedavg" / "seed3" / "summary.json").exists()  # the layout without a grid
    assert summary(out / "runs" / "cafedistill-nokd" / "algorithm.cafedistill.mu=2" / "seed3")["algorithm"] \
        == "cafedistill"
    md = (out / "results.md").read_text()
    assert "| cafedistill-nokd [algorithm.cafedistill.mu=0.1] | 1 | 1 |" in md
    assert not (out / "trials.csv").exists()


# ----------------------------------------------------------------------------- per-client inference budgets
@pytest.mark.parametrize("extra, message", [
    (["--budget", "macs=lots"], "--budget: budget 'macs=lots': 'lots' is not a number"),
    (["--budget", "macs=0.5,speed=2"], "neither a budget spec"),
    (["--budget", "4"], "the cap on tuning trials per method is --max-trials 4"),
    (["--budget", ""], "--budget '': an empty item"),
    (["--budget", "macs=0.5,"], "--budget 'macs=0.5,': an empty item"),
    (["--budget", "macs=0.5", "data.val_fraction=0"], "--budget: fedavg would train without a validation split"),
])
def test_a_bad_budget_is_one_clear_error_before_anything_trains(tiny_config, tmp_path, capsys, extra, message):
    code = cli_main(["compare", "--config", str(tiny_config()), "--algorithms", "fedavg", "--seeds", "1",
                     "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("cafedist: error:") and message in err[0], err[0]
    assert not (tmp_path / "out" / "runs").exists()


def test_a_budget_file_must_cover_the_runs_clients_before_anything_trains(tiny_config, tmp_path, capsys):
    budgets = tmp_path / "my,budgets.csv"  # a comma in the name: still one file, not two budgets
    budgets.write_text("client,budget\n0,macs=0.5\n9,loss=1\n")
    code = cli_main(["compare", "--config", str(tiny_config(clients=4)), "--algorithms", "fedavg", "--seeds", "1",
                     "--out", str(tmp_path / "out"), "--budget", str(budgets), "data.val_fraction=0.2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown client ids 9" in err[0], err
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize("budget_file", [False, True])
def test_a_macs_budget_below_exit_1_is_refused_before_anything_trains(tiny_config, tmp_path, capsys, budget_file):
    budget = "macs=0.01"
    if budget_file:  # one client of a per-client file is enough to refuse
        budget = str(tmp_path / "budgets.yaml")
        Path(budget).write_text("default: macs=0.5\n2: macs=0.01\n")
    code = cli_main(["compare", "--config", str(tiny_config()), "--algorithms", "fedavg,fedper", "--seeds", "4,5",
                     "--out", str(tmp_path / "out"), "--budget", f"loss=1,{budget}" if not budget_file else budget,
                     "data.val_fraction=0.2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    where = budget if budget_file else "--budget"
    who = " for client 2" if budget_file else ""
    assert re.search(rf"{re.escape(where)}: macs=0.01{who} is below exit 1's cost \(0\.\d{{4}} of the last exit's "
                     r"MACs\): no exit policy can meet it \(method fedavg, model cnn\)$", err[0]), err[0]
    assert not (tmp_path / "out" / "runs").exists()


def test_a_feasible_macs_budget_passes_the_check_and_prepares_the_first_seeds_store(tiny_config, tmp_path):
    from cafedist.compare.budgets import check_runs, parse_budgets
    from cafedist.config import load_config

    cfg = load_config(str(tiny_config()), ["data.val_fraction=0.2", f"data.cache_dir={tmp_path / 'stores'}"])
    check_runs(parse_budgets(["macs=0.5"]), [("fedavg", cfg)], "7,8")
    assert cfg.data.store_path(7).is_file()  # training will reuse it
    assert not cfg.data.store_path(3).exists() and cfg.seed == 3  # the config's own seed is not run
    check_runs(parse_budgets(["loss=1"]), [("fedavg", cfg)], "9,")  # no MACs budget: no store needed
    assert not cfg.data.store_path(9).exists()
    check_runs(parse_budgets(["macs=0.01"]), [("fedavg", cfg)], "9,", prepare=False)  # --submit: jobs prepare it
    assert not cfg.data.store_path(9).exists()
    with pytest.raises(ConfigError, match="below exit 1's cost"):  # a store that exists is read all the same
        check_runs(parse_budgets(["macs=0.01"]), [("fedavg", cfg)], "7,", prepare=False)


def test_equal_budget_specs_are_one_budget():
    from cafedist.compare.budgets import parse_budgets

    assert [b.budget for b in parse_budgets(["macs=0.5,MACS=.50", "loss=1", "macs=0.5"])] == ["macs=0.5", "loss=1"]


@pytest.mark.slow
def test_compare_reports_each_method_under_per_client_budgets(tiny_config, tmp_path):
    out = tmp_path / "budget"
    args = ("compare", "--config", str(tiny_config(rounds=2)), "--algorithms", "fedavg", "--seeds", "2",
            "--out", str(out), "--budget", "macs=0.5", "--budget", "loss=1",
            "data.val_fraction=0.2")
    proc = cafedist_in_process(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]

    runs = [out / "runs" / "fedavg" / f"seed{s}" for s in (3, 4)]
    kept = [json.loads((r / "budgets.json").read_text()) for r in runs]
    sections = [{s["spec"]: s for s in k["sections"].values()} for k in kept]
    for run, k, secs in zip(runs, kept, sections):
        assert k["models"]["model_hashes"] == summary(run)["model_hashes"]
        assert set(secs) == {"macs=0.5", "loss=1"}
        half = secs["macs=0.5"]
        for row in half["clients"]:  # the choice met the budget on calibration, where it was made
            assert row["calibration_macs_fraction"] <= 0.5 + 1e-9
        assert half["global_at_same_macs"]["mean_macs"] == pytest.approx(half["mean_macs"])

    rows = {(r["algorithm"], r["metric"], r["budget"]): r for r in csv.DictReader(open(out / "results.csv"))}
    for spec in ("macs=0.5", "loss=1"):
        per_run = [s[spec] for s in sections]
        values = {"budget_accuracy": [s["accuracy"] for s in per_run],
                  "budget_macs_fraction": [s["macs_fraction"] for s in per_run],
                  "budget_share_within": [s["share_within_budget"] for s in per_run],
                  "budget_global_accuracy": [s["global_at_same_macs"]["accuracy"] for s in per_run],
                  "budget_global_cal_accuracy": [s["global_on_calibration"]["accuracy"] for s in per_run],
                  "budget_global_cal_share_within": [s["global_on_calibration"]["share_within_budget"]
                                                     for s in per_run],
                  "budget_global_all_accuracy": [s["global_within_every_budget"]["accuracy"] for s in per_run],
                  "budget_global_all_macs_fraction": [s["global_within_every_budget"]["macs_fraction"]
                                                      for s in per_run]}
        for metric, vals in values.items():
            assert all(0.0 <= v <= 1.0 for v in vals), (metric, vals)
            _check_stat(rows, ("fedavg", metric, spec), vals)
    assert ("fedavg", "accuracy", "") in {(a, m, b) for a, m, b in rows}  # the usual rows keep budget ""

    md = (out / "results.md").read_text()
    assert md.splitlines()[1].endswith("--budget macs=0.5 --budget loss=1 data.val_fraction=0.2")
    assert "## Per-client inference budgets" in md and "| fedavg | `macs=0.5` | " in md
    table = list(csv.DictReader(open(out / "runs.csv")))
    assert len(table) == 2
    for row, secs in zip(table, sections):
        assert float(row["budget_accuracy@macs=0.5"]) == secs["macs=0.5"]["accuracy"]
        assert float(row["budget_share_within@loss=1"]) == secs["loss=1"]["share_within_budget"]

    # rerun: runs and their budget evaluations are reused, no model is loaded again
    mtimes = [(r / "budgets.json").stat().st_mtime_ns for r in runs]
    proc = cafedist_in_process(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert [(r / "budgets.json").stat().st_mtime_ns for r in runs] == mtimes
    budget_part = md[md.index("## Per-client inference budgets"):]
    assert (out / "results.md").read_text().endswith(budget_part)


def test_a_compare_stopped_in_this_process_does_not_stop_the_next(tiny_config, tmp_path):
    """After a Ctrl-C (or SIGTERM) stopped one compare, every later one in the same Python
    process refused to start its runs ('compare is stopping')."""
    from cafedist.compare.execute import execute, run_subprocess

    runs = plan_runs(tiny_config(rounds=1), resolve_algorithms("fedavg"), 1, tmp_path / "cmp")

    def interrupted(run: PlannedRun, jobs: int) -> RunOutcome:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute(runs, runner=interrupted)
    [outcome] = execute(runs, runner=run_subprocess)
    assert outcome.status == "done", outcome


def test_a_run_stopped_after_its_summary_is_done(tiny_config, tmp_path, monkeypatch):
    """Compare interrupted while a child exits after writing its summary: the run is finished (a
    rerun skips it), so it is not reported as failed with the child's exit status -15."""
    import importlib

    executing = importlib.import_module("cafedist.compare.execute")  # the package's `execute` is its function
    [run] = plan_runs(tiny_config(rounds=1), resolve_algorithms("fedavg"), 1, tmp_path / "cmp")
    assert executing.run_subprocess(run, 1).status == "done"
    monkeypatch.setattr(executing._CHILDREN, "run", lambda *args, **kwargs: -15)
    assert executing.run_subprocess(run, 1).status == "done"
    (run.run_dir / "summary.json").unlink()  # without its summary the same exit is a failure
    failed = executing.run_subprocess(run, 1)
    assert failed.status == "failed" and "killed by SIGTERM" in failed.message


def test_a_killed_training_is_reported_with_its_own_sessions_output_not_an_earlier_error(tiny_config, tmp_path,
                                                                                         monkeypatch):
    """A run whose earlier training failed (its error in train.log) and whose next training was
    killed (the OOM killer's SIGKILL): compare reported 'exit status -9: <the earlier session's
    error>', a cause that was no longer true."""
    import importlib

    executing = importlib.import_module("cafedist.compare.execute")  # the package's `execute` is its function
    [run] = plan_runs(tiny_config(rounds=1), resolve_algorithms("fedavg"), 1, tmp_path / "cmp")
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "train.log").write_text("=== 2026-01-01 00:00:00 cafedist train ...\n"
                                           "cafedist: error: the data store is locked\n")

    def killed(cmd, stdout, **kwargs):
        stdout.write("[cafedist r0] INFO round 0 done\n")
        stdout.flush()
        return -9

    monkeypatch.setattr(executing._CHILDREN, "run", killed)
    outcome = executing.run_subprocess(run, 1)
    assert outcome.status == "failed"
    assert outcome.message.startswith("killed by SIGKILL: [cafedist r0] INFO round 0 done (log: ")
    assert "data store is locked" not in outcome.message


def test_a_stopped_run_is_reported_stopped_as_status_says_not_failed(tiny_config, tmp_path, monkeypatch, caplog,
                                                                     capsys):
    """A train stopped by a signal exits 75 (checkpoint written, resumable), and one that compare
    stops itself (Ctrl-C, SIGTERM: it stops its children with it) dies of it: both were logged
    'FAILED: exit status 75' (or -15), listed among the failed runs, and compare exited 1."""
    import importlib

    from cafedist.status import run_status

    executing = importlib.import_module("cafedist.compare.execute")  # the package's `execute` is its function
    out = tmp_path / "cmp"
    [run] = plan_runs(tiny_config(rounds=1), resolve_algorithms("fedavg"), 1, out)
    assert executing.run_subprocess(run, 1).status == "done"
    (run.run_dir / "summary.json").unlink()  # as if stopped after its last checkpoint
    state = run_status(run.run_dir).state
    assert state == "stopped (a resume continues after round 0)"
    monkeypatch.setattr(executing._CHILDREN, "run", lambda *args, **kwargs: 75)
    [outcome] = executing.execute([run])
    assert (outcome.status, outcome.message) == ("stopped", state)
    assert f"fedavg seed3: {state}" in caplog.text and "FAILED" not in caplog.text
    monkeypatch.setattr(executing._CHILDREN, "run", lambda *args, **kwargs: -15)
    assert executing.run_subprocess(run, 1).status == "failed"  # killed by someone else: a failure
    monkeypatch.setattr(executing._CHILDREN, "_stopping", True)  # ... unless compare was stopping it
    assert (executing.run_subprocess(run, 1).status, executing.run_subprocess(run, 1).message) == ("stopped", state)
    monkeypatch.setattr(executing._CHILDREN, "_stopping", False)

    # a compare that is not stopped itself: the report and the exit status say stopped, a rerun resumes it
    monkeypatch.setattr(executing._CHILDREN, "run", lambda *args, **kwargs: 75)
    capsys.readouterr()
    assert cli_main(["compare", "--config", str(tiny_config(rounds=1)), "--algorithms", "fedavg", "--seeds", "1",
                     "--out", str(out)]) == 75
    printed = capsys.readouterr().out
    assert f"stopped fedavg seed3: {state}" in printed and "FAILED" not in printed
    assert "1 of 1 runs stopped" in printed
    assert f"## Stopped runs\n\n- `fedavg` seed 3: {state}" in (out / "results.md").read_text()
    with open(out / "runs.csv") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["stopped"]


def test_a_stopped_tuning_trial_holds_back_the_choice_and_the_finals(tiny_config, tmp_path, monkeypatch, capsys):
    """A trial stopped by a signal (its train exits 75) was left out of the choice: compare chose
    among the finished trials and trained that setting's finals, which the rerun, choosing once
    the trial had resumed and finished, could throw away."""
    import importlib

    executing = importlib.import_module("cafedist.compare.execute")
    real = executing._CHILDREN.run
    monkeypatch.setattr(executing._CHILDREN, "run",
                        lambda cmd, **kw: 75 if "train.lr=0.05" in cmd else real(cmd, **kw))
    out = tmp_path / "tune"
    args = ["compare", "--config", str(tiny_config(rounds=1)), "--algorithms", "fedavg", "--grid",
            "train.lr=0.02,0.05", "--tune", "--seeds", "2", "--out", str(out), "data.val_fraction=0.1"]
    capsys.readouterr()
    assert cli_main(args) == 75
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("compare --tune: 1 of 2 trials stopped (fedavg "
                                                       "[train.lr=0.05] seed3: stopped"), printed
    assert printed[0].endswith("no setting was chosen and no final run trained; rerun the same command to "
                               "resume them")
    assert sorted(p.name for p in (out / "runs" / "fedavg").glob("*/seed*")) == ["seed3", "seed3"]  # no final
    assert not (out / "results.md").exists() and not (out / "trials.csv").exists()
    # the rerun resumes the trial, then chooses and trains the finals
    monkeypatch.setattr(executing._CHILDREN, "run", real)
    assert cli_main(args) == 0
    assert "tuned fedavg: train.lr=" in capsys.readouterr().out
    assert len(list((out / "runs").glob("fedavg/*/seed4/summary.json"))) == 1


def test_the_report_lists_stopped_runs_apart_from_failed_ones(tmp_path):
    run = PlannedRun(Variant("fedavg", "fedavg"), 3, tmp_path / "r", None, (), "h")
    state = "stopped (a resume continues after round 4)"
    md = results_markdown("cafedist compare --out D", [], [RunOutcome(run, "stopped", state)])
    assert "1 runs: 0 trained now, 0 reused (finished earlier with the same config), 0 failed, 1 stopped" in md
    assert f"## Stopped runs\n\n- `fedavg` seed 3: {state}" in md and "Failed runs" not in md


def test_a_rerun_in_which_every_run_fails_keeps_the_earlier_report(tiny_config, tmp_path, capsys, caplog):
    out = tmp_path / "runs" / "cmp"  # a folder named runs above --out (the README's own --out runs/cmp)
    args = ["compare", "--config", str(tiny_config(rounds=1)), "--algorithms", "fedavg", "--seeds", "1",
            "--out", str(out)]
    assert cli_main(args) == 0
    with open(out / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["run_dir"] for r in rows] == ["runs/fedavg/seed3"] and (out / rows[0]["run_dir"]).is_dir()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "results.md" in before
    capsys.readouterr()
    assert cli_main([*args, "train.lr=0.2"]) == 1  # its run directory holds a run of another config: refused
    assert "FAILED fedavg seed3" in capsys.readouterr().out and "the report already in" in caplog.text
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_the_failure_count_counts_tuning_trials_among_the_runs(tmp_path, monkeypatch, capsys):
    """With --tune it said "3 of 4 runs failed" when 3 trials failed and the 4 reported runs finished."""
    from types import SimpleNamespace

    import cafedist.compare as compare_mod
    from cafedist.tuning import NO_SETTING, TuneResult

    def outcome(name: str, seed: int, status: str) -> RunOutcome:
        run = SimpleNamespace(run_dir=tmp_path / name / f"seed{seed}", label=f"{name} seed{seed}", setting=NO_SETTING)
        return RunOutcome(run, status, "diverged" if status == "failed" else "")

    trials = {"a": [outcome("a-bad", 0, "failed"), outcome("a-ok", 0, "done")],
              "b": [outcome("b-bad", 0, "failed"), outcome("b-ok", 0, "done")]}
    finals = [trials["a"][1], outcome("a-ok", 1, "done"), trials["b"][1], outcome("b-ok", 1, "done")]
    result = compare_mod.CompareResult(finals, {}, TuneResult(0, trials, {"a": 1, "b": 1}, finals))
    monkeypatch.setattr(compare_mod, "compare", lambda *args, **kwargs: result)
    assert cli_main(["compare", "--algorithms", "fedavg", "--out", str(tmp_path / "cmp")]) == 1
    printed = capsys.readouterr().out
    assert "2 of 6 runs failed" in printed  # 4 trials, of which 2 are reported, + 2 runs
    # the choice a failed trial took no part in says so
    assert ("tuned a: (config as given) (chosen among the trials that did not fail: 1 of 2 failed; a rerun "
            "retries them and may choose otherwise)") in printed
    assert [o.run.label for o in result.failed] == ["a-bad seed0", "b-bad seed0"]


def test_compare_out_at_a_training_run_is_refused(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}\n")
    (run / "accuracy_vs_macs.png").write_bytes(b"eval's figure")
    code = cli_main(["compare", "--config", str(tiny_config()), "--algorithms", "fedavg", "--seeds", "1",
                     "--out", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "holds a training run" in err[0], err
    assert sorted(p.name for p in run.iterdir()) == ["accuracy_vs_macs.png", "summary.json"]
    # a folder that keeps the experiment's own config beside its report is no training run
    mine = tmp_path / "cmp"
    mine.mkdir()
    (mine / "config.yaml").write_text(tiny_config(rounds=1).read_text())
    assert cli_main(["compare", "--config", str(mine / "config.yaml"), "--algorithms", "fedavg", "--seeds", "1",
                     "--out", str(mine)]) == 0


def test_a_report_replaces_the_earlier_one_as_a_set(tmp_path, monkeypatch):
    """A failure (or a kill) while the report is written leaves the earlier report whole; a
    new report without plots or tuning removes the earlier one's, which described other runs."""
    import cafedist.compare.report as report

    out = tmp_path / "cmp"
    out.mkdir()
    earlier = {"results.md": b"old md", "results.csv": b"old csv", "runs.csv": b"old runs", "curves.png": b"png",
               "trials.csv": b"old trials", "notes.txt": b"the user's"}
    for name, data in earlier.items():
        (out / name).write_bytes(data)
    run = PlannedRun(Variant("x", "fedavg"), 4, out / "runs" / "x" / "seed4", None, (), "h")
    outcomes = [RunOutcome(run, "failed", "exit status 2: boom")]

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "results_markdown", broken)
    with pytest.raises(OSError):
        report.write_report(out, "cafedist compare", outcomes)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier  # runs.csv was written, not yet in place
    monkeypatch.undo()
    paths = report.write_report(out, "cafedist compare", outcomes)
    assert sorted(p.name for p in out.iterdir()) == ["curves.csv", "notes.txt", "results.csv", "results.md",
                                                      "runs.csv"]
    assert set(paths.values()) <= set(out.iterdir())
    mine = tmp_path / "mine"  # no report was here: a curves.png in it is the user's own
    mine.mkdir()
    (mine / "curves.png").write_bytes(b"my plot")
    report.write_report(mine, "cafedist compare", outcomes)
    assert (mine / "curves.png").read_bytes() == b"my plot"


def test_the_command_line_recorded_is_compares_own(monkeypatch):
    """results.md starts with the command as typed when this process is `cafedist compare`, and
    with the canonical form otherwise: `python -m pytest -k compare` once passed for it."""
    import cafedist
    from cafedist.compare import _command_line

    package = Path(cafedist.__file__).parent
    for argv, expected in ((["/venv/bin/cafedist", "compare", "--out", "x"], "cafedist compare --out x"),
                           ([str(package / "__main__.py"), "compare", "--out", "x"], "cafedist compare --out x"),
                           (["/venv/lib/pytest/__main__.py", "-k", "compare"], "")):
        monkeypatch.setattr(sys, "argv", argv)
        assert _command_line(None) == expected


def test_compare_in_a_batch_script_of_several_tasks_trains_its_runs_as_processes_of_their_own(tiny_config, tmp_path):
    """`cafedist compare` in an sbatch script with --ntasks=2 (its batch step has SLURM_PROCID=0
    and SLURM_NTASKS=2): its trainings inherited those variables, each took itself for rank 0 of
    2 and waited for a peer until dist.timeout_s, then failed. Children are processes of their own."""
    cfg = tiny_config(rounds=1, clients=3)
    env = env_for_tests(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_NODELIST="localhost", SLURM_JOB_ID="77")
    proc = cafedist_in_process("compare", "--config", str(cfg), "--algorithms", "fedavg", "--seeds", "1",
                               "--out", str(tmp_path / "cmp"), "dist.timeout_s=10", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "cmp" / "runs" / "fedavg" / "seed3" / "summary.json").read_text())["world_size"] == 1


def test_a_child_process_keeps_no_launchers_rank_variables(monkeypatch):
    from cafedist.childenv import PACKAGE_ROOT, child_env
    from cafedist.distributed.runtime import detect_launch

    for name, value in {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "n1", "MASTER_PORT": "29500",
                        "TORCHELASTIC_RUN_ID": "x", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0",
                        "SLURM_NODELIST": "n[1-2]", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4",
                        "PMI_RANK": "0", "PMI_SIZE": "4", "PMIX_RANK": "0", "PYTHONPATH": "/elsewhere"}.items():
        monkeypatch.setenv(name, value)
    assert detect_launch().world_size == 4  # the parent is a rank of a launch
    env = child_env(OMP_NUM_THREADS="1")
    assert detect_launch(env).launcher == "single"
    assert env["SLURM_NTASKS"] == "4" and env["SLURM_NODELIST"] == "n[1-2]"  # the job's own facts stay
    assert env["PYTHONPATH"] == os.pathsep.join([str(PACKAGE_ROOT), "/elsewhere"]) and env["OMP_NUM_THREADS"] == "1"


def test_submitted_runs_data_paths_are_not_checked_on_the_submitting_machine(tmp_path):
    """compare --submit checks each method's model only where its store is prepared already: a
    data.cache_dir on the compute nodes' local disks need not exist on the login node."""
    from cafedist.train.plan import check_buildable

    (tmp_path / "not-a-folder").write_text("")
    cfg = load_config(None, [f"data.cache_dir={tmp_path / 'not-a-folder' / 'stores'}"])
    assert check_buildable(cfg, prepare_store=False) is False
    with pytest.raises(ConfigError, match="data.cache_dir: cannot create"):
        check_buildable(cfg)  # a local compare builds the store here
