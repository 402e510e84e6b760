"""`cafedist compare` while its --config file is edited: every training reads the file as it is
when it starts, so a run started after an edit trained another config than compare planned, and
the report, which judged the runs by the file as it read at the end, put both configs in one row."""

from __future__ import annotations

import csv
import importlib

from cafedist.cli import main as cli_main
from cafedist.compare import plan_runs, resolve_algorithms

executing = importlib.import_module("cafedist.compare.execute")  # the package's `execute` is its function


def _edit_lr(path) -> None:
    text = path.read_text()
    assert "lr: 0.05" in text
    path.write_text(text.replace("lr: 0.05", "lr: 0.07"))


def test_a_run_whose_config_file_was_edited_since_compare_planned_it_is_not_started(tiny_config, tmp_path):
    cfg = tiny_config(rounds=1)
    runs = plan_runs(cfg, resolve_algorithms("fedavg"), 2, tmp_path / "cmp")
    _edit_lr(cfg)
    outcomes = executing.execute(runs)
    assert [o.status for o in outcomes] == ["failed", "failed"]
    for o in outcomes:
        assert f"--config {cfg} was edited since compare started (first difference: train.lr (0.05 vs 0.07)); " \
               "not started" in o.message
        assert not o.run.run_dir.exists()  # nothing trained under the edited file


def test_an_edit_where_the_run_does_not_differ_trains_and_reports_it(tiny_config, tmp_path):
    """Another algorithm's section is no part of a fedavg run: such an edit refuses nothing."""
    cfg = tiny_config(rounds=1)
    [run] = plan_runs(cfg, resolve_algorithms("fedavg"), 1, tmp_path / "cmp")
    cfg.write_text(cfg.read_text().replace("proxy_size: 64", "proxy_size: 32"))
    [outcome] = executing.execute([run])
    assert outcome.status == "done", outcome.message
    assert run.finished_summary() is not None


