"""Packed local training: step k same-architecture clients together with ``torch.func``.

Simulators usually train clients one after another, so with small models and small batches a
GPU spends its time launching tiny kernels. Here the k clients' parameters are stacked along
a new leading dimension and one vmapped forward/backward steps all of them at once
(``torch.func.functional_call`` + ``vmap``; a vmapped convolution becomes a grouped
convolution), followed by the same SGD (momentum, weight decay) on the stacked tensors.

The math is that of :func:`cafedist.train.local.local_update` for every client:

* the same draws: :func:`~cafedist.train.local.step_draws`, the one definition of each
  client's shuffling and proxy positions;
* the same batch and loss: :func:`~cafedist.train.local.assemble_batch` and
  ``algo.local_loss`` itself, called under vmap; ``train.amp`` casts parameters and inputs
  (autocast does not reach vmapped kernels). Clients whose step differs in
  *structure* -- batch size (a short last batch, fewer samples), whether a proxy batch is
  drawn, which exits are students -- are stepped in separate groups, so inside a group the
  loss's Python control flow is identical for every client and only tensors differ; algorithm
  state entries equal across a group are passed unbatched, the others stacked;
* the same update: torch's own SGD step (``torch.optim.sgd.sgd``, what ``torch.optim.SGD``
  calls) applied to the stacked parameters and each client's own momentum buffers;
  parameters that get no gradient (an exit that is not a student) are skipped exactly as SGD
  skips them.

Results equal sequential training to float tolerance (vmapped kernels sum in another order).
Packing needs (:func:`pack_blocker` says what is missing): an algorithm whose ``local_loss``
is declared vmappable (``vmappable_loss = True``: it uses only the logits, labels, inputs and
state of the batch, never ``batch.module``), models without buffers (BatchNorm statistics) and
without active dropout (vmap would draw other random numbers than the sequential run), one
architecture and one plain-SGD setting for all clients.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.optim.sgd import sgd

from cafedist.algorithms.base import Algorithm, Phase
from cafedist.config import TrainConfig
from cafedist.run.client import Client
from cafedist.train.local import Draw, amp_cast, assemble_batch, check_phases, local_update, step_draws, wants_proxy

log = logging.getLogger("cafedist")


# ----------------------------------------------------------------------------- can we pack?
def _signature(model: nn.Module) -> tuple:
    return tuple((name, tuple(p.shape), p.dtype, p.device, p.requires_grad) for name, p in model.named_parameters())


def _sgd_hparams(opt: torch.optim.Optimizer) -> tuple[float, float, float] | None:
    """(lr, momentum, weight_decay) of a plain single-group SGD, else None."""
    if type(opt) is not torch.optim.SGD or len(opt.param_groups) != 1:
        return None
    g = opt.param_groups[0]
    if g["dampening"] != 0 or g["nesterov"] or g["maximize"] or isinstance(g["lr"], Tensor):
        return None
    return float(g["lr"]), float(g["momentum"]), float(g["weight_decay"])


def pack_blocker(clients: Sequence[Client], algo: Algorithm, train: TrainConfig | None = None) -> str | None:
    """Why ``clients`` cannot be trained packed with ``train``'s options (None when they can)."""
    if not clients:
        return "no clients"
    if train is not None and train.amp == "fp16":
        return "train.amp: fp16 needs loss scaling, which only the sequential path has (bf16 packs)"
    if not algo.vmappable_loss:
        return f"algorithm {algo.name!r} does not declare a vmappable local_loss"
    first = clients[0]
    if set(first.models) != set(first.optimizers):
        return f"client {first.cid}: not one optimizer per model"
    for c in clients:
        if set(c.models) != set(first.models):
            return f"client {c.cid}: holds other models than client {first.cid}"
        if c.data.x_train.shape[1:] != first.data.x_train.shape[1:]:
            return f"client {c.cid}: input shape differs from client {first.cid}"
        for key, model in c.models.items():
            opt = c.optimizers[key]
            if any(True for _ in model.buffers()):
                return f"client {c.cid}: model {key!r} has buffers (e.g. BatchNorm statistics)"
            if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
                return f"client {c.cid}: model {key!r} has active dropout (vmap draws other random numbers)"
            if _signature(model) != _signature(first.models[key]):
                return f"client {c.cid}: model {key!r} differs in architecture from client {first.cid}'s"
            hp = _sgd_hparams(opt)
            if hp is None:
                return f"client {c.cid}: optimizer of {key!r} is not plain SGD (one group, no nesterov/dampening)"
            if hp != _sgd_hparams(first.optimizers[key]):
                return f"client {c.cid}: optimizer settings differ from client {first.cid}'s"
            if list(opt.param_groups[0]["params"]) != list(model.parameters()):
                return f"client {c.cid}: optimizer of {key!r} does not hold exactly the model's parameters"
    return None


