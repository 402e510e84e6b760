"""One writer per run directory, and starting over without deleting anything.

:class:`RunLock` is an advisory ``flock`` on ``RUN_DIR/run.lock``, taken by rank 0 of
``cafedist train`` for the whole run and released by the kernel when the process ends, however
it ends. The file records the holder (``host pid``) so that a refused second writer can say who
holds the run, and so that a run that was killed can be recognised: the record of a holder that
no longer runs is a stale lock, taken over with a message. ``prepare --describe`` reads only
and takes no lock.

The same kind of lock on ``RUN_DIR/outputs.lock`` (:data:`OUTPUTS_LOCK_NAME`) guards what is
written *about* a run's models while training may go on: ``cafedist eval`` and ``compare
--budget`` hold it from the models loaded to their outputs written (a second one waits), and
``--resume none`` takes it to move the run aside, so an eval never writes the old run's results
into the new one.

:func:`move_aside` is what ``--resume none`` does to an existing run: its files move into
``RUN_DIR/previous-<timestamp>/`` (renames within the directory, nothing is copied or deleted),
with every folder ``cafedist export`` wrote directly inside it (it describes the run's models).
Other files of the user's stay: the directory may be a folder of theirs holding other things.
The move is one rename per entry, so a kill can land between two: it records first what it
moves where (:data:`MOVING_NAME`), the next ``train`` of the directory (any ``--resume``)
finishes it into the same folder before anything else, and the readers see a run moving aside
(:func:`unfinished_move`) rather than a half of one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cafedist.errors import CafeError
from cafedist.fsutil import fsync_dir, write_json_atomic, write_text_atomic

log = logging.getLogger("cafedist")

LOCK_NAME = "run.lock"
OUTPUTS_LOCK_NAME = "outputs.lock"
PREVIOUS_PREFIX = "previous-"
#: the record of a move aside not finished yet (:func:`move_aside`), in the run directory:
#: ``{"into": "previous-<timestamp>", "names": [...]}``, written before the first rename and
#: removed once every name has moved
MOVING_NAME = ".moving-aside"
#: who began the run in the directory with ``--resume none`` (:func:`record_start`), read when
#: Slurm restarts the job (:func:`started_by_this_job`: the sbatch templates, ``cafedist submit``)
START_TOKEN_NAME = ".start-token"
#: a live ``--resume force`` attempt's own ``train.rounds`` and ``checkpoint.every`` while
#: config.yaml keeps the old config (:func:`record_pending_config`), for ``cafedist status``
PENDING_CONFIG_NAME = ".config-pending.json"
#: what a run directory holds besides the lock and earlier runs moved aside: what train
#: writes, what eval writes (with --budget: budget.csv, budget.png and each budget's own in
#: budget/; conflict.png with the conflict diagnostic) and compare's kept budget results
#: (budgets.json). Not the logs of
#: every session in the directory, which a session starting over writes to as it does so:
#: compare's train.log (the session's header is appended first) and submit's submitit/.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "tensorboard", "eval.json",
             "accuracy_vs_macs.png", "conflict.png", "budget.csv", "budget.png", "budget", "budgets.json")
#: what ``cafedist export RUN --out DIR`` writes in DIR besides the clients' folders
#: (cafedist/deploy/export.py): a folder holding both is an export
EXPORT_FILES = ("export.json", "early_exit.py")


class RunDirBusy(CafeError):
    """Another live process holds the run directory's lock."""


def _holder_text(raw: str) -> str:
    parts = raw.split()
    return f"pid {parts[1]} on {parts[0]}" if len(parts) >= 2 else "an unknown process"


