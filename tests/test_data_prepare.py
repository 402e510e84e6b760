"""prepare_store / ensure_store / the `prepare` CLI, on the real bundled digits data."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest

from cafedist.data import PartitionSpec, Store, ensure_store, load_dataset, make_splits, partition_params, prepare_store
from cafedist.data import prepare as prepare_mod
from cafedist.data.prepare import carve_val_splits
from cafedist.errors import ConfigError, DataError

KW = dict(dataset="digits", clients=4, alpha=0.5, proxy_fraction=0.1, test_fraction=0.2, min_size=5, seed=1)


def _client_arrays(path: Path) -> list[list]:
    with Store(path) as s:
        return [[t.tolist() for t in vars(s.load_client(c)).values()] for c in range(s.num_clients)]


def test_make_splits_partition_everything_once():
    y = load_dataset("digits").y
    params = partition_params(PartitionSpec(**KW))
    train, test, proxy = make_splits(y, params)
    flat = np.concatenate(train + test + [proxy])
    np.testing.assert_array_equal(np.sort(flat), np.arange(len(y)))  # disjoint, nothing lost
    assert len(proxy) == round(0.1 * len(y))
    assert all(len(tr) + len(te) >= 5 and len(tr) >= 1 for tr, te in zip(train, test))
    # Per-client test split follows that client's label mix.
    for tr, te in zip(train, test):
        both = np.bincount(y[np.concatenate([tr, te])], minlength=10)
        assert np.all(np.abs(np.bincount(y[te], minlength=10) - 0.2 * both) <= 1)


def test_the_seed_draws_each_clients_test_and_validation_split():
    """Another seed, the same client samples: another test split and another validation split
    (both keyed by the seed and the client id), so seeds are independent replicates also where
    the partition keeps a client's samples (a natural partition's one eligible user here)."""
    y = np.arange(60) % 3
    users = {"a": np.arange(50), "b": np.arange(50, 60)}  # only "a" has min_size samples

    def splits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        params = {"partition": "natural", "clients": 1, "min_size": 20, "test_fraction": 0.2, "seed": seed,
                  "val_fraction": 0.2}
        (train,), (test,), _ = make_splits(y, params, users)
        return train, test, carve_val_splits([train], y, params)[1][0]

    (train, test, _), (_, other_test, _) = splits(0), splits(1)
    assert sorted([*train, *test]) == list(range(50)) and test.tolist() != other_test.tolist()
    val = [carve_val_splits([train], y, {"seed": seed, "val_fraction": 0.2})[1][0].tolist() for seed in (0, 1)]
    assert val[0] != val[1]  # the same train split, another seed: another validation split


def test_prepare_store_deterministic(tmp_path):
    a = prepare_store(tmp_path / "a.h5", PartitionSpec(**KW))
    b = prepare_store(tmp_path / "b.h5", PartitionSpec(**KW))
    assert a == tmp_path / "a.h5"
    with Store(a) as s:
        assert s.params == partition_params(PartitionSpec(**KW)) and s.num_clients == 4 and s.dataset == "digits"
        assert s.input_shape == (1, 8, 8) and s.proxy_size == 180
        assert sum(n for pair in s.client_sizes() for n in pair) == 1797 - 180
    assert _client_arrays(a) == _client_arrays(b)
    c = prepare_store(tmp_path / "c.h5", PartitionSpec(**{**KW, "seed": 2}))
    assert _client_arrays(a) != _client_arrays(c)


def test_partition_params_normalises_and_validates():
    p = partition_params(PartitionSpec("agnews", clients=3, alpha=1, proxy_fraction=0.1))
    assert p["alpha"] == 1.0 and p["loader_options"] == {"vocab_size": 20000, "max_len": 64}
    # Passing a default explicitly gives the same record, so ensure_store still matches.
    assert partition_params(PartitionSpec("agnews", clients=3, alpha=1, proxy_fraction=0.1,
                            loader_options={"vocab_size": 20000})) == p
    assert "loader_options" not in partition_params(PartitionSpec(**KW))
    with pytest.raises(ConfigError, match="takes no option"):
        partition_params(PartitionSpec(**KW, loader_options={"max_len": 3}))
    with pytest.raises(ConfigError, match="clients must be an integer"):
        partition_params(PartitionSpec(**{**KW, "clients": 2.5}))
    with pytest.raises(ConfigError, match="test_fraction"):
        partition_params(PartitionSpec(**{**KW, "test_fraction": 0}))
    with pytest.raises(DataError, match="unknown dataset"):
        partition_params(PartitionSpec(**{**KW, "dataset": "imagenet"}))


@pytest.mark.parametrize("value", ["abc", 2.5, 1e3, True, None, [64]])
@pytest.mark.parametrize("option", ["vocab_size", "max_len"])
def test_a_loader_option_of_the_wrong_type_is_one_config_error(tmp_path, option, value):
    """data.options reach the loaders unchecked by the config schema: an integer option given as
    text, a float, a bool or null is refused before the dataset is read, naming the option (it
    was a TypeError traceback from deep inside the tokenizer, exit status 1)."""
    spec = PartitionSpec("agnews", clients=3, alpha=1, proxy_fraction=0.1, loader_options={option: value})
    with pytest.raises(ConfigError, match=rf"^data.options.{option}: expected an integer for dataset agnews"):
        partition_params(spec)
    with pytest.raises(ConfigError, match=rf"^data.options.{option}: expected an integer"):
        load_dataset("agnews", str(tmp_path), **{option: value})  # before the missing folder is noticed


def test_a_run_config_with_a_bad_loader_option_exits_2_before_anything_is_written(tmp_path, capsys):
    from cafedist.cli import main

    (tmp_path / "ag").mkdir()
    for split in ("train.csv", "test.csv"):
        (tmp_path / "ag" / split).write_text('"1","a","b"\n' * 30)
    cache = tmp_path / "stores"
    rc = main(["train", "--dry-run", "data.dataset=agnews", f"data.root={tmp_path / 'ag'}", f"data.cache_dir={cache}",
               "data.clients=2", "data.min_size=2", "model.arch=transformer", "data.options={vocab_size: abc}",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("cafedist: error: data.options.vocab_size: expected an integer")
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "run").exists()
    assert not any(cache.glob("*.h5"))


@pytest.mark.parametrize("field,value", [
    ("clients", 0), ("alpha", 0.0), ("alpha", float("inf")), ("proxy_fraction", 1.0), ("test_fraction", 0.0),
    ("val_fraction", 1.0), ("min_size", 1), ("proxy_users", 0),
])
def test_prepare_and_a_run_config_refuse_the_same_partitions(field, value):
    """One set of rules: what data.* of a run config refuses, prepare refuses too, naming the field."""
    from cafedist.config import config_from_dict

    natural = field == "proxy_users"
    spec = {**KW, "dataset": "synthetic", "partition": "natural"} if natural else KW
    with pytest.raises(ConfigError, match=f"data.{field}: "):
        config_from_dict({"data": {**{k: v for k, v in spec.items() if k != "seed"}, field: value}})
    with pytest.raises(ConfigError, match=f"^{field}: "):
        partition_params(PartitionSpec(**{**spec, field: value}))


def test_ensure_store_reuses_and_refuses_other_params(tmp_path):
    out = tmp_path / "sub" / "s.h5"
    ensure_store(out, PartitionSpec(**KW))
    mtime = out.stat().st_mtime_ns
    assert ensure_store(out, PartitionSpec(**KW)) == out
    assert out.stat().st_mtime_ns == mtime  # reused, not rebuilt
    with pytest.raises(DataError, match=r'exists with params .*"alpha": 0.5.* but .*"alpha": 0.3.* are asked for'):
        ensure_store(out, PartitionSpec(**{**KW, "alpha": 0.3}))
    out.write_bytes(b"junk")  # an unreadable file is reported, never silently replaced
    with pytest.raises(DataError, match="cannot open as HDF5"):
        ensure_store(out, PartitionSpec(**KW))
    assert out.read_bytes() == b"junk"


@pytest.mark.parametrize("prepare", [True, False])
def test_a_run_start_checks_its_store_once(tmp_path, monkeypatch, prepare):
    """Opening a config's store reads every client group's metadata once, not again to
    compare its partition (a second check costs about a second per run at a thousand clients)."""
    from cafedist.config import config_from_dict
    from cafedist.data import store as store_mod
    from cafedist.run.build import open_store

    cfg = config_from_dict({"seed": KW["seed"], "data": {**{k: v for k, v in KW.items() if k != "seed"},
                                                         "cache_dir": str(tmp_path)}})
    ensure_store(cfg.data.store_path(cfg.seed), PartitionSpec.of(cfg.data, cfg.seed))
    checks = []
    original = store_mod.Store._validate
    monkeypatch.setattr(store_mod.Store, "_validate", lambda self: (checks.append(self.path), original(self)))
    with open_store(cfg, prepare) as store:
        assert store.num_clients == KW["clients"]
    assert len(checks) == 1


def _race(out: str, counter: str, barrier, results) -> None:
    """Child process: count real builds (slowed down to widen the race), then ensure the store."""
    original = prepare_mod.prepare_store

    def counting_build(*args, **kwargs):
        with open(counter, "a") as fh:
            fh.write("build\n")
        time.sleep(0.3)
        return original(*args, **kwargs)

    prepare_mod.prepare_store = counting_build
    try:
        barrier.wait(timeout=30)
        path = ensure_store(out, PartitionSpec(**KW))
        with Store(path) as s:
            results.put(("ok", s.client_sizes()))
    except Exception as exc:  # report to the parent instead of dying silently
        results.put(("error", repr(exc)))


def test_ensure_store_concurrent_single_build(tmp_path):
    ctx = mp.get_context("fork")  # children inherit the imported modules: fast start
    n = 3
    barrier, results = ctx.Barrier(n), ctx.Queue()
    out, counter = str(tmp_path / "s.h5"), str(tmp_path / "builds.txt")
    procs = [ctx.Process(target=_race, args=(out, counter, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert all(status == "ok" for status, _ in got), got
    assert len({str(sizes) for _, sizes in got}) == 1  # everyone sees the same store
    assert Path(counter).read_text().count("build") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builds.txt", "s.h5", "s.h5.lock"]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cafedist prepare")
    prepare_mod.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_prepare_and_describe(tmp_path, capsys):
    out = tmp_path / "cli.h5"
    args = _parse(["--dataset", "digits", "--clients", "3", "--alpha", "0.3", "--proxy-fraction", "0.2",
                   "--min-size", "5", "--seed", "4", "--out", str(out)])
    assert prepare_mod.main(args) == 0
    built = capsys.readouterr().out
    assert "dataset digits" in built and "3 clients" in built
    with Store(out) as s:
        assert s.params["seed"] == 4 and s.params["test_fraction"] == 0.2 and s.num_clients == 3
    assert prepare_mod.main(_parse(["--describe", str(out)])) == 0
    described = capsys.readouterr().out.strip().splitlines()
    assert described[:-1] == built.strip().splitlines()
    assert described[-1] == "checksums: all 13 arrays verified"  # 4 per client, the proxy set


def test_cli_prepare_replaces_no_existing_file_but_keeps_the_same_store(tmp_path, capsys):
    """--out may name anything: a user's file, a run's summary.json, the store runs depend on."""
    flags = ["--dataset", "digits", "--clients", "3", "--alpha", "0.3", "--proxy-fraction", "0.2"]
    thesis = tmp_path / "thesis.txt"
    thesis.write_text("my thesis\n")
    with pytest.raises(DataError, match=r"^--out .*thesis.txt exists and is not this store, so prepare leaves it"):
        prepare_mod.main(_parse([*flags, "--out", str(thesis)]))
    assert thesis.read_text() == "my thesis\n"
    store = tmp_path / "s.h5"
    prepare_mod.main(_parse([*flags, "--out", str(store)]))
    before = store.read_bytes()
    assert prepare_mod.main(_parse([*flags, "--out", str(store)])) == 0  # the same store: kept
    with pytest.raises(DataError, match=r"exists and is not this store.*exists with params"):
        prepare_mod.main(_parse([*flags[:-3], "0.5", *flags[-2:], "--out", str(store)]))  # another alpha
    assert store.read_bytes() == before
    assert "dataset digits" in capsys.readouterr().out


def test_describe_verifies_every_checksum(tmp_path):
    out = tmp_path / "d.h5"
    prepare_mod.main(_parse(["--dataset", "digits", "--clients", "3", "--alpha", "0.3", "--proxy-fraction", "0.2",
                             "--out", str(out)]))
    with Store(out) as s:  # flip one byte inside client 2's test images (read by nothing else --describe prints)
        offset = s._f["clients/00002/x_test"].id.get_offset()
    data = bytearray(out.read_bytes())
    data[offset + 5] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum mismatch in clients/00002/x_test"):
        prepare_mod.main(_parse(["--describe", str(out)]))
    damaged = out.read_bytes()
    with pytest.raises(DataError, match=r"^--out .*d.h5 holds a store of this dataset and partition, but it is "
                                        r"damaged.*checksum mismatch in clients/00002/x_test"):
        prepare_mod.main(_parse(["--dataset", "digits", "--clients", "3", "--alpha", "0.3", "--proxy-fraction",
                                 "0.2", "--out", str(out)]))  # it said "kept"
    assert out.read_bytes() == damaged


def test_cli_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs --alpha, --out"):
        prepare_mod.main(_parse(["--dataset", "digits", "--clients", "3", "--proxy-fraction", "0.2"]))
    with pytest.raises(SystemExit):  # --dataset and --describe are mutually exclusive
        _parse(["--dataset", "digits", "--describe", "x.h5"])
    with pytest.raises(DataError, match="does not exist"):
        prepare_mod.main(_parse(["--describe", str(tmp_path / "none.h5")]))
    # named the config field data.options, not the flag typed
    with pytest.raises(ConfigError, match=r"^--vocab-size, --max-len: dataset 'digits' takes no such option"):
        prepare_mod.main(_parse(["--dataset", "digits", "--clients", "3", "--alpha", "1", "--proxy-fraction",
                                 "0.2", "--vocab-size", "100", "--max-len", "9", "--out", str(tmp_path / "x.h5")]))
    assert not (tmp_path / "x.h5").exists()
    # synthetic takes loader options, but none that prepare has a flag for: no --users to suggest
    none = r"^--vocab-size: dataset 'synthetic' takes no such option \(it takes: none\)$"
    with pytest.raises(ConfigError, match=none):
        prepare_mod.main(_parse(["--dataset", "synthetic", "--clients", "3", "--alpha", "1", "--proxy-fraction",
                                 "0.2", "--vocab-size", "100", "--out", str(tmp_path / "x.h5")]))


def test_cli_an_empty_root_is_refused_like_an_empty_data_root(tmp_path, monkeypatch):
    """``--root "$DATA"`` with DATA unset read the dataset from the working directory (Path("")
    is "."), where data.root="" in a run config is refused: prepare refuses it too."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ag_news_csv").mkdir()
    for split in ("train.csv", "test.csv"):
        (tmp_path / "ag_news_csv" / split).write_text('"1","a","b"\n"2","c","d"\n' * 20)
    out = tmp_path / "s.h5"
    with pytest.raises(ConfigError, match=r"^--root: empty path"):
        prepare_mod.main(_parse(["--dataset", "agnews", "--root", "", "--clients", "2", "--alpha", "1",
                                 "--proxy-fraction", "0.1", "--min-size", "2", "--out", str(out)]))
    assert not out.exists()


