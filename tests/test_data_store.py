"""HDF5 store: round trip, transforms, validation and corruption handling."""

from __future__ import annotations

import errno
import hashlib
import os
import signal

import h5py
import numpy as np
import pytest
import torch
from conftest import cafedist_in_process

from cafedist.data import SCHEMA_VERSION, RawDataset, Store, write_store
from cafedist.data import store as store_mod
from cafedist.data.base import channel_stats
from cafedist.errors import DataError
from cafedist.interrupts import Interrupted, deferred_interrupts

PARAMS = {"dataset": "tiny", "clients": 3, "alpha": 0.5, "proxy_fraction": 0.2, "test_fraction": 0.2,
          "min_size": 2, "seed": 0}


def _image_raw(n=40, classes=4, seed=0) -> RawDataset:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 3, 4, 4), dtype=np.uint8)
    mean, std = channel_stats(x)
    return RawDataset("tiny", x, np.arange(n, dtype=np.int64) % classes, classes, "image", mean, std)


def _splits():
    """Three clients with train/test index arrays plus a proxy set, all disjoint (40 samples)."""
    train = [np.arange(0, 8), np.arange(10, 20), np.arange(22, 30)]
    test = [np.arange(8, 10), np.arange(20, 22), np.arange(30, 32)]
    return train, test, np.arange(32, 40)


@pytest.fixture
def image_store(tmp_path):
    raw = _image_raw()
    train, test, proxy = _splits()
    path = tmp_path / "s.h5"
    write_store(path, raw, train, test, proxy, PARAMS)
    return path, raw


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit_root(path, **attrs) -> None:
    """Set root attributes and refresh the header checksum: a store whose header a test makes
    odd on purpose, not one damaged since it was written."""
    with h5py.File(path, "r+") as f:
        for name, value in attrs.items():
            f.attrs[name] = value
        f.attrs[store_mod.HEADER_CHECKSUM_ATTR] = store_mod._header_digest(f.attrs)


def test_roundtrip_image(image_store):
    path, raw = image_store
    train, test, proxy = _splits()
    with Store(path) as s:
        assert (s.dataset, s.kind, s.num_classes, s.num_clients) == ("tiny", "image", 4, 3)
        assert s.input_shape == (3, 4, 4) and s.vocab_size is None and s.params == PARAMS
        assert s.client_sizes() == [(8, 2), (10, 2), (8, 2)] and s.proxy_size == 8
        c = s.load_client(1)
        mean = torch.tensor(raw.mean).view(-1, 1, 1)
        std = torch.tensor(raw.std).view(-1, 1, 1)
        expect = (torch.from_numpy(raw.x[train[1]]).float() / 255 - mean) / std
        assert c.x_train.dtype == torch.float32
        torch.testing.assert_close(c.x_train, expect)
        assert c.y_train.dtype == torch.int64 and c.y_train.tolist() == raw.y[train[1]].tolist()
        assert c.y_test.tolist() == raw.y[test[1]].tolist()
        torch.testing.assert_close(s.load_proxy(), (torch.from_numpy(raw.x[proxy]).float() / 255 - mean) / std)
        hist = s.label_histograms()
        assert hist.shape == (3, 4)
        assert hist.tolist() == [np.bincount(raw.y[t], minlength=4).tolist() for t in train]
        text = s.describe()
        assert "tiny" in text and "3 clients" in text and "proxy set 8" in text
        assert text.splitlines()[-2].split()[:3] == ["2", "8", "2"]  # last client row
    with h5py.File(path, "r") as f:
        assert "y" not in f["proxy"]  # the proxy set is unlabelled
        assert f.attrs["schema_version"] == SCHEMA_VERSION


def test_roundtrip_text_with_vocab(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, size=(30, 6)).astype(np.int64)
    vocab = ["<pad>", "<unk>"] + [f"w{i}" for i in range(48)]
    raw = RawDataset("txt", x, np.arange(30, dtype=np.int64) % 3, 3, "text", vocab_size=50, vocab=vocab)
    path = tmp_path / "t.h5"
    write_store(path, raw, [np.arange(0, 10), np.arange(10, 20)], [np.arange(20, 22), np.arange(22, 25)],
                np.arange(25, 30), PARAMS)
    with Store(path) as s:
        assert s.kind == "text" and s.vocab_size == 50 and s.input_shape == (6,) and s.mean == ()
        c = s.load_client(1, device="cpu")
        assert c.x_test.dtype == torch.int64 and c.x_test.tolist() == x[22:25].tolist()
        assert s.load_proxy().tolist() == x[25:].tolist()


