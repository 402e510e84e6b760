"""In-process harness for algorithm tests: a tiny real federated problem and a Trainer.

``make_trainer(tmp_path, "fedper", {"...": ...})`` builds a world-size-1 Trainer on the real
scikit-learn digits (4 clients, a 4-channel CNN with 3 exits). Call ``trainer.run_round(r)``
and inspect ``trainer.clients[i].models["main"]``, ``.state``, ``trainer.algo`` directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cafedist.config import config_from_dict, config_hash
from cafedist.distributed.runtime import Runtime
from cafedist.run.build import build_run
from cafedist.run.checkpoint import CheckpointDir, load_checkpoint, save_checkpoint
from cafedist.train.round import Trainer


def make_trainer(tmp_path: Path, algorithm: str, params: dict[str, Any] | None = None, *, clients: int = 4,
                 rounds: int = 4, arch: str = "cnn", options: dict | None = None, **train: Any) -> Trainer:
    """A single-process Trainer for ``algorithm`` on a tiny digits problem."""
    raw = {
        "seed": 0,
        "data": {"dataset": "digits", "clients": clients, "alpha": 0.5, "proxy_fraction": 0.1, "min_size": 20,
                 "cache_dir": str(tmp_path / "stores")},
        "model": {"arch": arch, "options": options or {"width": 4}},
        "train": {"rounds": rounds, "local_epochs": 1, "batch_size": 32, "proxy_batch_size": 16, **train},
        "algorithm": {"name": algorithm, algorithm: params or {}},
    }
    cfg = config_from_dict(raw)
    rt = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None, launcher="single")
    tr = Trainer(build_run(cfg, rt))
    tr.run_dir = tmp_path / "run"  # where save/load below keep its checkpoints
    return tr


def params_of(module: torch.nn.Module, select=lambda k: True) -> dict[str, torch.Tensor]:
    """Detached copies of the selected parameters."""
    return {k: p.detach().clone() for k, p in module.named_parameters() if select(k)}


def save(tr: Trainer, rnd: int, keep: int = 2) -> None:
    """Checkpoint a harness trainer's clients after round ``rnd`` (into its run directory)."""
    save_checkpoint(CheckpointDir(tr.run_dir), tr.comm, tr.pool, tr.algo, tr.shared, rnd,
                    config_hash=config_hash(tr.cfg), keep=keep)


def load(tr: Trainer) -> int:
    """Resume a harness trainer from its run directory; the next round to run."""
    return load_checkpoint(CheckpointDir(tr.run_dir), tr.comm, tr.pool, tr.algo, tr.shared,
                           config_hash=config_hash(tr.cfg)).next_round


def record_loss_scales(monkeypatch) -> list[float]:
    """The fp16 loss scale every step starts with, in order, from now until the test ends."""
    seen: list[float] = []
    scale = torch.amp.GradScaler.scale

    def recording(self: torch.amp.GradScaler, loss: torch.Tensor) -> torch.Tensor:
        seen.append(self.get_scale())
        return scale(self, loss)

    monkeypatch.setattr(torch.amp.GradScaler, "scale", recording)
    return seen
