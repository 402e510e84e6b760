"""Checkpoints: SIGKILL anywhere + resume == uninterrupted, on the same or another world size.

The runs that are killed or stopped, by a signal or a fault, are processes of their own, as are
the resumes whose subject is the process (another thread count, another world size); the
reference run and the plain resumes run in this process (cafedist_in_process)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cafedist, cafedist_in_process, comparable, env_for_tests, metrics, summary, torchrun

pytestmark = pytest.mark.slow
ROUNDS = 5


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, store_cache):
    from conftest import TINY

    base = tmp_path_factory.mktemp("resume")
    cfg = base / "tiny.yaml"
    cfg.write_text(TINY.format(rounds=ROUNDS, clients=4, every=1, cache=store_cache))
    out = base / "ref"
    cafedist_in_process("train", "--config", str(cfg), "--out", str(out), "--no-progress", check=True)
    return cfg, out


def _interrupt(cfg, out, fault):
    """Run until the fault kills or stops it; returns the finished process."""
    return cafedist("train", "--config", str(cfg), "--out", str(out), "--no-progress",
                    env=env_for_tests(CAFEDIST_FAULT=fault))


def _assert_same_run(out, ref):
    assert summary(out)["model_hashes"] == summary(ref)["model_hashes"]
    assert summary(out)["acc_per_exit"] == summary(ref)["acc_per_exit"]
    assert comparable(metrics(out)) == comparable(metrics(ref))


@pytest.mark.parametrize("fault", ["kill@local:3", "kill@checkpoint:2", "kill@checkpoint:0"])
def test_sigkill_then_resume_is_identical(uninterrupted, tmp_path, fault):
    cfg, ref = uninterrupted
    out = tmp_path / "run"
    killed = _interrupt(cfg, out, fault)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    if fault == "kill@checkpoint:2":  # the half-written checkpoint of round 2 must not be used
        assert (out / "checkpoints" / ".round_000002.tmp").exists()
        assert not (out / "checkpoints" / "round_000002").exists()
    resumed = cafedist_in_process("train", "--config", str(cfg), "--out", str(out), "--no-progress", check=True)
    expect = {"kill@local:3": 2, "kill@checkpoint:2": 1, "kill@checkpoint:0": None}[fault]
    if expect is None:
        assert "resumed" not in resumed.stderr
    else:
        assert f"round {expect}" in resumed.stderr and "resumed" in resumed.stderr
    _assert_same_run(out, ref)


def test_kill_at_an_arbitrary_moment(uninterrupted, tmp_path):
    cfg, ref = uninterrupted
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "cafedist", "train", "--config", str(cfg), "--out", str(out),
                             "--no-progress"], cwd=ROOT, env=env_for_tests(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "checkpoints" / "round_000001").exists():
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside round 2 or 3: not at a chosen point
    proc.kill()
    proc.wait()
    cafedist_in_process("train", "--config", str(cfg), "--out", str(out), "--no-progress", check=True)
    _assert_same_run(out, ref)


def test_resume_on_a_different_world_size(uninterrupted, tmp_path):
    cfg, ref = uninterrupted
    out = tmp_path / "run"
    _interrupt(cfg, out, "kill@local:3")
    proc = subprocess.run(torchrun(2) + ["-m", "cafedist", "train", "--config", str(cfg), "--out", str(out),
                                         "--no-progress"],
                          cwd=ROOT, env=env_for_tests(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written by 1 ranks, now 2" in proc.stderr
    _assert_same_run(out, ref)
    assert len(summary(out)["environments"]) == 1  # the number of ranks is no other stack


def test_sigterm_checkpoints_and_exits_for_requeue(uninterrupted, tmp_path):
    cfg, ref = uninterrupted
    out = tmp_path / "run"
    stopped = _interrupt(cfg, out, "term@local:1")
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert (out / "checkpoints" / "round_000001").exists()
    assert len(metrics(out)) == 2
    cafedist_in_process("train", "--config", str(cfg), "--out", str(out), "--no-progress", check=True)
    _assert_same_run(out, ref)


def test_a_stop_signal_during_a_checkpoint_write_stops_after_it(uninterrupted, tmp_path):
    """The signal came while round 1's checkpoint was written: the run went on to train and
    checkpoint round 2 first, which a preemption's grace period may not last."""
    cfg, ref = uninterrupted
    out = tmp_path / "run"
    stopped = _interrupt(cfg, out, "usr1@checkpoint:1")
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "round_000001"
    assert len(metrics(out)) == 2
    resumed = cafedist_in_process("train", "--config", str(cfg), "--out", str(out), "--no-progress", check=True)
    assert "CPU threads" not in resumed.stderr  # the same thread count: nothing to warn of
    assert "another software or hardware stack" not in resumed.stderr
    _assert_same_run(out, ref)
    assert summary(out)["environments"] == summary(ref)["environments"]