def use_packing(mode: str, clients: Sequence[Client], algo: Algorithm, train: TrainConfig, device: torch.device,
                warn: bool = True) -> bool:
    """``train.packed``: auto packs on CUDA only (on CPU a vmapped grouped convolution is
    slower than separate ones, docs/PERFORMANCE.md); on packs wherever possible (and says
    why not, when ``warn``); off never packs."""
    if mode == "off" or len(clients) < 2:
        return False
    reason = pack_blocker(clients, algo, train)
    if reason is not None:
        if mode == "on" and warn:
            log.warning("train.packed=on: clients are trained one after another (%s)", reason)
        return False
    return mode == "on" or device.type == "cuda"


# ----------------------------------------------------------------------------- stacked state
@dataclass
class _Stack:
    """The k clients' parameters and SGD momentum buffers of one model, stacked [k, ...]."""

    params: dict[str, Tensor]
    bufs: dict[str, Tensor] | None
    has_buf: dict[str, Tensor]  # bool [k]: which clients' optimizers hold a buffer for the name
    lr: float
    momentum: float
    wd: float

    @classmethod
    def of(cls, models: list[nn.Module], opts: list[torch.optim.Optimizer]) -> "_Stack":
        """Stack the clients' state. SGD skips a parameter whose grad is None, so a client may
        have no buffer for it yet; a zero buffer then behaves identically (dampening is 0:
        ``0 * momentum + grad == grad``) and ``has_buf`` keeps the optimizer state exact."""
        lr, momentum, wd = _sgd_hparams(opts[0])
        named = [dict(m.named_parameters()) for m in models]
        names = list(named[0])
        params = {n: torch.stack([nm[n].detach() for nm in named]) for n in names}
        found = {n: [o.state.get(nm[n], {}).get("momentum_buffer") for o, nm in zip(opts, named)] for n in names}
        has_buf = {n: torch.tensor([b is not None for b in found[n]]) for n in names}
        bufs = None
        if momentum != 0:
            bufs = {n: torch.stack([torch.zeros_like(nm[n]) if b is None else b.detach()
                                    for b, nm in zip(found[n], named)]) for n in names}
        return cls(params, bufs, has_buf, lr, momentum, wd)

    def step(self, members: Tensor | None, grads: dict[str, Tensor]) -> None:
        """``torch.optim.SGD``'s update for the clients ``members`` (None: all), in place."""
        with torch.no_grad():
            names = list(grads)
            params = [self.params[n] if members is None else self.params[n][members] for n in names]
            bufs = None if self.bufs is None else [self.bufs[n] if members is None else self.bufs[n][members]
                                                   for n in names]
            sgd(params, [grads[n] for n in names], bufs if bufs is not None else [None] * len(names),
                foreach=False, weight_decay=self.wd, momentum=self.momentum, lr=self.lr, dampening=0.0,
                nesterov=False, maximize=False)
            for i, n in enumerate(names):
                if members is not None:  # advanced indexing copied: write back
                    self.params[n][members] = params[i]
                    if bufs is not None:
                        self.bufs[n][members] = bufs[i]
                if self.bufs is not None:
                    self.has_buf[n][slice(None) if members is None else members.cpu()] = True

    def write_back(self, models: list[nn.Module], opts: list[torch.optim.Optimizer]) -> None:
        """Copy parameters and momentum buffers back into each client's model and optimizer."""
        with torch.no_grad():
            for i, (model, opt) in enumerate(zip(models, opts)):
                for n, p in model.named_parameters():
                    p.copy_(self.params[n][i])
                    if self.bufs is not None and self.has_buf[n][i]:
                        opt.state[p]["momentum_buffer"] = self.bufs[n][i].clone()


