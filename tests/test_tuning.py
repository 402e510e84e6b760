"""Grids and tuning for `cafedist compare` (no training: fake runs), and the per-run tables."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cafedist import runtables, tuning
from cafedist.algorithms import ALGORITHMS
from cafedist.compare import Variant, available_variants, plan_runs
from cafedist.errors import ConfigError
from cafedist.tuning import GridAxis, Setting, choose, parse_axis, parse_grid, render_value, settings_for


# ----------------------------------------------------------------------------- grids
@pytest.mark.parametrize("value", [0.05, 1e-05, 3.0, 2, True, None, "group", "off", "a b", [1, 2], {"width": 8}])
def test_rendered_values_read_back_as_the_same_value(value):
    assert yaml.safe_load(render_value(value)) == value


def test_non_finite_values_render_as_yaml_floats_and_each_value_keeps_its_text_as_typed():
    """``--grid train.lr=.nan`` ran as ``train.lr=NaN``, a string, so the refusal said ``got 'NaN'``."""
    for value in (float("inf"), float("-inf")):
        assert yaml.safe_load(render_value(value)) == value
    assert render_value(float("nan")) == ".nan"
    # inside a mapping or list too (JSON's Infinity read back as a string: "got 'Infinity'")
    nested = {"width": float("inf"), "sizes": [1, float("-inf")], "norm": "group"}
    assert yaml.safe_load(render_value(nested)) == nested
    assert render_value({"width": 8}) == '{"width":8}'  # finite values as before (run folders keep their names)
    axis = parse_axis("train.lr=.nan, 1e-3 ,{width: 0},'x y'")
    assert axis.values == (".nan", "0.001", '{"width":0}', '"x y"')
    assert axis.given == (".nan", "1e-3", "{width: 0}", "'x y'")
    assert tuning.grid_names([axis])["train.lr=.nan"] == "--grid train.lr=.nan"
    assert tuning.grid_names([axis])["train.lr=0.001"] == "--grid train.lr=1e-3"


def test_grid_values_are_yaml_and_keys_are_checked():
    assert parse_axis("train.lr=0.02,0.05") == GridAxis("train.lr", ("0.02", "0.05"))
    assert parse_axis("model.options={width: 8},{width: 16}").values == ('{"width":8}', '{"width":16}')
    assert parse_axis("train.packed=true, off").values == ("true", "false")  # YAML 1.1 reads off as false
    for bad, why in [("train.lr", "expected KEY=v1,v2"), ("train.lr=", "expected KEY=v1,v2"),
                     ("train..lr=1", "empty component"), ("seed=1,2", "use --seeds"),
                     ("algorithm.name=fedavg", "use --algorithms"), ("train.lr=[1", "not valid YAML"),
                     ("train.lr=0.1,0.1", "value 0.1 is given twice"), ("train.lr=1,1.0", "value 1.0 is given twice"),
                     ("train.lr=0.1,1e-1", "value 0.1 is given twice")]:
        with pytest.raises(ConfigError, match=why):
            parse_axis(bad)
    known = list(ALGORITHMS)
    with pytest.raises(ConfigError, match="--grid train.lr: given twice"):
        parse_grid(["train.lr=1", "train.lr=2"], ["fedavg"], known=known)
    with pytest.raises(ConfigError, match="no algorithm 'nope'"):
        parse_grid(["algorithm.nope.mu=1"], ["fedavg"], known=known)
    with pytest.raises(ConfigError, match="applies to none of the chosen algorithms"):
        parse_grid(["algorithm.fedprox.mu=0.1,1"], ["fedavg", "cafedistill"], known=known)


def test_settings_are_the_product_of_the_axes_that_apply_in_grid_order():
    axes = parse_grid(["train.lr=0.02,0.05", "algorithm.cafedistill.mu=0.1,0.5,2"], ["fedavg", "cafedistill"],
                      known=list(ALGORITHMS))
    assert [s.label for s in settings_for(axes, "fedavg")] == ["train.lr=0.02", "train.lr=0.05"]
    caf = settings_for(axes, "cafedistill")
    assert [s.label for s in caf] == [f"train.lr={lr} algorithm.cafedistill.mu={mu}"
                                      for lr in ("0.02", "0.05") for mu in ("0.1", "0.5", "2")]
    assert [s.label for s in settings_for(axes, "cafedistill", max_trials=4)] == [s.label for s in caf[:4]]
    assert settings_for([], "fedavg") == [Setting()]  # no axis: the config as given
    with pytest.raises(ConfigError, match="--max-trials"):
        settings_for(axes, "fedavg", max_trials=0)


def test_ablations_take_the_cafedistill_section_and_run_dirs_are_unique(tiny_config, tmp_path):
    variants = [available_variants()[n] for n in ("cafedistill-nosel", "fedavg")]
    axes = parse_grid(["algorithm.cafedistill.mu=0.1,2", "train.lr=0.05"], [v.algorithm for v in variants],
                      known=list(ALGORITHMS))
    settings = {v.name: settings_for(axes, v.algorithm) for v in variants}
    runs = plan_runs(tiny_config(), variants, "0,1", tmp_path / "out", ["train.rounds=1"], settings)
    assert [(r.variant.name, r.setting.label, r.seed) for r in runs] == [
        ("cafedistill-nosel", "algorithm.cafedistill.mu=0.1 train.lr=0.05", 0),
        ("cafedistill-nosel", "algorithm.cafedistill.mu=0.1 train.lr=0.05", 1),
        ("cafedistill-nosel", "algorithm.cafedistill.mu=2 train.lr=0.05", 0),
        ("cafedistill-nosel", "algorithm.cafedistill.mu=2 train.lr=0.05", 1),
        ("fedavg", "train.lr=0.05", 0), ("fedavg", "train.lr=0.05", 1)]
    assert len({r.run_dir for r in runs}) == len({r.config_hash for r in runs}) == 6
    assert runs[2].run_dir == (tmp_path / "out" / "runs" / "cafedistill-nosel"
                               / "algorithm.cafedistill.mu=2,train.lr=0.05" / "seed0").resolve()
    assert runs[0].row == "cafedistill-nosel [algorithm.cafedistill.mu=0.1 train.lr=0.05]"
    from cafedist.config import load_config

    cfg = load_config(runs[2].config, list(runs[2].overrides))
    assert cfg.algorithm_params().mu == 2 and cfg.algorithm_params().student_selection is False  # ablation holds
    assert cfg.train.lr == 0.05 and cfg.train.rounds == 1


def test_setting_slugs_stay_unique_for_unsafe_or_long_values():
    a, b = Setting((("model.options", '{"x":"a/b"}'),)), Setting((("model.options", '{"x":"a_b"}'),))
    assert a.slug != b.slug and "/" not in a.slug
    long = Setting(tuple((f"algorithm.cafedistill.k{i}", "0.123456") for i in range(10)))
    assert len(long.slug) <= 89 and long.slug != Setting(long.pairs[:-1]).slug


def test_tune_needs_fixed_data():
    tuning.check_tunable(parse_grid(["train.lr=1"], ["fedavg"], known=list(ALGORITHMS)))
    with pytest.raises(ConfigError, match="--grid data.alpha: with --tune"):
        tuning.check_tunable([GridAxis("data.alpha", ("0.1", "0.3"))])


# ----------------------------------------------------------------------------- the choice (fake runs)
@dataclass
class FakeRun:
    variant: object
    setting: Setting
    seed: int
    summary: dict | None = None
    row: str = ""
    run_dir: Path = Path("runs/x")

    def finished_summary(self) -> dict | None:
        return self.summary


@dataclass
class FakeOutcome:
    run: FakeRun
    status: str = "done"
    message: str = ""


@dataclass(frozen=True)
class M:
    name: str


def _val(*last: float | None) -> list[FakeOutcome]:
    return [FakeOutcome(FakeRun(M("x"), Setting((("k", str(i)),)), 0,
                                None if v is None else {"val_acc_per_exit": [0.1, v], "acc_per_exit": [0.9, 0.99]}),
                        "failed" if v is None else "done") for i, v in enumerate(last)]


def test_choice_is_the_best_last_exit_validation_accuracy_first_on_ties():
    assert choose(_val(0.5, 0.7, 0.6)) == 1
    assert choose(_val(0.7, 0.5, 0.7)) == 0  # a tie goes to the earlier setting in grid order
    assert choose(_val(None, 0.2)) == 1  # failed trials are not candidates
    assert choose(_val(None, None)) is None
    no_val = _val(0.9)
    no_val[0].run.summary = {"acc_per_exit": [0.9, 0.99]}  # test accuracy alone never decides
    assert choose(no_val) is None


def test_tune_runs_trials_on_the_first_seed_then_the_choice_on_every_seed():
    executed: list[list[tuple]] = []
    scores = {("a", "0.02"): 0.6, ("a", "0.05"): 0.8, ("b", "0.02"): 0.7, ("b", "0.05"): 0.7}

    def plan(m, setting, seed):
        lr = setting.pairs[0][1] if setting.pairs else "-"
        return FakeRun(m, setting, seed, {"val_acc_per_exit": [scores.get((m.name, lr), 0.5)], "acc_per_exit": [0.0]})

    def execute(runs):
        executed.append([(r.variant.name, r.setting.label, r.seed) for r in runs])
        return [FakeOutcome(r) for r in runs]

    grid = [GridAxis("train.lr", ("0.02", "0.05")), GridAxis("algorithm.c.mu", ("1", "2"))]
    settings = {"a": settings_for(grid, "a"), "b": settings_for(grid, "b"), "c": settings_for(grid, "c")}
    result = tuning.tune([M("a"), M("b"), M("c")], settings, [7, 8], plan, execute)
    assert executed[0] == [(n, s.label, 7) for n in "abc" for s in settings[n]]  # every trial on seed 7
    assert result.chosen == {"a": 1, "b": 0, "c": 0}  # b: a tie, the first wins
    assert result.counts() == {"a": 2, "b": 2, "c": 4}
    assert executed[1] == [("a", "train.lr=0.05", 7), ("a", "train.lr=0.05", 8), ("b", "train.lr=0.02", 7),
                           ("b", "train.lr=0.02", 8), ("c", "train.lr=0.02 algorithm.c.mu=1", 7),
                           ("c", "train.lr=0.02 algorithm.c.mu=1", 8)]
    md = "\n".join(tuning.tuning_markdown(result, 7))
    assert "Unequal trial budgets" in md and "a 2, b 2, c 4 trials" in md
    assert "| a | 2 | `train.lr=0.05` | 80.00 |" in md
    text = runtables.trials_csv(result.trials, result.chosen)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 8 and [r["chosen"] for r in rows[:4]] == ["no", "yes", "yes", "no"]
    assert rows[1]["val_acc_exit1"] == "0.8" and rows[1]["seed"] == "7"


def test_a_choice_among_the_trials_that_did_not_fail_says_so():
    """A failed trial is no candidate; results.md's choice says the rest were chosen among."""
    result = tuning.TuneResult(trials={"x": _val(None, 0.4, 0.3), "y": _val(0.5)})
    result.chosen = {name: choose(trials) for name, trials in result.trials.items()}
    assert result.chosen == {"x": 1, "y": 0} and len(result.failed("x")) == 1 and result.failed("y") == []
    md = "\n".join(tuning.tuning_markdown(result, 0))
    assert "| x | 3 | `k=1` (among the 2 that did not fail) | 40.00 |" in md
    assert "| y | 1 | `k=0` | 50.00 |" in md


