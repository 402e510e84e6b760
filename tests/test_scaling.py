"""`cafedist scaling-report` on synthetic metrics files: numbers, modes, outputs, errors."""

import csv
import json
import os
import sys

import pytest
import yaml

from cafedist.cli import main as cli_main
from cafedist.errors import DataError
from cafedist.scaling import load_run, scaling_table, to_markdown, write_report


def _record(rnd, world, cpr, seconds, split=(0.5, 0.2, 0.1, 0.1), wire=1000):
    t_local, t_comm, t_agg, t_eval = (seconds * f for f in split)
    return {"round": rnd, "acc_per_exit": [0.5, 0.6], "loss": 1.0, "n_students": 0, "bytes_up": 400,
            "bytes_down": 100, "wire_bytes": wire, "clients_trained": sum(cpr), "t_local": t_local,
            "t_comm": t_comm, "t_aggregate": t_agg, "t_eval": t_eval, "seconds": seconds,
            "world_size": world, "clients_per_rank": cpr}


def _run(tmp_path, name, world, cpr, seconds, clients=None, summary=True):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(_record(i, world, cpr, s)) + "\n"
                                             for i, s in enumerate(seconds)))
    (d / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "data": {"clients": clients or sum(cpr),
                                                                       "cache_dir": str(tmp_path / "none")}}))
    if summary:
        (d / "summary.json").write_text(json.dumps({"n_params": 10, "ratio_to_fedavg": 0.1}))
    return d


def test_round_zero_is_skipped_as_warmup_only_when_there_are_more_than_two_rounds(tmp_path):
    long = load_run(_run(tmp_path, "long", 1, [4], [10.0, 2.0, 4.0]))
    assert long.rounds_used == 2 and long.round_s == pytest.approx(3.0)
    assert long.timers["t_local"] == pytest.approx(1.5)
    assert long.logical_bytes_per_round == pytest.approx(500 * 4)
    short = load_run(_run(tmp_path, "short", 1, [4], [10.0, 2.0], summary=False))
    assert short.rounds_used == 2 and short.round_s == pytest.approx(6.0)
    assert short.summary == {}


def test_the_first_round_of_every_session_is_skipped_as_warmup(tmp_path):
    """A run resumed after round 1 pays the warm-up again in round 2 (rows name their session,
    as train writes them): it was averaged in (3.75 s a round here)."""
    run = _run(tmp_path, "resumed", 1, [4], [10.0, 2.0, 9.0, 2.0, 2.0])
    rows = [{**json.loads(line), "session": "host 1 T0" if i < 2 else "host 2 T1"}
            for i, line in enumerate((run / "metrics.jsonl").read_text().splitlines())]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = load_run(run)
    assert stats.rounds_used == 3 and stats.round_s == pytest.approx(2.0)


def test_rows_past_a_finished_runs_rounds_are_left_out(tmp_path):
    """A `--resume force` attempt killed before its first checkpoint leaves rows of another
    config past the summary's rounds (the next train drops them): they were timed as the run's."""
    run = _run(tmp_path, "extended", 1, [4], [10.0, 2.0, 2.0, 50.0, 50.0])
    (run / "summary.json").write_text(json.dumps({"rounds": 3, "n_params": 10}))
    stats = load_run(run)
    assert (stats.rounds_total, stats.rounds_used) == (3, 2) and stats.round_s == pytest.approx(2.0)


def test_an_extension_past_its_first_checkpoint_is_timed_up_to_that_checkpoint(tmp_path):
    """Once a `--resume force` extension has checkpointed past the summary's rounds, its rows up
    to that checkpoint are the run's (they were cut at the old summary's rounds) and the run is
    not finished (the old summary describes models it has gone past)."""
    run = _run(tmp_path, "extended", 1, [4], [10.0, 2.0, 2.0, 4.0, 4.0, 50.0])
    (run / "summary.json").write_text(json.dumps({"rounds": 3, "n_params": 10}))
    (run / "checkpoints" / "round_000004").mkdir(parents=True)
    stats = load_run(run)
    assert (stats.rounds_total, stats.rounds_used) == (5, 4) and stats.round_s == pytest.approx(3.0)
    assert stats.summary == {} and "`extended` not finished" in to_markdown(scaling_table([stats]), [stats])


