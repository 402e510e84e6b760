"""Checkpoints that survive SIGKILL at any instant and can be resumed on any number of ranks.

Layout of ``RUN_DIR/checkpoints/``::

    round_000010/               one directory per checkpoint (the round it completed)
        client_00000.pt         per client whose state changed since the previous checkpoint:
        ...                     model, optimizer and algorithm state
        server.pt               round, algorithm server state, the newest shared average
        MANIFEST.json           sha256 of every file, the shards it reuses from older
                                checkpoints ("refs"), world size that wrote it, config hash
    latest                      name of the newest complete checkpoint (written atomically)

Checkpoints are incremental: a client that did not change since the previous checkpoint
(partial participation leaves most of thousands untouched) is not written again; the manifest
references its shard in the older directory, with its sha256. A client never touched has no
shard: it resumes at its initial weights. ``checkpoint.keep`` prunes old checkpoints but
never a shard that a kept checkpoint references: such a directory loses its manifest and its
other files and stays as ``SHARDS_ONLY`` until nothing references it.

Writing is atomic: every rank writes its clients' shards into ``.round_000010.tmp/`` and
fsyncs them; rank 0 then writes ``server.pt`` and ``MANIFEST.json``, renames the directory
into place, updates ``latest`` and prunes old checkpoints. A directory without a verifying
manifest (its references included) is never used. Shards are keyed by client id, not rank,
so a run written by 4 ranks resumes on 2. Loading uses ``torch.load(weights_only=True)``:
no code runs from a checkpoint.

:func:`save_checkpoint` and :func:`load_checkpoint` do this for a rank's clients and the
algorithm's coordinator state; every rank calls them together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from cafedist.algorithms.base import Algorithm
from cafedist.config import config_hash as hash_of_config
from cafedist.config import read_run_config
from cafedist.distributed.comm import Comm
from cafedist.errors import CafeError, CheckpointError, RunDirError
from cafedist.fsutil import atomic_output, fsync_dir, write_json_atomic, write_text_atomic
from cafedist.run.residency import ClientPool
from cafedist.run.sharing import SharedParams
from cafedist.run.torch_files import save_torch_to

if TYPE_CHECKING:
    from cafedist.data.store import Store

log = logging.getLogger("cafedist")

_DIR_RE = re.compile(r"^round_(\d{6,})$")
SHARDS_ONLY = "SHARDS_ONLY"  # marker of a pruned directory kept for the shards others reference


# digests already computed within a :func:`verification_memo` scope, keyed by the file's
# identity; a context variable, so one thread's scope is not another's
_memo: ContextVar[dict[tuple[int, ...], str] | None] = ContextVar("cafedist_verification_memo", default=None)


@contextmanager
def verification_memo() -> Iterator[None]:
    """Within this block, a checkpoint file whose inode, size and times are unchanged since it
    was hashed is not hashed again: a run's start looks at its newest checkpoint up to four
    times (which run wrote it, then loading it). Committed files are never rewritten in place
    (a checkpoint is renamed into place whole), so a changed file is a changed identity."""
    token = _memo.set(_memo.get() if _memo.get() is not None else {})
    try:
        yield
    finally:
        _memo.reset(token)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (remembered inside a :func:`verification_memo` block)."""
    memo = _memo.get()
    if memo is None:
        return _hash_file(path)
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in memo:
        memo[key] = _hash_file(path)
    return memo[key]


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def round_of(path: Path) -> int:
    """The round of a checkpoint directory (its name matches ``_DIR_RE``)."""
    return int(_DIR_RE.match(path.name).group(1))


def checkpoint_name(round_idx: int) -> str:
    """Directory name of the checkpoint taken after ``round_idx`` completed."""
    return f"round_{round_idx:06d}"


def client_file(cid: int) -> str:
    """File name of client ``cid``'s shard in a checkpoint."""
    return f"client_{cid:05d}.pt"


