"""Run configuration: dataclasses, YAML files, dotted command-line overrides, validation.

A run is a function of its resolved config (and nothing else): ``config.yaml`` in the run
directory is the resolved config, and :func:`config_hash` of it is what ranks compare at
start-up and what a resume checks against.

Layout (every field has a default; see ``docs/CONFIG.md`` for the reference)::

    seed: 0
    data:       {dataset, root, store, cache_dir, partition, clients, alpha, proxy_fraction, proxy_users,
                 test_fraction, val_fraction, min_size, options}
    model:      {arch, options: {...}}
    train:      {rounds, local_epochs, batch_size, proxy_batch_size, lr, momentum, weight_decay,
                 eval_every, amp, compile, packed, clients_per_round, optimizer_state,
                 diagnostics, resident_clients, client_state}
    algorithm:  {name: cafedistill, cafedistill: {tau, lam, mu, ...}, <other algorithm>: {...}}
    comm:       {logits_dtype, exits}
    dist:       {backend, device, timeout_s}
    checkpoint: {every, keep}

Algorithm parameters live in a section named after the algorithm, so one file can carry the
settings of several algorithms (``cafedist compare`` switches ``algorithm.name`` only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import yaml

from cafedist import yamlio
from cafedist.errors import ConfigError
from cafedist.typed import build_dataclass, is_number

#: names ``data.dataset`` accepts: the loaders of :data:`cafedist.data.registry.DATASETS` (kept
#: here so that reading a config imports no loader; a test checks that the two agree)
DATASET_NAMES = ("mnist5k", "digits", "cifar10", "cifar100", "tinyimagenet", "agnews", "femnist", "shakespeare",
                 "synthetic")

#: names ``train.diagnostics`` accepts (implemented in :mod:`cafedist.train.diagnostics`)
DIAGNOSTICS = ("conflict",)


@dataclass
class DataConfig:
    """Which dataset, and how it is split into clients and a public proxy set."""

    dataset: str = "mnist5k"
    root: str | None = None  # folder holding the raw dataset (not needed for mnist5k/digits)
    store: str | None = None  # prepared HDF5 store; default: <cache_dir>/<derived name>.h5
    cache_dir: str = "data/stores"
    # "dirichlet": pool all samples, split them with Dirichlet(alpha) label skew; "natural":
    # one client per user of the source (LEAF femnist/shakespeare), proxy set from other users
    partition: Literal["dirichlet", "natural"] = "dirichlet"
    clients: int = 10
    alpha: float = 0.3  # Dirichlet concentration of the label skew (dirichlet only)
    proxy_fraction: float = 0.1  # share of all samples set aside as the unlabeled proxy set (dirichlet only)
    # natural only: how many of the users not made clients feed the proxy set (null = all)
    proxy_users: int | None = None
    test_fraction: float = 0.2  # share of each client's data held out as its personal test set
    # share of each client's train split held out as its validation split (0 = none): what
    # tuning and calibration choose on, so the test split is never used for a choice
    val_fraction: float = 0.0
    min_size: int = 20  # every client gets at least this many samples
    options: dict = field(default_factory=dict)  # loader options, e.g. agnews {vocab_size, max_len}

    def validate(self, name: Callable[[str], str] = lambda key: f"data.{key}") -> None:
        """The partition's rules, for ``data.*`` of a run config and ``cafedist prepare`` alike
        (``name`` spells a field in messages: ``data.clients``, or ``clients`` for prepare)."""
        _check(self.dataset in DATASET_NAMES, name("dataset"),
               f"unknown dataset {self.dataset!r} (expected one of: {', '.join(sorted(DATASET_NAMES))})")
        _check(self.clients >= 1, name("clients"), f"must be >= 1, got {self.clients}")
        _check(self.alpha > 0 and math.isfinite(self.alpha), name("alpha"),
               f"must be a finite number > 0, got {self.alpha}")
        _check(0 < self.proxy_fraction < 1, name("proxy_fraction"), f"must be in (0, 1), got {self.proxy_fraction}")
        _check(0 < self.test_fraction < 1, name("test_fraction"), f"must be in (0, 1), got {self.test_fraction}")
        _check(0 <= self.val_fraction < 1, name("val_fraction"),
               f"must be in [0, 1) (0 = no validation split), got {self.val_fraction}")
        _check(self.min_size >= 2, name("min_size"),
               f"must be >= 2 (each client needs a train and a test sample), got {self.min_size}")
        _check(self.proxy_users is None or self.partition == "natural", name("proxy_users"),
               f"applies only to {name('partition')}: natural (dirichlet uses {name('proxy_fraction')})")
        _check(self.proxy_users is None or self.proxy_users >= 1, name("proxy_users"),
               f"must be >= 1 or null (all users not made clients), got {self.proxy_users}")
        # an empty path would silently mean the working directory (or the default store)
        for key, value, meaning in (("cache_dir", self.cache_dir, "the folder of derived stores"),
                                    ("store", self.store, "a store file, or null for the derived one"),
                                    ("root", self.root, "the dataset's folder, or null")):
            _check(value is None or value.strip() != "", name(key), f"empty; expected {meaning}")

    def store_path(self, seed: int) -> Path:
        """Where the prepared store lives: ``store`` if given, else a name derived from the split.
        A leading ``~`` is the home directory, as in ``root`` (no shell expands a config's values)."""
        if self.store:
            return Path(self.store).expanduser()
        val = f"-v{self.val_fraction:g}" if self.val_fraction > 0 else ""  # old names stay valid
        if self.partition == "natural":
            proxy = f"-u{self.proxy_users}" if self.proxy_users is not None else ""
            split = f"natural-n{self.clients}{proxy}"
        else:
            split = f"n{self.clients}-a{self.alpha:g}-p{self.proxy_fraction:g}"
        name = f"{self.dataset}-{split}-t{self.test_fraction:g}{val}-m{self.min_size}-s{seed}"
        if self.options:
            opts = json.dumps(self.options, sort_keys=True).encode()
            name += "-o" + hashlib.sha256(opts).hexdigest()[:8]
        return Path(self.cache_dir).expanduser() / f"{name}.h5"


@dataclass
class ModelConfig:
    """Early-exit architecture (``cnn``, ``resnet18``, ``transformer``) and its options."""

    arch: str = "cnn"
    options: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    """The round schedule and each client's local optimisation."""

    rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 32
    proxy_batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eval_every: int = 1  # evaluate every k rounds (the last round always)
    clients_per_round: float = 1.0  # fraction (<= 1) or count (> 1) of clients that train each round
    # YAML 1.1 reads a bare off/on as false/true: both spellings are accepted
    amp: Literal["off", "bf16", "fp16"] | bool = "off"
    compile: bool = False
    packed: Literal["auto", "on", "off"] | bool = "auto"  # step same-architecture clients together (vmap)
    # each client's SGD momentum: kept across rounds (and across parameter averaging), or
    # cleared at the start of every round like a fresh local optimizer (most FL code)
    optimizer_state: Literal["keep", "reset"] = "keep"
    # opt-in measurements that never change training (cafedist.train.diagnostics): "conflict"
    diagnostics: list[str] = field(default_factory=list)
    # clients materialized on the device at once per rank (None: all, always); the others are
    # parked in host memory or on disk (cafedist.run.residency). Never changes a result.
    resident_clients: int | None = None
    client_state: Literal["host", "disk"] = "host"  # where parked clients live

    def validate(self) -> None:
        """Check ``train.*``; raise ConfigError naming the first bad field."""
        if isinstance(self.amp, bool):
            _check(not self.amp, "train.amp", "expected 'off', 'bf16' or 'fp16', got true")
            self.amp = "off"
        if isinstance(self.packed, bool):
            self.packed = "on" if self.packed else "off"
        _check(self.rounds >= 1, "train.rounds", f"must be >= 1, got {self.rounds}")
        _check(self.local_epochs >= 1, "train.local_epochs", f"must be >= 1, got {self.local_epochs}")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.proxy_batch_size >= 1, "train.proxy_batch_size", f"must be >= 1, got {self.proxy_batch_size}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, "train.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.eval_every >= 1, "train.eval_every", f"must be >= 1, got {self.eval_every}")
        _check(self.clients_per_round > 0, "train.clients_per_round", f"must be > 0, got {self.clients_per_round}")
        _check(self.clients_per_round <= 1 or float(self.clients_per_round).is_integer(), "train.clients_per_round",
               f"must be a fraction <= 1 or a whole number of clients, got {self.clients_per_round}")
        _check(self.resident_clients is None or self.resident_clients >= 1, "train.resident_clients",
               f"must be >= 1 (or null: every client resident), got {self.resident_clients}")
        bad = [d for d in self.diagnostics if d not in DIAGNOSTICS]
        _check(not bad, "train.diagnostics", f"unknown diagnostic {bad[0]!r} (known: {', '.join(DIAGNOSTICS)})"
               if bad else "")
        _check(len(set(self.diagnostics)) == len(self.diagnostics), "train.diagnostics",
               f"each diagnostic at most once, got {self.diagnostics}")


