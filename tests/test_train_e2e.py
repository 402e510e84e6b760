"""End to end in one process: train, outputs, eval, and bad input through the CLI."""

import json
import shutil

import pytest
from conftest import cafedist, comparable, env_for_tests, metrics, summary
from conftest import cafedist_in_process as in_process


def test_train_writes_outputs_and_eval_reports(tiny_config, tmp_path):
    cfg = tiny_config(rounds=4)
    out = tmp_path / "run"
    proc = cafedist("train", "--config", str(cfg), "--out", str(out), "--no-progress", check=True)
    assert "done:" in proc.stdout
    recs = metrics(out)
    assert [r["round"] for r in recs] == [0, 1, 2, 3]
    for key in ("acc_per_exit", "loss", "n_students", "bytes_up", "bytes_down", "seconds"):
        assert key in recs[-1], key
    # R(t) = min(2t/T, 1) with T = 4: N_s = floor((m-1) n R) = 0, 4, 8, 8 for n = 4, m = 3
    assert [r["n_students"] for r in recs] == [0, 4, 8, 8]
    assert recs[-1]["bytes_up"] == 64 * 10 * 4  # the last exit only (comm.exits: used) x P' x C x float32
    s = summary(out)
    assert len(s["acc_per_exit"]) == 3 and len(s["macs_per_exit"]) == 3
    assert s["macs_per_exit"] == sorted(s["macs_per_exit"])
    assert s["acc_per_exit"][-1] > 0.3  # far above chance (0.1) after 4 short rounds
    assert (out / "config.yaml").exists()
    ev = cafedist("eval", str(out), check=True)
    assert "fewer MACs" in ev.stdout
    report = json.loads((out / "eval.json").read_text())
    assert report["acc_per_exit"] == s["acc_per_exit"]
    assert report["model_hashes"] == s["model_hashes"]
    # where the numbers were computed: this stack, on the CPU (as training ran)
    assert {k: v for k, v in report["environment"].items() if k != "git"} == \
        {k: v for k, v in s["environments"][0].items() if k != "git"}
    assert report["environment"]["devices"] == ["cpu"]
    assert len(report["per_client"]) == 4
    assert (out / "accuracy_vs_macs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    red = report["mac_reduction"]
    assert red["accuracy"] >= s["acc_per_exit"][-1] - 0.01 - 1e-9


def test_same_config_same_result_and_seed_matters(tiny_config, tmp_path):
    cfg = tiny_config(rounds=2)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    cafedist("train", "--config", str(cfg), "--out", str(a), "--no-progress", check=True)
    in_process("train", "--config", str(cfg), "--out", str(b), "--no-progress", check=True)
    in_process("train", "--config", str(cfg), "--out", str(c), "--no-progress", "seed=4", check=True)
    assert summary(a)["model_hashes"] == summary(b)["model_hashes"]
    assert comparable(metrics(a)) == comparable(metrics(b))
    assert summary(a)["model_hashes"] != summary(c)["model_hashes"]


def test_sending_every_exit_changes_bytes_not_results(tiny_config, tmp_path):
    """CAFEDistill reads only the last exit: gathering all m exits costs m x the uplink, same run."""
    cfg = tiny_config(rounds=3)
    used, every = tmp_path / "used", tmp_path / "all"
    in_process("train", "--config", str(cfg), "--out", str(used), "--no-progress", check=True)
    in_process("train", "--config", str(cfg), "--out", str(every), "--no-progress", "comm.exits=all", check=True)
    a, b = metrics(used), metrics(every)
    assert [r["bytes_up"] * 3 for r in a] == [r["bytes_up"] for r in b]
    assert [r["bytes_down"] for r in a] == [r["bytes_down"] for r in b]
    drop = {"bytes_up", "wire_bytes"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in comparable(a)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in comparable(b)]
    assert summary(used)["model_hashes"] == summary(every)["model_hashes"]


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_config, tmp_path):
    cfg = tiny_config(rounds=3)
    out = tmp_path / "run"
    proc = in_process("train", "--config", str(cfg), "--out", str(out), "--dry-run", "--world-size", "3", check=True)
    assert not out.exists()
    text = proc.stdout
    assert "4 clients" in text and "3 exits" in text and "placement on 3 rank(s)" in text
    lines = text.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "clients"]) + 1:]
    rows = [line.split() for line in table if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    ids = sorted(int(i.strip(",")) for row in rows for i in row[3:])
    assert ids == [0, 1, 2, 3]  # every client placed exactly once
    # bytes per client and round: the last exit's logits up, targets + student mask down (P' = 64, C = 10)
    assert f"{64 * 10 * 4 / 1000:.3g}KB up" in text
    assert f"{(64 * 10 * 4 + 3) / 1000:.3g}KB down" in text  # targets float32 + the student mask (m = 3)
    assert "4 of 4 clients per round" in text
    _assert_clean_error(in_process("train", "--config", str(cfg), "--out", str(out), "--dry-run", "--world-size", "9"),
                        "9 ranks")
    _assert_clean_error(in_process("train", "--config", str(cfg), "--out", str(out), "--world-size", "2"),
                        "--world-size")


def test_dry_run_packing_line_says_what_the_cpu_would_do(tiny_config, tmp_path):
    """The plan's packing line for a CPU run: sequential unless packing is asked for AND possible.
    With fp16 (which only the sequential path can scale) train.packed: on cannot pack anywhere."""
    cfg = tiny_config(rounds=1)

    def packing(*overrides: str) -> str:
        proc = in_process("train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--dry-run",
                          *overrides, check=True)
        return next(line for line in proc.stdout.splitlines() if line.startswith("packing:"))

    auto = packing()
    assert "stepped together" in auto and "on CPU sequential unless train.packed: on" in auto
    on = packing("train.packed=on")
    assert "stepped together" in on and "unless" not in on and "on CPU too" in on
    for overrides in (("train.packed=on", "train.amp=fp16"), ("train.amp=fp16",)):
        blocked = packing(*overrides)
        assert "one after another (train.amp: fp16" in blocked, blocked
        assert "unless" not in blocked and "on CPU too" in blocked, blocked  # packed: on would not pack either


def _assert_clean_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("cafedist: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_config_values_exit_2_naming_the_field(tiny_config, tmp_path):
    cfg = tiny_config()
    out = tmp_path / "run"
    _assert_clean_error(in_process("train", "--config", str(cfg), "--out", str(out), "data.alpha=0"), "data.alpha")
    _assert_clean_error(in_process("train", "--config", str(cfg), "--out", str(out), "train.bogus=1"), "train.bogus")
    _assert_clean_error(in_process("train", "--config", str(cfg), "--out", str(out), "data.proxy_fraction=1.5"),
                        "data.proxy_fraction")
    _assert_clean_error(in_process("train", "--config", str(cfg), "--out", str(out), "data.clients=5000"), "clients")
    assert not out.exists() or not any(out.iterdir()) or not (out / "metrics.jsonl").exists()


def test_corrupt_store_exit_2_and_no_output(tiny_config, tmp_path):
    cfg = tiny_config()
    store = tmp_path / "broken.h5"
    store.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    out = tmp_path / "run"
    proc = in_process("train", "--config", str(cfg), "--out", str(out), f"data.store={store}")
    _assert_clean_error(proc, str(store))
    assert not (out / "metrics.jsonl").exists()
    assert not list(tmp_path.glob("**/.*.tmp*"))


def test_refuses_to_resume_a_different_config(tiny_config, tmp_path):
    cfg = tiny_config(rounds=2)
    out = tmp_path / "run"
    in_process("train", "--config", str(cfg), "--out", str(out), "--no-progress", check=True)
    before = (out / "metrics.jsonl").read_text()
    proc = in_process("train", "--config", str(cfg), "--out", str(out), "algorithm.cafedistill.mu=2.0")
    _assert_clean_error(proc, "different config", "algorithm.cafedistill.mu")
    assert (out / "metrics.jsonl").read_text() == before
    assert (out / "checkpoints" / "latest").exists()


def test_prepare_and_describe(tmp_path):
    out = tmp_path / "d.h5"
    in_process("prepare", "--dataset", "digits", "--clients", "3", "--alpha", "0.3", "--proxy-fraction", "0.1",
               "--seed", "1", "--out", str(out), check=True)
    desc = in_process("prepare", "--describe", str(out), check=True)
    assert "digits" in desc.stdout
    bad = in_process("prepare", "--dataset", "cifar10", "--root", str(tmp_path / "nope"), "--clients", "3",
                     "--alpha", "0.3", "--proxy-fraction", "0.1", "--seed", "1", "--out", str(tmp_path / "c.h5"))
    _assert_clean_error(bad, "cifar10")
    assert not (tmp_path / "c.h5").exists()


def test_bf16_autocast_trains_to_similar_accuracy(tiny_config, tmp_path):
    """train.amp=bf16 on CPU: same pipeline in mixed precision, accuracy within a few points."""
    cfg = tiny_config(rounds=4)
    full, mixed = tmp_path / "fp32", tmp_path / "bf16"
    in_process("train", "--config", str(cfg), "--out", str(full), "--no-progress", check=True)
    in_process("train", "--config", str(cfg), "--out", str(mixed), "--no-progress", "train.amp=bf16", check=True)
    a, b = summary(full)["acc_per_exit"][-1], summary(mixed)["acc_per_exit"][-1]
    assert abs(a - b) < 0.08, (a, b)
    assert summary(full)["model_hashes"] != summary(mixed)["model_hashes"]  # it really ran in bf16


def test_packed_training_matches_sequential_through_the_cli(tiny_config, tmp_path, monkeypatch):
    """train.packed=on steps the clients of a rank together (vmap): same accuracy, near-equal models."""
    from cafedist.cli import main as cli_main
    from cafedist.train import round as round_module

    waves = []  # clients per packed step: equal results alone would also hold if packing were ignored
    packed_update = round_module.packed_local_update
    monkeypatch.setattr(round_module, "packed_local_update",
                        lambda wave, *args: waves.append(len(wave)) or packed_update(wave, *args))
    cfg = tiny_config(rounds=3)
    seq, packed = tmp_path / "seq", tmp_path / "packed"
    assert cli_main(["train", "--config", str(cfg), "--out", str(seq), "--no-progress", "train.packed=off"]) == 0
    assert waves == []
    assert cli_main(["train", "--config", str(cfg), "--out", str(packed), "--no-progress", "train.packed=on"]) == 0
    assert len(waves) == 3 and min(waves) > 1  # one packed step of the rank's clients per round
    a, b = metrics(seq), metrics(packed)
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-3
        assert max(abs(x - y) for x, y in zip(ra["acc_per_exit"], rb["acc_per_exit"])) <= 0.02


def test_divergence_is_a_one_line_error(tiny_config, tmp_path):
    cfg = tiny_config(rounds=2)
    proc = in_process("train", "--config", str(cfg), "--out", str(tmp_path / "run"), "algorithm.name=fedavg",
                      "train.lr=1.0e+12", "train.momentum=0.0")
    _assert_clean_error(proc, "diverged")


def test_validation_metrics_iff_val_fraction(tiny_config, tmp_path):
    """data.val_fraction > 0: every evaluated round and the summary report validation accuracy;
    0 (the default): no validation keys at all."""
    cfg = tiny_config(rounds=2)
    plain, val = tmp_path / "plain", tmp_path / "val"
    in_process("train", "--config", str(cfg), "--out", str(plain), "--no-progress", check=True)
    in_process("train", "--config", str(cfg), "--out", str(val), "--no-progress", "data.val_fraction=0.2", check=True)
    assert not any(k.startswith("val_") for r in metrics(plain) for k in r)
    assert not any(k.startswith("val_") for k in summary(plain))
    for rec in metrics(val):
        assert len(rec["val_acc_per_exit"]) == len(rec["acc_per_exit"]) == 3
        assert all(0.0 <= a <= 1.0 for a in rec["val_acc_per_exit"])
    s = summary(val)
    assert s["val_acc_per_exit"] == metrics(val)[-1]["val_acc_per_exit"]  # the last round's models
    assert len(s["val_acc_per_client"]) == 4 and all(len(a) == 3 for a in s["val_acc_per_client"])
    assert s["val_acc_per_exit"][-1] > 0.2  # far above chance: the split is labelled like the client's data


def test_each_evaluated_round_reads_every_client_once(tiny_config, tmp_path, monkeypatch):
    """Test and validation accuracy come from one pass per evaluated round, and the last round's
    final evaluation also serves the summary (at scale each pass reads every client); a run
    resumed after its final checkpoint (summary.json lost) evaluates for the summary itself."""
    import cafedist.eval.clients as clients_mod
    import cafedist.train.records as records_mod
    from cafedist.config import load_config
    from cafedist.train.loop import train

    calls = {"final": 0, "forward": 0}
    real_final, real_forward = records_mod.final_evaluation, clients_mod.exit_predictions

    def counting_final(*args, **kwargs):
        calls["final"] += 1
        return real_final(*args, **kwargs)

    def counting_forward(*args, **kwargs):  # one model on one split
        calls["forward"] += 1
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(records_mod, "final_evaluation", counting_final)
    monkeypatch.setattr(clients_mod, "exit_predictions", counting_forward)
    cfg = load_config(tiny_config(rounds=3, clients=4), ["data.val_fraction=0.2"])
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    assert calls["final"] == 1
    assert calls["forward"] == 3 * 4 * 2  # rounds 0-1 and the final evaluation: 4 clients x (test, validation)
    recs, s = metrics(out), summary(out)
    assert all("val_acc_per_exit" in r and "acc_per_exit" in r for r in recs)
    assert s["acc_per_exit"] == recs[-1]["acc_per_exit"] and s["val_acc_per_exit"] == recs[-1]["val_acc_per_exit"]

    (out / "summary.json").unlink()  # killed after the final checkpoint, before the summary
    train(cfg, out, progress=False)
    assert calls["final"] == 2 and calls["forward"] == 3 * 4 * 2 + 4 * 2  # no round retrained
    again = summary(out)
    assert again.pop("wall_seconds") is not None and s.pop("wall_seconds") is not None
    assert again == s


def test_eval_every_evaluates_every_kth_round_and_the_last(tiny_config, tmp_path):
    """train.eval_every=2: rounds 1 and 3 (every second) and the last one carry accuracies; the
    others record training only, so evaluation time is saved there."""
    from cafedist.cli import main as cli_main

    out = tmp_path / "run"
    assert cli_main(["train", "--config", str(tiny_config(rounds=5)), "--out", str(out), "--no-progress",
                     "train.eval_every=2"]) == 0
    evaluated = [r["round"] for r in metrics(out) if r.get("acc_per_exit")]
    assert evaluated == [1, 3, 4]
    assert len(metrics(out)) == 5 and summary(out)["acc_per_exit"] == metrics(out)[-1]["acc_per_exit"]


def test_half_precision_logits_halve_the_exchange_and_keep_the_result_close(tiny_config, tmp_path):
    """comm.logits_dtype=float16 sends the proxy logits in half the bytes; training sees them
    rounded only, so accuracy stays close to float32's."""
    from cafedist.cli import main as cli_main

    cfg = tiny_config(rounds=3)
    runs = {}
    for dtype in ("float32", "float16"):
        runs[dtype] = tmp_path / dtype
        assert cli_main(["train", "--config", str(cfg), "--out", str(runs[dtype]), "--no-progress",
                         f"comm.logits_dtype={dtype}"]) == 0
    full, half = metrics(runs["float32"]), metrics(runs["float16"])
    for a, b in zip(full, half):
        assert b["bytes_up"] * 2 == pytest.approx(a["bytes_up"], rel=0.02)  # the upload is logits
    assert max(abs(x - y) for x, y in zip(full[-1]["acc_per_exit"], half[-1]["acc_per_exit"])) <= 0.05
    assert summary(runs["float32"])["model_hashes"] != summary(runs["float16"])["model_hashes"]  # it did apply


def test_train_without_out_writes_runs_named_after_the_config(tiny_config, tmp_path, monkeypatch):
    from cafedist.cli import main as cli_main

    cfg = tiny_config(rounds=1, name="mine.yaml")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["train", "--config", str(cfg), "--no-progress"]) == 0
    assert (tmp_path / "runs" / "mine" / "summary.json").is_file()


def test_eval_max_loss_sets_the_accuracy_budget_of_the_mac_reduction(tiny_config, tmp_path):
    from cafedist.cli import main as cli_main
    from cafedist.eval.dynamic import mac_reduction_at_loss

    out = tmp_path / "run"
    assert cli_main(["train", "--config", str(tiny_config(rounds=2)), "--out", str(out), "--no-progress"]) == 0
    reductions = {}
    for max_loss in (0.0, 0.3):
        assert cli_main(["eval", str(out), "--max-loss", str(max_loss)]) == 0
        report = json.loads((out / "eval.json").read_text())
        assert report["max_loss"] == max_loss
        assert report["mac_reduction"] == mac_reduction_at_loss(report["dynamic"], report["acc_per_exit"][-1], max_loss)
        reductions[max_loss] = report["mac_reduction"]["macs_reduction"]
    assert reductions[0.3] > reductions[0.0]  # a looser accuracy budget answers more samples early


def test_compile_without_a_compiler_warns_and_trains_eagerly(tiny_config, tmp_path):
    """torch.compile compiles at a model's first call, inside training: without a C++ compiler
    for the CPU backend that raised a traceback mid-run. A probe finds it up front now, warns
    once, and the run trains eagerly (the same bits as without train.compile)."""
    from cafedist.cli import main as cli_main

    cfg = tiny_config(rounds=1)
    assert cli_main(["train", "--config", str(cfg), "--out", str(tmp_path / "eager"), "--no-progress"]) == 0
    proc = cafedist("train", "--config", str(cfg), "--out", str(tmp_path / "c"), "--no-progress", "train.compile=true",
                    env=env_for_tests(CXX=str(tmp_path / "no-such-compiler")), check=True)
    warnings = [line for line in proc.stderr.splitlines() if "train.compile" in line]
    assert len(warnings) == 1 and "cannot run on cpu here" in warnings[0] and "training eagerly" in warnings[0]
    assert summary(tmp_path / "c")["model_hashes"] == summary(tmp_path / "eager")["model_hashes"]


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile's CPU backend needs a C++ compiler (g++)")
def test_compiled_training_matches_eager_closely(tiny_config, tmp_path):
    """train.compile=true on the CPU (inductor): the run compiles (no fallback warning) and
    reaches the accuracy of eager training up to float reordering."""
    from cafedist.cli import main as cli_main

    cfg = tiny_config(rounds=1)
    assert cli_main(["train", "--config", str(cfg), "--out", str(tmp_path / "eager"), "--no-progress"]) == 0
    proc = cafedist("train", "--config", str(cfg), "--out", str(tmp_path / "c"), "--no-progress", "train.compile=true",
                    check=True)
    assert "train.compile" not in proc.stderr
    eager, compiled = summary(tmp_path / "eager"), summary(tmp_path / "c")
    assert max(abs(a - b) for a, b in zip(eager["acc_per_exit"], compiled["acc_per_exit"])) <= 0.03
