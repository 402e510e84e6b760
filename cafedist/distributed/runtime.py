"""Who am I in the job? Launch detection, device/backend choice, process-group setup.

:func:`detect_launch` is a pure function of the environment, so every launcher (torchrun,
Slurm ``srun``, ``mpiexec``, a plain ``python``) is unit-testable with a fake dict.
:func:`init_runtime` turns the detected launch into a :class:`Runtime`: it picks the device
and backend, completes the rendezvous information the launcher did not provide (Slurm: the
first node of the allocation; MPI: rank 0's address, broadcast over mpi4py) and creates the
process group. With one process no process group is created at all.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass
from itertools import product
from typing import Iterator, Mapping, MutableMapping

import torch
import torch.distributed as dist

from cafedist import lifecycle
from cafedist.errors import DistError

log = logging.getLogger("cafedist")

# Launcher -> the variables it was recognised by (for the start-up log line).
LAUNCHERS = {
    "single": "no launcher variables",
    "torchrun": "RANK/WORLD_SIZE",
    "slurm": "SLURM_PROCID/SLURM_NTASKS",
    "mpi": "OMPI_COMM_WORLD_*, PMI_* or PMIX_RANK",
}
BACKENDS = ("auto", "gloo", "nccl", "mpi")


@dataclass(frozen=True)
class LaunchInfo:
    """What the launcher told this process through its environment."""

    launcher: str  # "single" | "torchrun" | "slurm" | "mpi"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None


@dataclass
class Runtime:
    """This process's place in the job: rank, device, backend (None without a process group)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    launcher: str

    @property
    def is_main(self) -> bool:
        """True on rank 0, the coordinator."""
        return self.rank == 0


# --------------------------------------------------------------------------- env parsing


