"""The prepared federated dataset: one HDF5 file, written once, read by every rank.

Layout (``SCHEMA_VERSION`` 2; version 1 is the same without validation splits and is still read)::

    /                       attrs:
        schema_version      int, == SCHEMA_VERSION
        dataset             str, loader name (e.g. "cifar10")
        kind                str, "image" | "text"
        num_classes         int
        num_clients         int
        input_shape         int64[], shape of one sample: (C, H, W) or (L,)
        mean, std           float64[C], per-channel stats of x/255 (images); empty for text
        vocab_size          int, incl. pad=0 and unk=1 (text); 0 for images
        params              str, JSON of the partition parameters (dataset, clients, alpha,
                            proxy_fraction, test_fraction, min_size, seed[, loader_options]
                            [, val_fraction]; a natural partition has partition="natural"
                            [, proxy_users] instead of alpha and proxy_fraction)
        source              (optional) str, JSON {folder, files, stamp, sha256}: the source
                            files under a data root it was built from (cafedist.data.source);
                            not part of ``params``, so no store's name or identity depends on it
    /clients/00000/         one group per client, named by zero-padded client id;
                            attr ``user`` (natural partition only): the source's user name
        x_train  x_test     uint8 [n, C, H, W] (images) or int64 [n, L] token ids (text)
        y_train  y_test     int64 [n], labels 0..num_classes-1
        x_val    y_val      (optional, in every client or none) the validation split, carved
                            from the client's train split (``val_fraction`` > 0); may be empty
    /proxy/x                the public proxy set: inputs only, NO labels (it is unlabelled)
    /vocab                  (text, optional) uint8: UTF-8 of the id-ordered tokens joined by "\\n"

Every dataset carries an attribute ``sha256`` (hex digest of its C-ordered little-endian
bytes), checked whenever the data is read. Datasets are stored contiguous and uncompressed:
client arrays are small and read whole, and a plain layout keeps reads cheap on parallel
file systems. The file is written to a temporary name and renamed into place, so readers
see either no store or a complete one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import h5py
import numpy as np
import torch

from cafedist.data.base import RawDataset
from cafedist.errors import DataError
from cafedist.fsutil import atomic_output
from cafedist.interrupts import deferred_interrupts

SCHEMA_VERSION = 2
#: versions this reader accepts: 1 predates validation splits and reads as "no validation split"
READABLE_VERSIONS = (1, 2)
CHECKSUM_ATTR = "sha256"
SOURCE_ATTR = "source"
#: sha256 of the root attributes (:func:`_header_digest`): the arrays carry their own checksums,
#: the header (normalisation, classes, partition) had none; stores written before it have none
HEADER_CHECKSUM_ATTR = "header_sha256"
CLIENT_FIELDS = ("x_train", "y_train", "x_test", "y_test")
VAL_FIELDS = ("x_val", "y_val")
ROOT_ATTRS = ("schema_version", "dataset", "kind", "num_classes", "num_clients", "input_shape",
              "mean", "std", "vocab_size", "params")


#: the extension of a store's temporary file while it is written (h5py needs none; it marks the type)
STORE_SUFFIX = ".h5"


def _client_group(cid: int) -> str:
    return f"clients/{cid:05d}"


def _sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).data).hexdigest()


def _put(group: h5py.Group, name: str, arr: np.ndarray) -> None:
    # Explicit little-endian dtypes make the checksum independent of the writer's platform.
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    ds = group.create_dataset(name, data=arr)
    ds.attrs[CHECKSUM_ATTR] = _sha256(arr)


def _attr_rows(attrs: h5py.AttributeManager, names: Sequence[str]) -> list[list[Any]]:
    """``[name, value]`` of each of ``names`` that ``attrs`` holds, as plain JSON values."""
    def plain(value: Any) -> Any:
        return np.asarray(value).tolist() if isinstance(value, (np.ndarray, np.generic)) else str(value)
    return [[name, plain(attrs[name])] for name in names if name in attrs]


def _header_digest(attrs: h5py.AttributeManager) -> str:
    """sha256 of the root attributes a reader uses (:data:`ROOT_ATTRS` and the source record),
    as read back from the file: the same value at write and at every read of an intact store."""
    return hashlib.sha256(json.dumps(_attr_rows(attrs, (*ROOT_ATTRS, SOURCE_ATTR))).encode()).hexdigest()


def _check_split(raw: RawDataset, client_train: Sequence[np.ndarray], client_test: Sequence[np.ndarray],
                 proxy_idx: np.ndarray, client_val: Sequence[np.ndarray] | None = None) -> None:
    """Programming-error checks: the index sets must be valid and pairwise disjoint."""
    if len(client_train) != len(client_test) or not client_train:
        raise ValueError("write_store: need one train and one test index array per client (>= 1 client)")
    if client_val is not None and len(client_val) != len(client_train):
        raise ValueError("write_store: need one validation index array per client")
    every = np.concatenate([np.asarray(a, dtype=np.int64)
                            for a in (*client_train, *client_test, *(client_val or ()), proxy_idx)])
    if len(every) and (every.min() < 0 or every.max() >= len(raw.x)):
        raise ValueError(f"write_store: indices out of range for {len(raw.x)} samples")
    if len(np.unique(every)) != len(every):
        raise ValueError("write_store: client train/test/val and proxy indices overlap")


def write_store(path: str | Path, raw: RawDataset, client_train: Sequence[np.ndarray],
                client_test: Sequence[np.ndarray], proxy_idx: np.ndarray, params: dict,
                client_val: Sequence[np.ndarray] | None = None, client_users: Sequence[str] | None = None,
                source: Mapping[str, Any] | None = None) -> None:
    """Write the store for ``raw`` split by the given index arrays (atomically).

    ``client_val`` (one array per client, possibly empty) adds validation splits; None
    writes none. ``client_users`` (natural partition) names each client's source user.
    ``source`` is the record of the source files (:func:`cafedist.data.source.fingerprint`).
    """
    _check_split(raw, client_train, client_test, proxy_idx, client_val)
    if client_users is not None and len(client_users) != len(client_train):
        raise ValueError("write_store: need one user name per client")
    # an interrupt (Ctrl-C, SIGTERM) lands between clients, where atomic_output removes the temp file
    with atomic_output(path, suffix=STORE_SUFFIX, now=True) as tmp, deferred_interrupts() as check, \
            _os_words():
        with h5py.File(tmp, "w") as f:
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["dataset"] = raw.name
            f.attrs["kind"] = raw.kind
            f.attrs["num_classes"] = int(raw.num_classes)
            f.attrs["num_clients"] = len(client_train)
            f.attrs["input_shape"] = np.asarray(raw.input_shape, dtype=np.int64)
            f.attrs["mean"] = np.asarray(raw.mean or (), dtype=np.float64)
            f.attrs["std"] = np.asarray(raw.std or (), dtype=np.float64)
            f.attrs["vocab_size"] = int(raw.vocab_size or 0)
            f.attrs["params"] = json.dumps(params, sort_keys=True)
            if source is not None:
                f.attrs[SOURCE_ATTR] = json.dumps(dict(source), sort_keys=True)
            f.attrs[HEADER_CHECKSUM_ATTR] = _header_digest(f.attrs)
            for cid, (tr, te) in enumerate(zip(client_train, client_test)):
                check()
                g = f.create_group(_client_group(cid))
                if client_users is not None:
                    g.attrs["user"] = client_users[cid]
                _put(g, "x_train", raw.x[tr])
                _put(g, "y_train", raw.y[tr])
                _put(g, "x_test", raw.x[te])
                _put(g, "y_test", raw.y[te])
                if client_val is not None:
                    va = np.asarray(client_val[cid], dtype=np.int64)
                    _put(g, "x_val", raw.x[va])
                    _put(g, "y_val", raw.y[va])
            _put(f.create_group("proxy"), "x", raw.x[np.asarray(proxy_idx, dtype=np.int64)])
            if raw.vocab is not None:
                _put(f, "vocab", np.frombuffer("\n".join(raw.vocab).encode("utf-8"), dtype=np.uint8))


@contextlib.contextmanager
def _os_words() -> Iterator[None]:
    """Give an OSError of HDF5 (a full disk, a quota) the system's words for its errno:
    h5py's own text is HDF5's report over two lines (the time, the temporary file, a buffer
    address), where the cause hides. :func:`atomic_output` then names the store."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        raise OSError(exc.errno, os.strerror(exc.errno)) from exc


