"""Starting a run, on every rank: checks that every rank agrees, the run directory claimed
(rank 0: the lock, the plan carried out) and shared (every rank sees rank 0's folder), and
what the run's checkpoints record about it.

Start-up errors are user-facing (:class:`~cafedist.errors.CafeError`) on one rank or several;
:func:`agreed` raises them on every rank, so that no rank waits in a collective for a rank
that has already stopped.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path
from typing import Any, Callable

import torch

from cafedist import RESULTS_VERSION, provenance
from cafedist.algorithms import get_algorithm
from cafedist.config import Config, dump_config, read_run_config, run_identity
from cafedist.config import config_hash as hash_of_config
from cafedist.data.store import Store
from cafedist.distributed.comm import Comm
from cafedist.distributed.runtime import Runtime
from cafedist.errors import CafeError, CheckpointError, DistError
from cafedist.fsutil import write_text_atomic
from cafedist.run.checkpoint import CheckpointDir, Resumed
from cafedist.run.residency import remove_parked_state
from cafedist.rundir import RunLock, clear_pending_config, move_aside, outputs_lock, record_start, start_token
from cafedist.train.preflight import RunDirPlan, check_data_paths, check_paths, earlier_hashes, plan_run_dir

log = logging.getLogger("cafedist")


#: settings a rank may hold for itself: where it finds its data, where its parked clients live,
#: its device (e.g. ``--device cuda:$LOCAL_RANK``); every other one must be the same on every rank,
#: also those that do not change results (``checkpoint.every`` and ``train.diagnostics`` decide
#: collectives: a rank that disagrees would wait in one the others never enter)
PER_RANK_FIELDS = ("data.root", "data.store", "data.cache_dir", "train.resident_clients", "train.client_state",
                   "dist.device")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def check_ranks_agree(comm: Comm, cfg: Config, resume: str) -> None:
    """Every rank runs the same config (but for :data:`PER_RANK_FIELDS`) with the same
    ``--resume`` (which decides collectives: whether a checkpoint is loaded), or every rank
    raises DistError naming the ranks and the settings that differ."""
    seen = comm.all_gather_object((hash_of_config(cfg, ignore=PER_RANK_FIELDS), resume))
    if len(set(seen)) > 1:
        bad = [r for r, x in enumerate(seen) if x != seen[0]]
        if len({x[0] for x in seen}) > 1:
            fields = {k: v for k, v in _flat(cfg.to_dict()).items()
                      if not any(k == f or k.startswith(f + ".") for f in PER_RANK_FIELDS)}
            every = comm.all_gather_object(fields)  # (small) so that every rank names the same settings
            names = sorted({k for other in every[1:] for k in other.keys() | every[0].keys()
                            if other.get(k) != every[0].get(k)})
            what = "config" + (f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else "")
        else:
            what = "--resume"
        raise DistError(f"{what} differs between ranks: rank(s) {bad} disagree with rank 0 "
                        f"(same config file, overrides and flags on every rank?)")


def check_ranks_share_data(comm: Comm, store: Store) -> None:
    """Every rank's store, wherever it lies (:data:`PER_RANK_FIELDS`), holds the data of rank 0's
    (:meth:`~cafedist.data.store.Store.data_digest`), or every rank raises DistError naming the
    ranks whose store differs and where it lies. Rank 0's check of the source files and the
    data its checkpoints record then hold for every rank."""
    mine = agreed(comm, store.data_digest)  # an unreadable store stops every rank, not only its own
    seen = comm.all_gather_object((mine, str(store.path.absolute())))
    where: dict[str, list[int]] = {}
    for rank, (digest, path) in enumerate(seen):
        if digest != seen[0][0]:
            where.setdefault(path, []).append(rank)
    if where:
        stores = " and ".join(f"rank{'s' * (len(r) > 1)} {', '.join(map(str, r))}'s store ({path})"
                              for path, r in where.items())
        verb = "hold" if len(where) > 1 else "holds"
        raise DistError(f"data differs between ranks: {stores} {verb} other data than rank 0's store ({seen[0][1]}); "
                        f"every rank's store (data.store, data.cache_dir) must hold the same data as rank 0's: a "
                        f"copy of it, or one built by `cafedist prepare` from the same files with the same partition")


def check_run_dir(cfg: Config, run_dir: Path, resume: str, is_main: bool) -> None:
    """Read-only: the paths, and (rank 0) what the run directory holds, allow this run. Every
    rank checks its own data paths (they may differ between ranks: :data:`PER_RANK_FIELDS`)."""
    if is_main:
        check_paths(cfg, run_dir)
        plan_run_dir(cfg, run_dir, resume)
    else:
        check_data_paths(cfg)


def take_lock(lock: RunLock | None, cfg: Config, run_dir: Path, config_hash: str) -> tuple[str, ...]:
    """Rank 0 (the one holding a ``lock``): take the run's lock — the run is ours from here on,
    the lock file is its first write — and return the hash this run's checkpoints carry under
    an earlier config file (read before config.yaml is rewritten), if any; () elsewhere."""
    if lock is None:
        return ()
    lock.acquire()
    return tuple(h for h in earlier_hashes(cfg, run_dir) if h != config_hash)


def write_config(cfg: Config, run_dir: Path) -> None:
    """Write the resolved config to ``run_dir/config.yaml`` (and drop a ``--resume force``
    attempt's record of it pending: it is config.yaml's now, or that attempt was killed)."""
    write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
    clear_pending_config(run_dir)


#: the run directories (resolved) whose plan this process has carried out: see :func:`prepared_here`
_PREPARED: set[Path] = set()


def prepared_here(run_dir: str | Path) -> bool:
    """Whether this process has carried out ``run_dir``'s plan (:func:`prepare_run_dir`). Until
    then a ``--resume none`` has moved nothing aside, so a job requeued before it must start
    over as asked, not resume the earlier run; after it, resume (:mod:`cafedist.submit`)."""
    return Path(run_dir).resolve() in _PREPARED


def prepare_run_dir(cfg: Config, run_dir: Path, resume: str) -> bool:
    """Rank 0, with the run's lock held and every input validated: carry out the run-directory plan.

    Moves an earlier run aside (``--resume none``, which then records who started the run over:
    :func:`~cafedist.rundir.record_start`; under any ``--resume``, finishes such a move a kill
    interrupted) and writes ``config.yaml``, except under
    ``--resume force`` onto a different config: then the old ``config.yaml`` stays until the
    first new round is checkpointed. Returns whether that write is still due.
    """
    plan = plan_run_dir(cfg, run_dir, resume)  # again, under the lock: the directory may have changed
    if plan is RunDirPlan.ASIDE:
        # not while an eval or compare writes results about this run's models (they would land
        # in the new run)
        with outputs_lock(run_dir, advice="wait for it to end, then start over with --resume none"):
            moved = move_aside(run_dir)
        if resume == "none":  # else it finished a move a kill interrupted, and said so
            log.warning("--resume none: moved the previous run in %s to %s", run_dir, moved)
    if resume == "none":  # before config.yaml: a restart that finds its token continues from here
        record_start(run_dir, start_token())
    _PREPARED.add(run_dir.resolve())
    # scratch of killed sessions; no other process writes here while the lock is held
    CheckpointDir(run_dir).remove_stale_staging()
    remove_parked_state(run_dir)
    if plan is RunDirPlan.DEFER:
        log.warning("--resume force: %s/config.yaml keeps the old config until the first new checkpoint", run_dir)
        return True
    write_config(cfg, run_dir)
    return False


def about_the_run(cfg: Config, rt: Runtime, resumed: Resumed | None, comm: Comm, store: Store) -> dict[str, Any]:
    """What every checkpoint's manifest records about the run (:meth:`CheckpointDir.commit`),
    carried over from the checkpoint a resume restored: the results version is the oldest of
    the code that trained it (a run finished by newer code is still partly the older code's,
    and compare retrains it), the CPU thread count that of its first session, ``environments``
    every distinct software and hardware stack it trained under (:mod:`cafedist.provenance`),
    the first first, ``rounds`` and ``rounds_changes`` (:func:`_with_rounds_change`), and of
    ``store`` its ``partition`` (params) and ``store_data``
    (:meth:`~cafedist.data.store.Store.data_digest`, every rank's since
    :func:`check_ranks_share_data`), which a resume and eval check. Warns when
    a resume mixes any of them in a way that changes results (rank 0 decides, every rank learns it)."""
    threads = torch.get_num_threads() if rt.device.type == "cpu" else None
    machines = comm.all_gather_object(provenance.machine(rt.device))
    restored = (resumed.manifest or {}) if resumed is not None and resumed.path is not None else None
    version, first, environments = RESULTS_VERSION, threads, None
    if rt.is_main:
        now = provenance.environment(provenance.software(), machines)
        environments = _with_environment(restored.get("environments") if restored is not None else None, now)
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
        changed = provenance.result_differences(environments[0], now)
        if changed:
            log.warning("resumed on another software or hardware stack than this run began on (%s): its results "
                        "will not match an uninterrupted run's bit for bit (summary.json lists every stack under "
                        "'environments')", "; ".join(changed))
    rounds_changes = _with_rounds_change(cfg, resumed) if rt.is_main and restored is not None else []
    version, first, environments, rounds_changes = comm.broadcast_object((version, first, environments,
                                                                          rounds_changes))
    return {"run_identity": run_identity(cfg), "algorithm": cfg.algorithm.name,
            "store": str(cfg.data.store_path(cfg.seed).resolve()), "results_version": version,
            **({"cpu_threads": first} if first is not None else {}), "environments": environments,
            "rounds": cfg.train.rounds, "rounds_changes": rounds_changes, "partition": store.params,
            "store_data": store.data_digest()}  # every rank's is rank 0's: check_ranks_share_data


def _with_rounds_change(cfg: Config, resumed: Resumed) -> list[dict[str, Any]]:
    """Rank 0, on a resume: the run's record of ``train.rounds`` changed by ``--resume force``
    (the restored manifest's ``rounds_changes``), with this session's change added when it makes
    one after trained rounds, and warned of when the algorithm used the old total."""
    manifest = resumed.manifest or {}
    recorded = manifest.get("rounds_changes")
    changes = [c for c in recorded if isinstance(c, dict)] if isinstance(recorded, list) else []
    if manifest.get("rounds") == cfg.train.rounds:  # an ordinary resume: config.yaml need not be read again
        return changes
    before = _trained_under(cfg, resumed)
    done = resumed.next_round
    if before is None or before[0] == cfg.train.rounds or done == 0:
        return changes
    rounds, params = before
    depended = get_algorithm(cfg.algorithm.name).rounds_dependence(params, rounds, done, cfg.train.rounds)
    if depended:
        log.warning("--resume force: train.rounds changes from %d to %d after %d trained rounds, and what they did "
                    "depended on the old total: %s; so this run will differ from a run trained for %d rounds from "
                    "the start (--resume none trains one here; checkpoints record this under 'rounds_changes')",
                    rounds, cfg.train.rounds, done, "; ".join(depended), cfg.train.rounds)
    return changes + [{"after_round": done - 1, "from": rounds, "to": cfg.train.rounds, "depended": depended}]


def _trained_under(cfg: Config, resumed: Resumed) -> tuple[int, Any] | None:
    """(``train.rounds``, algorithm parameters) the restored checkpoint was trained under: the
    run's config.yaml when it is that checkpoint's config (as under ``--resume force``, which
    rewrites it only after the first new checkpoint), else the rounds its manifest records with
    this config's parameters; None when neither tells (a checkpoint of older code)."""
    manifest = resumed.manifest or {}
    try:
        old = read_run_config(resumed.path.parent.parent / "config.yaml")  # RUN_DIR/checkpoints/round_N
    except (CafeError, OSError):
        old = None
    if old is not None and (manifest.get("run_identity") == run_identity(old)
                            or manifest.get("config_hash") == hash_of_config(old)):
        return old.train.rounds, old.algorithm_params()
    rounds = manifest.get("rounds")
    return (rounds, cfg.algorithm_params()) if isinstance(rounds, int) else None


def _with_environment(recorded: Any, now: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's stacks (a manifest's ``environments``; None or malformed: none yet) with this
    session's added when it is a new one. Hosts do not make a stack new: a requeued job lands
    on other nodes of the same cluster, and each would otherwise add an entry."""
    known = [e for e in recorded if isinstance(e, dict)] if isinstance(recorded, list) else []
    def stack(env: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in env.items() if k != "hosts"}
    return known if any(stack(e) == stack(now) for e in known) else known + [now]


def force_with_nothing_to_train(comm: Comm, config_due: bool, start: int, cfg: Config, resumed: Any,
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


#: how long a rank waits to see rank 0's token in the run directory (a network file system may
#: show a new file to other nodes only after its attribute cache expires)
SAME_DIR_WAIT_S = 60.0
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


def agree(comm: Comm, error: str | None) -> None:
    """Every rank raises if any rank hit a (user-facing) error at start-up."""
    errors = [e for e in comm.all_gather_object(error) if e]
    if errors:
        raise CafeError(errors[0])


def agreed(comm: Comm, step: Callable[[], Any]) -> Any:
    """Run ``step()`` on this rank; if it raised a user-facing error (or an OSError naming a
    path) on any rank, raise it on every rank."""
    result, err = None, None
    try:
        result = step()
    except CafeError as exc:
        err = str(exc)
    except OSError as exc:
        if exc.filename is None:
            raise
        # a path of this rank the OS refused (as the command line reports it): the others must
        # learn it too, not wait for this rank in the next collective
        err = f"{exc.filename}: {exc.strerror or type(exc).__name__}"
    agree(comm, err)
    return result