def test_many_classes_describe(tmp_path):
    raw = _image_raw(n=60, classes=30)
    path = tmp_path / "m.h5"
    write_store(path, raw, [np.arange(0, 50)], [np.arange(50, 55)], np.arange(55, 60), PARAMS)
    with Store(path) as s:
        row = s.describe().splitlines()[-2]
        assert "30/30" in row and "0:2" in row  # classes present, then top labels


def test_write_is_atomic(tmp_path, monkeypatch):
    raw = _image_raw()
    train, test, proxy = _splits()
    calls = []

    def failing_put(group, name, arr):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return original(group, name, arr)

    original = store_mod._put
    monkeypatch.setattr(store_mod, "_put", failing_put)
    with pytest.raises(RuntimeError):
        write_store(tmp_path / "s.h5", raw, train, test, proxy, PARAMS)
    assert os.listdir(tmp_path) == []  # neither the target nor a temp file is left


def test_write_rejects_overlap(tmp_path):
    train, test, _ = _splits()
    with pytest.raises(ValueError, match="overlap"):
        write_store(tmp_path / "s.h5", _image_raw(), train, test, np.arange(5, 12), PARAMS)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"store .*nope.h5 does not exist"):
        Store(tmp_path / "nope.h5")


def test_truncated_file(image_store):
    path, _ = image_store
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"store .*s.h5: cannot open as HDF5") as err:
        Store(path)
    assert "\n" not in str(err.value)


def test_random_bytes(tmp_path):
    path = tmp_path / "r.h5"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match=r"r.h5: cannot open as HDF5"):
        Store(path)


def test_corrupt_dataset_bytes_fail_checksum(image_store):
    path, _ = image_store
    with h5py.File(path, "r") as f:
        offset = f["clients/00001/x_train"].id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(offset + 5)
        byte = fh.read(1)
        fh.seek(offset + 5)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with Store(path) as s:  # metadata is intact, so opening works...
        s.load_client(0)  # ...and other clients are still readable
        with pytest.raises(DataError, match=r"checksum mismatch in clients/00001/x_train"):
            s.load_client(1)


def test_wrong_schema_version(image_store):
    path, _ = image_store
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    expected = rf"schema version {SCHEMA_VERSION + 1}, but this cafedist reads version {SCHEMA_VERSION}"
    with pytest.raises(DataError, match=expected):
        Store(path)


def test_missing_group_and_bad_dtype(image_store):
    path, _ = image_store
    with h5py.File(path, "r+") as f:
        del f["clients/00002"]
    with pytest.raises(DataError, match=r"missing group clients/00002"):
        Store(path)
    _edit_root(path, num_clients=2)
    with h5py.File(path, "r+") as f:
        del f["clients/00001/y_test"]
        f["clients/00001"].create_dataset("y_test", data=np.zeros(2, np.float32))
    with pytest.raises(DataError, match=r"clients/00001/y_test is float32 \(2,\), expected int64"):
        Store(path)


