"""``resnet18``: CIFAR-style ResNet-18 with an exit after each of its 4 stages (m = 4).

Stem Conv3x3(stride 1) -> norm -> ReLU (no max-pool, as is usual for 32x32 inputs), then 4
stages of 2 BasicBlocks with ``width * (1, 2, 4, 8)`` channels (default 64-128-256-512),
stages 2-4 starting with stride 2: 32x32 -> 32, 16, 8, 4; 64x64 -> 64, 32, 16, 8.
Block 0 is stem + stage 1; blocks 1-3 are stages 2-4.

``norm="group"`` (default) uses GroupNorm (gcd(channels, 32) groups, halved while a group
would hold a single channel or fewer than 16 values on small maps; see
:func:`~cafedist.models.layers.group_norm`): no running
statistics, so it is the usual choice under non-IID data and works with ``torch.func.vmap``;
``norm="batch"`` uses BatchNorm2d. Heads: exits 0..2 use [Conv3x3 stride 2 -> norm -> ReLU]
-> GAP -> Linear (``head_conv=True``); the last exit is the standard GAP -> Linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from .base import EarlyExitNet
from .layers import NormFactory, batch_norm, conv_head, group_norm
from .options import check_input_shape, require

STAGE_MULTIPLIERS = (1, 2, 4, 8)
BLOCKS_PER_STAGE = 2
_NORMS: dict[str, NormFactory] = {"group": group_norm, "batch": batch_norm}


@dataclass(frozen=True)
class ResNetOptions:
    """Options of the ``resnet18`` family."""

    width: int = 64  # channels of stage 1; stage s has width * 2**s
    norm: Literal["group", "batch"] = "group"
    head_conv: bool = True  # a stride-2 conv in each shallow exit head

    def __post_init__(self) -> None:
        require(self.width >= 1, "width", "an integer >= 1", self.width)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (1x1 projection when the shape changes);
    ``spatial`` is the smaller side of its output map."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: NormFactory, spatial: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm(out_ch, spatial)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = norm(out_ch, spatial)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), norm(out_ch, spatial))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _stage(in_ch: int, out_ch: int, stride: int, norm: NormFactory, spatial: int) -> list[nn.Module]:
    return [BasicBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, norm, spatial)
            for i in range(BLOCKS_PER_STAGE)]


def _init_convs(module: nn.Module) -> None:
    # torchvision's ResNet initialisation (He normal, fan_out) for every conv.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def build_resnet18(input_shape: tuple[int, ...], num_classes: int,
                   opts: ResNetOptions) -> EarlyExitNet:
    """ResNet-18 early-exit network for images ``(channels, height, width)``."""
    check_input_shape("resnet18", input_shape, 3, "(channels, height, width)")
    norm = _NORMS[opts.norm]
    in_ch, height, width = input_shape
    spatial = min(height, width)
    stem = nn.Sequential(nn.Conv2d(in_ch, opts.width, 3, padding=1, bias=False),
                         norm(opts.width, spatial), nn.ReLU())
    blocks, heads = [], []
    prev = opts.width
    for s, mult in enumerate(STAGE_MULTIPLIERS):
        out_ch = opts.width * mult
        stride = 1 if s == 0 else 2
        spatial = (spatial + stride - 1) // stride  # conv3x3, padding 1: ceil(size / stride)
        layers = ([stem] if s == 0 else []) + _stage(prev, out_ch, stride, norm, spatial)
        blocks.append(nn.Sequential(*layers))
        last = s == len(STAGE_MULTIPLIERS) - 1
        heads.append(conv_head(out_ch, num_classes, spatial, conv=opts.head_conv and not last,
                               norm=norm))
        prev = out_ch
    net = EarlyExitNet(blocks, heads, arch="resnet18", input_shape=input_shape,
                       num_classes=num_classes)
    _init_convs(net)
    return net
