"""A download-free word tokenizer: lowercase, regex word split, frequency vocabulary.

Ids: 0 = padding, 1 = unknown word, 2.. = words by decreasing corpus frequency, ties broken
alphabetically, so the same corpus always gives the same vocabulary.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

PAD_ID = 0
UNK_ID = 1
SPECIALS = ("<pad>", "<unk>")

# Words are runs of letters/digits, optionally with inner apostrophes ("don't", "reuters'").
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def tokenize(text: str) -> list[str]:
    """Lowercase ``text``, undo HTML entities and backslash line escapes, split into words."""
    text = html.unescape(text).replace("\\", " ").lower()
    return _WORD.findall(text)


def build_vocab(docs: Iterable[Sequence[str]], vocab_size: int) -> list[str]:
    """The ``vocab_size`` most useful tokens: the two specials, then words by frequency.

    Returns the id -> token list (``len <= vocab_size``; shorter if the corpus has fewer words).
    """
    if vocab_size < len(SPECIALS) + 1:
        raise ValueError(f"vocab_size must be >= {len(SPECIALS) + 1}, got {vocab_size}")
    counts = Counter(word for doc in docs for word in doc)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return list(SPECIALS) + [w for w, _ in ranked[: vocab_size - len(SPECIALS)]]


def encode(docs: Sequence[Sequence[str]], vocab: Sequence[str], max_len: int) -> np.ndarray:
    """Token ids int64 ``[len(docs), max_len]``: truncated at ``max_len``, right-padded with 0."""
    index = {w: i for i, w in enumerate(vocab)}
    out = np.full((len(docs), max_len), PAD_ID, dtype=np.int64)
    for row, doc in enumerate(docs):
        ids = [index.get(w, UNK_ID) for w in doc[:max_len]]
        out[row, : len(ids)] = ids
    return out
