"""Collectives over rows of tensors and small objects, with byte accounting and loud failures.

The layer knows nothing about federated learning: it moves ``[rows, *shape]`` tensors between
ranks (each rank owning a known number of rows), counts the bytes it puts on the wire, and
turns every torch.distributed failure (dead peer, timeout) into a one-line
:class:`~cafedist.errors.DistError` that says which operation failed, in which context
(e.g. ``"round 7"``), on which rank.

Wire model for the byte counters (per rank, padding included since it is really sent):
bandwidth-optimal collectives, which ring and direct algorithms both achieve —

* all-gather of a chunk of B bytes: sent = received = (W-1)·B
* gather to rank 0: every other rank sends B, rank 0 receives (W-1)·B
* scatter from rank 0 / broadcast from src: the source sends (W-1)·B, every other rank receives B
* all-reduce of B bytes: sent = received = 2·(W-1)·B / W (reduce-scatter + all-gather)

With one process (no process group) every operation is a local shortcut that counts zero bytes.
"""

from __future__ import annotations

import contextlib
import pickle
from collections import defaultdict
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from cafedist.distributed.runtime import Runtime, explain_peer_failure, short_reason
from cafedist.errors import CafeError, DistError


class Comm:
    """This rank's handle for collectives. Set :attr:`context` (e.g. ``"round 7"``) as you go."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.context = "setup"
        self._bytes: dict[str, int] = defaultdict(int)  # "<op>_sent" / "<op>_received"

    # ------------------------------------------------------------------ bookkeeping

    @property
    def _distributed(self) -> bool:
        # a process group exists: several ranks, or one under CAFEDIST_PROCESS_GROUP=always
        return self.rt.backend is not None

    def _count(self, op: str, sent: int, received: int) -> None:
        self._bytes[f"{op}_sent"] += int(sent)
        self._bytes[f"{op}_received"] += int(received)

    def counters(self) -> dict[str, int]:
        """Bytes this rank sent/received: totals plus ``"<op>_sent"``/``"<op>_received"`` per op."""
        out = {
            "bytes_sent": sum(v for k, v in self._bytes.items() if k.endswith("_sent")),
            "bytes_received": sum(v for k, v in self._bytes.items() if k.endswith("_received")),
        }
        out.update(sorted(self._bytes.items()))
        return out

    def reset_counters(self) -> dict[str, int]:
        """Return the current counters, then zero them."""
        snapshot = self.counters()
        self._bytes.clear()
        return snapshot

    def _error(self, op: str, what: str) -> DistError:
        return DistError(f"{op} in {self.context} on rank {self.rt.rank}: {what}")

    @contextlib.contextmanager
    def _guard(self, op: str) -> Iterator[None]:
        """Turn any torch.distributed failure into a one-line DistError (no traceback, no hang)."""
        try:
            yield
        except CafeError:
            raise
        except Exception as exc:  # noqa: BLE001 - backends raise RuntimeError, DistError, ValueError...
            # a peer that failed alone closed its connections: say which and why, where it told
            raise DistError(f"{op} failed in {self.context} on rank {self.rt.rank}: "
                            f"{explain_peer_failure(short_reason(exc))}") from None

    def _check_counts(self, op: str, counts: Sequence[int]) -> list[int]:
        counts = [int(c) for c in counts]
        if len(counts) != self.rt.world_size or min(counts) < 0:
            raise self._error(op, f"counts={counts} must hold {self.rt.world_size} non-negative "
                                  "row counts (one per rank)")
        return counts

    def _check_tensor(self, op: str, t: Tensor, rows: int | None = None) -> None:
        if self._distributed and t.device.type != self.rt.device.type:
            raise self._error(op, f"tensor is on {t.device} but the runtime device is {self.rt.device}")
        if rows is not None and (t.dim() == 0 or t.shape[0] != rows):
            raise self._error(op, f"expected a tensor of {rows} rows, got shape {tuple(t.shape)}")

    # ------------------------------------------------------------------ row collectives

    def _exchange_rows(self, op: str, local: Tensor, counts: Sequence[int],
                       transport_dtype: torch.dtype | None, only_main: bool) -> Tensor | None:
        """Shared body of all-gather and gather-to-main over padded row blocks."""
        counts = self._check_counts(op, counts)
        rank, world = self.rt.rank, self.rt.world_size
        self._check_tensor(op, local, counts[rank])
        local = local.detach()  # communication is not differentiable; keep autograd out of it
        wire = transport_dtype or local.dtype
        if not self._distributed:
            self._count(op, 0, 0)
            # Same cast round trip as on the wire, so results do not depend on the world size.
            return local.to(wire).to(local.dtype) if wire != local.dtype else local.clone()
        width = max(counts)
        if width == 0:  # nothing to move; every rank knows counts, so all skip together
            self._count(op, 0, 0)
            empty = local.new_empty((0, *local.shape[1:]))
            return None if only_main and rank != 0 else empty
        # Gloo rejects unequal sizes: pad every block to the largest count, strip afterwards.
        block = local.new_zeros((width, *local.shape[1:]), dtype=wire)
        block[: counts[rank]].copy_(local)
        nbytes = block.numel() * block.element_size()
        receive = rank == 0 or not only_main
        blocks = [torch.empty_like(block) for _ in range(world)] if receive else None
        with self._guard(op):
            if only_main:
                dist.gather(block, blocks, dst=0)
            else:
                dist.all_gather(blocks, block)
        if only_main:
            self._count(op, 0 if rank == 0 else nbytes, (world - 1) * nbytes if rank == 0 else 0)
        else:
            self._count(op, (world - 1) * nbytes, (world - 1) * nbytes)
        if blocks is None:
            return None
        return torch.cat([b[:c] for b, c in zip(blocks, counts)]).to(local.dtype)

    def all_gather_rows(self, local: Tensor, counts: Sequence[int],
                        transport_dtype: torch.dtype | None = None) -> Tensor:
        """Concatenate every rank's ``[counts[r], *shape]`` rows in rank order, on every rank.

        Uneven counts are padded to ``max(counts)`` for the wire and stripped afterwards.
        ``transport_dtype`` (e.g. ``torch.float16``) is used on the wire; the result is cast
        back to ``local.dtype``. Every row, this rank's own included, makes that round trip,
        so the result does not depend on the number of ranks.
        """
        out = self._exchange_rows("all_gather_rows", local, counts, transport_dtype, only_main=False)
        assert out is not None
        return out

    def gather_rows_to_main(self, local: Tensor, counts: Sequence[int],
                            transport_dtype: torch.dtype | None = None) -> Tensor | None:
        """Like :meth:`all_gather_rows` but only rank 0 receives the result (None elsewhere)."""
        return self._exchange_rows("gather_rows_to_main", local, counts, transport_dtype, only_main=True)

    def scatter_rows(self, rows: Tensor | None, counts: Sequence[int],
                     shape_dtype: tuple[tuple[int, ...], torch.dtype] | None = None,
                     transport_dtype: torch.dtype | None = None) -> Tensor:
        """Rank 0 passes ``rows`` ``[sum(counts), *shape]`` in rank order; each rank gets its own.

        Other ranks must know ``shape``/dtype to receive: pass ``shape_dtype=(shape, dtype)``
        on *every* rank (no extra message; rank 0 checks ``rows`` against it), or pass None on
        every rank and rank 0 broadcasts a small header first (counted under this op).
        ``rows`` is ignored off rank 0. Rank 0 sends only the other ranks' (padded) blocks.
        """
        op = "scatter_rows"
        counts = self._check_counts(op, counts)
        rank, world = self.rt.rank, self.rt.world_size
        if rank == 0:
            if rows is None:
                raise self._error(op, "rank 0 must pass the rows to scatter, got None")
            self._check_tensor(op, rows, sum(counts))
            actual = (tuple(rows.shape[1:]), rows.dtype)
            if shape_dtype is not None and actual != (tuple(shape_dtype[0]), shape_dtype[1]):
                raise self._error(op, f"rows have shape {actual[0]} and dtype {actual[1]} but "
                                      f"shape_dtype says {tuple(shape_dtype[0])} and {shape_dtype[1]}")
            rows = rows.detach()
        if not self._distributed:
            assert rows is not None
            self._count(op, 0, 0)
            wire = transport_dtype or rows.dtype
            return rows.to(wire).to(rows.dtype) if wire != rows.dtype else rows.clone()
        if shape_dtype is None:
            header = (tuple(rows.shape[1:]), rows.dtype) if rank == 0 else None  # type: ignore[union-attr]
            shape_dtype = self._broadcast_object(op, header, src=0)
        shape, dtype = tuple(shape_dtype[0]), shape_dtype[1]
        wire = transport_dtype or dtype
        width = max(counts)
        if width == 0:
            self._count(op, 0, 0)
            return torch.empty((0, *shape), dtype=dtype, device=self.rt.device)
        out = torch.empty((width, *shape), dtype=wire, device=self.rt.device)
        blocks = None
        if rank == 0:
            assert rows is not None
            padded = rows.new_zeros((world, width, *shape), dtype=wire)
            start = 0
            for r, c in enumerate(counts):
                padded[r, :c].copy_(rows[start:start + c])
                start += c
            blocks = list(padded.unbind(0))
        with self._guard(op):
            dist.scatter(out, blocks, src=0)
        nbytes = out.numel() * out.element_size()
        self._count(op, (world - 1) * nbytes if rank == 0 else 0, 0 if rank == 0 else nbytes)
        return out[: counts[rank]].to(dtype)

    def all_reduce_sum_(self, t: Tensor) -> Tensor:
        """Sum ``t`` over all ranks, in place; returns ``t``."""
        op = "all_reduce_sum"
        self._check_tensor(op, t)
        if not self._distributed:
            self._count(op, 0, 0)
            return t
        with self._guard(op):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        world = self.rt.world_size
        moved = 2 * (world - 1) * t.numel() * t.element_size() // world
        self._count(op, moved, moved)
        return t

    # ------------------------------------------------------------------ objects

    def _broadcast_object(self, op: str, obj: Any, src: int) -> Any:
        """Pickle on ``src``, broadcast a length then the bytes; accounted under ``op``."""
        rank, world = self.rt.rank, self.rt.world_size
        if not 0 <= src < world:
            raise self._error(op, f"src={src} is not a rank (world size {world})")
        if not self._distributed:
            self._count(op, 0, 0)
            return obj
        payload = _to_bytes_tensor(obj, self.rt.device) if rank == src else None
        size = torch.tensor([0 if payload is None else payload.numel()], dtype=torch.int64,
                            device=self.rt.device)
        with self._guard(op):
            dist.broadcast(size, src=src)
        n = int(size.item())
        buf = payload if payload is not None else torch.empty(n, dtype=torch.uint8, device=self.rt.device)
        with self._guard(op):
            dist.broadcast(buf, src=src)
        nbytes = size.element_size() + n
        self._count(op, (world - 1) * nbytes if rank == src else 0, 0 if rank == src else nbytes)
        return obj if rank == src else _from_bytes_tensor(buf)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Return ``src``'s ``obj`` on every rank (pickled; keep it small)."""
        return self._broadcast_object("broadcast_object", obj, src)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """List of every rank's ``obj``, in rank order (pickled; keep it small)."""
        op = "all_gather_object"
        if not self._distributed:
            self._count(op, 0, 0)
            return [obj]
        payload = _to_bytes_tensor(obj, self.rt.device)
        ones = [1] * self.rt.world_size
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=self.rt.device)
        sizes = self._exchange_rows(op, size, ones, None, only_main=False)
        assert sizes is not None
        counts = [int(s) for s in sizes.tolist()]
        flat = self._exchange_rows(op, payload, counts, None, only_main=False)
        assert flat is not None
        parts = flat.split(counts)
        # This rank's own object is returned as is, as with one process.
        return [obj if r == self.rt.rank else _from_bytes_tensor(p) for r, p in enumerate(parts)]

    def barrier(self) -> None:
        """Wait until every rank gets here (bounded by the runtime timeout)."""
        op = "barrier"
        self._count(op, 0, 0)
        if not self._distributed:
            return
        with self._guard(op):
            if self.rt.backend == "nccl":
                dist.barrier(device_ids=[self.rt.device.index])
            else:
                dist.barrier()


def _to_bytes_tensor(obj: Any, device: torch.device) -> Tensor:
    """Pickle ``obj`` into a uint8 tensor on ``device`` (NCCL can only move device tensors)."""
    data = bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    return torch.frombuffer(data, dtype=torch.uint8).to(device)


def _from_bytes_tensor(t: Tensor) -> Any:
    return pickle.loads(t.cpu().numpy().tobytes())
