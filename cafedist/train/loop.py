"""Training a run: every rank calls :func:`train`, which runs the rounds and writes the run.

:func:`train` prepares the run directory (rank 0), builds this rank's part of the run
(:func:`cafedist.run.build.build_run`), resumes from the newest valid checkpoint, runs the
rounds (:class:`cafedist.train.round.Trainer`), appends each round's record to
``metrics.jsonl``, checkpoints every ``checkpoint.every`` rounds, at the end and on a stop
signal (SIGTERM/SIGUSR1 before a Slurm requeue), and writes ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cafedist import RESULTS_VERSION
from cafedist.config import Config, config_hash, dump_config, run_identity
from cafedist.distributed.comm import Comm
from cafedist.distributed.runtime import Runtime, init_runtime, shutdown_runtime
from cafedist.errors import CafeError, CheckpointError, DistError
from cafedist.fsutil import write_json_atomic, write_text_atomic
from cafedist.parentwatch import guard_launched_rank
from cafedist.run.build import build_run, close_run
from cafedist.run.checkpoint import (
    RESUME_MODES,
    CheckpointDir,
    Resumed,
    load_checkpoint,
    save_checkpoint,
    verification_memo,
)
from cafedist.run.metrics import MetricsLog
from cafedist.run.residency import remove_parked_state
from cafedist.rundir import RunLock, move_aside, outputs_lock
from cafedist.train.faults import maybe_fault
from cafedist.train.preflight import RunDirPlan, check_paths, earlier_hash, plan_run_dir
from cafedist.train.progress import Progress
from cafedist.train.records import summary
from cafedist.train.round import Trainer
from cafedist.train.signals import StopFlag

log = logging.getLogger("cafedist")


@dataclass
class RunResult:
    """What :func:`train` returns: the last completed round and whether a stop was requested."""

    last_round: int
    stopped: bool
    summary: dict[str, Any] | None


# ----------------------------------------------------------------------------- entry point
def prepare_run_dir(cfg: Config, run_dir: Path, resume: str) -> bool:
    """Rank 0, with the run's lock held and every input validated: carry out the run-directory plan.

    Moves an earlier run aside (``--resume none``) and writes ``config.yaml``, except under
    ``--resume force`` onto a different config: then the old ``config.yaml`` stays until the
    first new round is checkpointed. Returns whether that write is still due.
    """
    plan = plan_run_dir(cfg, run_dir, resume)  # again, under the lock: the directory may have changed
    if plan is RunDirPlan.ASIDE:
        # not while an eval or compare writes results about this run's models (they would land
        # in the new run)
        with outputs_lock(run_dir, advice="wait for it to end, then start over with --resume none"):
            moved = move_aside(run_dir)
        log.warning("--resume none: moved the previous run in %s to %s", run_dir, moved)
    # scratch of killed sessions; no other process writes here while the lock is held
    CheckpointDir(run_dir).remove_stale_staging()
    remove_parked_state(run_dir)
    if plan is RunDirPlan.DEFER:
        log.warning("--resume force: %s/config.yaml keeps the old config until the first new checkpoint", run_dir)
        return True
    write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
    return False


def _about_the_run(cfg: Config, rt: Runtime, resumed: Resumed | None, comm: Comm) -> dict[str, Any]:
    """What every checkpoint's manifest records about the run (:meth:`CheckpointDir.commit`),
    carried over from the checkpoint a resume restored: the results version is the oldest of
    the code that trained it (a run finished by newer code is still partly the older code's,
    and compare retrains it), the CPU thread count that of its first session. Warns when a
    resume mixes either (rank 0 decides, every rank learns it)."""
    threads = torch.get_num_threads() if rt.device.type == "cpu" else None
    restored = (resumed.manifest or {}) if resumed is not None and resumed.path is not None else None
    version, first = RESULTS_VERSION, threads
    if rt.is_main and restored is not None:
        recorded_version = restored.get("results_version", 1)  # manifests of earlier code: none
        version = min(RESULTS_VERSION, recorded_version if isinstance(recorded_version, int) else 1)
        recorded = restored.get("cpu_threads")
        first = recorded if isinstance(recorded, int) and threads is not None else threads
        name = resumed.path.name
        if version < RESULTS_VERSION:
            log.warning("%s was trained by code of results version %d (now %d), whose results differ for some "
                        "configs: this run keeps version %d, so compare trains it again (--resume none starts it "
                        "over here)",
                        name, version, RESULTS_VERSION, version)
        if first != threads:
            log.warning("resumed with %d CPU threads where this run began with %d: from here its float sums are "
                        "ordered differently, so its results will not match an uninterrupted run's bit for bit "
                        "(set OMP_NUM_THREADS=%d to keep them)", threads, first, first)
    version, first = comm.broadcast_object((version, first))
    return {"run_identity": run_identity(cfg), "store": str(cfg.data.store_path(cfg.seed).resolve()),
            "results_version": version, **({"cpu_threads": first} if first is not None else {})}


def train(cfg: Config, run_dir: str | Path, resume: str = "auto", rt: Runtime | None = None,
          progress: bool = True) -> RunResult:
    """Run (or resume) a training run; every rank calls this. Returns on every rank."""
    if resume not in RESUME_MODES:
        raise CheckpointError(f"--resume: expected auto, none or force, got {resume!r}")
    own_rt = rt is None
    watch = guard_launched_rank()  # under torchrun/srun/mpiexec: die with the launcher, write nothing more
    try:
        rt = rt or init_runtime(cfg.dist.backend, cfg.dist.device, cfg.dist.timeout_s, names="dist.")
        stop = StopFlag().install()
        try:
            with verification_memo():  # the start reads the newest checkpoint up to four times: hash it once
                result = _train(cfg, Path(run_dir), resume, rt, stop, progress)
        finally:
            stop.uninstall()
    finally:
        if watch is not None:
            watch.stop()
    # only a healthy group is torn down: destroying one whose peer died can hang or abort
    if own_rt:
        shutdown_runtime(rt)
    return result


def _force_with_nothing_to_train(comm: Comm, config_due: bool, start: int, cfg: Config, resumed: Any,
                                 h: str) -> bool:
    """``--resume force`` onto a config that would train no further round: refused (its summary
    would describe models it never trained), unless the newest checkpoint is already the new
    config's (a run stopped between its final checkpoint and writing config.yaml): then True,
    on rank 0, which finishes the run. Rank 0 decides (only it knows ``config_due``); every
    rank learns it."""
    verdict = None
    if comm.rt.is_main and config_due and start >= cfg.train.rounds:
        verdict = "finish" if resumed is not None and resumed.config_hash == h else "refuse"
    verdict = comm.broadcast_object(verdict)
    if verdict == "refuse":
        raise CheckpointError(f"--resume force: the run has trained {start} rounds and the new config asks for "
                              f"{cfg.train.rounds}, so nothing would be trained under it; raise train.rounds to "
                              f"continue, or use --resume none to start over")
    return verdict == "finish" and comm.rt.is_main


def _finished_summary(run_dir: Path, hashes: tuple[str, ...]) -> tuple[dict[str, Any] | None, bool]:
    """The run's summary.json when this version of the results wrote it for this config
    (``hashes[0]``) or for this run under an earlier config file (``hashes[1:]``), carrying the
    current hash; and whether it must be rewritten for that hash (config.yaml was). (None,
    False) when there is none to keep."""
    kept = _read_json(run_dir / "summary.json")
    if not (isinstance(kept, dict) and kept.get("config_hash") in hashes
            and kept.get("results_version") == RESULTS_VERSION):
        return None, False
    return {**kept, "config_hash": hashes[0]}, kept["config_hash"] != hashes[0]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _warn_if_eval_is_stale(run_dir: Path, result: dict[str, Any]) -> None:
    """An eval.json of earlier models (a run extended since) is the user's to redo, not
    ours to delete: say so."""
    earlier = _read_json(run_dir / "eval.json")
    if isinstance(earlier, dict) and earlier.get("model_hashes") != result.get("model_hashes"):
        log.warning("%s/eval.json describes earlier models (round %s); run `cafedist eval %s` again",
                    run_dir, earlier.get("round"), run_dir)


#: how long a rank waits to see rank 0's token in the run directory (a network file system may
#: show a new file to other nodes only after its attribute cache expires)
_SAME_DIR_WAIT_S = 60.0
_SAME_DIR_FILE = ".ranks-token"


def same_run_dir(comm: Comm, run_dir: Path, wait_s: float) -> None:
    """Every rank must write into the folder rank 0 holds: rank 0 puts a fresh token there and
    every rank reads it back. A relative --out under different working directories, another
    --out per rank or node-local folders of one name would each split a checkpoint's shards
    across folders (every checkpoint broken) or resume a rank from another run's shards."""
    if comm.rt.world_size == 1:
        return
    token = secrets.token_hex(16) if comm.rt.is_main else None
    if token is not None:
        write_text_atomic(run_dir / _SAME_DIR_FILE, token)
    token = comm.broadcast_object(token)
    seen, deadline = None, time.monotonic() + wait_s
    while not comm.rt.is_main:
        try:
            seen = (run_dir / _SAME_DIR_FILE).read_text()
        except OSError:
            seen = None
        if seen == token or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    ok = comm.all_gather_object(comm.rt.is_main or seen == token)
    if comm.rt.is_main:
        (run_dir / _SAME_DIR_FILE).unlink(missing_ok=True)
    bad = [r for r, good in enumerate(ok) if not good]
    if bad:
        raise DistError(f"rank(s) {bad} do not see the run directory rank 0 writes ({run_dir.resolve()}): "
                        f"--out must name one folder on a file system every rank shares (a relative --out "
                        f"resolves against each rank's working directory)")


