"""Packed local training: step k same-architecture clients together with ``torch.func``.

Simulators usually train clients one after another, so with small models and small batches a
device spends its time launching tiny kernels. Here the k clients' parameters are stacked
along a new leading dimension and one vmapped forward/backward steps all of them at once
(``torch.func.functional_call`` + ``vmap``; on convolutions vmap becomes a grouped
convolution), followed by the same SGD (momentum, weight decay) on the stacked tensors.

The math is exactly that of :func:`cafedist.train.client.local_update` for every client:

* the same keyed random streams: each client's shuffling and proxy positions are drawn from
  its own ``generator(seed, "shuffle", cid, round)`` in the same order as the sequential code;
* the same loss: ``algo.local_loss`` itself, called under vmap. Clients whose step differs in
  *structure* -- batch size (a short last batch, fewer samples), whether a proxy batch is
  drawn, which exits are students -- are stepped in separate groups, so inside a group the
  loss's Python control flow is the same for every client and only tensors differ;
* the same optimizer update as ``torch.optim.SGD`` (``add(p, alpha=wd)``, ``buf.mul_().add_()``,
  ``p.add_(buf, alpha=-lr)``), reading and writing each client's own momentum buffers.

Results equal sequential training to float tolerance (vmapped kernels sum in another order).
What cannot be packed (:func:`pack_blocker` says why): models with buffers (BatchNorm running
statistics) or active dropout (vmap would draw other random numbers than the sequential run),
clients of different architectures or optimizer settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from cafedist.algorithms.base import Algorithm, LocalBatch
from cafedist.config import TrainConfig
from cafedist.rng import generator
from cafedist.train.client import Client


# ----------------------------------------------------------------------------- can we pack?
def _signature(model: nn.Module) -> tuple:
    return tuple((name, tuple(p.shape), p.dtype, p.device) for name, p in model.named_parameters())


def _sgd_hparams(opt: torch.optim.Optimizer) -> tuple | None:
    """(lr, momentum, weight_decay) of a plain single-group SGD, else None."""
    if type(opt) is not torch.optim.SGD or len(opt.param_groups) != 1:
        return None
    g = opt.param_groups[0]
    if g["dampening"] != 0 or g["nesterov"] or g["maximize"] or isinstance(g["lr"], Tensor):
        return None
    return float(g["lr"]), float(g["momentum"]), float(g["weight_decay"])


def pack_blocker(clients: Sequence[Client]) -> str | None:
    """Why ``clients`` cannot be trained packed (None when they can)."""
    if not clients:
        return "no clients"
    first = clients[0]
    sig, hp = _signature(first.model), _sgd_hparams(first.optimizer)
    if hp is None:
        return "optimizer is not plain SGD (one param group, no dampening/nesterov/maximize)"
    for c in clients:
        if any(True for _ in c.model.buffers()):
            return f"client {c.cid}: model has buffers (e.g. BatchNorm statistics)"
        if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in c.model.modules()):
            return f"client {c.cid}: model has active dropout (vmap would draw other random numbers)"
        if _signature(c.model) != sig:
            return f"client {c.cid}: architecture differs from client {first.cid}"
        if _sgd_hparams(c.optimizer) != hp:
            return f"client {c.cid}: optimizer settings differ from client {first.cid}"
        if list(c.optimizer.param_groups[0]["params"]) != list(c.model.parameters()):
            return f"client {c.cid}: optimizer does not hold exactly the model's parameters"
        if c.data.x_train.shape[1:] != first.data.x_train.shape[1:]:
            return f"client {c.cid}: input shape differs from client {first.cid}"
    return None


# ----------------------------------------------------------------------------- schedules
@dataclass
class _Step:
    """One client's local step: sample rows and (optionally) proxy positions."""

    idx: Tensor
    pos: Tensor | None


def _schedule(client: Client, train: TrainConfig, round_idx: int, seed: int, use_proxy: bool,
              n_proxy: int) -> list[_Step]:
    """The exact draws :func:`local_update` makes for this client, in the same order."""
    g = generator(seed, "shuffle", client.cid, round_idx, device="cpu")
    n, bs = client.n_train, train.batch_size
    steps = []
    for _ in range(train.local_epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, bs):
            pos = torch.randint(0, n_proxy, (train.proxy_batch_size,), generator=g) if use_proxy else None
            steps.append(_Step(perm[start:start + bs], pos))
    return steps


def _same(tensors: list[Tensor]) -> bool:
    first = tensors[0]
    return all(t.shape == first.shape and t.dtype == first.dtype and torch.equal(t, first) for t in tensors[1:])


