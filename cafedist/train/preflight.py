"""Checks made before a run directory is created, changed or deleted.

``cafedist train`` validates in this order and touches the run directory only after all of
them pass: the config (when it is loaded), :func:`check_paths` (``--out`` and the data paths),
:func:`plan_run_dir` (what the directory holds and whether this config may use it), then the
store, model and algorithm (building the trainer); only then does rank 0 take the run's lock
and carry out the plan (:func:`cafedist.train.startup.prepare_run_dir`). Everything here only
reads.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

from cafedist.config import (
    Config,
    YamlFile,
    canonical_text,
    config_hash,
    identity_fields,
    missing_sections,
    read_run_config,
    run_config_of,
    run_identity,
)
from cafedist.errors import CafeError, CheckpointError, ConfigError, RunDirError
from cafedist.paths import check_dir_creatable
from cafedist.run.checkpoint import CheckpointDir, CheckpointRef, another_algorithm
from cafedist.rundir import MOVING_NAME, has_run, unfinished_move


def check_paths(cfg: Config, run_dir: Path) -> None:
    """``--out`` must be (or become) a directory; the store's folder likewise; and a store
    still to be built from a dataset that is not bundled needs ``data.root`` (whether the
    root holds the dataset is the loader's to say: on a cluster it may exist on the compute
    nodes only)."""
    check_dir_creatable(run_dir, "--out")
    check_data_paths(cfg)


def check_data_paths(cfg: Config) -> None:
    """The store's folder must be (or become) a directory, and a store still to be built from a
    dataset that is not bundled needs ``data.root``: :func:`check_paths` without ``--out``, for
    the ranks other than rank 0 (each may have its own store path, e.g. a node-local disk)."""
    from cafedist.data.registry import BUNDLED

    store = cfg.data.store_path(cfg.seed)
    field = "data.store" if cfg.data.store else "data.cache_dir"
    if store.is_dir():
        raise ConfigError(f"{field}: {store} is a directory, expected an HDF5 store file")
    if not store.exists():  # it will be built there
        check_dir_creatable(store.parent, field)
        if cfg.data.root is None and cfg.data.dataset not in BUNDLED:
            raise ConfigError(f"data.root: {cfg.data.dataset} needs its dataset folder (set data.root=DIR), "
                              f"and no store is prepared at {store}")


class RunDirPlan(Enum):
    """What rank 0 will do to the run directory once every check has passed."""

    FRESH = "fresh"  # nothing there: write config.yaml
    WRITE = "write"  # this config may use the directory: (re)write config.yaml, resume if possible
    ASIDE = "aside"  # --resume none on an existing run: move it to previous-<time>/, then FRESH;
    # under any --resume, a move aside a kill interrupted: finish it (the user asked to start over)
    DEFER = "defer"  # --resume force on a different config: config.yaml once a new round is checkpointed


def dict_diff(a: Any, b: Any, prefix: str = "", *, as_hashed: bool = False) -> str | None:
    """First dotted key where two nested dicts differ (for 'different config' errors).
    ``as_hashed``: values differ as the config hash tells them apart (its JSON text), so that
    ``1`` and ``1.0`` in a free-form option or list, which make another hash, are named."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            d = dict_diff(a.get(key), b.get(key), f"{prefix}{key}.", as_hashed=as_hashed)
            if d:
                return d
        return None
    same = canonical_text(a) == canonical_text(b) if as_hashed else a == b
    return None if same else f"{prefix[:-1]} ({a!r} vs {b!r})"