def _stack_states(states: list[dict[str, Tensor]], device: torch.device) -> tuple[dict, dict]:
    """Algorithm states of a group: identical entries shared (in_dims None), others stacked (0)."""
    state, dims = {}, {}
    for key in states[0]:
        # on one device first: a client re-loaded from parked state holds its state on the
        # device, one that stayed resident may hold CPU tensors an algorithm created
        vals = [s[key].to(device) for s in states]
        first = vals[0]
        if all(v.shape == first.shape and v.dtype == first.dtype and torch.equal(v, first) for v in vals[1:]):
            state[key], dims[key] = first, None
        else:
            state[key], dims[key] = torch.stack(vals), 0
    return state, dims


# ----------------------------------------------------------------------------- the trainer
def packed_local_update(clients: Sequence[Client], algo: Algorithm, train: TrainConfig, round_idx: int,
                        seed: int, proxy_x: Tensor | None = None,
                        proxy_idx: Tensor | Sequence[Tensor | None] | None = None,
                        phases: list[Phase] | None = None) -> list[float]:
    """Local training of every client in ``clients``, stepped together; mean loss per client.

    Drop-in for ``[local_update(c, ...) for c in clients]`` with the same arguments;
    ``proxy_idx`` may also be a list with one entry per client (clients whose targets come
    from different rounds). Updates each client's parameters and SGD momentum buffers in place.
    Raises ``ValueError`` when :func:`pack_blocker` finds a reason not to pack; clients whose
    algorithm gives them different local phases are trained one after another.
    """
    reason = pack_blocker(clients, algo, train)
    if reason is not None:
        raise ValueError(f"cannot pack these clients: {reason}")
    k = len(clients)
    pidx = list(proxy_idx) if isinstance(proxy_idx, (list, tuple)) else [proxy_idx] * k
    if phases is None:
        per_client = []
        for c in clients:
            algo.on_local_start(c.view, round_idx)
            per_client.append(algo.local_phases(c.view, round_idx))
        if any(p != per_client[0] for p in per_client[1:]):  # one after another, on the one local path
            return [local_update(c, algo, train, round_idx, seed, proxy_x, pidx[i], phases=per_client[i])
                    for i, c in enumerate(clients)]
        phases = per_client[0]
    check_phases(algo, clients[0], phases)
    totals = torch.zeros(k, dtype=torch.float64)
    steps = torch.zeros(k, dtype=torch.float64)
    for phase in phases:
        t, s = _packed_phase(clients, algo, phase, train, round_idx, seed, proxy_x, pidx)
        totals += t
        steps += s
    return (totals / steps.clamp_min(1)).tolist()