def test_a_resume_on_another_stack_says_so_and_records_both(uninterrupted, tmp_path, monkeypatch):
    """Another CPU model (or torch, or GPU model) changes the last bits of every later round:
    the resume says so, and summary.json lists both stacks, the first first."""
    import torch

    from cafedist import provenance

    cfg, ref = uninterrupted
    out = tmp_path / "run"
    assert _interrupt(cfg, out, "term@local:1").returncode == 75
    here = provenance.cpu_model()
    monkeypatch.setattr(provenance, "cpu_model", lambda: "Another CPU 9000")
    resumed = cafedist_in_process("train", "--config", str(cfg), "--out", str(out), "--no-progress", check=True)
    assert f"resumed on another software or hardware stack than this run began on (cpus: {here} -> Another " \
           f"CPU 9000)" in resumed.stderr, resumed.stderr[-2000:]
    first, second = summary(out)["environments"]
    assert (first["cpus"], second["cpus"]) == ([here], ["Another CPU 9000"])
    assert first["torch"] == second["torch"] == torch.__version__ and first["devices"] == ["cpu"]
    assert summary(ref)["environments"] == [first]


def test_a_resume_under_another_thread_count_says_so(tiny_config, tmp_path):
    # 3 rounds, not the module's 5: the resume on 2 threads (this test's slow part) trains round 2 only
    cfg = tiny_config(rounds=3)
    out = tmp_path / "run"
    assert _interrupt(cfg, out, "term@local:1").returncode == 75
    assert len(metrics(out)) == 2  # rounds 0 and 1 trained on 1 thread: round 2 is left for the resume
    resumed = cafedist("train", "--config", str(cfg), "--out", str(out), "--no-progress",
                       env=env_for_tests(OMP_NUM_THREADS="2"), check=True)
    assert "resumed with 2 CPU threads where this run began with 1" in resumed.stderr


def test_corrupted_newest_checkpoint_falls_back(uninterrupted, tmp_path):
    cfg, ref = uninterrupted
    out = tmp_path / "run"
    _interrupt(cfg, out, "kill@local:4")
    newest = out / "checkpoints" / "round_000003" / "client_00001.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    resumed = cafedist_in_process("train", "--config", str(cfg), "--out", str(out), "--no-progress", check=True)
    assert "sha256 does not match" in resumed.stderr and "round 2" in resumed.stderr
    _assert_same_run(out, ref)


def test_a_broken_later_checkpoint_does_not_make_pruning_remove_the_new_one(tmp_path):
    """A run resumed from round 3 past broken checkpoints of rounds 4 and 5, with a lower
    checkpoint.keep (not hashed): committing round 4 again pruned round 4 itself (and 3), as the
    broken round 5 took the one kept place, so the next resume found no checkpoint at all."""
    from cafedist.run.checkpoint import CheckpointDir

    ckpt = CheckpointDir(tmp_path)

    def commit(round_idx: int, keep: int) -> None:
        ckpt.begin(round_idx)
        name, digest = ckpt.write_client(round_idx, 0, {"w": round_idx})
        ckpt.commit(round_idx, {"round": round_idx}, {name: digest}, world_size=1, config_hash="h", keep=keep)

    for round_idx in (3, 4, 5):
        commit(round_idx, keep=3)
    for round_idx in (4, 5):  # corrupted on disk: a resume skips them and starts after round 3
        (ckpt.root / f"round_{round_idx:06d}" / "server.pt").write_bytes(b"broken")
    assert ckpt.newest_valid(warn=lambda _: None).round == 3
    commit(4, keep=1)
    assert ckpt.newest_valid(warn=lambda _: None).round == 4
    assert not (ckpt.root / "round_000003").exists()


