"""LEAF JSON (femnist, shakespeare): the loader, the natural partition (one client per user),
its store, a short training run, and bad input. Tiny files in LEAF's exact layout, written here."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import summary
from test_run_dir import run_cli

from cafedist.config import load_config
from cafedist.data import PartitionSpec, Store, load_dataset, make_splits, partition_params, prepare_store
from cafedist.data.leaf import ALL_LETTERS
from cafedist.data.prepare import natural_users
from cafedist.errors import ConfigError, DataError

N_USERS = 12


def _femnist_sample(rng: np.random.Generator) -> tuple[list[float], int]:
    return np.round(rng.random(784), 3).tolist(), int(rng.integers(0, 62))


def _shakespeare_sample(rng: np.random.Generator) -> tuple[str, str]:
    chars = list(ALL_LETTERS)
    return "".join(rng.choice(chars, 80)), str(rng.choice(chars))


def write_leaf(folder: Path, dataset: str = "femnist", n_users: int = N_USERS, files: int = 2,
               seed: int = 0) -> dict[str, tuple[list, list]]:
    """LEAF ``all_data`` JSON files in ``folder``: user i (``u00``..) has 3 + i samples, the users
    dealt round-robin over ``files`` files. Returns user -> (xs, ys) as written."""
    rng = np.random.default_rng(seed)
    make = _femnist_sample if dataset == "femnist" else _shakespeare_sample
    users = {}
    for i in range(n_users):
        pairs = [make(rng) for _ in range(3 + i)]
        users[f"u{i:02d}"] = ([x for x, _ in pairs], [y for _, y in pairs])
    folder.mkdir(parents=True, exist_ok=True)
    names = list(users)[::-1]  # file order must not matter
    for k in range(files):
        mine = names[k::files]
        doc = {"users": mine, "num_samples": [len(users[u][1]) for u in mine],
               "user_data": {u: {"x": users[u][0], "y": users[u][1]} for u in mine}}
        (folder / f"all_data_{k}.json").write_text(json.dumps(doc))
    return users


@pytest.fixture(scope="module")
def femnist(tmp_path_factory) -> tuple[Path, dict]:
    """(LEAF ``data/`` root, user -> (xs, ys)) of a small FEMNIST-like dataset."""
    root = tmp_path_factory.mktemp("leaf") / "data"
    return root, write_leaf(root / "femnist" / "data" / "all_data")


# ---------------------------------------------------------------- the loader
@pytest.mark.parametrize("below", ["", "femnist", "femnist/data", "femnist/data/all_data"])
def test_femnist_loader_reads_every_root_form(femnist, below):
    root, users = femnist
    raw = load_dataset("femnist", str(root / below) if below else str(root))
    n = sum(len(ys) for _, ys in users.values())
    assert raw.x.shape == (n, 1, 28, 28) and raw.x.dtype == np.uint8 and raw.kind == "image"
    assert raw.num_classes == 62 and len(raw.mean) == 1
    assert list(raw.user_samples) == sorted(users)  # users in name order, whatever the files
    for user, (xs, ys) in users.items():
        idx = raw.user_samples[user]
        assert len(idx) == len(ys)
        assert raw.y[idx].tolist() == ys
        np.testing.assert_array_equal(raw.x[idx].reshape(len(ys), -1), np.rint(np.asarray(xs) * 255))


def test_shakespeare_loader_maps_leaf_characters(tmp_path):
    assert len(ALL_LETTERS) == 80 and len(set(ALL_LETTERS)) == 80
    users = write_leaf(tmp_path / "all_data", "shakespeare")
    doc = json.loads((tmp_path / "all_data" / "all_data_0.json").read_text())
    user = doc["users"][0]
    doc["user_data"][user]["x"][0] = "\n@" + "a" * 78  # '@' is outside LEAF's vocabulary
    doc["user_data"][user]["y"][0] = "\n"
    (tmp_path / "all_data" / "all_data_0.json").write_text(json.dumps(doc))
    raw = load_dataset("shakespeare", str(tmp_path))  # the parent of all_data/
    assert raw.kind == "text" and raw.x.shape == (sum(len(y) for _, y in users.values()), 80)
    assert raw.num_classes == 80 and raw.vocab_size == 82 and len(raw.vocab) == 82
    first = raw.user_samples[user][0]
    assert raw.x[first, :3].tolist() == [2, 1, 2 + ALL_LETTERS.index("a")]  # "\n" -> 2, "@" -> unk
    assert raw.y[first] == 0
    other = "u00" if user != "u00" else "u01"
    xs, ys = users[other]
    idx = raw.user_samples[other]
    assert raw.x[idx].tolist() == [[2 + ALL_LETTERS.index(c) for c in x] for x in xs]
    assert raw.y[idx].tolist() == [ALL_LETTERS.index(c) for c in ys]
    assert raw.x.min() >= 1  # no padding inside LEAF's fixed-length samples


# ---------------------------------------------------------------- the natural partition and its store
NATURAL = dict(dataset="femnist", clients=5, alpha=0.3, proxy_fraction=0.1, test_fraction=0.25, val_fraction=0.2,
               min_size=8, seed=4, partition="natural")


def _client_rows(store: Store, cid: int) -> list[bytes]:
    """Client ``cid``'s stored inputs (train, validation and test), one bytes object per sample, sorted."""
    parts = [store._read(f"clients/{cid:05d}/x_{part}") for part in ("train", "val", "test")]
    return sorted(row.tobytes() for x in parts for row in x)


