"""Dataset name -> loader (and which ones know their users). A loader takes the data root
(``None`` for bundled data) and optional keyword options (e.g. ``vocab_size``/``max_len`` for
text) and returns a RawDataset.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from cafedist.data import agnews, tinyimagenet
from cafedist.data.agnews import load_agnews
from cafedist.data.base import RawDataset, SourceFiles
from cafedist.data.builtin import load_digits, load_mnist5k
from cafedist.data.cifar import CIFAR10, CIFAR100, load_cifar10, load_cifar100
from cafedist.data.leaf import FEMNIST, SHAKESPEARE, load_femnist, load_shakespeare
from cafedist.data.synthetic import load_synthetic
from cafedist.data.tinyimagenet import load_tinyimagenet
from cafedist.errors import ConfigError, DataError

DATASETS: dict[str, Callable[..., RawDataset]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "tinyimagenet": load_tinyimagenet,
    "agnews": load_agnews,
    "femnist": load_femnist,
    "shakespeare": load_shakespeare,
    "synthetic": load_synthetic,  # benchmarks and scale tests only (cafedist.data.synthetic)
}

#: datasets that need no ``data.root``: shipped with an installed package, or generated
BUNDLED = frozenset({"mnist5k", "digits", "synthetic"})

#: data root -> the files the loader would read (``RawDataset.source``), without reading them,
#: for every dataset that is not BUNDLED
SOURCES: dict[str, Callable[[str | None], SourceFiles]] = {
    "cifar10": CIFAR10.source_files,
    "cifar100": CIFAR100.source_files,
    "tinyimagenet": tinyimagenet.source_files,
    "agnews": agnews.source_files,
    "femnist": FEMNIST.source_files,
    "shakespeare": SHAKESPEARE.source_files,
}

#: datasets whose loader records each sample's user (``RawDataset.user_samples``): the ones
#: ``partition: natural`` accepts
NATURAL = frozenset({"femnist", "shakespeare", "synthetic"})


def options_of(name: str) -> dict[str, Any]:
    """The extra keyword options (with defaults) that dataset ``name``'s loader accepts."""
    params = list(inspect.signature(_loader(name)).parameters.values())[1:]
    return {p.name: p.default for p in params}


def check_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` for dataset ``name``'s loader with its defaults filled in.

    ``data.options`` is a free mapping in the config schema, so this is where its values are
    typed: an option the loader does not take, or an integer option given as anything but an
    integer (text, a float, a bool, null), is one ConfigError naming it, before any file is read
    (the loaders size and slice arrays with these values).
    """
    defaults = options_of(name)
    unknown = set(options) - set(defaults)
    if unknown:
        raise ConfigError(f"data.options: dataset {name!r} takes no option(s) {sorted(unknown)} "
                          f"(it accepts: {sorted(defaults) or 'none'})")
    for key, value in options.items():
        if isinstance(defaults[key], int) and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"data.options.{key}: expected an integer for dataset {name}, got {value!r}")
    return {**defaults, **options}


def _loader(name: str) -> Callable[..., RawDataset]:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r} (expected one of: {', '.join(sorted(DATASETS))})") from None


def load_dataset(name: str, root: str | None = None, **options: Any) -> RawDataset:
    """Load dataset ``name`` from ``root`` (train and test splits pooled). Never downloads."""
    loader = _loader(name)
    return loader(None if root is None else str(root), **check_options(name, options))
