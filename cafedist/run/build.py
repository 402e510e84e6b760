"""Building one rank's part of a run from its config: the one way train, dry-run and eval do it.

config -> store (prepared when missing, or opened read-only) -> placement of clients on ranks
-> model factory and costs -> algorithm with its :class:`~cafedist.algorithms.base.Setup`
-> this rank's clients (a :class:`~cafedist.run.residency.ClientPool`: on the device, or at
most ``train.resident_clients`` at a time with the others parked in host memory or on disk).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from cafedist.algorithms import get_algorithm
from cafedist.algorithms.base import Algorithm, Setup
from cafedist.config import Config
from cafedist.data.prepare import open_ensured_store, open_matching_store, partition_params
from cafedist.data.spec import PartitionSpec
from cafedist.data.store import ClientData, Store
from cafedist.distributed.placement import place_clients
from cafedist.distributed.runtime import Runtime
from cafedist.errors import DataError
from cafedist.models import build_model, macs_per_exit
from cafedist.run.client import Client, build_client_model, compile_in_place, make_optimizer
from cafedist.run.residency import STATE_DIR, ClientPool
from cafedist.run.sharing import SharedParams


@dataclass
class Run:
    """One rank's part of a run: what every command that trains or evaluates it starts from."""

    cfg: Config
    rt: Runtime
    store: Store
    placement: list[list[int]]  # client ids per rank
    algo: Algorithm
    setup: Setup
    build: Callable[[], nn.Module]  # an untrained instance of the run's architecture
    probe: nn.Module  # one such instance, for parameter names and shapes
    macs: list[int]  # MACs per sample to reach each exit
    proxy_x: Tensor | None  # the proxy inputs on the device (algorithms that exchange logits)
    pool: ClientPool  # this rank's clients, in placement order
    shared: SharedParams  # the averaged parameters (and the newest average, for parked clients)

    @property
    def n(self) -> int:
        """Number of clients."""
        return self.setup.num_clients

    @property
    def num_exits(self) -> int:
        """Exits of every client's model (m)."""
        return self.setup.num_exits

    @property
    def proxy_size(self) -> int:
        """Samples in the shared public proxy set."""
        return self.setup.proxy_size

    @property
    def n_test(self) -> list[int]:
        """Test samples per client, by client id (store metadata: no client is materialized)."""
        return [te for _, te in self.store.client_sizes()]

    @property
    def n_params(self) -> int:
        """Parameters of one client's model (all clients share the architecture)."""
        return sum(p.numel() for p in self.probe.parameters())

    @property
    def device(self) -> torch.device:
        """This rank's device (its GPU, or the CPU)."""
        return self.rt.device


def open_store(cfg: Config, prepare: bool = True, check_source: bool = True) -> Store:
    """The config's store: prepared first when missing (``prepare``; a store reused is checked
    against the source files under ``data.root`` when ``check_source``), else opened read-only."""
    path = cfg.data.store_path(cfg.seed)
    spec = PartitionSpec.of(cfg.data, cfg.seed)
    if prepare:
        return open_ensured_store(path, spec, cfg.data.root, check_source)
    # a store replaced by another partition under the same name would give wrong numbers
    store = open_matching_store(path, partition_params(spec)) if path.is_file() else None
    if store is None:
        # a relative data.cache_dir/store is relative to where train ran, not to the run directory
        where = "" if path.is_absolute() else (f" (a relative path, here {path.absolute()}: run from the "
                                               f"directory train ran in)")
        raise DataError(f"{path}: the run's data store is missing{where} (`cafedist train` or `cafedist prepare` "
                        f"builds it from the run's config)")
    return store


def build_run(cfg: Config, rt: Runtime, prepare_store: bool = True, run_dir: Path | None = None) -> Run:
    """This rank's part of the run of ``cfg`` (see the module docstring); the caller closes
    it (:func:`close_run`). Nothing stays open when building fails. ``run_dir`` holds the
    parked clients of ``train.client_state: disk`` (a temporary directory without it)."""
    # one rank checks the source files: every rank would read them all and warn alike (train
    # refuses ranks whose stores hold other data than rank 0's: startup.check_ranks_share_data)
    store = open_store(cfg, prepare_store, check_source=rt.is_main)
    try:
        return _build(cfg, rt, store, run_dir)
    except BaseException:
        store.close()
        raise


