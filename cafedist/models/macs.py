"""Multiply-accumulates (MACs) of answering at each exit, for one sample.

Counted with forward hooks during one batch-1 forward pass in eval mode:
- ``Conv1d/2d/3d``: output elements x (in_channels / groups x kernel size) (bias not counted);
- ``Linear``: output elements x in_features (bias not counted);
- :class:`~cafedist.models.transformer.AttentionCore`: the two matmuls q k^T and (attn) v.
Not counted: normalisation, activations, pooling, softmax, residual additions, embedding
lookups. This is the same convention as ``torch.utils.flop_counter.FlopCounterMode`` (which
reports flops = 2 x MACs for conv/linear/matmul), and these ops cost a few percent at most.

The cost of answering at exit k is cumulative: all blocks up to k plus every head up to k,
because dynamic inference evaluates the earlier heads first and only goes deeper when they
are not confident.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import EarlyExitNet
from .transformer import AttentionCore

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _module_macs(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> int:
    """MACs of one call of a countable leaf module (0 for anything else)."""
    if isinstance(module, _CONVS):
        return output.numel() * module.weight[0].numel()
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, AttentionCore):
        q, k = inputs[0], inputs[1]
        # q k^T: every element of q meets L_k keys; (attn) v: every output element sums L_k.
        return (q.numel() + output.numel()) * k.shape[-2]
    return 0


def _example_input(model: EarlyExitNet, input_shape: tuple[int, ...]) -> Tensor:
    param = next(model.parameters())
    dtype = model.input_dtype if not model.input_dtype.is_floating_point else param.dtype
    # ones, not zeros: token id 1 is a real (non-padding) token for the transformer.
    return torch.ones((1, *input_shape), dtype=dtype, device=param.device)


def macs_breakdown(model: EarlyExitNet,
                   input_shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """MACs of each block and of each head alone, for one sample of ``input_shape``."""
    counts = {"block": [0] * model.num_exits, "head": [0] * model.num_exits}
    handles = []

    def hook_for(kind: str, k: int):
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            counts[kind][k] += _module_macs(module, inputs, output)
        return hook

    for kind, parts in (("block", model.blocks), ("head", model.heads)):
        for k, part in enumerate(parts):
            for sub in part.modules():
                handles.append(sub.register_forward_hook(hook_for(kind, k)))
    # Eval mode so BatchNorm does not update its statistics (nor fail on a batch of 1).
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(_example_input(model, tuple(input_shape)))
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    return counts["block"], counts["head"]


def macs_per_exit(model: EarlyExitNet, input_shape: tuple[int, ...]) -> list[int]:
    """MACs for one sample to answer at exit k: blocks 0..k plus heads 0..k (non-decreasing)."""
    blocks, heads = macs_breakdown(model, input_shape)
    total, out = 0, []
    for block, head in zip(blocks, heads):
        total += block + head
        out.append(total)
    return out