@dataclass
class AlgorithmConfig:
    """The algorithm to run and the parameter sections of every algorithm the file mentions."""

    name: str = "cafedistill"
    params: dict[str, dict] = field(default_factory=dict)  # algorithm name -> its parameters


@dataclass
class CommConfig:
    """What goes over the wire."""

    logits_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # proxy logits of the exits the algorithm reads (CAFEDistill: the last) or of every exit
    exits: Literal["used", "all"] = "used"


#: the largest ``dist.timeout_s`` (about 31 years), well within what torch can hold
MAX_TIMEOUT_S = 1e9


@dataclass
class DistConfig:
    """Process group settings (launch detection itself needs no config)."""

    backend: Literal["auto", "gloo", "nccl", "mpi"] = "auto"
    device: str = "auto"
    timeout_s: float = 600.0

    def validate(self) -> None:
        """Check ``dist.*``; raise ConfigError naming the first bad field."""
        # torch keeps the timeout in int64 nanoseconds (292 years): beyond, it wraps around and a
        # run fails at once with C++ frames (or, past timedelta's range, a Python traceback)
        _check(0 < self.timeout_s <= MAX_TIMEOUT_S, "dist.timeout_s",
               f"must be > 0 and at most {MAX_TIMEOUT_S:,.0f} seconds, got {self.timeout_s}")
        # the spelling only: whether this host has that device is the runtime's to say
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "dist.device",
               f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class CheckpointConfig:
    """How often to checkpoint and how many checkpoints to keep."""

    every: int = 5  # rounds between checkpoints (0 = only on stop signals and at the end)
    keep: int = 3

    def validate(self) -> None:
        """Check ``checkpoint.*``; raise ConfigError naming the first bad field."""
        _check(self.every >= 0, "checkpoint.every", f"must be >= 0, got {self.every}")
        _check(self.keep >= 1, "checkpoint.keep", f"must be >= 1, got {self.keep}")


