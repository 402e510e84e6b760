"""Run one client's exported early-exit model under its exit policy, with torch alone.

``cafedist export`` writes, per client, one ``torch.export`` program per exit ("stage" k:
block k and exit head k, mapping block k-1's output to ``(block k's output, exit k's
logits)``) and a ``policy.json``, and copies this file beside them. This file imports nothing
but torch and the standard library, so a deployment needs neither cafedist nor its
dependencies::

    from early_exit import load
    model = load("export/client_0003")
    logits, exits = model(x)          # exits[i]: the 0-based exit that answered sample i

Only the stages a sample needs run on it: a batch goes through stage 0, the samples whose
exit score reaches the threshold leave, the rest go on to stage 1, and so on; the last exit
answers whatever is left. The rule is ``cafedist eval``'s (docs/METHOD.md): a sample leaves
at the first exit whose score is >= θ, θ >= 1 means no early exit, a NaN score never fires.

cafedist itself computes its exit scores with the functions below
(:mod:`cafedist.eval.policies`), so an exported policy scores exactly as the evaluation that
chose it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

#: the layout of an export folder that this file reads (``format`` in policy.json)
FORMAT = 1


def max_softmax(probs: Tensor) -> Tensor:
    """The largest class probability: ``probs`` [..., C] -> [...]."""
    return probs.max(dim=-1).values


def entropy_score(probs: Tensor) -> Tensor:
    """``1 - H(p) / log C``: 1 for a one-hot distribution, 0 for a uniform one."""
    classes = probs.shape[-1]
    if classes < 2:
        return torch.ones(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
    # xlogy: 0 * log 0 = 0, so a saturated softmax gives entropy 0 and score 1, not NaN.
    entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)
    return (1.0 - entropy / math.log(classes)).clamp(0.0, 1.0)


def margin(probs: Tensor) -> Tensor:
    """The gap between the two largest class probabilities."""
    if probs.shape[-1] < 2:
        return torch.ones(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


#: exit policies by name: a score in [0, 1] from one exit's class probabilities
SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    "max-softmax": max_softmax, "entropy": entropy_score, "margin": margin}


def exit_score(logits: Tensor, policy: str, temperature: float | None = None) -> Tensor:
    """One exit's scores under ``policy``: ``logits`` [N, C] -> [N] float64 in [0, 1].

    Computed in float64 (float32 softmax saturates at logit margins ~17), after dividing
    the logits by ``temperature`` when given."""
    z = logits.double()
    if temperature is not None:
        z = z / torch.tensor(float(temperature), dtype=torch.float64, device=z.device)
    return SCORES[policy](z.softmax(dim=-1))


def _select(state: Any, keep: Tensor) -> Any:
    """The rows ``keep`` of a block output: a tensor, or a tuple/list of them (batch first)."""
    if isinstance(state, Tensor):
        return state[keep]
    if isinstance(state, (tuple, list)):
        return type(state)(_select(part, keep) for part in state)
    raise TypeError(f"a block output must be a tensor or a tuple/list of tensors, got {type(state).__name__}")


def _batch_size(x: Any) -> int:
    if isinstance(x, Tensor):
        return int(x.shape[0])
    if isinstance(x, (tuple, list)) and x:
        return _batch_size(x[0])
    raise TypeError(f"expected a batch tensor (batch first), got {type(x).__name__}")


class EarlyExitModel:
    """One client's exported stages and exit policy (read from an export's client folder).

    Attributes: ``policy`` (a name of :data:`SCORES`, or ``"static"``), ``threshold``,
    ``temperatures`` (one per exit, or None), ``static_exit`` (0-based, or None),
    ``macs_per_exit`` (multiply-accumulates per sample up to each exit) and ``spec`` (all of
    policy.json).
    """

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        spec = json.loads((folder / "policy.json").read_text())
        if spec.get("format") != FORMAT:
            raise ValueError(f"{folder / 'policy.json'}: export format {spec.get('format')!r}, "
                             f"this early_exit.py reads {FORMAT}")
        self.spec: dict[str, Any] = spec
        self.policy: str = spec["policy"]
        self.threshold: float | None = spec["threshold"]
        self.temperatures: list[float] | None = spec["temperatures"]
        self.static_exit: int | None = spec["static_exit"]
        self.macs_per_exit: list[int] = spec["macs_per_exit"]
        if self.policy != "static" and self.policy not in SCORES:
            raise ValueError(f"{folder / 'policy.json'}: unknown policy {self.policy!r}")
        self.stages = [torch.export.load(str(folder / name)).module() for name in spec["stages"]]

    @property
    def num_exits(self) -> int:
        """How many exits (stages) the model has."""
        return len(self.stages)

    def fires(self, k: int, logits: Tensor) -> Tensor:
        """Which samples exit ``k`` answers, given its ``logits`` [N, C]: bool [N]."""
        last = self.num_exits - 1 if self.static_exit is None else self.static_exit
        if k == last:
            return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        if self.static_exit is not None or self.threshold is None or self.threshold >= 1.0:
            return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        temperature = None if self.temperatures is None else self.temperatures[k]
        return exit_score(logits, self.policy, temperature) >= self.threshold

    @torch.no_grad()
    def __call__(self, x: Any) -> tuple[Tensor, Tensor]:
        """``(logits [N, C] of the exit that answered each sample, that exit [N] int64)``."""
        n = _batch_size(x)
        rows = torch.arange(n)
        exits = torch.full((n,), -1, dtype=torch.int64)
        answer: Tensor | None = None
        state = x
        for k, stage in enumerate(self.stages):
            state, logits = stage(state)
            if answer is None:
                answer = logits.new_zeros((n, logits.shape[-1]))
            fired = self.fires(k, logits).cpu()
            if not bool(fired.any()):
                continue  # no sample leaves here: the block output goes on as it is, not copied
            answer[rows[fired].to(answer.device)] = logits[fired.to(logits.device)]
            exits[rows[fired]] = k
            keep = ~fired
            if not bool(keep.any()):
                break
            rows = rows[keep]
            state = _select(state, keep.to(logits.device))
        assert answer is not None
        return answer, exits


def load(folder: str | Path) -> EarlyExitModel:
    """The exported client model in ``folder`` (a ``client_NNNN`` folder of an export)."""
    return EarlyExitModel(folder)


__all__ = ["FORMAT", "SCORES", "EarlyExitModel", "entropy_score", "exit_score", "load", "margin", "max_softmax"]
