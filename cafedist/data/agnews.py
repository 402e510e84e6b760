"""AG News from the standard ``train.csv`` / ``test.csv`` (the "ag_news_csv" release).

Each file is a quoted CSV without header: class index 1..4 (World, Sports, Business,
Sci/Tech), title, description. The common Kaggle copy's header row (``Class Index,Title,
Description``) is skipped. A document is ``title + " " + description``, tokenized by
:mod:`cafedist.data.text` with a vocabulary built on the pooled corpus.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from cafedist.data.base import RawDataset, SourceFiles, resolve_root
from cafedist.data.text import build_vocab, encode, tokenize
from cafedist.errors import ConfigError, DataError

NAME = "agnews"
FOLDER = "ag_news_csv"
CLASS_NAMES = ["World", "Sports", "Business", "Sci/Tech"]
_CLASS_INDICES = {str(i + 1): i for i in range(len(CLASS_NAMES))}  # "1".."4" exactly: "²".isdigit() is True
#: the first row of each file in the widespread Kaggle copy of the release, which is otherwise the same
KAGGLE_HEADER = ["Class Index", "Title", "Description"]
LAYOUT = ("the AG News CSV release: train.csv and test.csv, no header (or the Kaggle copy's), quoted columns "
          "class index 1..4, title, description")


def _read_csv(path: Path) -> tuple[list[list[str]], list[int]]:
    """(tokenized documents, labels 0..3) of one AG News CSV file."""
    docs: list[list[str]] = []
    labels: list[int] = []
    try:
        # utf-8-sig: a leading byte-order mark (Excel writes one) would otherwise start the first class index
        with open(path, newline="", encoding="utf-8-sig") as fh:
            for lineno, row in enumerate(csv.reader(fh), 1):
                if not row or (lineno == 1 and [c.strip() for c in row] == KAGGLE_HEADER):
                    continue
                label = row[0].strip()
                if len(row) != 3 or label not in _CLASS_INDICES:
                    raise DataError(f"{NAME}: {path} record {lineno} is malformed: {row[:1]} with "
                                    f"{len(row)} columns (expected {LAYOUT})")
                labels.append(_CLASS_INDICES[label])
                docs.append(tokenize(row[1] + " " + row[2]))
    except FileNotFoundError:
        raise DataError(f"{NAME}: {path} is missing (expected {LAYOUT})") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{NAME}: {path} is not a readable UTF-8 CSV ({exc}; expected {LAYOUT})") from None
    if not docs:
        raise DataError(f"{NAME}: {path} has no records (expected {LAYOUT})")
    return docs, labels


def load_agnews(root: str | None = None, vocab_size: int = 20000, max_len: int = 64) -> RawDataset:
    """AG News train + test pooled -> int64 token ids [N, max_len], 4 classes.

    ``vocab_size`` counts pad=0 and unk=1; ``root`` is the folder with the CSVs or its parent.
    """
    if vocab_size < 3 or max_len < 1:
        raise ConfigError(f"{NAME}: vocab_size must be >= 3 and max_len >= 1, got {vocab_size} and {max_len}")
    source = source_files(root)
    docs, labels = [], []
    for path in source.files:
        d, y = _read_csv(path)
        docs += d
        labels += y
    _check_fits(len(docs), max(map(len, docs), default=0), max_len)
    vocab = build_vocab(docs, vocab_size)
    x = encode(docs, vocab, max_len)
    return RawDataset(name=NAME, x=x, y=np.asarray(labels, dtype=np.int64), num_classes=len(CLASS_NAMES),
                      kind="text", vocab_size=len(vocab), vocab=vocab, class_names=list(CLASS_NAMES), source=source)


def source_files(root: str | None) -> SourceFiles:
    """The AG News folder under ``root`` and the two CSV files read from it (train, then test)."""
    folder = resolve_root(root, FOLDER, NAME, "train.csv", LAYOUT)
    return SourceFiles(folder, (folder / "train.csv", folder / "test.csv"))


def _check_fits(n_docs: int, longest: int, max_len: int) -> None:
    """Refuse a ``max_len`` whose ``[n_docs, max_len]`` int64 table exceeds this machine's memory:
    numpy would raise a traceback, or fill the pages until the kernel kills the process."""
    need = n_docs * max_len * np.dtype(np.int64).itemsize
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # no sysconf: numpy's own error, then
        return
    if need > memory:
        raise ConfigError(f"{NAME}: max_len={max_len} needs {need / 2**30:.3g} GiB for {n_docs} documents "
                          f"(this machine has {memory / 2**30:.3g} GiB); the longest document has "
                          f"{longest} words")
