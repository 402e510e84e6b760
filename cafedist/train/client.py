"""A client is the unit of state: model, optimizer, algorithm state and data live together.

Nothing here depends on the rank a client runs on: model initialisation, shuffling and proxy
batches are drawn from streams keyed by ``(seed, client id, round)`` (see :mod:`cafedist.rng`),
so a client trains identically whichever rank hosts it and after a resume.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cafedist.algorithms.base import Algorithm, LocalBatch
from cafedist.config import TrainConfig
from cafedist.data.store import ClientData
from cafedist.rng import derive_seed, generator


@dataclass
class Client:
    """One federated client hosted on this rank."""

    cid: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: ClientData
    state: dict[str, Tensor] = field(default_factory=dict)  # algorithm state (checkpointed)

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


def build_client_model(build, seed: int, cid: int) -> nn.Module:
    """Build a model whose initial weights depend only on (seed, client id)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init", cid))
        return build()


def local_update(client: Client, algo: Algorithm, train: TrainConfig, round_idx: int, seed: int,
                 proxy_x: Tensor | None = None, proxy_idx: Tensor | None = None) -> float:
    """Run the local epochs of one client; returns the mean training loss over its steps.

    When the algorithm asks for proxy batches, every step also draws ``proxy_batch_size``
    rows of the client's current targets (positions into ``proxy_idx``, the proxy subset the
    targets were computed on); private and proxy inputs share one forward pass.
    """
    model, opt, data = client.model, client.optimizer, client.data
    device = data.x_train.device
    g = generator(seed, "shuffle", client.cid, round_idx, device="cpu")
    use_proxy = proxy_x is not None and proxy_idx is not None and algo.uses_proxy_batch(client.state)
    # keyed global RNG too, for dropout inside the model
    torch.manual_seed(derive_seed(seed, "dropout", client.cid, round_idx))
    model.train()
    n, bs = client.n_train, train.batch_size
    total, steps = torch.zeros((), dtype=torch.float64, device=device), 0
    for _ in range(train.local_epochs):
        perm = torch.randperm(n, generator=g).to(device)
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            xb, yb = data.x_train[idx], data.y_train[idx]
            if use_proxy:
                pos = torch.randint(0, proxy_idx.shape[0], (train.proxy_batch_size,), generator=g).to(device)
                xp = proxy_x[proxy_idx[pos]]
                outs = model(torch.cat([xb, xp], dim=0))
                b = xb.shape[0]
                batch = LocalBatch(logits=[o[:b] for o in outs], y=yb,
                                   proxy_logits=[o[b:] for o in outs], proxy_pos=pos)
            else:
                batch = LocalBatch(logits=model(xb), y=yb)
            loss = algo.local_loss(client.state, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().to(torch.float64)
            steps += 1
    return float(total) / max(steps, 1)


@torch.no_grad()
def proxy_logits(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Logits of every exit on proxy inputs: [m, P, C] (float32)."""
    was_training = model.training
    model.eval()
    chunks = [torch.stack(model(x[i:i + batch_size])) for i in range(0, x.shape[0], batch_size)]
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