def save_torch(obj: Any, path: Path) -> str:
    """torch.save atomically (temp + fsync + rename); returns the file's sha256. Streamed, not
    held in memory; a full disk raises ENOSPC naming ``path`` (:func:`save_torch_to`)."""
    with atomic_output(path, now=True) as tmp, open(tmp, "wb") as fh:  # a checkpoint is never deferred
        return save_torch_to(obj, fh, path)


def load_torch(path: Path) -> Any:
    """torch.load with ``weights_only=True`` and a clear error for unreadable files."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:  # verified a moment ago: removed since (eval beside a training run that pruned it)
        raise CheckpointError(f"{path}: removed while being read (if the run is training, it pruned this "
                              f"checkpoint meanwhile: try again)") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a corrupt file
        raise CheckpointError(f"{path}: cannot read checkpoint file ({type(exc).__name__})") from None


@dataclass
class CheckpointRef:
    """A checkpoint directory, verified (:meth:`CheckpointDir.verify`) unless read :meth:`unverified`."""

    path: Path
    round: int
    manifest: dict

    @classmethod
    def unverified(cls, path: Path) -> "CheckpointRef":
        """The checkpoint in ``path`` as its manifest describes it, its files not checked ({} for
        a manifest that cannot be read): for reading about a run without hashing its shards."""
        return cls(path, round_of(path), _read_manifest(path))


def _read_manifest(path: Path) -> dict:
    """A checkpoint's manifest, {} when unreadable or no JSON object (pruning, and status reading
    it unverified, must not fail on a broken one)."""
    try:
        manifest = json.loads((path / "MANIFEST.json").read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


class CheckpointDir:
    """Reads and writes the checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir) / "checkpoints"

    # ---------------------------------------------------------------- write
    def staging(self, round_idx: int) -> Path:
        """The temporary directory ranks write into for ``round_idx``."""
        return self.root / f".{checkpoint_name(round_idx)}.tmp"

    def begin(self, round_idx: int) -> Path:
        """Rank 0: (re)create an empty staging directory."""
        tmp = self.staging(round_idx)
        if tmp.exists():
            shutil.rmtree(tmp)  # left over from a write that was killed
        tmp.mkdir(parents=True)
        return tmp

    def remove_stale_staging(self) -> None:
        """Rank 0 at the start of a run, the run's lock held: staging directories of writes
        that were killed (a round checkpointed again replaces its own in :meth:`begin`, but a
        round the resumed run does not checkpoint, e.g. under another ``checkpoint.every``,
        left its directory for good)."""
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            name = path.name
            if name.startswith(".") and name.endswith(".tmp") and _DIR_RE.match(name[1:-4]) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)

    def write_client(self, round_idx: int, cid: int, shard: dict[str, Any]) -> tuple[str, str]:
        """Any rank: write one client's shard; returns (file name, sha256)."""
        name = client_file(cid)
        return name, save_torch(shard, self.staging(round_idx) / name)

    def commit(self, round_idx: int, server: dict[str, Any], files: dict[str, str], *,
               world_size: int, config_hash: str, keep: int, refs: dict[str, dict[str, str]] | None = None,
               about: dict[str, Any] | None = None) -> Path:
        """Rank 0, after every rank wrote its shards: manifest, rename, ``latest``, prune.
        ``refs``: shards reused from older checkpoints (file name -> {"dir", "sha256"});
        ``about``: what the manifest records about the run: ``run_identity`` (the config's
        :func:`~cafedist.config.run_identity`, which eval checks), ``store`` (the absolute
        path of the run's data store, where eval looks when the config's relative path does
        not lead there), ``results_version`` (the oldest :data:`~cafedist.RESULTS_VERSION` of
        the code that trained it), ``cpu_threads`` (the thread count of its first session
        on the CPU), ``environments`` (:mod:`cafedist.provenance`), ``rounds`` (the run's
        ``train.rounds``) and ``rounds_changes`` (what ``--resume force`` onto another total
        changed: :func:`cafedist.train.startup.about_the_run`), ``partition`` (the store's
        parameters, which ``--resume force`` checks without ``config.yaml``) and ``store_data``
        (:meth:`~cafedist.data.store.Store.data_digest`, which :func:`refusal` checks)."""
        tmp = self.staging(round_idx)
        files = dict(files)
        files["server.pt"] = save_torch(server, tmp / "server.pt")
        manifest = {"round": round_idx, "world_size": world_size, "config_hash": config_hash, **(about or {}),
                    "files": dict(sorted(files.items())), "refs": dict(sorted((refs or {}).items()))}
        write_json_atomic(tmp / "MANIFEST.json", manifest)
        fsync_dir(tmp)
        final = self.root / checkpoint_name(round_idx)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        write_text_atomic(self.root / "latest", final.name + "\n")
        self.prune(keep, newest=round_idx)
        return final

    def prune(self, keep: int, newest: int | None = None) -> None:
        """Delete all but the newest ``keep`` complete checkpoints, except the shards a kept
        one references (their directory is reduced to them, marked ``SHARDS_ONLY``).
        ``newest``: the round just committed; directories of later rounds are left as they are
        and take no kept place: they failed to verify when this run resumed from an older one
        (it would have resumed from them), and the one just committed must stay."""
        every = self._all_dirs()
        later = {p for p in every if newest is not None and round_of(p) > newest}
        dirs = [p for p in self.candidates() if p not in later]
        kept, needed = dirs[:keep], {}
        for path in kept:
            for name, ref in _read_manifest(path).get("refs", {}).items():
                needed.setdefault(ref["dir"], set()).add(name)
        for path in every:
            if path in kept or path in later:
                continue
            if path.name not in needed:
                shutil.rmtree(path, ignore_errors=True)
                continue
            (path / "MANIFEST.json").unlink(missing_ok=True)  # no longer a checkpoint to resume from
            (path / SHARDS_ONLY).touch()
            for f in path.iterdir():
                if f.name not in needed[path.name] and f.name != SHARDS_ONLY:
                    f.unlink(missing_ok=True)

    def _all_dirs(self) -> list[Path]:
        """Every checkpoint directory, complete or reduced to shards, newest first."""
        if not self.root.is_dir():
            return []
        found = [(round_of(p), p) for p in self.root.iterdir() if p.is_dir() and _DIR_RE.match(p.name)]
        return [p for _, p in sorted(found, reverse=True)]

    # ---------------------------------------------------------------- read
    def recorded_store(self) -> Path | None:
        """The absolute store path the newest checkpoint manifest that records one holds (None:
        none does, e.g. checkpoints of an earlier version). Read without verifying: the store
        found there is checked against the config's partition like any other."""
        for path in self.candidates():
            store = _read_manifest(path).get("store")
            if isinstance(store, str):
                return Path(store)
        return None

    def candidates(self) -> list[Path]:
        """Checkpoint directories, newest first (by round number, not mtime)."""
        return [p for p in self._all_dirs() if not (p / SHARDS_ONLY).exists()]

    def newest_round(self) -> int | None:
        """The round of the newest checkpoint, the one a resume tries first (by name, not
        verified: cheap on a run that is training); None without one."""
        newest = self.candidates()
        return round_of(newest[0]) if newest else None

    @staticmethod
    def verify(path: Path) -> CheckpointRef:
        """Check a checkpoint's manifest and every file's sha256; raise CheckpointError if not."""
        mpath = path / "MANIFEST.json"
        try:
            manifest = json.loads(mpath.read_text())
            files = manifest["files"]
            round_idx = int(manifest["round"])
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{mpath}: missing or unreadable manifest") from None
        located = [(path / name, digest) for name, digest in files.items()]
        located += [(path.parent / ref["dir"] / name, ref["sha256"]) for name, ref in manifest.get("refs", {}).items()]
        for f, digest in located:
            if not f.is_file():
                raise CheckpointError(f"{path}: file {f.parent.name}/{f.name} listed in the manifest is missing")
            if sha256_file(f) != digest:
                raise CheckpointError(f"{f}: sha256 does not match the manifest (corrupted)")
        return CheckpointRef(path=path, round=round_idx, manifest=manifest)

    @staticmethod
    def shard_locations(ref: CheckpointRef) -> dict[str, dict[str, str]]:
        """Every client shard a checkpoint holds or references: file name -> {"dir", "sha256"}."""
        own = {name: {"dir": ref.path.name, "sha256": digest} for name, digest in ref.manifest["files"].items()
               if name.startswith("client_")}
        return {**ref.manifest.get("refs", {}), **own}

    def newest_valid(self, warn: Callable[[str], None] = log.warning) -> CheckpointRef | None:
        """The newest checkpoint whose manifest verifies; broken newer ones are reported."""
        for path in self.candidates():
            try:
                return self.verify(path)
            except CheckpointError as exc:
                warn(f"skipping checkpoint: {exc}")
        return None


