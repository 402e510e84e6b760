"""Partitioning: proxy split, Dirichlet label skew, per-client stratified test and validation splits."""

from __future__ import annotations

import numpy as np
import pytest

from cafedist.data import dirichlet_partition, split_proxy, train_test_split_stratified
from cafedist.data.partition import natural_partition, train_val_split_stratified
from cafedist.errors import ConfigError


def _labels(n=1000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, size=n).astype(np.int64)


def _entropy_per_client(labels, parts, classes):
    ent = []
    for p in parts:
        h = np.bincount(labels[p], minlength=classes) / len(p)
        h = h[h > 0]
        ent.append(-(h * np.log(h)).sum())
    return float(np.mean(ent))


def test_split_proxy_stratified_disjoint_deterministic():
    y = _labels()
    proxy, rest = split_proxy(y, 0.15, seed=3)
    assert len(np.intersect1d(proxy, rest)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([proxy, rest])), np.arange(len(y)))
    assert len(proxy) == 150
    counts, pcounts = np.bincount(y), np.bincount(y[proxy], minlength=10)
    assert np.all(np.abs(pcounts - 0.15 * counts) < 1)  # per class within rounding
    again, _ = split_proxy(y, 0.15, seed=3)
    other, _ = split_proxy(y, 0.15, seed=4)
    np.testing.assert_array_equal(proxy, again)
    assert not np.array_equal(proxy, other)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_proxy_rejects_bad_fraction(fraction):
    with pytest.raises(ConfigError, match="proxy_fraction"):
        split_proxy(_labels(), fraction, 0)


def test_split_proxy_rejects_empty_result():
    with pytest.raises(ConfigError, match="empty"):
        split_proxy(np.array([0, 1, 2]), 0.01, 0)


def test_dirichlet_covers_once_with_min_size():
    y = _labels(2000)
    parts = dirichlet_partition(y, n_clients=20, alpha=0.1, min_size=15, seed=7)
    assert len(parts) == 20
    flat = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(flat), np.arange(len(y)))
    assert min(len(p) for p in parts) >= 15
    assert all(np.all(np.diff(p) > 0) for p in parts)  # each client's indices sorted
    for p, q in zip(parts, dirichlet_partition(y, 20, 0.1, 15, seed=7)):
        np.testing.assert_array_equal(p, q)
    assert any(not np.array_equal(p, q) for p, q in zip(parts, dirichlet_partition(y, 20, 0.1, 15, seed=8)))


def test_dirichlet_alpha_controls_skew():
    y = _labels(3000)
    skewed = _entropy_per_client(y, dirichlet_partition(y, 10, 0.1, 10, seed=0), 10)
    mild = _entropy_per_client(y, dirichlet_partition(y, 10, 100.0, 10, seed=0), 10)
    assert skewed < 0.6 * np.log(10) < mild  # near-uniform labels only at large alpha


def test_dirichlet_gives_no_more_to_a_client_holding_its_fair_share():
    y = np.repeat(np.arange(10), 100)
    for seed in range(5):
        parts = dirichlet_partition(y, 10, 0.05, 1, seed=seed)
        # a client stops receiving at N / clients = 100 samples, so it ends below 100 + one class
        assert max(len(p) for p in parts) < 200, seed


def test_dirichlet_draws_which_samples_of_a_class_each_client_gets():
    """Not the first samples of a class to client 0 and so on: raw data is often ordered (by
    writer, by source), and a client's share must not follow that order."""
    parts = dirichlet_partition(np.zeros(1000, np.int64), 2, 1.0, 1, seed=0)
    assert all(np.any(np.diff(p) > 1) for p in parts)


def test_dirichlet_single_client_gets_everything():
    y = _labels(50)
    (only,) = dirichlet_partition(y, 1, 0.5, 1, seed=0)
    np.testing.assert_array_equal(only, np.arange(50))


def test_dirichlet_validation_and_impossible():
    y = _labels(100)
    with pytest.raises(ConfigError, match="alpha must be a finite number > 0"):
        dirichlet_partition(y, 5, 0.0, 1, 0)
    with pytest.raises(ConfigError, match="clients must be >= 1"):
        dirichlet_partition(y, 0, 1.0, 1, 0)
    with pytest.raises(ConfigError, match="min_size must be >= 1"):
        dirichlet_partition(y, 5, 1.0, 0, 0)
    with pytest.raises(ConfigError, match="cannot give 11 clients >= 10 samples each from only 100"):
        dirichlet_partition(y, 11, 1.0, 10, 0)
    # One class and a near-degenerate Dirichlet: one client takes (almost) everything.
    with pytest.raises(ConfigError, match="no draw in 3 tries"):
        dirichlet_partition(np.zeros(100, np.int64), 10, 1e-3, 8, 0, max_tries=3)