def test_val_fraction_carves_from_train_and_leaves_test_alone(tmp_path):
    y = load_dataset("digits").y
    plain = partition_params(PartitionSpec(**KW))
    params = partition_params(PartitionSpec(**KW, val_fraction=0.1))
    assert "val_fraction" not in plain and params == {**plain, "val_fraction": 0.1}
    train, test, proxy = make_splits(y, params)
    assert [t.tolist() for t in test] == [t.tolist() for t in make_splits(y, plain)[1]]  # test unchanged
    kept, val = carve_val_splits(train, y, params)
    for before, tr, va in zip(train, kept, val):
        np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), before)
        assert len(np.intersect1d(tr, va)) == 0 and len(va) >= 1
        # per-class rounding: off from 10 % by at most half a sample per class present
        assert abs(len(va) - 0.1 * len(before)) <= 0.5 * len(np.unique(y[before]))
    assert carve_val_splits(train, y, plain) == (train, None)
    a = prepare_store(tmp_path / "a.h5", PartitionSpec(**KW, val_fraction=0.1))
    with Store(a) as s:
        assert s.has_val and s.params == params
        assert s.val_sizes() == [len(v) for v in val]
        assert [n_tr for n_tr, _ in s.client_sizes()] == [len(t) for t in kept]
        c = s.load_client(2)
        assert c.y_val.tolist() == y[val[2]].tolist() and c.x_val.shape[0] == len(val[2])
        assert "val_fraction=0.1" in s.describe() and " val " in s.describe()
    # a store without validation splits does not satisfy a run that asks for one, and vice versa
    b = prepare_store(tmp_path / "b.h5", PartitionSpec(**KW))
    with pytest.raises(DataError, match="exists with params"):
        ensure_store(b, PartitionSpec(**KW, val_fraction=0.1))
    with pytest.raises(ConfigError, match="val_fraction"):
        partition_params(PartitionSpec(**KW, val_fraction=1.0))



