"""Architecture registry: ``build_model(arch, input_shape, num_classes, **options)``."""

from __future__ import annotations

import operator
from typing import Any, Callable, NamedTuple

from ..errors import ConfigError
from .base import EarlyExitNet
from .cnn import CnnOptions, build_cnn
from .options import ARCH_FIELD, option_defaults, parse_options
from .resnet import ResNetOptions, build_resnet18
from .transformer import TransformerOptions, build_transformer


class Family(NamedTuple):
    options: type  # frozen dataclass of the family's options
    build: Callable[[tuple[int, ...], int, Any], EarlyExitNet]
    inputs: str  # "image": samples (C, H, W); "text": token ids (L,)


_FAMILIES: dict[str, Family] = {
    "cnn": Family(CnnOptions, build_cnn, "image"),
    "resnet18": Family(ResNetOptions, build_resnet18, "image"),
    "transformer": Family(TransformerOptions, build_transformer, "text"),
}
_SAMPLE_NDIM = {"image": 3, "text": 1}
ARCHS: tuple[str, ...] = tuple(_FAMILIES)


def _family(arch: str) -> Family:
    if arch not in _FAMILIES:
        raise ConfigError(f"{ARCH_FIELD}: unknown architecture {arch!r}; "
                          f"expected one of: {', '.join(ARCHS)}")
    return _FAMILIES[arch]


def _check_input_kind(arch: str, family: Family, shape: tuple[int, ...]) -> None:
    """Name a dataset/architecture mismatch before any option (e.g. vocab_size) is asked for."""
    if len(shape) == _SAMPLE_NDIM[family.inputs]:
        return
    have = next((kind for kind, ndim in _SAMPLE_NDIM.items() if ndim == len(shape)), None)
    if have is None:
        return  # no kind of data at all: the family's own shape check says what it expected
    fitting = " or ".join(name for name, fam in _FAMILIES.items() if fam.inputs == have)
    raise ConfigError(f"{ARCH_FIELD}={arch!r} takes {family.inputs} datasets, but the dataset holds "
                      f"{have} samples of shape {shape}: use {fitting}")


def arch_options(arch: str) -> dict[str, Any]:
    """The options ``arch`` accepts, with their defaults (None = required)."""
    return option_defaults(_family(arch).options)


def build_model(arch: str, input_shape: tuple[int, ...], num_classes: int,
                **options: Any) -> EarlyExitNet:
    """Build an early-exit network of family ``arch`` for one sample of ``input_shape``.

    ``input_shape`` excludes the batch: ``(C, H, W)`` for images, ``(L,)`` for token ids.
    Unknown architectures or options, and options of the wrong type or range, raise a
    one-line :class:`ConfigError`.
    """
    family = _family(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"{ARCH_FIELD}={arch!r}: number of classes must be an integer >= 2, "
                          f"got {num_classes!r}")
    try:  # operator.index accepts numpy integers but not floats
        shape = tuple(operator.index(s) for s in input_shape)
    except TypeError:
        raise ConfigError(f"{ARCH_FIELD}={arch!r}: input shape must be a tuple of integers, "
                          f"got {input_shape!r}") from None
    _check_input_kind(arch, family, shape)
    opts = parse_options(arch, family.options, options)
    try:
        return family.build(shape, num_classes, opts)
    except (MemoryError, RuntimeError, TypeError) as exc:
        text = str(exc).split("\n")[0]
        # a size beyond what torch can hold, or allocate: the options asked for it
        if not isinstance(exc, MemoryError) and "allocate" not in text and "Overflow" not in text:
            raise
        text = text.split("DefaultCPUAllocator: ")[-1]
        if "Overflow" in text:
            raise ConfigError(f"model.options: {arch} with {dict(options)} is too large to build ({text})") from None
        # every client's model is built here: memory may have run out at the Nth, not the first
        raise ConfigError(f"model.options: {arch} with {dict(options)} could not be allocated ({text}); if one such "
                          f"model fits, the clients held in memory at once do not (train.resident_clients "
                          f"bounds them)") from None
