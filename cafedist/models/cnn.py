"""``cnn``: the paper's Conv3 family, three conv blocks with an exit after each (m = 3).

Block k (k = 0, 1, 2): Conv3x3(padding 1) -> ReLU -> MaxPool2, with ``width * 2**k``
channels (default width 32: 32, 64, 128). Padding keeps the spatial size through the conv,
so only pooling shrinks it: 32x32 -> 16 -> 8 -> 4, 28x28 -> 14 -> 7 -> 3, 8x8 -> 4 -> 2 -> 1.
A pooling is skipped (built as no layer at all) when the feature map is already smaller
than 2 on a side, so even tiny inputs work.

Heads: exits 0..m-2 use [Conv3x3 stride 2 -> ReLU] -> global average pool -> Linear
(``head_conv=True``, default); the last exit is always GAP -> Linear, so exit m is exactly
the plain Conv3 classifier. No BatchNorm anywhere: client models are later stacked with
``torch.func.vmap``, which running statistics would break.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import EarlyExitNet
from .layers import conv_head
from .options import check_input_shape, require

NUM_BLOCKS = 3


@dataclass(frozen=True)
class CnnOptions:
    """Options of the ``cnn`` family."""

    width: int = 32  # channels of the first block; block k has width * 2**k
    head_conv: bool = True  # a stride-2 conv in each shallow exit head

    def __post_init__(self) -> None:
        require(self.width >= 1, "width", "an integer >= 1", self.width)


def conv_block(in_ch: int, out_ch: int, pool: bool) -> nn.Sequential:
    """Conv3x3 -> ReLU -> [MaxPool2]."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def build_cnn(input_shape: tuple[int, ...], num_classes: int, opts: CnnOptions) -> EarlyExitNet:
    """Conv3 early-exit network for images ``(channels, height, width)``."""
    check_input_shape("cnn", input_shape, 3, "(channels, height, width)")
    in_ch, height, width = input_shape
    spatial = min(height, width)
    blocks, heads = [], []
    for k in range(NUM_BLOCKS):
        out_ch = opts.width * 2**k
        pool = spatial >= 2
        blocks.append(conv_block(in_ch, out_ch, pool))
        spatial = spatial // 2 if pool else spatial
        last = k == NUM_BLOCKS - 1
        heads.append(conv_head(out_ch, num_classes, spatial, conv=opts.head_conv and not last))
        in_ch = out_ch
    return EarlyExitNet(blocks, heads, arch="cnn", input_shape=input_shape,
                        num_classes=num_classes)