def test_a_final_that_is_its_trial_counts_as_trained_now_when_the_trial_was():
    """results.md said "2 trained now, 2 reused" for a tuning that trained all of them."""
    def plan(m, setting, seed):
        return FakeRun(m, setting, seed, {"val_acc_per_exit": [0.5]}, run_dir=Path(f"runs/{m.name}/{seed}"))

    earlier = {Path("runs/a/8")}  # a final on the second seed finished in an earlier call

    def execute(runs):
        return [FakeOutcome(r, "skipped" if r.seed == 7 or r.run_dir in earlier else "done", f"{r.seed}")
                for r in runs] if len(runs) == 2 and runs[0].seed != runs[1].seed else \
            [FakeOutcome(r, "done", "trial") for r in runs]

    result = tuning.tune([M("a")], {"a": [Setting()]}, [7, 8], plan, execute)
    assert [(o.status, o.message) for o in result.finals] == [("done", "trial"), ("skipped", "8")]
    assert result.finals[0] is result.trials["a"][0]


def test_a_stopped_trial_holds_back_every_choice_and_final():
    """With a trial stopped, the choice among the finished ones need not be the rerun's."""
    executed: list[list[tuple]] = []

    def plan(m, setting, seed):
        return FakeRun(m, setting, seed, {"val_acc_per_exit": [0.5]})

    def execute(runs):
        executed.append([(r.variant.name, r.setting.label) for r in runs])
        return [FakeOutcome(r, "stopped" if r.setting.label == "k=2" else "done") for r in runs]

    settings = {"a": [Setting((("k", "1"),)), Setting((("k", "2"),))], "b": [Setting()]}
    result = tuning.tune([M("a"), M("b")], settings, [7, 8], plan, execute)
    assert len(executed) == 1  # the trials only
    assert result.chosen == {"a": None, "b": None} and result.finals == []
    assert [o.run.setting.label for o in result.stopped] == ["k=2"]