def _agree(comm: Comm, error: str | None) -> None:
    """Every rank raises if any rank hit a (user-facing) error at start-up."""
    errors = [e for e in comm.all_gather_object(error) if e]
    if errors:
        raise CafeError(errors[0])


def _agreed(comm: Comm, step: Any) -> Any:
    """Run ``step()`` on this rank; if it raised a user-facing error on any rank, raise it on every rank."""
    result, err = None, None
    try:
        result = step()
    except CafeError as exc:
        err = str(exc)
    _agree(comm, err)
    return result


def _train(cfg: Config, run_dir: Path, resume: str, rt: Runtime, stop: StopFlag, progress: bool) -> RunResult:
    comm = Comm(rt)
    h = config_hash(cfg)
    # --resume decides collectives (whether a checkpoint is loaded): every rank must agree too
    hashes = comm.all_gather_object((h, resume))
    if len(set(hashes)) > 1:
        bad = [r for r, x in enumerate(hashes) if x != hashes[0]]
        what = "config" if len({x[0] for x in hashes}) > 1 else "--resume"
        raise DistError(f"{what} differs between ranks: rank(s) {bad} disagree with rank 0 "
                        f"(same config file, overrides and flags on every rank?)")
    lock = RunLock(run_dir) if rt.is_main else None

    def check_run_dir() -> None:  # read-only
        if rt.is_main:
            check_paths(cfg, run_dir)
            plan_run_dir(cfg, run_dir, resume)

    earlier: list[str] = []  # rank 0: the hash this run's checkpoints carry under an earlier config file

    def take_lock() -> None:  # the run is ours from here on (the lock file is the first write)
        if rt.is_main:
            lock.acquire()
            found = earlier_hash(cfg, run_dir)  # before config.yaml is rewritten
            if found is not None and found != h:
                earlier.append(found)

    def take_run_dir() -> bool:  # what the plan does to the directory: once every check has passed
        return prepare_run_dir(cfg, run_dir, resume) if rt.is_main else False

    # validate everything before the run directory is touched: paths and what the directory
    # holds (rank 0), then store, model and algorithm (every rank, building the run)
    _agreed(comm, check_run_dir)
    run = _agreed(comm, lambda: build_run(cfg, rt, run_dir=run_dir))
    metrics = None
    try:
        trainer = Trainer(run)
        ckpt = CheckpointDir(run_dir)
        _agreed(comm, take_lock)
        # before anything of an earlier run is moved or rewritten; rank 0 waits in a collective
        # meanwhile: well within dist.timeout_s
        _agreed(comm, lambda: same_run_dir(comm, run_dir, min(cfg.dist.timeout_s / 2, _SAME_DIR_WAIT_S)))
        config_due = _agreed(comm, take_run_dir)
        # the trainer's collectives: their bytes count in the wire_bytes of the round that follows
        resumed = _agreed(comm, lambda: load_checkpoint(ckpt, trainer.comm, run.pool, run.algo, run.shared,
                                                        config_hash=h, resume=resume, also_accept=tuple(earlier))) \
            if resume != "none" else None
        start = resumed.next_round if resumed is not None else 0
        if _force_with_nothing_to_train(comm, config_due, start, cfg, resumed, h):
            # the new config's final checkpoint exists; only its config.yaml was never written
            write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
            config_due = False
        metrics = MetricsLog(run_dir, tensorboard=rt.is_main) if rt.is_main else None
        if metrics is not None:
            metrics.truncate_after(start - 1)
        bar = Progress(cfg.train.rounds, start=start, enabled=progress and rt.is_main)
        about = _about_the_run(cfg, rt, resumed, comm)
        t0 = time.perf_counter()
        last_done = start - 1
        stopped = False
        for rnd in range(start, cfg.train.rounds):
            record = trainer.run_round(rnd)
            last_done = rnd
            record["world_size"] = rt.world_size
            record["clients_per_rank"] = trainer.rows.counts
            if metrics is not None:
                metrics.append(record)
            acc = record.get("acc_per_exit")
            bar.update(rnd + 1, f"last-exit acc {acc[-1]:.3f}" if acc else "")
            want_stop = trainer.rows.sum_int(1 if stop.requested else 0) > 0
            every = cfg.checkpoint.every
            if want_stop or rnd == cfg.train.rounds - 1 or (every and (rnd + 1) % every == 0):
                save_checkpoint(ckpt, trainer.comm, run.pool, run.algo, run.shared, rnd, config_hash=h,
                                keep=cfg.checkpoint.keep, about=about,
                                before_commit=lambda r=rnd: maybe_fault("checkpoint", r, rt.rank))
                if config_due:  # --resume force: the new config now has a checkpoint of its own
                    write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
                    config_due = False
                if not want_stop and rnd < cfg.train.rounds - 1:
                    # a signal that came while the checkpoint was written: this one is current, stop
                    # now rather than after another round (a preemption's grace may not last it)
                    want_stop = trainer.rows.sum_int(1 if stop.requested else 0) > 0
            if want_stop and rnd < cfg.train.rounds - 1:
                stopped = True
                if rt.is_main:
                    log.warning("stop signal received: checkpoint of round %d written, exiting for requeue", rnd)
                break
        result = None
        # nothing trained now: rank 0 keeps the summary of the run's training (its wall time);
        # every rank must agree, as the final evaluation below is collective
        kept, rehash = _finished_summary(run_dir, (h, *earlier)) \
            if rt.is_main and not stopped and start >= cfg.train.rounds else (None, False)
        if comm.broadcast_object(kept is not None):
            result = kept
            if rehash:
                write_json_atomic(run_dir / "summary.json", kept)
        elif not stopped:
            records = metrics.read() if metrics is not None else []
            # a resumed run also spent the rounds that earlier sessions trained (their metrics rows)
            earlier_wall = sum(float(r.get("seconds", 0.0)) for r in records if r["round"] < start)
            result = summary(run, trainer.rows, h, records, earlier_wall + time.perf_counter() - t0,
                             trainer.final_evaluation, results_version=about["results_version"])
            if result is not None:
                write_json_atomic(run_dir / "summary.json", result)
                _warn_if_eval_is_stale(run_dir, result)
        return RunResult(last_round=last_done, stopped=stopped, summary=result)
    finally:
        if metrics is not None:
            metrics.close()
        close_run(run)
        if lock is not None:
            lock.release()