def _stack_parameters(clients: Sequence[Client], names: list[str], with_momentum: bool
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, dict[str, Tensor]]:
    """Stacked parameters and momentum buffers [k, ...], and which clients have a buffer per name.

    SGD skips a parameter whose grad is None (e.g. the head of an exit that is not a student),
    so a client may have no buffer for it yet; a zero buffer behaves identically (dampening is
    0: ``0 * momentum + grad == grad``), and ``has_buf`` keeps the optimizer state itself exact.
    """
    named = [dict(c.model.named_parameters()) for c in clients]
    params = {n: torch.stack([nm[n].detach() for nm in named]) for n in names}
    found = {n: [c.optimizer.state.get(nm[n], {}).get("momentum_buffer") for c, nm in zip(clients, named)]
             for n in names}
    has_buf = {n: torch.tensor([b is not None for b in found[n]]) for n in names}
    bufs = None
    if with_momentum:
        bufs = {n: torch.stack([torch.zeros_like(nm[n]) if b is None else b.detach()
                                for b, nm in zip(found[n], named)]) for n in names}
    return params, bufs, has_buf


# ----------------------------------------------------------------------------- the trainer
def packed_local_update(clients: Sequence[Client], algo: Algorithm, train: TrainConfig, round_idx: int,
                        seed: int, proxy_x: Tensor | None = None,
                        proxy_idx: Tensor | Sequence[Tensor | None] | None = None) -> list[float]:
    """Local epochs of every client in ``clients``, stepped together; mean loss per client.

    Drop-in for ``[local_update(c, ...) for c in clients]`` (same arguments; ``proxy_idx`` may
    also be a list with one entry per client, for clients whose targets come from different
    rounds). Updates each client's model parameters and SGD momentum buffers in place.
    Raises ``ValueError`` when :func:`pack_blocker` finds a reason not to pack.
    """
    reason = pack_blocker(clients)
    if reason is not None:
        raise ValueError(f"cannot pack these clients: {reason}")
    k = len(clients)
    template = clients[0].model
    device = clients[0].data.x_train.device
    names = [name for name, _ in template.named_parameters()]
    lr, momentum, wd = _sgd_hparams(clients[0].optimizer)

    # per-client proxy indices and the exact random draws of the sequential code
    pidx = list(proxy_idx) if isinstance(proxy_idx, (list, tuple)) else [proxy_idx] * k
    use_proxy = [proxy_x is not None and pidx[i] is not None and algo.uses_proxy_batch(c.state)
                 for i, c in enumerate(clients)]
    schedules = [_schedule(c, train, round_idx, seed, use_proxy[i], pidx[i].shape[0] if use_proxy[i] else 0)
                 for i, c in enumerate(clients)]

    params, bufs, has_buf = _stack_parameters(clients, names, momentum != 0)
    # data padded to the largest client so one gather serves every client of a step
    n_max = max(c.n_train for c in clients)
    x_all = torch.zeros((k, n_max, *clients[0].data.x_train.shape[1:]), dtype=clients[0].data.x_train.dtype,
                        device=device)
    y_all = torch.zeros((k, n_max), dtype=clients[0].data.y_train.dtype, device=device)
    for i, c in enumerate(clients):
        x_all[i, :c.n_train] = c.data.x_train
        y_all[i, :c.n_train] = c.data.y_train

    structure = [(use_proxy[i], tuple(algo.students(c.state).tolist())) for i, c in enumerate(clients)]
    packed_states: dict[tuple[int, ...], tuple[dict, dict]] = {}
    totals = torch.zeros(k, dtype=torch.float64, device=device)
    counts = [len(s) for s in schedules]
    for t in range(max(counts)):
        groups: dict[tuple, list[int]] = {}
        for i in range(k):
            if t < counts[i]:
                groups.setdefault((schedules[i][t].idx.shape[0], structure[i]), []).append(i)
        for (_, (with_proxy, _)), members in groups.items():
            key = tuple(members)
            if key not in packed_states:
                packed_states[key] = _stack_states([clients[i].state for i in members], device)
            step = _GroupStep(members, [schedules[i][t] for i in members], [pidx[i] for i in members],
                              *packed_states[key])
            losses, updated = _group_step(step, k, algo, template, names, params, bufs, x_all, y_all,
                                          proxy_x if with_proxy else None, lr, momentum, wd, device)
            totals[members] += losses.to(torch.float64)
            for n in updated:
                has_buf[n][members] = bufs is not None

    # write parameters and momentum buffers back into each client's model and optimizer
    with torch.no_grad():
        for i, c in enumerate(clients):
            for n, p in c.model.named_parameters():
                p.copy_(params[n][i])
                if has_buf[n][i]:
                    c.optimizer.state[p]["momentum_buffer"] = bufs[n][i].clone()
    c_t = torch.tensor(counts, dtype=torch.float64, device=device).clamp_min(1)
    return (totals / c_t).tolist()


