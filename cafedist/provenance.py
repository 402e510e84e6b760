"""What a run trained under: the software and the machines, as its checkpoints and summary record.

A run is a function of its config and seed *on one software and hardware stack*: another torch
(its kernels), another CPU model (its vector units order float sums differently: the quick start
differs between an AMD EPYC and an Intel Xeon) or another GPU model changes the last bits, and
those grow over rounds. So every session's stack is recorded, a resume onto another one is
said, and a paper's numbers can name what produced them.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cafedist import __version__

if TYPE_CHECKING:
    import torch

#: the parts of an environment whose change changes a run's results (bit for bit)
RESULT_FIELDS = ("torch", "cuda", "cudnn", "cpus", "devices")


def _git_state(repo: Path) -> dict[str, Any] | None:
    """The commit of a source checkout and whether tracked files differ from it (None: not a
    checkout, or git unavailable)."""
    if not (repo / ".git").exists():
        return None
    # the checkout's own repository: a GIT_DIR or GIT_WORK_TREE the user exported points elsewhere
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True, env=env).stdout.strip()
        # --no-optional-locks: a plain status refreshes the index (takes index.lock, rewrites
        # .git/index) when stat data is stale; a run must not write into the user's repository
        changed = subprocess.run(["git", "--no-optional-locks", "-C", str(repo), "status", "--porcelain",
                                  "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True, env=env).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(changed)}


def software() -> dict[str, Any]:
    """This process's software stack: cafedist (and its commit when run from a checkout),
    Python, torch, numpy, and the CUDA/cuDNN torch was built with (None on a CPU build)."""
    import numpy as np
    import torch  # here: reports (compare) describe stacks without importing torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out: dict[str, Any] = {"cafedist": __version__}
    git = _git_state(Path(__file__).resolve().parents[1])
    if git is not None:
        out["git"] = git
    out.update({"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                "cuda": torch.version.cuda, "cudnn": cudnn})
    return out


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what ``platform`` says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine(device: "torch.device") -> dict[str, str]:
    """This rank's host, CPU model and compute device (the GPU's name, or ``cpu``)."""
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"host": socket.gethostname(), "cpu": cpu_model(), "device": name}


def environment(software_stack: dict[str, Any], machines: list[dict[str, str]]) -> dict[str, Any]:
    """One session's environment: rank 0's software and every rank's machine, summarized as
    the distinct hosts, CPU models and device models, sorted (the number of ranks is the run's
    ``world_size``, which does not change results)."""
    return {**software_stack, **{key: sorted({m[field] for m in machines})
                                 for key, field in (("hosts", "host"), ("cpus", "cpu"), ("devices", "device"))}}


def result_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The result-changing fields in which ``now`` differs from ``before``, each as
    ``"field: before -> now"`` (a field an older record lacks is not compared)."""
    return [f"{field}: {_words(before[field])} -> {_words(now.get(field))}"
            for field in RESULT_FIELDS if field in before and before[field] != now.get(field)]


def _words(value: Any) -> str:
    """A recorded value as a report writes it: a list's items joined by commas."""
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def describe(env: dict[str, Any]) -> str:
    """One line for a report: ``cafedist 0.1.0 (git d0cee3c, changed), Python 3.11.7, torch
    2.13.0+cpu, numpy 2.4.6, CUDA none; CPU AMD EPYC; device cpu`` (hosts left out)."""
    git = env.get("git") if isinstance(env.get("git"), dict) else None
    code = f"cafedist {env.get('cafedist', '?')}"
    if git is not None:
        code += f" (git {str(git.get('commit', '?'))[:7]}{', changed' if git.get('dirty') else ''})"
    cuda = f"CUDA {env['cuda']}, cuDNN {env.get('cudnn')}" if env.get("cuda") else "CUDA none"
    return (f"{code}, Python {env.get('python', '?')}, torch {env.get('torch', '?')}, numpy {env.get('numpy', '?')}, "
            f"{cuda}; CPU {_words(env.get('cpus', '?'))}; device {_words(env.get('devices', '?'))}")


__all__ = ["RESULT_FIELDS", "cpu_model", "describe", "environment", "machine", "result_differences", "software"]