@dataclass(frozen=True)
class _StoreHeader:
    """A store's root attributes, read and checked (:func:`_read_header`)."""

    schema_version: int
    dataset: str
    kind: str  # "image" | "text"
    num_classes: int
    num_clients: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    vocab_size: int | None  # None for images
    params: dict[str, Any]
    source: dict[str, Any] | None  # the source files' record; None when the store has none

    @property
    def x_dtype(self) -> np.dtype:
        """The dtype of stored inputs: uint8 pixels or int64 token ids."""
        return np.dtype(np.uint8 if self.kind == "image" else np.int64)


def _read_header(attrs: h5py.AttributeManager, fail: Callable[[str], DataError]) -> _StoreHeader:
    """The checked root attributes of a store; ``fail(problem)`` makes the error raised for a bad one.

    h5py and conversion errors (a corrupt file) pass through for the caller to report.
    """
    version = _readable_version(attrs, fail)
    missing = [a for a in ROOT_ATTRS if a not in attrs]
    if missing:
        raise fail(f"missing root attribute(s) {missing}")
    if HEADER_CHECKSUM_ATTR in attrs and str(attrs[HEADER_CHECKSUM_ATTR]) != _header_digest(attrs):
        raise fail("its root attributes (normalisation, classes, partition) do not match their checksum: "
                   "damaged; delete it and prepare it again")
    header = _StoreHeader(
        schema_version=version,
        dataset=str(attrs["dataset"]),
        kind=str(attrs["kind"]),
        num_classes=int(attrs["num_classes"]),
        num_clients=int(attrs["num_clients"]),
        input_shape=tuple(int(v) for v in np.asarray(attrs["input_shape"])),
        mean=tuple(float(v) for v in np.asarray(attrs["mean"])),
        std=tuple(float(v) for v in np.asarray(attrs["std"])),
        vocab_size=int(attrs["vocab_size"]) or None,
        params=_params(attrs, fail),
        source=_source(attrs),
    )
    if header.kind not in ("image", "text") or header.num_classes < 1 or header.num_clients < 1:
        raise fail(f"bad root attributes kind={header.kind!r} num_classes={header.num_classes} "
                   f"num_clients={header.num_clients}")
    return header