def test_a_run_that_trained_an_edited_config_is_not_reported_beside_the_planned_ones(tiny_config, tmp_path,
                                                                                      monkeypatch, capsys):
    """The file edited between compare's check and the training's start (seed 4 reads lr 0.07):
    the fedavg row averaged seed 3 at lr 0.05 with seed 4 at lr 0.07, and compare exited 0."""
    cfg = tiny_config(rounds=1)
    out = tmp_path / "cmp"
    start = executing._CHILDREN.run
    started = []

    def edit_before_the_second(cmd, **kwargs):
        started.append(cmd)
        if len(started) == 2:
            _edit_lr(cfg)
        return start(cmd, **kwargs)

    monkeypatch.setattr(executing._CHILDREN, "run", edit_before_the_second)
    code = cli_main(["compare", "--config", str(cfg), "--algorithms", "fedavg", "--seeds", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1 and len(started) == 2
    assert "FAILED fedavg seed4: --config" in printed and "it trained the edited config" in printed
    with open(out / "results.csv") as fh:
        assert {r["seeds"] for r in csv.DictReader(fh)} == {"3"}  # seed 3 alone, at the planned lr
    with open(out / "runs.csv") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["finished", "failed"]


def test_a_training_that_fails_while_the_file_is_edited_keeps_its_own_error(tiny_config, tmp_path, monkeypatch,
                                                                           capsys):
    """A training that failed (here: on the edit it read) was reported as 'it trained the edited
    config', hiding train's own error line."""
    cfg = tiny_config(rounds=1)
    start = executing._CHILDREN.run

    def break_the_file_first(cmd, **kwargs):
        cfg.write_text(cfg.read_text().replace("lr: 0.05", "lr: -1"))
        return start(cmd, **kwargs)

    monkeypatch.setattr(executing._CHILDREN, "run", break_the_file_first)
    code = cli_main(["compare", "--config", str(cfg), "--algorithms", "fedavg", "--seeds", "1",
                     "--out", str(tmp_path / "cmp")])
    printed = capsys.readouterr().out
    assert code == 1
    assert "exit status 2: cafedist: error: " in printed and "train.lr: must be > 0" in printed, printed
    assert "no longer loads since compare started" in printed and "may have read the edit" in printed, printed


def test_under_tune_an_edit_during_the_trials_trains_no_final_of_the_edited_config(tiny_config, tmp_path,
                                                                                   monkeypatch, capsys):
    """--tune plans its finals once the trials have run: it read the file again then, so an edit
    made during the trials went into the finals unchecked (seed 4 trained lr 0.07 under the
    setting chosen at lr 0.05, and was reported), and the first seed's final, its trial, failed
    as a directory holding another config's run, with no word of the edit."""
    cfg = tiny_config(rounds=1)
    out = tmp_path / "cmp"
    start = executing._CHILDREN.run
    started = []

    def edit_after_the_trials(cmd, **kwargs):
        code = start(cmd, **kwargs)
        started.append(cmd)
        if len(started) == 2:
            _edit_lr(cfg)
        return code

    monkeypatch.setattr(executing._CHILDREN, "run", edit_after_the_trials)
    code = cli_main(["compare", "--config", str(cfg), "--algorithms", "fedavg", "--seeds", "2", "--out", str(out),
                     "--grid", "train.local_epochs=1,2", "--tune", "data.val_fraction=0.1"])
    printed = capsys.readouterr().out
    assert code == 1 and len(started) == 2, printed  # the trials alone trained
    assert "seed4: --config" in printed and "was edited since compare started (first difference: train.lr " \
                                            "(0.05 vs 0.07)); not started" in printed, printed
    assert not list(out.glob("runs/fedavg/*/seed4"))


def test_a_final_planned_from_its_trial_is_the_run_the_unchanged_file_gives(tiny_config, tmp_path):
    """Its config (hash) is that of the file read anew, for every method: the trial's run stays
    reusable as the first seed's final, and the other seeds are the runs they always were."""
    from cafedist.compare.plan import plan_run
    from cafedist.tuning import Setting

    cfg = tiny_config(rounds=1)
    setting = Setting((("train.lr", "0.02"),))
    for variant in resolve_algorithms("all"):
        trial = plan_run(cfg, variant, 3, tmp_path, ("data.val_fraction=0.1",), setting)
        for seed in (3, 4):
            fresh = plan_run(cfg, variant, seed, tmp_path, ("data.val_fraction=0.1",), setting)
            final = plan_run(cfg, variant, seed, tmp_path, ("data.val_fraction=0.1",), setting, like=trial)
            assert (final.config_hash, final.run_dir) == (fresh.config_hash, fresh.run_dir), variant.name


def test_an_edit_of_how_a_number_is_written_is_named(tiny_config, tmp_path):
    """1 -> 1.0 in a list makes another config hash, another run: the refusal names the field
    (as train's does), where it said 'first difference: ?'."""
    cfg = tiny_config(rounds=1)
    cfg.write_text(cfg.read_text().replace("proxy_size: 64", "proxy_size: 64, exit_weights: [1, 1, 2]"))
    [run] = plan_runs(cfg, resolve_algorithms("cafedistill"), 1, tmp_path / "cmp")
    assert run.config_changed() is None
    cfg.write_text(cfg.read_text().replace("exit_weights: [1, 1, 2]", "exit_weights: [1.0, 1, 2]"))
    assert "(first difference: algorithm.cafedistill.exit_weights ([1, 1, 2] vs [1.0, 1, 2]))" in run.config_changed()


def test_a_folder_holding_another_configs_run_is_not_started_and_the_advice_is_compares(tiny_config, tmp_path):
    """The config edited between two compares into one --out: seed 3's folder holds the lr 0.05
    run. compare relayed train's refusal, advising '--resume none ... or --resume force', flags
    compare does not have; the run is now refused unstarted in compare's words, the others train."""
    cfg = tiny_config(rounds=1)
    [first] = plan_runs(cfg, resolve_algorithms("fedavg"), 1, tmp_path / "cmp")
    assert executing.execute([first])[0].status == "done"
    log_before = (first.run_dir / "train.log").read_text()
    _edit_lr(cfg)
    held, fresh = plan_runs(cfg, resolve_algorithms("fedavg"), 2, tmp_path / "cmp")
    assert held.run_dir == first.run_dir
    outcomes = executing.execute([held, fresh])
    assert [o.status for o in outcomes] == ["failed", "done"], [o.message for o in outcomes]
    assert outcomes[0].message == (
        f"{held.run_dir} holds a run with a different config (first difference: train.lr (0.05 vs 0.07)); not "
        "started: compare continues only runs of its own config, so use another --out, or move that folder away "
        "and rerun compare")
    assert (held.run_dir / "train.log").read_text() == log_before  # no training was started there
    assert fresh.finished_summary() is not None


def test_with_submit_a_folder_holding_another_configs_run_is_not_submitted(tiny_config, tmp_path, monkeypatch):
    """compare --submit refuses the same run before it submits anything: a job would fail in
    train's words, with its --resume advice, after waiting in the queue."""
    cfg = tiny_config(rounds=1)
    [first] = plan_runs(cfg, resolve_algorithms("fedavg"), 1, tmp_path / "cmp")
    assert executing.execute([first])[0].status == "done"
    _edit_lr(cfg)
    held, fresh = plan_runs(cfg, resolve_algorithms("fedavg"), 2, tmp_path / "cmp")
    submitted = []

    def fake_submitit(runs, options, folder, jobs=None):
        submitted.extend(runs)
        return [executing.RunOutcome(run, "done", "") for run in runs]

    monkeypatch.setattr(executing, "run_submitit", fake_submitit)
    outcomes = executing.execute([held, fresh], submit=object())
    assert [r.run_dir for r in submitted] == [fresh.run_dir]
    assert [o.status for o in outcomes] == ["failed", "done"]
    assert outcomes[0].message.startswith(f"{held.run_dir} holds a run with a different config (first difference: "
                                          "train.lr (0.05 vs 0.07)); not started: compare continues only runs")


def test_a_folder_holding_another_algorithms_run_or_an_unreadable_config_is_held(tiny_config, tmp_path):
    """Any run that train refuses with --resume advice compare refuses unstarted, in its own words."""
    import dataclasses

    from cafedist.config import dump_config

    cfg = tiny_config(rounds=1)
    [run] = plan_runs(cfg, resolve_algorithms("fedavg"), 1, tmp_path / "cmp")
    run.run_dir.mkdir(parents=True)
    planned = run.planned_config()
    other = dataclasses.replace(planned, algorithm=dataclasses.replace(planned.algorithm, name="fedper"))
    (run.run_dir / "config.yaml").write_text(dump_config(other))
    (run.run_dir / "metrics.jsonl").write_text('{"round": 0}\n')  # results: not a run yet to start
    assert run.held_by_another() == (f"{run.run_dir} holds a run of algorithm fedper, and a run continues only "
                                     "under its own algorithm, whatever --resume says")
    (run.run_dir / "config.yaml").write_text("data: [\n")
    assert run.held_by_another().startswith(f"{run.run_dir / 'config.yaml'}: existing run config is unreadable (")