def test_natural_store_gives_each_client_exactly_its_user(femnist, tmp_path):
    root, users = femnist
    raw = load_dataset("femnist", str(root))
    params = partition_params(PartitionSpec(**NATURAL))
    assert params["partition"] == "natural" and "alpha" not in params and "proxy_fraction" not in params
    client_users, proxy_users = natural_users(raw.user_samples, params)
    assert len(client_users) == 5 and not set(client_users) & set(proxy_users)
    assert all(len(users[u][1]) >= 8 for u in client_users)  # min_size 8: only users u05..u11 qualify
    assert set(client_users) | set(proxy_users) == set(users)  # the proxy: every user not made a client
    out = prepare_store(tmp_path / "s.h5", PartitionSpec(**NATURAL), root)
    every: list[bytes] = []
    with Store(out) as s:
        assert s.num_clients == 5 and s.params == params and s.has_val
        for cid in range(5):
            user = s.client_user(cid)
            assert user == client_users[cid]
            (n_tr, n_te), n_va = s.client_sizes()[cid], s.val_sizes()[cid]
            assert n_tr + n_va + n_te == len(users[user][1]) and min(n_tr, n_va, n_te) >= 1
            rows = _client_rows(s, cid)
            assert rows == sorted(r.tobytes() for r in raw.x[raw.user_samples[user]])  # exactly its user's
            every += rows
        assert len(set(every)) == len(every)  # no sample shared between clients
        proxy = sorted(r.tobytes() for r in s._read("proxy/x"))
    assert proxy == sorted(r.tobytes() for u in proxy_users for r in raw.x[raw.user_samples[u]])
    assert not set(proxy) & set(every)


def test_natural_partition_is_deterministic_and_seeded(femnist, tmp_path):
    root, _ = femnist
    a = prepare_store(tmp_path / "a.h5", PartitionSpec(**NATURAL), root)
    b = prepare_store(tmp_path / "b.h5", PartitionSpec(**NATURAL), root)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    c = prepare_store(tmp_path / "c.h5", PartitionSpec(**{**NATURAL, "seed": 5}), root)
    with Store(a) as sa, Store(c) as sc:
        assert [sa.client_user(i) for i in range(5)] != [sc.client_user(i) for i in range(5)]
    # more clients keep the first ones (and their splits); proxy_users takes the first of the rest
    raw = load_dataset("femnist", str(root))
    five = make_splits(raw.y, partition_params(PartitionSpec(**NATURAL)), raw.user_samples)
    six = make_splits(raw.y, partition_params(PartitionSpec(**{**NATURAL, "clients": 6})), raw.user_samples)
    assert [t.tolist() for t in five[1]] == [t.tolist() for t in six[1][:5]]
    two = natural_users(raw.user_samples, partition_params(PartitionSpec(**NATURAL, proxy_users=2)))[1]
    every = natural_users(raw.user_samples, partition_params(PartitionSpec(**NATURAL)))[1]
    assert len(two) == 2 and set(two) < set(every)


def test_natural_partition_errors(femnist):
    root, _ = femnist
    raw = load_dataset("femnist", str(root))
    with pytest.raises(ConfigError, match=r"clients=8, but only 7 of the 12 users have >= min_size=8"):
        make_splits(raw.y, partition_params(PartitionSpec(**{**NATURAL, "clients": 8})), raw.user_samples)
    with pytest.raises(ConfigError, match="no users with samples are left for the proxy set"):
        make_splits(raw.y, partition_params(PartitionSpec(**{**NATURAL, "clients": 12, "min_size": 2})),
                    raw.user_samples)
    with pytest.raises(ConfigError, match="proxy_users=9, but 7 users"):
        make_splits(raw.y, partition_params(PartitionSpec(**NATURAL, proxy_users=9)), raw.user_samples)
    with pytest.raises(ConfigError, match="partition natural needs a dataset that records its users"):
        partition_params(PartitionSpec(**{**NATURAL, "dataset": "digits"}))
    with pytest.raises(ConfigError, match="proxy_users: applies only to partition: natural"):
        partition_params(PartitionSpec(**{**NATURAL, "partition": "dirichlet"}, proxy_users=3))


