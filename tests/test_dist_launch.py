"""Launch detection from fake environments, Slurm node lists, device/backend choice, wrappers."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cafedist_in_process

from cafedist.distributed import LaunchInfo, detect_launch, expand_nodelist, init_runtime
from cafedist.errors import DistError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- detect_launch


def test_plain_python_is_single() -> None:
    assert detect_launch({"HOME": "/x"}) == LaunchInfo("single", 0, 1, 0, None, None)


def test_torchrun_env() -> None:
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node01",
           "MASTER_PORT": "29500"}
    assert detect_launch(env) == LaunchInfo("torchrun", 5, 8, 1, "node01", 29500)


def test_env_launcher_without_local_rank_uses_rank() -> None:
    info = detect_launch({"RANK": "2", "WORLD_SIZE": "3"})
    assert (info.launcher, info.local_rank, info.master_addr, info.master_port) == ("torchrun", 2, None, None)


def test_srun_torchrun_is_torchrun() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0", "SLURM_NODELIST": "n[1-2]"}
    assert detect_launch(env) == LaunchInfo("torchrun", 3, 4, 3, "n1", 1234)


SLURM = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
         "SLURM_NODELIST": "node[01-03,07],gpu5", "SLURM_JOB_ID": "123456"}


def test_slurm_task() -> None:
    # port 20000 + 123456 % 20000
    assert detect_launch(SLURM) == LaunchInfo("slurm", 3, 4, 1, "node01", 23456)


def test_a_restarted_slurm_job_rendezvous_on_another_port() -> None:
    """A requeued job's tasks met on the port of its earlier start, which a process of that
    start may still hold while it exits: rank 0 could not listen and the others waited until the
    time limit. Every task of a restart computes the same new port."""
    first = detect_launch(SLURM).master_port
    again = [detect_launch(SLURM | {"SLURM_RESTART_COUNT": str(r)}).master_port for r in (1, 2)]
    assert first not in again and again[0] != again[1]
    assert all(20000 <= port < 40000 for port in again)
    assert detect_launch(SLURM | {"SLURM_PROCID": "0", "SLURM_RESTART_COUNT": "1"}).master_port == again[0]


def test_slurm_master_overrides_and_job_nodelist() -> None:
    env = {k: v for k, v in SLURM.items() if k != "SLURM_NODELIST"}
    env |= {"SLURM_JOB_NODELIST": "gpu[7-8]", "MASTER_PORT": "31000"}
    info = detect_launch(env)
    assert (info.master_addr, info.master_port) == ("gpu7", 31000)
    assert detect_launch(SLURM | {"MASTER_ADDR": "login"}).master_addr == "login"


def test_slurm_single_task_batch_script_is_single() -> None:
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7", "SLURM_NODELIST": "n1"}
    assert detect_launch(env).launcher == "single"
    # ... but a one-task srun step is a Slurm launch (of world size 1)
    step = detect_launch(env | {"SLURM_STEP_ID": "0", "SLURM_LOCALID": "0"})
    assert (step.launcher, step.world_size) == ("slurm", 1)


def test_open_mpi_env() -> None:
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "PMIX_RANK": "1"}
    assert detect_launch(env) == LaunchInfo("mpi", 1, 2, 1, None, None)


def test_mpich_hydra_env() -> None:
    env = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}
    assert detect_launch(env) == LaunchInfo("mpi", 2, 4, 0, None, None)


def test_pmix_env() -> None:
    assert detect_launch({"PMIX_RANK": "1", "PMI_SIZE": "3"}) == LaunchInfo("mpi", 1, 3, 1, None, None)
    with pytest.raises(DistError, match="PMIX_RANK is set but none of"):
        detect_launch({"PMIX_RANK": "1"})


@pytest.mark.parametrize("env, var", [
    ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 must be < WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be >= 1"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK='-1' must be >= 0"),
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x"}, "LOCAL_RANK='x'"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "99999"}, "MASTER_PORT=99999"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "two"}, "SLURM_NTASKS='two'"),
    ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4", "SLURM_NODELIST": "n1"}, "SLURM_PROCID=4 must be < SLURM_NTASKS=4"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_NODELIST"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "n[1-"}, "SLURM_NODELIST='n[1-'"),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_RANK=2 must be <"),
    ({"PMI_RANK": "0", "PMI_SIZE": "1.5"}, "PMI_SIZE='1.5'"),
])
def test_inconsistent_env_names_the_variable(env: dict, var: str) -> None:
    with pytest.raises(DistError) as err:
        detect_launch(env)
    assert var in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- Slurm node lists


@pytest.mark.parametrize("text, hosts", [
    ("gpu5", ["gpu5"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("a1,b[2-3]-ib", ["a1", "b2-ib", "b3-ib"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("c[5]", ["c5"]),
])
def test_expand_nodelist(text: str, hosts: list[str]) -> None:
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text", ["node[01-", "node]1[", "node[3-1]", "node[a-b]", "a,,b", "n[[1]]"])
def test_expand_nodelist_rejects_garbage(text: str) -> None:
    with pytest.raises(DistError, match="SLURM_JOB_NODELIST"):
        expand_nodelist(text, "SLURM_JOB_NODELIST")


# ---------------------------------------------------------------- device and backend


def test_init_runtime_single_defaults(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cafedist"):
        rt = init_runtime(env={})
    assert rt.world_size == 1 and rt.backend is None and rt.is_main
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert rt.device.type == expected
    lines = [r.getMessage() for r in caplog.records if r.name == "cafedist"]
    assert len(lines) == 1 and "launcher=single" in lines[0] and f"device={expected}" in lines[0]


@pytest.mark.parametrize("kwargs, msg", [
    ({"backend": "nccl", "device": "cpu"}, "backend 'nccl' needs a CUDA device"),
    ({"backend": "tcp"}, "backend 'tcp' is not valid"),
    ({"device": "tpu"}, "device 'tpu' is not"),
    ({"device": "cuda:banana"}, "device 'cuda:banana' is not valid"),
    ({"timeout_s": 0}, "timeout_s=0 must be > 0"),
])
def test_init_runtime_rejects_bad_overrides(kwargs: dict, msg: str) -> None:
    with pytest.raises(DistError, match=msg):
        init_runtime(env={}, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_cuda_requested_without_cuda() -> None:
    with pytest.raises(DistError, match="CUDA is not available"):
        init_runtime(device="cuda:0", env={})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_a_run_config_names_its_dist_fields(tmp_path) -> None:
    """train's runtime errors name the config's field, as every other config error does."""
    for setting, needle in (("dist.device=cuda", "dist.device 'cuda' requested but CUDA is not available"),
                            ("dist.backend=nccl", "dist.backend 'nccl' needs a CUDA device")):
        proc = cafedist_in_process("train", "--config", str(REPO / "configs" / "quickstart.yaml"), "--out",
                                   str(tmp_path / "run"), "train.rounds=1", setting)
        assert proc.returncode != 0 and needle in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.distributed.is_mpi_available(), reason="torch built with MPI")
def test_mpi_backend_unavailable_is_explained() -> None:
    with pytest.raises(DistError, match="backend 'mpi' is not available"):
        init_runtime(backend="mpi", device="cpu", env={})


def test_bad_env_surfaces_from_init_runtime() -> None:
    with pytest.raises(DistError, match="RANK='x'"):
        init_runtime(env={"RANK": "x", "WORLD_SIZE": "2"})


# ---------------------------------------------------------------- launch wrappers


def dry_run(script: str, args: list[str], **knobs: str) -> tuple[int, list[str], str]:
    """Run a launch wrapper with DRY_RUN=1; returns (status, printed command words, stderr)."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"NPROC", "NNODES", "NODE_RANK", "RDZV_ENDPOINT", "RDZV_ID", "NP",
                        "MPIEXEC", "TORCHRUN", "OVERSUBSCRIBE", "MPIEXEC_ARGS", "SLURM_JOB_ID"}}
    env |= {"DRY_RUN": "1", **knobs}
    proc = subprocess.run(["bash", str(REPO / "launch" / script), *args], env=env,
                          capture_output=True, text=True, timeout=30)
    return proc.returncode, shlex.split(proc.stdout), proc.stderr