def close_run(run: Run) -> None:
    """Release what a run holds open: the prefetch thread and the store."""
    run.pool.close()
    run.store.close()


def model_factory(cfg: Config, store: Store) -> Callable[[], nn.Module]:
    """A function building an untrained instance of the config's architecture for ``store``'s
    inputs and classes (and vocabulary, for text)."""
    options = dict(cfg.model.options)
    if store.kind == "text":
        options.setdefault("vocab_size", store.vocab_size)

    def build() -> nn.Module:
        return build_model(cfg.model.arch, tuple(store.input_shape), store.num_classes, **options)

    return build


def exit_macs(cfg: Config, store: Store, build: Callable[[], nn.Module] | None = None) -> list[int]:
    """MACs per sample to reach each exit of the config's model on ``store``'s inputs."""
    model = (build or model_factory(cfg, store))()
    return [int(v) for v in macs_per_exit(model, tuple(store.input_shape))]


def _build(cfg: Config, rt: Runtime, store: Store, run_dir: Path | None) -> Run:
    sizes = [tr for tr, _ in store.client_sizes()]
    placement = place_clients(sizes, rt.world_size)
    build = model_factory(cfg, store)
    macs = exit_macs(cfg, store, build)
    algo_cls = get_algorithm(cfg.algorithm.name)
    params = cfg.algorithm_params()
    probe = build()
    proxy_x = store.load_proxy(device=rt.device) if algo_cls.needs_proxy(params) else None
    setup = Setup(num_clients=store.num_clients, num_exits=probe.num_exits, num_classes=store.num_classes,
                  rounds=cfg.train.rounds, train_sizes=tuple(sizes), seed=cfg.seed,
                  local_epochs=cfg.train.local_epochs,
                  proxy_size=algo_cls.proxy_size(params, proxy_x.shape[0]) if proxy_x is not None else 0,
                  label_counts=(tuple(tuple(int(v) for v in row) for row in store.label_histograms())
                                if algo_cls.uses_label_counts else ()))
    algo = algo_cls(params, setup)
    algo.bind_model(probe)
    if algo.exchanges_logits:
        algo.sent_exits()  # an algorithm breaking the proxy_exits contract fails before round 0
    shared = SharedParams.of(algo, probe)  # before the pool: nothing may fail once it runs a thread
    state_dir, scratch = None, None
    if cfg.train.client_state == "disk":
        # without a run directory (eval, compare --budget) a temporary folder, the pool's to remove
        scratch = None if run_dir is not None else Path(tempfile.mkdtemp(prefix="cafedist-clients-"))
        state_dir = (run_dir or scratch) / STATE_DIR / f"rank{rt.rank:05d}"
    try:
        pool = ClientPool(placement[rt.rank], lambda cid, data: _make_client(cfg, algo, build, data, rt.device, cid),
                          # normalised on the CPU, then moved, in every configuration: CUDA computes x / 255
                          # as x * (1/255), so normalising on the GPU only when all clients stay resident
                          # would make a resident_clients bound change the bits
                          lambda cid: store.load_client(cid, device="cpu"),
                          rt.device, bound=cfg.train.resident_clients, where=cfg.train.client_state,
                          state_dir=state_dir, scratch_dir=scratch)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    pool.on_load = shared.catch_up  # a materialized client gets the averages it missed while parked
    return Run(cfg=cfg, rt=rt, store=store, placement=placement, algo=algo, setup=setup, build=build, probe=probe,
               macs=macs, proxy_x=proxy_x, pool=pool, shared=shared)


def _make_client(cfg: Config, algo: Algorithm, build: Callable[[], nn.Module], data: ClientData,
                 device: torch.device, cid: int) -> Client:
    """A client at its initial weights (keyed by seed and client id, or common), on ``device``."""
    key = "common" if algo.common_init else cid
    models = {"main": build_client_model(build, cfg.seed, key).to(device)}
    for name in algo.extra_models:
        models[name] = build_client_model(build, cfg.seed, (key, name)).to(device)
    if cfg.train.compile:
        for m in models.values():
            compile_in_place(m)
    return Client(cid=cid, models=models,
                  optimizers={k: make_optimizer(m, cfg.train) for k, m in models.items()},
                  data=data,
                  state=algo.init_client_state(cid))