def test_dirichlet_still_works_on_leaf_data(femnist, tmp_path):
    root, users = femnist
    spec = PartitionSpec("femnist", clients=3, alpha=1.0, proxy_fraction=0.1, min_size=5, seed=0)
    with Store(prepare_store(tmp_path / "d.h5", spec, root)) as s:
        assert s.client_user(0) is None and "partition" not in s.params
        assert sum(a + b for a, b in s.client_sizes()) + s.proxy_size == sum(len(y) for _, y in users.values())


# ---------------------------------------------------------------- config and CLI
def test_config_fields_name_the_store(tmp_path):
    cfg = load_config(None, ["data.dataset=femnist", "data.partition=natural", "data.clients=5",
                             "data.proxy_users=3", "data.cache_dir=c"])
    assert cfg.data.store_path(0).name == "femnist-natural-n5-u3-t0.2-m20-s0.h5"
    assert PartitionSpec.of(cfg.data, 0).partition == "natural"
    assert load_config(None, ["data.dataset=femnist", "data.partition=natural"]).data.store_path(1).name == \
        "femnist-natural-n10-t0.2-m20-s1.h5"
    with pytest.raises(ConfigError, match="data.proxy_users: applies only to data.partition: natural"):
        load_config(None, ["data.proxy_users=3"])
    with pytest.raises(ConfigError, match="data.partition"):
        load_config(None, ["data.partition=users"])
    example = load_config(Path(__file__).resolve().parents[1] / "configs" / "leaf_femnist.yaml")
    assert example.data.dataset == "femnist" and example.data.partition == "natural"


def test_cli_prepare_natural_and_describe(femnist, tmp_path):
    root, _ = femnist
    out = tmp_path / "p.h5"
    code, stdout, err = run_cli("prepare", "--dataset", "femnist", "--root", str(root), "--partition", "natural",
                                "--clients", "4", "--min-size", "5", "--proxy-users", "3", "--out", str(out))
    assert code == 0, err
    assert "4 clients" in stdout and "partition=natural" in stdout and "proxy_users=3" in stdout
    code, _, err = run_cli("prepare", "--dataset", "femnist", "--root", str(root), "--partition", "natural",
                           "--clients", "4", "--alpha", "0.3", "--out", str(tmp_path / "q.h5"))
    assert code == 2 and "takes no --alpha" in err and "Traceback" not in err


def test_short_training_run_on_natural_femnist(femnist, tmp_path):
    root, _ = femnist
    cfg = tmp_path / "leaf.yaml"
    cfg.write_text(f"""\
seed: 1
data: {{dataset: femnist, root: {root}, partition: natural, clients: 4, min_size: 6, val_fraction: 0.2,
       cache_dir: {tmp_path / "stores"}}}
model: {{arch: cnn, options: {{width: 4}}}}
train: {{rounds: 2, local_epochs: 1, batch_size: 8, proxy_batch_size: 8, lr: 0.05}}
algorithm: {{name: cafedistill, cafedistill: {{proxy_size: 16}}}}
checkpoint: {{every: 0, keep: 1}}
dist: {{timeout_s: 60}}
""")
    run = tmp_path / "run"
    code, _, err = run_cli("train", "--config", str(cfg), "--out", str(run), "--no-progress")
    assert code == 0, err
    s = summary(run)
    assert len(s["acc_per_exit"]) == 3 and all(0.0 <= a <= 1.0 for a in s["acc_per_exit"])
    assert (tmp_path / "stores" / "femnist-natural-n4-t0.2-v0.2-m6-s1.h5").is_file()