@dataclass
class Config:
    """The whole resolved run configuration."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        """Checks that involve more than one section."""
        per_round = self.train.clients_per_round
        _check(per_round <= 1 or per_round <= self.data.clients, "train.clients_per_round",
               f"{per_round:g} clients per round, but data.clients is {self.data.clients}")

    def algorithm_params(self) -> Any:
        """The typed parameter dataclass of the selected algorithm (defaults filled in)."""
        from cafedist.algorithms import get_algorithm

        cls = get_algorithm(self.algorithm.name, field_name="algorithm.name")
        return build_dataclass(cls.Params, self.algorithm.params.get(self.algorithm.name, {}),
                      f"algorithm.{self.algorithm.name}")

    def to_dict(self) -> dict:
        """Plain-data form, as written to ``config.yaml`` (algorithm sections flattened)."""
        out = dataclasses.asdict(self)
        algo = out.pop("algorithm")
        section: dict[str, Any] = {"name": algo["name"]}
        for name, params in sorted(algo["params"].items()):
            section[name] = params
        # always record the selected algorithm's full parameters, defaults included
        section[self.algorithm.name] = dataclasses.asdict(self.algorithm_params())
        out["algorithm"] = section
        return _reorder(out)


#: the top-level keys of a resolved config, in the order config.yaml lists them (every version wrote all)
TOP_LEVEL_KEYS = ("seed", "data", "model", "train", "algorithm", "comm", "dist", "checkpoint")


def _reorder(d: dict) -> dict:
    return {k: d[k] for k in TOP_LEVEL_KEYS if k in d}


# ----------------------------------------------------------------------------- validation
def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


def _split_algorithm_section(section: Any) -> dict:
    """``{name, <algo>: {...}}`` as written in YAML -> AlgorithmConfig fields."""
    from cafedist.algorithms import ALGORITHMS, get_algorithm

    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"algorithm: expected a mapping, got {section!r}")
    name = section.get("name", AlgorithmConfig.name)
    if not isinstance(name, str):
        raise ConfigError(f"algorithm.name: expected a string, got {name!r}")
    get_algorithm(name, field_name="algorithm.name")
    params = {}
    for key, value in section.items():
        if key == "name":
            continue
        if key not in ALGORITHMS:
            raise ConfigError(f"algorithm.{key}: unknown key (expected 'name' or an algorithm name: "
                              f"{', '.join(sorted(ALGORITHMS))})")
        # validate every section now, so a typo in an unused algorithm is caught too
        params[key] = dataclasses.asdict(build_dataclass(ALGORITHMS[key].Params, value, f"algorithm.{key}"))
    return {"name": name, "params": params}


def config_from_dict(raw: Any) -> Config:
    """Build and validate a :class:`Config` from plain data (e.g. parsed YAML)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    raw = dict(raw)
    algo = _split_algorithm_section(raw.pop("algorithm", None))
    cfg = build_dataclass(Config, raw, "")
    cfg.algorithm = AlgorithmConfig(**algo)
    cfg.algorithm_params()  # validates the selected algorithm's defaults/values
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=VALUE`` -> (["a", "b", "c"], VALUE parsed as YAML scalar/flow)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. train.rounds=5")
    key, _, value = text.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty component in key {key!r}")
    try:
        parsed = yamlio.load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML{yamlio.problem(exc)}") from None
    return parts, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides to a raw config mapping (returns a new mapping)."""
    out = json.loads(json.dumps(raw)) if raw else {}
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


@dataclass(frozen=True)
class YamlFile:
    """A YAML config file read and parsed once: its ``text``, its ``data`` as :func:`yamlio.load`
    gives it (any type: :func:`read_yaml` checks for a mapping) and, when asked for, whether
    it has comments (:func:`yamlio.has_comments`; else False)."""

    path: Path
    text: str
    data: Any
    commented: bool = False

    @classmethod
    def read(cls, path: str | Path, note_comments: bool = False) -> "YamlFile":
        """Read and parse ``path``, with a clear ConfigError for a missing or malformed file."""
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"{p}: is a directory, expected a YAML config file")
        if not p.exists():
            raise ConfigError(f"{p}: config file not found")
        if not p.is_file():
            raise ConfigError(f"{p}: not a regular file (expected a YAML config file)")
        try:
            text = p.read_bytes().decode("utf-8")
            data, commented = yamlio.load_noting_comments(text, note=note_comments)
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a text file (expected a YAML config)") from None
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read the config file ({exc.strerror or type(exc).__name__})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML{yamlio.problem(exc)}") from None
        return cls(p, text, data, commented)

    def mapping(self) -> dict:
        """The file's data as a config's mapping (an empty file: {})."""
        if self.data is None:
            return {}
        if not isinstance(self.data, dict):
            raise ConfigError(f"{self.path}: expected a mapping at the top level, got {type(self.data).__name__}")
        return self.data


def read_yaml(path: str | Path) -> dict:
    """Read a YAML config file with a clear error for a missing or malformed file, or one
    without settings: an empty file (a copy cut short, a template never filled in) would
    otherwise train the defaults under that file's name, where leaving ``--config`` out says so."""
    file = YamlFile.read(path)
    if file.data is None:
        raise ConfigError(f"{file.path}: holds no settings (empty, or comments only); expected a YAML "
                          "mapping such as 'data: {dataset: digits}' (leave out --config to use the defaults)")
    return file.mapping()


