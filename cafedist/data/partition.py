"""Deterministic federated splits: public proxy set, Dirichlet label skew (or the natural
partition by user), per-client test and validation splits.

Every function is a pure function of its inputs and ``seed``; randomness comes from numpy
Generators seeded with :func:`cafedist.rng.derive_seed`, keyed by purpose, so one split never
shifts another's random stream. All returned index arrays are sorted int64.
"""

from __future__ import annotations

import math

import numpy as np

from cafedist.errors import ConfigError
from cafedist.rng import derive_seed


def _rng(seed: int, *keys: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


def _round_half_up(x: np.ndarray) -> np.ndarray:
    # np.round rounds half to even (0.5 -> 0, 2.5 -> 2); splits should round 0.5 up.
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    return labels


def check_client_args(n_clients: int, min_size: int) -> None:
    """Validate the number of clients and their minimum size (ConfigError naming the field)."""
    if n_clients < 1:
        raise ConfigError(f"clients must be >= 1, got {n_clients}")
    if min_size < 1:
        raise ConfigError(f"min_size must be >= 1 (every client needs data), got {min_size}")


def check_partition_args(n_clients: int, alpha: float, min_size: int) -> None:
    """Validate the data-independent Dirichlet parameters (ConfigError naming the field)."""
    check_client_args(n_clients, min_size)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ConfigError(f"alpha must be a finite number > 0, got {alpha}")


def check_fraction(name: str, value: float) -> None:
    """Validate that a split fraction lies strictly between 0 and 1."""
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{name} must be strictly between 0 and 1, got {value}")


def split_proxy(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split all samples into ``(proxy_idx, rest_idx)``, stratified by label.

    The proxy set (``round(fraction * N)`` samples; per class ``fraction * count``, the
    rounding remainders going to the classes with the largest fractional parts) becomes the
    public unlabelled set; ``rest_idx`` is what the clients are built from, so the two are
    disjoint by construction.
    """
    labels = _check_labels(labels)
    check_fraction("proxy_fraction", fraction)
    classes, counts = np.unique(labels, return_counts=True)
    quota = fraction * counts
    take = np.floor(quota).astype(np.int64)
    # Largest-remainder rounding: the total matches round(fraction * N) exactly.
    extra = int(_round_half_up(fraction * len(labels))) - int(take.sum())
    order = np.lexsort((classes, -(quota - take)))
    take[order[:max(extra, 0)]] += 1
    if take.sum() == 0 or take.sum() == len(labels):
        raise ConfigError(f"proxy_fraction={fraction} of {len(labels)} samples leaves the proxy set "
                          f"or the client data empty")
    rng = _rng(seed, "split_proxy")
    proxy, rest = [], []
    for c, k in zip(classes, take):
        members = rng.permutation(np.flatnonzero(labels == c))
        proxy.append(members[:k])
        rest.append(members[k:])
    return np.sort(np.concatenate(proxy)), np.sort(np.concatenate(rest))


def dirichlet_partition(labels: np.ndarray, n_clients: int, alpha: float, min_size: int,
                        seed: int, max_tries: int = 1000) -> list[np.ndarray]:
    """Label-skewed partition of ``range(len(labels))`` over ``n_clients`` clients.

    Per class, the class's samples are divided over the clients in proportions drawn from
    Dirichlet(``alpha``) (small alpha = strong skew). As in the reference implementation of
    this scheme (Yurochkin et al. 2019, used by NIID-Bench/PFLlib), a client that already
    holds its fair share ``N / n_clients`` gets no more samples, which keeps sizes from
    degenerating. If some client ends up with fewer than ``min_size`` samples the whole
    partition is redrawn with the next derived seed, at most ``max_tries`` times.
    Returns one sorted index array per client; together they cover every sample once.
    """
    labels = _check_labels(labels)
    n = len(labels)
    check_partition_args(n_clients, alpha, min_size)
    if n_clients * min_size > n:
        raise ConfigError(f"cannot give {n_clients} clients >= {min_size} samples each from only "
                          f"{n} samples (lower clients or min_size)")
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    fair_share = n / n_clients
    for attempt in range(max_tries):
        rng = _rng(seed, "dirichlet", attempt)
        # An attempt only fills a vectorised owner-per-sample array; the per-client index
        # lists are built once, for the accepted draw, so even 1000 redraws stay cheap.
        owner = np.empty(n, dtype=np.int64)
        sizes = np.zeros(n_clients, dtype=np.int64)
        for members in by_class:
            p = rng.dirichlet(np.full(n_clients, float(alpha)))
            capped = p * (sizes < fair_share)
            p = capped if capped.sum() > 0 else p
            if not np.isfinite(p).all() or p.sum() <= 0:  # degenerate draw at tiny alpha
                p = np.ones(n_clients)
            cuts = (np.cumsum(p / p.sum()) * len(members)).astype(np.int64)
            cuts[-1] = len(members)  # float round-off must not drop the last samples
            counts = np.diff(cuts, prepend=0)
            owner[rng.permutation(members)] = np.repeat(np.arange(n_clients), counts)
            sizes += counts
        if sizes.min() >= min_size:
            order = np.argsort(owner, kind="stable")  # stable: indices stay sorted per client
            return [part.astype(np.int64) for part in np.split(order, np.cumsum(sizes)[:-1])]
    raise ConfigError(f"dirichlet_partition: no draw in {max_tries} tries gave all {n_clients} clients "
                      f">= {min_size} samples from {n} samples at alpha={alpha} "
                      f"(raise alpha, lower min_size or use fewer clients)")


def stratified_holdout(idx: np.ndarray, labels: np.ndarray, fraction: float, seed: int,
                       purpose: str) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's samples ``idx`` into ``(kept, held_out)`` with the same label mix.

    ``labels`` is the full label array (``labels[idx]`` are the client's labels). Per class,
    ``round(fraction * count)`` samples (0.5 rounds up) are held out. The client always keeps
    >= 1 sample and, when it has >= 2 samples, holds out >= 1 (one is moved from/to its
    largest class), so both sides are usable. ``purpose`` keys the random stream, so the
    test and the validation split of one client draw independent permutations.
    """
    idx = np.asarray(idx, dtype=np.int64)
    labels = _check_labels(labels)
    if len(idx) == 0:
        raise ConfigError(f"stratified_holdout ({purpose}): a client has no samples")
    own = labels[idx]
    classes, counts = np.unique(own, return_counts=True)
    n_held = _round_half_up(fraction * counts)
    largest = int(np.argmax(counts))  # argmax takes the first, i.e. smallest label, on ties
    if n_held.sum() == len(idx):
        n_held[largest] -= 1
    elif n_held.sum() == 0 and len(idx) >= 2:
        n_held[largest] += 1
    rng = _rng(seed, purpose)
    kept, held = [], []
    for c, k in zip(classes, n_held):
        members = rng.permutation(idx[own == c])
        held.append(members[:k])
        kept.append(members[k:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def train_test_split_stratified(idx: np.ndarray, labels: np.ndarray, test_fraction: float,
                                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's samples ``idx`` into ``(train_idx, test_idx)`` with the same label mix
    (:func:`stratified_holdout`): every client can both train and be evaluated."""
    check_fraction("test_fraction", test_fraction)
    if len(idx) == 0:
        raise ConfigError("train_test_split_stratified: a client has no samples")
    return stratified_holdout(idx, labels, test_fraction, seed, "train_test_split")


def check_val_fraction(value: float) -> None:
    """Validate ``val_fraction``: 0 (no validation split) or strictly between 0 and 1."""
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1) (0 = no validation split), got {value}")


def train_val_split_stratified(train_idx: np.ndarray, labels: np.ndarray, val_fraction: float,
                               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Carve a client's validation split from its train split: ``(train_idx, val_idx)``.

    Same rule as the test split (:func:`stratified_holdout`, its own random stream): a client
    with >= 2 train samples gets >= 1 validation sample and keeps >= 1 to train on; a client
    with a single train sample keeps it and has no validation sample. ``val_fraction`` 0
    returns the train split unchanged and an empty validation split.
    """
    check_val_fraction(val_fraction)
    train_idx = np.sort(np.asarray(train_idx, dtype=np.int64))
    if val_fraction == 0.0:
        return train_idx, np.empty(0, dtype=np.int64)
    return stratified_holdout(train_idx, labels, val_fraction, seed, "train_val_split")


def natural_partition(sizes: np.ndarray, n_clients: int, min_size: int, proxy_users: int | None,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Choose which users become clients and which feed the proxy set: ``(client_users, proxy_users)``.

    ``sizes[u]`` is user ``u``'s sample count (users in name order). The users are put in a
    seeded random order; the first ``n_clients`` with >= ``min_size`` samples become clients
    0, 1, ... in that order (so asking for more clients keeps the first ones, ids included);
    the remaining users with samples, in the same order, feed the proxy set: the first
    ``proxy_users`` of them, or all when ``proxy_users`` is None. Client users are returned in
    client-id order, proxy users sorted; the two are disjoint by construction.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    check_client_args(n_clients, min_size)
    order = _rng(seed, "natural_partition").permutation(len(sizes))
    eligible = order[sizes[order] >= min_size]
    if len(eligible) < n_clients:
        raise ConfigError(f"clients={n_clients}, but only {len(eligible)} of the {len(sizes)} users have "
                          f">= min_size={min_size} samples (lower clients or min_size)")
    clients = eligible[:n_clients]
    rest = order[~np.isin(order, clients) & (sizes[order] > 0)]
    if proxy_users is not None:
        if proxy_users < 1 or proxy_users > len(rest):
            raise ConfigError(f"proxy_users={proxy_users}, but {len(rest)} users with samples are left after "
                              f"choosing {n_clients} clients (expected 1..{len(rest)}, or null for all)")
        rest = rest[:proxy_users]
    if len(rest) == 0:
        raise ConfigError(f"no users with samples are left for the proxy set after choosing {n_clients} of "
                          f"{len(sizes)} users as clients (lower clients)")
    return clients.astype(np.int64), np.sort(rest).astype(np.int64)
