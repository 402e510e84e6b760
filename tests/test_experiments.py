"""The experiment scripts that docs/RESULTS.md and docs/METHOD.md cite (experiments/*.py): a
wrong argument or a missing run folder fails with one line (no traceback, nothing written),
and a sweep neither hides a failed variant nor reuses a finished run of another config."""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cafedist.config import config_from_dict, dump_config
from cafedist.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(EXPERIMENTS / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in last, proc.stderr


def test_study_tables_refuses_a_study_without_runs(tmp_path):
    """A setting whose run folders are missing (not trained here, or a typo) wrote empty CSVs
    over the committed docs/results ones and emptied RESULTS.md's tables, with exit code 0."""
    results = tmp_path / "results"
    results.mkdir()
    csv = results / "study_T100_mnist5k_a0.3_runs.csv"
    csv.write_text("variant,seed\ncafedistill/train.lr=0.05/seed0,0\n")
    md = tmp_path / "RESULTS.md"
    md.write_text("<!-- study:mnist5k-a0.3:runs -->\n| committed |\n<!-- /study:mnist5k-a0.3:runs -->\n")
    before = md.read_text()
    proc = script("study_tables.py", "mnist5k-a0.3", "--study", tmp_path / "study", "--results", results,
                  "--results-md", md, cwd=tmp_path)
    one_line_error(proc, "mnist5k-a0.3", "no finished runs")
    assert csv.read_text().startswith("variant,seed\ncafedistill")
    assert md.read_text() == before
    assert sorted(p.name for p in results.iterdir()) == [csv.name]


@pytest.mark.parametrize("args, words", [
    (["missing.txt", "--out", "o"], ["missing.txt"]),
    (["--out", "o"], ["variants"]),
    (["--collect", "missing", "--out", "o"], ["missing"]),
])
def test_sweep_bad_arguments_fail_in_one_line(tmp_path, args, words):
    proc = script("sweep.py", *args, cwd=tmp_path)
    one_line_error(proc, *words)
    assert not (tmp_path / "o").exists()


def test_sweep_exits_non_zero_when_a_variant_fails(tmp_path, tiny_config):
    """A failed variant was printed as FAILED, but the sweep exited 0: a script running the
    sweep went on as if every variant had finished."""
    cfg = tiny_config(rounds=2)
    (tmp_path / "v.txt").write_text(f"bad --config {cfg} train.no_such_key=1\n")
    proc = script("sweep.py", "v.txt", "--out", "sw", "--jobs", "1", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "bad: FAILED" in proc.stdout


def test_sweep_does_not_reuse_a_finished_run_of_another_config(tmp_path, tiny_config):
    """A finished variant was skipped on its summary.json alone: after its line in the variants
    file changed, the old run was reported ok and tabulated under the new overrides."""
    cfg = tiny_config(rounds=2)
    variants = tmp_path / "v.txt"
    variants.write_text(f"a --config {cfg} data.val_fraction=0.1\n")
    first = script("sweep.py", "v.txt", "--out", "sw", "--jobs", "1", cwd=tmp_path)
    assert first.returncode == 0 and "a: ok" in first.stdout, first.stdout + first.stderr
    again = script("sweep.py", "v.txt", "--out", "sw", "--jobs", "1", cwd=tmp_path)  # the same: reused
    assert again.returncode == 0 and "a: ok" in again.stdout
    assert "different config" not in (tmp_path / "sw" / "a.log").read_text()
    variants.write_text(f"a --config {cfg} data.val_fraction=0.1 train.lr=0.02\n")
    changed = script("sweep.py", "v.txt", "--out", "sw", "--jobs", "1", cwd=tmp_path)
    assert changed.returncode == 1 and "a: FAILED" in changed.stdout, changed.stdout + changed.stderr
    assert "different config" in (tmp_path / "sw" / "a.log").read_text()


def test_sweep_does_not_skip_a_run_an_extension_took_past_its_summary(tmp_path, tiny_config):
    """`train --resume force train.rounds=4` on a variant's finished 2-round run, killed after its
    first new checkpoint: config.yaml and the run are the 4-round config's, summary.json still the
    2-round run's. The sweep skipped the variant as finished on that summary's hash ("a: ok") while
    its tables left it out (run_standing): now it runs train, which says why it does not resume
    the run under the old line, and resumes it once the line asks for the new total."""
    from conftest import cafedist, env_for_tests

    cfg = tiny_config(rounds=2)
    variants = tmp_path / "v.txt"
    variants.write_text(f"a --config {cfg}\n")
    first = script("sweep.py", "v.txt", "--out", "sw", "--jobs", "1", cwd=tmp_path)
    assert first.returncode == 0 and "a: ok" in first.stdout, first.stdout + first.stderr
    run = tmp_path / "sw" / "a"
    killed = cafedist("train", "--config", str(cfg), "--out", str(run), "--no-progress", "--resume", "force",
                      "train.rounds=4", env=env_for_tests(CAFEDIST_FAULT="kill@local:3"))
    assert killed.returncode == -9 and (run / "checkpoints" / "round_000002").is_dir(), killed.stderr
    assert json.loads((run / "summary.json").read_text())["rounds"] == 2
    again = script("sweep.py", "v.txt", "--out", "sw", "--jobs", "1", cwd=tmp_path)
    assert again.returncode == 1 and "a: FAILED" in again.stdout, again.stdout + again.stderr
    assert "different config (first difference: train.rounds (4 vs 2))" in (tmp_path / "sw" / "a.log").read_text()
    variants.write_text(f"a --config {cfg} train.rounds=4\n")
    extended = script("sweep.py", "v.txt", "--out", "sw", "--jobs", "1", cwd=tmp_path)
    assert extended.returncode == 0 and "a: ok" in extended.stdout, extended.stdout + extended.stderr
    assert json.loads((run / "summary.json").read_text())["rounds"] == 4
    with open(tmp_path / "sw" / "variants.csv") as fh:
        assert [r["rounds"] for r in csv.DictReader(fh)] == ["4"]


@pytest.mark.parametrize("name, args, words", [
    ("budget_vs_global.py", ["nodir", "--out", "x.csv"], ["nodir", "not a run directory"]),
    ("budget_vs_global.py", ["--summarize", "missing.csv"], ["missing.csv"]),
    ("budget_halvings.py", ["nodir"], ["nodir", "not a run directory"]),
    ("budget_reweighted.py", ["nodir"], ["nodir", "not a run directory"]),
    ("budget_learned_score.py", ["nodir"], ["nodir", "not a run directory"]),
    ("per_client_gap.py", ["nodir"], ["NAME=DIR", "nodir"]),
    ("per_client_gap.py", ["a=nodir", "b=nodir2"], ["nodir"]),
    ("theta_tradeoff.py", ["nodir"], ["nodir", "cafedist eval"]),
    ("conflict_tables.py", ["nodir", "--out", "x"], ["nodir", "not a folder"]),
    ("sweep_axis_tables.py", ["nodir", "--axis", "proxy", "--out", "x"], ["nodir", "no such run folder"]),
])
def test_a_missing_run_folder_fails_in_one_line(tmp_path, name, args, words):
    if name == "budget_learned_score.py":
        pytest.importorskip("sklearn")
    proc = script(name, *args, cwd=tmp_path)
    one_line_error(proc, *words)
    assert not (tmp_path / "x.csv").exists()


def test_study_tables_keeps_the_seed_tables_until_the_compare_has_chosen(tmp_path):
    """Before the compare has written trials.csv (an interrupted study) no lr is chosen: the
    seeds and paired tables were replaced by empty ones; the runs table is still rewritten."""
    run = tmp_path / "study" / "digits-a0.3" / "runs" / "cafedistill" / "train.lr=0.05" / "seed0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(config_from_dict({"seed": 0, "data": {"dataset": "digits"}})))
    (run / "summary.json").write_text('{"rounds": 1, "wall_seconds": 1.0, "acc_per_exit": [0.5, 0.6, 0.7], '
                                      '"val_acc_per_exit": [0.4, 0.5, 0.6]}')
    (run / "metrics.jsonl").write_text('{"round": 0, "loss": 1.0, "acc_per_exit": [0.5, 0.6, 0.7]}\n')
    md = tmp_path / "RESULTS.md"
    md.write_text("".join(f"<!-- study:digits-a0.3:{k} -->\n| committed {k} |\n<!-- /study:digits-a0.3:{k} -->\n"
                          for k in ("runs", "seeds", "paired")))
    proc = script("study_tables.py", "digits-a0.3", "--study", tmp_path / "study", "--results", tmp_path / "res",
                  "--results-md", md, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = md.read_text()
    assert "| committed seeds |" in text and "| committed paired |" in text
    assert "| committed runs |" not in text and "| cafedistill/train.lr=0.05/seed0 | 0 | 50.0 |" in text
    assert "trials.csv" in proc.stderr


def test_study_script_refuses_to_let_its_protocol_silently_win_over_an_override():
    """study_T100.sh puts its fixed settings after the caller's arguments: `train.rounds=5` was
    accepted and then overridden by the study's 100 rounds. It is refused; other compare
    arguments pass through (PYTHON=echo shows the command it would run)."""
    study = str(ROOT / "experiments" / "study_T100.sh")
    env = {**os.environ, "PYTHON": "echo"}
    refused = subprocess.run(["bash", study, "digits-a0.3", "train.rounds=5"], capture_output=True, text=True,
                             env=env, timeout=60)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip() == ("study_T100.sh: train.rounds=5: the study fixes train.rounds (its protocol); "
                                      "run cafedist compare directly for another")
    passed = subprocess.run(["bash", study, "digits-a0.3", "--seeds", "1"], capture_output=True, text=True,
                            env=env, timeout=60, check=True).stdout.split()
    assert passed[passed.index("--out") + 2:passed.index("--out") + 4] == ["--seeds", "1"]
    assert passed[-4:] == ["train.rounds=100", "train.eval_every=5", "data.val_fraction=0.1", "checkpoint.every=10"]


# ----------------------------------------------------------------------------- the numbers the scripts print
def _experiment(name: str, monkeypatch: pytest.MonkeyPatch):
    """The script's module, imported as when run (experiments/ on the path: study_tables imports sweep)."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    return importlib.import_module(name)


def _study_row(variant: str, test3: float, val3: float) -> dict[str, str]:
    """A row of a study's runs.csv (sweep.py --collect), exits 1 and 2 left empty."""
    return {"variant": variant, "seed": variant.rsplit("seed", 1)[1], "test_exit1": "", "test_exit2": "",
            "test_exit3": str(test3), "val_exit3": str(val3)}


def test_study_tables_seed_and_paired_numbers(monkeypatch):
    """Each method at its chosen lr only: mean ± sample sd over its seeds (test, then
    validation); CAFEDistill minus each method on the seeds both have, mean ± standard error."""
    st = _experiment("study_tables", monkeypatch)
    rows = [_study_row("cafedistill/train.lr=0.05/seed0", 0.80, 0.5),
            _study_row("cafedistill/train.lr=0.05/seed1", 0.82, 0.6),
            _study_row("cafedistill/train.lr=0.05/seed2", 0.84, 0.7),  # fedavg has no seed 2
            _study_row("cafedistill/train.lr=0.02/seed0", 0.99, 0.1),  # trials not chosen
            _study_row("fedavg/train.lr=0.02/seed0", 0.70, 0.5),
            _study_row("fedavg/train.lr=0.02/seed1", 0.75, 0.5),
            _study_row("fedavg/train.lr=0.05/seed0", 0.10, 0.9)]
    chosen = {"cafedistill": "train.lr=0.05", "fedavg": "train.lr=0.02"}
    assert st.seeds_table(rows, chosen).splitlines()[2:] == [
        "| cafedistill (0.05) | 3 |  |  | 82.0 ± 2.0 | 60.0 ± 10.0 |",  # sample sd of 80, 82, 84: 2
        "| fedavg (0.02) | 2 |  |  | 72.5 ± 3.5 | 50.0 ± 0.0 |"]
    # seeds 0 and 1: differences 10 and 7 points, mean 8.5, sd 2.12, standard error 2.12 / √2 = 1.5
    assert st.paired_table(rows, chosen).splitlines()[2:] == ["| fedavg | 2 |  |  | +8.5 ± 1.5 |"]


def test_theta_tradeoff_reads_the_cost_and_saving_of_theta_and_the_best_within_the_loss(tmp_path, monkeypatch):
    tt = _experiment("theta_tradeoff", monkeypatch)
    sweep = [{"threshold": th, "accuracy": acc, "macs_reduction": red}
             for th, acc, red in ((0.5, 0.85, 0.5), (0.6, 0.88, 0.4), (0.8, 0.895, 0.2), (1.0, 0.9, 0.0))]
    (tmp_path / "eval.json").write_text(json.dumps({"acc_per_exit": [0.6, 0.9], "dynamic": sweep}))
    # θ = 0.6 costs 2 points of the last exit's 90 % for 40 % fewer MACs; within 2.01 points
    # θ = 0.5 (5 points) is out, so the best saving is θ = 0.6's
    assert tt.tradeoff(tmp_path, 0.6, 2.01) == pytest.approx((2.0, 40.0, 40.0))
    assert tt.tradeoff(tmp_path, 0.6, 5.0)[2] == pytest.approx(50.0)


def test_per_client_gap_splits_clients_into_thirds_by_training_size(tmp_path, monkeypatch, capsys):
    """The gap is the first method minus the other, per client: here +10 points on the two
    smallest clients, +5 on the middle two, 0 on the two largest."""
    gap = _experiment("per_client_gap", monkeypatch)
    for name, accs in (("a", [0.5] * 6), ("b", [0.4, 0.4, 0.45, 0.45, 0.5, 0.5])):
        run = tmp_path / name / "seed0"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"acc_per_client": [[0.1, a] for a in accs]}))
    monkeypatch.setattr(gap, "train_sizes", lambda run_dir: [10, 20, 30, 40, 50, 60])  # the store's, per client
    monkeypatch.setattr("sys.argv", ["per_client_gap.py", f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}", "--seeds", "0"])
    gap.main()
    assert capsys.readouterr().out.splitlines() == [
        "6 clients; smallest third <= 20 training samples, largest third >= 50",
        "a - b: mean +5.0, smallest third +10.0, largest third +0.0, correlation with training size -0.96 (6 clients)"]


def test_study_tables_finds_the_runs_of_a_setting_of_several_keys(monkeypatch):
    """trials.csv labels a setting with spaces between keys, compare's folders with commas (a
    value with unsafe characters: hashed): a grid over two keys dropped the method silently."""
    from cafedist.tuning import Setting

    st = _experiment("study_tables", monkeypatch)
    two = Setting((("train.lr", "0.05"), ("algorithm.cafedistill.mu", "2")))
    odd = Setting((("train.lr", "0.05"), ("model.options", "{width: 8}")))
    rows = [_study_row(f"cafedistill/{two.slug}/seed0", 0.8, 0.5), _study_row(f"fedavg/{odd.slug}/seed0", 0.7, 0.5),
            _study_row("fedper/seed0", 0.6, 0.5)]
    assert [r["variant"] for r in st.chosen_runs(rows, "cafedistill", two.label)] == [f"cafedistill/{two.slug}/seed0"]
    assert [r["variant"] for r in st.chosen_runs(rows, "fedavg", odd.label)] == [f"fedavg/{odd.slug}/seed0"]
    assert [r["variant"] for r in st.chosen_runs(rows, "fedper", "")] == ["fedper/seed0"]



def _conflict_row(arm: str, seed: int, neg_h2: float, test3: float, setting: str = "mnist5k a0.3") -> dict:
    return {"setting": setting, "arm": arm, "seed": seed, "neg_trained_h1": 0.3, "neg_all_h1": 0.4,
            "neg_all_h2": neg_h2, "neg_all_q4": neg_h2 + 0.01, "cos_all_h2": 0.1 + seed / 100,
            "test_exit1": 0.9, "test_exit2": 0.95, "test_exit3": test3}


def test_conflict_tables_arms_and_seed_matched_differences(monkeypatch):
    """Per arm: mean ± sample sd over seeds; selection minus no selection on the seeds both
    have, mean ± standard error; the control run (no record) in neither table."""
    ct = _experiment("conflict_tables", monkeypatch)
    rows = [_conflict_row("selection", 0, 0.30, 0.96), _conflict_row("selection", 1, 0.34, 0.94),
            _conflict_row("selection", 2, 0.50, 0.90),  # no selection has no seed 2
            _conflict_row("no selection", 0, 0.40, 0.95), _conflict_row("no selection", 1, 0.40, 0.95),
            _conflict_row("no record", 0, 0.0, 0.0)]
    arms = ct.arms_table(rows).splitlines()[2:]
    assert arms == ["| mnist5k a0.3 | selection | 3 | 30.0 ± 0.0 | 40.0 ± 0.0 | 38.0 ± 10.6 | 39.0 ± 10.6 "
                    "| 0.110 ± 0.010 | 90.0 ± 0.0 | 95.0 ± 0.0 | 93.3 ± 3.1 |",
                    "| mnist5k a0.3 | no selection | 2 | 30.0 ± 0.0 | 40.0 ± 0.0 | 40.0 ± 0.0 | 41.0 ± 0.0 "
                    "| 0.105 ± 0.007 | 90.0 ± 0.0 | 95.0 ± 0.0 | 95.0 ± 0.0 |"]
    # seeds 0 and 1: -10 and -6 points of negative share (mean -8, sd 2.83, se 2.0); +1 and -1 at e3;
    # the same seed's cosines are equal here
    assert ct.paired_table(rows).splitlines()[2:] == [
        "| mnist5k a0.3 | 2 | -10.0, -6.0 | -8.0 ± 2.0 | -8.0 ± 2.0 | +0.000 ± 0.000 | +0.0 ± 0.0 | +0.0 ± 0.0 "
        "| +0.0 ± 1.0 |"]


def test_conflict_tables_tells_arms_from_the_config_and_compares_trainings(monkeypatch):
    ct = _experiment("conflict_tables", monkeypatch)

    def cfg(diagnostics=("conflict",), **params):
        return config_from_dict({"train": {"diagnostics": list(diagnostics)},
                                 "algorithm": {"name": "cafedistill", "cafedistill": params}})
    assert ct.arm_of(cfg()) == "selection"
    assert ct.arm_of(cfg(student_selection=False)) == "no selection"
    assert ct.arm_of(cfg(unselected="ce")) == "CE until selected"
    assert ct.arm_of(cfg(diagnostics=())) == "no record"
    # runs of a study's other arms counted as "selection"
    with pytest.raises(SystemExit, match="algorithm 'fedper' is no arm of the conflict study"):
        ct.arm_of(config_from_dict({"train": {"diagnostics": ["conflict"]}, "algorithm": {"name": "fedper"}}))
    for params in ({"cross_client_kd": False}, {"last_exit_kd": True}):
        with pytest.raises(SystemExit, match="no arm of the conflict study"):
            ct.arm_of(cfg(**params))
    assert ct.setting_of(config_from_dict({"data": {"dataset": "digits", "alpha": 0.3},
                                           "model": {"arch": "resnet18"}})) == "digits a0.3 resnet18"
    assert ct.setting_of(config_from_dict({"data": {"dataset": "digits", "alpha": 0.3}})) == "digits a0.3"
    a = [{"round": 0, "loss": 1.5, "acc_per_exit": [0.5, 0.6], "conflict": {"neg_all": 0.3}, "seconds": 2.0}]
    b = [{"round": 0, "loss": 1.5, "acc_per_exit": [0.5, 0.6], "seconds": 9.0}]  # no record, another time
    assert ct.same_training(a, b)
    assert not ct.same_training(a, [{**b[0], "loss": 1.5000001}])
    runs = [{"row": {"setting": "s", "arm": "selection"},
             "records": [{"round": 0, "conflict": {"neg_trained": None, "neg_all": 0.5}},
                         {"round": 1, "conflict": {"neg_trained": 0.2, "neg_all": 0.2}}]},
            {"row": {"setting": "s", "arm": "selection"},
             "records": [{"round": 0, "conflict": {"neg_trained": 0.1, "neg_all": 0.3}}]},
            {"row": {"setting": "s", "arm": "no record"}, "records": [{"round": 0, "conflict": None}]}]
    records = [{"round": r, "conflict": {"pairs": ["0-1", "1-2"], "all": {"0-1": 0.1 * r, "1-2": None}}}
               for r in range(4)]
    assert ct.pair_cosines(records, 2, 4) == {"cos_pair_0-1": pytest.approx(0.25), "cos_pair_1-2": None}
    rows = [{"setting": "s", "arm": "selection", "cos_pair_0-1": c, "cos_pair_1-2": 0.1} for c in (0.2, 0.4)]
    assert ct.pairs_table(rows).splitlines()[2:] == ["| s | selection | 0.300 ± 0.141 | 0.100 ± 0.000 |"]
    assert ct.negative_share_curves(runs) == [
        {"setting": "s", "arm": "selection", "round": 0, "neg_trained": 0.1, "neg_all": pytest.approx(0.4), "seeds": 2},
        {"setting": "s", "arm": "selection", "round": 1, "neg_trained": 0.2, "neg_all": 0.2, "seeds": 1}]


def test_conflict_tables_read_as_many_exits_as_the_runs_have(monkeypatch):
    """A 4-exit network's runs get a column per exit (the tables read exits 1-3 only)."""
    ct = _experiment("conflict_tables", monkeypatch)
    rows = [{**_conflict_row(arm, 0, neg, 0.9), "test_exit4": e4} for arm, neg, e4 in
            (("selection", 0.3, 0.97), ("no selection", 0.4, 0.95))]
    assert ct.arms_table(rows).splitlines()[0].endswith("| test e3 | test e4 |")
    assert ct.arms_table(rows).splitlines()[2].endswith("| 90.0 | 97.0 |")
    assert ct.paired_table(rows).splitlines()[2].endswith("| +0.0 | +2.0 |")


def test_conflict_tables_refuses_one_arm_twice_for_a_seed(monkeypatch, tmp_path):
    """One arm's runs at two lrs in one folder would pair by seed alone: refused in one line,
    nothing written."""
    ct = _experiment("conflict_tables", monkeypatch)
    for name in ("a", "b"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    monkeypatch.setattr(ct, "read_run", lambda d: {"row": {**_conflict_row("selection", 0, 0.3, 0.9), "run": d.name},
                                                   "records": []})
    monkeypatch.setattr("sys.argv", ["conflict_tables.py", str(tmp_path / "runs"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="holds 2 runs of mnist5k a0.3, selection, seed 0 .a, b.; give each lr"):
        ct.main()
    assert not (tmp_path / "o").exists()


def test_conflict_tables_windows_and_settings_are_kept_apart(monkeypatch, tmp_path):
    """A run of 8 rounds: r >= T/2 is rounds 4-7, its last quarter rounds 6-7; the pairing
    of seeds stays within a setting; a window's rounds are lo <= round < hi."""
    ct = _experiment("conflict_tables", monkeypatch)
    sweep = _experiment("sweep", monkeypatch)
    records = [{"round": r, "loss": 1.0, "conflict": {"pairs": ["0-1"], "all": {"0-1": float(r)}, "trained": {},
                                                      "neg_all": r / 10, "neg_trained": None}} for r in range(8)]
    assert sweep.conflict_window(records, 2, 4)["neg_all"] == pytest.approx(0.25)
    assert ct.pair_cosines(records, 1, 3) == {"cos_pair_0-1": pytest.approx(1.5)}
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(config_from_dict(
        {"train": {"diagnostics": ["conflict"]}, "algorithm": {"name": "cafedistill"}})))
    (run / "summary.json").write_text(json.dumps({"rounds": 8, "acc_per_exit": [0.5, 0.6, 0.7]}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    row = ct.read_run(run)["row"]
    assert row["neg_all_h1"] == pytest.approx(0.15) and row["neg_all_h2"] == pytest.approx(0.55)
    assert row["neg_all_q4"] == pytest.approx(0.65)
    assert row["cos_pair_0-1"] == pytest.approx(5.5)
    rows = [_conflict_row("selection", 0, 0.30, 0.96), _conflict_row("no selection", 0, 0.40, 0.95),
            _conflict_row("selection", 0, 0.50, 0.90, setting="digits a0.3")]  # no twin in its setting
    assert [line.split(" | ")[:2] for line in ct.paired_table(rows).splitlines()[2:]] == [["| mnist5k a0.3", "1"]]


def test_a_finished_runs_rows_end_at_its_summary_not_at_a_killed_extension(monkeypatch, tmp_path):
    """`train --resume force train.rounds=5` on a finished 2-round run, SIGKILLed before its first
    checkpoint, leaves rows of rounds 2.. (another config's) after the run's own until the next
    train drops them; the run is still finished (summary.json, config.yaml unchanged). The
    sweep's curves.csv and conflict_tables' per-round records read them as the run's own, as
    compare's curves did (cafedist.runtables.read_curve)."""
    sweep = _experiment("sweep", monkeypatch)
    ct = _experiment("conflict_tables", monkeypatch)
    run = tmp_path / "runs" / "seed0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(config_from_dict(
        {"train": {"diagnostics": ["conflict"]}, "algorithm": {"name": "cafedistill"}})))
    (run / "summary.json").write_text(json.dumps({"rounds": 2, "wall_seconds": 1.0, "acc_per_exit": [0.5, 0.6]}))
    conflict = {"pairs": ["0-1"], "all": {"0-1": 0.1}, "trained": {}, "neg_all": 0.2, "neg_trained": None}
    rows = [{"round": r, "loss": 1.0, "acc_per_exit": [0.5, 0.6] if r < 2 else [0.9, 0.9], "conflict": conflict}
            for r in range(5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sweep.tabulate_runs([("seed0", run, "")], tmp_path / "tables")
    with open(tmp_path / "tables" / "curves.csv") as fh:
        assert [r["round"] for r in csv.DictReader(fh)] == ["0", "1"]
    assert [r["round"] for r in ct.read_run(run)["records"]] == [0, 1]


def test_a_run_whose_extension_checkpointed_past_its_summary_is_no_finished_run(monkeypatch, tmp_path):
    """`train --resume force train.rounds=5` on a finished 2-round run, stopped after its
    checkpoint of round 3: config.yaml is the new config's, the run is unfinished (its rows run
    to round 3) and summary.json still the 2-round run's. The tables took that summary as the
    finished run's, beside the new config's (its rounds, lr, ...) and curves cut at round 2."""
    sweep = _experiment("sweep", monkeypatch)
    ct = _experiment("conflict_tables", monkeypatch)
    pt = _experiment("sweep_axis_tables", monkeypatch)
    run = tmp_path / "runs" / "seed0"
    (run / "checkpoints" / "round_000003").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(config_from_dict(
        {"train": {"rounds": 5, "diagnostics": ["conflict"]}, "algorithm": {"name": "cafedistill"}})))
    (run / "summary.json").write_text(json.dumps({"rounds": 2, "wall_seconds": 1.0, "acc_per_exit": [0.5, 0.6]}))
    rows = [{"round": r, "loss": 1.0, "acc_per_exit": [0.5, 0.6]} for r in range(5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sweep.finished_runs(tmp_path) == []
    assert ct.read_run(run) is None and pt.read_run(run) is None
    sweep.tabulate_runs([("seed0", run, "")], tmp_path / "tables")
    for table in ("variants.csv", "curves.csv"):
        with open(tmp_path / "tables" / table) as fh:
            assert list(csv.DictReader(fh)) == []


def _proxy_row(share: float, arm: str, seed: int, test1: float, test3: float) -> dict:
    return {**_levels(proxy_fraction=share), "arm": arm, "seed": seed,
            "proxy_images": int(1800 * share), "train_per_client": 100.0, "test_exit1": test1, "test_exit2": 0.9,
            "test_exit3": test3}


def test_sweep_axis_tables_arms_contrasts_and_client_thirds(monkeypatch):
    """Arms told from the config; per share and arm mean ± sample sd; seed-matched contrasts only
    on the seeds both arms have and only within a share; the gap to FedPer on the smallest and
    the largest third of clients pooled over seeds."""
    pt = _experiment("sweep_axis_tables", monkeypatch)

    def cfg(name="cafedistill", **params):
        return config_from_dict({"algorithm": {"name": name, name: params}})
    assert pt.arm_of(cfg()) == "CAFEDistill"
    assert pt.arm_of(cfg(cross_client_kd=False)) == "no cross-client KD"
    assert pt.arm_of(cfg(last_exit_kd=True)) == "last-exit KD"
    assert pt.arm_of(cfg(student_selection=False)) == "no selection"  # it counted as CAFEDistill
    assert pt.arm_of(cfg("fedper")) == "FedPer"
    assert pt.arm_of(cfg("fedavg")) == "FedAvg"
    with pytest.raises(SystemExit, match="algorithm 'ditto' is no arm of these studies"):
        pt.arm_of(cfg("ditto"))  # it counted as CAFEDistill
    # the width axis reads the CNN's option, its default when the file leaves it out
    assert pt.model_width(config_from_dict({"model": {"arch": "cnn", "options": {"width": 4}}})) == 4
    assert pt.model_width(config_from_dict({"model": {"arch": "cnn"}})) == 32
    assert pt.model_width(config_from_dict({"model": {"arch": "resnet18"}})) is None
    # the participation axis reads clients_per_round as a share: a count of 10 of 40 clients is 0.25
    assert pt.participation_share(config_from_dict({"data": {"clients": 40}, "train": {"clients_per_round": 10}})) \
        == 0.25
    assert pt.participation_share(config_from_dict({"data": {"clients": 40}, "train": {"clients_per_round": 0.5}})) \
        == 0.5
    rows = [_proxy_row(0.1, "CAFEDistill", 0, 0.90, 0.95), _proxy_row(0.1, "CAFEDistill", 1, 0.92, 0.97),
            _proxy_row(0.1, "FedPer", 0, 0.80, 0.96), _proxy_row(0.1, "FedPer", 1, 0.84, 0.96),
            _proxy_row(0.2, "CAFEDistill", 0, 0.5, 0.5),  # another share: never paired with 0.1's FedPer
            _proxy_row(0.1, "no cross-client KD", 2, 0.1, 0.1)]  # no CAFEDistill twin of seed 2
    assert pt.arms_table(rows, pt.AXES["proxy"]).splitlines()[2:] == [  # by share, then in the order of ARMS
        "| 0.1 | CAFEDistill | 2 | 180 | 100 | 91.0 ± 1.4 | 90.0 ± 0.0 | 96.0 ± 1.4 |",
        "| 0.1 | no cross-client KD | 1 | 180 | 100 | 10.0 | 90.0 | 10.0 |",
        "| 0.1 | FedPer | 2 | 180 | 100 | 82.0 ± 2.8 | 90.0 ± 0.0 | 96.0 ± 0.0 |",
        "| 0.2 | CAFEDistill | 1 | 360 | 100 | 50.0 | 90.0 | 50.0 |"]
    # seeds 0 and 1: +10 and +8 points at exit 1 (mean 9, se 1), -1 and +1 at exit 3
    assert pt.contrast_table(rows, pt.AXES["proxy"]).splitlines()[2:] == [
        "| 0.1 | CAFEDistill − FedPer | 2 | +9.0 ± 1.0 | +0.0 ± 0.0 | +0.0 ± 1.0 |"]
    runs = [{"row": {"proxy_fraction": 0.1, "arm": arm, "seed": seed},
             "clients": [(n, acc + (0.1 if arm == "CAFEDistill" and n > 25 else 0.0)) for n, acc in
                         zip((10 + seed, 20 + seed, 30 + seed), (0.5, 0.5, 0.5))]}
            for arm in ("CAFEDistill", "FedPer") for seed in (0, 1)]
    # six clients: the two smallest (10, 11) level, the two largest (31, 32) +10 points
    assert pt.thirds_gaps(runs, "CAFEDistill", "FedPer", pt.AXES["proxy"]) == {
        0.1: (pytest.approx(0.0), pytest.approx(10.0), 6)}


def test_sweep_axis_tables_by_clients_groups_and_pairs_by_client_count(monkeypatch):
    """Along the clients axis the same rows group and pair by data.clients, not by proxy share."""
    pt = _experiment("sweep_axis_tables", monkeypatch)
    rows = [{**_proxy_row(0.1, arm, 0, t1, 0.9), "clients": n}
            for n, arm, t1 in ((10, "CAFEDistill", 0.9), (10, "FedPer", 0.8),
                               (40, "CAFEDistill", 0.7), (40, "FedPer", 0.75))]
    clients = pt.AXES["clients"]
    assert [line.split(" | ")[:2] for line in pt.arms_table(rows, clients).splitlines()[2:]] == [
        ["| 10", "CAFEDistill"], ["| 10", "FedPer"], ["| 40", "CAFEDistill"], ["| 40", "FedPer"]]
    assert pt.contrast_table(rows, clients).splitlines()[2:] == [
        "| 10 | CAFEDistill − FedPer | 1 | +10.0 | +0.0 | +0.0 |",
        "| 40 | CAFEDistill − FedPer | 1 | -5.0 | +0.0 | +0.0 |"]


def _levels(**changes) -> dict:
    """A run's levels on every axis of sweep_axis_tables, with ``changes``."""
    return {"setting": "s", "arch": "cnn", "proxy_fraction": 0.1, "clients": 10, "width": 16, "rounds": 100,
            "local_epochs": 2, "participation": 1.0, **changes}


@pytest.mark.parametrize("axis, rows, message", [
    # a clients study whose runs differ in proxy share would pair them as if they did not
    ("clients", {"a": _levels(), "b": _levels(proxy_fraction=0.2)},
     "several proxy_fraction .0.1, 0.2. where --axis clients varies only clients"),
    # a width study whose runs differ in client count; the clients axis refuses widths alike
    ("width", {"a": _levels(width=4), "b": _levels(clients=20, width=8)},
     "several clients .10, 20. where --axis width varies only width"),
    ("clients", {"a": _levels(width=4), "b": _levels(clients=20, width=8)},
     "several width .4, 8. where --axis clients varies only clients"),
    # a schedule study whose runs differ in width; the width axis refuses runs of several lengths
    ("rounds", {"a": _levels(width=4), "b": _levels(width=8, rounds=300)},
     "several width .4, 8. where --axis rounds varies only rounds"),
    ("width", {"a": _levels(width=4), "b": _levels(width=8, rounds=300)},
     "several rounds .100, 300. where --axis width varies only width"),
    # a local-epochs study whose runs differ in length, and the other way round
    ("epochs", {"a": _levels(local_epochs=2), "b": _levels(local_epochs=5, rounds=300)},
     "several rounds .100, 300. where --axis epochs varies only local_epochs"),
    ("rounds", {"a": _levels(local_epochs=2), "b": _levels(local_epochs=5, rounds=300)},
     "several local_epochs .2, 5. where --axis rounds varies only rounds"),
    # a participation study whose runs differ in client count, and the other way round
    ("participation", {"a": _levels(participation=0.25), "b": _levels(participation=1.0, clients=20)},
     "several clients .10, 20. where --axis participation varies only participation"),
    ("clients", {"a": _levels(participation=0.25), "b": _levels(participation=1.0, clients=20)},
     "several participation .0.25, 1.0. where --axis clients varies only clients"),
    # a 3-exit CNN and a 4-exit ResNet of one width would pair as one level
    ("width", {"a": _levels(), "b": _levels(arch="resnet18")},
     "several arch .cnn, resnet18. where --axis width varies only width"),
    # the tables pair arms by level and seed only: digits and mnist5k runs would pair across datasets
    ("proxy", {"a": {"setting": "set_a"}, "b": {"setting": "set_b"}},
     "several settings .set_a, set_b.; give each its own folder")])
def test_sweep_axis_tables_refuses_a_folder_whose_runs_it_would_pair_wrongly(monkeypatch, tmp_path, axis, rows,
                                                                              message):
    """Runs of several settings, or along one axis runs where the other varies too: refused in
    one line, nothing written."""
    pt = _experiment("sweep_axis_tables", monkeypatch)
    for name in rows:
        (tmp_path / "runs" / name).mkdir(parents=True)
    monkeypatch.setattr(pt, "read_run", lambda d: {"row": rows[d.name], "clients": []})
    monkeypatch.setattr("sys.argv", ["sweep_axis_tables.py", str(tmp_path / "runs"), "--axis", axis,
                                     "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=message):
        pt.main()
    assert not (tmp_path / "o").exists()


def test_sweep_axis_tables_says_in_one_line_which_run_it_cannot_read(monkeypatch, tmp_path):
    """A run whose store is not where its config says (relative to another working directory)
    is one line naming the run, nothing written."""
    pt = _experiment("sweep_axis_tables", monkeypatch)
    (tmp_path / "runs" / "a").mkdir(parents=True)

    def unreadable(run_dir):
        raise DataError("store data/stores/x.h5 does not exist")
    monkeypatch.setattr(pt, "read_run", unreadable)
    monkeypatch.setattr("sys.argv", ["sweep_axis_tables.py", str(tmp_path / "runs"), "--axis", "proxy",
                                     "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="runs/a: store data/stores/x.h5 does not exist .run it from the directory"):
        pt.main()
    assert not (tmp_path / "o").exists()


def test_sweep_axis_tables_chooses_each_arms_lr_on_validation_over_the_common_seeds(monkeypatch):
    """--choose-lr: per level and arm the lr with the higher mean last-exit validation accuracy
    over the seeds both lrs have (a seed only one lr ran does not tip it), ties to the smaller
    lr; test accuracy is never read; every run of the chosen lr is kept."""
    pt = _experiment("sweep_axis_tables", monkeypatch)

    def run(level, arm, lr, seed, val3, test3=0.5):
        return {"row": {**_proxy_row(0.1, arm, seed, 0.5, test3), "width": level, "lr": lr, "val_exit1": 0.0,
                        "val_exit3": val3}, "clients": []}
    runs = [run(2, "FedPer", 0.05, 0, 0.80, test3=0.99), run(2, "FedPer", 0.05, 1, 0.80, test3=0.99),
            run(2, "FedPer", 0.02, 0, 0.90), run(2, "FedPer", 0.02, 1, 0.90),
            run(2, "FedPer", 0.05, 2, 1.00),  # seed 2 ran at 0.05 alone: not compared, still kept if chosen
            run(2, "CAFEDistill", 0.02, 0, 0.7), run(2, "CAFEDistill", 0.05, 0, 0.7),  # a tie
            run(4, "FedPer", 0.05, 0, 0.6)]  # another level: chosen on its own
    chosen, table = pt.choose_lrs(runs, pt.AXES["width"])
    assert sorted((r["row"]["width"], r["row"]["arm"], r["row"]["lr"], r["row"]["seed"]) for r in chosen) == [
        (2, "CAFEDistill", 0.02, 0), (2, "FedPer", 0.02, 0), (2, "FedPer", 0.02, 1), (4, "FedPer", 0.05, 0)]
    assert "| 2 | FedPer | 0.02 | 2 | 90.0 (2) | yes |" in table.splitlines()
    assert "| 2 | FedPer | 0.05 | 3 | 80.0 (2) |  |" in table.splitlines()


@pytest.mark.parametrize("seed_lrs, flags, message", [
    ([(0, 0.02), (0, 0.05)], [], "2 runs of width 2, FedPer, seed 0 .lr 0.02, 0.05.; pass --choose-lr"),
    ([(0, 0.02), (0, 0.02)], ["--choose-lr"], "seed 0 .lr 0.02, 0.02.; the same run twice: give each folder once"),
    # a choice for seed 0 must not let seed 1's same run twice through
    ([(0, 0.02), (0, 0.05), (1, 0.02), (1, 0.02)], ["--choose-lr"], "seed 1 .lr 0.02, 0.02.; the same run twice")])
def test_sweep_axis_tables_refuses_two_runs_of_one_arm_seed_and_level_unless_it_may_choose(
        monkeypatch, tmp_path, seed_lrs, flags, message):
    """Folders holding one arm, level and seed twice: the tables would pair either, so it is
    refused (at two lrs, --choose-lr reads the one validation prefers), nothing written."""
    pt = _experiment("sweep_axis_tables", monkeypatch)
    rows = {}
    for i, (seed, lr) in enumerate(seed_lrs):
        (tmp_path / f"root{i}" / "run").mkdir(parents=True)
        rows[f"root{i}"] = _levels(width=2, arm="FedPer", seed=seed, lr=lr)
    monkeypatch.setattr(pt, "read_run", lambda d: {"row": dict(rows[d.parent.name]), "clients": []})
    monkeypatch.setattr("sys.argv", ["sweep_axis_tables.py", *(str(tmp_path / name) for name in rows),
                                     "--axis", "width", *flags, "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=message):
        pt.main()
    assert not (tmp_path / "o").exists()


def test_sweep_reuses_a_finished_run_of_its_own_config_only(monkeypatch, tmp_path):
    """A variant whose folder holds a finished run is skipped only when that run is this
    variant's: its config's hash, or the same run under a config file that differs in another
    algorithm's section (earlier_hashes); a run of another lr is not this variant's."""
    from cafedist.config import config_hash, load_config

    sweep = _experiment("sweep", monkeypatch)
    base = tmp_path / "base.yaml"
    base.write_text(dump_config(config_from_dict({"train": {"rounds": 2}})))
    run = tmp_path / "run"
    run.mkdir()
    trained = load_config(base, [])
    (run / "config.yaml").write_text(dump_config(trained))
    (run / "summary.json").write_text(json.dumps({"config_hash": config_hash(trained)}))
    assert sweep.finished(["--config", str(base)], run)
    assert sweep.finished(["--config", str(base), "algorithm.fedprox.mu=0.5"], run)  # another section only
    assert not sweep.finished(["--config", str(base), "train.lr=0.2"], run)


def test_protocol_tables_reads_final_validation_chosen_and_test_max_rounds(monkeypatch, tmp_path):
    """Each run at its chosen lr only (the trials' choice; a row without accuracies skipped);
    final = the last round, val_best = the round of the highest last-exit validation accuracy
    (the later of equals, every exit at that one round), test_max = each exit's own maximum."""
    pt = _experiment("protocol_tables", monkeypatch)
    trials = tmp_path / "trials.csv"
    trials.write_text("algorithm,setting,chosen\nfedper,train.lr=0.02,yes\nfedper,train.lr=0.05,no\n")
    curves = tmp_path / "curves.csv"
    head = "variant,seed,round,val_exit1,val_exit2,test_exit1,test_exit2\n"
    rows = ["fedper/train.lr=0.02/seed0,0,0,,,,",  # not evaluated: skipped
            "fedper/train.lr=0.02/seed0,0,4,0.9,0.8,0.50,0.60",
            "fedper/train.lr=0.02/seed0,0,9,0.1,0.9,0.70,0.65",
            "fedper/train.lr=0.02/seed0,0,14,0.2,0.9,0.60,0.90",  # ties round 9 on validation: the later
            "fedper/train.lr=0.02/seed0,0,19,0.3,0.7,0.40,0.55",
            "fedper/train.lr=0.05/seed0,0,19,0.3,0.99,0.99,0.99"]  # lr not chosen: never read
    curves.write_text(head + "\n".join(rows) + "\n")
    runs = pt.read_curves(curves, pt.chosen_lrs(trials))
    assert list(runs) == [("fedper", 0)] and [r["round"] for r in runs[("fedper", 0)]] == [4, 9, 14, 19]
    assert pt.read_protocols(runs[("fedper", 0)]) == {
        "final": [0.40, 0.55], "val_best": [0.60, 0.90], "test_max": [0.70, 0.90]}
    assert list(pt.read_curves(curves, pt.chosen_lrs(trials), rename="last_exit_kd")) == [("last_exit_kd", 0)]
