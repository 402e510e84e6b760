"""Federated algorithms behind one small interface (see :mod:`cafedist.algorithms.base`).

Adding an algorithm means adding one module here that defines a subclass of
:class:`~cafedist.algorithms.base.Algorithm` with a ``name``: the registry discovers every
module of this package and registers each such class under its name.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import typing

from cafedist.algorithms.base import Algorithm, ClientView, LocalBatch, Phase, Setup
from cafedist.errors import ConfigError

#: what an algorithm's name may be: it is a config key (``algorithm.NAME.field=...``, split at
#: dots), an entry of ``compare --algorithms a,b`` and a folder name (``runs/NAME/seed0``)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
#: names taken elsewhere: the algorithm section's selector key, compare's "every algorithm"
RESERVED_NAMES = ("name", "all")


def check_algorithm(cls: type[Algorithm]) -> None:
    """Refuse, at registration, an algorithm class the loop could not run or the config could not
    build, with one ``RuntimeError`` naming the class and what to change (rather than a deep
    traceback at start-up or in a round):

    * ``name`` fits :data:`NAME_PATTERN` and is not one of :data:`RESERVED_NAMES`;
    * ``Params`` is a dataclass whose annotations resolve, whose every field has a default
      (the config builds it from the keys given, ``docs/ALGORITHMS.md`` from none) and whose
      defaults pass its own ``checks()``;
    * ``cohort_exchange`` comes with an ``aggregate_cohort``;
    * a :class:`~cafedist.algorithms.logit_exchange.LogitExchange` has a ``proxy_size``
      parameter (unless it overrides ``proxy_size`` itself).
    """
    from cafedist.algorithms.logit_exchange import LogitExchange

    where = f"algorithm {cls.name!r} ({cls.__module__}.{cls.__qualname__})"
    if not NAME_PATTERN.fullmatch(cls.name) or cls.name in RESERVED_NAMES:
        raise RuntimeError(f"{where}: name must be letters, digits, '-' or '_' (no dots: it is the config key "
                           f"algorithm.NAME.*), starting with a letter or digit, and not "
                           f"{' or '.join(map(repr, RESERVED_NAMES))}")
    params = cls.Params
    if not (isinstance(params, type) and dataclasses.is_dataclass(params)):
        raise RuntimeError(f"{where}: Params must be a dataclass (NoParams when there are none), got {params!r}")
    try:
        typing.get_type_hints(params)
    except Exception as exc:  # noqa: BLE001 - any unresolvable annotation: the config cannot check values
        raise RuntimeError(f"{where}: the annotations of {params.__qualname__} do not resolve ({exc}): "
                           f"the config checks values against them") from None
    missing = [f.name for f in dataclasses.fields(params)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RuntimeError(f"{where}: {params.__qualname__}.{missing[0]} needs a default (every parameter "
                           f"has one: a config may set none of them)")
    defaults = params()
    for field_name, ok, expected in defaults.checks() if hasattr(defaults, "checks") else ():
        if not ok:
            raise RuntimeError(f"{where}: the default {field_name}={getattr(defaults, field_name)!r} fails "
                               f"its own check (must be {expected})")
    if cls.cohort_exchange and cls.aggregate_cohort is Algorithm.aggregate_cohort:
        raise RuntimeError(f"{where}: cohort_exchange is set but aggregate_cohort is not implemented")
    # getattr: an override as a staticmethod (which works) has no __func__
    if (issubclass(cls, LogitExchange)
            and getattr(cls.proxy_size, "__func__", None) is LogitExchange.proxy_size.__func__
            and "proxy_size" not in {f.name for f in dataclasses.fields(params)}):
        raise RuntimeError(f"{where}: a LogitExchange's Params needs a proxy_size field (P' proxy items "
                           f"per round)")


def _discover() -> dict[str, type[Algorithm]]:
    found: dict[str, type[Algorithm]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Algorithm) and obj.name and obj.__module__ == module.__name__:
                if obj.name in found and found[obj.name] is not obj:
                    raise RuntimeError(f"two algorithms named {obj.name!r}: {found[obj.name]} and {obj}")
                check_algorithm(obj)
                found[obj.name] = obj
    return dict(sorted(found.items()))


ALGORITHMS: dict[str, type[Algorithm]] = _discover()


def get_algorithm(name: str, field_name: str = "algorithm.name") -> type[Algorithm]:
    """Look up an algorithm class by name, with a clear error listing the choices."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(f"{field_name}: unknown algorithm {name!r} "
                          f"(choices: {', '.join(ALGORITHMS)})") from None


__all__ = ["ALGORITHMS", "Algorithm", "ClientView", "LocalBatch", "Phase", "Setup", "check_algorithm", "get_algorithm"]