def _readable_version(attrs: h5py.AttributeManager, fail: Callable[[str], DataError]) -> int:
    """The schema version, which this reader must accept."""
    if "schema_version" not in attrs:
        raise fail("not a cafedist store (no 'schema_version' attribute)")
    version = int(attrs["schema_version"])
    if version not in READABLE_VERSIONS:
        raise fail(f"schema version {version}, but this cafedist reads version {SCHEMA_VERSION} "
                   f"(or older: {', '.join(map(str, READABLE_VERSIONS[:-1]))}); "
                   f"re-create the store with `cafedist prepare`")
    return version


def _params(attrs: h5py.AttributeManager, fail: Callable[[str], DataError]) -> dict[str, Any]:
    """The partition parameters: a JSON object."""
    try:
        params = json.loads(str(attrs["params"]))
    except json.JSONDecodeError:
        raise fail("attribute 'params' is not valid JSON") from None
    if not isinstance(params, dict):
        raise fail(f"attribute 'params' must be a JSON object, got {type(params).__name__}")
    return params


def _source(attrs: h5py.AttributeManager) -> dict[str, Any] | None:
    """The ``source`` record, or None when absent: it only feeds a warning and ``describe``, so
    an unreadable one counts as absent rather than making the store unusable."""
    try:
        source = json.loads(str(attrs[SOURCE_ATTR])) if SOURCE_ATTR in attrs else None
    except json.JSONDecodeError:
        return None
    return source if isinstance(source, dict) else None