def test_train_test_split_per_class_rounding():
    y = np.array([0] * 10 + [1] * 5 + [2] * 1 + [3] * 3, dtype=np.int64)
    idx = np.arange(len(y))
    labels = np.concatenate([y, [9, 9]])  # full label array; idx selects the client's samples
    train, test = train_test_split_stratified(idx, labels, 0.5, seed=1)
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), idx)
    # round half up per class: 10 -> 5, 5 -> 3, 1 -> 1, 3 -> 2
    assert np.bincount(labels[test], minlength=4).tolist() == [5, 3, 1, 2]
    again = train_test_split_stratified(idx, labels, 0.5, seed=1)
    np.testing.assert_array_equal(again[1], test)


def test_train_test_split_keeps_one_each():
    labels = np.array([0, 1, 2, 3], dtype=np.int64)
    train, test = train_test_split_stratified(np.array([2]), labels, 0.9, seed=0)
    assert train.tolist() == [2] and len(test) == 0  # a lone sample stays in train
    train, test = train_test_split_stratified(np.array([0, 1, 2]), labels, 0.9, seed=0)
    assert len(train) == 1 and len(test) == 2
    train, test = train_test_split_stratified(np.array([0, 1, 2, 3]), labels, 0.05, seed=0)
    assert len(train) == 3 and len(test) == 1
    with pytest.raises(ConfigError, match="test_fraction"):
        train_test_split_stratified(np.array([0, 1]), labels, 1.0, seed=0)


def test_val_split_stratified_disjoint_deterministic():
    labels = _labels(400, classes=5, seed=3)
    train = np.arange(0, 400, 2)  # the client's train split: every other sample
    kept, val = train_val_split_stratified(train, labels, 0.25, seed=7)
    assert len(np.intersect1d(kept, val)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([kept, val])), train)
    # per class round(0.25 * count): the validation split has the train split's label mix
    counts = np.bincount(labels[train], minlength=5)
    assert np.bincount(labels[val], minlength=5).tolist() == np.floor(0.25 * counts + 0.5).astype(int).tolist()
    again = train_val_split_stratified(train, labels, 0.25, seed=7)
    np.testing.assert_array_equal(again[1], val)
    other = train_val_split_stratified(train, labels, 0.25, seed=8)[1]
    assert len(other) == len(val) and not np.array_equal(other, val)
    # its own random stream: not the samples a test split with the same seed would pick
    assert not np.array_equal(train_test_split_stratified(train, labels, 0.25, seed=7)[1], val)


def test_val_split_sizes_at_the_edges():
    labels = np.array([0, 1, 2, 3, 0, 0], dtype=np.int64)
    kept, val = train_val_split_stratified(np.array([0, 1, 2, 3, 4, 5]), labels, 0.0, seed=0)
    assert kept.tolist() == [0, 1, 2, 3, 4, 5] and val.dtype == np.int64 and len(val) == 0  # 0 = no split
    kept, val = train_val_split_stratified(np.array([3]), labels, 0.5, seed=0)
    assert kept.tolist() == [3] and len(val) == 0  # a single train sample stays in train
    kept, val = train_val_split_stratified(np.array([1, 2]), labels, 0.01, seed=0)
    assert len(kept) == 1 and len(val) == 1  # >= 2 train samples: >= 1 validation sample
    kept, val = train_val_split_stratified(np.array([1, 2]), labels, 0.99, seed=0)
    assert len(kept) == 1 and len(val) == 1  # and >= 1 left to train on
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match=r"val_fraction must be in \[0, 1\)"):
            train_val_split_stratified(np.array([0, 1]), labels, bad, seed=0)


def test_natural_partition_leaves_users_without_samples_out_of_the_proxy_set():
    sizes = np.array([5, 0, 3, 0, 4, 2])
    clients, proxy = natural_partition(sizes, 2, 3, None, seed=0)
    assert len(clients) == 2 and all(sizes[clients] >= 3)
    assert sorted([*clients, *proxy]) == [0, 2, 4, 5]  # every user with samples, once; no empty one
    _, first = natural_partition(sizes, 2, 3, 1, seed=0)
    assert len(first) == 1 and sizes[first[0]] > 0
    with pytest.raises(ConfigError, match="no users with samples are left for the proxy set"):
        natural_partition(np.array([5, 0, 0]), 1, 1, None, seed=0)
