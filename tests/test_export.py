"""`cafedist export`: each client's early-exit model as torch.export programs with its exit policy.

The exported programs, run by the shipped early_exit.py with torch alone, must answer every
sample from the exit the evaluation's rule picks, with the same class; the folder appears
complete or not at all; bad requests are one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, cafedist_in_process, env_for_tests

from cafedist.algorithms.fedrod import GenericPlusPersonal
from cafedist.deploy import early_exit
from cafedist.deploy.export import _example, export_stages, parse_clients, policy_spec, write_policy
from cafedist.errors import ConfigError
from cafedist.eval.budget_search import Choice, Split
from cafedist.eval.policies import exit_scores
from cafedist.models import build_model

TEXT = {"vocab_size": 50, "d_model": 16, "heads": 2, "ff": 32}
ARCHS = [("cnn", (1, 28, 28), {"width": 4}), ("resnet18", (3, 16, 16), {"width": 4, "norm": "batch"}),
         ("transformer", (12,), TEXT)]


def _inputs(model, shape, n: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if model.input_dtype == torch.long:
        ids = torch.randint(1, TEXT["vocab_size"], (n, *shape), generator=g)
        ids[::3, shape[0] // 2:] = 0  # padding, so that the keep mask matters
        return ids
    return torch.randn((n, *shape), generator=g)


def _write_policy(folder: Path, stages: list[str], choice: Choice, macs: list[int]) -> None:
    write_policy(folder, policy_spec(choice, stages, macs))


def _median_threshold(logits: torch.Tensor, policy: str, temperatures) -> float:
    """A threshold amid exit 1's scores (about half leave there), halfway between two of them: far
    from every score compared with the last-bit differences a subset of the batch can give the logits."""
    t = None if temperatures is None else torch.tensor(temperatures, dtype=torch.float64)
    scores = exit_scores(logits, policy, t)[0].sort().values
    mid = scores.numel() // 2
    return float((scores[mid - 1] + scores[mid]) / 2)


@pytest.mark.parametrize("arch,shape,opts", ARCHS, ids=[a for a, _, _ in ARCHS])
@pytest.mark.parametrize("policy,temperatures", [("max-softmax", None), ("margin", "fitted"), ("entropy", None)])
def test_exported_stages_answer_as_the_evaluation_rule(tmp_path, arch, shape, opts, policy, temperatures):
    torch.manual_seed(0)
    model = build_model(arch, shape, 5, **opts).eval()
    x = _inputs(model, shape)
    with torch.no_grad():
        logits = torch.stack(model(x))
    m = model.num_exits
    temps = None if temperatures is None else tuple(0.5 + 0.25 * k for k in range(m))
    choice = Choice(policy, _median_threshold(logits, policy, temps), temps)
    stages = export_stages(model, x[:2], tmp_path)
    assert stages == [f"exit_{k + 1}.pt2" for k in range(m)]
    _write_policy(tmp_path, stages, choice, list(range(1, m + 1)))
    got_logits, got_exit = early_exit.load(tmp_path)(x)
    want_exit = choice.exits(Split(logits, torch.zeros(x.shape[0], dtype=torch.long)))
    assert torch.equal(got_exit, want_exit)
    assert len(set(want_exit.tolist())) > 1  # samples leave at different exits: the rule is exercised
    # the answering exit's logits (to the last bits: a batch's subset may take another kernel path)
    torch.testing.assert_close(got_logits, logits[want_exit, torch.arange(x.shape[0])], rtol=1e-5, atol=1e-6)


def test_exported_model_takes_any_batch_size_and_static_and_no_exit_policies(tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), 5, width=4).eval()
    x = _inputs(model, (1, 28, 28), 5)
    stages = export_stages(model, x[:2], tmp_path)
    with torch.no_grad():
        logits = model(x)
    for choice, exit_ in ((Choice("static", None, static_exit=1), 1), (Choice("max-softmax", 1.0), 2),
                          (Choice("max-softmax", 0.0), 0)):
        _write_policy(tmp_path, stages, choice, [1, 2, 3])
        exported = early_exit.load(tmp_path)
        for n in (0, 1, 5):
            got_logits, got_exit = exported(x[:n])
            assert got_exit.tolist() == [exit_] * n
            torch.testing.assert_close(got_logits, logits[exit_][:n], rtol=1e-5, atol=1e-6)


def test_the_shipped_rule_fires_at_the_threshold_itself_and_never_at_threshold_1(tmp_path, monkeypatch):
    """eval's rule (cafedist.eval.dynamic): a score equal to θ leaves (the search's θ is often a
    calibration score itself), and θ >= 1 means no early exit, also where a float64 softmax is
    exactly 1.0. Stage k of these stand-in programs passes the input on with its exit-k logits."""
    logits = torch.tensor([[[50.0, 0.0], [0.0, 8.0]],  # exit 1 saturated: score exactly 1.0
                           [[1.5, 0.0], [8.0, 0.0]],
                           [[0.2, 0.0], [8.0, 0.0]]], dtype=torch.float64)  # [N, m, C]
    stages = {f"exit_{k + 1}.pt2": (lambda x, k=k: (x, x[:, k])) for k in range(2)}
    monkeypatch.setattr(early_exit.torch.export, "load", lambda name: SimpleNamespace(
        module=lambda: stages[Path(name).name]))
    scores = early_exit.exit_score(logits[:, 0], "max-softmax")
    assert scores[0] == 1.0
    for threshold, want in ((float(scores[1]), [0, 0, 1]), (1.0, [1, 1, 1])):
        _write_policy(tmp_path, list(stages), Choice("max-softmax", threshold), [1, 2])
        got_logits, got_exit = early_exit.load(tmp_path)(logits)
        assert got_exit.tolist() == want, threshold
        assert torch.equal(got_logits, logits[torch.arange(3), got_exit])


def test_fedrod_stages_add_the_personal_classifier_as_its_forward_does(tmp_path):
    torch.manual_seed(0)
    generic = build_model("cnn", (1, 28, 28), 5, width=4).eval()
    personal = build_model("cnn", (1, 28, 28), 5, width=4).eval()
    model = GenericPlusPersonal(generic, personal)
    x = _inputs(generic, (1, 28, 28), 6)
    with torch.no_grad():
        want = model(x)
        state, got = x, []
        for stage in model.exit_stages():
            state, z = stage(state)
            got.append(z)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert not torch.equal(want[0], generic(x)[0])  # the personal classifier is in the answer
        # exporting leaves the generic model's feature tap working (the copies carry no hooks)
        stages = export_stages(model, x[:2], tmp_path)
        assert all(torch.equal(a, b) for a, b in zip(model(x), want))
    _write_policy(tmp_path, stages, Choice("max-softmax", 1.0), [1, 2, 3])
    torch.testing.assert_close(early_exit.load(tmp_path)(x)[0], want[-1], rtol=1e-5, atol=1e-6)


def test_a_client_with_one_test_sample_exports_for_any_batch_size(tmp_path):
    """The trace example comes from the test split: with 1 sample there (data.test_fraction
    small) torch.export specialized the batch to 1 and export failed with a traceback."""
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), 5, width=4).eval()
    x = _inputs(model, (1, 28, 28), 4)
    example = _example(SimpleNamespace(x_test=x[:1], x_val=None, x_train=x[1:]))
    stages = export_stages(model, example, tmp_path)
    _write_policy(tmp_path, stages, Choice("max-softmax", 1.0), [1, 2, 3])
    with torch.no_grad():
        want = model(x)[-1]
    torch.testing.assert_close(early_exit.load(tmp_path)(x)[0], want, rtol=1e-5, atol=1e-6)


def test_parse_clients():
    assert parse_clients(None, 3) == [0, 1, 2]
    assert parse_clients("4,0-2,1", 5) == [0, 1, 2, 4]
    for bad in ("", "a", "0-9", "-1", "3"):
        with pytest.raises(ConfigError, match="--clients"):
            parse_clients(bad, 3)
    # a descending range was no clients: "0,2-1" exported client 0 alone, without a word
    for bad in ("2-1", "0,2-1"):
        with pytest.raises(ConfigError, match="--clients: expected comma-separated client ids or ranges"):
            parse_clients(bad, 3)


# ----------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory) -> Path:
    """A 1-round run of 4 clients with a validation split, evaluated with --budget macs=0.5."""
    root = tmp_path_factory.mktemp("export_run")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY.format(rounds=1, clients=4, every=1, cache=root / "stores"))
    run = root / "run"
    cafedist_in_process("train", "--config", str(cfg), "--out", str(run), "--no-progress", "data.val_fraction=0.2",
                        check=True)
    cafedist_in_process("eval", str(run), "--budget", "macs=0.5", check=True)
    return run


def test_export_reproduces_eval_budget_per_client(evaluated_run, tmp_path):
    out = tmp_path / "export"
    proc = cafedist_in_process("export", str(evaluated_run), "--out", str(out), check=True)
    assert "100.00% of samples answered as the evaluation does" in proc.stdout
    report = json.loads((evaluated_run / "eval.json").read_text())
    summary = json.loads((out / "export.json").read_text())
    assert [r["client"] for r in summary["clients"]] == [0, 1, 2, 3]
    assert summary["round"] == report["round"] and summary["checkpoint"] == report["checkpoint"]
    for row, exported in zip(report["budget"]["clients"], summary["clients"]):
        spec = json.loads((out / exported["folder"] / "policy.json").read_text())
        assert (spec["policy"], spec["threshold"], spec["temperatures"]) == \
            (row["policy"], row["threshold"], row["temperatures"])
        assert spec["budget"] == "macs=0.5" and spec["macs_per_exit"] == report["macs_per_exit"]
        assert exported["agreement"] == 1.0
        assert exported["test_accuracy"] == pytest.approx(row["test_accuracy"], abs=1e-12)
        assert exported["test_macs_fraction"] == pytest.approx(row["test_macs_fraction"], rel=1e-9)
    assert not list(tmp_path.glob(".export.export-*"))  # the temporary folder is gone


def _policies(out: Path) -> list[tuple]:
    return [(spec["budget"], spec["policy"], spec["threshold"], spec["temperatures"])
            for spec in (json.loads(p.read_text()) for p in sorted(out.glob("client_*/policy.json")))]


def _rows(section: dict) -> list[tuple]:
    return [(r["budget"], r["policy"], r["threshold"], r["temperatures"]) for r in section["clients"]]


def test_export_says_which_budget_and_exports_any_eval_kept(evaluated_run, tmp_path):
    """eval.json keeps every budget evaluated: export takes the most recent and says so, or the
    one --budget names (a spec, or a budget file by its path and content; a file gone since by
    its path), and refuses in one line one that eval did not evaluate."""
    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(evaluated_run), str(run)], check=True)  # evaluated with macs=0.5
    budgets = tmp_path / "devices.yaml"
    budgets.write_text("0: macs=0.75\ndefault: loss=2\n")
    cafedist_in_process("eval", str(run), "--budget", str(budgets), check=True)
    cafedist_in_process("eval", str(run), "--budget", "loss=1", check=True)
    report = json.loads((run / "eval.json").read_text())
    file_key = next(k for k in report["budgets"] if k.startswith(str(budgets.resolve())))
    proc = cafedist_in_process("export", str(run), "--out", str(tmp_path / "latest"), check=True)
    assert "(eval --budget loss=1 (pooled scope), eval.json of round 0)" in proc.stdout
    assert "exporting the policies of the most recent budget, loss=1, of the 3 eval.json holds" in proc.stderr
    assert json.loads((tmp_path / "latest" / "export.json").read_text())["budget"] == "loss=1"
    assert _policies(tmp_path / "latest") == _rows(report["budgets"]["loss=1"])
    proc = cafedist_in_process("export", str(run), "--out", str(tmp_path / "half"), "--budget", "MACS=.50",
                               check=True)
    assert "(eval --budget macs=0.5 (pooled scope)" in proc.stdout
    assert _policies(tmp_path / "half") == _rows(report["budgets"]["macs=0.5"])
    cafedist_in_process("export", str(run), "--out", str(tmp_path / "file"), "--budget", str(budgets), check=True)
    assert json.loads((tmp_path / "file" / "export.json").read_text())["budget"] == file_key
    assert _policies(tmp_path / "file") == _rows(report["budgets"][file_key])
    budgets.unlink()  # gone since: eval.json kept one budget of that path
    cafedist_in_process("export", str(run), "--out", str(tmp_path / "gone"), "--budget", str(budgets), check=True)
    assert _policies(tmp_path / "gone") == _rows(report["budgets"][file_key])
    for wanted in ("macs=0.25", str(tmp_path / "other.csv")):
        proc = cafedist_in_process("export", str(run), "--out", str(tmp_path / "none"), "--budget", wanted)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("cafedist: error:")]
        assert line == (f"cafedist: error: {run / 'eval.json'}: no budget {wanted} was evaluated for these models; "
                        f"eval.json holds: macs=0.5, {budgets} (sha256 {file_key[-64:][:12]}), loss=1; run "
                        f"`cafedist eval RUN --budget {wanted}` first"), line
        assert not (tmp_path / "none").exists()


def test_exported_client_runs_with_torch_alone(evaluated_run, tmp_path):
    out = tmp_path / "export"
    cafedist_in_process("export", str(evaluated_run), "--out", str(out), "--clients", "2", "--threshold", "0.9",
                        check=True)
    assert sorted(p.name for p in out.iterdir()) == ["client_0002", "early_exit.py", "export.json"]
    spec = json.loads((out / "client_0002" / "policy.json").read_text())
    assert (spec["policy"], spec["threshold"], spec["temperatures"]) == ("max-softmax", 0.9, None)
    x = torch.randn(7, *spec["input_shape"])
    torch.save(x, tmp_path / "x.pt")
    here = early_exit.load(out / "client_0002")(x)
    # a fresh interpreter that cannot import cafedist (-I: no PYTHONPATH, no user site; cwd not on sys.path)
    script = ("import sys, torch; sys.path.insert(0, '.'); import early_exit; "
              "assert 'cafedist' not in sys.modules; "
              f"torch.save(early_exit.load('client_0002')(torch.load({str(tmp_path / 'x.pt')!r})), 'y.pt')")
    env = {k: v for k, v in env_for_tests().items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-I", "-c", script], cwd=out, env=env, check=True, timeout=120)
    there = torch.load(out / "y.pt")
    assert torch.equal(here[0], there[0]) and torch.equal(here[1], there[1])


def test_export_refusals_are_one_line_and_write_nothing(evaluated_run, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")

    def refused(*args: str, expect: str) -> None:
        proc = cafedist_in_process("export", *args)
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("cafedist: error:")]
        assert len(lines) == 1 and expect in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr

    run = str(evaluated_run)
    refused(run, "--out", str(occupied), expect="not empty")
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    refused(run, "--out", str(tmp_path / "a"), "--threshold", "1.5", expect="--threshold")
    refused(run, "--out", str(tmp_path / "a"), "--clients", "7", expect="--clients")
    refused(run, "--out", str(tmp_path / "a"), "--threshold", "0.9", "--budget", "macs=0.5",
            expect="--threshold and --budget: give one")
    # policies chosen for other models: eval.json's hashes no longer match the checkpoint's
    stale = tmp_path / "stale_run"
    subprocess.run(["cp", "-a", run, str(stale)], check=True)
    report = json.loads((stale / "eval.json").read_text())
    report["model_hashes"]["1"] = "0" * 16
    (stale / "eval.json").write_text(json.dumps(report))
    # the same round and checkpoint with other weights: the message says which hash differs (it named
    # the same round and checkpoint twice, "other models (round 0, round_000000) than ... (round 0, round_000000)")
    refused(str(stale), "--out", str(tmp_path / "a"),
            expect="describes other models (round 0, round_000000): client 1's model hash is ")
    # the usual stale eval.json: policies of another round (e.g. evaluated before a resume)
    report = json.loads((evaluated_run / "eval.json").read_text())
    report["round"] = 5
    (stale / "eval.json").write_text(json.dumps(report))
    refused(str(stale), "--out", str(tmp_path / "a"),
            expect="describes other models (round 5, round_000000) than the run's newest checkpoint "
                   "(round 0, round_000000)")
    (stale / "eval.json").unlink()
    refused(str(stale), "--out", str(tmp_path / "a"), expect="--threshold")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.export-*"))


def test_every_clients_model_hash_is_checked_before_any_is_traced(evaluated_run, tmp_path, monkeypatch):
    """A model hash that differs from eval.json's at the same round was found only when export
    reached that client, after tracing and checking the ones before it: now every requested
    client is checked first and the refusal names all of them."""
    from cafedist.deploy import export as export_module

    stale = tmp_path / "stale_run"
    subprocess.run(["cp", "-a", str(evaluated_run), str(stale)], check=True)
    report = json.loads((stale / "eval.json").read_text())
    for cid in ("1", "3"):
        report["model_hashes"][cid] = "0" * 16
    (stale / "eval.json").write_text(json.dumps(report))
    traced: list = []
    trace = export_module.export_stages
    monkeypatch.setattr(export_module, "export_stages", lambda *a, **k: traced.append(a) or trace(*a, **k))
    proc = cafedist_in_process("export", str(stale), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert traced == []  # client 0 was traced and checked before client 1 was refused
    assert proc.stderr.strip().splitlines()[-1] == (
        f"cafedist: error: {stale / 'eval.json'}: describes other models (round 0, round_000000): the model hashes "
        f"of clients 1, 3 are not the ones eval.json has: run `cafedist eval RUN --budget ...` again")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.export-*"))
    # the clients asked for are the ones checked: client 2's hash matches, so it exports
    cafedist_in_process("export", str(stale), "--out", str(tmp_path / "out"), "--clients", "2", check=True)
    assert len(traced) == 1


@pytest.mark.parametrize("edit", [
    {"policy": "foo"}, {"policy": None}, {"threshold": None}, {"threshold": "0.9"}, {"threshold": float("nan")},
    {"temperatures": [1.0]}, {"temperatures": [0.0, 0.0, 0.0]}, {"policy": "static", "static_exit": 7},
    {"policy": "static", "static_exit": None}, {"policy": "static", "static_exit": 2.7},
    {"policy": "static", "static_exit": "2"}, {"policy": "static", "static_exit": True},
    {"policy": "static", "static_exit": float("inf")}, {"policy": "static", "static_exit": 0},
    {"static_exit": 1.5}])
def test_a_hand_edited_policy_row_is_one_line_before_any_client_is_traced(evaluated_run, tmp_path, edit):
    """eval.json is where export reads each client's policy (a threshold edited there by hand
    is the way to deploy another trade-off): a row export cannot use ended in a traceback, exit
    1 (ValueError, TypeError, KeyError, an index out of bounds), after the clients before it were traced."""
    stale = tmp_path / "edited_run"
    subprocess.run(["cp", "-a", str(evaluated_run), str(stale)], check=True)
    report = json.loads((stale / "eval.json").read_text())
    report["budget"]["clients"][2].update(edit)
    (stale / "eval.json").write_text(json.dumps(report))
    proc = cafedist_in_process("export", str(stale), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"cafedist: error: {stale / 'eval.json'}: client 2's policy row "), line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.export-*"))


@pytest.mark.parametrize("budget", [None, [], "macs=0.5"])
def test_an_eval_json_whose_budget_section_is_no_object_has_no_budget_table(evaluated_run, tmp_path, budget):
    """``"budget": null`` (a hand edit) gave AttributeError, exit 1."""
    stale = tmp_path / "edited_run"
    subprocess.run(["cp", "-a", str(evaluated_run), str(stale)], check=True)
    report = json.loads((stale / "eval.json").read_text())
    report["budget"] = budget
    (stale / "eval.json").write_text(json.dumps(report))
    proc = cafedist_in_process("export", str(stale), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "eval.json: has no per-client budget table" in proc.stderr.strip().splitlines()[-1]


def test_out_given_as_dot_or_empty(evaluated_run, tmp_path, monkeypatch):
    """``--out .`` (an empty working directory) is written like any empty folder; it was renamed
    onto '.' at the end ('..export-*: Device or resource busy'); ``--out ''`` is refused."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    proc = cafedist_in_process("export", str(evaluated_run), "--out", "", "--threshold", "0.9", "--clients", "0")
    assert proc.returncode == 2 and "cafedist: error: --out: empty path" in proc.stderr, proc.stderr
    cafedist_in_process("export", str(evaluated_run), "--out", ".", "--threshold", "0.9", "--clients", "0",
                        check=True)
    assert sorted(p.name for p in here.iterdir()) == ["client_0000", "early_exit.py", "export.json"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_mistyped_run_is_not_a_run_directory_rather_than_a_missing_eval_json(tmp_path):
    """Without --threshold, a RUN that is no run directory was refused as
    'RUN/eval.json: not found: ... run `cafedist eval RUN --budget ...` first'."""
    (tmp_path / "afile").write_text("x")
    for run in (tmp_path / "nosuch", tmp_path / "afile"):
        proc = cafedist_in_process("export", str(run), "--out", str(tmp_path / "out"))
        assert proc.returncode == 2 and proc.stderr.strip().endswith(
            f"cafedist: error: {run}: not a run directory (no config.yaml; expected the --out of `cafedist train`)"), \
            proc.stderr
    assert not (tmp_path / "out").exists()


def test_out_a_symlink_to_an_empty_folder_is_written_there(evaluated_run, tmp_path):
    """The written folder was renamed onto the link itself, which fails after the whole export
    ('.link.export-*: Not a directory')."""
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    cafedist_in_process("export", str(evaluated_run), "--out", str(tmp_path / "link"), "--threshold", "0.9",
                        "--clients", "0", check=True)
    assert (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in (tmp_path / "target").iterdir()) == ["client_0000", "early_exit.py", "export.json"]


def test_an_eval_model_without_exit_stages_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot be cut at its exits"):
        export_stages(torch.nn.Linear(3, 2), torch.zeros(2, 3), tmp_path)
    assert not list(tmp_path.iterdir())


def test_an_export_into_the_run_directory_is_written_under_the_outputs_lock(evaluated_run, tmp_path, monkeypatch):
    """An export kept in the run directory is an output about the run's models: written under
    their lock, it is refused when the run was started over (--resume none) since its models
    were read, as eval is, instead of appearing beside the new run; elsewhere it is a copy of
    the models read and is written regardless."""
    from cafedist.eval import run as eval_run

    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(evaluated_run), str(run)], check=True)
    checkpoints_folders = iter(range(100))  # each look at the run finds another checkpoints folder
    monkeypatch.setattr(eval_run, "_incarnation", lambda run_dir: next(checkpoints_folders))
    proc = cafedist_in_process("export", str(run), "--out", str(run / "export"))
    assert proc.returncode == 2 and "the run was started over (--resume none)" in proc.stderr, proc.stderr
    assert not (run / "export").exists() and not list(run.glob(".export.export-*"))
    cafedist_in_process("export", str(run), "--out", str(tmp_path / "elsewhere"), "--clients", "0", check=True)
    assert (tmp_path / "elsewhere" / "export.json").is_file()


