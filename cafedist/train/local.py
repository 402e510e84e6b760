"""Local training of one client: the draws, the batch, the loss and the optimizer step.

Shuffling and proxy batches are drawn from streams keyed by ``(seed, client id, round,
phase)`` (see :mod:`cafedist.rng`), so a client trains identically whichever rank hosts it
and after a resume. :func:`step_draws` (the random draws of a phase, in order) and
:func:`assemble_batch` (the loss's inputs) are shared with packed training
(:mod:`cafedist.train.packed`), which steps several clients at once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from cafedist.algorithms.base import Algorithm, LocalBatch, Phase
from cafedist.config import TrainConfig
from cafedist.rng import derive_seed, generator
from cafedist.run.client import Client

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str):
    """Mixed-precision context for ``train.amp`` (a no-op context when ``amp`` is "off")."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[amp])


@contextlib.contextmanager
def only_trainable(model: nn.Module, trainable: Callable[[str], bool] | None) -> Iterator[None]:
    """Freeze the parameters ``trainable`` rejects for the duration (SGD skips grad-less ones)."""
    if trainable is None:
        yield
        return
    frozen = [p for name, p in model.named_parameters() if p.requires_grad and not trainable(name)]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def assemble_batch(outs: list[Tensor], y: Tensor, x: Tensor, phase: str, module: nn.Module | None = None,
                   proxy_x: Tensor | None = None, proxy_pos: Tensor | None = None) -> LocalBatch:
    """The loss's inputs from one forward pass over the private rows (and, when ``proxy_x`` is
    given, the proxy rows after them), for both local-training paths.

    The logits are float32 whatever ``train.amp`` is: mixed precision covers the forward pass,
    the loss always runs in full precision (a no-op without amp).
    """
    outs = [o.float() for o in outs]
    if proxy_x is None:
        return LocalBatch(logits=outs, y=y, x=x, module=module, phase=phase)
    b = x.shape[0]
    return LocalBatch(logits=[o[:b] for o in outs], y=y, x=x, module=module, phase=phase,
                      proxy_logits=[o[b:] for o in outs], proxy_pos=proxy_pos, proxy_x=proxy_x)


def amp_cast(tensors: Tensor | dict[str, Tensor], amp: str) -> Tensor | dict[str, Tensor]:
    """A tensor, or a dict's tensors, cast to ``train.amp``'s dtype when floating (unchanged
    when amp is "off"; integer inputs such as token ids stay as they are).

    The packed path's forward under vmap: autocast does not reach vmapped kernels, so the
    parameters and inputs are cast explicitly (differentiably: gradients reach the fp32
    parameters, as with autocast).
    """
    if amp == "off":
        return tensors
    dtype = _AMP_DTYPES[amp]
    if isinstance(tensors, Tensor):
        return tensors.to(dtype) if tensors.is_floating_point() else tensors
    return {k: amp_cast(v, amp) for k, v in tensors.items()}


def draw_proxy(g: torch.Generator, proxy_x: Tensor, proxy_idx: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """One proxy mini-batch: ``(inputs, positions)``, positions into ``proxy_idx`` (the subset
    a client's targets were computed on), drawn from ``g``."""
    pos = torch.randint(0, proxy_idx.shape[0], (size,), generator=g).to(proxy_x.device)
    return proxy_x[proxy_idx[pos]], pos


def wants_proxy(algo: Algorithm, client: Client, phase: Phase, proxy_x: Tensor | None,
                proxy_idx: Tensor | None) -> bool:
    """Whether this client's steps in ``phase`` also draw a proxy mini-batch: the algorithm asks
    for one and the client holds targets (``proxy_idx``, the subset they were computed on)."""
    return proxy_x is not None and proxy_idx is not None and algo.uses_proxy_batch(client.view, phase)


@dataclass
class Draw:
    """The random draws of one local step: private sample rows and, when the step has a proxy
    batch, positions into the client's targets."""

    idx: Tensor
    pos: Tensor | None


def step_draws(client: Client, phase: Phase, train: TrainConfig, round_idx: int, seed: int,
               n_targets: int | None) -> Iterator[Draw]:
    """Every step's draws of ``phase`` in order: per epoch a permutation of the private rows,
    cut into batches; per batch (when ``n_targets`` is given) ``proxy_batch_size`` positions
    into the targets. The one definition of the draw order, for both training paths."""
    g = generator(seed, "shuffle", client.cid, round_idx, phase.name)
    n, bs = client.n_train, train.batch_size
    epochs = train.local_epochs if phase.epochs is None else phase.epochs
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, bs):
            pos = None if n_targets is None else torch.randint(0, n_targets, (train.proxy_batch_size,), generator=g)
            yield Draw(perm[start:start + bs], pos)