def test_every_file_a_manifest_lists_or_references_is_verified(tmp_path):
    """One flipped bit in any one file, its own shards, server.pt or a shard it references in an
    older checkpoint, makes the checkpoint fail to verify (the corruption test above flips one
    shard only, which a check that skipped another file would pass)."""
    import torch

    from cafedist.errors import CheckpointError
    from cafedist.run.checkpoint import CheckpointDir, client_file, sha256_file

    ckpt = CheckpointDir(tmp_path)

    def commit(round_idx: int, cids: list[int], refs: dict | None = None) -> Path:
        ckpt.begin(round_idx)
        files = dict(ckpt.write_client(round_idx, cid, {"w": torch.full((3,), 10.0 * round_idx + cid)})
                     for cid in cids)
        return ckpt.commit(round_idx, {"round": round_idx}, files, world_size=1, config_hash="h", keep=5, refs=refs)

    older = commit(0, [0, 1, 2])
    refs = {client_file(2): {"dir": older.name, "sha256": sha256_file(older / client_file(2))}}
    newest = commit(1, [0, 1], refs)
    listed = [newest / client_file(0), newest / client_file(1), newest / "server.pt", older / client_file(2)]
    for f in listed:
        good = f.read_bytes()
        f.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        with pytest.raises(CheckpointError, match="sha256 does not match"):
            CheckpointDir.verify(newest)
        f.write_bytes(good)
    assert CheckpointDir.verify(newest).round == 1


def test_a_resume_drops_the_metrics_rows_after_its_checkpoint_and_a_torn_last_line(tmp_path):
    """metrics.jsonl keeps the rows up to the checkpoint's round, no more, no fewer; a line
    torn by a kill amid its write is dropped, not a traceback."""
    from cafedist.run.metrics import MetricsLog

    log = MetricsLog(tmp_path, tensorboard=False)
    rows = "".join(json.dumps({"round": r, "loss": 1.0 / (r + 1)}) + "\n" for r in range(4))
    for torn in ("", '{"round": 4, "lo'):
        log.path.write_text(rows + torn)
        log.truncate_after(2)
        assert [r["round"] for r in log.read()] == [0, 1, 2]
    log.truncate_after(-1)  # resumed from no checkpoint: every row goes
    assert log.read() == []


def test_a_checkpoint_file_pruned_while_read_says_so(tmp_path):
    """eval may read a run that is training: a shard pruned between verifying and loading is
    not called corrupt."""
    from cafedist.errors import CheckpointError
    from cafedist.run.checkpoint import load_torch

    with pytest.raises(CheckpointError, match=r"client_00003.pt: removed while being read .* try again"):
        load_torch(tmp_path / "round_000090" / "client_00003.pt")


