"""Inference budgets for ``cafedist eval --budget``: parsing specs and per-client budget files.

A budget spec is one of

- ``macs=F``: the client's mean MACs per test sample must stay <= F × the last exit's MACs
  (0 < F <= 1; below exit 1's share it cannot be met and is refused);
- ``loss=P``: the client's accuracy may be at most P accuracy points (0 <= P <= 100) below its
  own last exit's, measured on its calibration split.

``--budget`` takes a spec (every client gets it) or a file mapping client ids to specs, for
clients whose devices differ: CSV (``client,budget`` rows, an optional header, ``#``
comments; UTF-8, with or without the byte-order mark spreadsheets write) or YAML (a mapping
``client id: spec``). A ``default`` entry covers every client
the file does not name; without one the file must name them all. Errors are
:class:`~cafedist.errors.ConfigError` (one line, exit 2) naming the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cafedist.errors import ConfigError
from cafedist.units import clients_phrase, id_list

KINDS = ("macs", "loss")
SLACK = 1e-9  # in budget comparisons, so that e.g. exactly 0.5 of the MACs counts as within macs=0.5
DEFAULT_KEY = "default"
_SPEC_HELP = "macs=F (mean MACs <= F x the last exit's) or loss=P (at most P accuracy points below the last exit)"


@dataclass(frozen=True)
class Budget:
    """One client's budget: ``kind`` "macs" (``value`` = fraction of the last exit's MACs)
    or "loss" (``value`` = accuracy points below the last exit, on a 0-100 scale)."""

    kind: str
    value: float

    @property
    def spec(self) -> str:
        """The spec string this budget parses from (``macs=0.5``)."""
        return f"{self.kind}={self.value:.15g}"  # :g's 6 digits would merge 0.5000001 with 0.5

    def macs_limit(self, last_macs: float) -> float:
        """The largest mean MACs a ``macs`` budget allows, given the last exit's MACs."""
        return self.value * last_macs * (1 + SLACK)

    def holds(self, mean_macs: Any, loss: Any, last_macs: float) -> Any:
        """Whether a mean cost ``mean_macs`` (``macs``) or an accuracy ``loss`` against the last
        exit, as a fraction (``loss``), is within this budget; floats or tensors alike."""
        if self.kind == "macs":
            return mean_macs <= self.macs_limit(last_macs)
        return 100.0 * loss <= self.value + SLACK


def parse_budget_spec(text: str, where: str = "--budget") -> Budget:
    """Parse ``macs=F`` or ``loss=P``; ``where`` prefixes the error (a flag or ``file:line``)."""
    kind, sep, raw = str(text).strip().partition("=")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS:
        raise ConfigError(f"{where}: budget {text!r} not understood; expected {_SPEC_HELP}")
    # a plain decimal number: float() would also take "1_0" (10), "nan" and "inf"
    if not re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", raw.strip()):
        raise ConfigError(f"{where}: budget {text!r}: {raw.strip()!r} is not a number")
    value = float(raw) + 0.0  # -0 -> 0: one budget, one canonical name (Budget.spec would keep the sign)
    # macs is a fraction of the last exit's cost, loss a number of accuracy points: outside
    # these ranges a budget is meaningless (macs=50 probably meant 0.5, loss=0.01 is not 1 point
    # either, but a value there cannot be told from an intended one)
    if kind == "macs" and not 0 < value <= 1:
        raise ConfigError(f"{where}: budget {text!r}: macs is a fraction of the last exit's MACs, "
                          f"expected 0 < F <= 1")
    if kind == "loss" and not 0 <= value <= 100:
        raise ConfigError(f"{where}: budget {text!r}: loss is in accuracy points, expected 0 <= P <= 100")
    return Budget(kind, value)


#: the names a budget file may end in
FILE_SUFFIXES = (".csv", ".yaml", ".yml")


def looks_like_spec(text: str) -> bool:
    """Whether ``--budget``'s argument is a spec rather than a file name (an existing budget
    file named like a spec, ``loss=1.csv``, is the file; a stray file ``macs=0.5`` is not)."""
    kind, sep, _ = text.partition("=")
    path = Path(text)
    return bool(sep) and kind.strip().lower() in KINDS and not (path.suffix.lower() in FILE_SUFFIXES
                                                                  and path.is_file())


# ----------------------------------------------------------------------------- budget files
def _client_key(raw: Any, where: str) -> int | str:
    """A client id (int >= 0) or the ``default`` key."""
    text = str(raw).strip()
    if text.lower() == DEFAULT_KEY:
        return DEFAULT_KEY
    # ASCII digits only: int() would also take "1_0" (10) and other scripts' digits
    if not re.fullmatch(r"-?[0-9]+", text):
        raise ConfigError(f"{where}: client id {text!r} is not an integer (or '{DEFAULT_KEY}')")
    cid = int(text)
    if cid < 0:
        raise ConfigError(f"{where}: client id {cid} must be >= 0")
    return cid


def _add_entry(entries: dict[int | str, Budget], lines: dict[int | str, str], key: int | str,
               spec: Any, where: str) -> None:
    if key in entries:
        raise ConfigError(f"{where}: client {key} is given a budget twice (first at {lines[key]})")
    entries[key] = parse_budget_spec(str(spec), where)
    lines[key] = where


