"""Shared helpers: tiny real-data configs and subprocess runners for the CLI and launchers."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

#: a run small enough for a test: the real scikit-learn digits, 4 clients, a tiny CNN
TINY = """\
seed: 3
data: {{dataset: digits, clients: {clients}, alpha: 0.5, proxy_fraction: 0.1, min_size: 20, cache_dir: {cache}}}
model: {{arch: cnn, options: {{width: 4}}}}
train: {{rounds: {rounds}, local_epochs: 1, batch_size: 32, proxy_batch_size: 16, lr: 0.05}}
algorithm: {{name: cafedistill, cafedistill: {{proxy_size: 64}}}}
checkpoint: {{every: {every}, keep: 3}}
dist: {{timeout_s: 60}}
"""


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """In-process training runs on one thread: tiny convolutions run many times faster on
    one thread than on two contended ones, and results match the subprocess runs
    (OMP_NUM_THREADS=1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def store_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stores")


@pytest.fixture
def tiny_config(tmp_path, store_cache):
    """Write a tiny config; returns a function(rounds=3, clients=4, every=1) -> path."""

    def make(rounds: int = 3, clients: int = 4, every: int = 1, name: str = "tiny.yaml") -> Path:
        path = tmp_path / name
        path.write_text(TINY.format(rounds=rounds, clients=clients, every=every, cache=store_cache))
        return path

    return make


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """The matplotlib figures this test's plot functions save, in order (still written to their
    files), for checking what is drawn, not only that a PNG exists."""
    from cafedist.eval import budget_plots, plots

    figures: list = []
    save = plots._save_png

    def keep(fig, path) -> None:
        figures.append(fig)
        save(fig, path)

    monkeypatch.setattr(plots, "_save_png", keep)
    monkeypatch.setattr(budget_plots, "_save_png", keep)  # imported by name there
    return figures


def env_for_tests(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    env.pop("CAFEDIST_FAULT", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
              "SLURM_JOB_ID", "SLURM_STEP_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
        env.pop(k, None)
    env.update(extra)
    return env


def fake_slurm(bin_dir: Path, sbatch: str, monkeypatch) -> None:
    """srun and sbatch stand-ins on PATH; ``sbatch`` is the body of the fake sbatch script."""
    bin_dir.mkdir()
    for tool, script in (("srun", "exit 0"), ("sbatch", sbatch)):
        (bin_dir / tool).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def cafedist(*args: str, env: dict | None = None, timeout: float = 300, launcher: list[str] | None = None,
             check: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m cafedist ARGS`` (optionally behind a launcher) and capture output."""
    cmd = (launcher or [sys.executable]) + ["-m", "cafedist", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or env_for_tests(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def cafedist_in_process(*args: str, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """``cafedist ARGS`` run by ``cafedist.cli.main`` in this process, as :func:`cafedist` runs it
    in a child (a new Python costs 2-5 s a call): the same environment (``env``, by default
    :func:`env_for_tests`) and ``sys.argv``; stdout, and stderr with the log lines the CLI prints
    there (rank 0: INFO and up).
    For tests whose subject is not the process itself (signals, exit of the interpreter, locks
    held by another process stay with :func:`cafedist`)."""
    from cafedist.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("[cafedist r0] %(levelname)s %(message)s"))
    logger = logging.getLogger("cafedist")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with mock.patch.dict(os.environ, env_for_tests() if env is None else env, clear=True), \
                mock.patch.object(sys, "argv", ["cafedist", *args]), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    proc = subprocess.CompletedProcess(["cafedist", *args], code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"cafedist {args} returned {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def torchrun(n: int) -> list[str]:
    exe = BIN / "torchrun"
    return [str(exe) if exe.exists() else "torchrun", "--standalone", f"--nproc_per_node={n}"]


def mpiexec_cmd(n: int) -> list[str] | None:
    exe = BIN / "mpiexec"
    found = str(exe) if exe.exists() else shutil.which("mpiexec")
    return [found, "-n", str(n), sys.executable] if found else None


def mpi_env() -> dict[str, str]:
    return env_for_tests(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                         OMPI_MCA_rmaps_base_oversubscribe="1",
                         PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


TIMING_KEYS = {"seconds", "t_local", "t_comm", "t_aggregate", "t_eval", "t_diag", "t_checkpoint", "session",
               "wire_bytes", "world_size", "clients_per_rank", "train_rounds"}


def comparable(records: list[dict]) -> list[dict]:
    """Metrics without what legitimately varies between equivalent runs (time, wire bytes, ranks,
    the session and the total it was started with: a run extended by --resume force)."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]
