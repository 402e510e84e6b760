"""Where a rank's clients live: on the device while they work, parked in host memory or on disk.

A :class:`ClientPool` holds one rank's clients (ids in placement order). With
``train.resident_clients`` unset every client is built once and stays on the device (the
fastest layout, and the memory of every client at once). With a bound ``b`` at most ``b``
clients are materialized at a time: a client is built on the device when it is needed
(:meth:`ClientPool.each`, :meth:`ClientPool.waves`) from its *parked* state, and parked
again (models, optimizer state, fp16 loss scales, algorithm state) when it is evicted after
having changed. Parked state lives in host memory (pinned on CUDA) or, with
``train.client_state: disk``, in one file per client under ``RUN/client_state/``. A client
never touched has no parked state at all: it is built at its initial weights (keyed by seed
and client id), so memory and disk grow with the clients that trained, not with ``n``. The
next client's parked state and data are read by a background thread while the current one
works (on a GPU the thread also copies the data to the device on a side stream).

Nothing here changes a result: building, parking and loading copy tensors exactly, and
every random draw is keyed by (seed, client id, round), so a run is bit-identical whatever
the bound (tested).
"""

from __future__ import annotations

import concurrent.futures as futures
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from cafedist.data.store import ClientData
from cafedist.run.client import Client
from cafedist.run.torch_files import save_torch_to

Shard = dict[str, Any]  # {"models", "optimizers", "scalers", "algo", "cid", "shared_round"}: also a checkpoint shard
STATE_DIR = "client_state"

_DATA_FIELDS = ("x_train", "y_train", "x_test", "y_test", "x_val", "y_val")


def remove_parked_state(run_dir: Path) -> None:
    """Rank 0 at the start of a run, the run's lock held: parked clients left by a killed
    session (a cache; checkpoints hold the record). Each rank clears its own folder at its
    first park, but a folder of a rank the resumed run no longer has, or of a run that no
    longer parks on disk, stayed for good."""
    shutil.rmtree(Path(run_dir) / STATE_DIR, ignore_errors=True)


def _to_host(obj: Any, pin: bool) -> Any:
    """A detached CPU copy of every tensor in a nested dict/list (pinned when ``pin``)."""
    if isinstance(obj, Tensor):
        t = obj.detach().to("cpu", copy=True)
        return t.pin_memory() if pin else t
    if isinstance(obj, dict):
        return {k: _to_host(v, pin) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v, pin) for v in obj)
    return obj


def client_shard(client: Client, pin: bool = False) -> Shard:
    """A client's whole state as host tensors: what parking and checkpoints write."""
    return _to_host({"models": {k: m.state_dict() for k, m in client.models.items()},
                     "optimizers": {k: o.state_dict() for k, o in client.optimizers.items()},
                     "scalers": {k: s.state_dict() for k, s in client.scalers.items()},
                     "algo": dict(client.state), "cid": client.cid, "shared_round": client.shared_round}, pin)


def load_shard(client: Client, shard: Shard, device: torch.device) -> None:
    """Put a shard's state into a built client (exact copies). ``shared_round`` absent (a
    checkpoint written before lazy averaging): the client had every average applied;
    ``scalers`` absent (written before fp16 scales were kept): they start afresh."""
    for k, m in client.models.items():
        m.load_state_dict(shard["models"][k])
    for k, o in client.optimizers.items():
        o.load_state_dict(shard["optimizers"][k])
    # a built client holds the algorithm's initial state: a shard without one of its keys was
    # written by another algorithm (--resume force), whose state would fail in the next round
    missing = [k for k in client.state if k not in shard["algo"]]
    if missing:
        raise ValueError(f"client {client.cid}: no algorithm state {missing[0]!r} in its shard "
                         f"(written by another algorithm?)")
    client.scalers = {}
    for k, state in shard.get("scalers", {}).items():
        client.scaler(k).load_state_dict(state)
    client.state = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in shard["algo"].items()}
    client.shared_round = int(shard.get("shared_round", client.shared_round))