@pytest.mark.parametrize("budget,options", [
    ("file", ("--policies", "margin,entropy")),  # clients of both budget kinds, non-default scores
    ("loss=2", ("--policy-scope", "client", "--budget-confidence", "0.5")),
], ids=["mixed-file-pooled", "loss-client-scope"])
def test_exported_programs_answer_every_test_sample_as_eval_chose(evaluated_run, tmp_path, budget, options):
    """The deployed policy is the evaluated one: the exported programs, loaded as a deployment
    loads them, answer each test sample from the exit (and with the class) that eval's choice
    for that client gives on the run's own models, and score exactly eval.json's test numbers:
    the policy, threshold and temperatures reach policy.json unchanged, for every score and
    scope (not only what export's own check compares with, which reads the same eval.json)."""
    from cafedist.eval.budget_report import apply_choice
    from cafedist.eval.budget_run import client_splits
    from cafedist.eval.run import load_run

    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(evaluated_run), str(run)], check=True)
    if budget == "file":
        budget = str(tmp_path / "budgets.yaml")
        Path(budget).write_text("0: macs=0.4\n1: loss=1\ndefault: macs=0.7\n")
    cafedist_in_process("eval", str(run), "--budget", budget, *options, check=True)
    cafedist_in_process("export", str(run), "--out", str(tmp_path / "export"), check=True)
    report = json.loads((run / "eval.json").read_text())
    with load_run(run) as loaded:
        tests = [test for _, test in client_splits(loaded.run)]
        inputs = [c.data.x_test for c in loaded.run.pool.each(range(loaded.run.n), modify=False)]
    for row, test, x in zip(report["budget"]["clients"], tests, inputs):
        static = row["static_exit"]
        chosen = Choice(row["policy"], row["threshold"],
                        None if row["temperatures"] is None else tuple(row["temperatures"]),
                        None if static is None else static - 1)
        counts = apply_choice(chosen, test, report["macs_per_exit"])  # eval's numbers, from its row
        assert (counts.correct / counts.n, counts.macs / counts.n) == (row["test_accuracy"], row["test_mean_macs"])
        logits, exits = early_exit.load(tmp_path / "export" / f"client_{row['client']:04d}")(x)
        want = chosen.exits(test)
        assert torch.equal(exits, want), row["client"]
        assert torch.equal(logits.argmax(dim=-1), test.logits.argmax(dim=-1).gather(0, want.unsqueeze(0))[0])
    rows = report["budget"]["clients"]
    assert {r["policy"] for r in rows} - {"static"}, rows  # thresholds, not only static fallbacks, were compared