def _packed_phase(clients: Sequence[Client], algo: Algorithm, phase: Phase, train: TrainConfig, round_idx: int,
                  seed: int, proxy_x: Tensor | None, pidx: list[Tensor | None]) -> tuple[Tensor, Tensor]:
    """One local phase of all clients; returns (summed loss, steps) per client, float64 [k]."""
    k = len(clients)
    device = clients[0].data.x_train.device
    models = [c.models[phase.model] for c in clients]
    opts = [c.optimizers[phase.model] for c in clients]
    for model in models:
        model.train()
    stack = _Stack.of(models, opts)
    trainable = _trainable_names(models[0], phase)
    draws, structure = _client_steps(clients, algo, phase, train, round_idx, seed, proxy_x, pidx)
    data = _PaddedData.of(clients, proxy_x, pidx)
    loss_of = _client_loss(models[0], algo, phase, train)

    states: dict[tuple[int, ...], tuple[dict, dict]] = {}  # a group's algorithm states, stacked once
    totals = torch.zeros(k, dtype=torch.float64)
    counts = [len(d) for d in draws]
    for t in range(max(counts, default=0)):
        for with_proxy, members in _step_groups(draws, structure, t):
            key = tuple(members)
            if key not in states:
                states[key] = _stack_states([clients[i].state for i in members], device)
            batch = data.batch([draws[i][t] for i in members], members, with_proxy)
            losses = _grouped_step(stack, loss_of, trainable, members, k, states[key], batch)
            totals[members] += losses.detach().to(torch.float64).cpu()
    stack.write_back(models, opts)
    return totals, torch.tensor(counts, dtype=torch.float64)


def _trainable_names(template: nn.Module, phase: Phase) -> list[str]:
    """What run_phase's only_trainable leaves trainable: requires_grad and accepted by the filter."""
    return [n for n, p in template.named_parameters()
            if p.requires_grad and (phase.trainable is None or phase.trainable(n))]


def _client_steps(clients: Sequence[Client], algo: Algorithm, phase: Phase, train: TrainConfig, round_idx: int,
                  seed: int, proxy_x: Tensor | None, pidx: list[Tensor | None]) -> tuple[list[list[Draw]], list[tuple]]:
    """Each client's draws of every step of ``phase``, and its step structure: what must be equal
    inside a vmapped group (whether a proxy batch is drawn, the trained exits, the state's keys)."""
    use_proxy = [wants_proxy(algo, c, phase, proxy_x, pidx[i]) for i, c in enumerate(clients)]
    draws = [list(step_draws(c, phase, train, round_idx, seed, pidx[i].shape[0] if use_proxy[i] else None))
             for i, c in enumerate(clients)]
    structure = [(use_proxy[i], tuple(algo.trained_exits(c.state).tolist()), tuple(sorted(c.state)))
                 for i, c in enumerate(clients)]
    return draws, structure


def _step_groups(draws: list[list[Draw]], structure: list[tuple], t: int) -> list[tuple[bool, list[int]]]:
    """The clients that take step ``t``, grouped by batch size and structure: (with a proxy batch, members)."""
    groups: dict[tuple, list[int]] = {}
    for i, client_draws in enumerate(draws):
        if t < len(client_draws):
            groups.setdefault((client_draws[t].idx.shape[0], structure[i]), []).append(i)
    return [(with_proxy, members) for (_, (with_proxy, _, _)), members in groups.items()]


class _Batch(NamedTuple):
    """One step's batches of a group of clients, stacked [g, ...] (the vmapped loss's arguments)."""

    x: Tensor
    y: Tensor
    proxy_x: Tensor | None  # None: the group's step draws no proxy batch
    proxy_pos: Tensor | None  # positions into each client's targets


@dataclass
class _PaddedData:
    """The clients' train splits padded to the largest client, so one gather serves every client
    of a step, and the proxy inputs with each client's subset of them."""

    x: Tensor  # [k, n_max, *input_shape]
    y: Tensor  # [k, n_max]
    proxy_x: Tensor | None
    pidx: list[Tensor | None]

    @classmethod
    def of(cls, clients: Sequence[Client], proxy_x: Tensor | None, pidx: list[Tensor | None]) -> "_PaddedData":
        """Copy the clients' train splits into zero-padded stacks on their device."""
        k, n_max = len(clients), max(c.n_train for c in clients)
        x0 = clients[0].data.x_train
        x = torch.zeros((k, n_max, *x0.shape[1:]), dtype=x0.dtype, device=x0.device)
        y = torch.zeros((k, n_max), dtype=clients[0].data.y_train.dtype, device=x0.device)
        for i, c in enumerate(clients):
            x[i, :c.n_train] = c.data.x_train
            y[i, :c.n_train] = c.data.y_train
        return cls(x, y, proxy_x, pidx)

    def batch(self, draws: list[Draw], members: list[int], with_proxy: bool) -> _Batch:
        """One step's inputs and labels of ``members`` (and their proxy inputs and positions), stacked [g, ...]."""
        device = self.x.device
        rows = torch.stack([d.idx for d in draws]).to(device)  # [g, b]
        who = torch.tensor(members, dtype=torch.int64, device=device).unsqueeze(1)
        xp = pos = None
        if with_proxy:
            pos = torch.stack([d.pos for d in draws]).to(device)  # [g, Bp]
            xp = self.proxy_x[torch.stack([self.pidx[i].to(device)[pos[j]] for j, i in enumerate(members)])]
        return _Batch(self.x[who, rows], self.y[who, rows], xp, pos)