def test_not_a_store(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["a"] = np.zeros(3)
    with pytest.raises(DataError, match="not a cafedist store"):
        Store(path)


def test_reader_never_modifies(image_store):
    path, _ = image_store
    before, mtime = _sha(path), path.stat().st_mtime_ns
    with Store(path) as s:
        s.load_client(0)
        s.load_proxy()
        s.describe()
    assert _sha(path) == before and path.stat().st_mtime_ns == mtime


def test_client_out_of_range(image_store):
    path, _ = image_store
    with Store(path) as s, pytest.raises(DataError, match=r"no client 3 \(the store has clients 0..2\)"):
        s.load_client(3)


def test_validation_split_round_trip_and_old_stores(tmp_path, image_store):
    raw = _image_raw()
    train, test, proxy = _splits()
    val = [np.arange(0, 2), np.arange(10, 11), np.empty(0, np.int64)]  # carved from train; one empty
    kept = [np.setdiff1d(t, v) for t, v in zip(train, val)]
    path = tmp_path / "v.h5"
    write_store(path, raw, kept, test, proxy, {**PARAMS, "val_fraction": 0.2}, client_val=val)
    with Store(path) as s:
        assert s.has_val and s.val_sizes() == [2, 1, 0]
        assert s.client_sizes() == [(6, 2), (9, 2), (8, 2)]
        c = s.load_client(0)
        assert c.y_val.tolist() == raw.y[val[0]].tolist() and c.x_val.dtype == torch.float32
        empty = s.load_client(2)
        assert empty.x_val.shape == (0, 3, 4, 4) and empty.y_val.shape == (0,)
        lines = s.describe().splitlines()
        assert lines[6].split()[:4] == ["client", "train", "val", "test"]
        assert lines[7].split()[:4] == ["0", "6", "2", "2"]
    with h5py.File(path, "r") as f:
        assert f["clients/00000/x_val"].attrs["sha256"]  # checksummed like every dataset
    with h5py.File(path, "r+") as f:  # corrupt a validation array: caught on read
        f["clients/00001/y_val"][0] = 3 - f["clients/00001/y_val"][0]
    with Store(path) as s, pytest.raises(DataError, match="checksum mismatch in clients/00001/y_val"):
        s.load_client(1)
    with pytest.raises(ValueError, match="overlap"):
        write_store(tmp_path / "o.h5", raw, train, test, proxy, PARAMS, client_val=val)
    # a version-1 store (written before validation splits) still loads, with empty ones
    old, _ = image_store
    with h5py.File(old, "r+") as f:
        f.attrs["schema_version"] = 1
        del f.attrs[store_mod.HEADER_CHECKSUM_ATTR]  # older than the header's checksum too
    with Store(old) as s:
        assert not s.has_val and s.val_sizes() == [0, 0, 0] and "val" not in s.describe().split()
        c = s.load_client(1)
        assert c.x_val.shape == (0, 3, 4, 4) and c.y_val.dtype == torch.int64


def test_validation_split_in_some_clients_only_is_rejected(tmp_path):
    train, test, proxy = _splits()
    path = tmp_path / "v.h5"
    write_store(path, _image_raw(), train, test, proxy, PARAMS)
    with h5py.File(path, "r+") as f:
        f["clients/00001"].create_dataset("x_val", data=np.zeros((0, 3, 4, 4), np.uint8))
    with pytest.raises(DataError, match="clients/00001 has a validation split but client 0 has none"):
        Store(path)


def test_a_labelled_proxy_set_is_rejected(image_store):
    """The proxy set is the public unlabelled data: a store carrying its labels is not one we wrote."""
    path, raw = image_store
    with h5py.File(path, "r+") as f:
        f["proxy"].create_dataset("y", data=raw.y[32:40])
    with pytest.raises(DataError, match="proxy/y exists, but the proxy set must be unlabelled"):
        Store(path)


def _rewrite_with_checksum(path, name: str, arr: np.ndarray) -> None:
    """Replace dataset ``name`` by ``arr`` with a matching checksum: content a checksum cannot catch."""
    with h5py.File(path, "r+") as f:
        del f[name]
        ds = f.create_dataset(name, data=arr)
        ds.attrs["sha256"] = hashlib.sha256(np.ascontiguousarray(arr).data).hexdigest()


@pytest.mark.parametrize("bad", [-1, 4, 99])  # 4: one past the last class (labels are 0-based)
def test_labels_outside_the_classes_are_refused_even_with_a_valid_checksum(image_store, bad):
    path, _ = image_store
    with Store(path) as s:
        y = s._read("clients/00001/y_train").copy()
    y[0] = bad
    _rewrite_with_checksum(path, "clients/00001/y_train", y)
    with Store(path) as s:
        s.load_client(0)
        with pytest.raises(DataError, match=rf"clients/00001/y_train holds labels {min(bad, 0)}\.\..* outside 0\.\.3"):
            s.load_client(1)
        with pytest.raises(DataError, match="outside 0..3"):
            s.describe()


@pytest.mark.parametrize("name,value", [("num_classes", 5), ("mean", np.array([0.5, 0.4, 0.4])),
                                        ("params", '{"alpha": 0.3}'), ("dataset", "digits")])
def test_a_root_attribute_changed_since_writing_fails_its_checksum(image_store, name, value):
    """The arrays carried checksums, the root attributes none: a damaged normalisation, class
    count or partition record was read as it stood (wrong inputs, or another store's identity)."""
    path, _ = image_store
    with h5py.File(path, "r+") as f:
        assert store_mod.HEADER_CHECKSUM_ATTR in f.attrs
        f.attrs[name] = value
    with pytest.raises(DataError, match="root attributes .* do not match their checksum: damaged"):
        Store(path)
    with h5py.File(path, "r+") as f:  # a store written before the checksum existed: read as before
        del f.attrs[store_mod.HEADER_CHECKSUM_ATTR]
    Store(path).close()


def test_params_must_be_a_json_object(image_store):
    path, _ = image_store
    _edit_root(path, params="[1, 2]")
    with pytest.raises(DataError, match="attribute 'params' must be a JSON object, got list"):
        Store(path)


@pytest.fixture
def ctrl_c_at_its_default():
    """SIGINT at Python's handler for the test, also where pytest started with it ignored (in
    the background of a script): an ignored SIGINT is rightly never deferred, nor raised."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_write_leaves_no_temp_file(tmp_path, monkeypatch, sig, ctrl_c_at_its_default):
    """Ctrl-C (raised anywhere, even in an h5py callback where it would be lost) and SIGTERM
    (which would end the process on the spot) wait for the next client, then stop the write."""
    raw = _image_raw()
    train, test, proxy = _splits()
    calls = []
    original = store_mod._put

    def signalled_put(group, name, arr):
        calls.append(name)
        if len(calls) == 2:
            os.kill(os.getpid(), sig)  # delivered now; recorded, not raised
        return original(group, name, arr)

    monkeypatch.setattr(store_mod, "_put", signalled_put)
    with pytest.raises(Interrupted) as info:
        write_store(tmp_path / "s.h5", raw, train, test, proxy, PARAMS)
    assert info.value.signum == sig
    assert len(calls) == 4  # the first client was finished, the second never begun
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler


def test_a_handler_of_the_caller_is_left_alone(tmp_path):
    """train's stop flag handles SIGTERM itself (checkpoint and requeue): the write goes on."""
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with deferred_interrupts() as check:
            os.kill(os.getpid(), signal.SIGTERM)
            check()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIGTERM]


