"""Early-exit networks (one logit tensor per exit) and the cost of reaching each exit.

Families: ``cnn`` (Conv3, m = 3), ``resnet18`` (m = 4), ``transformer`` (m = layers, 4 by
default). Build one with :func:`build_model`; cost per exit with :func:`macs_per_exit`.
"""

from .base import EarlyExitNet
from .macs import macs_breakdown, macs_per_exit
from .registry import ARCHS, arch_options, build_model

__all__ = ["ARCHS", "EarlyExitNet", "arch_options", "build_model", "macs_breakdown",
           "macs_per_exit"]
