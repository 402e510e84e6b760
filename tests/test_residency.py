"""Client residency (train.resident_clients, train.client_state) never changes a result, and
incremental checkpoints keep, reference and verify every shard a resume needs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from algo_harness import record_loss_scales
from conftest import cafedist, comparable, env_for_tests, metrics, summary, torchrun
from conftest import cafedist_in_process as in_process

from cafedist.cli import main as cli_main
from cafedist.config import config_from_dict
from cafedist.run.checkpoint import SHARDS_ONLY, CheckpointDir, sha256_file
from cafedist.train.loop import train
from cafedist.train.schedule import participating


def tiny(cache: Path, algorithm: str = "cafedistill", clients: int = 6, rounds: int = 4, per_round: float = 3,
         **train_opts) -> dict:
    return {
        "seed": 0,
        "data": {"dataset": "digits", "clients": clients, "alpha": 0.5, "proxy_fraction": 0.1, "min_size": 20,
                 "cache_dir": str(cache)},
        "model": {"arch": "cnn", "options": {"width": 4}},
        "train": {"rounds": rounds, "local_epochs": 1, "batch_size": 32, "proxy_batch_size": 16,
                  "clients_per_round": per_round, **train_opts},
        "algorithm": {"name": algorithm},
        "checkpoint": {"every": 1, "keep": 1},
    }


def run(raw: dict, out: Path) -> dict:
    train(config_from_dict(raw), out, progress=False)
    return summary(out)


def assert_same(a: Path, b: Path) -> None:
    assert summary(a)["model_hashes"] == summary(b)["model_hashes"]
    assert summary(a)["acc_per_exit"] == summary(b)["acc_per_exit"]
    assert comparable(metrics(a)) == comparable(metrics(b))


# fedavg: shared parameters (lazily averaged into parked clients); depthfl: element-wise
# holders; fedbabu: post-training phases of every client in the last round; fedrod: post
# phases of active clients and two models; cafedistill: the cohort-only exchange
@pytest.mark.parametrize("algorithm,where", [("cafedistill", "disk"), ("fedavg", "host"), ("depthfl", "host"),
                                             ("fedbabu", "disk"), ("fedrod", "host"), ("ditto", "disk")])
def test_a_residency_bound_gives_the_same_bits(tmp_path, store_cache, algorithm, where, monkeypatch):
    ref = tmp_path / "all"
    run(tiny(store_cache, algorithm), ref)
    bounded = tmp_path / "bounded"
    seen = spy_on_residency(monkeypatch)
    run(tiny(store_cache, algorithm, resident_clients=2, client_state=where), bounded)
    assert_same(bounded, ref)
    # the bound was in force (equal bits alone would also hold if it were ignored): clients were
    # evicted and parked where configured, never more than 2 resident
    assert seen["evicted"] > 0 and seen["most_resident"] == 2
    assert seen["parked"] == {where}
    assert not (bounded / "client_state").exists() or not any((bounded / "client_state").rglob("*.pt"))


def spy_on_residency(monkeypatch) -> dict:
    """Counts of what bounded client pools did in this test: evictions, the most clients
    resident at once, and where clients were parked."""
    from cafedist.run.residency import ClientPool

    seen = {"evicted": 0, "most_resident": 0, "parked": set()}
    evict, park, get = ClientPool._evict, ClientPool._park, ClientPool.get

    def counting_evict(self) -> None:
        seen["evicted"] += 1
        evict(self)

    def recording_park(self, cid, shard) -> None:
        seen["parked"].add(self.where)
        park(self, cid, shard)

    def measuring_get(self, cid):
        client = get(self, cid)
        if self.bound is not None:
            seen["most_resident"] = max(seen["most_resident"], len(self._resident))
        return client

    monkeypatch.setattr(ClientPool, "_evict", counting_evict)
    monkeypatch.setattr(ClientPool, "_park", recording_park)
    monkeypatch.setattr(ClientPool, "get", measuring_get)
    return seen


def interrupted(raw: dict, tmp_path: Path, fault: str) -> tuple[Path, Path, Path, subprocess.CompletedProcess]:
    """An uninterrupted reference run of ``raw``, and the same run in a subprocess stopped by
    ``fault`` (``CAFEDIST_FAULT``): (reference, interrupted run, its config file, the process)."""
    ref = tmp_path / "ref"
    run(raw, ref)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(raw))
    out = tmp_path / "run"
    proc = cafedist("train", "--config", str(cfg), "--out", str(out), "--no-progress",
                    env=env_for_tests(CAFEDIST_FAULT=fault))
    return ref, out, cfg, proc


def killed_inside_a_checkpoint(raw: dict, tmp_path: Path, rnd: int) -> tuple[Path, Path, Path]:
    """:func:`interrupted` by SIGKILL while the shards of round ``rnd``'s checkpoint are written."""
    ref, out, cfg, proc = interrupted(raw, tmp_path, f"kill@checkpoint:{rnd}")
    assert proc.returncode == -9
    assert (out / "checkpoints" / f".round_{rnd:06d}.tmp").exists()
    return ref, out, cfg