def earlier_hashes(cfg: Config, run_dir: Path) -> tuple[str, ...]:
    """The full :func:`config_hash` values under which this same run (same :func:`run_identity`)
    wrote ``run_dir`` from other config files: its ``config.yaml``'s and those its checkpoints'
    manifests record with this run identity. Both count: a resume under a config file that
    differs only in another algorithm's section rewrites config.yaml at once, while its
    checkpoints keep the earlier hash until the next one (a kill in between left config.yaml
    refusing its own run's checkpoints). Manifests are read unverified: loading verifies."""
    identity = run_identity(cfg)
    found: list[str] = []
    try:
        old = read_run_config(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else None
    except CafeError:
        old = None
    if old is not None and run_identity(old) == identity:
        found.append(config_hash(old))
    for path in CheckpointDir(run_dir).candidates():
        manifest = CheckpointRef.unverified(path).manifest
        recorded = manifest.get("config_hash")
        if isinstance(recorded, str) and manifest.get("run_identity") == identity and recorded not in found:
            found.append(recorded)
    return tuple(found)


def has_work(run_dir: Path) -> bool:
    """Whether the directory holds results: a checkpoint, a metrics row or a summary."""
    metrics = run_dir / "metrics.jsonl"
    return (bool(CheckpointDir(run_dir).candidates()) or (run_dir / "summary.json").exists()
            or (metrics.is_file() and metrics.stat().st_size > 0))


def plan_run_dir(cfg: Config, run_dir: Path, resume: str) -> RunDirPlan:
    """Decide what the run may do to ``run_dir`` (read-only); raise CheckpointError if nothing.

    ``auto`` refuses a directory holding a run of a different config (naming the first
    difference) unless that run has no results yet; ``force`` accepts it but leaves its
    ``config.yaml`` alone until the new config has a checkpoint; ``none`` moves a run aside.
    A ``none`` stopped while it moved a run aside is finished first, under every ``--resume``:
    what is left of that run is half of one, not a run to continue (the user asked to start over).
    """
    if resume not in ("auto", "none", "force"):
        raise CheckpointError(f"--resume: expected auto, none or force, got {resume!r}")
    moving = unfinished_move(run_dir)
    if moving is not None and (run_dir / MOVING_NAME).exists():
        return RunDirPlan.ASIDE
    if moving is not None:  # the previous-* folder it moves into: half a run
        raise RunDirError(moving, "train the run directory it is moved from (that finishes the move), or use "
                                  "another --out")
    if not run_dir.is_dir() or not has_run(run_dir):
        return RunDirPlan.FRESH
    if resume == "none":
        return RunDirPlan.ASIDE  # the user's own config.yaml too is moved, not lost
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        return _plan_without_config(cfg, run_dir, resume)
    old = _read_earlier_config(cfg_file)
    if run_identity(old) == run_identity(cfg) or not has_work(run_dir):
        return RunDirPlan.WRITE
    if resume == "force":
        _refuse_another_partition(_partition_of(old), cfg)
        return RunDirPlan.DEFER
    _refuse_another_algorithm(run_dir, old.algorithm.name, cfg)
    diff = dict_diff(identity_fields(old, keep_defaults=True), identity_fields(cfg, keep_defaults=True),
                     as_hashed=True) or "?"
    raise RunDirError(f"{run_dir} holds a run with a different config (first difference: {diff})",
                      "use another --out, --resume none to start over, or --resume force")


def _plan_without_config(cfg: Config, run_dir: Path, resume: str) -> RunDirPlan:
    """A directory with run files but no ``config.yaml`` (deleted by hand, or a folder of the
    user's): its newest checkpoint's manifest says which config wrote it; results without a
    checkpoint that verifies cannot be told from another run's, so they are never overwritten."""
    if not has_work(run_dir):
        return RunDirPlan.WRITE
    ref = CheckpointDir(run_dir).newest_valid(warn=lambda _: None)  # load_checkpoint reports broken ones
    if ref is None:
        present = [name for name in ("summary.json", "metrics.jsonl", "checkpoints") if (run_dir / name).exists()]
        raise RunDirError(f"{run_dir} holds results ({', '.join(present)}) but no config.yaml and no checkpoint "
                          f"that verifies, so whose they are cannot be told",
                          "use another --out, or --resume none to move them aside and start over")
    # this run, also under a config file that differs only where results do not (another
    # algorithm's section); manifests from before run_identity was recorded: the full hash
    if (ref.manifest.get("config_hash") in (None, config_hash(cfg))
            or ref.manifest.get("run_identity") == run_identity(cfg)):
        return RunDirPlan.WRITE
    if resume == "force":
        recorded = ref.manifest.get("partition")  # manifests before it was recorded: not known
        _refuse_another_partition(recorded if isinstance(recorded, dict) else None, cfg)
        return RunDirPlan.DEFER
    _refuse_another_algorithm(run_dir, ref.manifest.get("algorithm"), cfg)  # manifests before session 14: none
    raise RunDirError(f"{ref.path}: written by a different config (and {run_dir} has no config.yaml to name "
                      f"the difference)", "use another --out, --resume none to start over, or --resume force")


def _refuse_another_algorithm(run_dir: Path, writer: str | None, cfg: Config) -> None:
    """``--resume auto`` onto a run of another algorithm (``writer``; None: not known): refused
    as :func:`~cafedist.run.checkpoint.load_checkpoint` refuses it under ``--resume force``."""
    problem = another_algorithm(run_dir, writer, cfg.algorithm.name)
    if problem is not None:
        raise problem


def _partition_of(cfg: Config) -> dict[str, Any] | None:
    """The partition parameters of ``cfg``'s store (:func:`~cafedist.data.partition_params`);
    None when they cannot be had (its dataset is no longer known: the store check will say)."""
    from cafedist.data import PartitionSpec, partition_params

    try:
        return partition_params(PartitionSpec.of(cfg.data, cfg.seed))
    except CafeError:
        return None


def _refuse_another_partition(before: dict[str, Any] | None, cfg: Config) -> None:
    """``--resume force`` onto another data partition (``data.alpha``, ``data.clients``, the
    fractions, ``seed``, ...) than ``before`` (the run's partition parameters, from its
    ``config.yaml`` or, without one, its newest checkpoint's manifest; None: not known):
    refused. The trained models would go on training on other clients' samples and be
    calibrated and tested on splits that hold samples they trained on, and nothing in the
    results could tell. A store path or ``data.root`` of its own is no change."""
    now = _partition_of(cfg)
    if before is None or now is None:
        return
    # a store records val_fraction only when > 0, and a partition only when natural: named as such
    before, now = ({"partition": "dirichlet", "val_fraction": 0.0, **p} for p in (before, now))
    # the fields that say what the others mean first: another dataset or partition kind would
    # otherwise be named as its first field in sorted order ('data.alpha (0.5 vs None)')
    head = ("dataset", "partition")
    diff = dict_diff(*({k: p[k] for k in head} for p in (before, now))) or dict_diff(before, now)
    if diff is None:
        return
    field = diff if diff.startswith("seed") else "data." + diff.replace("loader_options", "options", 1)
    raise CheckpointError(f"--resume force cannot change the data partition (first difference: {field}): the "
                          f"trained models would be tested and calibrated on splits holding samples they trained "
                          f"on; use another --out, or --resume none to start over")


def _read_earlier_config(cfg_file: Path) -> Config:
    """The config of the run in the directory, from its ``config.yaml`` read and parsed once:
    a file train did not write is refused (:func:`_refuse_a_users_config_file`), one that
    cannot be read as a run config is a CheckpointError."""
    try:
        file = YamlFile.read(cfg_file, note_comments=True)
    except CafeError as exc:
        raise _unreadable(cfg_file, exc) from None
    _refuse_a_users_config_file(file)
    try:
        return run_config_of(file)
    except CafeError as exc:
        raise _unreadable(cfg_file, exc) from None


def _unreadable(cfg_file: Path, exc: CafeError) -> RunDirError:
    return RunDirError(f"{cfg_file}: existing run config is unreadable ({exc})",
                       "use --resume none to move that run aside and start over")


def _refuse_a_users_config_file(file: YamlFile) -> None:
    """Refuse to replace a ``config.yaml`` that train did not write: train rewrites it with the
    resolved config, which would lose a user's own file kept in the run directory (whether or
    not ``--config`` names it). A config.yaml train wrote, in any version, has no comment and
    every top-level section (a ``#`` inside a value is no comment)."""
    missing = missing_sections(file.data)
    if file.commented or missing:
        why = "has comments" if file.commented else f"lacks the sections train writes ({', '.join(missing)})"
        raise ConfigError(f"{file.path} {why}, so train did not write it, and train replaces that file with the "
                          f"resolved config; keep your config outside the run directory (--config elsewhere) "
                          f"or choose another --out")
