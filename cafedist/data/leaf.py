"""LEAF's FEMNIST and Shakespeare from LEAF's own JSON files, every sample tagged with its user.

LEAF (Caldas et al. 2018, https://github.com/TalwalkarLab/leaf) ships no data: its
``preprocess.sh`` downloads and converts the sources into ``data/<dataset>/data/all_data/*.json``.
Each file is ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}}``
(``num_samples[i]`` = the number of samples of ``users[i]``; ``user_data`` has exactly those users).

- ``femnist``: ``x`` is 784 floats in [0, 1] (a 28x28 grayscale image, row-major), ``y`` an int
  0..61 (10 digits, 26 upper-, 26 lowercase letters) -> uint8 ``[N, 1, 28, 28]`` (``round(255 x)``).
- ``shakespeare``: ``x`` is an 80-character string, ``y`` the next character -> token ids
  int64 ``[N, 80]`` and a label 0..79: a character's label is its position in LEAF's
  80-character ``ALL_LETTERS``, its token id that position + 2 (0 = padding, 1 = a character
  outside ``ALL_LETTERS``, so ``vocab_size`` is 82).

The data root (``data.root`` / ``--root``) may be LEAF's ``data/`` folder, the dataset's folder
(``data/femnist``), its ``data/`` subfolder, or the folder holding the JSON files itself; the
first of ``<root>/<dataset>/data/all_data``, ``<root>/data/all_data``, ``<root>/all_data`` and
``<root>`` that holds ``*.json`` files is read (every ``*.json`` file in it, in name order).
LEAF's own sampling and train/test split are not used: ``partition: natural`` chooses the
users and splits each client itself (see :func:`cafedist.data.partition.natural_partition`).

The returned :class:`RawDataset` pools all users' samples in user-name order and carries
``user_samples`` (user -> that user's sample indices), the natural partition.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cafedist.data.base import RawDataset, SourceFiles, channel_stats, int_labels, readable_dir
from cafedist.data.text import PAD_ID, SPECIALS, UNK_ID
from cafedist.errors import DataError

#: LEAF's character vocabulary (``ALL_LETTERS`` of ``leaf/models/utils/language_utils.py``)
ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
SEQ_LEN = 80  # characters per Shakespeare sample
FEMNIST_SIDE = 28
FEMNIST_CLASSES = 62
_FIRST_CHAR_ID = len(SPECIALS)  # token id of ALL_LETTERS[0]
# code point (< 128) -> token id; every ALL_LETTERS character is ASCII
_ASCII_IDS = np.full(128, UNK_ID, dtype=np.int64)
for _i, _c in enumerate(ALL_LETTERS):
    _ASCII_IDS[ord(_c)] = _FIRST_CHAR_ID + _i
_LABEL_OF = {c: i for i, c in enumerate(ALL_LETTERS)}
assert len(ALL_LETTERS) == len(_LABEL_OF) == 80 and PAD_ID == 0


class _Bad(Exception):
    """One user's samples are malformed: the message says what was expected."""


def _femnist_x(xs: list[Any]) -> np.ndarray:
    if not xs:
        return np.zeros((0, 1, FEMNIST_SIDE, FEMNIST_SIDE), dtype=np.uint8)
    try:
        pixels = np.asarray(xs, dtype=np.float64)
    except (ValueError, TypeError):
        pixels = None
    side = FEMNIST_SIDE
    if pixels is None or pixels.ndim != 2 or pixels.shape[1] != side * side:
        lengths = sorted({len(x) if isinstance(x, list) else -1 for x in xs})[:3]
        raise _Bad(f"x must be lists of {side * side} numbers (a {side}x{side} image), got lengths {lengths}")
    if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
        raise _Bad("x values must lie in [0, 1]")
    return np.rint(pixels * 255.0).astype(np.uint8).reshape(-1, 1, side, side)


