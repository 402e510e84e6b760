"""Build the federated store from a raw dataset: ``cafedist prepare`` and ``ensure_store``.

``prepare_store`` = load (pooled train+test) -> proxy split -> Dirichlet partition of the rest
(or, ``partition: natural``, one client per chosen user and the proxy set from other users)
-> per-client stratified train/test split -> (optional) validation split carved from each
client's train split -> atomic HDF5 write. The result depends only on
the partition parameters (recorded in the store as ``params``), never on who builds it. A store
read from files under a data root also records their fingerprint (:mod:`cafedist.data.source`),
outside ``params``: reusing it with a root whose files differ gives a warning.

``open_ensured_store`` is what ``cafedist train`` calls on every rank: the first process to take
the lock builds the store, the others wait and then reuse it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cafedist.config import DataConfig
from cafedist.data.partition import (
    dirichlet_partition,
    natural_partition,
    split_proxy,
    train_test_split_stratified,
    train_val_split_stratified,
)
from cafedist.data.registry import DATASETS, NATURAL, check_options, load_dataset, options_of
from cafedist.data.source import fingerprint, warn_if_other_source
from cafedist.data.spec import PartitionSpec
from cafedist.data.store import STORE_SUFFIX, Store, write_store
from cafedist.errors import ConfigError, DataError
from cafedist.fsutil import exclusive_lock, remove_stale_temps
from cafedist.paths import check_dir_creatable, refuse_empty_path, user_path
from cafedist.rng import derive_seed

log = logging.getLogger(__name__)


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not float(value).is_integer():
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return int(value)


def partition_params(spec: PartitionSpec) -> dict[str, Any]:
    """The normalised, validated parameter record of ``spec``, stored in (and compared against) a store.

    ``val_fraction`` is recorded only when > 0, so a store built before validation splits
    existed still matches a run that asks for none. A natural partition records
    ``partition: natural`` (and ``proxy_users`` when set) instead of ``alpha`` and
    ``proxy_fraction``, which it does not use; a Dirichlet one records no ``partition``.

    Loader options (e.g. ``vocab_size``/``max_len`` for text) are recorded with their
    defaults filled in, so omitting a default and passing it explicitly give the same record;
    datasets without options record none.
    """
    dataset, val_fraction = spec.dataset, spec.val_fraction
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r} (expected one of: {', '.join(sorted(DATASETS))})")
    params: dict[str, Any] = {
        "dataset": dataset,
        "clients": _as_int("clients", spec.clients),
        "test_fraction": float(spec.test_fraction),
        "min_size": _as_int("min_size", spec.min_size),
        "seed": _as_int("seed", spec.seed),
    }
    if not -2**63 <= params["seed"] < 2**63:
        raise ConfigError(f"seed must be a 64-bit integer, got {spec.seed}")
    if spec.partition not in ("dirichlet", "natural"):
        raise ConfigError(f"partition must be 'dirichlet' or 'natural', got {spec.partition!r}")
    proxy_users = None if spec.proxy_users is None else _as_int("proxy_users", spec.proxy_users)
    # the rules data.* of a run config follows, so prepare builds no store a run would refuse
    dirichlet = spec.partition == "dirichlet"  # a natural partition uses neither alpha nor proxy_fraction
    DataConfig(dataset=dataset, partition=spec.partition, clients=params["clients"],
               alpha=float(spec.alpha) if dirichlet else DataConfig.alpha,
               proxy_fraction=float(spec.proxy_fraction) if dirichlet else DataConfig.proxy_fraction,
               proxy_users=proxy_users,
               test_fraction=params["test_fraction"], val_fraction=float(val_fraction),
               min_size=params["min_size"]).validate(name=lambda key: key)
    if spec.partition == "natural":
        if dataset not in NATURAL:
            raise ConfigError(f"partition natural needs a dataset that records its users "
                              f"({', '.join(sorted(NATURAL))}), not {dataset!r} (use partition dirichlet)")
        params["partition"] = "natural"
        if proxy_users is not None:
            params["proxy_users"] = proxy_users
    else:
        params["alpha"] = float(spec.alpha)
        params["proxy_fraction"] = float(spec.proxy_fraction)
    if float(val_fraction) > 0:
        params["val_fraction"] = float(val_fraction)
    options = check_options(dataset, spec.loader_options or {})
    if options:
        params["loader_options"] = options
    return params


def natural_users(user_samples: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """``(client_users, proxy_users)`` names of a natural partition: client ``cid`` is user
    ``client_users[cid]`` (see :func:`~cafedist.data.partition.natural_partition`)."""
    names = list(user_samples)
    clients, proxy = natural_partition(np.asarray([len(user_samples[u]) for u in names]), params["clients"],
                                       params["min_size"], params.get("proxy_users"), params["seed"])
    return [names[u] for u in clients], [names[u] for u in proxy]


def make_splits(labels: np.ndarray, params: Mapping[str, Any],
                user_samples: Mapping[str, np.ndarray] | None = None,
                ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """``(client_train, client_test, proxy_idx)`` index arrays into ``labels`` for ``params``
    (client train splits before any validation split: see :func:`carve_val_splits`).

    A natural partition (``params["partition"] == "natural"``) needs ``user_samples``, the
    loader's user -> sample indices: each client holds all of one user's samples, the proxy
    set all samples of the proxy users.
    """
    seed = params["seed"]
    if params.get("partition") == "natural":
        if user_samples is None:
            raise ValueError("make_splits: a natural partition needs the dataset's user_samples")
        client_users, proxy_users = natural_users(user_samples, params)
        owned = [np.sort(np.asarray(user_samples[u], dtype=np.int64)) for u in client_users]
        proxy_idx = np.sort(np.concatenate([np.asarray(user_samples[u], dtype=np.int64) for u in proxy_users]))
    else:
        proxy_idx, rest = split_proxy(labels, params["proxy_fraction"], seed)
        local = dirichlet_partition(labels[rest], params["clients"], params["alpha"], params["min_size"], seed)
        owned = [rest[positions] for positions in local]
    train, test = [], []
    for cid, idx in enumerate(owned):
        # A per-client key: a client's split does not change when other clients change.
        tr, te = train_test_split_stratified(idx, labels, params["test_fraction"], derive_seed(seed, "client", cid))
        train.append(tr)
        test.append(te)
    return train, test, proxy_idx


def carve_val_splits(train: list[np.ndarray], labels: np.ndarray,
                     params: Mapping[str, Any]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """``(client_train, client_val)``: each client's validation split carved from its train split.

    Drawn after (and independently of) the test split, keyed by (seed, client id), so the test
    split is the same with or without validation. ``client_val`` is None when
    ``params`` has no ``val_fraction`` (no validation split: train splits returned as given).
    """
    fraction = float(params.get("val_fraction", 0.0))
    if fraction == 0.0:
        return list(train), None
    pairs = [train_val_split_stratified(tr, labels, fraction, derive_seed(params["seed"], "client", cid))
             for cid, tr in enumerate(train)]
    return [tr for tr, _ in pairs], [va for _, va in pairs]


def prepare_store(out: str | Path, spec: PartitionSpec, root: str | Path | None = None) -> Path:
    """Load ``spec.dataset`` from ``root``, partition it and write the store to ``out`` (atomically).

    An existing file at ``out`` is replaced. Returns ``Path(out)``.
    """
    params = partition_params(spec)
    log.info("prepare: loading %s", spec.dataset)
    raw = load_dataset(spec.dataset, None if root is None else str(root), **params.get("loader_options", {}))
    train, test, proxy_idx = make_splits(raw.y, params, raw.user_samples)
    train, val = carve_val_splits(train, raw.y, params)
    users = natural_users(raw.user_samples, params)[0] if params.get("partition") == "natural" else None
    log.info("prepare: writing %s (%d clients, proxy %d)", out, len(train), len(proxy_idx))
    # recorded beside params, not in them: the store's identity and name stay the partition's
    source = None if raw.source is None else fingerprint(raw.source)
    write_store(out, raw, train, test, proxy_idx, params, client_val=val, client_users=users, source=source)
    return Path(out)


def open_matching_store(out: Path, want: dict[str, Any]) -> Store | None:
    """The store at ``out``, opened, if it was built with ``want``; None if absent; DataError otherwise.

    Returning it open spares the caller a second check of every client group (about a second
    at a thousand clients, on every run start).
    """
    if not out.exists():
        return None
    store = Store(out)
    if store.params != want:
        have = store.params
        store.close()
        raise DataError(f"store {out} exists with params {json.dumps(have, sort_keys=True)} but "
                        f"{json.dumps(want, sort_keys=True)} are asked for (delete it or choose another path)")
    return store


def store_matches(out: Path, want: dict[str, Any]) -> bool:
    """True if ``out`` is a valid store built with ``want``; False if absent; DataError otherwise."""
    store = open_matching_store(out, want)
    if store is None:
        return False
    store.close()
    return True


def open_ensured_store(out: str | Path, spec: PartitionSpec, root: str | Path | None = None,
                       check_source: bool = True) -> Store:
    """The store at ``out``, opened, built first unless it already holds a store of ``spec``.
    A store reused is checked against the source files under ``root`` when ``check_source``
    (:func:`cafedist.data.source.warn_if_other_source`; a run's other ranks skip it).

    Safe when many processes call it at once: they serialise on an exclusive lock on
    ``out + ".lock"`` and re-check after taking it, so exactly one builds. An existing store
    with different params (or an unreadable file) raises DataError instead of being replaced.
    """
    # a link (to a store not built yet): build at its target, not in place of the link
    out = Path(os.path.realpath(out)) if Path(out).is_symlink() else Path(out)
    want = partition_params(spec)
    store = open_matching_store(out, want)  # fast path: stores appear by atomic rename, so no lock is needed to read
    if store is not None:
        return _reused(store, root if check_source else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(Path(f"{out}.lock"), "another process to finish building the store"):
        store = open_matching_store(out, want)
        if store is not None:
            return _reused(store, root if check_source else None)
        for stale in remove_stale_temps(out, STORE_SUFFIX):  # every writer holds this lock: these are orphans
            log.warning("removed %s, left by a store build that was killed", stale)
        prepare_store(out, spec, root)
    return Store(out)


def _reused(store: Store, root: str | Path | None) -> Store:
    """``store``, reused: first a warning if ``root`` holds other source files than it was built from."""
    try:
        warn_if_other_source(store, root)
    except BaseException:
        store.close()
        raise
    return store


def ensure_store(out: str | Path, spec: PartitionSpec, root: str | Path | None = None) -> Path:
    """Return ``out``, building it first unless it already holds a store of ``spec``
    (:func:`open_ensured_store`, closed again)."""
    open_ensured_store(out, spec, root).close()
    return Path(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``cafedist prepare`` flags to ``parser``."""
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--dataset", choices=sorted(DATASETS), help="dataset to prepare")
    what.add_argument("--describe", metavar="STORE", type=user_path,
                      help="verify every checksum of an existing store (reads the whole file), print its summary, exit "
                           "(with none of the flags that build a store)")
    parser.add_argument("--root", metavar="DIR", type=user_path, help="folder holding the raw dataset (or its parent); "
                        "not needed for the bundled mnist5k and digits")
    d = PartitionSpec("", 0, 0.0, 0.0)  # the defaults, shared with data.* of a run config
    parser.add_argument("--partition", choices=("dirichlet", "natural"), default=d.partition,
                        help="dirichlet: pooled samples split with label skew (needs --alpha, --proxy-fraction); "
                             f"natural: one client per user ({', '.join(sorted(NATURAL))}) "
                             f"(default {d.partition})")
    parser.add_argument("--clients", type=int, metavar="N", help="number of clients")
    parser.add_argument("--alpha", type=float, metavar="A", help="Dirichlet concentration (smaller = more skew)")
    parser.add_argument("--proxy-fraction", type=float, metavar="F",
                        help="fraction of all samples held out as the public unlabelled proxy set")
    parser.add_argument("--proxy-users", type=int, metavar="N",
                        help="natural only: users (not made clients) whose samples form the proxy set "
                             "(default: all of them)")
    parser.add_argument("--test-fraction", type=float, default=d.test_fraction, metavar="F",
                        help=f"fraction of each client's samples kept as its test split (default {d.test_fraction})")
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction, metavar="F",
                        help="fraction of each client's train split held out as its validation split "
                             "(default 0: none)")
    parser.add_argument("--min-size", type=int, default=d.min_size, metavar="N",
                        help=f"minimum samples per client (default {d.min_size})")
    parser.add_argument("--seed", type=int, default=d.seed, metavar="S", help=f"partition seed (default {d.seed})")
    parser.add_argument("--vocab-size", type=int, metavar="N", help="text only: vocabulary size incl. pad/unk")
    parser.add_argument("--max-len", type=int, metavar="N", help="text only: tokens per document")
    parser.add_argument("--out", metavar="STORE", type=user_path,
                        help="output HDF5 file (an existing store of the same dataset and "
                             "partition is kept; any other existing file is refused)")


