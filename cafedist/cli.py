"""``cafedist`` command line: prepare | train | eval | status | export | compare | submit | bench | scaling-report.

Bad input (a :class:`~cafedist.errors.CafeError`, a malformed command line, a path that
cannot be used) is reported as one line ``cafedist...: error: ...`` with exit status 2; a run
stopped by SIGTERM/SIGUSR1 exits with :data:`~cafedist.train.signals.REQUEUE_EXIT_CODE` after
writing its checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from cafedist.errors import CafeError, ConfigError, DistError
from cafedist.interrupts import (
    Interrupted,
    deferred_interrupts,
    forget_handled_interrupt,
    keep_status_through_teardown,
    noticed_interrupts,
)
from cafedist.paths import config_file_arg, refuse_empty_path, run_dir_arg, user_path


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): ``cafedist train: error: ...``, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _setup_logging(verbose: bool) -> None:
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or os.environ.get("OMPI_COMM_WORLD_RANK") \
        or os.environ.get("PMI_RANK") or "0"
    level = logging.DEBUG if verbose else (logging.INFO if rank == "0" else logging.WARNING)
    logging.basicConfig(level=level, format=f"[cafedist r{rank}] %(levelname)s %(message)s", stream=sys.stderr)


# ----------------------------------------------------------------------------- train
def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=config_file_arg, help="YAML config file (defaults are used for anything it omits)")
    p.add_argument("--out", default=None, type=user_path, help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", default="auto", choices=["auto", "none", "force"],
                   help="auto: continue from the newest valid checkpoint (default); none: start over; "
                        "force: resume even if the config changed")
    p.add_argument("--backend", default=None, help="override dist.backend (gloo|nccl|mpi)")
    p.add_argument("--device", default=None, help="override dist.device (auto|cpu|cuda|cuda:N)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (data, model, bytes per round, placement on the ranks) and exit; "
                        "trains nothing and writes nothing into --out")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: ranks to plan for (default: the launcher's world size, else 1)")
    p.add_argument("overrides", nargs="*",
                   help="dotted overrides, e.g. train.rounds=5 algorithm.cafedistill.mu=1 (anywhere among the options)")


def _run_dir_default(config: str | None) -> str:

    return str(Path("runs") / (Path(config).stem if config else "default"))


def _train(args: argparse.Namespace) -> int:
    from cafedist.parentwatch import guard_parent

    # die with a launcher, or stop with the compare that started it, from the start (importing
    # torch alone takes seconds)
    watch = guard_parent()
    try:
        return _train_guarded(args)
    finally:
        if watch is not None:
            watch.stop()


def _train_guarded(args: argparse.Namespace) -> int:
    from cafedist.config import load_config
    from cafedist.train.loop import train
    from cafedist.train.signals import REQUEUE_EXIT_CODE

    overrides = list(args.overrides)
    if args.backend:
        overrides.append(f"dist.backend={args.backend}")
    if args.device:
        overrides.append(f"dist.device={args.device}")
    cfg = load_config(args.config, overrides)
    refuse_empty_path("--out", args.out, "a run directory (omit --out for runs/<config name>)")
    out = args.out or _run_dir_default(args.config)
    if args.world_size is not None and not args.dry_run:
        raise ConfigError("--world-size: only with --dry-run (a real run takes its world size from the launcher)")
    if args.dry_run:
        return _dry_run(cfg, out, args.world_size)
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    if result.stopped:
        return REQUEUE_EXIT_CODE
    if result.summary is not None:
        acc = ", ".join(f"{a:.4f}" for a in result.summary["acc_per_exit"])
        red = result.summary["mac_reduction_at_1pt"]
        print(f"done: {out}  acc_per_exit [{acc}]  MAC reduction at <=1pt loss "
              f"{100 * red['macs_reduction']:.1f}% (threshold {red['threshold']})")
    return 0


def _dry_run(cfg: Any, out: str, world_size: int | None) -> int:
    from cafedist.distributed.runtime import detect_launch
    from cafedist.train.plan import describe_plan

    launch = detect_launch()
    if launch.rank != 0:  # under a launcher every rank parses the command: one plan is enough
        return 0
    if world_size is not None and world_size < 1:
        raise ConfigError(f"--world-size: expected an integer >= 1, got {world_size}")
    print(describe_plan(cfg, world_size or launch.world_size, run_dir=out), flush=True)
    return 0


# ----------------------------------------------------------------------------- eval
def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=run_dir_arg, help="a run directory written by `cafedist train`")
    p.add_argument("--max-loss", type=float, default=0.01,
                   help="accuracy loss budget for the reported MAC reduction, in [0, 1] (default 0.01 = 1 point)")
    p.add_argument("--allow-partial", action="store_true",
                   help="evaluate even when the newest valid checkpoint is not the run's final round "
                        "(unfinished run, or a corrupt final checkpoint); a warning still says so")
    p.add_argument("--device", default="cpu",
                   help="where the models run: cpu (default) or cuda|cuda:N|auto; on a GPU the numbers of "
                        "a GPU-trained run match what train computed there")
    from cafedist.eval.budget_run import add_budget_arguments  # issue 12: --budget and its knobs

    add_budget_arguments(p)


def _eval(args: argparse.Namespace) -> int:
    from cafedist.eval.budget_keep import describe_key
    from cafedist.eval.budget_run import BUDGET_OUTPUTS, BudgetOptions, format_budget
    from cafedist.eval.run import evaluate_run

    budget = BudgetOptions.from_args(args)
    report = evaluate_run(args.run_dir, max_loss=args.max_loss, device=args.device, allow_partial=args.allow_partial,
                          budget=budget)
    red = report["mac_reduction"]
    acc = ", ".join(f"{a:.4f}" for a in report["acc_per_exit"])
    print(f"evaluated round {report['round']} (final round {report['final_round']}) "
          f"from checkpoint {report['checkpoint']}")
    if report["partial"]:
        print(f"cafedist: WARNING: round {report['round']} is NOT the run's final round {report['final_round']}: "
              f"these numbers are not the run's result (--allow-partial)", file=sys.stderr)
    print(f"acc_per_exit [{acc}]")
    print(f"dynamic inference: {100 * red['macs_reduction']:.1f}% fewer MACs at threshold {red['threshold']} "
          f"for {100 * red['accuracy_loss']:.2f} points of accuracy (budget {100 * args.max_loss:.2f})")
    # the budget tables eval.json lists were written by this eval only with --budget
    wrote = [p for key, p in report["paths"].items() if budget is not None or key not in BUDGET_OUTPUTS]
    if budget is not None:  # issue 12: the per-client budget result beside the global threshold
        print("\n".join(format_budget(report["budget"])))
        wrote += report["budget"]["paths"].values()
    earlier = [describe_key(e) for key, e in report.get("budgets", {}).items() if budget is None or key != budget.key]
    if earlier:
        print(f"eval.json keeps the budget{'s' if len(earlier) > 1 else ''} evaluated earlier for these models: "
              f"{', '.join(earlier)} (budgets; `cafedist export --budget` chooses among them)")
    print(f"wrote {', '.join(wrote)}")
    return 0


# ----------------------------------------------------------------------------- the command table
def _lazy(module: str) -> tuple[Callable, Callable]:
    """(add_arguments, main) of a command module, imported only when that command is used."""

    def add(parser: argparse.ArgumentParser) -> None:
        importlib.import_module(module).add_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(module).main(args)

    return add, run


# name -> (help, add_arguments, main); every module named here exposes add_arguments(parser) and main(args)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "prepare": ("build a federated HDF5 store from a dataset (or --describe one)", *_lazy("cafedist.data.prepare")),
    "train": ("train (or resume) a run; works plainly and under torchrun/srun/mpiexec", _add_train, _train),
    "eval": ("evaluate a finished run: per-exit, per-client and dynamic-inference accuracy", _add_eval, _eval),
    "status": ("where each run stands (rounds, training/finished/stopped, time left, eval) from its files alone",
               *_lazy("cafedist.status")),
    "export": ("write each client's early-exit model (torch.export, one program per exit) and exit policy "
               "for deployment", *_lazy("cafedist.deploy.export")),
    "compare": ("run every (algorithm, seed) of a config and report mean ± std per exit, dynamic inference, cost",
                *_lazy("cafedist.compare")),
    "submit": ("submit a run or a sweep (job array) to Slurm with submitit, requeued on preemption; "
               "--local without Slurm", *_lazy("cafedist.submit")),
    "bench": ("performance benchmarks: local | packed | aggregate | comm | scaling | memory | exits "
              "(local, packed, aggregate, exits: ratios of runs timed alternately; scaling, memory: runs "
              "one after another; every row with the load average)",
              *_lazy("cafedist.bench")),
    "scaling-report": ("table (md/csv) and plot of a scaling sweep's run directories", *_lazy("cafedist.scaling")),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``cafedist`` argument parser with every subcommand."""
    parser = _Parser(prog="cafedist", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add, _) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        add(sp)
    return parser