@dataclass
class ClientData:
    """One client's data as tensors on a device (inputs already normalised).

    ``x_val``/``y_val`` hold the validation split (also the calibration split of later
    choices, e.g. per-client exit budgets); left out, they become empty tensors shaped like
    the test split, which is what a store without validation splits gives.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.x_val is None:
            self.x_val = self.x_test[:0]
        if self.y_val is None:
            self.y_val = self.y_test[:0]


class Store:
    """Read-only, validating reader of a store file; use as a context manager or ``close()``.

    Opening checks the schema version, the root attributes and every group's dataset names,
    shapes and dtypes (metadata only); data is read lazily, one client at a time, and its
    checksum is verified on every read. Any problem raises a one-line :class:`DataError`
    naming the file. The file is never modified.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._data_digest: str | None = None
        self._checked: list[str] = []  # the datasets opening checked, for data_digest
        if self.path.exists() and not self.path.is_file():
            raise DataError(f"store {self.path} is not a file (expected an HDF5 store written by `cafedist prepare`)")
        if not self.path.is_file():
            raise DataError(f"store {self.path} does not exist "
                            f"(create it with `cafedist prepare ... --out {self.path}`)")
        with self._guard("cannot open as HDF5 (truncated or corrupt file?)"):
            # locking=False: we never write in place (stores are renamed into place), and
            # HDF5's file locks fail on some cluster file systems (NFS, Lustre without flock).
            self._f = h5py.File(self.path, "r", locking=False)
        try:
            with self._guard("unreadable metadata (truncated or corrupt file?)"):
                self._validate()
        except BaseException:
            self._f.close()
            raise

    # -- opening -------------------------------------------------------------------------
    def _fail(self, problem: str) -> DataError:
        return DataError(f"store {self.path}: {problem}")

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn h5py's low-level exceptions into one-line DataErrors naming the file."""
        try:
            yield
        except DataError:
            raise
        except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
            detail = " ".join(str(exc).split())
            raise self._fail(f"{what}: {detail}") from None

    def _validate(self) -> None:
        """Check the metadata (no data is read) and set the store's attributes from it."""
        header = _read_header(self._f.attrs, self._fail)
        self.schema_version = header.schema_version
        self.dataset = header.dataset
        self.kind = header.kind
        self.num_classes = header.num_classes
        self.num_clients = header.num_clients
        self.input_shape = header.input_shape
        self.mean = header.mean
        self.std = header.std
        self.vocab_size = header.vocab_size
        self.params = header.params
        self.source = header.source
        # validation splits exist in every client or in none (version 1 stores: none)
        self.has_val = header.schema_version >= 2 and self.num_clients >= 1 and f"{_client_group(0)}/x_val" in self._f
        self._sizes, self._val_sizes = self._check_clients(header.x_dtype)
        self.proxy_size = self._check_proxy(header.x_dtype)

    def _client_fields(self) -> tuple[str, ...]:
        """The datasets of every client group: train and test, and val where the store has it."""
        return CLIENT_FIELDS + (VAL_FIELDS if self.has_val else ())

    def _check_clients(self, x_dtype: np.dtype) -> tuple[list[tuple[int, int]], list[int]]:
        """Check every client group and that there are no others; ``(n_train, n_test)`` and n_val per client."""
        sizes: list[tuple[int, int]] = []
        val_sizes: list[int] = []
        for cid in range(self.num_clients):
            lengths = self._check_client(cid, x_dtype)
            sizes.append((lengths["x_train"], lengths["x_test"]))
            val_sizes.append(lengths.get("x_val", 0))
        extra = set(self._f["clients"]) - {_client_group(c).split("/")[1] for c in range(self.num_clients)}
        if extra:
            raise self._fail(f"unexpected client group(s) {sorted(extra)[:3]} for num_clients={self.num_clients}")
        return sizes, val_sizes

    def _check_client(self, cid: int, x_dtype: np.dtype) -> dict[str, int]:
        """Check client ``cid``'s datasets and that x and y agree in length; the length of each."""
        name = _client_group(cid)
        if name not in self._f:
            raise self._fail(f"missing group {name} (num_clients={self.num_clients})")
        lengths = {field: self._check_dataset(f"{name}/{field}", x_dtype if field[0] == "x" else np.dtype(np.int64),
                                              self.input_shape if field[0] == "x" else ())
                   for field in self._client_fields()}
        parts = [part for part in ("train", "test", "val") if f"x_{part}" in lengths]
        if any(lengths[f"x_{part}"] != lengths[f"y_{part}"] for part in parts):
            raise self._fail(f"{name}: x and y lengths differ")
        if not self.has_val and any(f"{name}/{field}" in self._f for field in VAL_FIELDS):
            raise self._fail(f"{name} has a validation split but client 0 has none (expected all or none)")
        return lengths

    def _check_proxy(self, x_dtype: np.dtype) -> int:
        """Check the proxy inputs and that the proxy set has no labels; its size."""
        size = self._check_dataset("proxy/x", x_dtype, self.input_shape)
        if "proxy/y" in self._f:
            raise self._fail("proxy/y exists, but the proxy set must be unlabelled")
        return size

    def _check_dataset(self, name: str, dtype: np.dtype, sample_shape: tuple[int, ...]) -> int:
        """Check that dataset ``name`` exists with ``dtype`` and ``[n, *sample_shape]``; return n."""
        if name not in self._f:
            raise self._fail(f"missing dataset {name}")
        ds = self._f[name]
        if not isinstance(ds, h5py.Dataset):
            raise self._fail(f"{name} is not a dataset")
        if ds.dtype != dtype or ds.ndim != 1 + len(sample_shape) or tuple(ds.shape[1:]) != sample_shape:
            expected = ", ".join(["n", *map(str, sample_shape)])
            raise self._fail(f"{name} is {ds.dtype} {ds.shape}, expected {dtype} [{expected}]")
        if CHECKSUM_ATTR not in ds.attrs:
            raise self._fail(f"{name} has no '{CHECKSUM_ATTR}' checksum attribute")
        self._checked.append(name)
        return int(ds.shape[0])

    # -- reading -------------------------------------------------------------------------
    def _read(self, name: str) -> np.ndarray:
        """Read a whole dataset and verify its checksum."""
        with self._guard(f"cannot read {name}"):
            ds = self._f[name]
            arr = ds[()]
            expected = str(ds.attrs[CHECKSUM_ATTR])
        if _sha256(arr) != expected:
            raise self._fail(f"checksum mismatch in {name}: the file is corrupt (re-create it with `cafedist prepare`)")
        if name.rsplit("/", 1)[-1].startswith("y_") and arr.size and (arr.min() < 0 or arr.max() >= self.num_classes):
            raise self._fail(f"{name} holds labels {arr.min()}..{arr.max()}, outside 0..{self.num_classes - 1} "
                             f"(re-create it with `cafedist prepare`)")
        return arr

    def to_inputs(self, x: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
        """Model inputs from stored samples: images -> float32 ``(x/255 - mean)/std``, text -> int64."""
        t = torch.from_numpy(np.ascontiguousarray(x)).to(device)  # copy uint8, convert on the device
        if self.kind == "text":
            return t.long()
        t = t.float().div_(255.0)
        if self.mean:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=t.device).view(-1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=t.device).view(-1, 1, 1)
            t = t.sub_(mean).div_(std)
        return t

    def client_sizes(self) -> list[tuple[int, int]]:
        """``(n_train, n_test)`` per client, from metadata only."""
        return list(self._sizes)

    def client_user(self, cid: int) -> str | None:
        """The source user of client ``cid`` (natural partition), else None."""
        with self._guard(f"cannot read {_client_group(cid)}"):
            user = self._f[_client_group(cid)].attrs.get("user")
        return None if user is None else str(user)

    def val_sizes(self) -> list[int]:
        """Validation samples per client, from metadata only (all 0 without validation splits)."""
        return list(self._val_sizes)

    def load_client(self, cid: int, device: str | torch.device = "cpu") -> ClientData:
        """Client ``cid``'s train/test(/val) tensors on ``device`` (reads only that client's arrays)."""
        if not 0 <= cid < self.num_clients:
            raise self._fail(f"no client {cid} (the store has clients 0..{self.num_clients - 1})")
        arrays = {field: self._read(f"{_client_group(cid)}/{field}") for field in self._client_fields()}
        data = ClientData(
            x_train=self.to_inputs(arrays["x_train"], device),
            y_train=torch.from_numpy(arrays["y_train"]).to(device),
            x_test=self.to_inputs(arrays["x_test"], device),
            y_test=torch.from_numpy(arrays["y_test"]).to(device),
        )
        if self.has_val:
            data.x_val = self.to_inputs(arrays["x_val"], device)
            data.y_val = torch.from_numpy(arrays["y_val"]).to(device)
        return data

    def load_proxy(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """The unlabelled proxy inputs on ``device``, transformed like client inputs."""
        return self.to_inputs(self._read("proxy/x"), device)

    def verify(self) -> int:
        """Check every dataset's sha256 (reading the whole file, in slices); returns how many.

        Raises DataError naming the first corrupt dataset. Opening the store checks metadata
        only and each read checks what it reads: this is the full check (``prepare --describe``).
        """
        names: list[str] = []
        self._f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        for name in sorted(names):
            with self._guard(f"cannot read {name}"):
                ds = self._f[name]
                expected = str(ds.attrs.get(CHECKSUM_ATTR, ""))
                digest = hashlib.sha256()
                step = max(1, (1 << 24) // max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))))
                for lo in range(0, ds.shape[0] if ds.ndim else 1, step):
                    part = ds[lo:lo + step] if ds.ndim else ds[()]
                    digest.update(np.ascontiguousarray(part).data)
            if digest.hexdigest() != expected:
                raise self._fail(f"checksum mismatch in {name}: the file is corrupt "
                                 f"(re-create it with `cafedist prepare`)")
        return len(names)

    def label_histograms(self) -> np.ndarray:
        """int64 ``[num_clients, num_classes]``: count of each label in each client's train split."""
        out = np.zeros((self.num_clients, self.num_classes), dtype=np.int64)
        for cid in range(self.num_clients):
            y = self._read(f"{_client_group(cid)}/y_train")
            out[cid] = np.bincount(y, minlength=self.num_classes)[: self.num_classes]
        return out

    def describe(self) -> str:
        """A human-readable summary: header, then per-client sizes (train, val if any, test) and
        train label histogram."""
        hist = self.label_histograms()
        shape = "x".join(map(str, self.input_shape))
        lines = [
            f"store {self.path} (schema {self.schema_version})",
            f"dataset {self.dataset}: {self.kind}, {self.num_classes} classes, input {shape}"
            + (f", vocab {self.vocab_size}" if self.vocab_size else ""),
            f"{self.num_clients} clients, proxy set {self.proxy_size} unlabelled samples",
            "params " + " ".join(f"{k}={v}" for k, v in sorted(self.params.items())),
            self._source_line(),
            "",
        ]
        sizes = np.asarray(self._sizes, dtype=np.int64).reshape(-1, 2)
        width = max(4, len(str(int(hist.max(initial=0)))))
        if self.num_classes <= 20:  # small label sets: one column per class
            head = " ".join(f"{c:>{width}}" for c in range(self.num_classes))
            rows = [" ".join(f"{v:>{width}}" for v in h) for h in hist]
            total = " ".join(f"{v:>{width}}" for v in hist.sum(0))
        else:  # large label sets: how many classes are present and the five most frequent
            head = "top labels (label:count)"
            rows = [" ".join(f"{c}:{h[c]}" for c in np.argsort(-h, kind="stable")[:5] if h[c]) for h in hist]
            total = ""
        # the val column appears only for stores with validation splits (old output unchanged)
        val = [f" {v:>5}" for v in self._val_sizes] if self.has_val else [""] * self.num_clients
        val_head, val_total = (f" {'val':>5}", f" {sum(self._val_sizes):>5}") if self.has_val else ("", "")
        lines.append(f"{'client':>6} {'train':>7}{val_head} {'test':>6} {'labels':>7}  {head}")
        for cid, ((n_tr, n_te), row) in enumerate(zip(sizes, rows)):
            present = f"{int((hist[cid] > 0).sum())}/{self.num_classes}"
            lines.append(f"{cid:>6} {n_tr:>7}{val[cid]} {n_te:>6} {present:>7}  {row}")
        lines.append(f"{'total':>6} {sizes[:, 0].sum():>7}{val_total} {sizes[:, 1].sum():>6} {'':>7}  {total}".rstrip())
        return "\n".join(lines)

    def data_digest(self) -> str:
        """sha256 of the data the store holds: its root attributes but the schema version (the
        partition, classes, normalisation) and every dataset's name and checksum; metadata only.
        Not the source record: every build of a partition from the same samples gives the same
        value, wherever their files lay, and a build from other samples another. A checkpoint
        records it, so that no run is resumed or evaluated on a store built again from other
        files under its name (:func:`cafedist.run.checkpoint.refusal`)."""
        if self._data_digest is None:
            with self._guard("unreadable metadata (truncated or corrupt file?)"):
                names = self._checked + ["vocab"] * ("vocab" in self._f)  # the one dataset opening does not check
                rows = [_attr_rows(self._f.attrs, [a for a in ROOT_ATTRS if a != "schema_version"]),
                        sorted([name, str(self._f[name].attrs.get(CHECKSUM_ATTR, ""))] for name in names)]
            self._data_digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
        return self._data_digest

    def _source_line(self) -> str:
        """Where the store's data came from, as recorded when it was built."""
        s = self.source
        if s is None:
            return "source not recorded (bundled data, or a store built before stores recorded it)"
        return (f"source {s.get('folder')}: {s.get('files')} files, stamp {s.get('stamp')}, "
                f"content sha256 {s.get('sha256')}")

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Close the file (idempotent)."""
        if getattr(self, "_f", None) is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, dataset={self.dataset!r}, clients={self.num_clients})"