def test_a_full_disk_while_saving_a_checkpoint_names_the_file(tmp_path, monkeypatch):
    """torch's own writer reports a full disk as an opaque RuntimeError; save_torch keeps the
    OSError of the failed write, so ENOSPC arrives naming the shard."""
    import errno
    import os

    import torch

    from cafedist.run import checkpoint

    class FullDisk:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "open", FullDisk, raising=False)
    path = tmp_path / "client_00003.pt"
    with pytest.raises(OSError) as info:
        checkpoint.save_torch({"w": torch.zeros(3)}, path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- extending a run
def _train_then_extend(tiny_config, tmp_path, *overrides: str) -> tuple[str, Path]:
    """A finished 2-round tiny run under ``overrides``, then extended to 3 rounds with
    ``--resume force``: (the extension's stderr, the run directory)."""
    cfg, out = tiny_config(rounds=2), tmp_path / "run"
    cafedist_in_process("train", "--config", str(cfg), "--out", str(out), "--no-progress", *overrides, check=True)
    extended = cafedist_in_process("train", "--config", str(cfg), "--out", str(out), "--no-progress",
                                   "--resume", "force", "train.rounds=3", *overrides, check=True)
    return extended.stderr, out


def _newest_manifest(out: Path) -> dict:
    newest = (out / "checkpoints" / "latest").read_text().strip()
    return json.loads((out / "checkpoints" / newest / "MANIFEST.json").read_text())


@pytest.mark.parametrize("algorithm, said", [
    ("fedbabu", "fedbabu fine-tuned the heads after round 1, the last of 2: later rounds continue from the "
                "fine-tuned models"),
    ("cafedistill", "the progressive exit schedule (schedule_span 0.5) set the students of rounds 1-2 for 2 "
                    "rounds in all"),
])
def test_extending_a_run_whose_algorithm_used_the_total_says_so(tiny_config, tmp_path, algorithm, said):
    """fedbabu fine-tuned in what was the last round, CAFEDistill's exit schedule ran for the old
    total: the extension differs from a run trained for the new total from the start, and says
    so once, naming what depended on the old total; the checkpoints record the extension."""
    err, out = _train_then_extend(tiny_config, tmp_path, f"algorithm.name={algorithm}")
    lines = [line for line in err.splitlines() if "train.rounds changes" in line]
    assert len(lines) == 1, err[-3000:]
    assert "--resume force: train.rounds changes from 2 to 3 after 2 trained rounds" in lines[0]
    assert said in lines[0]
    assert "will differ from a run trained for 3 rounds from the start" in lines[0]
    assert _newest_manifest(out)["rounds_changes"] == [{"after_round": 1, "from": 2, "to": 3, "depended": [said]}]
    assert _newest_manifest(out)["rounds"] == 3
    # and so does the run's record, where a paper's numbers are read from
    assert summary(out)["rounds_changes"] == _newest_manifest(out)["rounds_changes"]
    # the warning is true: the 3-round run trained from the start has other models
    full = tmp_path / "full"
    cafedist_in_process("train", "--config", str(tiny_config(rounds=3)), "--out", str(full), "--no-progress",
                        f"algorithm.name={algorithm}", check=True)
    assert summary(out)["model_hashes"] != summary(full)["model_hashes"]


@pytest.mark.parametrize("overrides", [("algorithm.name=fedavg",),
                                       ("algorithm.cafedistill.student_selection=false",)])
def test_extending_a_run_that_used_no_total_does_not_warn(tiny_config, tmp_path, overrides):
    """FedAvg, and CAFEDistill without its exit schedule, trained nothing that depended on the
    total: an extension is a longer run (only recorded)."""
    err, out = _train_then_extend(tiny_config, tmp_path, *overrides)
    assert "train.rounds changes" not in err
    assert _newest_manifest(out)["rounds_changes"] == [{"after_round": 1, "from": 2, "to": 3, "depended": []}]
    assert summary(out)["rounds_changes"] == _newest_manifest(out)["rounds_changes"]
    # which is why nothing is said: the extension is the 3-round run, bit for bit
    full = tmp_path / "full"
    cafedist_in_process("train", "--config", str(tiny_config(rounds=3)), "--out", str(full), "--no-progress",
                        *overrides, check=True)
    assert summary(out)["model_hashes"] == summary(full)["model_hashes"]
    assert comparable(metrics(out)) == comparable(metrics(full))


def test_every_algorithm_that_reads_the_total_declares_it():
    """An algorithm whose code reads ``setup.rounds`` answers ``rounds_dependence`` (an extension
    would otherwise pass silently)."""
    import inspect

    from cafedist.algorithms import ALGORITHMS, Algorithm

    def reads_total(cls: type) -> bool:
        return any("setup.rounds" in inspect.getsource(k) for k in cls.__mro__
                   if k.__module__.startswith("cafedist.algorithms") and k is not Algorithm)

    silent = [cls.name for cls in ALGORITHMS.values()
              if reads_total(cls) and cls.rounds_dependence.__func__ is Algorithm.rounds_dependence.__func__]
    assert silent == []


def test_what_each_algorithm_says_depended_on_the_total():
    """Only what the trained rounds did counts: fedbabu stopped before its last round has not
    fine-tuned; ScaleFL's KD switch at the same rounds under both totals changed nothing."""
    from cafedist.algorithms import ALGORITHMS

    babu, depth, scale = (ALGORITHMS[name] for name in ("fedbabu", "depthfl", "scalefl"))
    assert babu.rounds_dependence(babu.Params(), 20, 10, 40) == []
    assert babu.rounds_dependence(babu.Params(finetune_epochs=0), 20, 20, 40) == []
    assert "round 19, the last of 20" in babu.rounds_dependence(babu.Params(), 20, 20, 40)[0]
    assert "rampup 0.3 x 20 rounds in rounds 0-9" in depth.rounds_dependence(depth.Params(), 20, 10, 40)[0]
    assert depth.rounds_dependence(depth.Params(kd=False), 20, 10, 40) == []
    assert scale.rounds_dependence(scale.Params(), 20, 5, 40) == []  # off in rounds 0-4 under either total
    assert scale.rounds_dependence(scale.Params(), 20, 8, 40) != []  # on from round 6 under 20, not under 40
