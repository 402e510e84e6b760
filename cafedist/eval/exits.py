"""Static per-exit evaluation: what every exit predicts, how often it is right, per client.

The functions here turn a model's outputs into small integer counts ([m] correct per exit,
[m, N] predictions) so that results from many clients and ranks can be summed with one
all-reduce before anything is divided; accuracies are only formed at the very end.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """The device of the model's first parameter (or buffer), else ``fallback``."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return fallback


def _check_exit_outputs(outputs: object, batch: int) -> list[Tensor]:
    """Validate an EarlyExitNet forward result: a non-empty list of [B, C] tensors."""
    if not isinstance(outputs, (list, tuple)) or not outputs:
        raise TypeError(f"model(x) must return a non-empty list of per-exit logits, got {type(outputs).__name__}")
    for k, logits in enumerate(outputs):
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != batch:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"exit {k}: expected logits of shape [{batch}, C], got {shape}")
    return list(outputs)


@torch.no_grad()
def _exit_logit_chunks(model: nn.Module, x: Tensor, batch_size: int) -> Iterator[Tensor]:
    """Yield the model's stacked per-exit logits [m, B, C] (float32) for ``x`` in chunks of
    ``batch_size`` items, each moved to the model's device, in eval mode; the model's
    previous train/eval mode is restored afterwards, also on error."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model, x.device)
    was_training = model.training
    model.eval()
    try:
        # An empty input still runs once so the number of exits m is known.
        starts = range(0, x.shape[0], batch_size) if x.shape[0] else [0]
        for start in starts:
            chunk = x[start:start + batch_size].to(device)
            outputs = _check_exit_outputs(model(chunk), chunk.shape[0])
            # float32 even for half-precision logits, so confidences are comparable.
            yield torch.stack([logits.float() for logits in outputs])
    finally:
        model.train(was_training)


def exit_predictions(model: nn.Module, x: Tensor, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """Run ``model`` on ``x`` in eval mode and return every exit's prediction and confidence.

    Returns ``(pred, conf)``, both of shape [m, N]: ``pred`` (int64) is the argmax class of
    each exit and ``conf`` (float32) its max softmax probability. ``x`` is processed in
    chunks of ``batch_size`` items, each moved to the model's device; the results live on
    that device. The model's previous train/eval mode is restored afterwards, also on error.
    """
    preds: list[Tensor] = []
    confs: list[Tensor] = []
    for logits in _exit_logit_chunks(model, x, batch_size):
        conf, pred = logits.softmax(dim=-1).max(dim=-1)
        preds.append(pred)
        confs.append(conf)
    return torch.cat(preds, dim=1).long(), torch.cat(confs, dim=1).float()


def exit_logits(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Every exit's logits for ``x``: [m, N, C] float32 on the model's device (same chunking
    and mode handling as :func:`exit_predictions`). Exit policies other than max-softmax and
    temperature scaling need the whole logit vector, not just the top class."""
    return torch.cat(list(_exit_logit_chunks(model, x, batch_size)), dim=1)


def per_exit_correct(pred: Tensor, y: Tensor) -> Tensor:
    """Number of correct predictions of each exit: ``pred`` [m, N], ``y`` [N] -> [m] int64."""
    if pred.dim() != 2 or y.dim() != 1 or pred.shape[1] != y.shape[0]:
        raise ValueError(f"expected pred [m, N] and y [N], got {tuple(pred.shape)} and {tuple(y.shape)}")
    return (pred == y.to(pred.device).unsqueeze(0)).sum(dim=1, dtype=torch.int64)