def _env_int(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    """Read an integer environment variable, or raise a one-line DistError naming it."""
    raw = env[name]
    try:
        value = int(raw.strip())
    except ValueError:
        raise DistError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise DistError(f"environment variable {name}={raw!r} must be >= {minimum}")
    return value


def _first_int(env: Mapping[str, str], names: tuple[str, ...], default: int) -> int:
    """The first of ``names`` present in ``env`` as an int, else ``default``."""
    for name in names:
        if name in env:
            return _env_int(env, name)
    return default


def _checked(launcher: str, rank: int, world: int, local_rank: int, rank_var: str,
             world_var: str, addr: str | None, port: int | None) -> LaunchInfo:
    """Build a LaunchInfo after checking that rank and world size agree."""
    if rank >= world:
        raise DistError(f"environment variable {rank_var}={rank} must be < {world_var}={world}")
    if port is not None and not 0 < port < 65536:
        raise DistError(f"environment variable MASTER_PORT={port} is not a TCP port (1-65535)")
    return LaunchInfo(launcher, rank, world, local_rank, addr or None, port)


def _detect_env_launcher(env: Mapping[str, str]) -> LaunchInfo:
    """torchrun or any env:// launcher: RANK + WORLD_SIZE (+ LOCAL_RANK, MASTER_ADDR/PORT)."""
    missing = [v for v in ("RANK", "WORLD_SIZE") if v not in env]
    if missing:
        present = "RANK" if "RANK" in env else "WORLD_SIZE"
        raise DistError(f"environment variable {present} is set but {missing[0]} is not "
                        "(an env:// launcher such as torchrun sets both)")
    rank = _env_int(env, "RANK")
    world = _env_int(env, "WORLD_SIZE", minimum=1)
    # Without LOCAL_RANK assume one node: the device index then follows the global rank.
    local_rank = _first_int(env, ("LOCAL_RANK",), default=rank)
    port = _env_int(env, "MASTER_PORT") if "MASTER_PORT" in env else None
    return _checked("torchrun", rank, world, local_rank, "RANK", "WORLD_SIZE",
                    env.get("MASTER_ADDR"), port)


def _is_slurm_task(env: Mapping[str, str]) -> bool:
    """A task of a (possibly 1-task) srun step, not a plain python in an sbatch script."""
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return False
    return "SLURM_STEP_ID" in env or _env_int(env, "SLURM_NTASKS", minimum=1) > 1


def _detect_slurm(env: Mapping[str, str]) -> LaunchInfo:
    """Slurm task: SLURM_PROCID/NTASKS/LOCALID; master = first node of the allocation."""
    rank = _env_int(env, "SLURM_PROCID")
    world = _env_int(env, "SLURM_NTASKS", minimum=1)
    local_rank = _first_int(env, ("SLURM_LOCALID",), default=rank)
    addr = env.get("MASTER_ADDR")
    if not addr:
        for var in ("SLURM_NODELIST", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST"):
            if env.get(var):
                addr = expand_nodelist(env[var], var)[0]
                break
    if world > 1 and not addr:
        raise DistError("environment variable SLURM_NODELIST (or SLURM_JOB_NODELIST) is missing: "
                        "cannot find the master node of this Slurm job (or set MASTER_ADDR)")
    if "MASTER_PORT" in env:
        port = _env_int(env, "MASTER_PORT")
    else:
        port = slurm_job_port(_first_int(env, ("SLURM_JOB_ID", "SLURM_JOBID"), default=9500),
                              _first_int(env, ("SLURM_RESTART_COUNT",), default=0))
    return _checked("slurm", rank, world, local_rank, "SLURM_PROCID", "SLURM_NTASKS", addr, port)


def slurm_job_port(job_id: int, restarts: int) -> int:
    """The rendezvous port of a Slurm job's tasks, in [20000, 40000): derived from the job id,
    so every task computes the same one without talking and two jobs sharing a node are
    unlikely to collide, and from how often Slurm restarted the job, so that a requeued job
    does not meet its own earlier start's store (a process of it still exiting holds the port:
    rank 0 of the restart could not listen, and the others waited on it until the time limit)."""
    return 20000 + (job_id + 7919 * restarts) % 20000


# (rank variable, world-size variable, local-rank variables) per MPI implementation.
_MPI_VARIANTS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("OMPI_COMM_WORLD_RANK", ("OMPI_COMM_WORLD_SIZE",), ("OMPI_COMM_WORLD_LOCAL_RANK",)),
    ("PMI_RANK", ("PMI_SIZE",), ("MPI_LOCALRANKID", "PMI_LOCAL_RANK")),
    ("PMIX_RANK", ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"),
     ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK")),
)


def _detect_mpi(env: Mapping[str, str]) -> LaunchInfo | None:
    """Open MPI / MPICH (Hydra) / PMIx variables; the master address is found later over MPI."""
    for rank_var, world_vars, local_vars in _MPI_VARIANTS:
        if rank_var not in env:
            continue
        world_var = next((v for v in world_vars if v in env), None)
        if world_var is None:
            raise DistError(f"environment variable {rank_var} is set but none of "
                            f"{', '.join(world_vars)} is: cannot tell the MPI world size")
        rank = _env_int(env, rank_var)
        world = _env_int(env, world_var, minimum=1)
        local_rank = _first_int(env, local_vars, default=rank)
        return _checked("mpi", rank, world, local_rank, rank_var, world_var, None, None)
    return None


def detect_launch(env: Mapping[str, str] = os.environ) -> LaunchInfo:
    """Detect the launcher from ``env`` (pure function; pass a dict in tests).

    Order: env:// launchers such as torchrun (``RANK`` + ``WORLD_SIZE``; also covers
    ``srun torchrun``), a Slurm step (``SLURM_PROCID`` + ``SLURM_NTASKS``, only when the step
    has more than one task or ``SLURM_STEP_ID`` is set), MPI (Open MPI, MPICH/Hydra, PMIx),
    else a single process. An inconsistent environment raises :class:`DistError` naming the
    variable at fault.
    """
    if "RANK" in env or "WORLD_SIZE" in env:
        return _detect_env_launcher(env)
    if _is_slurm_task(env):
        return _detect_slurm(env)
    mpi = _detect_mpi(env)
    if mpi is not None:
        return mpi
    return LaunchInfo("single", 0, 1, 0, None, None)


# ------------------------------------------------------------------ Slurm nodelist syntax

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str, var: str) -> list[str]:
    """Split ``text`` at commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise DistError(f"environment variable {var}={text!r}: nested '[' in a node list")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise DistError(f"environment variable {var}={text!r}: unbalanced ']' in a node list")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise DistError(f"environment variable {var}={text!r}: unbalanced '[' in a node list")
    parts.append(text[start:])
    return parts


def _expand_bracket(body: str, var: str, text: str) -> list[str]:
    """``"01-03,07"`` -> ``["01", "02", "03", "07"]`` (zero padding kept from the start value)."""
    out: list[str] = []
    for item in body.split(","):
        m = _RANGE.match(item.strip())
        if not m:
            raise DistError(f"environment variable {var}={text!r}: bad range {item!r} in a node list")
        lo_s, hi_s = m.group(1), m.group(2) or m.group(1)
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise DistError(f"environment variable {var}={text!r}: descending range {item!r}")
        out.extend(str(i).zfill(len(lo_s)) for i in range(lo, hi + 1))
    return out


def expand_nodelist(text: str, var: str = "SLURM_NODELIST") -> list[str]:
    """Expand a Slurm compressed host list, e.g. ``"node[01-03,07],gpu5"`` -> 5 host names.

    Several bracket groups in one name expand as a product (``"r[1-2]n[1-2]"`` -> r1n1, r1n2,
    r2n1, r2n2), as Slurm does. ``var`` only names the variable in error messages.
    """
    hosts: list[str] = []
    for part in _split_top_level(text.strip(), var):
        if not part:
            raise DistError(f"environment variable {var}={text!r}: empty host name in a node list")
        # re.split with a capture group alternates literal text and bracket bodies.
        pieces = re.split(r"\[([^\]]*)\]", part)
        choices = [[p] if i % 2 == 0 else _expand_bracket(p, var, text) for i, p in enumerate(pieces)]
        hosts.extend("".join(combo) for combo in product(*choices))
    return hosts


# ---------------------------------------------------------------- device and backend


def resolve_device(device: str, local_rank: int = 0, name: str = "device") -> torch.device:
    """``"auto"`` -> cuda:{local_rank % n} if CUDA is available, else cpu; validate overrides
    (``name``: how errors call the setting, e.g. ``dist.device`` or ``--device``)."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DistError(f"{name} {device!r} is not valid: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise DistError(f"{name} {device!r} is not supported: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise DistError(f"{name} {device!r} requested but CUDA is not available on this host")
    count = torch.cuda.device_count()
    if dev.index is None:
        return torch.device("cuda", local_rank % count)
    if dev.index >= count:
        raise DistError(f"{name} {device!r} does not exist: this host has {count} CUDA device(s)")
    return dev


#: ``always``: make a process group also for a single rank (a launcher's world size 1), so every
#: collective really runs — how one GPU exercises NCCL (``launch/cuda_check.sh``); default ``auto``
PROCESS_GROUP_ENV = "CAFEDIST_PROCESS_GROUP"


def _wants_group(info: LaunchInfo, env: Mapping[str, str]) -> bool:
    """A process group for several ranks, or for one when ``CAFEDIST_PROCESS_GROUP=always``."""
    value = env.get(PROCESS_GROUP_ENV, "auto")
    if value not in ("auto", "always"):
        raise DistError(f"{PROCESS_GROUP_ENV}={value!r}: expected auto or always")
    if value == "always" and info.world_size == 1 and info.launcher == "single":
        raise DistError(f"{PROCESS_GROUP_ENV}=always needs a launcher for its rendezvous "
                        f"(e.g. torchrun --standalone --nproc_per_node 1)")
    return info.world_size > 1 or value == "always"


def deterministic_cuda() -> None:
    """A run on a GPU is a function of its config, as on the CPU: cuDNN uses deterministic
    kernels and does not pick them by timing (``benchmark``), cuBLAS gets the fixed workspace
    its deterministic mode needs (read when cuBLAS starts, so set before any CUDA work), and
    PyTorch's own non-deterministic kernels warn (``warn_only``: a run is not refused for an
    op that has no deterministic version)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def _resolve_backend(backend: str, device: torch.device, name: str = "backend") -> str:
    """``"auto"`` -> nccl on cuda, gloo on cpu; reject impossible combinations."""
    if backend not in BACKENDS:
        raise DistError(f"{name} {backend!r} is not valid: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise DistError(f"{name} 'nccl' needs a CUDA device but the device is {device}: "
                        "use backend 'gloo' on cpu")
    if backend == "nccl" and not dist.is_nccl_available():
        raise DistError(f"{name} 'nccl' is not available in this torch build: use 'gloo'")
    if backend == "mpi" and not dist.is_mpi_available():
        raise DistError(f"{name} 'mpi' is not available in this torch build (it needs torch "
                        "compiled with MPI): use 'gloo' or 'nccl' (mpiexec launches work with both)")
    return backend


# --------------------------------------------------------------------- rendezvous


def _free_port() -> int:
    """A TCP port that is free right now (bind to port 0 and let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _mpi_rendezvous(info: LaunchInfo, env: Mapping[str, str]) -> LaunchInfo:
    """Rank 0 picks its address and a free port; mpi4py broadcasts them to every rank."""
    try:
        from mpi4py import MPI  # lazy: importing mpi4py initialises MPI, only wanted here
    except ImportError as exc:
        raise DistError(f"launched by mpiexec (rank {info.rank}) but mpi4py cannot be imported: {exc}") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != info.world_size:
        # Typical when mpi4py was built against another MPI than the mpiexec used.
        raise DistError(f"mpi4py sees {comm.Get_size()} process(es) but the launcher set world size "
                        f"{info.world_size}: mpi4py and mpiexec come from different MPI installations")
    endpoint = None
    if comm.Get_rank() == 0:
        addr = env.get("MASTER_ADDR") or socket.gethostname()
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else _free_port()
        endpoint = (addr, port)
    addr, port = comm.bcast(endpoint, root=0)
    return LaunchInfo(info.launcher, info.rank, info.world_size, info.local_rank, addr, port)


def _export_env(info: LaunchInfo, target: MutableMapping[str, str]) -> None:
    """Write the env:// variables, so torch (and anything we spawn) sees one consistent view."""
    target.update({
        "MASTER_ADDR": str(info.master_addr),
        "MASTER_PORT": str(info.master_port),
        "RANK": str(info.rank),
        "WORLD_SIZE": str(info.world_size),
        "LOCAL_RANK": str(info.local_rank),
    })


def _init_process_group(info: LaunchInfo, backend: str, timeout_s: float) -> None:
    """init_process_group, turning any failure into a one-line DistError."""
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if backend == "mpi":  # torch's MPI backend takes rank and size from MPI itself
            dist.init_process_group("mpi", timeout=timeout)
        else:
            dist.init_process_group(backend, init_method="env://", rank=info.rank,
                                    world_size=info.world_size, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any failure here is a launch problem
        hint = ""
        if info.launcher == "slurm":
            hint = " (a plain `python` in an sbatch script with --ntasks>1 waits forever: use srun)"
        raise DistError(f"init_process_group failed on rank {info.rank} of {info.world_size} "
                        f"({info.launcher} launch, {info.master_addr}:{info.master_port}): "
                        f"{short_reason(exc)}{hint}") from None


def short_reason(exc: BaseException) -> str:
    """First line of an exception message without the ``[file.cc:123]`` prefix torch adds, and
    without the advice gloo appends to it ("Check the logs of the remote worker ... GLHF")."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = re.sub(r"^(\[[^\]]*\]\s*)+", "", lines[0]) if lines else ""
    text = re.split(r"\.\s+(?=Check the logs|This may indicate|This is typically caused|GLHF)", text)[0]
    text = text or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------- a rank that failed alone

#: where a rank that failed leaves word of it, in the rendezvous store (its peers only learn
#: that its connections closed)
FAILURE_KEY = "cafedist/failure"
#: the bound on those store operations (seconds)
STORE_ASK_S = 10


def _store() -> dist.Store | None:
    """The default process group's store (None: no group, or a backend without one)."""
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - the MPI backend
        return None


@contextlib.contextmanager
def _briefly(store: dist.Store) -> Iterator[None]:
    """Bound the store's operations to :data:`STORE_ASK_S` meanwhile (its host may be stuck:
    the failure path must not wait ``dist.timeout_s`` more)."""
    timeout = store.timeout
    store.set_timeout(datetime.timedelta(seconds=STORE_ASK_S))
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            store.set_timeout(timeout)


def _agent_store() -> bool:
    """Whether torchrun's agent hosts the store (else rank 0 does, for env:// launches)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Silence file descriptor 2 meanwhile: asking a store whose host has ended makes torch log
    a C++ stack trace there before it raises (the exception says all there is to say)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):  # no stderr, or a closed one
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # started without a file descriptor 2: nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _timed_out(text: str) -> bool:
    """Whether an error's text says it timed out (its peer may be stuck rather than gone)."""
    return "timed out" in text.lower() or "timeout" in text.lower()


def report_failure(rank: int, exc: BaseException) -> None:
    """Leave word in the store that rank ``rank`` failed with ``exc``, for its peers' error line
    (:func:`explain_peer_failure`); never raises. Costs one store write, on the failure path only."""
    store = _store()
    if store is None:
        return
    try:
        with _quiet_fd2(), _briefly(store):  # quiet: the ranks may all fail, rank 0 (the host) first
            store.set(FAILURE_KEY, f"rank {rank} failed: {type(exc).__name__}: {short_reason(exc)}")
    except Exception:  # noqa: BLE001 - the store's host ended too: its peers say less, that is all
        pass


def forget_failure() -> None:
    """Rank 0, before a run's first collective: drop the word an earlier run in this process
    group left (a caller that trains again after a failure)."""
    store = _store()
    try:
        if store is not None and store.check([FAILURE_KEY]):
            store.delete_key(FAILURE_KEY)
    except Exception:  # noqa: BLE001 - a stale word at worst
        pass


def explain_peer_failure(reason: str) -> str:
    """What to say of a collective that failed for ``reason``: which rank failed and why, where
    a peer that failed alone left word (:func:`report_failure`) before its connections closed,
    or that rank 0, the store's host outside torchrun, has ended; else ``reason``. A timed-out
    collective is left as it is: its peer, maybe the store's host, is stuck, not gone."""
    store = _store()
    if store is None or _timed_out(reason):
        return reason
    try:
        with _quiet_fd2(), _briefly(store):
            return store.get(FAILURE_KEY).decode() if store.check([FAILURE_KEY]) else reason
    except Exception as exc:  # noqa: BLE001 - the store's host has ended (or is stuck)
        gone = isinstance(exc, dist.DistNetworkError) and not _timed_out(str(exc)) and not _agent_store()
        return f"rank 0 has ended ({reason})" if gone else reason


def init_runtime(backend: str = "auto", device: str = "auto", timeout_s: float = 600,
                 env: Mapping[str, str] = os.environ, names: str = "") -> Runtime:
    """Detect the launch, choose device and backend, and create the process group.

    ``device``: "auto" (cuda:{local_rank % count} if CUDA is available, else cpu), "cpu",
    "cuda" or "cuda:N". ``backend``: "auto" (nccl on cuda, gloo on cpu), "gloo", "nccl",
    "mpi". With world size 1 no process group is created and ``backend`` is None (unless
    ``CAFEDIST_PROCESS_GROUP=always``: then the collectives run even for one rank).
    Slurm and MPI launches get MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK written
    to ``os.environ`` before ``init_process_group(env://)``. ``timeout_s`` bounds the
    rendezvous and every later collective, so a dead peer ends the job instead of hanging it.
    ``names``: prefix of the settings in error messages (``"dist."``: a run config's fields).
    """
    if timeout_s <= 0:
        raise DistError(f"timeout_s={timeout_s} must be > 0 seconds")
    info = detect_launch(env)
    dev = resolve_device(device, info.local_rank, name=f"{names}device")
    chosen = _resolve_backend(backend, dev, name=f"{names}backend")  # validated even when unused (world size 1)
    if dev.type == "cuda":
        deterministic_cuda()
        torch.cuda.set_device(dev)
    pg_backend: str | None = None
    if _wants_group(info, env):
        if info.launcher == "mpi" and chosen != "mpi":
            info = _mpi_rendezvous(info, env)
        if chosen != "mpi":
            if info.master_addr is None or info.master_port is None:
                raise DistError(f"{info.launcher} launch on rank {info.rank}: MASTER_ADDR and "
                                "MASTER_PORT must be set for a multi-process run")
            _export_env(info, os.environ)
        if dist.is_initialized():
            raise DistError("init_runtime called twice: a process group already exists "
                            "(call shutdown_runtime first)")
        _init_process_group(info, chosen, timeout_s)
        pg_backend = chosen
    rt = Runtime(info.rank, info.world_size, info.local_rank, dev, pg_backend, info.launcher)
    if rt.is_main:
        log.info("runtime: launcher=%s (detected from %s) world_size=%d backend=%s device=%s "
                 "master=%s:%s timeout=%ss", rt.launcher, LAUNCHERS[rt.launcher], rt.world_size,
                 rt.backend or "none (single process)", rt.device, info.master_addr,
                 info.master_port, timeout_s)
    return rt


def shutdown_runtime(rt: Runtime) -> None:
    """Leave the process group if :func:`init_runtime` created one (idempotent).

    All ranks meet at a barrier first: a rank that tears its gloo pairs down while a peer is
    still working (rank 0 writing the summary) can make the peer's transport threads abort.
    Then the group is destroyed, unless the process is about to end with ``os._exit``
    (:data:`cafedist.lifecycle.EXIT_WITHOUT_TEARDOWN`): destroying it, or letting the interpreter's teardown do
    so, still aborted a successful rank now and then ("terminate called without an active
    exception", SIGABRT from a gloo thread's destructor, ~1 in 40 runs on 2 cores).
    """
    if rt.backend is not None and dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a broken group is torn down anyway
            pass
        if not lifecycle.EXIT_WITHOUT_TEARDOWN:
            dist.destroy_process_group()