def test_strong_scaling_efficiency(tmp_path):
    runs = [load_run(_run(tmp_path, "w4", 4, [2, 2, 2, 2], [9, 1.0, 1.0])),
            load_run(_run(tmp_path, "w1", 1, [8], [9, 2.0, 2.0])),
            load_run(_run(tmp_path, "w2", 2, [4, 4], [9, 1.25, 1.25]))]
    rows = scaling_table(runs)
    assert [r["ranks"] for r in rows] == [1, 2, 4]  # sorted; the smallest world size is the baseline
    assert [r["mode"] for r in rows] == ["baseline", "strong", "strong"]
    assert rows[1]["speedup"] == pytest.approx(1.6)
    assert rows[1]["efficiency"] == pytest.approx(2.0 / (1.25 * 2))
    assert rows[2]["efficiency"] == pytest.approx(2.0 / (1.0 * 4))
    assert rows[2]["clients_per_rank"] == "2/2/2/2"
    assert rows[0]["local"] == pytest.approx(1.0) and rows[0]["other"] == pytest.approx(0.2)


def test_weak_scaling_efficiency_and_incomparable_runs(tmp_path):
    runs = [load_run(_run(tmp_path, "a", 1, [2], [5, 1.0, 1.0])),
            load_run(_run(tmp_path, "b", 2, [2, 2], [5, 1.25, 1.25])),
            load_run(_run(tmp_path, "c", 2, [3, 2], [5, 1.0, 1.0]))]
    rows = {r["run"]: r for r in scaling_table(runs)}
    assert rows["b"]["mode"] == "weak" and rows["b"]["efficiency"] == pytest.approx(0.8)
    assert rows["c"]["mode"] == "n/a" and rows["c"]["efficiency"] is None
    assert rows["b"]["samples_per_rank"] is None  # no store found: efficiency is not sample-normalised