# ----------------------------------------------------------------------------- a rank's clients
RESUME_MODES = ("auto", "none", "force")


def save_checkpoint(ckpt: CheckpointDir, comm: Comm, pool: ClientPool, algo: Algorithm, shared: SharedParams,
                    round_idx: int, *, config_hash: str, keep: int, about: dict[str, Any] | None = None,
                    before_commit: Callable[[], None] | None = None) -> None:
    """All ranks: write the shards of my clients that changed since the previous checkpoint;
    rank 0 commits the checkpoint of ``round_idx``, referencing the unchanged shards.
    ``about``: recorded in the manifest (:meth:`CheckpointDir.commit`).
    ``before_commit`` runs on every rank once the shards are written (fault injection)."""
    rt = comm.rt
    if rt.is_main:
        ckpt.begin(round_idx)
    comm.barrier()
    files = {}
    for cid in sorted(pool.changed):
        shard = pool.shard(cid)
        if shard is not None:
            name, digest = ckpt.write_client(round_idx, cid, shard)
            files[name] = digest
    every = comm.all_gather_object(files)
    if before_commit is not None:
        before_commit()
    if rt.is_main:
        merged = {k: v for part in every for k, v in part.items()}
        refs = {name: loc for name, loc in pool.checkpointed.items() if name not in merged}
        server = {"round": round_idx, "algo": algo.server_state(), "config_hash": config_hash,
                  "shared": shared.state()}
        final = ckpt.commit(round_idx, server, merged, world_size=rt.world_size, config_hash=config_hash, keep=keep,
                            refs=refs, about=about)
        pool.checkpointed = {**refs, **{name: {"dir": final.name, "sha256": d} for name, d in merged.items()}}
    comm.barrier()
    pool.changed.clear()