@dataclass
class _GroupStep:
    """The clients stepped together in one vmapped call, with their draws and packed state."""

    members: list[int]
    draws: list[_Step]
    proxy_idx: list[Tensor | None]
    state: dict[str, Tensor]
    state_dims: dict[str, int | None]


def _stack_states(states: list[dict[str, Tensor]], device) -> tuple[dict[str, Tensor], dict[str, int | None]]:
    """Algorithm states of a group: identical entries shared (in_dims None), others stacked (0)."""
    state, dims = {}, {}
    for key in states[0]:
        vals = [s[key] for s in states]
        if _same(vals):
            state[key], dims[key] = vals[0], None
        else:
            state[key], dims[key] = torch.stack([v.to(device) for v in vals]), 0
    return state, dims


def _group_step(step: _GroupStep, k: int, algo: Algorithm, template: nn.Module, names: list[str],
                params: dict[str, Tensor], bufs: dict[str, Tensor] | None, x_all: Tensor, y_all: Tensor,
                proxy_x: Tensor | None, lr: float, momentum: float, wd: float,
                device) -> tuple[Tensor, list[str]]:
    """One SGD step of a group (same batch structure); returns its losses [g] and the updated names."""
    members = step.members
    whole = len(members) == k  # the common case: no gather/scatter of the stacked parameters
    sel = torch.tensor(members, dtype=torch.int64, device=device)
    rows = torch.stack([d.idx for d in step.draws]).to(device)  # [g, b]
    xb, yb = x_all[sel.unsqueeze(1), rows], y_all[sel.unsqueeze(1), rows]
    xp = pos = None
    if proxy_x is not None:
        pos = torch.stack([d.pos for d in step.draws]).to(device)  # [g, Bp]
        xp = proxy_x[torch.stack([pi.to(device)[p] for pi, p in zip(step.proxy_idx, pos)])]

    def loss_of(p: dict[str, Tensor], st: dict[str, Tensor], x: Tensor, y: Tensor,
                px: Tensor | None, pp: Tensor | None) -> Tensor:
        if px is None:
            batch = LocalBatch(logits=functional_call(template, p, (x,)), y=y)
        else:
            outs = functional_call(template, p, (torch.cat([x, px], dim=0),))
            b = x.shape[0]
            batch = LocalBatch(logits=[o[:b] for o in outs], y=y, proxy_logits=[o[b:] for o in outs],
                               proxy_pos=pp)
        return algo.local_loss(st, batch)

    cur = {n: (params[n] if whole else params[n][sel]).detach().requires_grad_(True) for n in names}
    proxy_dim = 0 if xp is not None else None
    losses = vmap(loss_of, in_dims=(0, step.state_dims, 0, 0, proxy_dim, proxy_dim))(
        cur, step.state, xb, yb, xp, pos)
    # a client's loss depends only on its own parameter slice, so the gradient of the sum
    # w.r.t. the stacked parameters is every client's own gradient: one backward for all
    grads = torch.autograd.grad(losses.sum(), [cur[n] for n in names], allow_unused=True)
    updated = []
    with torch.no_grad():
        for n, g in zip(names, grads):
            if g is None:  # not in this loss (SGD skips params without grad): leave untouched
                continue
            updated.append(n)
            p = params[n] if whole else params[n][sel]
            b = None if bufs is None else (bufs[n] if whole else bufs[n][sel])
            _sgd_update(p, g, b, lr, momentum, wd)
            if not whole:
                params[n][sel] = p
                if b is not None:
                    bufs[n][sel] = b
    return losses.detach(), updated


def _sgd_update(p: Tensor, grad: Tensor, buf: Tensor | None, lr: float, momentum: float, wd: float) -> None:
    """``torch.optim.SGD``'s single-tensor update (dampening 0, no nesterov), in place."""
    if wd != 0:
        grad = grad.add(p, alpha=wd)
    if buf is not None:
        buf.mul_(momentum).add_(grad)
        grad = buf
    p.add_(grad, alpha=-lr)