class ModuleUnavailable(TypeError):
    """A loss used ``batch.module`` under packed training; the message says how it used it."""


class _NoModule:
    """``batch.module`` under packed training, where no per-client module exists: any use of it
    raises :class:`ModuleUnavailable`. (A plain None let a loss's own unrelated error about
    some None be reported as a read of the module, and a true read as some None's error.)"""

    def __getattr__(self, name: str):
        raise ModuleUnavailable(f"batch.module.{name}")

    def __call__(self, *args, **kwargs):
        raise ModuleUnavailable("batch.module(...)")

    def __iter__(self):
        raise ModuleUnavailable("iter(batch.module)")

    def __repr__(self) -> str:
        return "<no module under packed training>"


NO_MODULE = _NoModule()


def _client_loss(template: nn.Module, algo: Algorithm, phase: Phase, train: TrainConfig) -> Callable[..., Tensor]:
    """One client's loss from its parameters, state and batch (to be vmapped over the clients)."""
    def loss_of(params: dict[str, Tensor], state: dict[str, Tensor], x: Tensor, y: Tensor,
                xp: Tensor | None, pos: Tensor | None) -> Tensor:
        inputs = x if xp is None else torch.cat([x, xp], dim=0)
        outs = functional_call(template, amp_cast(params, train.amp), (amp_cast(inputs, train.amp),),
                               {"upto": phase.upto})
        try:
            return algo.local_loss(state, assemble_batch(outs, y, x, phase.name, NO_MODULE, xp, pos))
        except ModuleUnavailable as exc:
            raise TypeError(f"algorithm {algo.name!r} declares vmappable_loss, but its local_loss used {exc} under "
                            f"packed training: a vmappable loss reads only the batch's tensors and the state, "
                            f"never batch.module (there is no per-client module inside vmap); set "
                            f"vmappable_loss = False") from None

    return loss_of


def _grouped_step(stack: _Stack, loss_of: Callable[..., Tensor], trainable: list[str], members: list[int], k: int,
                  stacked_state: tuple[dict, dict], batch: _Batch) -> Tensor:
    """One SGD step of the clients ``members`` (of ``k``) on ``batch``; their losses, [g]."""
    state, state_dims = stacked_state
    whole = len(members) == k  # the common case: no gather/scatter of stacked parameters
    sel = None if whole else torch.tensor(members, dtype=torch.int64, device=batch.x.device)
    cur = {n: (p if whole else p[sel]).detach().requires_grad_(n in trainable) for n, p in stack.params.items()}
    dims = None if batch.proxy_x is None else 0
    losses = vmap(loss_of, in_dims=(0, state_dims, 0, 0, dims, dims))(cur, state, *batch)
    # a client's loss depends only on its own parameter slice, so the gradient of the sum
    # w.r.t. the stacked parameters is every client's own gradient: one backward for all
    grads = torch.autograd.grad(losses.sum(), [cur[n] for n in trainable], allow_unused=True)
    stack.step(sel, {n: g for n, g in zip(trainable, grads) if g is not None})
    return losses
