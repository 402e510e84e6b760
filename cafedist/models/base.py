"""The early-exit network: a chain of blocks with one classifier head after each block.

Every family (cnn, resnet18, transformer) is an :class:`EarlyExitNet` built from its own
blocks and heads; nothing else in cafedist needs to know which family it holds. All body
parameters live under ``blocks.`` and all exit parameters under ``heads.``, so algorithms
that share the body but keep heads personal (FedPer, FedRep, ...) split a state_dict by
key prefix alone (:meth:`EarlyExitNet.is_head_key`).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn


class EarlyExitNet(nn.Module):
    """m blocks and m exit heads; exit k reads the output of block k.

    A block maps the previous block's output (the network input for block 0) to its own
    output, which may be any value the next block and its head understand (a feature map,
    or ``(hidden, keep_mask)`` for the transformer). A head maps a block output to logits
    ``[B, num_classes]``.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        *,
        arch: str = "custom",
        input_shape: tuple[int, ...] = (),
        num_classes: int = 0,
        input_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not blocks or len(blocks) != len(heads):
            raise ValueError(f"need as many heads as blocks (>= 1), got {len(blocks)} blocks "
                             f"and {len(heads)} heads")
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self.num_exits: int = len(self.blocks)
        # Descriptive attributes (not parameters): what the model was built for.
        self.arch = arch
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.input_dtype = input_dtype

    def _check_upto(self, upto: int | None) -> int:
        if upto is None:
            return self.num_exits
        if isinstance(upto, bool) or not isinstance(upto, int) or not 1 <= upto <= self.num_exits:
            raise ValueError(f"upto must be an int in 1..{self.num_exits}, got {upto!r}")
        return upto

    def iter_exits(self, x: Any, upto: int | None = None) -> Iterator[Tensor]:
        """Yield the logits of exits 0, 1, ... lazily (block k runs only when exit k is asked).

        Dynamic inference can stop consuming the iterator as soon as it is confident, so
        the deeper blocks are never run.
        """
        h = x
        for k in range(self._check_upto(upto)):
            h = self.blocks[k](h)
            yield self.heads[k](h)

    def forward(self, x: Any, upto: int | None = None) -> list[Tensor]:
        """Logits ``[B, C]`` of exits ``0..upto-1`` (all m when ``upto`` is None).

        Only blocks ``0..upto-1`` are run.
        """
        return list(self.iter_exits(x, upto))

    def exit_stages(self) -> list[nn.Module]:
        """One module per exit k mapping block k-1's output (the input for k = 0) to
        ``(block k's output, exit k's logits)``: the network cut where a sample may leave
        (``cafedist export`` exports each on its own). They share this network's parameters."""
        return [ExitStage(block, head) for block, head in zip(self.blocks, self.heads)]

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_exits={self.num_exits}, input_shape={self.input_shape}"


class ExitStage(nn.Module):
    """Block k followed by exit head k: ``state -> (block_k(state), head_k(block_k(state)))``."""

    def __init__(self, block: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.head = head

    def forward(self, state: Any) -> tuple[Any, Tensor]:
        h = self.block(state)
        return h, self.head(h)