def test_torchrun_wrapper_single_node() -> None:
    rc, cmd, _ = dry_run("torchrun.sh", ["train", "--x", "a b"], TORCHRUN="torchrun")
    assert rc == 0
    assert cmd == ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "cafedist", "train", "--x", "a b"]
    _, cmd, _ = dry_run("torchrun.sh", ["eval"], TORCHRUN="torchrun", NPROC="4")
    assert "--nproc_per_node=4" in cmd


def test_torchrun_wrapper_multi_node() -> None:
    rc, cmd, _ = dry_run("torchrun.sh", ["train"], TORCHRUN="torchrun", NNODES="2",
                         RDZV_ENDPOINT="node01:29400", RDZV_ID="job9")
    assert rc == 0 and "--standalone" not in cmd
    assert {"--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=node01:29400", "--rdzv_id=job9"} <= set(cmd)
    _, cmd, _ = dry_run("torchrun.sh", ["train"], TORCHRUN="torchrun", NNODES="2", NODE_RANK="1",
                        RDZV_ENDPOINT="node01:29400")
    assert {"--node_rank=1", "--master_addr=node01", "--master_port=29400"} <= set(cmd)
    rc, _, err = dry_run("torchrun.sh", ["train"], TORCHRUN="torchrun", NNODES="2")
    assert rc == 2 and "RDZV_ENDPOINT" in err