@dataclass(frozen=True)
class Resumed:
    """What :func:`load_checkpoint` restored: the next round to run and the checkpoint's path."""

    next_round: int  # 0: nothing restored
    path: Path | None
    config_hash: str | None = None  # the hash its manifest records (rank 0 only)
    manifest: dict | None = None  # its verified manifest (rank 0 only)


def _writer(ckpt: CheckpointDir, ref: CheckpointRef) -> str | None:
    """The algorithm that wrote checkpoint ``ref``: its manifest's, or, for a manifest from before
    session 14, that of the run's ``config.yaml`` where that config wrote it (the same config
    hash; ``--resume force`` rewrites the file only after its first checkpoint); None: not known."""
    recorded = ref.manifest.get("algorithm")
    if recorded is not None or "config_hash" not in ref.manifest:
        return recorded
    try:
        cfg = read_run_config(ckpt.root.parent / "config.yaml")
    except (CafeError, OSError):
        return None
    return cfg.algorithm.name if hash_of_config(cfg) == ref.manifest["config_hash"] else None


def another_algorithm(run_dir: Path, writer: str | None, algorithm: str) -> RunDirError | None:
    """Why the run in ``run_dir``, of algorithm ``writer`` (None: not known), may not continue
    under ``algorithm``; None when it may. A run continues only under its own algorithm, under
    every ``--resume``: the state of one algorithm means something else, or nothing, to another
    (a key of both may hold another layout), and the run's results would be credited to the new
    one. Train's plan asks it before anything is built (``--resume auto``, judged by
    ``config.yaml`` or the newest manifest), :func:`load_checkpoint` of the checkpoint it loads
    (``--resume force`` too), so both refuse in the same words, which advise no ``--resume``
    that would be refused in turn."""
    if writer is None or writer == algorithm:
        return None
    return RunDirError(f"{run_dir} holds a run of algorithm {writer}, and a run continues only under its own "
                       f"algorithm, whatever --resume says",
                       f"train {algorithm} with another --out, or --resume none to move that run aside and start over")