def _femnist_y(ys: list[Any]) -> np.ndarray:
    try:
        return int_labels(ys, "y", FEMNIST_CLASSES)
    except DataError as exc:
        raise _Bad(str(exc)) from None


def _shakespeare_x(xs: list[Any]) -> np.ndarray:
    bad = [x for x in xs if not isinstance(x, str) or len(x) != SEQ_LEN][:1]
    if bad:
        got = f"a {len(bad[0])}-character string" if isinstance(bad[0], str) else type(bad[0]).__name__
        raise _Bad(f"x must be {SEQ_LEN}-character strings, got {got}")
    # surrogatepass: a lone surrogate ("\\ud800" in the JSON) is one more character outside ALL_LETTERS
    codes = np.frombuffer("".join(xs).encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
    ids = np.where(codes < 128, _ASCII_IDS[np.minimum(codes, 127)], UNK_ID)
    return ids.reshape(len(xs), SEQ_LEN)


def _shakespeare_y(ys: list[Any]) -> np.ndarray:
    try:
        return np.asarray([_LABEL_OF[c] for c in ys], dtype=np.int64)
    except (KeyError, TypeError):
        bad = next(c for c in ys if not isinstance(c, str) or c not in _LABEL_OF)
        raise _Bad(f"y must be one character of LEAF's 80-character ALL_LETTERS, got {bad!r}") from None


@dataclass(frozen=True)
class _LeafFormat:
    name: str
    num_classes: int
    sample: str  # what one sample is, for error messages
    parse_x: Callable[[list[Any]], np.ndarray]
    parse_y: Callable[[list[Any]], np.ndarray]

    @property
    def layout(self) -> str:
        return (f"LEAF JSON files <root>/{self.name}/data/all_data/*.json (or <root>/data/all_data, <root>/all_data, "
                f"<root>) of {{users, num_samples, user_data: {{user: {{x, y}}}}}}, {self.sample}")

    def source_files(self, root: str | None) -> SourceFiles:
        """The JSON folder under ``root`` (:func:`find_json_dir`) and its ``*.json`` files, in name order."""
        folder = find_json_dir(root, self)
        return SourceFiles(folder, tuple(sorted(folder.glob("*.json"))))


FEMNIST = _LeafFormat("femnist", FEMNIST_CLASSES, "x 784 floats in [0, 1], y an int 0..61",
                      _femnist_x, _femnist_y)
SHAKESPEARE = _LeafFormat("shakespeare", len(ALL_LETTERS), "x an 80-character string, y the next character",
                          _shakespeare_x, _shakespeare_y)


def find_json_dir(root: str | None, fmt: _LeafFormat) -> Path:
    """The folder whose ``*.json`` files are read (see the module docstring for the order)."""
    if root is None:
        raise DataError(f"{fmt.name}: no data root given (set data.root / --root; expected {fmt.layout})")
    base = Path(root).expanduser()
    if not base.exists():
        raise DataError(f"{fmt.name}: data root {base} does not exist (expected {fmt.layout})")
    if not base.is_dir():
        raise DataError(f"{fmt.name}: data root {base} is not a directory (expected {fmt.layout})")
    for folder in (base / fmt.name / "data" / "all_data", base / "data" / "all_data", base / "all_data", base):
        readable_dir(folder, fmt.name, fmt.layout)
        if folder.is_dir() and any(folder.glob("*.json")):
            return folder
    raise DataError(f"{fmt.name}: no *.json files under {base} (expected {fmt.layout})")


def _read_file(path: Path, fmt: _LeafFormat) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """user -> (x, y) of one LEAF JSON file, checked against its ``users``/``num_samples``."""
    def fail(problem: str) -> DataError:
        return DataError(f"{fmt.name}: {path}: {problem} (expected {fmt.layout})")

    try:
        # utf-8-sig: a leading byte-order mark (a Windows editor's re-save) is no content
        with open(path, encoding="utf-8-sig") as fh:
            doc = json.load(fh)
    except OSError as exc:
        raise fail(f"cannot read the file ({exc.strerror or type(exc).__name__})") from None
    except UnicodeDecodeError:
        raise fail("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise fail(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(doc, dict) or not {"users", "num_samples", "user_data"} <= set(doc):
        have = sorted(doc)[:5] if isinstance(doc, dict) else type(doc).__name__
        raise fail(f"needs the keys users, num_samples, user_data, found {have}")
    users, counts, data = doc["users"], doc["num_samples"], doc["user_data"]
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users) or len(set(users)) != len(users):
        raise fail("'users' must be a list of distinct user names")
    if not isinstance(counts, list) or len(counts) != len(users) or \
            not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise fail(f"'num_samples' must list one count >= 0 per user ({len(users)} users)")
    if not isinstance(data, dict) or set(data) != set(users):
        extra = sorted(set(data) ^ set(users))[:3] if isinstance(data, dict) else type(data).__name__
        raise fail(f"'user_data' must hold exactly the users listed in 'users' (differs at {extra})")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for user, count in zip(users, counts):
        entry = data[user]
        if not isinstance(entry, dict) or not isinstance(entry.get("x"), list) or not isinstance(entry.get("y"), list):
            raise fail(f"user_data[{user!r}] must be {{'x': [...], 'y': [...]}}")
        xs, ys = entry["x"], entry["y"]
        if len(xs) != count or len(ys) != count:
            raise fail(f"user {user!r} has {len(xs)} x and {len(ys)} y, but num_samples says {count}")
        try:
            out[user] = (fmt.parse_x(xs), fmt.parse_y(ys))
        except _Bad as exc:
            raise fail(f"user {user!r}: {exc}") from None
    return out


def _load(fmt: _LeafFormat, root: str | None) -> RawDataset:
    source = fmt.source_files(root)
    users: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    file_of: dict[str, Path] = {}
    for path in source.files:
        for user, arrays in _read_file(path, fmt).items():
            if user in users:
                raise DataError(f"{fmt.name}: user {user!r} appears in both {file_of[user]} and {path} "
                                f"(expected every user in one file)")
            users[user], file_of[user] = arrays, path
    names = sorted(users)  # sample order (and the proxy/client choice) never depends on the file split
    sizes = np.asarray([len(users[u][1]) for u in names], dtype=np.int64)
    if sizes.sum() == 0:
        raise DataError(f"{fmt.name}: the JSON files in {source.folder} hold no samples (expected {fmt.layout})")
    x = np.concatenate([users[u][0] for u in names])
    y = np.concatenate([users[u][1] for u in names])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    user_samples = {u: np.arange(s, s + n, dtype=np.int64) for u, s, n in zip(names, starts, sizes)}
    if fmt is FEMNIST:
        mean, std = channel_stats(x)
        return RawDataset(name=fmt.name, x=x, y=y, num_classes=fmt.num_classes, kind="image", mean=mean, std=std,
                          user_samples=user_samples, source=source)
    vocab = list(SPECIALS) + [c if c != "\n" else "\\n" for c in ALL_LETTERS]  # the store joins tokens by "\n"
    return RawDataset(name=fmt.name, x=x, y=y, num_classes=fmt.num_classes, kind="text", vocab_size=len(vocab),
                      vocab=vocab, class_names=vocab[_FIRST_CHAR_ID:], user_samples=user_samples,
                      source=source)


def load_femnist(root: str | None = None) -> RawDataset:
    """LEAF FEMNIST -> uint8 [N, 1, 28, 28], 62 classes, with each sample's user (``user_samples``)."""
    return _load(FEMNIST, root)


def load_shakespeare(root: str | None = None) -> RawDataset:
    """LEAF Shakespeare -> token ids int64 [N, 80], 80 classes (the next character), with each
    sample's user (``user_samples``)."""
    return _load(SHAKESPEARE, root)
