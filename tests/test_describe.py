"""`cafedist prepare --describe STORE`: the path it is given and the flags that go with it."""

from __future__ import annotations

import pytest
from conftest import cafedist_in_process


def test_an_empty_describe_path_is_named(tmp_path):
    """`--describe ''` (an unset shell variable) was taken as no --describe at all: the error
    asked for `--clients, --alpha, --proxy-fraction, --out`, as if a store were to be built."""
    proc = cafedist_in_process("prepare", "--describe", "")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "cafedist: error: --describe: empty path; expected an HDF5 store file"


@pytest.mark.parametrize("extra,named", [
    (["--out", "other.h5"], "--out"),
    (["--clients", "5", "--seed", "3"], "--clients, --seed"),
    (["--val-fraction", "0.2"], "--val-fraction"),
])
def test_build_flags_with_describe_are_refused_not_ignored(tmp_path, extra, named):
    """`prepare --describe S --out X --clients 5` printed S and ignored the rest: one who
    meant to build (or to check a store of that partition) was told nothing. Refused before the
    store is read, naming the flags."""
    proc = cafedist_in_process("prepare", "--describe", str(tmp_path / "missing.h5"), *extra)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"cafedist: error: prepare --describe only reads a store; {named}: ")
    assert not (tmp_path / "other.h5").exists()
