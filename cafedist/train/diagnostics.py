"""Opt-in measurements of training (``train.diagnostics``) that never change it.

``conflict`` -- depth-wise gradient conflict, the premise of CAFEDistill's student selection:
shallow and deep exits send conflicting gradients into the layers they share. Right after a
client's local update, on one fixed diagnostic batch, every exit's local loss (the algorithm's
:meth:`~cafedist.algorithms.base.Algorithm.exit_losses`: CE plus KD where it applies) is
differentiated with respect to the body blocks it depends on, and for every exit pair
``i < j`` we take the cosine of the two gradients restricted to the blocks both depend on
(blocks ``0..i``). A pair is *trained* when both exits got a loss this round; an exit that
got none (``None``) enters the *all pairs* figure with its plain CE instead, i.e. the conflict
it would bring if it were trained -- what selection avoids.

Why it cannot change training: the batch is drawn from its own generator keyed by
``(seed, "diag", client, round)``; dropout runs under a forked global RNG; gradients come
from :func:`torch.autograd.grad` (``.grad`` and the optimizer are untouched); buffers
(BatchNorm statistics) are restored after the forward pass. With the option off, nothing
here runs. The measurement runs in float32 whatever ``train.amp`` says (no autocast): the
cosines of small gradients are what it reports, and it is read, not trained on.

Algorithms with several local phases (FedRep, FedPAC, FedMD...) are measured with the loss
of their last phase that trains the main model; depth-limited clients (DepthFL, ScaleFL)
only have the pairs among the exits they run (the others are null).

The record (rank 0, one per round, ``metrics.jsonl``'s ``conflict``)::

    {"pairs": ["0-1", "0-2", "1-2"],
     "trained": {"0-1": mean cos or null, ...},  # over active clients where both exits trained
     "all": {"0-1": mean cos, ...},              # over active clients, untrained exits by CE
     "neg_trained": share < 0 over (client x trained pair), or null,
     "neg_all": share < 0 over (client x pair),
     "clients": [active client ids],
     "cos": [[per pair, 4 decimals, null if undefined] per client],
     "trained_mask": ["110", ...]}               # per client, per pair: 1 = both exits trained
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cafedist.algorithms.base import Algorithm, Phase
from cafedist.config import DIAGNOSTICS
from cafedist.rng import derive_seed, generator
from cafedist.run.client import Client
from cafedist.train.local import draw_proxy, forward_batch, wants_proxy

if TYPE_CHECKING:  # the loop imports this module; no import cycle at run time
    from cafedist.train.round import Trainer

__all__ = ["DIAGNOSTICS", "Diagnostics", "client_conflict", "conflict_record", "exit_pairs", "pair_cosines"]


# ----------------------------------------------------------------------------- the math
def exit_pairs(m: int) -> list[tuple[int, int]]:
    """All exit pairs ``(i, j)``, ``i < j``, in lexicographic order."""
    return [(i, j) for i in range(m) for j in range(i + 1, m)]


def _body_gradient(loss: Tensor, blocks: Sequence[nn.Module], depth: int) -> Tensor:
    """Flat float64 gradient of ``loss`` w.r.t. the parameters of blocks ``0..depth``, in block
    order (so the gradient on blocks ``0..i`` is a prefix). Parameters the loss does not reach
    count as zero."""
    params = [p for b in blocks[: depth + 1] for p in b.parameters()]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
                      for g, p in zip(grads, params)])


def pair_cosines(losses: Sequence[Tensor | None], blocks: Sequence[nn.Module], m: int) -> Tensor:
    """Float64 [len(exit_pairs(m))]: the cosine, on the shared blocks ``0..i``, between the body
    gradients of exits ``i`` and ``j``; NaN where either loss is missing or a gradient is zero.

    ``losses`` may be shorter than ``m`` (a depth-limited client): missing exits give NaN.
    """
    ends = torch.tensor([sum(p.numel() for p in b.parameters()) for b in blocks[:m]]).cumsum(0).tolist()
    grads = [_body_gradient(loss, blocks, k) if loss is not None and loss.requires_grad else None
             for k, loss in enumerate(losses)]
    out = torch.full((len(exit_pairs(m)),), float("nan"), dtype=torch.float64)
    for n, (i, j) in enumerate(exit_pairs(m)):
        if j >= len(grads) or grads[i] is None or grads[j] is None:
            continue
        a, b = grads[i][: ends[i]], grads[j][: ends[i]]
        norm = a.norm() * b.norm()
        if norm > 0:
            out[n] = float(a @ b / norm)
    return out


# ----------------------------------------------------------------------------- one client
def _diag_phase(algo: Algorithm, client: Client, rnd: int) -> Phase:
    """The phase whose loss is measured: the last local phase that trains the main model
    (CAFEDistill and most algorithms have only one)."""
    phases = [p for p in algo.local_phases(client.view, rnd) if p.model == "main"]
    return phases[-1] if phases else Phase()


@contextlib.contextmanager
def _untouched(model: nn.Module, seed: int) -> Iterator[None]:
    """Train mode, a private global RNG (dropout) and restored buffers for the duration."""
    device = next(model.parameters()).device
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.train()
        try:
            yield
        finally:
            model.train(was_training)
            with torch.no_grad():
                for k, b in model.named_buffers():
                    b.copy_(buffers[k])


def client_conflict(client: Client, algo: Algorithm, batch_size: int, proxy_batch_size: int, rnd: int, seed: int,
                    proxy_x: Tensor | None = None, proxy_idx: Tensor | None = None) -> Tensor:
    """Float64 [2 P] for one client after its local update: the cosines of every exit pair
    (P = m (m - 1) / 2, all pairs, untrained exits by their plain CE) then the trained flags
    (1.0 where both exits of the pair got a loss)."""
    model, data = client.models["main"], client.data
    m = model.num_exits
    phase = _diag_phase(algo, client, rnd)
    g = generator(seed, "diag", client.cid, rnd)
    idx = torch.randperm(client.n_train, generator=g)[:batch_size].to(data.x_train.device)
    use_proxy = wants_proxy(algo, client, phase, proxy_x, proxy_idx)
    with _untouched(model, derive_seed(seed, "diag-dropout", client.cid, rnd)):
        proxy = draw_proxy(g, proxy_x, proxy_idx, proxy_batch_size) if use_proxy else None
        batch = forward_batch(model, phase, data.x_train[idx], data.y_train[idx], proxy)
        own = algo.exit_losses(client.state, batch)
        # an exit without a loss this step: its plain CE, the conflict it would bring if trained
        full = [loss if loss is not None else F.cross_entropy(z, batch.y) for loss, z in zip(own, batch.logits)]
        cos = pair_cosines(full, model.blocks, m)
    trained = torch.tensor([float(j < len(own) and own[i] is not None and own[j] is not None)
                            for i, j in exit_pairs(m)], dtype=torch.float64)
    return torch.cat([cos, trained])


# ----------------------------------------------------------------------------- the record
def _mean(values: Tensor) -> float | None:
    """Mean of the finite entries, None when there are none (JSON has no NaN)."""
    ok = values[torch.isfinite(values)]
    return round(float(ok.mean()), 6) if ok.numel() else None


def _neg_share(values: Tensor) -> float | None:
    ok = values[torch.isfinite(values)]
    return round(float((ok < 0).to(torch.float64).mean()), 6) if ok.numel() else None


def conflict_record(rows: Tensor, active: Tensor, m: int) -> dict[str, Any]:
    """The ``conflict`` object of one round from the gathered rows [n, 2 P] (client-id order)
    of :func:`client_conflict`; only ``active`` clients count."""
    pairs = [f"{i}-{j}" for i, j in exit_pairs(m)]
    ids = torch.nonzero(active.cpu()).flatten()
    rows = rows.cpu().to(torch.float64)[ids]
    cos, flags = rows[:, : len(pairs)], rows[:, len(pairs):] > 0.5
    trained = torch.where(flags, cos, torch.full_like(cos, float("nan")))
    return {
        "pairs": pairs,
        "trained": {p: _mean(trained[:, n]) for n, p in enumerate(pairs)},
        "all": {p: _mean(cos[:, n]) for n, p in enumerate(pairs)},
        "neg_trained": _neg_share(trained),
        "neg_all": _neg_share(cos),
        "clients": ids.tolist(),
        "cos": [[round(float(v), 4) if torch.isfinite(v) else None for v in row] for row in cos],
        "trained_mask": ["".join("1" if f else "0" for f in row) for row in flags.tolist()],
    }


# ----------------------------------------------------------------------------- the loop's hook
class Diagnostics:
    """What the round loop calls when ``train.diagnostics`` is not empty."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)

    @classmethod
    def of(cls, names: Sequence[str]) -> Diagnostics | None:
        """None when no diagnostic is asked for: the loop then does no work at all."""
        return cls(names) if names else None

    def after_local(self, trainer: Trainer, rnd: int, active: Tensor) -> dict[str, Any]:
        """Every rank, after local training: measure my active clients, gather the rows in
        client-id order; returns the record entries on rank 0 (``{}`` elsewhere), with the
        time spent as ``t_diag``."""
        t = time.perf_counter()
        cfg, run, m = trainer.cfg, trainer.run, trainer.run.num_exits
        width = 2 * len(exit_pairs(m))
        measured = {c.cid: client_conflict(c, trainer.algo, cfg.train.batch_size, cfg.train.proxy_batch_size, rnd,
                                           cfg.seed, run.proxy_x, trainer.exchange.targets_subset(c.state))
                    for c in trainer.pool.each([cid for cid in trainer.pool.ids if active[cid]], modify=False)}
        rows = [measured.get(cid, torch.full((width,), float("nan"), dtype=torch.float64)) for cid in trainer.pool.ids]
        local = torch.stack(rows).to(run.device) if rows else torch.empty(0, width, dtype=torch.float64,
                                                                              device=run.device)
        gathered = trainer.rows.gather(local)
        if gathered is None:
            return {}
        return {"conflict": conflict_record(gathered, active, m), "t_diag": round(time.perf_counter() - t, 6)}