def forward_batch(model: nn.Module, phase: Phase, xb: Tensor, yb: Tensor,
                  proxy: tuple[Tensor, Tensor] | None = None, amp: str = "off") -> LocalBatch:
    """The :class:`LocalBatch` of one step: a forward pass of the private inputs, together
    with the proxy inputs ``(x, positions)`` when given (one pass, split afterwards), under
    ``train.amp``. Shared by training (:func:`run_phase`) and diagnostics, so both see the
    same batch."""
    with autocast(xb.device, amp):
        outs = model(xb if proxy is None else torch.cat([xb, proxy[0]], dim=0), upto=phase.upto)
    return assemble_batch(outs, yb, xb, phase.name, model, *(proxy or (None, None)))


def run_phase(client: Client, algo: Algorithm, phase: Phase, train: TrainConfig, round_idx: int, seed: int,
              proxy_x: Tensor | None = None, proxy_idx: Tensor | None = None) -> tuple[Tensor, int]:
    """Run one local phase; returns (summed loss as a float64 tensor, number of steps).

    When the algorithm asks for proxy batches, every step also draws ``proxy_batch_size``
    rows of the client's current targets (positions into ``proxy_idx``, the proxy subset the
    targets were computed on); private and proxy inputs share one forward pass.
    """
    model, opt, data = client.models[phase.model], client.optimizers[phase.model], client.data
    device = data.x_train.device
    use_proxy = wants_proxy(algo, client, phase, proxy_x, proxy_idx)
    torch.manual_seed(derive_seed(seed, "dropout", client.cid, round_idx, phase.name))  # dropout stream
    model.train()
    total, steps = torch.zeros((), dtype=torch.float64, device=device), 0
    scaler = client.scaler(phase.model) if train.amp == "fp16" else None
    with only_trainable(model, phase.trainable):
        for draw in step_draws(client, phase, train, round_idx, seed, proxy_idx.shape[0] if use_proxy else None):
            idx = draw.idx.to(device)
            proxy = None
            if use_proxy:
                pos = draw.pos.to(proxy_x.device)
                proxy = (proxy_x[proxy_idx[pos]], pos)
            batch = forward_batch(model, phase, data.x_train[idx], data.y_train[idx], proxy, train.amp)
            loss = algo.local_loss(client.state, batch)
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:  # fp16 needs loss scaling to keep small gradients representable
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            total += loss.detach().to(torch.float64)
            steps += 1
    return total, steps


def check_phases(algo: Algorithm, client: Client, phases: list[Phase]) -> None:
    """Refuse phases the loop would run wrongly, in one line naming the algorithm: a phase's
    ``model`` must be one the client holds (``"main"`` or an ``extra_models`` entry), and the
    phases of one call must have distinct names (a phase's shuffling and dropout streams are
    keyed by its name: two phases named alike would draw the same batches)."""
    names = [p.name for p in phases]
    for phase in phases:
        if phase.model not in client.models:
            raise ValueError(f"algorithm {algo.name!r}: phase {phase.name!r} trains model {phase.model!r}, "
                             f"which a client does not hold (it holds {', '.join(map(repr, client.models))}: "
                             f"'main' and extra_models)")
        if names.count(phase.name) > 1:
            raise ValueError(f"algorithm {algo.name!r}: two phases named {phase.name!r} in one round: their "
                             f"random streams are keyed by the name, give each phase its own")


def local_update(client: Client, algo: Algorithm, train: TrainConfig, round_idx: int, seed: int,
                 proxy_x: Tensor | None = None, proxy_idx: Tensor | None = None,
                 phases: list[Phase] | None = None) -> float:
    """Run the algorithm's local phases for one client; returns the mean loss over all steps."""
    if phases is None:
        algo.on_local_start(client.view, round_idx)
        phases = algo.local_phases(client.view, round_idx)
    check_phases(algo, client, phases)
    total, steps = 0.0, 0
    for phase in phases:
        t, s = run_phase(client, algo, phase, train, round_idx, seed, proxy_x, proxy_idx)
        total += float(t)
        steps += s
    return total / max(steps, 1)


@torch.no_grad()
def proxy_logits(model: nn.Module, x: Tensor, batch_size: int = 1024, amp: str = "off") -> Tensor:
    """Logits of every exit on proxy inputs: [m, P, C] (float32)."""
    was_training = model.training
    model.eval()
    with autocast(x.device, amp):
        chunks = [torch.stack(model(x[i:i + batch_size])).float() for i in range(0, x.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(chunks, dim=1).float()