def test_write_report_outputs(tmp_path):
    dirs = [_run(tmp_path, f"w{w}", w, [4 // w] * w, [3, 1.0 / w ** 0.5, 1.0 / w ** 0.5]) for w in (1, 2, 4)]
    out = tmp_path / "report"
    paths = write_report(dirs, out)
    md = paths["md"].read_text()
    assert "| run | ranks |" in md and "strong" in md and "w4" in md
    table = list(csv.DictReader(paths["csv"].open()))
    assert [int(r["ranks"]) for r in table] == [1, 2, 4]
    assert float(table[1]["efficiency"]) == pytest.approx(2 ** 0.5 / 2, abs=1e-3)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cli_scaling_report(tmp_path, capsys):
    dirs = [str(_run(tmp_path, f"w{w}", w, [2] * w, [3, 1.0, 1.1])) for w in (1, 2)]
    assert cli_main(["scaling-report", *dirs, "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "weak" in out and (tmp_path / "o" / "scaling.png").is_file()
    assert cli_main(["scaling-report", dirs[0]]) == 0  # default --out: the runs' parent directory
    assert (tmp_path / "scaling.md").is_file()


def test_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_run(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="metrics.jsonl: not found"):
        load_run(empty)
    bad = _run(tmp_path, "bad", 1, [2], [1.0, 1.0])
    with open(bad / "metrics.jsonl", "a") as fh:
        fh.write("{not json\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:3: not a JSON object"):
        load_run(bad)
    old = _run(tmp_path, "old", 1, [2], [1.0])
    rec = json.loads((old / "metrics.jsonl").read_text())
    del rec["t_comm"]
    (old / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(DataError, match="missing field 't_comm'"):
        load_run(old)
    mixed = _run(tmp_path, "mixed", 1, [2], [1.0])
    with open(mixed / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(_record(1, 2, [1, 1], 1.0)) + "\n")
    with pytest.raises(DataError, match="world_size changes"):
        load_run(mixed)
    assert cli_main(["scaling-report", str(empty)]) == 2


def test_a_metrics_line_with_bytes_that_are_no_utf8_is_one_line_naming_it(tmp_path, capsys):
    """Damage in metrics.jsonl ended the report in a traceback (UnicodeDecodeError)."""
    run = _run(tmp_path, "damaged", 1, [2], [1.0, 1.0])
    rows = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(rows[0] + b"\xff\xfe\n" + rows[1])
    assert cli_main(["scaling-report", str(run), "--out", str(tmp_path / "o")]) == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert err.endswith("metrics.jsonl:2: not a JSON object (expected one metrics record per line)")


@pytest.mark.parametrize("key,value,needle", [
    ("seconds", "abc", "field 'seconds' is 'abc', expected a number"),
    ("t_eval", None, "field 't_eval' is None, expected a number"),
    ("bytes_up", "x", "field 'bytes_up' is 'x', expected a number"),
    ("world_size", True, "field 'world_size' is True, expected a number"),
    ("clients_per_rank", 10, "field 'clients_per_rank' is 10, expected a list of integers"),
    ("clients_per_rank", [1.5], r"field 'clients_per_rank' is \[1.5\], expected a list of integers"),
    # a damaged or hand-edited file: train never writes these, and the report printed nan
    ("seconds", float("nan"), "field 'seconds' is nan, expected a finite number >= 0"),
    ("t_local", float("inf"), "field 't_local' is inf, expected a finite number >= 0"),
    ("seconds", -2.0, "field 'seconds' is -2.0, expected a finite number >= 0"),
])
def test_a_field_of_the_wrong_type_is_one_line_naming_file_and_line(tmp_path, capsys, key, value, needle):
    run = _run(tmp_path, "garbled", 1, [2], [1.0, 1.0])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), key: value})
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"metrics.jsonl:2: {needle}"):
        load_run(run)
    assert cli_main(["scaling-report", str(run), "--out", str(tmp_path / "o")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("world,cpr,needle", [
    (0, [2], "field 'world_size' is 0, expected an integer >= 1"),
    (1.5, [2], "field 'world_size' is 1.5, expected an integer >= 1"),
    (2, [2], r"field 'clients_per_rank' is \[2\], expected 2 integers >= 0 \(one per rank\)"),
    (2, [3, -1], r"field 'clients_per_rank' is \[3, -1\], expected 2 integers >= 0 \(one per rank\)"),
])
def test_a_world_size_that_train_never_writes_is_one_line(tmp_path, capsys, world, cpr, needle):
    """A world size of 0 ended the report in a ZeroDivisionError (strong efficiency divides by
    it), 1.5 was read as 1, and two ranks with one rank's clients became a second "baseline"
    with an efficiency of 2: train writes an integer >= 1 and one count per rank."""
    good = _run(tmp_path, "w2", 2, [1, 1], [3, 1.0, 1.0])
    bad = _run(tmp_path, "bad", 1, [2], [3, 1.0, 1.0])
    records = [{**json.loads(line), "world_size": world, "clients_per_rank": cpr}
               for line in (bad / "metrics.jsonl").read_text().splitlines()]
    (bad / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=rf"metrics.jsonl:1: {needle}"):
        load_run(bad)
    assert cli_main(["scaling-report", str(bad), str(good), "--out", str(tmp_path / "o")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_is_refused_before_reading(tmp_path, capsys):
    run = _run(tmp_path, "w1", 1, [2], [1.0])
    (tmp_path / "afile").write_text("mine")
    assert cli_main(["scaling-report", str(run), "--out", str(tmp_path / "afile")]) == 2
    assert "--out: " in capsys.readouterr().err and (tmp_path / "afile").read_text() == "mine"


def test_an_empty_out_is_refused_not_taken_for_the_default(tmp_path, capsys):
    """``--out "$OUT"`` with OUT unset wrote into the runs' parent folder, replacing the report
    of another sweep there; train, export and prepare refuse an empty --out the same way."""
    run = _run(tmp_path, "w1", 1, [2], [3, 1.0, 1.0])
    (tmp_path / "scaling.md").write_text("another sweep's report")
    assert cli_main(["scaling-report", str(run), "--out", ""]) == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert err == "cafedist: error: --out: empty path; expected a folder (omit --out for the first run's parent folder)"
    assert (tmp_path / "scaling.md").read_text() == "another sweep's report"
    assert not (tmp_path / "scaling.csv").exists()


def test_a_run_of_another_dataset_or_algorithm_is_noted_more_clients_are_not(tmp_path):
    """The note left the whole data section out: a run of another dataset went unremarked."""
    def with_config(name: str, world: int, **data) -> object:
        d = _run(tmp_path, name, world, [2] * world, [3, 1.0, 1.0])
        (d / "config.yaml").write_text(yaml.safe_dump({
            "seed": 0, "algorithm": {"name": data.pop("algorithm", "cafedistill")},
            "data": {"dataset": "mnist5k", "clients": 2 * world, "store": f"s{world}.h5",
                     "cache_dir": str(tmp_path / "none"), **data}}))
        return load_run(d)

    def note(runs: list) -> str:
        return "\n".join(line for line in to_markdown(scaling_table(runs), runs).splitlines()
                         if line.startswith("Note:"))

    w1, w2 = with_config("w1", 1), with_config("w2", 2)  # weak: more clients, another store
    assert note([w1, w2]) == ""
    other = with_config("digits", 2, dataset="digits")
    assert "digits: data.dataset ('mnist5k' vs 'digits')" in note([w1, other])
    fedavg = with_config("fedavg", 2, algorithm="fedavg")
    assert "fedavg: algorithm.name ('cafedistill' vs 'fedavg')" in note([w1, fedavg])


def test_without_matplotlib_one_line_and_the_earlier_report_stays_whole(tmp_path, capsys, monkeypatch):
    """scaling.md and .csv were replaced, then pyplot's ImportError ended it with a traceback."""
    dirs = [str(_run(tmp_path, f"w{w}", w, [2] * w, [3, 1.0, 1.1])) for w in (1, 2)]
    out = tmp_path / "o"
    assert cli_main(["scaling-report", dirs[0], "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    capsys.readouterr()
    assert cli_main(["scaling-report", *dirs, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plotting needs matplotlib: pip install 'cafedist[plot]'" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file left either


def test_samples_per_rank_from_another_folder_through_the_store_the_checkpoints_record(
        tiny_config, tmp_path, monkeypatch):
    """A relative data.cache_dir is relative to where train ran: from another folder the store
    was not found, so samples_per_rank was empty and weak efficiencies lost their normalisation."""
    from contextlib import closing

    from cafedist.config import load_config
    from cafedist.distributed.placement import place_clients
    from cafedist.run.build import open_store
    from cafedist.train.startup import write_config

    train_cwd = tmp_path / "project"
    train_cwd.mkdir()
    monkeypatch.chdir(train_cwd)
    cfg = load_config(str(tiny_config()), ["data.cache_dir=stores"])  # relative, as data/stores by default
    with closing(open_store(cfg)) as store:
        sizes = [tr for tr, _ in store.client_sizes()]
    run = _run(tmp_path, "w2", 2, [2, 2], [3, 1.0, 1.0])
    write_config(cfg, run)
    manifest = run / "checkpoints" / "round_000002" / "MANIFEST.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"store": str(cfg.data.store_path(cfg.seed).resolve())}))
    expected = max(sum(sizes[c] for c in part) for part in place_clients(sizes, 2))
    assert load_run(run).samples_per_rank == expected
    monkeypatch.chdir(tmp_path)  # elsewhere: found through the manifest
    assert load_run(run).samples_per_rank == expected


def test_runs_of_the_same_name_in_different_folders_are_told_apart(tmp_path, monkeypatch):
    """``a/seed0`` and ``b/seed0`` were both row ``seed0`` in scaling.md and .csv, and with the
    same ranks their bars were drawn on one spot of the plot under one label."""
    from cafedist.eval import plots

    figures = []
    new_figure = plots._new_figure
    monkeypatch.setattr(plots, "_new_figure", lambda **kw: figures.append(new_figure(**kw)) or figures[-1])
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    dirs = [_run(tmp_path / "a", "seed0", 1, [2], [3, 1.0, 1.0]), _run(tmp_path / "b", "seed0", 1, [2], [3, 2.0, 2.0]),
            _run(tmp_path / "b", "seed1", 2, [1, 1], [3, 1.0, 1.0])]
    config = yaml.safe_load((dirs[1] / "config.yaml").read_text())
    (dirs[1] / "config.yaml").write_text(yaml.safe_dump({**config, "seed": 1}))
    paths = write_report(dirs, tmp_path / "o")
    assert [r["run"] for r in csv.DictReader(paths["csv"].open())] == ["a/seed0", "b/seed0", "b/seed1"]
    md = paths["md"].read_text()
    assert "Baseline: `a/seed0`" in md and "| a/seed0 | 1 |" in md and "| b/seed0 | 1 |" in md
    assert "(b/seed0: seed (0 vs 1))" in md  # the note names the run as the table does
    ticks = [t.get_text() for t in figures[0].axes[0].get_xticklabels()]
    assert len(ticks) == 3 and len(set(ticks)) == 3 and "a/seed0" in ticks[0] and "b/seed0" in ticks[1]
    # unique names stay the names, and the plot's labels ranks / clients per rank
    unique = [_run(tmp_path, f"w{w}", w, [2] * w, [3, 1.0, 1.0]) for w in (1, 2)]
    paths = write_report(unique, tmp_path / "o2")
    assert [r["run"] for r in csv.DictReader(paths["csv"].open())] == ["w1", "w2"]
    assert [t.get_text() for t in figures[1].axes[0].get_xticklabels()] == ["1r\n2", "2r\n2/2"]


def test_a_run_folder_whose_name_is_no_utf8_is_reported(tmp_path, capsys):
    """train runs in a folder named with a byte that is no UTF-8 (a Latin-1 name); its name
    reached scaling.md as a lone surrogate, and writing the file ended in a traceback."""
    w1 = _run(tmp_path, os.fsdecode(b"w\xe91"), 1, [2], [3, 1.0, 1.0])
    w2 = _run(tmp_path, "w2", 2, [2, 2], [3, 1.0, 1.0])
    assert cli_main(["scaling-report", str(w1), str(w2), "--out", str(tmp_path / "o")]) == 0
    assert [r["run"] for r in csv.DictReader((tmp_path / "o" / "scaling.csv").open())] == ["w\ufffd1", "w2"]
    assert "Baseline: `w\ufffd1`" in (tmp_path / "o" / "scaling.md").read_text()


def test_runs_of_one_name_in_folders_whose_names_are_no_utf8_are_reported(tmp_path):
    """Two runs of one name are labelled by their folders below the common one: a folder named
    with a byte that is no UTF-8 reached scaling.md as a lone surrogate there as well."""
    latin = os.fsdecode(b"a\xe9")
    for parent in (latin, "b"):
        (tmp_path / parent).mkdir()
    w1 = _run(tmp_path, f"{latin}/w", 1, [2], [3, 1.0, 1.0])
    w2 = _run(tmp_path, "b/w", 2, [2, 2], [3, 1.0, 1.0])
    paths = write_report([w1, w2], tmp_path / "o")
    assert [r["run"] for r in csv.DictReader(paths["csv"].open())] == ["a\ufffd/w", "b/w"]


def test_a_run_given_twice_is_one_row(tmp_path):
    """`scaling-report w1 w1 ./w1` printed the same run three times, each a "baseline"."""
    w1 = _run(tmp_path, "w1", 1, [2], [3, 1.0, 1.0])
    w2 = _run(tmp_path, "w2", 2, [2, 2], [3, 1.0, 1.0])
    paths = write_report([w1, w2, w1, tmp_path / "." / "w1"], tmp_path / "o")
    assert [r["run"] for r in csv.DictReader(paths["csv"].open())] == ["w1", "w2"]


def test_the_record_being_written_by_a_training_run_is_left_out(tmp_path, capsys):
    """A run that is training appends its records: a reader can see the newest one half
    written (no newline yet), as a kill leaves it torn. The report refused the whole run
    ("not a JSON object"); now it reads the complete rounds, as `cafedist status` does. A bad
    line elsewhere is still refused."""
    run = _run(tmp_path, "w1", 1, [2], [3, 1.0, 1.0])
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(_record(3, 1, [2], 9.0))[:40])
    stats = load_run(run)
    assert stats.rounds_total == 3 and stats.round_s == pytest.approx(1.0)
    assert cli_main(["scaling-report", str(run), "--out", str(tmp_path / "o")]) == 0
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write("\n")  # complete but not JSON: damage, not a record being written
    with pytest.raises(DataError, match=r"metrics.jsonl:4: not a JSON object"):
        load_run(run)


def test_weak_efficiency_is_normalised_by_the_busiest_ranks_samples(tmp_path):
    """With the stores found, weak efficiency is time per sample of the busiest rank, base over
    run: (2.0 s / 100) / (1.25 s / 50) = 0.8, not the plain 2.0 / 1.25."""
    base = load_run(_run(tmp_path, "w1", 1, [2], [9, 2.0, 2.0]))
    run = load_run(_run(tmp_path, "w2", 2, [2, 2], [9, 1.25, 1.25]))
    base.samples_per_rank, run.samples_per_rank = 100, 50
    rows = {r["run"]: r for r in scaling_table([base, run])}
    assert rows["w2"]["mode"] == "weak" and rows["w2"]["efficiency"] == pytest.approx(0.8)
    assert rows["w2"]["samples_per_rank"] == 50


def test_a_run_whose_smallest_rank_differs_is_not_weak(tmp_path):
    """Clients per rank [2, 1] against [2]: the busiest rank matches but not the placement."""
    base = load_run(_run(tmp_path, "w1", 1, [2], [5, 1.0, 1.0]))
    uneven = load_run(_run(tmp_path, "w2", 2, [2, 1], [5, 1.0, 1.0]))
    row = scaling_table([base, uneven])[1]
    assert (row["mode"], row["efficiency"]) == ("n/a", None)


def test_bytes_per_round_count_the_clients_that_trained_and_skip_the_warmup_round(tmp_path):
    """Logical bytes are (up + down) per client times the clients that trained that round
    (client sampling trains fewer than the run holds); wire MiB are averaged over the timed
    rounds, like the times, in MiB (2**20 bytes)."""
    d = tmp_path / "sampled"
    d.mkdir()
    mib = 2 ** 20
    records = [{**_record(i, 1, [4], 1.0, wire=wire), "clients_trained": 2}
               for i, wire in enumerate((10 * mib, mib, 3 * mib))]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    stats = load_run(d)
    assert stats.logical_bytes_per_round == pytest.approx(500 * 2)
    [row] = scaling_table([stats])
    assert row["wire_mb_per_round"] == pytest.approx(2.0)


def test_an_unfinished_run_is_noted(tmp_path):
    """A sweep read while it trains: a run of 2 recorded rounds keeps its warm-up round in the
    average, and nothing in the report said it had not finished."""
    done = load_run(_run(tmp_path, "w1", 1, [2], [9, 1.0, 1.0]))
    partial = load_run(_run(tmp_path, "w2", 2, [2, 2], [9, 1.0], summary=False))
    notes = [line for line in to_markdown(scaling_table([done, partial]), [done, partial]).splitlines()
             if line.startswith("Note:")]
    assert notes == ["Note: `w2` not finished (no summary.json of its newest rounds): times of the rounds recorded "
                     "so far; compare with care."]
    assert not [line for line in to_markdown(scaling_table([done]), [done]).splitlines() if line.startswith("Note:")]


def test_runs_on_other_machines_or_software_are_noted(tmp_path):
    """A weak-scaling sweep whose 4-rank run went to a node of another CPU model timed the
    nodes as well, and nothing in the report said so (summary.json records every stack)."""
    def with_stack(name: str, world: int, cpus: list[str], torch: str = "2.13.0+cpu") -> object:
        d = _run(tmp_path, name, world, [2] * world, [3, 1.0, 1.0])
        env = {"torch": torch, "hosts": ["h"], "cpus": cpus, "devices": ["cpu"]}
        (d / "summary.json").write_text(json.dumps({"n_params": 10, "environments": [env]}))
        return load_run(d)

    def notes(runs: list) -> list[str]:
        return [line for line in to_markdown(scaling_table(runs), runs).splitlines() if line.startswith("Note:")]

    w1, w2 = with_stack("w1", 1, ["Xeon"]), with_stack("w2", 2, ["Xeon"])
    assert notes([w1, w2]) == []
    epyc = with_stack("w4", 4, ["EPYC", "Xeon"])
    assert notes([w1, w2, epyc]) == ["Note: the runs trained on different machines or software (w4: cpus (Xeon vs "
                                     "EPYC, Xeon)); their times compare those too."]
    cuda = with_stack("w8", 8, ["Xeon"], torch="2.13.0+cu126")
    assert "w8: torch (2.13.0+cpu vs 2.13.0+cu126)" in notes([w1, cuda])[0]

    # a run resumed on another node ran on both: every session's stack counts
    resumed = with_stack("w16", 16, ["Xeon"])
    envs = json.loads((resumed.path / "summary.json").read_text())["environments"]
    envs.append({**envs[0], "cpus": ["EPYC"]})
    (resumed.path / "summary.json").write_text(json.dumps({"n_params": 10, "environments": envs}))
    assert "w16: cpus (Xeon vs EPYC, Xeon)" in notes([w1, load_run(resumed.path)])[0]
    # an unfinished run recorded no stack: it is noted as unfinished, not as another machine
    training = load_run(_run(tmp_path, "w32", 32, [2] * 32, [3, 1.0, 1.0], summary=False))
    assert [n for n in notes([w1, training]) if "machines" in n] == []
