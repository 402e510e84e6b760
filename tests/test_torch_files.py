"""Checkpoint shards and parked client state are streamed to disk, and a full disk is reported
as ENOSPC naming the file (torch's own writer would raise an opaque RuntimeError)."""

from __future__ import annotations

import errno
import hashlib
import io
import os

import pytest
import torch
from test_residency import tiny

from cafedist import cli
from cafedist.run import residency
from cafedist.run.torch_files import save_torch_to


def _obj() -> dict:
    return {"w": torch.arange(12.0).reshape(3, 4), "meta": [1, {"b": torch.ones(2, dtype=torch.int64)}]}


def test_streamed_bytes_are_torch_saves_bytes_and_the_hash_is_theirs(tmp_path):
    path = tmp_path / "x.pt"
    with open(path, "wb") as fh:
        digest = save_torch_to(_obj(), fh, path)
    reference = io.BytesIO()
    torch.save(_obj(), reference)
    data = path.read_bytes()
    assert data == reference.getvalue()
    assert digest == hashlib.sha256(data).hexdigest()
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], _obj()["w"])
    assert torch.equal(loaded["meta"][1]["b"], torch.ones(2, dtype=torch.int64))


class _FillsUp(io.RawIOBase):
    """A file that accepts ``room`` bytes, then fails like a full disk."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return size


@pytest.mark.parametrize("room", [0, 100, 2000])  # the first write, a header, a tensor's bytes
def test_a_full_disk_is_enospc_naming_the_file(tmp_path, room):
    with pytest.raises(OSError) as info:
        save_torch_to({"w": torch.zeros(1000)}, _FillsUp(room), tmp_path / "client_00007.pt")
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(tmp_path / "client_00007.pt")


class _FailsOnClose(_FillsUp):
    """Takes every write, then fails to flush them on close (a buffered file on a full disk)."""

    def __init__(self) -> None:
        super().__init__(10**12)

    def close(self) -> None:
        if not self.closed:
            super().close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("fails", ["writing", "closing"])
def test_a_full_disk_while_parking_client_state_is_one_line(tmp_path, store_cache, monkeypatch, capsys, fails):
    """train.client_state: disk on a full disk: exit 2 and one line naming the parked file."""
    import yaml

    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode:
            open(path, mode).close()  # the temp file exists, as it would
            return _FillsUp(0) if fails == "writing" else _FailsOnClose()
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(residency, "open", full_disk, raising=False)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny(store_cache, "fedavg", resident_clients=2, client_state="disk")))
    out = tmp_path / "run"
    status = cli.main(["train", "--config", str(cfg), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith(f"cafedist: error: {out / 'client_state'}")
    assert err[0].endswith(os.strerror(errno.ENOSPC))
    assert not list((out / "client_state").glob("*.tmp"))  # the partial file is removed