RECIPES = '''## Adding an algorithm

Add one module under `cafedist/algorithms/` with a subclass that has a `name`: the registry finds
it. `cafedist/algorithms/base.py` declares every hook and attribute the loop reads, with its
default. Two recipes (`tests/test_algorithm_recipes.py` runs both, copied from this page):

**A logit-exchanging method** starts from `LogitExchange` (`Params` needs a `proxy_size`): say
which exits the coordinator reads, whether a phase draws proxy batches, the loss, the payload
and the aggregation; keep what a client receives with `keep_targets`, and the loop draws its
proxy batches from the subset those targets were computed on.

```python
from dataclasses import dataclass

import torch

from cafedist.algorithms.common import exits_ce
from cafedist.algorithms.logit_exchange import LogitExchange
from cafedist.algorithms.proxy_math import kd_loss


@dataclass
class MeanTeacherParams:
    proxy_size: int = 200  # P' proxy items per round
    tau: float = 2.0


class MeanTeacher(LogitExchange):
    """Every exit distils from the mean last-exit distribution of last round's clients."""

    name = "mean-teacher"
    Params = MeanTeacherParams
    vmappable_loss = True  # local_loss reads only the batch's tensors: packed training may vmap it

    def proxy_exits(self):
        return (self.setup.num_exits - 1,)

    def uses_proxy_batch(self, client, phase):
        return "targets" in client.state

    def local_loss(self, state, batch):
        loss = exits_ce(batch.logits, batch.y)
        if batch.proxy_logits is not None:
            teacher = state["targets"][batch.proxy_pos]
            loss = loss + sum(kd_loss(z, teacher, self.params.tau) for z in batch.proxy_logits)
        return loss

    def payload_spec(self):
        return {"targets": ((self.setup.proxy_size, self.setup.num_classes), torch.float32)}

    def aggregate(self, round_idx, gathered, active):
        probs = torch.softmax(gathered["logits"][:, -1].double() / self.params.tau, dim=-1)
        mean = probs[active].mean(0).float()
        return {"targets": mean.expand(probs.shape[0], -1, -1).clone()}, {}

    def receive(self, client, payload, round_idx):
        self.keep_targets(client.state, payload["targets"], round_idx)
```

**A parameter-sharing method** says, per client and parameter, what is averaged
(`shared_mask`: `True`, `False` or an element mask); the loop averages it sample-weighted over
the clients that trained, in fixed point, and hands every holder the average.

```python
from cafedist.algorithms.base import Algorithm
from cafedist.algorithms.common import is_head


class SharedHeads(Algorithm):
    """Personal bodies, exit heads averaged over all clients."""

    name = "shared-heads"
    common_init = True  # averaged parameters start equal

    def shared_mask(self, cid, key, tensor):
        return is_head(key)
```

**A composite predictor.** A client answers with `eval_model(client)` (default: its `"main"`
network). An override must return a module that maps inputs to the list of per-exit logits,
and, for `cafedist export`, has `exit_stages()`: one module per exit, mapping block k−1's output
to `(block k's output, exit k's logits)`, that together compute what `forward` does
(`EarlyExitNet.exit_stages` is the plain case, FedRoD's `GenericPlusPersonal.exit_stages` adds its
personal classifier; `tests/test_export.py` checks that one against its `forward`). Without it
export refuses that algorithm's runs in one line.

### What the loop relies on

A run must be the same on 1, 2 or 4 ranks, with clients parked (`train.resident_clients`) and
after a kill and resume. That holds for an algorithm that keeps these rules; the ones marked
*checked* fail in one line naming the algorithm, the others are what
`tests/test_algorithm_contract.py` tests on every registered algorithm (with
`tests/test_algorithms_torchrun.py`: two ranks equal one).

- **Registration** (*checked* on import, `check_algorithm`): `name` is letters, digits, `-`,
  `_` (it is the config key `algorithm.NAME.*`), not `name` or `all`; `Params` is a dataclass
  whose every field has a default that passes its own `checks()`; `cohort_exchange` comes with
  `aggregate_cohort`; a `LogitExchange` has a `proxy_size` parameter. `compare` refuses a
  `name` that one of its ablations of CAFEDistill has (`cafedistill-nokd`, `cafedistill-nosel`).
- **Order in a round** (`cafedist/train/round.py`), each client hook on the client's own rank:
  for each client that trains, `on_local_start`, `local_phases`, the phases' steps
  (`uses_proxy_batch`, `local_loss`), then `trained_exits`; the exchange: `upload` of every
  client (only those that trained under `cohort_exchange`; mask idle rows with `active`),
  `aggregate` on rank 0 only, `receive` on each client that trained; the average of the
  `shared_mask` parameters; `post_phases` of every client; evaluation through `eval_model`.
  Packed training (`vmappable_loss`: on a GPU, or `train.packed: on`) calls `on_local_start`
  and `local_phases` for a whole wave of clients before any of them steps.
- **State.** What changes during a run and belongs to a client lives in its models or in
  `client.state` (tensors only): that is what checkpoints, parking and re-placement carry. The
  algorithm object exists once per rank: besides what every rank derives alike from `Setup`,
  `Params` and `bind_model`, it may hold only coordinator state set in `aggregate` (rank 0) and
  carried over a resume by `server_state`/`load_server_state` (every rank loads rank 0's). A
  client's state may change in `on_local_start`, `local_phases`, `receive`, and in
  `post_phases` when it returns phases. The queries (`upload`, `eval_model`, `trained_exits`,
  `uses_proxy_batch`, `targets_round`, `local_loss`) and a `post_phases` returning `[]` must
  not change it: `upload`, `eval_model` and `post_phases` also see clients the loop does not
  mark changed, so a change there is lost when the client is parked and missing from the next
  checkpoint. Keep every key `init_client_state` returns (a resume takes a shard without one
  for another algorithm's).
- **Randomness.** The loop's draws (shuffling, proxy batches, dropout) are keyed by (seed,
  client id, round, phase name). A hook that draws uses a keyed stream too:
  `cafedist.rng.generator(self.setup.seed, "purpose", cid, round_idx)`, never the global or
  Python's `random` state, which differ between ranks and after a resume.
- **Phases** (*checked*): the phases of one call have distinct names (the name keys the
  streams: two alike draw the same batches; give post phases names other than the round's local
  phases too), and `Phase.model` is `"main"` or one of `extra_models`. Post phases draw no proxy
  batches, are not preceded by `on_local_start`, and their loss is not in the round's `loss`;
  `round_idx` counts from 0, so "after the last round" is `round_idx == self.setup.rounds - 1`.
- **The total** (*checked* by `tests/test_train_resume.py`): an algorithm that reads
  `self.setup.rounds` (a final phase, a schedule over the run) answers `rounds_dependence`:
  `--resume force` onto another `train.rounds` warns with what it says the trained rounds did
  by the old total.
- **Packed training** (`vmappable_loss = True`): `local_loss` runs under `torch.func.vmap`
  with `batch.module` a stand-in whose attributes, calls and iteration raise (*checked*: using
  it fails naming the flag); no `.item()` or branching on tensor values: its control flow may
  depend only on what packing groups clients by (whether a proxy batch is drawn,
  `trained_exits`, the state's keys, the batch size).
- **Exchange rows** (*checked*): `upload` returns `upload_spec`'s keys with exactly those row
  shapes and dtypes; `aggregate` returns every `payload_spec` key as `[n, *row]` (`[k, *row]`
  from `aggregate_cohort`) in the spec's dtype.
- **Afterwards**: regenerate this page (see `reference_markdown`; `tests/test_configs.py`
  fails while it is stale) and run `tests/test_algorithm_contract.py`,
  `tests/test_algorithms_torchrun.py` and `tests/test_compare.py`, which pick the new
  algorithm up by itself.
'''


