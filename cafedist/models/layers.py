"""Small building blocks shared by the convolutional families (cnn, resnet18)."""

from __future__ import annotations

import math
from typing import Callable

from torch import nn

NormFactory = Callable[[int], nn.Module]


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the usual 32 groups, fewer when ``channels`` is not a multiple of 32.

    gcd keeps every group the same size for any width; groups hold at least 2 channels, since
    a group of one channel normalises a single value once the feature map is 1x1 (small
    widths on 8x8 inputs), which is undefined (PyTorch raises in training).
    """
    groups = math.gcd(channels, 32)
    if groups > 1 and channels // groups < 2:
        groups //= 2  # groups is a power of two dividing channels, so half of it does too
    return nn.GroupNorm(groups, channels)


def conv_head(channels: int, num_classes: int, spatial: int, *, conv: bool,
              norm: NormFactory | None = None) -> nn.Sequential:
    """Exit head: [Conv3x3 (stride 2 if spatial >= 2) -> norm -> ReLU] -> GAP -> Linear.

    The optional conv gives a shallow exit some capacity of its own, since a global average
    pool straight after one block keeps little spatial information; stride 2 keeps its cost
    at a quarter of a same-resolution conv. ``spatial`` is the smaller side of the feature
    map the head reads.
    """
    layers: list[nn.Module] = []
    if conv:
        stride = 2 if spatial >= 2 else 1
        layers.append(nn.Conv2d(channels, channels, 3, stride=stride, padding=1,
                                bias=norm is None))
        if norm is not None:
            layers.append(norm(channels))
        layers.append(nn.ReLU())
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)
