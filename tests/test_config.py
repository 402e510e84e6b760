"""Config: YAML + overrides, validation errors that name the field, stable hashing."""

from pathlib import Path

import pytest

from cafedist.config import Config, apply_overrides, config_from_dict, config_hash, dump_config, load_config
from cafedist.errors import ConfigError


def test_defaults_and_round_trip(tmp_path):
    cfg = config_from_dict({})
    assert cfg.algorithm.name == "cafedistill"
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert config_hash(again) == config_hash(cfg)
    assert again.algorithm_params().tau == 3.0


def test_overrides_are_typed_and_dotted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {rounds: 4}\nalgorithm: {name: cafedistill, cafedistill: {mu: 2}}\n")
    cfg = load_config(path, ["train.rounds=7", "algorithm.cafedistill.tau=1.5", "model.options={width: 8}"])
    assert cfg.train.rounds == 7
    assert cfg.algorithm_params().tau == 1.5 and cfg.algorithm_params().mu == 2.0
    assert cfg.model.options == {"width": 8}


@pytest.mark.parametrize("raw,field", [
    ({"trian": {}}, "trian"),
    ({"train": {"rounds": "ten"}}, "train.rounds"),
    ({"train": {"rounds": 1.5}}, "train.rounds"),
    ({"data": {"alpha": 0}}, "data.alpha"),
    ({"data": {"alpha": -1}}, "data.alpha"),
    ({"data": {"proxy_fraction": 1.0}}, "data.proxy_fraction"),
    ({"data": {"proxy_fraction": 0}}, "data.proxy_fraction"),
    ({"data": {"clients": 0}}, "data.clients"),
    ({"algorithm": {"name": "nope"}}, "algorithm.name"),
    ({"algorithm": {"cafedistill": {"tua": 1}}}, "algorithm.cafedistill.tua"),
    ({"algorithm": {"cafedistill": {"mu": 0}}}, "algorithm.cafedistill.mu"),
    ({"comm": {"logits_dtype": "int8"}}, "comm.logits_dtype"),
    ({"train": {"amp": True}}, "train.amp"),
    ({"train": {"amp": "fp8"}}, "train.amp"),
    ({"train": {"packed": "sometimes"}}, "train.packed"),
    ({"train": {"lr": 10**400}}, "train.lr"),  # an int no float holds (was an OverflowError traceback)
    ({"algorithm": {"cafedistill": {"tau": -10**400}}}, "algorithm.cafedistill.tau"),
])
def test_bad_values_name_the_field(raw, field):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    msg = str(exc.value)
    assert msg.startswith(field) or f"{field}:" in msg, msg
    assert "\n" not in msg


def test_a_timeout_beyond_what_torch_holds_is_refused():
    """torch keeps dist.timeout_s in int64 nanoseconds: 1e10 s made a 2-rank run fail at once with
    C++ frames, 1e300 with an OverflowError traceback (timedelta), instead of one line here."""
    assert config_from_dict({"dist": {"timeout_s": 1e9}}).dist.timeout_s == 1e9
    for seconds in (1e10, 1e300):
        with pytest.raises(ConfigError, match=r"^dist\.timeout_s: must be > 0 and at most 1,000,000,000 seconds"):
            config_from_dict({"dist": {"timeout_s": seconds}})


def test_a_run_recorded_with_a_larger_timeout_still_reads(tmp_path):
    """A config.yaml of an earlier version with dist.timeout_s above the bound (a run on one
    process never used it) is read with the bound: status, eval and resume take the run."""
    from cafedist.config import read_run_config

    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config_from_dict({})).replace("timeout_s: 600.0", "timeout_s: 1000000000000.0"))
    cfg = read_run_config(path)
    assert cfg.dist.timeout_s == 1e9 and config_hash(cfg) == config_hash(config_from_dict({}))


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.rounds"])


def test_hash_ignores_runtime_only_sections():
    a = config_from_dict({"dist": {"timeout_s": 5}, "checkpoint": {"every": 1}})
    b = config_from_dict({})
    c = config_from_dict({"seed": 1})
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert isinstance(Config().to_dict()["algorithm"]["cafedistill"], dict)


def test_yaml_on_off_spellings():
    cfg = load_config(None, ["train.amp=off", "train.packed=on"])
    assert cfg.train.amp == "off" and cfg.train.packed == "on"
    assert load_config(None, ["train.packed=off"]).train.packed == "off"


def test_a_store_path_starting_with_a_tilde_is_in_the_home_directory(monkeypatch, tmp_path):
    """``~`` in data.cache_dir / data.store means the home directory, as it does in data.root;
    it was taken literally: train created a folder named '~' in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cached = config_from_dict({"data": {"dataset": "digits", "cache_dir": "~/stores"}})
    assert cached.data.store_path(0) == tmp_path / "stores" / "digits-n10-a0.3-p0.1-t0.2-m20-s0.h5"
    named = config_from_dict({"data": {"dataset": "digits", "store": "~/d.h5"}})
    assert named.data.store_path(0) == tmp_path / "d.h5"
    assert named.data.store == "~/d.h5" and config_hash(named) == config_hash(cached)  # as written; not hashed


def test_val_fraction_names_the_store_and_keeps_old_hashes():
    plain = config_from_dict({"data": {"dataset": "digits", "clients": 4}})
    val = config_from_dict({"data": {"dataset": "digits", "clients": 4, "val_fraction": 0.1}})
    assert plain.data.store_path(0).name == "digits-n4-a0.3-p0.1-t0.2-m20-s0.h5"  # unchanged without a split
    assert val.data.store_path(0).name == "digits-n4-a0.3-p0.1-t0.2-v0.1-m20-s0.h5"
    # runs recorded before the field existed keep their hash: pinned in
    # test_fields_added_later_keep_the_hash_of_runs_written_before_them
    assert config_hash(plain) != config_hash(val)
    with pytest.raises(ConfigError, match=r"data.val_fraction: must be in \[0, 1\)"):
        config_from_dict({"data": {"val_fraction": 1}})


def test_fields_added_later_keep_the_hash_of_runs_written_before_them():
    """Run directories written before a field existed must still resume: a new field at its
    default stays out of the hash (``_HASHED_ONLY_IF_SET``). The values are the hashes of the
    shipped configs as written by commit ef29128; set away from its default, a field counts."""
    from cafedist.config import config_from_dict, config_hash, read_yaml

    root = Path(__file__).resolve().parents[1] / "configs"
    want = {"quickstart.yaml": "da170cfc72ca485be7be073f40a32aa91ca5dfb10d270344c36f19deec6a4ecc",
            "digits.yaml": "efcc70fc539d4fadeacfe382bfc52223b40c63eca59ca253c4dc528c07e9ec95"}
    for name, digest in want.items():
        raw = read_yaml(root / name)
        assert config_hash(config_from_dict(raw)) != digest  # the default KD weighting changed since
        raw["algorithm"]["cafedistill"]["kd_weighting"] = "lam_tau2"  # what those runs used
        raw["data"]["val_fraction"] = 0.0  # the quick start holds out a validation split since
        assert config_hash(config_from_dict(raw)) == digest, f"{name}: a new field changed the hash"
        raw["train"]["diagnostics"] = ["conflict"]  # measures only: never in the hash
        assert config_hash(config_from_dict(raw)) == digest
        raw["train"]["optimizer_state"] = "reset"
        assert config_hash(config_from_dict(raw)) != digest
