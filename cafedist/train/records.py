"""What a run writes about itself: one record per round (metrics.jsonl) and the final summary."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cafedist import RESULTS_VERSION
from cafedist.distributed.client_rows import ClientRows
from cafedist.errors import TrainingDiverged
from cafedist.eval.clients import final_evaluation, pool_val
from cafedist.run.build import Run
from cafedist.units import clients_phrase


def round_metrics(stats: Tensor, train_sizes: tuple[int, ...], num_exits: int) -> dict[str, Any]:
    """``loss`` (sample-weighted over the clients that trained with a finite loss: an idle
    client's is NaN, a diverged one's NaN or infinite, :func:`diverged_clients`) and, when the
    round was evaluated, ``acc_per_exit`` and (when the rows carry it) ``val_acc_per_exit``,
    from the gathered rows of :func:`~cafedist.eval.clients.client_test_stats`."""
    m = num_exits
    loss, n_test, correct = stats[:, 0], stats[:, 1], stats[:, 2:2 + m]
    # an infinite loss is a divergence as NaN is: counted, it made the round's loss infinite
    trained = torch.isfinite(loss)
    w = torch.tensor(train_sizes, dtype=torch.float64)[trained]
    record: dict[str, Any] = {"loss": float((loss[trained] * w).sum() / w.sum()) if trained.any() else None}
    if not torch.isnan(correct).any():
        record["acc_per_exit"] = (correct.sum(0) / n_test.sum()).tolist()
        val = pool_val(stats[:, 2 + m:]) if stats.shape[1] > 2 + m else None
        if val is not None:
            record["val_acc_per_exit"] = val[0]
    return record


def diverged_clients(losses: Tensor, active: Tensor, rnd: int) -> list[int]:
    """The active clients whose round loss is not finite (an idle client's is NaN by design;
    an active one's means its model diverged), in client order; TrainingDiverged when that is
    every active client: with personal models only, no shared parameter would say so, and the
    run would go on to report its NaN models' accuracy as a result. ``losses`` and ``active``
    are by client id and the same on every rank, so every rank stops alike."""
    active = active.cpu()
    bad = active & ~torch.isfinite(losses.cpu())
    ids = [int(c) for c in torch.nonzero(bad).flatten()]
    if ids and bool(bad.eq(active).all()):
        # partial participation: the round's cohort diverged, which need not be every client
        whose = f"every client's loss in round {rnd}" if bool(active.all()) else \
            f"the loss of every client trained in round {rnd} ({len(ids)} of {active.numel()}: {clients_phrase(ids)})"
        raise TrainingDiverged(f"{whose} is not finite: training diverged (try a lower train.lr)")
    return ids


@dataclass(frozen=True)
class FinalEvaluation:
    """The final models' :func:`~cafedist.eval.clients.final_evaluation`, made once in the last
    round and reused by :func:`summary` (at scale every evaluation pass reads every client).
    ``result`` is None on ranks other than 0; that the object exists is known on every rank."""

    result: dict[str, Any] | None

    @classmethod
    def of(cls, run: Run, rows: ClientRows) -> "FinalEvaluation":
        """Every rank together: evaluate the run's current models."""
        return cls(final_evaluation(run.pool, run.algo, rows, run.macs, run.num_exits, run.store.has_val,
                                    run.rt.is_main))

    def record_fields(self) -> dict[str, Any]:
        """What the last round's record reports of it (rank 0; empty elsewhere)."""
        if self.result is None:
            return {}
        keys = ("acc_per_exit", "val_acc_per_exit")
        return {k: self.result[k] for k in keys if k in self.result}


def summary(run: Run, rows: ClientRows, config_hash: str, records: list[dict[str, Any]],
            wall: float, evaluation: FinalEvaluation | None = None,
            results_version: int = RESULTS_VERSION,
            environments: list[dict[str, Any]] | None = None,
            rounds_changes: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """Final accuracy per exit and client, dynamic inference, bytes, hashes (rank 0 returns it).
    ``evaluation``: the last round's, when this process ran it (every rank, or none); otherwise
    (e.g. resumed after the last checkpoint) the models are evaluated here. ``results_version``:
    the oldest :data:`~cafedist.RESULTS_VERSION` of the code that trained the models;
    ``environments``: the software and hardware stacks it trained under (:mod:`cafedist.provenance`);
    ``rounds_changes``: its total of rounds changed by ``--resume force`` (recorded only when any)."""
    ev = (evaluation if evaluation is not None else FinalEvaluation.of(run, rows)).result
    if ev is None:
        return None
    ev = dict(ev)
    # the mean over the rounds: a round's bytes vary where clients hold different parts of the
    # model (DepthFL, ScaleFL) and only a cohort trains; the last round's is one cohort's draw
    per_client_bytes = round(statistics.fmean(r["bytes_up"] + r["bytes_down"] for r in records)) if records else 0
    fedavg_bytes = 2 * run.n_params * 4
    hashes = ev.pop("model_hashes")
    return {
        "algorithm": run.cfg.algorithm.name,
        "rounds": run.cfg.train.rounds,
        "num_clients": run.n,
        "world_size": run.rt.world_size,
        **ev,
        "bytes_per_client_per_round": per_client_bytes,
        "fedavg_bytes_per_client_per_round": fedavg_bytes,
        "ratio_to_fedavg": per_client_bytes / fedavg_bytes,
        "n_params": run.n_params,
        "model_hashes": hashes,
        "config_hash": config_hash,
        "results_version": results_version,
        "wall_seconds": round(wall, 3),
        **({"environments": environments} if environments is not None else {}),
        # an extended run is not a run trained for its total from the start: the record says so
        **({"rounds_changes": rounds_changes} if rounds_changes else {}),
        # rank 0's peak device memory (CUDA only): what `cafedist bench memory` reports beside RSS
        **({"peak_device_mb": round(torch.cuda.max_memory_allocated(run.device) / 2**20, 1)}
           if run.device.type == "cuda" else {}),
    }