def test_orphaned_temp_files_are_removed_under_the_store_lock(tmp_path, caplog):
    """A build killed with SIGKILL leaves its temp file; the next build (holding the lock) removes it."""
    from cafedist.data.prepare import ensure_store
    from cafedist.data.spec import PartitionSpec

    out = tmp_path / "d.h5"
    orphan = tmp_path / ".d.h5.0123abcd.tmp.h5"
    orphan.write_bytes(b"half a store")
    others = [tmp_path / ".e.h5.0123abcd.tmp.h5", tmp_path / "d.h5.notes", tmp_path / ".d.h5.0123abcd.tmp"]
    for p in others:
        p.write_text("not ours")
    ensure_store(out, PartitionSpec("digits", 3, 0.5, 0.1))
    assert not orphan.exists() and all(p.exists() for p in others)
    assert "left by a store build that was killed" in caplog.text
    with Store(out) as s:
        assert s.num_clients == 3


def test_a_full_disk_is_one_line_naming_the_store(tmp_path, monkeypatch):
    """A write that fails for want of space (a full disk, a quota) said HDF5's report of it:
    two lines with the time, the temporary file and a buffer address, the cause inside
    ("Can't close file (file write failed: ..."). Now: the system's words, naming the store."""
    # h5py's error on a full tmpfs, word for word but the file name (errno 28)
    report = ("Can't synchronously write data (file write failed: time = Mon Dec  7 05:57:57 2026\n, filename = "
              "'{}', file descriptor = 3, errno = 28, error message = 'No space left on device', buf = 0x55aa87d8e0c0, "
              "total write size = 2048, bytes this sub-write = 2048, offset = 4096)")
    original = store_mod._put

    def full_disk(group, name, arr):
        if name == "x_test":
            raise OSError(errno.ENOSPC, report.format(group.file.filename))
        return original(group, name, arr)

    monkeypatch.setattr(store_mod, "_put", full_disk)
    out = tmp_path / "d.h5"
    proc = cafedist_in_process("prepare", "--dataset", "digits", "--clients", "3", "--alpha", "0.5",
                               "--proxy-fraction", "0.1", "--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == f"cafedist: error: {out}: No space left on device"
    assert "buf =" not in proc.stderr
    assert os.listdir(tmp_path) == ["d.h5.lock"]  # no store, no temporary file


def test_a_sigterm_during_prepare_exits_143_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    from cafedist import cli

    original = store_mod._put
    monkeypatch.setattr(store_mod, "_put", lambda g, n, a: (os.kill(os.getpid(), signal.SIGTERM), original(g, n, a)))
    code = cli.main(["prepare", "--dataset", "digits", "--clients", "3", "--alpha", "0.5", "--proxy-fraction", "0.1",
                     "--out", str(tmp_path / "d.h5")])
    assert code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines()[-1] == "cafedist: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5.lock"]  # a lock file is never deleted


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_recorded_while_the_block_fails_is_raised_not_dropped(sig):
    """A Ctrl-C that arrived while a deferred block failed (a full disk amid eval's commit) was
    dropped with the block's error: a caller that reports the error and goes on ignored it."""
    with pytest.raises(Interrupted) as info:
        with deferred_interrupts():
            os.kill(os.getpid(), sig)
            raise OSError(28, "No space left on device")
    assert info.value.signum == sig and isinstance(info.value.__cause__, OSError)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
    with pytest.raises(OSError):  # no signal: the block's own error
        with deferred_interrupts():
            raise OSError(28, "No space left on device")