# ----------------------------------------------------------------------------- per-run tables
def _run_dir(root: Path, name: str, accs: list[list[float]], val: bool) -> Path:
    d = root / "runs" / name / "seed0"
    d.mkdir(parents=True)
    lines = []
    for rnd, acc in enumerate(accs):
        rec = {"round": rnd, "acc_per_exit": acc, **({"val_acc_per_exit": [a / 2 for a in acc]} if val else {})}
        lines.append(json.dumps(rec))
    lines.append(json.dumps({"round": 1, "acc_per_exit": [0.0, 0.0]}))  # a resumed run redid round 1
    lines.append('{"round": 9, "acc')  # a line cut short by a kill
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_curves_runs_and_plot_from_run_directories(tmp_path):
    outcomes = []
    names = [f"method{i}" for i in range(12)]
    for i, name in enumerate(names):
        d = _run_dir(tmp_path, name, [[0.1, 0.2], [0.3, 0.4 + i / 100], [0.5, 0.6]], val=i == 0)
        s = {"rounds": 3, "acc_per_exit": [0.5, 0.6], **({"val_acc_per_exit": [0.25, 0.3]} if i == 0 else {}),
             "dynamic": [{"threshold": 0.6, "accuracy": 0.55, "mean_macs": 10.0}],
             "bytes_per_client_per_round": 100, "wall_seconds": 1.5}
        outcomes.append(FakeOutcome(FakeRun(Variant(name, name), Setting(), 0, s,
                                            row=name, run_dir=d)))
    outcomes.append(FakeOutcome(FakeRun(M("broken"), Setting(), 0, None, row="broken"), "failed", "boom"))
    assert [r["round"] for r in runtables.read_curve(outcomes[0].run.run_dir)] == [0, 1, 2]
    rows = list(csv.DictReader(io.StringIO(runtables.curves_csv(outcomes))))
    assert len(rows) == 12 * 3 * 2  # failed runs have no curve
    assert rows[2] == {"algorithm": "method0", "setting": "", "seed": "0", "round": "1", "exit": "1",
                       "acc": "0.0", "val_acc": ""}  # the resumed round's line wins (it has no val here)
    assert rows[0]["val_acc"] == "0.05" and rows[6]["algorithm"] == "method1" and rows[6]["val_acc"] == ""
    (tmp_path.parent / f"{tmp_path.name}-link").symlink_to(tmp_path)  # --out through a symlink
    runs = list(csv.DictReader(io.StringIO(runtables.runs_csv(outcomes, tmp_path.parent / f"{tmp_path.name}-link"))))
    assert runs[0]["val_acc_exit2"] == "0.3" and runs[1]["val_acc_exit2"] == "" and runs[1]["test_acc_exit2"] == "0.6"
    assert runs[0]["dynamic_accuracy_0.6"] == "0.55" and runs[0]["run_dir"] == "runs/method0/seed0"
    assert runs[-1]["status"] == "failed" and runs[-1]["test_acc_exit1"] == ""
    curves = runtables.mean_curves(outcomes)
    assert list(curves) == names and curves["method3"][1] == [(1, 0.2), (2, 0.0), (3, 0.6)]
    from cafedist.eval import plot_curves_per_exit

    plot_curves_per_exit(curves, tmp_path / "curves.png", title="12 methods")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
