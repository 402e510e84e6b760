"""YAML as configs are read: YAML 1.2 numbers, no repeated keys, plain data only (cafedist.yamlio)."""

from __future__ import annotations

import math

import pytest
import yaml

from cafedist import yamlio
from cafedist.config import dump_config, load_config


@pytest.mark.parametrize("text,value", [
    ("010", 10), ("0o10", 8), ("0x1f", 31), ("-7", -7), ("+5", 5), ("00", 0),  # 1.1: 010 was 8
    ("5e-4", 0.0005), ("1e-3", 0.001), ("1e3", 1000.0), (".5", 0.5), ("3.", 3.0), ("1.0e+20", 1e20),  # 1.1: strings
    ("1:30", "1:30"), ("1_000", "1_000"), ("2024-01-01", "2024-01-01"),  # 1.1: 90, 1000, a date
    ("yes", True), ("off", False), ("null", None), ("group", "group"),
])
def test_scalars_read_as_people_write_them(text, value):
    assert yamlio.load(f"k: {text}") == {"k": value}
    assert type(yamlio.load(f"k: {text}")["k"]) is type(value)


def test_infinities_and_nan_still_parse_so_the_config_can_refuse_them():
    assert yamlio.load("k: -.inf")["k"] == -math.inf and math.isnan(yamlio.load("k: .NaN")["k"])


@pytest.mark.parametrize("text,problem", [
    ("a: 1\nb: 2\na: 3\n", "line 3 (key 'a' is given twice)"),
    ("s: {x: 1, x: 2}\n", "key 'x' is given twice"),
    ("a: &x [1, *x]\n", "alias *x refers to a node that contains it (a cycle)"),
    ("a: !!set {x}\n", "!!set is not plain data"),
    ("a: !!timestamp 2024-01-01\n", "!!timestamp is not plain data"),
    ("a: !!python/object:os.system x\n", "could not determine a constructor"),
    ("a: " + "[" * 2000 + "]" * 2000, "nested too deeply"),
    ("a: !!int x\n", "'x' is not an integer"), ("a: !!int ''\n", "'' is not an integer"),  # were tracebacks
    ("a: !!float x\n", "'x' is not a number"), ("a: !!bool x\n", "'x' is not a boolean"),
    ("a: !!int '1_0'\n", "'1_0' is not an integer"),
])
def test_what_is_not_plain_data_is_refused(text, problem):
    with pytest.raises(yaml.YAMLError) as info:
        yamlio.load(text)
    assert problem in yamlio.problem(info.value)


@pytest.mark.parametrize("text", [
    "base: &b {lr: 1, rounds: 2}\nrun:\n  <<: *b\n  lr: 3\ntwice: [*b, *b]\n",
    # a merged-in mapping that merges itself (PyYAML writes the inherited keys into it)
    "d: &d {lr: 1}\na:\n  inner: &e\n    <<: *d\n    lr: 2\nb:\n  <<: *e\n",
    "d: &d {lr: 1}\nr: {<<: &m {<<: *d, lr: 2}}\ns: *m\n",
])
def test_merge_keys_and_anchors_read_as_pyyaml_reads_them(text):
    assert yamlio.load(text) == yaml.safe_load(text)


@pytest.mark.parametrize("value", ["1e3", "010", "08", "1:30", "5e-4", "yes", "2024-01-01", "1_000", "0o1", "+.5",
                                   "12", "abc", 0.0005, 1e20, 12, -3, True])
def test_what_dump_writes_both_yaml_versions_read_back(value):
    """Quoted where YAML 1.2 *or* 1.1 would read another type: a plain yaml.safe_load of a
    config.yaml (a user's script) reads the same values as cafedist."""
    text = yamlio.dump({"k": value})
    assert yamlio.load(text) == {"k": value} and yaml.safe_load(text) == {"k": value}


@pytest.mark.parametrize("text,commented", [
    ("a: 1 # note\n", True), ("# top\na: 1\n", True), ("a: [1, 2]  # c\n", True),
    ("a: 'x #1'\n", False), ('a: "x # y"\n', False), ("a: x#y\n", False), ("a: |\n  line # kept\n", False),
    ("b: &b {x: 'y #1'}\nc:\n  <<: *b\n  z: 2\n", False), ("b: &b {x: 1}\nc: {<<: *b}  # m\n", True),
])
def test_comments_are_told_from_a_hash_inside_a_value(text, commented):
    assert yamlio.has_comments(text) is commented
    # and from the one parse that also loads the text (a merge key rewrites its mapping)
    assert yamlio.load_noting_comments(text) == (yamlio.load(text), commented)


def test_a_run_config_written_by_yaml_1_1_still_reads(tmp_path):
    """Before YAML 1.2 reading, config.yaml came from yaml.safe_dump, which leaves '08' bare."""
    from cafedist.config import Config, read_run_config

    raw = Config().to_dict()
    raw["data"]["root"] = "08"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert "root: 08" in path.read_text()
    assert read_run_config(path).data.root == "08"


def test_a_config_reads_5e_4_and_writes_what_it_reads(tmp_path):
    """README writes weight_decay as 5e-4; YAML 1.1 read that as a string and the config refused it."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  weight_decay: 5e-4\n  lr: 1e-2\n  rounds: 010\ndata:\n  root: '1e3'\n")
    cfg = load_config(path)
    assert (cfg.train.weight_decay, cfg.train.lr, cfg.train.rounds, cfg.data.root) == (0.0005, 0.01, 10, "1e3")
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert dump_config(load_config(again)) == dump_config(cfg)