def _check_out_file(out: Path) -> None:
    """``prepare --out`` must name a file whose folder exists or can be created."""
    if out.is_dir():
        raise ConfigError(f"--out: {out} is a directory, expected a store file such as {out / 'store.h5'}")
    check_dir_creatable(out.parent, "--out")


def _check_describe_only(args: argparse.Namespace) -> None:
    """``--describe`` reads one store: an empty path (an unset shell variable) was taken as no
    ``--describe`` and answered with the flags a build needs, and build flags beside it were
    ignored without a word, as if ``--out`` had been written or the store checked against them."""
    refuse_empty_path("--describe", args.describe, "an HDF5 store file")
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    default = vars(defaults.parse_args([f"--describe={args.describe}"]))
    given = [_flag(key) for key, value in vars(args).items()
             if key in default and key != "describe" and value != default[key]]
    if given:
        raise ConfigError(f"prepare --describe only reads a store; {', '.join(given)}: only for building one "
                          f"(prepare --dataset ...)")


def _flag(option: str) -> str:
    """The prepare flag of a loader option: ``vocab_size`` -> ``--vocab-size``."""
    return f"--{option.replace('_', '-')}"


def main(args: argparse.Namespace) -> int:
    """Run ``cafedist prepare``: build a store (then print its summary) or ``--describe`` one."""
    if args.describe is not None:
        _check_describe_only(args)
        with Store(args.describe) as store:
            count = store.verify()
            print(store.describe())
            print(f"checksums: all {count} arrays verified")
        return 0
    dirichlet = {"--alpha": args.alpha, "--proxy-fraction": args.proxy_fraction}
    required = {"--clients": args.clients, **(dirichlet if args.partition == "dirichlet" else {}), "--out": args.out}
    missing = [flag for flag, value in required.items() if value is None]
    if missing:
        raise ConfigError(f"prepare --dataset needs {', '.join(missing)}")
    if args.partition == "natural" and any(v is not None for v in dirichlet.values()):
        raise ConfigError("prepare --partition natural takes no --alpha or --proxy-fraction "
                          "(the users decide the skew; --proxy-users sizes the proxy set)")
    refuse_empty_path("--out", args.out, "an HDF5 store file")
    # "" would read the working directory, as data.root="" would
    refuse_empty_path("--root", args.root, "the dataset's folder (leave --root out for the bundled mnist5k and digits)")
    _check_out_file(Path(args.out))
    given = {"vocab_size": args.vocab_size, "max_len": args.max_len}  # prepare's loader flags
    options = {k: v for k, v in given.items() if v is not None}
    # name the flags typed (the loaders' check speaks of the config field data.options), and
    # offer only flags prepare has (synthetic's users, side, ... are data.options alone)
    taken = [key for key in options_of(args.dataset) if key in given]
    not_taken = [_flag(key) for key in options if key not in taken]
    if not_taken:
        raise ConfigError(f"{', '.join(not_taken)}: dataset {args.dataset!r} takes no such option "
                          f"(it takes: {', '.join(_flag(key) for key in taken) or 'none'})")
    unused = DataConfig()  # natural: alpha and proxy_fraction are not used
    spec = PartitionSpec(args.dataset, clients=args.clients,
                         alpha=unused.alpha if args.alpha is None else args.alpha,
                         proxy_fraction=unused.proxy_fraction if args.proxy_fraction is None else args.proxy_fraction,
                         test_fraction=args.test_fraction, val_fraction=args.val_fraction, min_size=args.min_size,
                         seed=args.seed, loader_options=options or None, partition=args.partition,
                         proxy_users=args.proxy_users)
    # an existing file is kept if it is this very store and refused otherwise: runs depend on
    # their store, and --out may name anything
    out = Path(args.out)
    existed = out.exists()
    try:
        opened = open_ensured_store(out, spec, args.root)
    except DataError as exc:
        if not existed:
            raise
        raise DataError(f"--out {out} exists and is not this store, so prepare leaves it as it is ({exc})") from None
    with opened as store:
        if existed:  # "kept" only after every checksum: runs will read it as this store
            try:
                store.verify()
            except DataError as exc:
                raise DataError(f"--out {out} holds a store of this dataset and partition, but it is damaged, so "
                                f"prepare leaves it as it is; delete it and run prepare again ({exc})") from None
            log.info("prepare: %s already holds this store (same dataset and partition, every checksum "
                     "verified): kept", out)
        print(store.describe())
    return 0