def _read_csv(path: Path, text: str) -> dict[int | str, Budget]:
    entries: dict[int | str, Budget] = {}
    lines: dict[int | str, str] = {}
    reader = csv.reader(io.StringIO(text))
    for row in reader:
        where = f"{path}:{reader.line_num}"
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if not entries and cells[0].lower() == "client":
            continue  # the optional header "client,budget"
        if len(cells) != 2:
            raise ConfigError(f"{where}: expected 2 columns 'client,budget', got {len(cells)}: {','.join(row)!r}")
        _add_entry(entries, lines, _client_key(cells[0], where), cells[1], where)
    return entries


def _read_yaml(path: Path, text: str) -> dict[int | str, Budget]:
    import yaml

    from cafedist import yamlio

    try:
        # compose, not load: nodes keep their line numbers for the error messages
        root = yamlio.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML "
                          f"({getattr(exc, 'problem', None) or exc})") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}:{root.start_mark.line + 1}: expected a mapping 'client id: budget'")
    entries: dict[int | str, Budget] = {}
    lines: dict[int | str, str] = {}
    for key_node, value_node in root.value:
        where = f"{path}:{key_node.start_mark.line + 1}"
        if not isinstance(key_node, yaml.ScalarNode) or not isinstance(value_node, yaml.ScalarNode):
            raise ConfigError(f"{where}: expected 'client id: budget' with a budget such as macs=0.5")
        _add_entry(entries, lines, _client_key(key_node.value, where), value_node.value, where)
    return entries


def load_budget_file(name: str | Path) -> tuple[dict[int | str, Budget], str]:
    """Client id (or ``default``) -> :class:`Budget`, from a ``.csv`` or ``.yaml``/``.yml`` file,
    and the SHA-256 of the bytes they were parsed from (what compare keys kept results by)."""
    if not str(name).strip():
        raise ConfigError(f"--budget: empty; expected a budget spec ({_SPEC_HELP}) or a budget file")
    path = Path(name)
    if path.is_dir():
        raise ConfigError(f"--budget {name}: a directory; expected a budget spec ({_SPEC_HELP}) "
                          f"or a .csv/.yaml budget file")
    if not path.is_file():
        raise ConfigError(f"--budget {name}: neither a budget spec ({_SPEC_HELP}) nor an existing file")
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read budget file ({exc})") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        entries = _read_csv(path, text)
    elif suffix in FILE_SUFFIXES:
        entries = _read_yaml(path, text)
    else:
        raise ConfigError(f"{path}: budget file must end in .csv, .yaml or .yml")
    if not entries:
        raise ConfigError(f"{path}: budget file names no client")
    return entries, hashlib.sha256(raw).hexdigest()


def per_client(entries: dict[int | str, Budget], num_clients: int, arg: str) -> list[Budget]:
    """One :class:`Budget` per client (index = client id) from ``entries`` (client id or
    ``default`` -> Budget, as read from ``--budget``'s argument ``arg``, which errors name)."""
    unknown = sorted(k for k in entries if k != DEFAULT_KEY and int(k) >= num_clients)
    if unknown:
        raise ConfigError(f"{arg}: unknown client ids {id_list(unknown)} (this run has clients 0..{num_clients - 1})")
    default = entries.get(DEFAULT_KEY)
    missing = [cid for cid in range(num_clients) if cid not in entries]
    if missing and default is None:
        raise ConfigError(f"{arg}: no budget for {clients_phrase(missing)} "
                          f"(name them or add a '{DEFAULT_KEY}' entry)")
    return [entries.get(cid, default) for cid in range(num_clients)]  # type: ignore[misc]


def check_feasible(budgets: list[Budget], macs_per_exit: list[int], source: str = "--budget") -> None:
    """Refuse a MACs budget below exit 1's cost: no policy can meet it (every sample pays at
    least exit 1). One message names every such client; ``source`` says where the budgets
    came from (the flag, or the budget file)."""
    if not macs_per_exit or macs_per_exit[-1] <= 0:
        raise ConfigError("cannot apply MACs budgets: the model's last exit has no MAC count")
    floor = macs_per_exit[0] / macs_per_exit[-1]
    low = [cid for cid, b in enumerate(budgets) if b.kind == "macs" and b.value < floor - 1e-12]
    if low:
        smallest = min((budgets[cid] for cid in low), key=lambda b: b.value)
        who = "" if len(low) == len(budgets) else f" for {clients_phrase(low)}"
        raise ConfigError(f"{source}: {smallest.spec}{who} is below exit 1's cost "
                          f"({_above(floor, smallest.value)} of the last exit's MACs): no exit policy can meet it")


def _above(floor: float, value: float) -> str:
    """``floor`` with 4 decimals, or as many more as it takes to print it above ``value``
    (macs=0.2254 against a cost of 0.22544781 must not read "0.2254 is below 0.2254")."""
    digits = 4
    while digits < 17 and round(floor, digits) <= value:
        digits += 1
    return f"{floor:.{digits}f}"


__all__ = ["Budget", "DEFAULT_KEY", "FILE_SUFFIXES", "KINDS", "SLACK", "check_feasible", "load_budget_file",
           "looks_like_spec", "parse_budget_spec", "per_client"]
