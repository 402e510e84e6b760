"""Tiny ImageNet from the standard ``tiny-imagenet-200/`` folder.

Layout: ``wnids.txt`` (one WordNet id per line; line order = label order),
``train/<wnid>/images/*.JPEG`` and ``val/images/*.JPEG`` with ``val/val_annotations.txt``
(tab-separated: file name, wnid, box). The unlabelled ``test/`` folder is ignored. Images are
64x64; the few grayscale ones are converted to RGB.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cafedist.data.base import RawDataset, SourceFiles, channel_stats, read_text, readable_dir, resolve_root
from cafedist.errors import DataError

NAME = "tinyimagenet"
FOLDER = "tiny-imagenet-200"
SIDE = 64
LAYOUT = ("the tiny-imagenet-200 layout: wnids.txt, train/<wnid>/images/*.JPEG, "
          "val/images/*.JPEG and val/val_annotations.txt")


def _decode(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # imported lazily: only this loader needs it

    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    # DecompressionBombError (an image of hundreds of megapixels) is no OSError
    except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{NAME}: cannot decode {path} ({exc}; expected a {SIDE}x{SIDE} JPEG)") from None
    if arr.shape != (SIDE, SIDE, 3):
        raise DataError(f"{NAME}: {path} is {arr.shape[1]}x{arr.shape[0]} (expected {SIDE}x{SIDE}; {LAYOUT})")
    return arr.transpose(2, 0, 1)


#: suffixes of images the release does not use; such a file among the *.JPEG ones was left out unseen
OTHER_IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})


def _refuse_other_images(images: Path) -> None:
    """Refuse a class folder holding images under another suffix than ``.JPEG`` (re-saved or
    renamed by a tool): reading ``*.JPEG`` alone would drop them without a word."""
    if not images.is_dir():
        return
    others = sorted(p.name for p in images.iterdir()
                    if p.suffix.lower() in OTHER_IMAGE_SUFFIXES and p.suffix != ".JPEG")
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise DataError(f"{NAME}: {images} holds {len(others)} image file(s) not named *.JPEG ({shown}), which "
                        f"would be left out; rename them to .JPEG (expected {LAYOUT})")


def _listing(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """All labelled image paths (train then val) with their labels, and the wnids."""
    wnids_file = folder / "wnids.txt"
    wnids = [w.strip() for w in read_text(wnids_file, NAME, LAYOUT).splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataError(f"{NAME}: {wnids_file} is empty or has duplicate ids (expected {LAYOUT})")
    label_of = {w: i for i, w in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    for w in wnids:
        images = folder / "train" / w / "images"
        readable_dir(images, NAME, LAYOUT)
        files = sorted(images.glob("*.JPEG")) if images.is_dir() else []
        _refuse_other_images(images)
        if not files:
            raise DataError(f"{NAME}: no JPEG images in {images} (expected {LAYOUT})")
        paths += files
        labels += [label_of[w]] * len(files)
    ann = folder / "val" / "val_annotations.txt"
    seen: dict[str, int] = {}
    for lineno, line in enumerate(read_text(ann, NAME, LAYOUT).splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 2 or cols[1] not in label_of:
            raise DataError(f"{NAME}: {ann} line {lineno} is malformed or names an unknown wnid "
                            f"(expected '<file>\\t<wnid>\\t<box>' with a wnid from wnids.txt)")
        if cols[0] in seen:  # one image twice could land in a client's train and its test split
            raise DataError(f"{NAME}: {ann} line {lineno} repeats the image {cols[0]} of line {seen[cols[0]]} "
                            f"(expected one line per validation image)")
        seen[cols[0]] = lineno
        paths.append(folder / "val" / "images" / cols[0])
        labels.append(label_of[cols[1]])
    return paths, labels, wnids


def _source(folder: Path, paths: list[Path]) -> SourceFiles:
    """The files read: the two index files, then the images (``_listing``'s order)."""
    return SourceFiles(folder, (folder / "wnids.txt", folder / "val" / "val_annotations.txt", *paths))


def source_files(root: str | None) -> SourceFiles:
    """The Tiny ImageNet folder under ``root`` and the files read from it (listing the images
    reads the two small index files, not the images)."""
    folder = resolve_root(root, FOLDER, NAME, "wnids.txt", LAYOUT)
    return _source(folder, _listing(folder)[0])


def load_tinyimagenet(root: str | None = None) -> RawDataset:
    """Tiny ImageNet train + val pooled -> uint8 [110000, 3, 64, 64], 200 classes. Needs Pillow."""
    folder = resolve_root(root, FOLDER, NAME, "wnids.txt", LAYOUT)
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DataError(f"{NAME}: decoding JPEG needs Pillow; run `pip install pillow`") from None
    paths, labels, wnids = _listing(folder)
    x = np.empty((len(paths), 3, SIDE, SIDE), dtype=np.uint8)
    # PIL releases the GIL while decoding, so threads give a real speed-up on 110k small files.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, arr in enumerate(pool.map(_decode, paths)):
            x[i] = arr
    mean, std = channel_stats(x)
    return RawDataset(name=NAME, x=x, y=np.asarray(labels, dtype=np.int64), num_classes=len(wnids),
                      kind="image", mean=mean, std=std, class_names=wnids, source=_source(folder, paths))