def test_an_export_inside_the_checkpoints_folder_is_refused(evaluated_run, tmp_path):
    """`--out RUN/checkpoints/round_N/export` (beside the checkpoint it came from) was written, and
    deleted without a word with that checkpoint when training pruned it (checkpoint.keep)."""
    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(evaluated_run), str(run)], check=True)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for out in (run / "checkpoints" / "round_000000" / "export", run / "checkpoints" / "export"):
        proc = cafedist_in_process("export", str(run), "--out", str(out), "--threshold", "0.9")
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("cafedist: error:")]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "inside the run's checkpoints folder" in lines[0] and "Traceback" not in proc.stderr
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_an_export_deeper_inside_the_run_directory_is_refused(evaluated_run, tmp_path):
    """`--resume none` moves aside exports directly in the run directory; one at RUN/exports/v1
    stayed beside the new run, its export.json naming checkpoints that were no longer its models'."""
    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(evaluated_run), str(run)], check=True)
    (run / "exports").mkdir()
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    proc = cafedist_in_process("export", str(run), "--out", str(run / "exports" / "v1"), "--threshold", "0.9")
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("cafedist: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "inside the run directory but not directly in it" in lines[0] and "Traceback" not in proc.stderr
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    proc = cafedist_in_process("export", str(run), "--out", str(run / "v1"), "--threshold", "0.9")
    assert proc.returncode == 0, proc.stderr

