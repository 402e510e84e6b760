"""``bench scaling``: weak scaling with gloo on this machine (1 and 2 ranks by default).

Each world size N trains a tiny run (8x8 ``digits``, ``clients_per_rank * N`` clients, a few
rounds) under ``torchrun --standalone --nproc_per_node=N`` with ``OMP_NUM_THREADS=1``;
the rounds' timers are read back with :mod:`cafedist.scaling`. Weak scaling: clients per
rank fixed; since the dataset is fixed, clients shrink as they multiply, so the efficiency is
normalised by the training samples of the busiest rank, ``(t_1 / s_1) / (t_N / s_N)``
(1.0 = perfect, as long as there are cores to spare).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cafedist import yamlio
from cafedist.childenv import child_env
from cafedist.errors import DistError
from cafedist.scaling import load_run, scaling_table


def tiny_config(clients: int, rounds: int, cache_dir: str) -> dict[str, Any]:
    """A run that takes seconds: digits, a width-8 cnn, one local epoch, 100 proxy items."""
    return {
        "seed": 0,
        "data": {"dataset": "digits", "clients": clients, "alpha": 0.5, "cache_dir": cache_dir},
        "model": {"arch": "cnn", "options": {"width": 8}},
        "train": {"rounds": rounds, "local_epochs": 1, "batch_size": 32, "proxy_batch_size": 32},
        "algorithm": {"name": "cafedistill", "cafedistill": {"proxy_size": 100}},
        "dist": {"backend": "gloo", "device": "cpu"},
        "checkpoint": {"every": 0, "keep": 1},
    }


def run_torchrun(world: int, config: Path, out: Path, timeout: float = 600) -> None:
    """``torchrun --standalone --nproc_per_node=world -m cafedist train`` (one thread per rank)."""
    env = child_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "cafedist", "train", "--config", str(config), "--out", str(out), "--resume", "none",
           "--no-progress"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        # run() has killed torchrun, and its ranks die with it (cafedist.parentwatch)
        raise DistError(f"bench scaling: torchrun with {world} rank(s) took over {timeout:g} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DistError(f"bench scaling: torchrun with {world} rank(s) failed (exit {proc.returncode}): {tail}")


def bench_scaling(quick: bool = False, worlds: tuple[int, ...] = (1, 2), clients_per_rank: int = 2,
                  rounds: int | None = None, workdir: str | Path | None = None) -> list[dict[str, Any]]:
    """Round time per world size and (sample-normalised) weak-scaling efficiency."""
    rounds = rounds or (4 if quick else 8)
    with tempfile.TemporaryDirectory(prefix="cafedist-scaling-") as tmp:
        base = Path(workdir) if workdir else Path(tmp)
        runs = []
        for world in worlds:
            cfg = base / f"w{world}.yaml"
            cfg.parent.mkdir(parents=True, exist_ok=True)
            cfg.write_text(yamlio.dump(tiny_config(clients_per_rank * world, rounds, str(base / "stores"))))
            run_torchrun(world, cfg, base / f"w{world}")
            runs.append(load_run(base / f"w{world}"))
        table = scaling_table(runs)
    return [{"benchmark": "scaling", "ranks": r["ranks"], "clients_per_rank": r["clients_per_rank"],
             "rounds": r["rounds"], "samples_per_rank": r["samples_per_rank"], "round_s": r["round_s"],
             "local_s": r["local"], "comm_s": r["comm"],
             "aggregate_s": r["aggregate"], "eval_s": r["eval"], "mode": r["mode"], "efficiency": r["efficiency"]}
            for r in table]