def reference_markdown() -> str:
    """``docs/ALGORITHMS.md``: every registered algorithm, its source line and parameters.

    Generated from the code (module docstrings and ``Params`` dataclasses), so it cannot drift;
    ``tests/test_configs.py`` checks the file is current. Regenerate with
    ``python -c "from cafedist.algorithms import reference_markdown as r; print(r(), end='')" > docs/ALGORITHMS.md``.
    """
    import dataclasses
    import sys

    lines = ["# Algorithms", "",
             "Every algorithm runs on the same early-exit models, store, launchers, checkpoints and metrics.",
             "Select one with `algorithm.name=NAME`; its parameters live in `algorithm.NAME.*`.",
             "The module docstring of each (`cafedist/algorithms/<module>.py`) gives the source, the",
             "reference defaults and every deviation. *(Generated from the code.)*", "",
             *RECIPES.splitlines(), ""]
    for name, cls in ALGORITHMS.items():
        module = sys.modules[cls.__module__]
        title = (module.__doc__ or cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        lines += [f"## `{name}`", "", f"{title} (`{cls.__module__.replace('.', '/')}.py`)", ""]
        fields = dataclasses.fields(cls.Params) if dataclasses.is_dataclass(cls.Params) else ()
        if not fields:
            lines += ["No parameters.", ""]
            continue
        lines += ["| parameter | default |", "|---|---|"]
        defaults = cls.Params()
        for f in fields:
            lines.append(f"| `{f.name}` | `{getattr(defaults, f.name)!r}` |")
        lines.append("")
    return "\n".join(lines)