def _choose_checkpoint(ckpt: CheckpointDir, config_hash: str, resume: str, also_accept: tuple[str, ...],
                       evaluating: str | None, algorithm: str | None,
                       store: Store | None) -> tuple[CheckpointRef | None, str | None]:
    """Rank 0: the newest checkpoint that verifies, and why it may not be used (None: it may;
    see :func:`load_checkpoint` for the rules)."""
    ref = ckpt.newest_valid()
    if ref is None and ckpt.candidates():
        return None, (f"{ckpt.root}: no checkpoint verifies, so this run cannot be "
                      + ("evaluated (every checkpoint is incomplete or corrupt; `cafedist train` with "
                         "--resume none moves the run aside and trains it again)" if evaluating is not None else
                         "resumed (use --resume none to move it aside and start over)"))
    if ref is None:
        return None, None
    return ref, refusal(ckpt, ref, config_hash, resume, also_accept, evaluating, algorithm, store=store)


def refusal(ckpt: CheckpointDir, ref: CheckpointRef, config_hash: str, resume: str = "auto",
            also_accept: tuple[str, ...] = (), evaluating: str | None = None,
            algorithm: str | None = None, *, store: Store | None = None) -> str | None:
    """Why checkpoint ``ref`` of ``ckpt`` may not be loaded under the config of ``config_hash``
    (None: it may; the arguments and rules are :func:`load_checkpoint`'s). ``cafedist status``
    asks it too, of the newest checkpoint unverified, so that it says what a resume would do."""
    recorded = ref.manifest.get("config_hash")
    if evaluating is not None and ref.manifest.get("run_identity") not in (None, evaluating):
        return (f"{ref.path}: written by a different config than {ckpt.root.parent / 'config.yaml'} "
                f"(edited or replaced since?); eval scores models only under the config that trained them")
    if recorded not in (None, config_hash, *also_accept) and resume != "force":
        return f"{ref.path}: written by a different config (use --resume force to continue anyway)"
    if algorithm is not None:  # None: not known (load_shard checks the state)
        problem = another_algorithm(ckpt.root.parent, _writer(ckpt, ref), algorithm)
        if problem is not None:
            return str(problem)
    if store is not None:
        problem = _other_data(ref, store, evaluating is not None)
        if problem is not None:
            return problem
    if evaluating is not None and "run_identity" not in ref.manifest and recorded not in (None, config_hash):
        log.warning("%s: written under a config file other than %s/config.yaml (its config hash differs; "
                    "fine if only another algorithm's section changed)", ref.path, ckpt.root.parent)
    return None