class ClientPool:
    """One rank's clients, at most ``bound`` of them materialized at once (None: all, always).

    ``build(cid, data)`` makes a client at its initial weights on the device with the given
    data; ``read_data(cid)`` reads a client's data (host tensors; moved to the device here);
    ``on_load(client)`` runs whenever a client is (re)materialized, before anyone sees it
    (the lazily applied shared-parameter average, :class:`~cafedist.run.sharing.SharedParams`).
    """

    def __init__(self, ids: Sequence[int], build: Callable[[int, ClientData], Client],
                 read_data: Callable[[int], ClientData], device: torch.device, bound: int | None = None,
                 where: str = "host", state_dir: Path | None = None, scratch_dir: Path | None = None):
        self.ids = list(ids)
        self.device = device
        self.bound = None if bound is None or bound >= len(self.ids) else max(1, int(bound))
        self.where = where
        self._build, self._read_data = build, read_data
        self.on_load: Callable[[Client], None] | None = None
        self.changed: set[int] = set()  # clients whose state changed since the last checkpoint
        # where the last checkpoint written or resumed keeps each client's shard (file name ->
        # {"dir", "sha256"}): an unchanged client is referenced there, not written again
        self.checkpointed: dict[str, dict[str, str]] = {}
        self._resident: OrderedDict[int, Client] = OrderedDict()  # least recently used first
        self._dirty: set[int] = set()  # resident clients whose parked copy is stale
        self._parked: dict[int, Shard] = {}  # host-parked state
        self._on_disk: set[int] = set()
        self._pin = device.type == "cuda"
        # bounded on a GPU: the prefetch thread copies the next client's data on this stream
        self._copy_stream = torch.cuda.Stream(device) if self._pin and self.bound is not None else None
        self._prefetch: dict[int, futures.Future] = {}
        # the thread's current device is this rank's GPU: else CUDA calls made on it would
        # select (and create a context on) GPU 0 in every rank
        gpu = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else None
        on_gpu = (lambda: torch.cuda.set_device(gpu)) if gpu is not None else None
        self._pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cafedist-prefetch",
                                                initializer=on_gpu) if self.bound is not None else None
        self.state_dir = None
        if self.bound is not None and where == "disk":
            if state_dir is None:
                raise ValueError("train.client_state: disk needs a directory")
            self.state_dir = Path(state_dir)  # made at the first park: nothing is written before training
        self._made_state_dir = False  # only the process that made it (it holds the run) deletes it
        self._scratch_dir = scratch_dir  # a temporary folder made for this pool (state_dir inside): removed on close
        self._fit_client: tuple[Client, dict] | None = None  # restore()'s client for checking shards
        if self.bound is None:
            for cid in self.ids:
                self._resident[cid] = self._build(cid, self._device_data(read_data(cid)))

    # ------------------------------------------------------------------ queries
    def all_clients(self) -> list[Client]:
        """Every client, in placement order; only when all are resident (tests, small runs)."""
        if self.bound is not None:
            raise RuntimeError("all_clients(): clients are materialized a bounded number at a time; use each()")
        return [self._resident[cid] for cid in self.ids]

    def resident(self) -> list[Client]:
        """The clients materialized now (every client without a bound), in placement order."""
        return [self._resident[cid] for cid in self.ids if cid in self._resident]

    def sample(self, k: int = 2) -> list[Client]:
        """Up to ``k`` of the first clients, materialized together (for checks such as packing)."""
        return next(self.waves(self.ids[:min(k, self.bound or k)], modify=False), [])

    # ------------------------------------------------------------------ access
    def each(self, cids: Iterable[int], modify: bool) -> Iterator[Client]:
        """Materialize the clients ``cids`` one after another (reading the next one ahead);
        ``modify``: the caller changes them (they are parked again when evicted, and the next
        checkpoint writes them)."""
        order = list(cids)
        for i, cid in enumerate(order):
            if i + 1 < len(order):
                self._start_prefetch(order[i + 1])
            client = self.get(cid)
            if modify:
                self.mark_changed(cid)
            yield client

    def waves(self, cids: Iterable[int], modify: bool) -> Iterator[list[Client]]:
        """The clients ``cids`` in groups that are resident together (all at once without a
        bound, else ``bound`` at a time): a wave is what packed training steps together."""
        order = list(cids)
        size = max(len(order) if self.bound is None else self.bound, 1)
        for start in range(0, len(order), size):
            yield list(self.each(order[start:start + size], modify))

    def get(self, cid: int) -> Client:
        """Client ``cid`` on the device (materialized from its parked state when needed)."""
        client = self._resident.get(cid)
        if client is not None:
            if self.bound is not None:
                self._resident.move_to_end(cid)
            return client
        if cid not in self._prefetch:
            self._start_prefetch(cid)
        shard, (data, ready) = self._prefetch.pop(cid).result()
        if ready is not None:  # the side stream's copy must finish before this stream reads it
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            for name in _DATA_FIELDS:
                getattr(data, name).record_stream(stream)
        while len(self._resident) >= (self.bound or 1 << 62):
            self._evict()
        client = self._build(cid, self._device_data(data))
        if shard is not None:
            load_shard(client, shard, self.device)
        if self.on_load is not None:
            self.on_load(client)
        self._resident[cid] = client
        return client

    def mark_changed(self, cid: int) -> None:
        """Record that client ``cid`` (resident) changed: park it before eviction, checkpoint it."""
        self.changed.add(cid)
        if self.bound is not None:
            self._dirty.add(cid)

    # ------------------------------------------------------------------ state (checkpoints)
    def shard(self, cid: int) -> Shard | None:
        """Client ``cid``'s current state (None: still at its initial weights, never touched)."""
        client = self._resident.get(cid)
        if client is not None and (cid in self._dirty or self.bound is None
                                   or cid not in self._parked and cid not in self._on_disk):
            return client_shard(client)
        return self._read_parked(cid)

    def restore(self, cid: int, shard: Shard) -> None:
        """Replace client ``cid``'s state by a checkpoint's shard (resume). With a bound the
        shard is parked, and loaded when the client is next needed: it is loaded into a scratch
        client now, so that a shard that does not fit this config fails here, as without a
        bound, and not in a round (:meth:`restored` frees the scratch client)."""
        if self.bound is None:
            load_shard(self._resident[cid], shard, self.device)
            return
        if self._fit_client is None:
            scratch = self._build(cid, self._device_data(self._read_data(cid)))
            self._fit_client = (scratch, dict(scratch.state))
        scratch, initial = self._fit_client
        scratch.state = dict(initial)
        load_shard(scratch, shard, self.device)
        self._resident.pop(cid, None)
        self._prefetch.pop(cid, None)
        self._dirty.discard(cid)
        self._park(cid, shard)

    def restored(self) -> None:
        """A resume has restored every shard: free :meth:`restore`'s scratch client."""
        self._fit_client = None

    def close(self) -> None:
        """Stop the prefetch thread and delete the on-disk parked state (a cache of this
        process: checkpoints hold the record, a resume refills it)."""
        self._fit_client = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self.state_dir is not None and self._made_state_dir:
            # a process refused the run (its lock is another's) never parked: the folder is the runner's
            shutil.rmtree(self.state_dir, ignore_errors=True)
            try:
                self.state_dir.parent.rmdir()  # RUN/client_state, once no rank's folder is left
            except OSError:
                pass
        if self._scratch_dir is not None:
            shutil.rmtree(self._scratch_dir, ignore_errors=True)

    # ------------------------------------------------------------------ internals
    def _staged_data(self, cid: int) -> tuple[ClientData, Any]:
        """A client's data, read from the store on the prefetch thread. On a GPU it is pinned
        and copied to the device on a side stream, so the copy overlaps the current client's
        work; the returned CUDA event marks its end (None on the CPU)."""
        data = self._read_data(cid)
        if self._copy_stream is None:
            return data, None
        pinned = {k: getattr(data, k).pin_memory() for k in _DATA_FIELDS}
        with torch.cuda.stream(self._copy_stream):
            moved = ClientData(**{k: v.to(self.device, non_blocking=True) for k, v in pinned.items()})
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return moved, ready

    def _device_data(self, data: ClientData) -> ClientData:
        if self.device.type == "cpu":
            return data
        return ClientData(**{k: getattr(data, k).to(self.device, non_blocking=True) for k in _DATA_FIELDS})

    def _path(self, cid: int) -> Path:
        assert self.state_dir is not None
        return self.state_dir / f"client_{cid:06d}.pt"

    def _read_parked(self, cid: int) -> Shard | None:
        if cid in self._parked:
            return self._parked[cid]
        if cid in self._on_disk:
            return torch.load(self._path(cid), map_location="cpu", weights_only=True)
        return None

    def _start_prefetch(self, cid: int) -> None:
        if cid in self._resident or cid in self._prefetch:
            return
        if self._pool is None:  # no bound: nothing is ever parked
            done: futures.Future = futures.Future()
            done.set_result((None, (self._read_data(cid), None)))
            self._prefetch[cid] = done
            return
        self._prefetch[cid] = self._pool.submit(lambda: (self._read_parked(cid), self._staged_data(cid)))

    def _park(self, cid: int, shard: Shard) -> None:
        if self.where == "disk":
            if not self._on_disk:  # the first park of this process: a killed one may have left files
                shutil.rmtree(self.state_dir, ignore_errors=True)
                self.state_dir.mkdir(parents=True)
                self._made_state_dir = True
            tmp = self._path(cid).with_suffix(".tmp")
            try:
                with open(tmp, "wb") as fh:
                    save_torch_to(shard, fh, self._path(cid))
            except OSError as exc:  # a full disk, also in the final flush: one line naming the file
                tmp.unlink(missing_ok=True)
                raise OSError(exc.errno, exc.strerror, str(self._path(cid))) from None
            os.replace(tmp, self._path(cid))  # a cache, not a record: no fsync needed
            self._on_disk.add(cid)
        else:
            self._parked[cid] = shard

    def _evict(self) -> None:
        cid, client = self._resident.popitem(last=False)
        if cid in self._dirty:
            self._park(cid, client_shard(client, self._pin and self.where == "host"))
            self._dirty.discard(cid)