def read_run_config(path: str | Path) -> Config:
    """The config a run directory's ``config.yaml`` holds (the file train wrote)."""
    return run_config_of(YamlFile.read(path))


def missing_sections(data: Any) -> list[str]:
    """The top-level sections train writes into every ``config.yaml`` that ``data`` (a parsed
    file) lacks: all of them when it is no mapping."""
    return [key for key in TOP_LEVEL_KEYS if not isinstance(data, dict) or key not in data]


def run_config_of(file: YamlFile) -> Config:
    """The config of a run directory's ``config.yaml``, read (:meth:`YamlFile.read`).

    Files written before configs were read as YAML 1.2 (:mod:`cafedist.yamlio`) came from a
    YAML 1.1 writer, which leaves strings such as ``08`` or ``1e3`` unquoted: read as numbers
    they fail the config's types, so such a file is read again under YAML 1.1's rules. A file
    without every top-level section is refused: train writes them all, in every version, and
    an empty or partial file read as the defaults would describe a run that never was. A
    ``dist.timeout_s`` above :data:`MAX_TIMEOUT_S`, which earlier versions took (a run on one
    process never used it), reads as that bound: it does not make the run (not hashed)."""
    raw = file.mapping()
    missing = missing_sections(raw)
    if missing:
        # (callers name the file)
        raise ConfigError(f"not a config.yaml train wrote: it lacks the sections {', '.join(missing)}")
    raw = _timeout_within_bound(raw)
    try:
        return config_from_dict(raw)
    except ConfigError as first:
        try:
            legacy = yaml.safe_load(file.text)
        except (yaml.YAMLError, ValueError):
            raise first from None
        if not isinstance(legacy, dict) or legacy == raw:
            raise
        try:
            return config_from_dict(legacy)
        except ConfigError:
            raise first from None


