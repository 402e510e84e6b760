"""A client is the unit of state: models, optimizers, algorithm state and data live together.

Nothing here depends on the rank a client runs on: model initialisation is drawn from a
stream keyed by ``(seed, client id)`` (see :mod:`cafedist.rng`), so a client is the same
whichever rank hosts it and after a resume.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from cafedist.algorithms.base import ClientView
from cafedist.config import TrainConfig
from cafedist.data.store import ClientData
from cafedist.rng import derive_seed

log = logging.getLogger("cafedist")


@dataclass
class Client:
    """One federated client hosted on this rank."""

    cid: int
    models: dict[str, nn.Module]  # "main" (evaluated) and any extra models of the algorithm
    optimizers: dict[str, torch.optim.Optimizer]
    data: ClientData
    state: dict[str, Tensor] = field(default_factory=dict)  # algorithm state (checkpointed)
    # the last round whose shared-parameter average this client holds (-1: none yet); the
    # average reaches idle clients lazily (cafedist.run.sharing)
    shared_round: int = -1
    # fp16 loss scalers per model, made at the first fp16 step (train.amp: fp16); their scale
    # is state like momentum: it is parked and checkpointed with the client
    scalers: dict[str, torch.amp.GradScaler] = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        """The client's personalized early-exit network (``models["main"]``)."""
        return self.models["main"]

    @property
    def view(self) -> ClientView:
        """What algorithm hooks get to see (models and state, not data)."""
        return ClientView(cid=self.cid, models=self.models, state=self.state)

    def scaler(self, model: str) -> torch.amp.GradScaler:
        """The fp16 loss scaler of ``models[model]``, made at its first use: one scale per
        model that carries over phases, rounds, parking and resumes, so a phase does not
        start again at 65536 and skip steps while it finds the scale."""
        if model not in self.scalers:
            self.scalers[model] = torch.amp.GradScaler(self.data.x_train.device.type)
        return self.scalers[model]

    @property
    def n_train(self) -> int:
        """Training samples of this client."""
        return int(self.data.y_train.shape[0])

    @property
    def n_test(self) -> int:
        """Test samples of this client."""
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


@functools.cache
def compile_problem(device: str) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here (None: it can), probed once per
    device with a tiny function and warned about once. Compilation happens at a compiled
    module's first call, inside training, so ``model.compile()`` succeeding says nothing (e.g.
    without a C++ compiler for the CPU backend the first forward raised)."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2, device=device))
        return None
    except Exception as exc:  # noqa: BLE001 - any failure: eager mode still works
        lines = str(exc).strip().splitlines()
        problem = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        log.warning("train.compile: torch.compile cannot run on %s here (%s); training eagerly", device, problem)
        return problem


def compile_in_place(model: nn.Module) -> None:
    """``train.compile``: compile a model's forward in place (keeps state_dict keys), unless
    :func:`compile_problem` says it cannot run on the model's device."""
    device = next(model.parameters()).device
    if compile_problem(str(device)) is None:
        model.compile()


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
