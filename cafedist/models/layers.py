"""Small building blocks shared by the convolutional families (cnn, resnet18)."""

from __future__ import annotations

import math
from typing import Callable

from torch import nn

#: a normalisation layer for ``(channels, spatial)``: the channel count and the smaller side of
#: the feature map it normalises
NormFactory = Callable[[int, int], nn.Module]

#: the fewest values (channels x positions) a GroupNorm group normalises over: a group of two
#: channels on a 1x1 map (a ResNet's deep stages on 8x8 inputs) maps every sample to (+1, -1)
#: or (-1, +1), keeping only which channel is larger, and an exit reading such features lost
#: 35 points on digits
MIN_GROUP_VALUES = 16


def group_norm(channels: int, spatial: int) -> nn.GroupNorm:
    """GroupNorm with the usual 32 groups, fewer when ``channels`` is not a multiple of 32 or
    a group would normalise too few values.

    gcd keeps every group the same size for any width; groups hold at least 2 channels (a group
    of one channel normalises a single value once the feature map is 1x1, which is undefined:
    PyTorch raises in training) and at least :data:`MIN_GROUP_VALUES` values on a ``spatial``
    x ``spatial`` map. Maps of 4x4 or larger, as every stage of a ResNet on 32x32 inputs, keep
    32 groups wherever the channels allow.
    """
    groups = math.gcd(channels, 32)
    while groups > 1 and (channels // groups < 2 or channels // groups * spatial * spatial < MIN_GROUP_VALUES):
        groups //= 2  # groups is a power of two dividing channels, so half of it does too
    return nn.GroupNorm(groups, channels)


def batch_norm(channels: int, spatial: int) -> nn.BatchNorm2d:
    """BatchNorm2d over ``channels`` (its statistics pool the batch, whatever the map's size)."""
    return nn.BatchNorm2d(channels)


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
            layers.append(norm(channels, (spatial + stride - 1) // stride))
        layers.append(nn.ReLU())
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)