def _restore(ckpt: CheckpointDir, path: Path, locations: dict[str, dict[str, str]], pool: ClientPool,
             algo: Algorithm, shared: SharedParams) -> int:
    """Every rank: load its clients' shards (``locations``: file name -> {"dir", "sha256"}), the
    algorithm's server state and the shared average from checkpoint ``path``; returns the round
    it was taken after. A checkpoint that does not fit the model or algorithm is one line."""
    pool.checkpointed = locations
    try:
        _restore_clients(ckpt, locations, pool)
        server = load_torch(path / "server.pt")
        algo.load_server_state(server.get("algo", {}))
        shared.load_state(server.get("shared", {}), pool.device)
        for client in pool.resident():
            shared.catch_up(client)
        done = int(server["round"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        reason = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]  # load_state_dict's first problem
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise CheckpointError(f"{path}: does not fit the model/algorithm of this config ({reason})") from None
    pool.changed.clear()
    return done


def _restore_clients(ckpt: CheckpointDir, locations: dict[str, dict[str, str]], pool: ClientPool) -> None:
    """Load each of this rank's clients that has a shard in ``locations``; the pool's scratch
    client for checking shards (with a residency bound) is freed also when one does not fit."""
    try:
        for cid in pool.ids:
            loc = locations.get(client_file(cid))
            if loc is not None:
                pool.restore(cid, load_torch(ckpt.root / loc["dir"] / client_file(cid)))
    finally:
        pool.restored()


def _other_data(ref: CheckpointRef, store: Store, evaluating: bool) -> str | None:
    """Why checkpoint ``ref`` may not be used with ``store``: its manifest records that it was
    trained on other data (``store_data``, :meth:`~cafedist.data.store.Store.data_digest`) than
    the store holds now; None when it records the same or nothing (older manifests). A store is
    matched by its partition alone, so one deleted and built again under its name from other
    files (a dataset re-downloaded or edited since) would otherwise pass for the run's: a
    resume would train the models on other samples, eval and export would score them on
    samples they were never trained or tested on. Refused under every ``--resume``."""
    recorded = ref.manifest.get("store_data")
    if not isinstance(recorded, str) or recorded == store.data_digest():
        return None
    guess = ("a store of the same partition built again since, from other files?"
             if ref.manifest.get("partition") in (None, store.params) else "another partition")
    why = f"{ref.path} was trained on other data than {store.path} holds now ({guess})"
    if evaluating:
        return (f"{why}: the models would be scored on samples they were never trained or tested on; put back "
                f"the store the run trained on")
    return (f"{why}: the models would go on training and be tested on other samples; give data.store the store "
            f"the run trained on, or use --resume none to start over on this one")


def load_checkpoint(ckpt: CheckpointDir, comm: Comm, pool: ClientPool, algo: Algorithm, shared: SharedParams, *,
                    config_hash: str, resume: str = "auto", also_accept: tuple[str, ...] = (),
                    evaluating: str | None = None, algorithm: str | None = None,
                    store: Store | None = None) -> Resumed:
    """All ranks: restore my clients, the shared average and the algorithm from the newest
    valid checkpoint (a client without a shard stays at its initial weights).

    Rank 0 decides and every rank learns its decision (none is left waiting): a run whose
    checkpoints all fail to verify, or whose newest one was written by another config (unless
    ``resume`` is ``"force"``), is refused with a :class:`CheckpointError` on every rank; so is
    a checkpoint that does not fit the model or algorithm (one line, not a traceback).
    ``also_accept``: hashes of earlier config files of this same run (they differed only in
    other algorithms' sections, :func:`~cafedist.config.run_identity`). ``evaluating``: the
    run identity of the config that eval reads the models under (eval has no ``--resume``): a
    checkpoint whose manifest records another is refused, whatever ``resume`` says, and one
    from before manifests recorded it is checked by its config hash, with a warning only
    (the config file may have been rewritten for another algorithm's section since).
    ``algorithm``: the name training continues under; a checkpoint written by another
    algorithm (by its manifest, or by the run's ``config.yaml`` for a manifest that predates
    the field) is refused, whatever ``resume`` says. ``store``: the store (rank 0's) that the
    models are to be trained or evaluated on; a checkpoint whose manifest records other data
    (``store_data``) is refused, whatever ``resume`` says (:func:`_other_data`).
    """
    rt = comm.rt
    ref, problem, locations = None, None, {}
    if rt.is_main:
        ref, problem = _choose_checkpoint(ckpt, config_hash, resume, also_accept, evaluating, algorithm, store)
        if ref is not None and problem is None:
            locations = ckpt.shard_locations(ref)
    path, problem, locations = comm.broadcast_object((None if ref is None else str(ref.path), problem, locations))
    if problem:
        raise CheckpointError(problem)
    if path is None:
        return Resumed(0, None)
    path = Path(path)
    done = _restore(ckpt, path, locations, pool, algo, shared)
    if ref is not None:
        log.info("%s %s (round %d, written by %d ranks, now %d)", "resumed from" if evaluating is None else "loaded",
                 path, done, ref.manifest["world_size"], rt.world_size)
    return Resumed(done + 1, path, None if ref is None else ref.manifest.get("config_hash"),
                   None if ref is None else ref.manifest)