AS_ROOT = ["OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"] if os.geteuid() == 0 else []


def test_mpiexec_wrapper() -> None:
    rc, cmd, _ = dry_run("mpiexec.sh", ["train", "--y"], MPIEXEC="mpiexec", PYTHON="python3", NP="3",
                         MPIEXEC_ARGS="--hostfile h")
    assert rc == 0
    launch = ["mpiexec", "-n", "3", "--hostfile", "h", "python3", "-m", "cafedist", "train", "--y"]
    assert cmd == (["env", *AS_ROOT] if AS_ROOT else []) + launch


def test_mpiexec_wrapper_dry_run_prints_the_variables_it_sets() -> None:
    """DRY_RUN printed the command alone: copied, it ran without OVERSUBSCRIBE's variables (and,
    as root, without Open MPI's consent to run as root), so it failed where the script worked."""
    rc, cmd, _ = dry_run("mpiexec.sh", ["train"], MPIEXEC="mpiexec", PYTHON="python3", OVERSUBSCRIBE="1")
    assert rc == 0
    assert cmd == ["env", *AS_ROOT, "PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe",
                   "OMPI_MCA_rmaps_base_oversubscribe=1", "mpiexec", "-n", "2", "python3", "-m", "cafedist", "train"]


def test_mpiexec_wrapper_prefers_mpiexec_next_to_python(tmp_path: Path) -> None:
    (tmp_path / "python3").write_text("#!/bin/sh\n")
    (tmp_path / "mpiexec").write_text("#!/bin/sh\n")
    for f in ("python3", "mpiexec"):
        (tmp_path / f).chmod(0o755)
    _, cmd, _ = dry_run("mpiexec.sh", [], PYTHON=str(tmp_path / "python3"))
    launch = cmd[cmd.index("env") + 1 + len(AS_ROOT):] if "env" in cmd else cmd
    assert launch[:3] == [str(tmp_path / "mpiexec"), "-n", "2"]


def _cuda_check(out: Path, device: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "DEVICE": device, "BENCH": "0", "ROUNDS": "1", "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(REPO / "launch" / "cuda_check.sh")], cwd=out.parent, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cuda_check_script_dry_run_on_cpu(tmp_path: Path) -> None:
    """launch/cuda_check.sh, the prepared GPU check, runs end to end with DEVICE=cpu: every step
    succeeds and the summary compares the runs it trained (so it cannot rot unseen before a GPU
    session needs it); a failing step makes the exit status 1."""
    out = tmp_path / "check"
    proc = _cuda_check(out, "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    for name in ("train-bf16-packed", "eval-budget", "train-fp32-packed", "train-fp32-seq", "torchrun-1rank",
                 "torchrun-2rank-gloo", "train-fp32-bounded", "train-fp32-packed-bounded"):
        assert f"{name}: rc=0" in summary, summary
    assert "repeated sequential runs bit-identical (model hashes): yes" in summary
    assert "torchrun run equals the plain run (model hashes): yes" in summary
    assert "2 ranks equal 1 rank (model hashes): yes" in summary
    assert "resident_clients=2 equals all resident (model hashes): yes" in summary
    assert "share_within_budget" in summary and "every step succeeded" in summary
    failing = _cuda_check(tmp_path / "bad", "bogus")  # every training step refuses the device
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert "train-fp32-seq: rc=2" in failing.stdout and "n/a (a run did not finish)" in failing.stdout


def test_round_timers_wait_for_the_gpu(monkeypatch) -> None:
    """Queued CUDA/NCCL work is finished before a timer reads the clock (else t_comm is ~0 on GPUs)."""
    from cafedist.train import timing

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    timing.now(torch.device("cpu"))
    assert synced == []
    timing.now(torch.device("cuda", 1))
    assert synced == [torch.device("cuda", 1)]


def test_a_gpu_rank_asks_for_deterministic_kernels(monkeypatch) -> None:
    """Bit-identical reruns on a GPU need cuDNN's deterministic kernels and cuBLAS's fixed workspace."""
    from cafedist.distributed import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: None)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "restored-afterwards")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms",
                        lambda mode, warn_only=False: calls.append((mode, warn_only)))
    rt = runtime.init_runtime(env={})
    assert rt.device == torch.device("cuda", 0)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and calls == [(True, True)]


def test_a_peers_failure_is_one_short_reason():
    from cafedist.distributed.runtime import short_reason

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                        "[127.0.0.1]:1234. This may indicate that the remote worker crashed. Check the logs of "
                        "the remote worker for the root cause. GLHF!\nmore")
    assert short_reason(gloo) == "Connection closed by peer [127.0.0.1]:1234"
    assert short_reason(RuntimeError("Application timeout caused pair closure")) == \
        "Application timeout caused pair closure"
