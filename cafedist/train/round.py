"""One round on every rank, as its steps::

    local updates of my active clients         (sequential or packed: cafedist.train.local/packed)
      -> [diagnostics]                          (train.diagnostics: read-only measurements)
      -> coordinator exchange                   (proxy logits / rows up, aggregate, rows down)
      -> shared parameters averaged             (algorithms with shared keys)
      -> training after aggregation             (the algorithm's post phases)
      -> evaluation and the round's record

Everything random is keyed by (seed, client id, round), collectives return rows in client-id
order, and averaging is done in fixed point, so a run is a function of its config: the same
on 1, 2 or 4 ranks, and the same after a kill and resume.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor

from cafedist.algorithms.base import Algorithm
from cafedist.distributed.client_rows import ClientRows
from cafedist.distributed.comm import Comm
from cafedist.eval.clients import client_test_stats
from cafedist.run.build import Run
from cafedist.run.client import Client, reset_optimizers
from cafedist.train.diagnostics import Diagnostics
from cafedist.train.exchange import Exchange
from cafedist.train.faults import maybe_fault
from cafedist.train.local import local_update
from cafedist.train.packed import packed_local_update, use_packing
from cafedist.train.records import FinalEvaluation, diverged_clients, round_metrics
from cafedist.train.schedule import participating
from cafedist.train.timing import now, timed
from cafedist.units import clients_phrase

log = logging.getLogger(__name__)


class Trainer:
    """Runs the rounds of one rank's part of a run (:class:`~cafedist.run.build.Run`)."""

    def __init__(self, run: Run):
        self.run, self.cfg, self.algo, self.pool, self.setup = run, run.cfg, run.algo, run.pool, run.setup
        self.comm = Comm(run.rt)
        self.rows = ClientRows(self.comm, run.placement, run.device)
        self.exchange = Exchange(run, self.rows)
        self.shared = run.shared
        self.use_packed = use_packing(self.cfg.train.packed, self.pool.sample(), self.algo, self.cfg.train,
                                      run.device, warn=run.rt.is_main)
        # post-training phases are asked of every client: only for algorithms that have them
        self.has_post_phases = type(self.algo).post_phases is not Algorithm.post_phases
        self.diagnostics = Diagnostics.of(self.cfg.train.diagnostics)  # None (no work) unless asked for
        self.final_evaluation: FinalEvaluation | None = None  # set by the last round, read by the summary

    @property
    def clients(self) -> list[Client]:
        """Every client of this rank, when all are resident (:meth:`ClientPool.all_clients`)."""
        return self.pool.all_clients()

    def run_round(self, rnd: int) -> dict[str, Any]:
        """Every rank: one round (see the module docstring); returns its record (identical on
        every rank except the aggregation's report, the diagnostics and, in the last round, the
        final evaluation's accuracies, which rank 0 holds)."""
        self.comm.context = f"round {rnd}"
        timers = {"t_local": 0.0, "t_comm": 0.0, "t_aggregate": 0.0, "t_eval": 0.0}
        t_start = now(self.run.device)
        active = participating(self.cfg.seed, rnd, self.run.n, self.cfg.train.clients_per_round)

        maybe_fault("local", rnd, self.run.rt.rank)
        with timed(timers, "t_local", self.run.device):
            losses, n_students = self.local_updates(rnd, active)
        diag = self.diagnostics.after_local(self, rnd, active) if self.diagnostics else {}
        report, (up, down) = self._aggregate(rnd, active, timers)
        self._train_after_aggregation(rnd, active)
        with timed(timers, "t_eval", self.run.device):
            record = self._evaluate(rnd, losses, active)

        wire_bytes = self.rows.wire_bytes()  # first: the n_students reduction's bytes count in the next round
        record.update({"n_students": self.rows.sum_int(n_students), "bytes_up": up, "bytes_down": down,
                       "wire_bytes": wire_bytes, "clients_trained": int(active.sum())})
        record.update(report)
        record.update(diag)
        record.update({k: round(v, 6) for k, v in timers.items()})
        record["seconds"] = round(now(self.run.device) - t_start, 6)
        return record

    def _aggregate(self, rnd: int, active: Tensor, timers: dict[str, float]) -> tuple[dict[str, Any], tuple[int, int]]:
        """The coordinator exchange and the averaging of shared parameters, each when the
        algorithm has one; the exchange's report and the bytes (up, down) per client."""
        report, (up, down) = {}, (0, 0)
        if self.exchange.active:
            report = self.exchange(rnd, active, timers)
            up, down = self.exchange.bytes_per_client()
        if self.shared.keys:
            with timed(timers, "t_comm", self.run.device):
                self.shared.average(self.pool, active, rnd, self.comm.all_reduce_sum_, self.run.device)
            up, down = (a + b for a, b in zip((up, down), self.shared.bytes_per_client(active)))
        return report, (up, down)

    def _train_after_aggregation(self, rnd: int, active: Tensor) -> None:
        """The algorithm's post phases (e.g. personal heads) of every client of this rank that has them."""
        post_ids = self.pool.ids if self.has_post_phases else []
        for c in self.pool.each(post_ids, modify=False):
            post = self.algo.post_phases(c.view, rnd, trained=bool(active[c.cid]))
            if post:
                self.pool.mark_changed(c.cid)
                local_update(c, self.algo, self.cfg.train, rnd, self.cfg.seed, phases=post)

    def _evaluate(self, rnd: int, losses: list[float], active: Tensor) -> dict[str, Any]:
        """The round's record of losses and accuracies: test (and validation) accuracies every
        ``train.eval_every`` rounds, and in the last round the final evaluation's fields;
        ``diverged`` names the active clients whose loss was not finite (all of them: the
        run stops, :func:`diverged_clients`)."""
        every = self.cfg.train.eval_every
        last = rnd == self.cfg.train.rounds - 1
        evaluate = rnd % every == every - 1 and not last  # the last round: the final evaluation below
        stats = client_test_stats(self.pool, self.algo, losses, self.rows, self.run.num_exits, evaluate,
                                  self.run.n_test, with_val=evaluate and self.run.store.has_val)
        diverged = diverged_clients(stats[:, 0], active, rnd)
        record: dict[str, Any] = {"round": rnd, **round_metrics(stats, self.setup.train_sizes, self.run.num_exits)}
        if diverged:
            record["diverged"] = diverged
            if self.run.rt.is_main:
                log.warning("round %d: %s diverged (loss not finite; try a lower train.lr): such a client is no "
                            "teacher and its test accuracy is a failed model's", rnd, clients_phrase(diverged))
        if last:  # one pass over the final models serves this record and the run's summary
            self.final_evaluation = FinalEvaluation.of(self.run, self.rows)
            record.update(self.final_evaluation.record_fields())
        return record

    def local_updates(self, rnd: int, active: Tensor) -> tuple[list[float], int]:
        """Local training of my active clients, a wave of resident ones at a time (a fresh
        optimizer under ``train.optimizer_state: reset``; packed when :attr:`use_packed`).
        Returns the mean loss per client (placement order, NaN for idle ones) and the shallow
        exits they trained (summed over ranks: the record's ``n_students``)."""
        cfg, algo = self.cfg, self.algo
        losses: dict[int, float] = {}
        n_students = 0
        for wave in self.pool.waves([cid for cid in self.pool.ids if active[cid]], modify=True):
            if cfg.train.optimizer_state == "reset":
                for c in wave:
                    reset_optimizers(c)
            subsets = [self.exchange.targets_subset(c.state) for c in wave]
            if self.use_packed and len(wave) > 1:
                trained = packed_local_update(wave, algo, cfg.train, rnd, cfg.seed, self.run.proxy_x, subsets)
            else:
                trained = [local_update(c, algo, cfg.train, rnd, cfg.seed, self.run.proxy_x, s)
                           for c, s in zip(wave, subsets)]
            losses.update({c.cid: loss for c, loss in zip(wave, trained)})
            n_students += sum(int(algo.trained_exits(c.state)[:-1].sum()) for c in wave)
        return [losses.get(cid, float("nan")) for cid in self.pool.ids], n_students
