"""The environment of a cafedist process that another one starts (compare's trainings, the
benchmarks' runs): the same code, and a process of its own rather than a rank of the launch
its parent runs under."""

from __future__ import annotations

import os
from pathlib import Path

from cafedist.parentwatch import PARENT_PID_VARIABLE

#: the folder holding this cafedist package: first on a child's PYTHONPATH, so that it runs
#: this code from any working directory
PACKAGE_ROOT = Path(__file__).resolve().parents[1]

#: the variables a process knows itself as one rank of a launch by
#: (:func:`cafedist.distributed.runtime.detect_launch`): torchrun's, a Slurm task's, MPI's
RANK_VARIABLES = frozenset({"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                            "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                            "SLURM_LOCALID", "MPI_LOCALRANKID"})
RANK_PREFIXES = ("TORCHELASTIC_", "OMPI_COMM_WORLD_", "PMI_", "PMIX_")


def child_env(**overrides: str) -> dict[str, str]:
    """``os.environ`` for a child ``python -m cafedist``, with ``overrides``: this checkout first
    on PYTHONPATH, and none of a launcher's rank variables. A child that kept them took itself
    for a rank of its parent's launch: `cafedist compare` in an sbatch script of several tasks
    (or under srun) started trainings that each waited for peers until the timeout. The child
    learns this process's pid, to stop with it (:func:`cafedist.parentwatch.guard_parent`)."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES and not k.startswith(RANK_PREFIXES)}
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(PACKAGE_ROOT)]
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), *parts])
    # the child stops (checkpointing) when this process dies: cafedist.parentwatch.guard_parent
    env[PARENT_PID_VARIABLE] = str(os.getpid())
    env.update(overrides)
    return env
