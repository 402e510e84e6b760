"""Training a run: every rank calls :func:`train`, which runs the rounds and writes the run.

:func:`train` checks and claims the run directory (:mod:`cafedist.train.startup`), builds
this rank's part of the run (:func:`cafedist.run.build.build_run`), resumes from the newest
valid checkpoint, runs the rounds (:class:`cafedist.train.round.Trainer`), appends each
round's record to ``metrics.jsonl``, checkpoints every ``checkpoint.every`` rounds, at the end
and on a stop signal (SIGTERM/SIGUSR1 before a Slurm requeue), and writes ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cafedist import RESULTS_VERSION
from cafedist.config import Config, config_hash
from cafedist.distributed.comm import Comm
from cafedist.distributed.runtime import (
    Runtime,
    forget_failure,
    init_runtime,
    report_failure,
    shutdown_runtime,
)
from cafedist.errors import CheckpointError, DistError
from cafedist.fsutil import write_json_atomic
from cafedist.parentwatch import guard_parent
from cafedist.run.build import Run, build_run, close_run
from cafedist.run.checkpoint import RESUME_MODES, CheckpointDir, load_checkpoint, save_checkpoint, verification_memo
from cafedist.run.metrics import MetricsLog
from cafedist.rundir import PendingConfig, RunLock, clear_pending_config, record_pending_config
from cafedist.train.faults import maybe_fault
from cafedist.train.progress import Progress
from cafedist.train.records import summary
from cafedist.train.round import Trainer
from cafedist.train.signals import StopFlag
from cafedist.train.startup import (
    SAME_DIR_WAIT_S,
    about_the_run,
    agreed,
    check_ranks_agree,
    check_ranks_share_data,
    check_run_dir,
    force_with_nothing_to_train,
    prepare_run_dir,
    same_run_dir,
    take_lock,
    write_config,
)

log = logging.getLogger("cafedist")


@dataclass
class RunResult:
    """What :func:`train` returns: the last completed round and whether a stop was requested."""

    last_round: int
    stopped: bool
    summary: dict[str, Any] | None


# ----------------------------------------------------------------------------- entry point
def train(cfg: Config, run_dir: str | Path, resume: str = "auto", rt: Runtime | None = None,
          progress: bool = True) -> RunResult:
    """Run (or resume) a training run; every rank calls this. Returns on every rank."""
    if resume not in RESUME_MODES:
        raise CheckpointError(f"--resume: expected auto, none or force, got {resume!r}")
    own_rt = rt is None
    watch = guard_parent()  # die with a launcher (writing nothing more), stop with a cafedist starter
    try:
        rt = rt or init_runtime(cfg.dist.backend, cfg.dist.device, cfg.dist.timeout_s, names="dist.")
        if rt.is_main:
            forget_failure()  # an earlier run's, in this process group
        stop = StopFlag().install()
        try:
            with verification_memo():  # the start reads the newest checkpoint up to four times: hash it once
                result = _train(cfg, Path(run_dir), resume, rt, stop, progress)
        except Exception as exc:
            if not isinstance(exc, DistError):  # a collective's DistError follows a failure, it is none
                report_failure(rt.rank, exc)  # for the peers this rank leaves in a collective
            raise
        finally:
            stop.uninstall()
    finally:
        if watch is not None:
            watch.stop()
    # only a healthy group is torn down: destroying one whose peer died can hang or abort
    if own_rt:
        shutdown_runtime(rt)
    return result



def _train(cfg: Config, run_dir: Path, resume: str, rt: Runtime, stop: StopFlag, progress: bool) -> RunResult:
    comm = Comm(rt)
    h = config_hash(cfg)
    check_ranks_agree(comm, cfg, resume)
    lock = RunLock(run_dir) if rt.is_main else None
    # validate everything before the run directory is touched: paths and what the directory
    # holds (rank 0), then store, model and algorithm (every rank, building the run)
    agreed(comm, lambda: check_run_dir(cfg, run_dir, resume, rt.is_main))
    run = agreed(comm, lambda: build_run(cfg, rt, run_dir=run_dir))
    session = None
    try:
        check_ranks_share_data(comm, run.store)  # each rank's own store: before the run directory is touched
        session = _Session(cfg, run_dir, run, comm, Trainer(run), CheckpointDir(run_dir), h, stop)
        earlier = agreed(comm, lambda: take_lock(lock, cfg, run_dir, h))
        # before anything of an earlier run is moved or rewritten; rank 0 waits in a collective
        # meanwhile: well within dist.timeout_s
        agreed(comm, lambda: same_run_dir(comm, run_dir, min(cfg.dist.timeout_s / 2, SAME_DIR_WAIT_S)))
        # what the plan does to the directory: once every check has passed
        session.config_due = agreed(comm, lambda: prepare_run_dir(cfg, run_dir, resume) if rt.is_main else False)
        # the trainer's collectives: their bytes count in the wire_bytes of the round that follows
        resumed = (agreed(comm, lambda: load_checkpoint(session.ckpt, session.trainer.comm, run.pool, run.algo,
                                                       run.shared, config_hash=h, resume=resume,
                                                       also_accept=earlier, algorithm=cfg.algorithm.name,
                                                       store=run.store))
                   if resume != "none" else None)
        start = resumed.next_round if resumed is not None else 0
        if force_with_nothing_to_train(comm, session.config_due, start, cfg, resumed, h):
            # the new config's final checkpoint exists; only its config.yaml was never written
            session.write_config()
        if session.config_due and lock is not None:  # what status shows of this session meanwhile
            record_pending_config(run_dir, lock.record, PendingConfig(cfg.train.rounds, cfg.checkpoint.every))
        session.open_metrics(start, lock.record if lock is not None else None)
        bar = Progress(cfg.train.rounds, start=start, enabled=progress and rt.is_main)
        about = about_the_run(cfg, rt, resumed, comm, run.store)
        t0 = time.perf_counter()
        last_done, stopped = session.train_rounds(start, about, bar)
        result = None if stopped else session.finish(start, (h, *earlier), about, time.perf_counter() - t0)
        return RunResult(last_round=last_done, stopped=stopped, summary=result)
    finally:
        if session is not None and session.config_due:  # ended before its first checkpoint: nothing pends
            clear_pending_config(run_dir)
        if session is not None and session.metrics is not None:
            session.metrics.close()
        close_run(run)
        if lock is not None:
            lock.release()


@dataclass
class _Session:
    """This rank's session of a run, from the run built to its summary written: the rounds,
    their records and checkpoints, and the summary. ``config_due``: config.yaml is still to
    be written at the next checkpoint (``--resume force`` onto another config). ``comm``: for
    collectives outside rounds (the trainer's own count in the next round's ``wire_bytes``)."""

    cfg: Config
    run_dir: Path
    run: Run
    comm: Comm
    trainer: Trainer
    ckpt: CheckpointDir
    config_hash: str
    stop: StopFlag
    config_due: bool = False
    metrics: MetricsLog | None = None
    #: rank 0's lock record ("HOST PID TIME"), written into every row as ``session``: readers tell
    #: a resume's rounds (another machine, a warm-up) from the earlier sessions' by it
    session_tag: str | None = None
    #: seconds the newest checkpoint took to write, for the next round's row (``t_checkpoint``)
    checkpoint_seconds: float | None = None

    def write_config(self) -> None:
        """Write config.yaml (no longer due)."""
        write_config(self.cfg, self.run_dir)
        self.config_due = False

    def open_metrics(self, start: int, session_tag: str | None) -> None:
        """Rank 0: open metrics.jsonl, dropping the records of rounds from ``start`` on (a
        resume trains them again); ``session_tag`` names this session in its rows."""
        self.session_tag = session_tag
        if self.run.rt.is_main:
            self.metrics = MetricsLog(self.run_dir, tensorboard=True)
            self.metrics.truncate_after(start - 1)

    def _stop_requested(self) -> bool:
        """Whether a stop signal reached any rank (collective: every rank learns it)."""
        return self.trainer.rows.sum_int(1 if self.stop.requested else 0) > 0

    def train_rounds(self, start: int, about: dict[str, Any], bar: Progress) -> tuple[int, bool]:
        """Rounds ``start`` .. the last, each recorded and checkpointed as configured; on a stop
        signal, the round in progress is finished and checkpointed and the loop ends. Returns
        (the last round trained, whether a stop ended it before the last round)."""
        cfg, rt = self.cfg, self.run.rt
        last_done = start - 1
        for rnd in range(start, cfg.train.rounds):
            record = self.trainer.run_round(rnd)
            last_done = rnd
            record["world_size"] = rt.world_size
            # this session's total: a --resume force attempt's, while config.yaml keeps the old one
            record["train_rounds"] = cfg.train.rounds
            record["clients_per_rank"] = self.trainer.rows.counts
            if self.session_tag is not None:
                record["session"] = self.session_tag
            if self.checkpoint_seconds is not None:  # the rows come first: a checkpoint's time goes in the next
                record["t_checkpoint"], self.checkpoint_seconds = self.checkpoint_seconds, None
            if self.metrics is not None:
                self.metrics.append(record)
            acc = record.get("acc_per_exit")
            bar.update(rnd + 1, f"last-exit acc {acc[-1]:.3f}" if acc else "")
            want_stop = self._stop_requested()
            last = rnd == cfg.train.rounds - 1
            every = cfg.checkpoint.every
            if want_stop or last or (every and (rnd + 1) % every == 0):
                t = time.perf_counter()
                self._checkpoint(rnd, about)
                self.checkpoint_seconds = round(time.perf_counter() - t, 6)
                if not want_stop and not last:
                    # a signal that came while the checkpoint was written: this one is current, stop
                    # now rather than after another round (a preemption's grace may not last it)
                    want_stop = self._stop_requested()
            if want_stop and not last:
                if rt.is_main:
                    log.warning("stop signal received: checkpoint of round %d written, exiting for requeue", rnd)
                return last_done, True
        return last_done, False

    def _checkpoint(self, rnd: int, about: dict[str, Any]) -> None:
        run, rt = self.run, self.run.rt
        save_checkpoint(self.ckpt, self.trainer.comm, run.pool, run.algo, run.shared, rnd,
                        config_hash=self.config_hash, keep=self.cfg.checkpoint.keep, about=about,
                        before_commit=lambda: maybe_fault("checkpoint", rnd, rt.rank))
        if self.config_due:  # --resume force: the new config now has a checkpoint of its own
            self.write_config()

    def finish(self, start: int, hashes: tuple[str, ...], about: dict[str, Any],
               seconds: float) -> dict[str, Any] | None:
        """The run's summary, written to summary.json (rank 0; None elsewhere): kept as it is when
        this session trained nothing (its wall time is the training's; ``hashes``: this
        config's and the run's under earlier config files), else computed from the records,
        with the ``seconds`` of this session plus those of rounds earlier sessions trained."""
        kept, rehash = _finished_summary(self.run_dir, hashes) \
            if self.run.rt.is_main and start >= self.cfg.train.rounds else (None, False)
        # every rank must agree, as the final evaluation below is collective
        if self.comm.broadcast_object(kept is not None):
            if rehash:
                write_json_atomic(self.run_dir / "summary.json", kept)
            return kept
        records = self.metrics.read() if self.metrics is not None else []
        # a resumed run also spent the rounds that earlier sessions trained (their metrics rows)
        earlier_wall = sum(float(r.get("seconds", 0.0)) for r in records if r["round"] < start)
        result = summary(self.run, self.trainer.rows, self.config_hash, records, earlier_wall + seconds,
                         self.trainer.final_evaluation, results_version=about["results_version"],
                         environments=about["environments"], rounds_changes=about.get("rounds_changes"))
        if result is not None:
            write_json_atomic(self.run_dir / "summary.json", result)
            _warn_if_eval_is_stale(self.run_dir, result)
        return result


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