@pytest.fixture(scope="module")
def killed_bounded_disk_run(tmp_path_factory, store_cache) -> tuple[dict, Path, Path]:
    """A bounded fedavg run parked on disk, SIGKILLed inside round 2's checkpoint write, and its
    uninterrupted reference: (config, reference, killed run). Tests resume copies of the killed
    run (one reference run and one killed process for the module instead of one per test)."""
    raw = tiny(store_cache, "fedavg", clients=8, rounds=5, per_round=3, resident_clients=2, client_state="disk")
    ref, out, _ = killed_inside_a_checkpoint(raw, tmp_path_factory.mktemp("killed_bounded"), 2)
    return raw, ref, out


def _copy_of_killed_run(killed_bounded_disk_run, tmp_path: Path) -> tuple[dict, Path, Path, Path]:
    """(config, reference, this test's copy of the killed run, a config file for it)."""
    raw, ref, killed = killed_bounded_disk_run
    out = tmp_path / "run"
    shutil.copytree(killed, out, symlinks=True)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(raw))
    return raw, ref, out, cfg


def test_parked_on_disk_and_resumed_after_a_kill_is_identical(killed_bounded_disk_run, tmp_path):
    """A bounded disk run killed inside a checkpoint write resumes to the same bits."""
    _, ref, out, cfg = _copy_of_killed_run(killed_bounded_disk_run, tmp_path)
    in_process("train", "--config", str(cfg), "--out", str(out), "--no-progress", check=True)
    assert_same(out, ref)


