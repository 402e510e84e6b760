"""``cafedist bench {local,packed,aggregate,comm,scaling,memory,exits}``: performance measurements.

Every benchmark returns rows (dicts). The timed ratios of local, packed, aggregate and exits are
measured in one process with the candidates timed alternately (ABAB) -- see
:mod:`cafedist.bench.timing`; scaling and memory train one child run after another, so their
ratios are not paired; comm counts bytes. Every row carries the 1-minute load average before
and after the benchmark (``load_1m``). The command prints a table per benchmark, or with
``--json`` one JSON object per row. ``docs/PERFORMANCE.md``
records the commands, their output on the reference machine, and what each optimisation did.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

import torch

BENCHMARKS = ("local", "packed", "aggregate", "comm", "scaling", "memory", "exits")
DEVICE_BENCHMARKS = ("local", "packed", "aggregate")  # the others count bytes or launch gloo ranks


def _runner(name: str) -> Callable[..., list[dict[str, Any]]]:
    # imported lazily: `cafedist bench comm` should not pay for the packed trainer's imports
    if name == "local":
        from cafedist.bench.local import bench_local as fn
    elif name == "packed":
        from cafedist.bench.packed import bench_packed as fn
    elif name == "aggregate":
        from cafedist.bench.aggregate import bench_aggregate as fn
    elif name == "comm":
        from cafedist.bench.comm import bench_comm as fn
    elif name == "memory":
        from cafedist.bench.memory import bench_memory as fn
    elif name == "exits":
        from cafedist.bench.exits import bench_exits as fn
    else:
        from cafedist.bench.scaling import bench_scaling as fn
    return fn


def run_benchmark(name: str, quick: bool = False, **options: Any) -> list[dict[str, Any]]:
    """Run benchmark ``name`` and return its rows."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r} (choices: {', '.join(BENCHMARKS)})")
    return _runner(name)(quick=quick, **options)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a Slurm allocation, ``taskset``), else
    the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cafedist bench``."""
    parser.add_argument("which", choices=BENCHMARKS, metavar="BENCHMARK",
                        help=f"one of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="reduced sizes (each benchmark < 5 min on 2 cores)")
    parser.add_argument("--json", action="store_true", help="one JSON object per result line")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads, at most the CPUs this process may run on "
                             "(default 1: steady ratios on a shared machine; scaling: always 1 per rank)")
    parser.add_argument("--device", default="auto",
                        help="local, packed, aggregate: auto (the GPU when CUDA is available, else cpu) "
                             "| cpu | cuda[:N]")


def main(args: argparse.Namespace) -> int:
    """Run one benchmark and print its rows."""
    from cafedist.bench.report import render
    from cafedist.bench.timing import resolve_device
    from cafedist.errors import ConfigError

    if args.threads < 1:
        raise ConfigError(f"--threads: expected an integer >= 1, got {args.threads}")
    if args.which == "scaling" and args.threads != 1:
        # its ranks are the parallelism: each trains with one thread, whatever --threads said
        raise ConfigError(f"--threads: `cafedist bench scaling` runs every rank with 1 thread (the ranks are what "
                          f"it scales), so --threads {args.threads} would not be used; omit it")
    cpus = usable_cpus()
    if args.threads > cpus:
        # more threads than cores time the cores' sharing, not the code (docs/PERFORMANCE.md),
        # and a count beyond a C int ended in torch's traceback
        raise ConfigError(f"--threads: {args.threads} is more than the {cpus} CPU(s) this process may run on; "
                          f"expected 1 to {cpus}")
    torch.set_num_threads(args.threads)
    options: dict[str, Any] = {}
    if args.which in DEVICE_BENCHMARKS:
        options["device"] = resolve_device(args.device)
    elif args.which == "memory":
        options["threads"] = args.threads  # the training children's OMP_NUM_THREADS
    if args.which not in DEVICE_BENCHMARKS and args.device != "auto":
        raise ConfigError(f"--device: `cafedist bench {args.which}` does not run on a device "
                          f"(only {', '.join(DEVICE_BENCHMARKS)} do)")
    before = _load_1m()
    rows = run_benchmark(args.which, quick=args.quick, **options)
    # the load other work put on the machine skews absolute times, and the ratios of `scaling`
    # and `memory`, whose runs are timed one after another: every row says what it was (the
    # benchmark's own busy threads count too)
    load = [before, _load_1m()]
    print(render([{**row, "load_1m": load} for row in rows], as_json=args.json), flush=True)
    return 0


def _load_1m() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


__all__ = ["BENCHMARKS", "add_arguments", "main", "run_benchmark"]