def _timeout_within_bound(raw: dict) -> dict:
    """``raw`` with a recorded ``dist.timeout_s`` above :data:`MAX_TIMEOUT_S` lowered to it."""
    dist = raw.get("dist")
    timeout = dist.get("timeout_s") if isinstance(dist, dict) else None
    if not (is_number(timeout) and MAX_TIMEOUT_S < timeout < math.inf):
        return raw
    return {**raw, "dist": {**dist, "timeout_s": MAX_TIMEOUT_S}}


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                names: Mapping[str, str] | None = None) -> Config:
    """Read YAML (or start from defaults), apply overrides, validate. An error in a field an
    override set names that override (:func:`name_override`; ``names``: how to name some)."""
    from_file = read_yaml(path) if path else {}
    raw = apply_overrides(from_file, overrides or [])
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        override = name_override(str(exc), overrides or [], names)
        if override is not None:  # the value came from the command line, not the file
            raise ConfigError(f"{override}: {exc}") from None
        if overrides and _valid(from_file):  # the file is fine; an override made another field wrong
            where = f"{path} with" if path else "the"
            raise ConfigError(f"{where} overrides {' '.join(overrides)}: {exc}") from None
        if path:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def _valid(raw: dict) -> bool:
    try:
        config_from_dict(raw)
    except ConfigError:
        return False
    return True