def test_a_resume_leaves_no_scratch_of_the_killed_session_and_counts_its_rounds_time(killed_bounded_disk_run,
                                                                                     tmp_path):
    """Resumed with checkpoints every 0 rounds and clients in host memory, the killed session's
    staging folder of round 2 and its parked clients on disk were never removed, and
    summary.json's wall_seconds counted only the last session."""
    raw, ref, out, cfg = _copy_of_killed_run(killed_bounded_disk_run, tmp_path)
    assert (out / "checkpoints" / ".round_000002.tmp").exists()
    assert any((out / "client_state").rglob("*.pt"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows[0]["seconds"] = 1000.0  # as if the killed session's first round had taken that long
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    resumed = dict(raw, train=dict(raw["train"], client_state="host"), checkpoint={"every": 0, "keep": 1})
    cfg.write_text(json.dumps(resumed))
    in_process("train", "--config", str(cfg), "--out", str(out), "--no-progress", check=True)
    assert_same(out, ref)
    assert not list((out / "checkpoints").glob(".round_*")) and not (out / "client_state").exists()
    assert summary(out)["wall_seconds"] > 1000.0


def test_checkpoints_write_only_changed_clients_and_keep_referenced_shards(tmp_path, store_cache):
    out = tmp_path / "run"
    run(tiny(store_cache, "cafedistill", clients=8, rounds=4, per_round=2), out)
    ckpt = CheckpointDir(out)
    newest = ckpt.newest_valid()
    assert newest is not None and newest.round == 3
    manifest = newest.manifest
    written = [n for n in manifest["files"] if n.startswith("client_")]
    assert len(written) == 2  # the two clients of round 3
    assert manifest["refs"], "unchanged clients are referenced, not rewritten"
    for name, ref in manifest["refs"].items():  # keep=1 pruned the older checkpoints to their shards
        older = ckpt.root / ref["dir"]
        assert (older / SHARDS_ONLY).exists() and (older / name).is_file()
        assert not (older / "MANIFEST.json").exists()
    # and nothing else: a shard no kept checkpoint references, or an old server.pt, is deleted
    referenced = {}
    for name, ref in manifest["refs"].items():
        referenced.setdefault(ref["dir"], {SHARDS_ONLY}).add(name)
    for older, names in referenced.items():
        assert {f.name for f in (ckpt.root / older).iterdir()} == names
    assert [p.name for p in ckpt.candidates()] == ["round_000003"]
    trained = {cid for rnd in range(4) for cid in range(8) if participating(0, rnd, 8, 2)[cid]}
    assert set(written) | set(manifest["refs"]) == {f"client_{cid:05d}.pt" for cid in trained}
    # a referenced shard that is corrupted makes the checkpoint fail to verify
    name, ref = next(iter(manifest["refs"].items()))
    (ckpt.root / ref["dir"] / name).write_bytes(b"broken")
    with pytest.raises(Exception, match="sha256|missing"):
        CheckpointDir.verify(newest.path)


def test_a_resume_on_another_world_size_with_a_bound(tmp_path, store_cache):
    """2 ranks with one resident client each == 1 rank with all resident (gloo)."""
    raw = tiny(store_cache, "cafedistill", clients=6, rounds=3, per_round=4)
    ref = tmp_path / "ref"
    run(raw, ref)
    bounded = dict(raw, train=dict(raw["train"], resident_clients=1, client_state="disk"))
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(bounded))
    out = tmp_path / "two"
    cafedist("train", "--config", str(cfg), "--out", str(out), "--no-progress", launcher=torchrun(2), check=True)
    assert_same(out, ref)


def test_eval_of_a_bounded_run_matches(tmp_path, store_cache, monkeypatch):
    out = tmp_path / "run"
    seen = spy_on_residency(monkeypatch)
    run(tiny(store_cache, "fedavg", resident_clients=2), out)
    assert seen["evicted"] > 0 and seen["most_resident"] == 2  # trained bounded
    seen["evicted"] = seen["most_resident"] = 0
    assert cli_main(["eval", str(out)]) == 0
    assert seen["evicted"] > 0 and seen["most_resident"] == 2  # and evaluated bounded
    assert json.loads((out / "eval.json").read_text())["model_hashes"] == summary(out)["model_hashes"]


@pytest.mark.parametrize("bound", [2, 6])  # 6: no client is ever parked (the bound holds them all)
def test_eval_of_a_run_parked_on_disk_leaves_no_temporary_folder(tmp_path, store_cache, monkeypatch, bound):
    """eval has no run directory of its own to park clients in: its temporary folder goes with it."""
    import tempfile

    out = tmp_path / "run"
    run(tiny(store_cache, "fedavg", rounds=2, resident_clients=2, client_state="disk"), out)
    (out / "config.yaml").write_text((out / "config.yaml").read_text().replace("resident_clients: 2",
                                                                                  f"resident_clients: {bound}"))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert cli_main(["eval", str(out)]) == 0
    assert list(scratch.iterdir()) == []
    assert not (out / "client_state").exists()


def test_resident_clients_must_be_positive(tmp_path, store_cache):
    from cafedist.errors import ConfigError

    with pytest.raises(ConfigError, match="train.resident_clients"):
        config_from_dict(tiny(store_cache, resident_clients=0))


def test_a_checkpoint_from_before_incremental_checkpoints_still_resumes(tmp_path, store_cache):
    """A full checkpoint without refs or a shared average (the earlier format) resumes to the
    same bits, bounded or not: every client held every average then."""
    raw = tiny(store_cache, "fedavg", rounds=3, per_round=6)
    raw["checkpoint"]["keep"] = 5
    ref = tmp_path / "ref"
    run(raw, ref)
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    shutil.rmtree(out / "checkpoints" / "round_000002")
    (out / "summary.json").unlink()
    old = out / "checkpoints" / "round_000001"
    server = torch.load(old / "server.pt", weights_only=True)
    server.pop("shared")
    torch.save(server, old / "server.pt")
    m = json.loads((old / "MANIFEST.json").read_text())
    m.pop("refs")
    m["files"]["server.pt"] = sha256_file(old / "server.pt")
    (old / "MANIFEST.json").write_text(json.dumps(m))
    (out / "checkpoints" / "latest").write_text("round_000001\n")
    run(dict(raw, train=dict(raw["train"], resident_clients=2)), out)
    assert summary(out)["model_hashes"] == summary(ref)["model_hashes"]


def test_kill_during_an_incremental_checkpoint_of_1000_clients(tmp_path, store_cache):
    """1,000 clients (the labelled synthetic dataset: one client per generated user), 10 per
    round, at most 16 resident on disk: SIGKILL while a checkpoint's shards are written, then
    resume -> the same final models as an uninterrupted run."""
    raw = {
        "seed": 0,
        "data": {"dataset": "synthetic", "partition": "natural", "clients": 1000, "proxy_users": 20, "min_size": 4,
                 "cache_dir": str(store_cache), "options": {"users": 1020, "samples_per_user": 8}},
        "model": {"arch": "cnn", "options": {"width": 4}},
        "train": {"rounds": 3, "local_epochs": 1, "batch_size": 16, "proxy_batch_size": 16, "clients_per_round": 10,
                  "eval_every": 3, "resident_clients": 16, "client_state": "disk"},
        "algorithm": {"name": "cafedistill", "cafedistill": {"proxy_size": 100}},
        "checkpoint": {"every": 1, "keep": 1},
    }
    ref, out, cfg = killed_inside_a_checkpoint(raw, tmp_path, 1)
    staged = out / "checkpoints" / ".round_000001.tmp"
    assert len(list(staged.glob("client_*.pt"))) == 10  # only the round's cohort is written
    resumed = in_process("train", "--config", str(cfg), "--out", str(out), "--no-progress", check=True)
    assert "resumed" in resumed.stderr and "round 0" in resumed.stderr
    assert summary(out)["model_hashes"] == summary(ref)["model_hashes"]
    manifest = CheckpointDir.verify(out / "checkpoints" / "round_000002").manifest
    assert len([n for n in manifest["files"] if n.startswith("client_")]) == 10
    assert len(manifest["refs"]) == 20  # rounds 0 and 1's clients, by reference


def test_incremental_checkpoints_resume_on_another_world_size(tmp_path, store_cache):
    """Checkpoints with references (partial participation) written by 1 rank, stopped like a
    preempted job, resume on 2 ranks with a bound to the same models as an uninterrupted run."""
    raw = tiny(store_cache, "cafedistill", clients=6, rounds=4, per_round=2)
    ref, out, _, stopped = interrupted(raw, tmp_path, "term@local:2")
    assert stopped.returncode == 75  # checkpoint of round 2 written, exit for requeue
    assert CheckpointDir(out).newest_valid().manifest["refs"]
    bounded = tmp_path / "bounded.json"  # where clients live is not part of the config's identity
    bounded.write_text(json.dumps(dict(raw, train=dict(raw["train"], resident_clients=1, client_state="disk"))))
    proc = cafedist("train", "--config", str(bounded), "--out", str(out), "--no-progress", launcher=torchrun(2),
                    check=True)
    assert "written by 1 ranks, now 2" in proc.stderr
    assert summary(out)["model_hashes"] == summary(ref)["model_hashes"]


def test_a_bounded_run_checkpoints_the_clients_it_trained_since_they_were_last_parked(tmp_path, store_cache):
    """Without evaluation between training and the checkpoint, a client trained again while
    resident still holds an older parked copy: its checkpoint shard is its current state, not
    that copy (a stale shard made the resume train from an earlier round's weights)."""
    raw = tiny(store_cache, "cafedistill", clients=6, rounds=5, per_round=3, resident_clients=2, eval_every=5)
    ref, out, cfg, stopped = interrupted(raw, tmp_path, "term@local:3")
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    in_process("train", "--config", str(cfg), "--out", str(out), "--no-progress", check=True)
    assert_same(out, ref)


def test_a_residency_bound_keeps_the_fp16_loss_scale(tmp_path, store_cache, monkeypatch):
    """fp16's loss scale is parked with the client: dropped, a parked client would start again
    at 65536 and skip other steps than a resident one."""
    raw = tiny(store_cache, "fedavg", amp="fp16", rounds=6, per_round=6)
    ref = tmp_path / "all"
    run(raw, ref)
    bounded = tmp_path / "bounded"
    first_scales = record_loss_scales(monkeypatch)
    run({**raw, "train": {**raw["train"], "resident_clients": 2, "client_state": "disk"}}, bounded)
    assert min(first_scales) < 65536  # the scale moved: else equal bits prove nothing
    assert_same(bounded, ref)


def test_state_of_another_algorithm_is_refused_where_no_manifest_names_it(tmp_path):
    """Checkpoints written before manifests named their algorithm: a client shard without the
    algorithm's state, or a shared average of another length, is a ValueError (which the
    resume reports as a checkpoint that does not fit) rather than a failure in a round."""
    from algo_harness import make_trainer

    from cafedist.run.residency import client_shard, load_shard

    fedpac = make_trainer(tmp_path / "pac", "fedpac")
    client = fedpac.clients[0]
    shard = client_shard(client)
    del shard["algo"]["pac.size"]
    with pytest.raises(ValueError, match="pac.size"):
        load_shard(client, shard, torch.device("cpu"))
    fedper = make_trainer(tmp_path / "per", "fedper")
    other = {"latest": torch.zeros(fedper.shared.length + 1, dtype=torch.float64),
             "stamp": torch.zeros(fedper.shared.length + 1, dtype=torch.int64), "last_round": 0}
    with pytest.raises(ValueError, match="parameter elements"):
        fedper.shared.load_state(other, torch.device("cpu"))


def test_a_refused_bounded_resume_frees_its_scratch_client(tmp_path):
    """With a bound, resume loads every shard into one scratch client to check it fits; a shard
    that does not fit must not leave that client (its models, optimizers and data on the
    device) held by the pool until the pool itself is dropped."""
    from algo_harness import make_trainer, save

    from cafedist.config import config_hash
    from cafedist.errors import CheckpointError
    from cafedist.run.checkpoint import CheckpointDir, load_checkpoint

    tr = make_trainer(tmp_path, "fedavg", resident_clients=2)
    tr.run_round(0)
    save(tr, 0)
    wider = make_trainer(tmp_path, "fedavg", resident_clients=2, options={"width": 8})
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(CheckpointDir(wider.run_dir), wider.comm, wider.pool, wider.algo, wider.shared,
                        config_hash=config_hash(wider.cfg), resume="force")
    assert wider.pool._fit_client is None


def test_a_run_that_fails_to_build_leaves_no_temporary_folder(tmp_path, store_cache, monkeypatch):
    """Whatever fails while a run is built (here the shared parameters) fails before the pool
    makes its temporary folder or starts its prefetch thread."""
    import tempfile

    from cafedist.run import build

    out = tmp_path / "run"
    run(tiny(store_cache, "fedavg", rounds=2, resident_clients=2, client_state="disk"), out)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def failing(*args, **kwargs):
        raise RuntimeError("shared_mask failed")

    monkeypatch.setattr(build.SharedParams, "of", failing)
    with pytest.raises(RuntimeError, match="shared_mask failed"):
        cli_main(["eval", str(out)])
    assert list(scratch.iterdir()) == []