# ---------------------------------------------------------------- bad input: one line naming the file
def _edit(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _first_user(doc: dict) -> dict:
    return doc["user_data"][doc["users"][0]]


BAD = {
    "malformed json": (lambda p: p.write_text('{"users": ["a"'), "not valid JSON"),
    "missing key": (lambda p: _edit(p, lambda d: d.pop("num_samples")), "needs the keys users, num_samples"),
    "num_samples": (lambda p: _edit(p, lambda d: d["num_samples"].__setitem__(0, 99)), "but num_samples says 99"),
    "user_data users": (lambda p: _edit(p, lambda d: d["user_data"].update(ghost={"x": [], "y": []})),
                        "'user_data' must hold exactly the users listed"),
    "x length": (lambda p: _edit(p, lambda d: _first_user(d)["x"][1].pop()),
                 "x must be lists of 784 numbers"),
    "x range": (lambda p: _edit(p, lambda d: _first_user(d)["x"][0].__setitem__(0, 3.0)),
                "x values must lie in [0, 1]"),
    "y range": (lambda p: _edit(p, lambda d: _first_user(d)["y"].__setitem__(0, 62)), "y: labels outside 0..61"),
    "y float": (lambda p: _edit(p, lambda d: _first_user(d)["y"].__setitem__(0, 1.0)),
                "y: labels must be a list of integers 0..61, got float64"),
    "y bool": (lambda p: _edit(p, lambda d: _first_user(d)["y"].__setitem__(0, True)),
               "y: labels must be a list of integers 0..61, got bool among them"),
    "x null": (lambda p: _edit(p, lambda d: _first_user(d)["x"].__setitem__(0, None)), "x must be lists of 784"),
    "not a mapping": (lambda p: p.write_text("[1, 2]"), "needs the keys users, num_samples, user_data"),
}


def test_leaf_json_saved_with_a_utf8_byte_order_mark_reads_as_without(tmp_path):
    """A file re-saved by a Windows editor may start with a UTF-8 byte-order mark: it is no
    content (as for AG News and Tiny ImageNet's text files). ``json`` refused it as 'Unexpected
    UTF-8 BOM', so the whole dataset failed to load."""
    for name in ("plain", "bom"):
        write_leaf(tmp_path / name / "all_data", n_users=3, files=2)
    for path in (tmp_path / "bom" / "all_data").glob("*.json"):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    plain, bom = (load_dataset("femnist", str(tmp_path / name)) for name in ("plain", "bom"))
    np.testing.assert_array_equal(bom.x, plain.x)
    assert bom.y.tolist() == plain.y.tolist() and list(bom.user_samples) == list(plain.user_samples)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_femnist_files_name_the_file(tmp_path, case):
    folder = tmp_path / "all_data"
    write_leaf(folder, n_users=3, files=1)
    damage, needle = BAD[case]
    damage(folder / "all_data_0.json")
    with pytest.raises(DataError, match=re.escape(needle)) as info:
        load_dataset("femnist", str(tmp_path))
    msg = str(info.value)
    assert str(folder / "all_data_0.json") in msg and "expected LEAF JSON" in msg and "\n" not in msg


def test_bad_shakespeare_and_folders(tmp_path):
    write_leaf(tmp_path / "s" / "all_data", "shakespeare", n_users=2, files=1)
    path = tmp_path / "s" / "all_data" / "all_data_0.json"
    _edit(path, lambda d: _first_user(d)["x"].__setitem__(0, "too short"))
    with pytest.raises(DataError, match="x must be 80-character strings, got a 9-character string"):
        load_dataset("shakespeare", str(tmp_path / "s"))
    _edit(path, lambda d: (_first_user(d)["x"].__setitem__(0, "a" * 80), _first_user(d)["y"].__setitem__(0, "ab")))
    with pytest.raises(DataError, match="y must be one character of LEAF's 80-character ALL_LETTERS, got 'ab'"):
        load_dataset("shakespeare", str(tmp_path / "s"))
    _edit(path, lambda d: (_first_user(d)["x"].__setitem__(0, "\ud800" + "a" * 79),
                           _first_user(d)["y"].__setitem__(0, "a")))
    raw = load_dataset("shakespeare", str(tmp_path / "s"))  # a lone surrogate is one more unknown character
    assert (raw.x[:, 0] == 1).sum() >= 1
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("femnist", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.json files under"):
        load_dataset("femnist", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no data root given"):
        load_dataset("femnist")
    a, b = tmp_path / "dup" / "all_data" / "a.json", tmp_path / "dup" / "all_data" / "b.json"
    write_leaf(a.parent, n_users=2, files=1)
    (a.parent / "all_data_0.json").rename(a)
    b.write_text(a.read_text())
    with pytest.raises(DataError, match="appears in both"):
        load_dataset("femnist", str(tmp_path / "dup"))
    # through the CLI: exit 2, one line, no traceback
    code, _, err = run_cli("prepare", "--dataset", "shakespeare", "--root", str(tmp_path / "nope"), "--partition",
                           "natural", "--clients", "2", "--out", str(tmp_path / "x.h5"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "shakespeare" in err
    assert not (tmp_path / "x.h5").exists()
