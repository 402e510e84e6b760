"""A store records the source files it was built from; reusing it with other files warns.

A store's identity is its partition, so pointing data.root / --root at a corrected copy of a
dataset reused the old store without a word (prepare said "kept", train trained the old data).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

import h5py
import pytest
from test_data_loaders import _write_agnews, _write_cifar10, _write_tiny
from test_leaf import write_leaf

from cafedist.config import config_from_dict
from cafedist.data import PartitionSpec, Store, load_dataset, partition_params, prepare_store
from cafedist.data import prepare as prepare_mod
from cafedist.data import source as source_mod
from cafedist.data.registry import BUNDLED, DATASETS, SOURCES
from cafedist.data.store import HEADER_CHECKSUM_ATTR
from cafedist.run.build import open_store

DATA = dict(dataset="agnews", clients=2, alpha=1.0, proxy_fraction=0.1, min_size=2)
WARNING = "was built from other agnews files than"


def _agnews(root: Path) -> Path:
    """An AG News folder of 2 x 40 documents under ``root``; its train.csv."""
    rows = [[str(1 + i % 4), f"title {i} word{i % 7}", f"desc alpha beta {i % 5}"] for i in range(40)]
    _write_agnews(root / "ag_news_csv", rows, rows)
    return root / "ag_news_csv" / "train.csv"


def _change_one_byte(path: Path) -> None:
    """Another byte at the same place: same size, other contents."""
    data = bytearray(path.read_bytes())
    i = data.index(b"title 3 ") + len("title ")
    data[i:i + 1] = b"9"
    path.write_bytes(bytes(data))


def _prepare(root: Path, out: Path) -> int:
    parser = argparse.ArgumentParser()
    prepare_mod.add_arguments(parser)
    return prepare_mod.main(parser.parse_args(
        ["--dataset", "agnews", "--root", str(root), "--clients", "2", "--alpha", "1", "--proxy-fraction", "0.1",
         "--min-size", "2", "--out", str(out)]))


def _train_open(root: Path, out: Path) -> None:
    """Open the store ``out`` as `cafedist train` does (run.build.open_store)."""
    cfg = config_from_dict({"data": {**DATA, "root": str(root), "store": str(out)}, "model": {"arch": "transformer"}})
    open_store(cfg).close()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_every_dataset_under_a_root_lists_its_source_files():
    assert set(SOURCES) == set(DATASETS) - BUNDLED


@pytest.mark.parametrize("name,write,folder,count", [
    ("agnews", _agnews, "ag_news_csv", 2),
    ("cifar10", _write_cifar10, "cifar-10-batches-py", 7),  # six batches and the meta file
    ("tinyimagenet", _write_tiny, "tiny-imagenet-200", 8),  # wnids, val annotations, 6 images
    ("femnist", lambda root: write_leaf(root / "femnist" / "data" / "all_data"), "femnist/data/all_data", 2),
    ("shakespeare", lambda root: write_leaf(root / "all_data", "shakespeare", files=3), "all_data", 3),
])
def test_a_loader_reports_the_files_it_reads_as_the_listing_finds_them(tmp_path, name, write, folder, count):
    """The check on reuse lists the files without loading them: the listing must be what the
    loader read, or every reuse would hash the contents (or miss a file)."""
    write(tmp_path)
    listed = SOURCES[name](str(tmp_path))
    assert load_dataset(name, str(tmp_path)).source == listed
    assert listed.folder == tmp_path / folder and len(listed.files) == count
    assert all(path.is_file() and listed.folder in path.parents for path in listed.files)


def test_the_source_is_recorded_beside_the_partition_not_in_it(tmp_path):
    _agnews(tmp_path / "data")
    spec = PartitionSpec(**DATA)
    prepare_store(tmp_path / "s.h5", spec, tmp_path / "data")
    files = SOURCES["agnews"](str(tmp_path / "data"))
    with Store(tmp_path / "s.h5") as store:
        assert store.source == {"folder": str(tmp_path / "data" / "ag_news_csv"), "files": 2,
                                "stamp": source_mod.quick_stamp(files), "sha256": source_mod.content_digest(files)}
        assert store.params == partition_params(spec) and "source" not in store.params  # identity unchanged
        described = store.describe()
    assert f"source {tmp_path / 'data' / 'ag_news_csv'}: 2 files, stamp {store.source['stamp']}, " \
           f"content sha256 {store.source['sha256']}" in described.splitlines()
    cifar, _ = _write_cifar10(tmp_path / "c", n=10)
    prepare_store(tmp_path / "c.h5", PartitionSpec("cifar10", clients=2, alpha=1.0, proxy_fraction=0.1,
                                                   min_size=2), tmp_path / "c")
    with Store(tmp_path / "c.h5") as store:  # six batches and the meta file
        assert store.source["folder"] == str(cifar) and store.source["files"] == 7


def test_a_bundled_store_records_no_source(tmp_path):
    prepare_store(tmp_path / "d.h5", PartitionSpec("digits", clients=2, alpha=1.0, proxy_fraction=0.1))
    with Store(tmp_path / "d.h5") as store:
        assert store.source is None
        assert "source not recorded (bundled data, or a store built before" in store.describe()


def test_reuse_is_silent_for_the_same_files_and_warns_for_other_contents(tmp_path, caplog, monkeypatch, capsys):
    train_csv = _agnews(tmp_path / "data")
    out = tmp_path / "stores" / "s.h5"
    assert _prepare(tmp_path / "data", out) == 0
    built = out.read_bytes()
    caplog.set_level(logging.DEBUG)
    # the same files: the quick stamp decides, no content is read
    monkeypatch.setattr(source_mod, "content_digest", lambda s: pytest.fail("contents read on a matching stamp"))
    assert _prepare(tmp_path / "data", out) == 0
    assert _warnings(caplog) == []
    _train_open(tmp_path / "data", out)
    monkeypatch.undo()
    # touched only (a copy without -p does as much): contents read, found the same, silent
    st = train_csv.stat()
    os.utime(train_csv, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _prepare(tmp_path / "data", out) == 0
    shutil.copytree(tmp_path / "data", tmp_path / "copy")  # another folder, new dates, same files
    assert _prepare(tmp_path / "copy", out) == 0
    _train_open(tmp_path / "copy", out)
    assert _warnings(caplog) == []
    # one byte changed, same size: one warning naming the store and the folder, on prepare and on train
    _change_one_byte(tmp_path / "copy" / "ag_news_csv" / "train.csv")
    assert (tmp_path / "copy" / "ag_news_csv" / "train.csv").stat().st_size == st.st_size
    assert _prepare(tmp_path / "copy", out) == 0
    _train_open(tmp_path / "copy", out)
    warned = _warnings(caplog)
    assert len(warned) == 2 and warned[0] == warned[1]
    assert warned[0] == (f"store {out} was built from other agnews files than {tmp_path / 'copy' / 'ag_news_csv'} "
                         f"holds now (built from {tmp_path / 'data' / 'ag_news_csv'}): it is used as it is; "
                         f"to train on these files, give a new data.store")
    assert out.read_bytes() == built  # never changed
    caplog.clear()
    assert _prepare(tmp_path / "data", out) == 0  # the original files: silent again
    assert _warnings(caplog) == []
    capsys.readouterr()


def test_the_locked_path_checks_too(tmp_path, caplog, monkeypatch):
    """Another process may build the store while this one waits for the lock: it is reused
    after the lock, and checked there as well."""
    train_csv = _agnews(tmp_path / "data")
    out = tmp_path / "s.h5"
    prepare_store(out, PartitionSpec(**DATA), tmp_path / "data")
    _change_one_byte(train_csv)
    original, calls = prepare_mod.open_matching_store, []

    def built_meanwhile(path, want):  # absent at the first look, present after the lock
        calls.append(path)
        return None if len(calls) == 1 else original(path, want)

    monkeypatch.setattr(prepare_mod, "open_matching_store", built_meanwhile)
    with caplog.at_level(logging.WARNING):
        prepare_mod.open_ensured_store(out, PartitionSpec(**DATA), tmp_path / "data").close()
    assert len(calls) == 2 and len(_warnings(caplog)) == 1 and WARNING in _warnings(caplog)[0]


def test_no_check_without_a_record_a_root_or_the_dataset_under_it(tmp_path, caplog, capsys):
    train_csv = _agnews(tmp_path / "data")
    out = tmp_path / "s.h5"
    prepare_store(out, PartitionSpec(**DATA), tmp_path / "data")
    _change_one_byte(train_csv)
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.WARNING):
        for root in (None, tmp_path / "empty", tmp_path / "missing"):  # the store is used as before
            prepare_mod.open_ensured_store(out, PartitionSpec(**DATA), root).close()
        old = tmp_path / "old.h5"  # a store built before stores recorded their source (or checksummed their header)
        shutil.copy(out, old)
        with h5py.File(old, "a") as f:
            del f.attrs["source"], f.attrs[HEADER_CHECKSUM_ATTR]
        before = old.read_bytes()
        prepare_mod.open_ensured_store(old, PartitionSpec(**DATA), tmp_path / "data").close()
    assert _warnings(caplog) == []
    assert old.read_bytes() == before
    parser = argparse.ArgumentParser()
    prepare_mod.add_arguments(parser)
    assert prepare_mod.main(parser.parse_args(["--describe", str(old)])) == 0
    assert "source not recorded" in capsys.readouterr().out


def test_only_the_coordinator_checks_the_source_when_a_run_starts(tmp_path, caplog, monkeypatch):
    """Every rank opens the store: each stat-ed the files, read them all on a stamp mismatch
    (hundreds of MB per rank on a shared file system) and printed the same warning. Rank 0
    checks; the other ranks open the store as it is."""
    from types import SimpleNamespace

    from cafedist.run import build

    _agnews(tmp_path / "data")
    out = tmp_path / "s.h5"
    assert _prepare(tmp_path / "data", out) == 0
    _change_one_byte(tmp_path / "data" / "ag_news_csv" / "train.csv")
    cfg = config_from_dict({"data": {**DATA, "root": str(tmp_path / "data"), "store": str(out)},
                            "model": {"arch": "transformer"}})
    opened = []

    def stop_after_opening(cfg, rt, store, run_dir):  # the rest of building a run is not the point
        opened.append(store)
        raise RuntimeError("built enough")
    monkeypatch.setattr(build, "_build", stop_after_opening)
    caplog.set_level(logging.WARNING)
    for rank in (1, 0):
        with pytest.raises(RuntimeError, match="built enough"):
            build.build_run(cfg, SimpleNamespace(rank=rank, is_main=rank == 0))
    assert len(opened) == 2
    assert len(_warnings(caplog)) == 1  # rank 0's
    assert "(built from" not in _warnings(caplog)[0]  # the same folder: it said "than X holds now (built from X)"


def test_the_data_digest_is_the_samples_not_where_their_files_lay(tmp_path):
    """What a checkpoint records of its store (cafedist.run.checkpoint refuses a store holding
    other data): a build of the same partition from a copy of the files elsewhere holds the
    same data (the source record differs), one from files with another byte does not."""
    _agnews(tmp_path / "data")
    shutil.copytree(tmp_path / "data", tmp_path / "copy")
    _change_one_byte(_agnews(tmp_path / "edited"))
    digests, folders = [], []
    for name in ("data", "copy", "edited"):
        prepare_store(tmp_path / f"{name}.h5", PartitionSpec(**DATA), tmp_path / name)
        with Store(tmp_path / f"{name}.h5") as store:
            digests.append(store.data_digest())
            folders.append(store.source["folder"])
    assert digests[0] == digests[1] != digests[2] and len(set(folders)) == 3