#: OSErrors about storage rather than a bug, reported in one line even without a file name
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cafedist`` console script."""
    try:
        # building the parser imports every command's module (torch among them: seconds); a
        # KeyboardInterrupt raised amid imports escaped as a traceback, was lost in an import
        # lock's callback (the command then ran to the end) or aborted in torch's C++: signals
        # wait until the imports are done
        with deferred_interrupts():
            parser = build_parser()
        args = _parse(parser, argv)
        _setup_logging(args.verbose)
        if _left_to_rank_0(args.command):
            return 0
        code = _run_command(args)
        if sys.stdout is not None:  # None: started with stdout closed (`>&-`), where print() writes nothing
            sys.stdout.flush()  # a reader gone (below) is found here, not in the interpreter's teardown
        return code
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGUSR1 (cafedist.interrupts)
        forget_handled_interrupt()  # else `python -m cafedist` may end by SIGINT all the same
        print("cafedist: interrupted", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    except BrokenPipeError:
        # the reader of the output went away (`cafedist status SWEEP | head -1`): Python ignores
        # SIGPIPE, so the write raised and ended in a traceback (status 1); end as a command
        # that SIGPIPE stops does in a shell, quietly, with 128 + SIGPIPE
        if not _stdout_closed():
            raise  # a pipe of the command's own: a bug, with its traceback
        _discard_stdout()
        return 128 + signal.SIGPIPE


def _flush_standard_streams() -> None:
    """Flush stdout and stderr before ``os._exit`` (which skips it): those there are (a rank
    started with one closed has None) and whose reader is still there (a gone reader's pipe
    raises, and the output is lost either way)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reading end was closed (poll reports POLLERR on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (a StringIO), no poll
        return False


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of what is still
    buffered for a closed pipe does not raise again (Python's advice for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a file descriptor (a StringIO in tests)
        pass


#: the commands every rank of a launch runs: train's ranks train together; prepare may fill
#: each node's own cache directory (its lock lets one writer through where it is shared)
_EVERY_RANK = frozenset({"train", "prepare"})


def _left_to_rank_0(command: str) -> bool:
    """Whether this process is a non-zero rank of a multi-rank launch (torchrun, srun, mpiexec)
    running a command one process does (eval, export, status, compare, submit, ...): it leaves
    that to rank 0 and ends at once (exit 0). Else every rank would evaluate and write the same
    files in turn, print the same table, or submit the same jobs once per rank."""
    if command in _EVERY_RANK:
        return False
    from cafedist.distributed.runtime import detect_launch

    try:
        launch = detect_launch()
    except DistError:
        return False  # a launcher's variables that do not add up: none of this command's business
    if launch.rank == 0:
        return False
    logging.getLogger("cafedist").debug("rank %d of %d: `cafedist %s` runs on rank 0 only", launch.rank,
                                        launch.world_size, command)
    return True


def _run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; errors become their exit status and one line (KeyboardInterrupt
    is left to :func:`main`)."""
    try:
        # SIGTERM and SIGUSR1 unwind like Ctrl-C (what is being written is removed, compare's
        # trainings are stopped), except in train: its stop flag takes them once it runs, and
        # before, in the rendezvous, only the default action ends a rank that a launcher stops
        # because a peer failed
        with noticed_interrupts(stop_signals=args.command != "train") as interrupted:
            status = int(COMMANDS[args.command][2](args) or 0)
            signum = interrupted()
            if signum is not None:  # a Ctrl-C that Python lost inside a callback (h5py's): still an interrupt
                raise Interrupted(signum)
        return status
    except DistError as exc:
        print(f"cafedist: error: {exc}", file=sys.stderr)
        if _group_exists():
            # a collective failed: the process group is broken and its background threads may
            # abort the interpreter at exit, so leave at once with our own status
            _flush_standard_streams()
            os._exit(exc.exit_code)
        return exc.exit_code
    except CafeError as exc:
        print(f"cafedist: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.filename is None and exc.errno not in _STORAGE_ERRNOS:
            raise
        # a path the user gave that the OS refused (permissions, a file where a folder should be),
        # or storage that refused a write (a full disk, a quota)
        where = f"{exc.filename}: " if exc.filename is not None else ""
        print(f"cafedist: error: {where}{exc.strerror or type(exc).__name__}", file=sys.stderr)
        return 2


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, accepting dotted overrides anywhere among the options.

    argparse collects a positional list only where it starts (``train --config C a=1 --out R
    b=2`` leaves ``b=2`` over), and ``parse_intermixed_args`` does not support subcommands:
    left-over words that are not options join the command's overrides.
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        options = [e for e in extra if e.startswith("-")]
        if options or not hasattr(args, "overrides"):
            sub = f"cafedist {args.command}" if getattr(args, "command", None) else "cafedist"
            parser.exit(2, f"{sub}: error: unrecognized arguments: {' '.join(options or extra)} "
                           f"(see {sub} --help)\n")
        args.overrides = [*args.overrides, *extra]
    return args


def run() -> None:
    """Console-script entry (``cafedist``, ``python -m cafedist``): :func:`main`, then leave.

    After a distributed command the process ends with ``os._exit`` once its output is
    flushed, skipping the interpreter teardown in which gloo's threads can abort a rank that
    has already succeeded. :func:`main` itself returns normally (it runs inside submitit jobs).
    """
    from cafedist import lifecycle

    lifecycle.EXIT_WITHOUT_TEARDOWN = True
    keep_status_through_teardown()  # before main(): torch's exit handlers, registered later, run first
    try:
        code = main()
    except Exception:  # noqa: BLE001 - a bug: report it, then leave the same way
        if not torch_distributed_used():
            raise
        traceback.print_exc()
        code = 1
    if torch_distributed_used():
        _flush_standard_streams()
        logging.shutdown()
        _finalize_mpi(code)
        os._exit(code)
    raise SystemExit(code)


def _finalize_mpi(code: int) -> None:
    """Under mpiexec, finalize MPI after an end every rank shares (done, or stopped for requeue):
    a process must, to count as ended well. A rank that failed alone leaves without: MPI_Finalize
    waits for every rank, and its peers, blocked in a gloo collective on the sockets this process
    holds open, would learn of the failure only after ``dist.timeout_s``."""
    from cafedist.train.signals import REQUEUE_EXIT_CODE

    mpi = sys.modules.get("mpi4py.MPI")
    if code in (0, REQUEUE_EXIT_CODE) and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()


def _group_exists() -> bool:
    """Whether this process holds a process group of any backend (without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def torch_distributed_used() -> bool:
    """Whether this process holds a gloo/NCCL process group (checked without importing torch).

    torch's own MPI backend is left out: it has no gloo threads to dodge, and it finalizes
    MPI in an exit handler that ``os._exit`` would skip.
    """
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized()
                and dist.get_backend() != "mpi")


if __name__ == "__main__":
    run()
