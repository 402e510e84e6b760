"""A client is the unit of state: models, optimizers, algorithm state and data live together.

Nothing here depends on the rank a client runs on: model initialisation, shuffling and proxy
batches are drawn from streams keyed by ``(seed, client id, round)`` (see :mod:`cafedist.rng`),
so a client trains identically whichever rank hosts it and after a resume.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from cafedist.algorithms.base import Algorithm, ClientView, LocalBatch, Phase
from cafedist.config import TrainConfig
from cafedist.data.store import ClientData
from cafedist.rng import derive_seed, generator


@dataclass
class Client:
    """One federated client hosted on this rank."""

    cid: int
    models: dict[str, nn.Module]  # "main" (evaluated) and any extra models of the algorithm
    optimizers: dict[str, torch.optim.Optimizer]
    data: ClientData
    state: dict[str, Tensor] = field(default_factory=dict)  # algorithm state (checkpointed)

    @property
    def model(self) -> nn.Module:
        return self.models["main"]

    @property
    def view(self) -> ClientView:
        """What algorithm hooks get to see (models and state, not data)."""
        return ClientView(cid=self.cid, models=self.models, state=self.state)

    @property
    def n_train(self) -> int:
        return int(self.data.y_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.data.y_test.shape[0])


def make_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay (the paper's local optimiser)."""
    return torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                           weight_decay=train.weight_decay)


def reset_optimizers(client: Client) -> None:
    """Forget every optimizer's state (SGD momentum buffers): the next step starts fresh."""
    for opt in client.optimizers.values():
        opt.state.clear()


def build_client_model(build: Callable[[], nn.Module], seed: int, key: object) -> nn.Module:
    """Build a model whose initial weights depend only on (seed, key), e.g. the client id."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init", key))
        return build()


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
    g = generator(seed, "shuffle", client.cid, round_idx, phase.name)
    use_proxy = proxy_x is not None and proxy_idx is not None and algo.uses_proxy_batch(client.view, phase)
    torch.manual_seed(derive_seed(seed, "dropout", client.cid, round_idx, phase.name))  # dropout stream
    model.train()
    n, bs = client.n_train, train.batch_size
    total, steps = torch.zeros((), dtype=torch.float64, device=device), 0
    epochs = train.local_epochs if phase.epochs is None else phase.epochs
    scaler = torch.amp.GradScaler(device.type) if train.amp == "fp16" else None
    with only_trainable(model, phase.trainable):
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g).to(device)
            for start in range(0, n, bs):
                idx = perm[start:start + bs]
                xb, yb = data.x_train[idx], data.y_train[idx]
                proxy = draw_proxy(g, proxy_x, proxy_idx, train.proxy_batch_size) if use_proxy else None
                batch = forward_batch(model, phase, xb, yb, proxy, train.amp)
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


def local_update(client: Client, algo: Algorithm, train: TrainConfig, round_idx: int, seed: int,
                 proxy_x: Tensor | None = None, proxy_idx: Tensor | None = None,
                 phases: list[Phase] | None = None) -> float:
    """Run the algorithm's local phases for one client; returns the mean loss over all steps."""
    if phases is None:
        algo.on_local_start(client.view, round_idx)
        phases = algo.local_phases(client.view, round_idx)
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


def model_hash(model: nn.Module) -> str:
    """sha256 over the model's state_dict (names, shapes, dtypes, bytes), short hex."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