def name_override(message: str, overrides: Sequence[str], names: Mapping[str, str] | None = None) -> str | None:
    """How an error ``message`` that starts with a field's name (``model.options.width: ...``)
    names the override that set the field (the last one wins): ``names[override]`` when given
    (compare: ``--grid KEY=VALUE`` as typed), else ``override 'KEY=VALUE'``; None if none did."""
    field = message.split(":", 1)[0].strip()
    for text in reversed(overrides):
        key = text.partition("=")[0].strip()
        if key == field or field.startswith(key + "."):
            return (names or {}).get(text, f"override {text!r}")
    return None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text (what ``config.yaml`` in a run directory holds)."""
    return yamlio.dump(cfg.to_dict())


#: fields that may differ between a run and its resume without changing what is computed:
#: where files live (the store itself is validated against the partition parameters),
#: backend/device/timeouts, and checkpoint frequency
_NOT_HASHED = ("dist", "checkpoint", "data.root", "data.store", "data.cache_dir",
               "train.diagnostics",  # diagnostics measure, they never change a model (tested)
               "train.resident_clients", "train.client_state")  # where clients live: same bits (tested)

#: fields added after runs were recorded, left out of the hash while at their default: the
#: runs, checkpoints and summaries written before the field existed keep their hash
_HASHED_ONLY_IF_SET: dict[str, Any] = {
    "data.val_fraction": 0.0,
    "data.partition": "dirichlet",
    "data.proxy_users": None,
    "train.optimizer_state": "keep",
    **{f"algorithm.{section}.{name}": default for section in ("cafedistill", "cafedistill-heads")
       for name, default in (("kd_weighting", "lam_tau2"), ("unselected", "none"), ("exit_weights", None))},
    "algorithm.cafedistill.similarity": "output",
    "algorithm.cafedistill.last_exit_kd": False,
    "algorithm.cafedistill-heads.similarity": "head_params",
    "algorithm.cafedistill-heads.proxy_size": 1000,
}


def _get(d: dict, dotted: str) -> Any:
    """``d["a"]["b"]["c"]`` for ``"a.b.c"`` (None when absent)."""
    for key in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _pop(d: dict, dotted: str) -> None:
    """Remove ``d["a"]["b"]["c"]`` for ``"a.b.c"`` if present."""
    *path, leaf = dotted.split(".")
    for key in path:
        d = d.get(key)
        if not isinstance(d, dict):
            return
    d.pop(leaf, None)


def identity_fields(cfg: Config, *, keep_defaults: bool = False) -> dict:
    """The config as a dict without what does not decide whether a run directory holds *this*
    run: fields that do not change results, and the parameter sections of algorithms other
    than the selected one (a config file may carry sections for several algorithms —
    ``cafedist compare`` switches ``algorithm.name`` — and a changed default of one algorithm
    must not make finished runs of another foreign). The hash also leaves out fields added
    later while at their default; ``keep_defaults`` keeps them, so that a message comparing
    two configs shows their values."""
    others = tuple(f"algorithm.{name}" for name in cfg.algorithm.params if name != cfg.algorithm.name)
    return _hashed_fields(cfg, _NOT_HASHED + others, drop_defaults=not keep_defaults)


def run_identity(cfg: Config) -> str:
    """sha256 of :func:`identity_fields`: equal for every config of the same run."""
    return _sha256(identity_fields(cfg))


def config_hash(cfg: Config, *, ignore: tuple[str, ...] = _NOT_HASHED) -> str:
    """sha256 of the canonical resolved config, minus fields that do not change results."""
    return _sha256(_hashed_fields(cfg, ignore))


def _hashed_fields(cfg: Config, ignore: tuple[str, ...], drop_defaults: bool = True) -> dict:
    d = cfg.to_dict()
    if drop_defaults:
        ignore = ignore + tuple(k for k, default in _HASHED_ONLY_IF_SET.items() if _get(d, k) == default)
    for key in ignore:
        _pop(d, key)
    return d


def canonical_text(value: Any) -> str:
    """A config value as :func:`config_hash` reads it (JSON, keys sorted): ``1`` and ``1.0`` differ."""
    return json.dumps(value, sort_keys=True, default=str)


def _sha256(d: dict) -> str:
    return hashlib.sha256(canonical_text(d).encode()).hexdigest()
