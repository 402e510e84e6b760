"""Evaluating a rank's clients: per-client rows gathered in client-id order, then pooled.

Every function that gathers must be called by every rank together (training calls them on all
ranks; ``cafedist eval`` on one). Each client answers with its algorithm's ``eval_model``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from cafedist.algorithms.base import Algorithm
from cafedist.distributed.client_rows import ClientRows, stack_rows
from cafedist.eval.dynamic import THRESHOLDS, dynamic_counts, dynamic_table, mac_reduction_at_loss
from cafedist.eval.exits import exit_predictions, per_exit_correct
from cafedist.run.client import Client, model_hash
from cafedist.run.residency import ClientPool


def client_test_stats(pool: ClientPool, algo: Algorithm, losses: Sequence[float], rows: ClientRows,
                      num_exits: int, evaluate: bool, n_test: Sequence[int], with_val: bool = False) -> Tensor:
    """[n, 2 + m] float64 (loss, n_test, correct per exit; NaN when not ``evaluate``), client
    order, on every rank; ``with_val`` appends 1 + m columns (n_val, correct per exit: read
    them with :func:`pool_val`) from the same pass over the clients, so an evaluated round
    materializes each client once. ``n_test``: test samples by client id (no client is
    materialized unless ``evaluate``)."""
    width = 2 + num_exits + (1 + num_exits if with_val else 0)
    nan = torch.full((width - 2,), float("nan"), dtype=torch.float64)
    evaluated: dict[int, Tensor] = {}
    for c in pool.each(pool.ids if evaluate else [], modify=False):
        parts = [_correct(algo, c, c.data.x_test, c.data.y_test)]
        if with_val:
            parts.append(_val_row(algo, c, num_exits))
        evaluated[c.cid] = torch.cat(parts)
    out = [torch.cat([torch.tensor([loss, n_test[cid]], dtype=torch.float64), evaluated.get(cid, nan)])
           for cid, loss in zip(pool.ids, losses)]
    return rows.gather(stack_rows(out, (width,), torch.float64, rows.device), to_all=True).cpu()


def _correct(algo: Algorithm, client: Client, x: Tensor, y: Tensor) -> Tensor:
    """Correct predictions per exit of the client's eval model on (x, y), float64 on the CPU."""
    pred, _ = exit_predictions(algo.eval_model(client.view), x)
    return per_exit_correct(pred, y).to(torch.float64).cpu()


def _val_row(algo: Algorithm, client: Client, num_exits: int) -> Tensor:
    """[1 + m]: validation samples, then correct predictions per exit."""
    n_val = int(client.data.y_val.shape[0])
    correct = _correct(algo, client, client.data.x_val, client.data.y_val) if n_val else \
        torch.zeros(num_exits, dtype=torch.float64)
    return torch.cat([torch.tensor([n_val], dtype=torch.float64), correct])


def pool_val(allrows: Tensor | None) -> tuple[list[float], list[list[float] | None]] | None:
    """Gathered validation rows [n, 1 + m] -> (pooled accuracy per exit, per-client accuracy or None)."""
    if allrows is None:
        return None
    n_val, correct = allrows[:, 0].cpu(), allrows[:, 1:].cpu()
    pooled = (correct.sum(0) / max(float(n_val.sum()), 1.0)).tolist()
    per_client = [(correct[i] / n_val[i]).tolist() if n_val[i] > 0 else None for i in range(n_val.shape[0])]
    return pooled, per_client


def _test_row(n_test: int, correct: Tensor, counts: dict[str, Tensor]) -> Tensor:
    """One client's test results as one float64 row (so that ranks gather them in one
    collective): samples, correct per exit [m], then per threshold of the dynamic sweep
    (:func:`~cafedist.eval.dynamic.dynamic_counts`) correct [T], MACs [T] and exit counts [T, m]."""
    return torch.cat([torch.tensor([n_test], dtype=torch.float64), correct.to(torch.float64).cpu(),
                      counts["correct"].to(torch.float64), counts["macs"].to(torch.float64),
                      counts["exits"].to(torch.float64).reshape(-1)])


def _test_row_width(m: int) -> int:
    return 1 + m + len(THRESHOLDS) * (2 + m)


def _pooled_test_rows(allrows: Tensor, m: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Every client's :func:`_test_row` [n, width] -> (samples [n], correct per exit [n, m],
    the dynamic counts summed over clients)."""
    n, nth, o = allrows.shape[0], len(THRESHOLDS), 1 + m
    n_test, correct = allrows[:, 0], allrows[:, 1:o]
    dyn = {"correct": allrows[:, o:o + nth].sum(0).round().to(torch.int64),
           "macs": allrows[:, o + nth:o + 2 * nth].sum(0),
           "exits": allrows[:, o + 2 * nth:].reshape(n, nth, m).sum(0).round().to(torch.int64),
           "n": n_test.sum().round().to(torch.int64)}
    return n_test, correct, dyn


def final_evaluation(pool: ClientPool, algo: Algorithm, rows: ClientRows, macs: list[int],
                     num_exits: int, has_val: bool, is_main: bool) -> dict[str, Any] | None:
    """Accuracy per exit and per client, dynamic inference over thresholds, validation
    accuracy (when the store has the split) and model hashes; rank 0 returns it. One pass
    over the clients (each materialized once)."""
    m = num_exits
    out, val_rows, hashes = [], [], {}
    for c in pool.each(pool.ids, modify=False):
        pred, conf = exit_predictions(algo.eval_model(c.view), c.data.x_test)
        counts = dynamic_counts(pred.cpu(), conf.cpu(), c.data.y_test.cpu(), macs)
        out.append(_test_row(c.n_test, per_exit_correct(pred, c.data.y_test), counts))
        hashes[c.cid] = model_hash(c.model)
        if has_val:
            val_rows.append(_val_row(algo, c, m))
    allrows = rows.gather(stack_rows(out, (_test_row_width(m),), torch.float64, rows.device), to_all=False)
    hashes = rows.comm.all_gather_object(hashes)
    val = pool_val(rows.gather(stack_rows(val_rows, (1 + m,), torch.float64, rows.device), to_all=False)) \
        if has_val else None
    if not is_main:
        return None
    n_test, correct, dyn = _pooled_test_rows(allrows.cpu(), m)
    n = n_test.shape[0]
    table = dynamic_table(dyn, macs)
    acc = (correct.sum(0) / n_test.sum()).tolist()
    merged = {k: v for part in hashes for k, v in part.items()}
    val_fields = {"val_acc_per_exit": val[0], "val_acc_per_client": val[1]} if val is not None else {}
    return {
        "acc_per_exit": acc,
        "acc_per_client": [(correct[i] / n_test[i]).tolist() for i in range(n)],
        **val_fields,
        "macs_per_exit": macs,
        "dynamic": table,
        "mac_reduction_at_1pt": mac_reduction_at_loss(table, acc[-1], 0.01),
        "model_hashes": {str(k): merged[k] for k in sorted(merged)},
    }
