"""The coordinator exchange of a round: rows up to rank 0, aggregation, each client's row back.

What goes up: every client's proxy logits on this round's proxy subset (the exits the
algorithm reads, or all: ``comm.exits``; in ``comm.logits_dtype`` on the wire) and the
algorithm's other upload rows. Rank 0 aggregates them in client-id order; each rank then
receives only its own clients' payload rows, which active clients take.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cafedist.distributed.client_rows import ClientRows, stack_rows
from cafedist.run.build import Run
from cafedist.train.local import proxy_logits
from cafedist.train.schedule import proxy_subset
from cafedist.train.timing import now

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sent_exits(run: Run) -> list[int]:
    """The exits whose proxy logits each client sends (``comm.exits``; none for algorithms
    that exchange no logits)."""
    return run.algo.sent_exits(every_exit=run.cfg.comm.exits == "all") if run.algo.exchanges_logits else []


def round_subset(run: Run, rnd: int) -> Tensor:
    """The proxy samples of round ``rnd`` (indices into the proxy set, on the run's device)."""
    return proxy_subset(run.cfg.seed, rnd, run.proxy_x.shape[0], run.proxy_size).to(run.device)


def exchange_bytes(run: Run) -> tuple[int, int]:
    """Bytes one client sends and receives per round: proxy logits of the sent exits in
    ``comm.logits_dtype`` plus the algorithm's upload rows, up; its payload rows, down
    (0, 0 for algorithms without an exchange)."""
    algo, comm = run.algo, run.cfg.comm
    if not algo.uses_exchange():
        return 0, 0
    up = 0
    if algo.exchanges_logits:
        up += len(sent_exits(run)) * run.proxy_size * run.setup.num_classes * DTYPES[comm.logits_dtype].itemsize
    up += sum(int(torch.Size(shape).numel()) * dtype.itemsize for shape, dtype in algo.upload_spec().values())
    down = sum(int(torch.Size(shape).numel()) * dtype.itemsize for shape, dtype in algo.payload_spec().values())
    return up, down


def check_rows(algo_name: str, hook: str, rows: dict[str, Tensor], spec: dict, lead: tuple[int, ...] = ()) -> None:
    """Refuse, in one line naming the algorithm and hook, rows that do not match their spec:
    a missing key, or a tensor whose shape is not ``lead + row shape`` or whose dtype differs
    (a wrong row would fail inside a collective, or, on several ranks, hang or mix rows)."""
    for key, (shape, dtype) in spec.items():
        if key not in rows:
            raise ValueError(f"algorithm {algo_name!r}: {hook} returned no {key!r} (its spec lists "
                             f"{', '.join(map(repr, spec))})")
        t = rows[key]
        want = (*lead, *shape)
        if not isinstance(t, Tensor) or tuple(t.shape) != want or t.dtype != dtype:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"algorithm {algo_name!r}: {hook}[{key!r}] is {got}, its spec says {want} {dtype}")


class Exchange:
    """One run's coordinator step (a no-op for algorithms without one)."""

    def __init__(self, run: Run, rows: ClientRows):
        self.run, self.rows = run, rows
        self.algo, self.cfg = run.algo, run.cfg
        self.wire = DTYPES[self.cfg.comm.logits_dtype]
        self.exits = sent_exits(run)

    @property
    def active(self) -> bool:
        """Whether the coordinator step runs at all this run."""
        return self.algo.uses_exchange()

    def bytes_per_client(self) -> tuple[int, int]:
        """:func:`exchange_bytes` of this run."""
        return exchange_bytes(self.run)

    def targets_subset(self, state: dict[str, Tensor]) -> Tensor | None:
        """The proxy subset a client's current targets were computed on (None: no targets)."""
        rnd = self.algo.targets_round(state)
        if rnd is None or self.run.proxy_x is None:
            return None
        return round_subset(self.run, rnd)

    def __call__(self, rnd: int, active: Tensor, timers: dict[str, float]) -> dict[str, Any]:
        """Run the exchange of round ``rnd`` on every rank; returns rank 0's report ({} elsewhere)."""
        algo, pool, device = self.algo, self.run.pool, self.run.device
        # cohort_exchange: only this round's active clients take part, in rows and in time
        rows_of = self.rows.cohort(active) if algo.cohort_exchange else self.rows
        ids = [cid for cid in pool.ids if active[cid]] if algo.cohort_exchange else pool.ids
        spec = dict(algo.upload_spec())
        if algo.exchanges_logits:  # [e, P', C] per client
            spec = {"logits": ((len(self.exits), self.run.proxy_size, self.run.setup.num_classes), torch.float32),
                    **spec}
        rows: dict[str, list[Tensor]] = {key: [] for key in spec}
        xp = None
        if algo.exchanges_logits:
            xp = self.run.proxy_x[round_subset(self.run, rnd)]
        for c in pool.each(ids, modify=False):
            if xp is not None:
                rows["logits"].append(proxy_logits(algo.eval_model(c.view), xp, amp=self.cfg.train.amp)[self.exits])
            upload = algo.upload(c.view)
            check_rows(algo.name, "upload", upload, algo.upload_spec())
            for key in algo.upload_spec():
                rows[key].append(upload[key])
        local = {key: stack_rows(rows[key], tuple(shape), dtype, device) for key, (shape, dtype) in spec.items()}
        t = now(device)
        gathered = {key: rows_of.gather(rows, transport_dtype=self.wire if key == "logits" and
                                        self.wire != torch.float32 else None)
                    for key, rows in local.items()}
        timers["t_comm"] += now(device) - t
        payload, report = None, {}
        if self.run.rt.is_main:
            t = now(device)
            if algo.cohort_exchange:
                payload, report = algo.aggregate_cohort(rnd, gathered, torch.nonzero(active.cpu()).flatten())
            else:
                payload, report = algo.aggregate(rnd, gathered, active.to(device))
            check_rows(algo.name, "aggregate_cohort" if algo.cohort_exchange else "aggregate", payload,
                       algo.payload_spec(), lead=(int(active.sum()) if algo.cohort_exchange else self.run.n,))
            timers["t_aggregate"] = now(device) - t
        t = now(device)
        mine = rows_of.scatter(payload, algo.payload_spec())
        timers["t_comm"] += now(device) - t
        position = {cid: j for j, cid in enumerate(ids)}
        for c in pool.each([cid for cid in pool.ids if active[cid]], modify=True):
            j = position[c.cid]
            algo.receive(c.view, {k: v[j] for k, v in mine.items()}, rnd)
        return report