@pytest.mark.parametrize("max_len", [10**11, 10**20])
def test_a_max_len_beyond_this_machines_memory_is_one_line(tmp_path, capsys, max_len):
    """The [documents, max_len] token table is allocated whole: a max_len no machine can hold was
    a MemoryError (or, at 20 digits, numpy's ValueError) traceback; one too large for this machine
    only would fill pages until the kernel killed the process."""
    from cafedist.cli import main

    (tmp_path / "ag").mkdir()
    for split in ("train.csv", "test.csv"):
        (tmp_path / "ag" / split).write_text('"1","a b c","d"\n' * 30)
    rc = main(["prepare", "--dataset", "agnews", "--root", str(tmp_path / "ag"), "--clients", "2",
               "--alpha", "1", "--proxy-fraction", "0.1", "--max-len", str(max_len),
               "--out", str(tmp_path / "s.h5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"cafedist: error: agnews: max_len={max_len} needs ") and "GiB for 60 documents" in err[0]
    assert "the longest document has 4 words" in err[0] and not (tmp_path / "s.h5").exists()


def test_a_store_named_through_a_link_is_built_at_its_target(tmp_path):
    """`--out LINK` with LINK -> a store not built yet (a cache on another disk): the store
    replaced the link in the link's own folder, and the disk it pointed to stayed empty."""
    from cafedist.cli import main

    (tmp_path / "scratch").mkdir()
    link = tmp_path / "d.h5"
    link.symlink_to(tmp_path / "scratch" / "d.h5")
    rc = main(["prepare", "--dataset", "digits", "--clients", "2", "--alpha", "1", "--proxy-fraction", "0.1",
               "--out", str(link)])
    assert rc == 0 and link.is_symlink() and (tmp_path / "scratch" / "d.h5").is_file()
    assert Store(link).params["clients"] == 2