def _holder_alive(raw: str) -> bool | None:
    """Whether the recorded holder still runs: None when it cannot be told (another host)."""
    parts = raw.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    if parts[0] != socket.gethostname():
        return None
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive advisory lock on a run directory (``with RunLock(run_dir):`` or acquire/release).

    ``name``: the lock file (``run.lock``: the run's one writer; ``outputs.lock``: what is
    written about its models); ``holder`` and ``advice`` word the refusal of a second taker."""

    def __init__(self, run_dir: str | os.PathLike, name: str = LOCK_NAME, holder: str = "cafedist train",
                 advice: str = "wait for it to end or use another --out"):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / name
        self.holder, self.advice = holder, advice
        self._fd: int | None = None
        #: "HOST PID TIME" of the session holding it (written into the lock file): unique per session
        self.record: str | None = None

    def acquire(self, wait: bool = False) -> "RunLock":
        """Create the run directory if needed and take the lock, or raise :class:`RunDirBusy`
        (``wait``: block until the holder releases it instead, saying so once)."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CafeError(f"{self.path}: cannot create the run's lock file ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            previous = os.pread(fd, 256, 0).decode("utf-8", "replace")
            busy = exc.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN)
            if busy and wait:
                log.info("%s is in use by another %s (%s): waiting for it", self.run_dir, self.holder,
                         _holder_text(previous))
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
            else:
                os.close(fd)
                if not busy:
                    raise CafeError(f"{self.path}: cannot lock the run directory ({exc.strerror})") from None
                raise RunDirBusy(f"{self.run_dir} is in use by another {self.holder} ({_holder_text(previous)}, "
                                 f"lock {self.path}): {self.advice}") from None
        previous = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
        if previous:
            # the kernel drops a flock when its holder dies; a record left behind means it was killed
            alive = _holder_alive(previous)
            state = "no longer running" if alive is False else "not holding it"
            log.warning("%s: taking over the stale lock of %s (%s; its run was interrupted)", self.path,
                        _holder_text(previous), state)
        os.ftruncate(fd, 0)
        self.record = f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}"
        os.pwrite(fd, f"{self.record}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the holder record and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty record: the run ended, nothing stale
        finally:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder_record(run_dir: str | os.PathLike, name: str = LOCK_NAME) -> str | None:
    """The record (``"HOST PID TIME"``, :attr:`RunLock.record`) of ``run_dir``'s lock holder
    as far as it can be told without taking the lock (a probe that took the lock could make a
    train starting that instant refuse); None when the record is empty (no holder, or one that
    ended), not one train writes, or names a process on this host that is gone."""
    try:
        raw = (Path(run_dir) / name).read_text("utf-8", "replace").strip()
    except OSError:
        return None
    parts = raw.split()
    if len(parts) < 2 or not parts[1].isdigit() or _holder_alive(raw) is False:
        return None
    return raw


def holder_text(raw: str) -> str:
    """A holder's record (:func:`holder_record`) in words: ``"pid N on HOST"``, with a note
    where the holder runs on another host and may have been killed."""
    return _holder_text(raw) + ("" if _holder_alive(raw) else ", another host: it may also have been killed")


def live_holder(run_dir: str | os.PathLike, name: str = LOCK_NAME) -> str | None:
    """Who holds ``run_dir``'s lock now (:func:`holder_text` of :func:`holder_record`); None
    when none does."""
    raw = holder_record(run_dir, name)
    return None if raw is None else holder_text(raw)


def outputs_lock(run_dir: str | os.PathLike, advice: str = "wait for it to end") -> RunLock:
    """The lock of what is written about a run's models (:data:`OUTPUTS_LOCK_NAME`), held by
    eval, compare --budget and an export into the run directory, taken by ``--resume none`` to
    move the run aside."""
    return RunLock(run_dir, OUTPUTS_LOCK_NAME, holder="cafedist eval, export or compare --budget", advice=advice)


def has_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds output of an earlier run (anything :data:`RUN_FILES` names)."""
    return any((run_dir / name).exists() for name in RUN_FILES)


def is_export(folder: Path) -> bool:
    """Whether ``folder`` is one ``cafedist export`` wrote (it holds :data:`EXPORT_FILES`)."""
    return all((folder / name).is_file() for name in EXPORT_FILES)


def run_outputs(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` that belong to the run it holds: the :data:`RUN_FILES` present
    and the folders :func:`is_export` (an export kept beside the run describes its models).
    Not hidden names (another export may be writing one now) nor earlier runs moved aside."""
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    exports = sorted(p.name for p in run_dir.iterdir()
                     if p.name not in present and not p.name.startswith((".", PREVIOUS_PREFIX))
                     and is_export(p))
    return present + exports


def move_aside(run_dir: Path) -> Path | None:
    """Move the run in ``run_dir`` (its :func:`run_outputs`) into ``run_dir/previous-<timestamp>/``;
    returns it (None: no run to move). A move a kill interrupted is finished first, into its
    own folder (returned when it was all there was to move).

    Only renames inside ``run_dir``: atomic per entry, nothing copied, nothing deleted. Call it
    with the run's lock held.
    """
    finished = _finish_move(run_dir)
    if finished is not None:
        log.warning("%s: finished moving the previous run into %s (a --resume none was stopped partway through "
                    "moving it)", run_dir, finished)
    if not has_run(run_dir):  # an export alone is no run to start over from
        return finished
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir / f"{PREVIOUS_PREFIX}{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = run_dir / f"{PREVIOUS_PREFIX}{stamp}-{n}"
    # the record first: a kill from here on leaves a move the next train finishes, not a run split in two
    write_json_atomic(run_dir / MOVING_NAME, {"into": target.name, "names": run_outputs(run_dir)})
    return _finish_move(run_dir)


def _moving(run_dir: Path) -> tuple[Path, list[str]] | None:
    """The folder and names :data:`MOVING_NAME` records (None: no move unfinished); a record
    cafedist did not write is a CafeError (nothing is moved by it)."""
    path = run_dir / MOVING_NAME
    try:
        record = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CafeError(f"{path}: unreadable record of a run being moved aside ({exc}); move the run's files "
                        f"yourself and remove it") from None
    def plain(name: object) -> bool:
        return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
    into, names = (record.get("into"), record.get("names")) if isinstance(record, dict) else (None, None)
    if not (plain(into) and str(into).startswith(PREVIOUS_PREFIX) and isinstance(names, list)
            and all(plain(n) for n in names)):
        raise CafeError(f"{path}: not a record of a run being moved aside that cafedist wrote; move the run's "
                        f"files yourself and remove it")
    return run_dir / str(into), [str(n) for n in names]


def _finish_move(run_dir: Path) -> Path | None:
    """Carry out the move :data:`MOVING_NAME` records, the names a kill left behind, and
    remove the record once they are all in place; returns the folder (None: no record)."""
    moving = _moving(run_dir)
    if moving is None:
        return None
    target, names = moving
    target.mkdir(exist_ok=True)
    for name in names:
        if not os.path.lexists(run_dir / name):  # moved before the kill
            continue
        if os.path.lexists(target / name):
            raise CafeError(f"{run_dir / name}: also in {target}, where the earlier run is being moved; keep one "
                            f"of them and remove {run_dir / MOVING_NAME}")
        os.replace(run_dir / name, target / name)
    fsync_dir(target)
    fsync_dir(run_dir)  # every rename durable before the record of what is left goes
    (run_dir / MOVING_NAME).unlink()
    fsync_dir(run_dir)
    return target


def unfinished_move(path: str | os.PathLike) -> str | None:
    """Where a run moving aside stands, for the readers of run directories: ``path`` is a run
    directory whose run is being moved into a ``previous-*`` folder, or that folder, and a
    ``--resume none`` (killed partway through, or still moving it) has not finished: a
    sentence saying so, else None. Neither half is a run to read."""
    path = Path(path)
    # the parent's record only for a previous-* folder: a broken record above a plain run is not its business
    for run_dir in (path, path.parent) if path.name.startswith(PREVIOUS_PREFIX) else (path,):
        moving = _moving(run_dir) if (run_dir / MOVING_NAME).exists() else None
        if moving is None or (run_dir != path and moving[0].name != path.name):
            continue
        holder = live_holder(run_dir)
        how = (f"as {holder} moves it" if holder else
               "a --resume none was stopped partway through; the next `cafedist train` of it finishes the move")
        where = f"its run is being moved aside into {moving[0].name}/" if run_dir == path else \
            f"the run in {run_dir} is being moved into it"
        return f"{path}: {where} ({how})"
    return None


def record_start(run_dir: Path, token: str | None) -> None:
    """``--resume none`` has moved any earlier run out of ``run_dir`` (rank 0, the lock held):
    record ``token`` (the starter's: :func:`start_token`) in :data:`START_TOKEN_NAME`, or,
    without one, remove an earlier starter's, so that the file never names a start it did not
    make. A restarted job continues the run only where the file holds its own token; one
    stopped before this point finds none, and starts over as it was asked to."""
    path = run_dir / START_TOKEN_NAME
    if token:
        write_text_atomic(path, token)
    else:
        path.unlink(missing_ok=True)


def slurm_job_token(environ: Mapping[str, str]) -> str:
    """The start token of the Slurm job whose variables ``environ`` holds, ``slurm-<job id>``:
    the token's one definition (slurm/_run.sh asks :func:`started_by_this_job`, and never forms
    it). Not the cluster's name: in a federation a requeued job may run on a sibling cluster
    under the same id, and a token it no longer matched would start its trained run over."""
    return f"slurm-{environ.get('SLURM_JOB_ID', '')}"


def start_token() -> str | None:
    """What :func:`record_start` records for this process: in a Slurm job, that job's token
    (:func:`slurm_job_token`); None outside Slurm. Taken from ``SLURM_JOB_ID``, which Slurm
    sets in the batch shell and in every step of the job (``sbatch --export=LIST`` or ``NONE``
    included), and which a job never inherits from the one it was submitted from; an array
    element's id is its own, and a requeue keeps it."""
    return slurm_job_token(os.environ) if os.environ.get("SLURM_JOB_ID") else None


def started_by(run_dir: str | os.PathLike, token: str) -> bool:
    """Whether the run in ``run_dir`` is one that ``token``'s starter started over
    (:func:`record_start`): its job, restarted, continues it rather than start over again."""
    try:
        return (Path(run_dir) / START_TOKEN_NAME).read_text("utf-8") == token
    except (OSError, UnicodeDecodeError):
        return False


def started_by_this_job(run_dir: str | os.PathLike) -> bool:
    """Whether this Slurm job started the run in ``run_dir`` over (:func:`started_by` with
    :func:`start_token`); False outside Slurm. What a restart of the job asks, under the sbatch
    templates (slurm/_run.sh) and ``cafedist submit`` alike."""
    token = start_token()
    return token is not None and started_by(run_dir, token)


@dataclass(frozen=True)
class PendingConfig:
    """What of a ``--resume force`` attempt's config its session trains by while config.yaml
    is still the old config's (:data:`PENDING_CONFIG_NAME`)."""

    rounds: int
    checkpoint_every: int


def record_pending_config(run_dir: Path, session: str, pending: PendingConfig) -> None:
    """Rank 0 of a ``--resume force`` attempt whose config.yaml is written only at its first
    checkpoint (the lock held; ``session``: its lock record): record what ``cafedist status``
    reads from config.yaml as this session's until then (:func:`clear_pending_config`). A kill
    leaves the file naming a session that holds no lock: :func:`pending_config` passes it over."""
    write_json_atomic(run_dir / PENDING_CONFIG_NAME, {"session": session, "rounds": pending.rounds,
                                                      "checkpoint_every": pending.checkpoint_every})


def clear_pending_config(run_dir: Path) -> None:
    """config.yaml is now the config of whoever trains the run: no attempt's record is pending."""
    (run_dir / PENDING_CONFIG_NAME).unlink(missing_ok=True)


def pending_config(run_dir: str | os.PathLike, session: str | None) -> PendingConfig | None:
    """The pending config (:func:`record_pending_config`) of the live session whose lock record
    is ``session`` (:func:`holder_record`); None without one, or where the file is another
    session's (a killed attempt's) or not one train writes."""
    if session is None:
        return None
    try:
        record = json.loads((Path(run_dir) / PENDING_CONFIG_NAME).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("session") != session:
        return None
    rounds, every = record.get("rounds"), record.get("checkpoint_every")
    if type(rounds) is not int or rounds <= 0 or type(every) is not int or every < 0:
        return None
    return PendingConfig(rounds, every)
