"""The generic round loop: the same code for 1 process or many ranks, for every algorithm.

One round on every rank::

    local updates of my clients
      -> proxy logits [k_local, e, P', C]      (the exits the algorithm reads, or all: comm.exits)
      -> gathered to rank 0, reordered by client id
      -> rank 0: algorithm.aggregate_logits     (teacher weights, targets, selection, ...)
      -> scattered: each rank receives only its clients' rows
      -> shared parameters averaged             (algorithms with shared keys)
      -> evaluation (per-exit accuracy), metrics line, checkpoint

Everything random is keyed by (seed, client id, round), collectives return rows in client-id
order, and averaging is done in fixed point, so a run is a function of its config: the same
on 1, 2 or 4 ranks, and the same after a kill and resume.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cafedist.algorithms import get_algorithm
from cafedist.algorithms.base import Algorithm, Setup
from cafedist.config import Config, config_hash, dump_config
from cafedist.data.prepare import ensure_store
from cafedist.data.store import Store
from cafedist.dist.comm import Comm
from cafedist.dist.placement import place_clients
from cafedist.dist.runtime import Runtime, init_runtime, shutdown_runtime
from cafedist.errors import CafeError, CheckpointError, DistError
from cafedist.eval import dynamic_counts, dynamic_table, exit_predictions, mac_reduction_at_loss, per_exit_correct
from cafedist.fsutil import write_json_atomic, write_text_atomic
from cafedist.models import build_model, macs_per_exit
from cafedist.parentwatch import guard_launched_rank
from cafedist.rundir import RunLock, move_aside
from cafedist.rng import generator
from cafedist.train.averaging import flatten, unflatten_into, weighted_sum
from cafedist.train.checkpoint import CheckpointDir, load_torch
from cafedist.train.faults import maybe_fault
from cafedist.train.client import (Client, build_client_model, local_update, make_optimizer, model_hash, proxy_logits,
                                   reset_optimizers)
from cafedist.train.diagnostics import Diagnostics
from cafedist.train.metrics import MetricsLog
from cafedist.train.packed import pack_blocker, packed_local_update
from cafedist.train.preflight import RunDirPlan, check_paths, plan_run_dir
from cafedist.train.progress import Progress
from cafedist.train.signals import StopFlag

log = logging.getLogger("cafedist")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class RunResult:
    """What :func:`train` returns: the last completed round and whether a stop was requested."""

    last_round: int
    stopped: bool
    summary: dict[str, Any] | None


# ----------------------------------------------------------------------------- helpers
def proxy_subset(seed: int, round_idx: int, total: int, size: int) -> Tensor:
    """The proxy items of round ``round_idx`` (sorted indices), identical on every rank."""
    size = min(size, total)
    return torch.randperm(total, generator=generator(seed, "proxy", round_idx))[:size].sort().values


def participating(seed: int, round_idx: int, n: int, per_round: float) -> Tensor:
    """Bool [n]: clients that train in ``round_idx`` (all when ``per_round`` is 1.0)."""
    k = n if per_round == 1.0 else (round(per_round * n) if per_round < 1 else int(per_round))
    k = max(1, min(n, k))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator(seed, "participation", round_idx))[:k]] = True
    return mask


def compile_in_place(model: torch.nn.Module) -> None:
    """``train.compile``: compile a model's forward in place (keeps state_dict keys), or warn."""
    try:
        model.compile()
    except Exception as exc:  # noqa: BLE001 - no compiler toolchain: eager mode still works
        log.warning("train.compile: torch.compile unavailable (%s); running eagerly", type(exc).__name__)


class Trainer:
    """Holds one rank's part of a run: its clients, the algorithm, the collectives."""

    def __init__(self, cfg: Config, run_dir: str | Path, rt: Runtime):
        self.cfg, self.rt = cfg, rt
        self.run_dir = Path(run_dir)
        self.comm = Comm(rt)
        self.hash = config_hash(cfg)
        self.ckpt = CheckpointDir(self.run_dir)
        self.device = rt.device

        store_path = ensure_store(cfg.data.store_path(cfg.seed), dataset=cfg.data.dataset, root=cfg.data.root,
                                  clients=cfg.data.clients, alpha=cfg.data.alpha,
                                  proxy_fraction=cfg.data.proxy_fraction,
                                  test_fraction=cfg.data.test_fraction, min_size=cfg.data.min_size,
                                  seed=cfg.seed, loader_options=cfg.data.options or None,
                                  val_fraction=cfg.data.val_fraction)
        self.store = Store(store_path)
        self.n = self.store.num_clients
        sizes = [tr for tr, _ in self.store.client_sizes()]
        self.placement = place_clients(sizes, rt.world_size)
        self.counts = [len(p) for p in self.placement]
        self.rank_order = torch.tensor([c for p in self.placement for c in p], dtype=torch.int64)
        self.my_ids = self.placement[rt.rank]

        options = dict(cfg.model.options)
        if self.store.kind == "text":
            options.setdefault("vocab_size", self.store.vocab_size)

        def build():
            return build_model(cfg.model.arch, tuple(self.store.input_shape), self.store.num_classes, **options)

        self.build = build
        self.macs = [int(v) for v in macs_per_exit(build(), tuple(self.store.input_shape))]
        algo_cls = get_algorithm(cfg.algorithm.name)
        params = cfg.algorithm_params()
        probe = build()
        self.num_exits = probe.num_exits
        self.proxy_x = self.store.load_proxy(device=self.device) if algo_cls.needs_proxy(params) else None
        self.proxy_size = (min(getattr(params, "proxy_size", self.proxy_x.shape[0]), self.proxy_x.shape[0])
                           if self.proxy_x is not None else 0)
        self.setup = Setup(num_clients=self.n, num_exits=self.num_exits, num_classes=self.store.num_classes,
                           rounds=cfg.train.rounds, train_sizes=tuple(sizes), seed=cfg.seed,
                           local_epochs=cfg.train.local_epochs, proxy_size=self.proxy_size)
        self.algo: Algorithm = algo_cls(params, self.setup)
        self.n_params = sum(p.numel() for p in probe.parameters())
        self.algo.bind_model(probe)
        if self.algo.exchanges_logits:
            self.algo.sent_exits()  # an algorithm breaking the proxy_exits contract fails before round 0
        self.shared_keys, self.shared_masks = self._shared_layout(probe)
        named = dict(probe.named_parameters())  # extra models share the main architecture
        self.shared_length = sum(named[k].numel() for k in self.shared_keys)
        self.clients = [self._make_client(cid) for cid in self.my_ids]
        self.use_packed = self._decide_packing()
        self.diagnostics = Diagnostics.of(cfg.train.diagnostics)  # None (no work) unless train.diagnostics

    def _shared_layout(self, probe) -> tuple[list[str], dict[int, Tensor] | None]:
        """Which parameters are averaged, and each client's flat holding mask (None: all hold all)."""
        named = dict(probe.named_parameters())
        masks: dict[int, list[Tensor]] = {cid: [] for cid in range(self.n)}
        keys, elementwise = [], False
        for key, tensor in named.items():
            per_client = [self.algo.shared_mask(cid, key, tensor.detach()) for cid in range(self.n)]
            if not any(bool(m) if not isinstance(m, Tensor) else bool(m.any()) for m in per_client):
                continue
            keys.append(key)
            for cid, m in enumerate(per_client):
                if isinstance(m, Tensor):
                    elementwise = True
                    masks[cid].append(m.to(torch.bool).reshape(-1))
                else:
                    masks[cid].append(torch.full((tensor.numel(),), bool(m), dtype=torch.bool))
        if not keys:
            return [], None
        flat = {cid: torch.cat(parts) for cid, parts in masks.items()}
        if not elementwise and all(bool(f.all()) for f in flat.values()):
            return keys, None
        return keys, flat

    def _make_client(self, cid: int) -> Client:
        key = "common" if self.algo.common_init else cid
        models = {"main": build_client_model(self.build, self.cfg.seed, key).to(self.device)}
        for name in self.algo.extra_models:
            models[name] = build_client_model(self.build, self.cfg.seed, (key, name)).to(self.device)
        if self.cfg.train.compile:
            for m in models.values():
                compile_in_place(m)
        return Client(cid=cid, models=models,
                      optimizers={k: make_optimizer(m, self.cfg.train) for k, m in models.items()},
                      data=self.store.load_client(cid, device=self.device),
                      state=self.algo.init_client_state(cid))

    # ---------------------------------------------------------------- collectives in client order
    def gather_by_client(self, local: Tensor, transport_dtype=None, to_all: bool = False) -> Tensor | None:
        """Rows of my clients -> [n, ...] in client-id order (rank 0 only unless ``to_all``)."""
        if to_all:
            rows = self.comm.all_gather_rows(local, self.counts, transport_dtype=transport_dtype)
        else:
            rows = self.comm.gather_rows_to_main(local, self.counts, transport_dtype=transport_dtype)
        if rows is None:
            return None
        out = torch.empty_like(rows)
        out[self.rank_order.to(rows.device)] = rows
        return out

    def scatter_by_client(self, rows: dict[str, Tensor] | None,
                          spec: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, Tensor]:
        """Rank 0's [n, ...] payloads (client-id order) -> this rank's rows, in my client order."""
        out = {}
        for key, (shape, dtype) in spec.items():
            src = rows[key][self.rank_order.to(rows[key].device)].to(self.device) if rows is not None else None
            out[key] = self.comm.scatter_rows(src, self.counts, shape_dtype=(tuple(shape), dtype))
        return out

    # ---------------------------------------------------------------- one round
    def run_round(self, rnd: int) -> dict[str, Any]:
        cfg, algo = self.cfg, self.algo
        self.comm.context = f"round {rnd}"
        timers = {"t_local": 0.0, "t_comm": 0.0, "t_aggregate": 0.0, "t_eval": 0.0}
        t_start = time.perf_counter()
        active = participating(cfg.seed, rnd, self.n, cfg.train.clients_per_round)

        # 1. local updates (a fresh local optimizer under train.optimizer_state: reset)
        maybe_fault("local", rnd, self.rt.rank)
        if cfg.train.optimizer_state == "reset":
            for c in self.clients:
                reset_optimizers(c)
        t = time.perf_counter()
        losses = self._local_updates(rnd, active)
        timers["t_local"] = time.perf_counter() - t
        n_students = sum(int(algo.students(c.state)[:-1].sum()) for c in self.clients if active[c.cid])
        # train.diagnostics: read-only measurements of the models just trained (rank 0 gets the entries)
        diag = self.diagnostics.after_local(self, rnd, active) if self.diagnostics else {}

        report: dict[str, Any] = {}
        bytes_up = bytes_down = 0
        # 2-4. exchange (proxy logits and/or other rows), aggregate on rank 0, return each client its rows
        if algo.uses_exchange():
            local: dict[str, Tensor] = {}
            wire = _DTYPES[cfg.comm.logits_dtype]
            if algo.exchanges_logits:
                idx = proxy_subset(cfg.seed, rnd, self.proxy_x.shape[0], self.proxy_size).to(self.device)
                xp = self.proxy_x[idx]
                exits = algo.sent_exits(every_exit=cfg.comm.exits == "all")
                local["logits"] = torch.stack([proxy_logits(algo.eval_model(c.view), xp, amp=cfg.train.amp)[exits]
                                               for c in self.clients])  # [k, e, P', C]
            uploads = [algo.upload(c.view) for c in self.clients]
            for key in algo.upload_spec():
                local[key] = torch.stack([u[key] for u in uploads]).to(self.device)
            t = time.perf_counter()
            gathered = {}
            for key, rows in local.items():
                dtype = wire if key == "logits" and wire != torch.float32 else None
                gathered[key] = self.gather_by_client(rows, transport_dtype=dtype)
            timers["t_comm"] += time.perf_counter() - t
            up, down = self.exchange_bytes()
            bytes_up += up
            bytes_down += down
            payload = None
            if self.rt.is_main:
                t = time.perf_counter()
                payload, report = algo.aggregate(rnd, gathered, active.to(self.device))
                timers["t_aggregate"] = time.perf_counter() - t
            spec = algo.payload_spec()
            t = time.perf_counter()
            mine = self.scatter_by_client(payload, spec)
            timers["t_comm"] += time.perf_counter() - t
            for j, c in enumerate(self.clients):
                if active[c.cid]:
                    algo.receive(c.view, {k: v[j] for k, v in mine.items()}, rnd)

        # 5. shared parameters (FedAvg-style), sample-weighted over holders, deterministic on any world size
        if self.shared_keys:
            t = time.perf_counter()
            up, down = self._average_shared(active)
            timers["t_comm"] += time.perf_counter() - t
            bytes_up += up
            bytes_down += down

        # 5b. training after aggregation (e.g. fine-tuning personal heads)
        for c in self.clients:
            post = algo.post_phases(c.view, rnd)
            if post:
                local_update(c, algo, cfg.train, rnd, cfg.seed, phases=post)

        # 6. evaluation: per-client stats gathered in client order, identical on every rank
        record: dict[str, Any] = {"round": rnd}
        last = rnd == cfg.train.rounds - 1
        t = time.perf_counter()
        stats = self._client_stats(losses, evaluate=(rnd % cfg.train.eval_every == cfg.train.eval_every - 1) or last)
        timers["t_eval"] = time.perf_counter() - t
        wire_bytes = self._wire_bytes()
        if stats is not None:
            loss, n_test, correct = stats[:, 0], stats[:, 1], stats[:, 2:]
            trained = ~torch.isnan(loss)
            w = torch.tensor(self.setup.train_sizes, dtype=torch.float64)[trained]
            record["loss"] = float((loss[trained] * w).sum() / w.sum()) if trained.any() else None
            if not torch.isnan(correct).any():
                record["acc_per_exit"] = (correct.sum(0) / n_test.sum()).tolist()
                if self.store.has_val:  # validation: only where the store has the split
                    record["val_acc_per_exit"] = self._val_accuracy(to_all=True)[0]
        record.update({
            "n_students": self._sum_int(n_students),
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "wire_bytes": wire_bytes,
            "clients_trained": int(active.sum()),
        })
        record.update({k: v for k, v in report.items()})
        record.update(diag)
        record.update({k: round(v, 6) for k, v in timers.items()})
        record["seconds"] = round(time.perf_counter() - t_start, 6)
        return record

    def _targets_subset(self, c: Client) -> Tensor | None:
        """The proxy subset a client's current targets were computed on (None: no targets)."""
        if "targets_round" not in c.state or self.proxy_x is None:
            return None
        return proxy_subset(self.cfg.seed, int(c.state["targets_round"]), self.proxy_x.shape[0],
                            self.proxy_size).to(self.device)

    def _local_updates(self, rnd: int, active: Tensor) -> list[float]:
        """Local training of my active clients (packed when ``train.packed`` says so); NaN for idle ones."""
        cfg, algo = self.cfg, self.algo
        mine = [c for c in self.clients if active[c.cid]]
        losses: dict[int, float] = {}
        if mine and self.use_packed:
            trained = packed_local_update(mine, algo, cfg.train, rnd, cfg.seed, self.proxy_x,
                                          [self._targets_subset(c) for c in mine])
            losses = {c.cid: loss for c, loss in zip(mine, trained)}
        else:
            for c in mine:
                losses[c.cid] = local_update(c, algo, cfg.train, rnd, cfg.seed, self.proxy_x, self._targets_subset(c))
        return [losses.get(c.cid, float("nan")) for c in self.clients]

    def _decide_packing(self) -> bool:
        """``train.packed``: auto packs on CUDA only (on CPU a vmapped grouped convolution is
        slower than separate ones, docs/PERFORMANCE.md); on packs wherever possible."""
        mode = self.cfg.train.packed
        if mode == "off" or len(self.clients) < 2:
            return False
        reason = pack_blocker(self.clients, self.algo, self.cfg.train)
        if reason is not None:
            if mode == "on" and self.rt.is_main:
                log.warning("train.packed=on: clients are trained one after another (%s)", reason)
            return False
        return mode == "on" or self.device.type == "cuda"

    def exchange_bytes(self) -> tuple[int, int]:
        """Bytes one client sends and receives per round in the coordinator exchange: proxy
        logits of the sent exits in ``comm.logits_dtype`` plus the algorithm's upload rows, up;
        its payload rows, down (0, 0 for algorithms without an exchange)."""
        algo = self.algo
        if not algo.uses_exchange():
            return 0, 0
        up = 0
        if algo.exchanges_logits:
            exits = algo.sent_exits(every_exit=self.cfg.comm.exits == "all")
            up += len(exits) * self.proxy_size * self.setup.num_classes * _DTYPES[self.cfg.comm.logits_dtype].itemsize
        up += sum(int(torch.Size(shape).numel()) * dtype.itemsize for shape, dtype in algo.upload_spec().values())
        down = sum(int(torch.Size(shape).numel()) * dtype.itemsize for shape, dtype in algo.payload_spec().values())
        return up, down

    def shared_bytes(self, active: Tensor) -> tuple[int, int]:
        """Bytes one client sends and receives for the averaged parameters (float32): what it
        holds, averaged over the clients that trained, up; what it is given, averaged over all
        clients, down (everything under ``non_holders_receive``, e.g. DepthFL's global model)."""
        if not self.shared_keys:
            return 0, 0
        length, masks = self.shared_length, self.shared_masks
        if masks is None:
            return length * 4, length * 4
        trained = [cid for cid in range(self.n) if active[cid]] or list(range(self.n))
        up = sum(int(masks[cid].sum()) for cid in trained) / len(trained)
        receive_all = self.algo.non_holders_receive
        down = length if receive_all else sum(int(masks[cid].sum()) for cid in range(self.n)) / self.n
        return round(4 * up), round(4 * down)

    def _average_shared(self, active: Tensor) -> tuple[int, int]:
        """Replace shared parameters of my clients by the weighted average over active holders;
        returns :meth:`shared_bytes`."""
        keys, masks = self.shared_keys, self.shared_masks
        w = self.setup.data_weights * active.to(torch.float64)
        length = self.shared_length
        # denominators: every rank knows every client's weight and mask (client-id order)
        if masks is None:
            den = torch.full((length,), float(w.sum()), dtype=torch.float64)
        else:
            den = torch.zeros(length, dtype=torch.float64)
            for cid in range(self.n):
                if w[cid] > 0:
                    den += masks[cid].to(torch.float64) * w[cid]
        den = den.to(self.device)
        vectors, weights = [], []
        for c in self.clients:
            if active[c.cid]:
                sd = c.models[self.algo.shared_model].state_dict()
                vectors.append(flatten([sd[k] for k in keys]))
                m = masks[c.cid].to(self.device) if masks is not None else None
                weights.append(float(w[c.cid]) if m is None else m.to(torch.float64) * float(w[c.cid]))
        total = weighted_sum(vectors, weights, self.comm.all_reduce_sum_, length, self.device)
        held = den > 0
        avg = torch.where(held, total / torch.where(held, den, torch.ones_like(den)), torch.zeros_like(den))
        receive_all = masks is None or self.algo.non_holders_receive
        for c in self.clients:  # idle clients too: they download the current average
            sd = c.models[self.algo.shared_model].state_dict()
            where = held if receive_all else held & masks[c.cid].to(self.device)
            unflatten_into(avg, [sd[k] for k in keys], where=where)
        return self.shared_bytes(active)

    def _client_stats(self, losses: list[float], evaluate: bool) -> Tensor | None:
        """[n, 2 + m] float64 rows (loss, n_test, correct per exit) in client order, on every rank."""
        m = self.num_exits
        rows = []
        for c, loss in zip(self.clients, losses):
            if evaluate:
                pred, _ = exit_predictions(self.algo.eval_model(c.view), c.data.x_test)
                correct = per_exit_correct(pred, c.data.y_test).to(torch.float64).cpu()
            else:
                correct = torch.full((m,), float("nan"), dtype=torch.float64)
            rows.append(torch.cat([torch.tensor([loss, c.n_test], dtype=torch.float64), correct]))
        local = torch.stack(rows).to(self.device)
        return self.gather_by_client(local, to_all=True).cpu()

    # ---------------------------------------------------------------- validation split (data.val_fraction)
    def _val_accuracy(self, to_all: bool) -> tuple[list[float], list[list[float] | None]] | None:
        """Validation accuracy per exit (pooled over clients, weighted by their validation
        sizes, like ``acc_per_exit``) and per client (None for a client without validation
        samples); None on ranks other than 0 unless ``to_all``. Every rank must call it."""
        m = self.num_exits
        rows = []
        for c in self.clients:
            n_val = int(c.data.y_val.shape[0])
            correct = torch.zeros(m, dtype=torch.float64)
            if n_val:
                pred, _ = exit_predictions(self.algo.eval_model(c.view), c.data.x_val)
                correct = per_exit_correct(pred, c.data.y_val).to(torch.float64).cpu()
            rows.append(torch.cat([torch.tensor([n_val], dtype=torch.float64), correct]))
        allrows = self.gather_by_client(torch.stack(rows).to(self.device), to_all=to_all)
        if allrows is None:
            return None
        n_val, correct = allrows[:, 0].cpu(), allrows[:, 1:].cpu()
        pooled = (correct.sum(0) / max(float(n_val.sum()), 1.0)).tolist()
        per_client = [(correct[i] / n_val[i]).tolist() if n_val[i] > 0 else None for i in range(self.n)]
        return pooled, per_client

    def _sum_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self.comm.all_reduce_sum_(t)
        return int(t.item())

    def _wire_bytes(self) -> int:
        """Bytes this round put on the wire, summed over ranks (0 on one rank)."""
        sent = self.comm.reset_counters().get("bytes_sent", 0)
        t = torch.tensor([sent], dtype=torch.int64, device=self.device)
        self.comm.all_reduce_sum_(t)
        self.comm.reset_counters()  # the reduction's own bytes are bookkeeping, not training traffic
        return int(t.item())

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, rnd: int) -> None:
        """All ranks: write my clients' shards; rank 0 commits the checkpoint."""
        if self.rt.is_main:
            self.ckpt.begin(rnd)
        self.comm.barrier()
        files = {}
        for c in self.clients:
            shard = {"models": {k: m.state_dict() for k, m in c.models.items()},
                     "optimizers": {k: o.state_dict() for k, o in c.optimizers.items()},
                     "algo": dict(c.state), "cid": c.cid}
            name, digest = self.ckpt.write_client(rnd, c.cid, shard)
            files[name] = digest
        every = self.comm.all_gather_object(files)
        maybe_fault("checkpoint", rnd, self.rt.rank)
        if self.rt.is_main:
            merged = {k: v for part in every for k, v in part.items()}
            server = {"round": rnd, "algo": self.algo.server_state(), "config_hash": self.hash}
            self.ckpt.commit(rnd, server, merged, world_size=self.rt.world_size, config_hash=self.hash,
                             keep=self.cfg.checkpoint.keep)
        self.comm.barrier()

    def load_checkpoint(self) -> int:
        """Resume from the newest valid checkpoint; returns the next round to run (0 if none)."""
        ref, problem = None, None
        if self.rt.is_main:  # rank 0 decides; a refusal reaches every rank (none is left waiting)
            ref = self.ckpt.newest_valid()
            if ref is None and self.ckpt.candidates():
                problem = (f"{self.ckpt.root}: no checkpoint verifies, so this run cannot be resumed "
                           f"(use --resume none to move it aside and start over)")
            elif ref is not None and ref.manifest.get("config_hash") not in (None, self.hash) \
                    and self._resume_mode != "force":
                problem = f"{ref.path}: written by a different config (use --resume force to continue anyway)"
        path, problem = self.comm.broadcast_object((None if ref is None else str(ref.path), problem))
        if problem:
            raise CheckpointError(problem)
        if path is None:
            return 0
        path = Path(path)
        try:  # a checkpoint of another model or algorithm (--resume force): one line, not a traceback
            for c in self.clients:
                shard = load_torch(path / f"client_{c.cid:05d}.pt")
                for k, m in c.models.items():
                    m.load_state_dict(shard["models"][k])
                for k, o in c.optimizers.items():
                    o.load_state_dict(shard["optimizers"][k])
                c.state = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in shard["algo"].items()}
            server = load_torch(path / "server.pt")
            self.algo.load_server_state(server.get("algo", {}))
            done = int(server["round"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
            reason = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]  # load_state_dict's first problem
            reason = reason if len(reason) <= 200 else reason[:197] + "..."
            raise CheckpointError(f"{path}: does not fit the model/algorithm of this config ({reason})") from None
        self.loaded_from = path
        if self.rt.is_main:
            log.info("resumed from %s (round %d, written by %d ranks, now %d)", path, done,
                     json.loads((path / "MANIFEST.json").read_text())["world_size"], self.rt.world_size)
        return done + 1

    _resume_mode = "auto"
    loaded_from: Path | None = None  # the checkpoint load_checkpoint restored

    # ---------------------------------------------------------------- the final summary
    def summary(self, records: list[dict[str, Any]], wall: float) -> dict[str, Any] | None:
        """Final accuracy per exit and client, dynamic inference, bytes, hashes (rank 0 returns it)."""
        m = self.num_exits
        rows = []
        for c in self.clients:
            pred, conf = exit_predictions(self.algo.eval_model(c.view), c.data.x_test)
            counts = dynamic_counts(pred.cpu(), conf.cpu(), c.data.y_test.cpu(), self.macs)
            correct = per_exit_correct(pred, c.data.y_test).to(torch.float64).cpu()
            rows.append(torch.cat([torch.tensor([c.n_test], dtype=torch.float64), correct,
                                   counts["correct"].to(torch.float64), counts["macs"].to(torch.float64),
                                   counts["exits"].to(torch.float64).reshape(-1)]))
        allrows = self.gather_by_client(torch.stack(rows).to(self.device), to_all=False)
        hashes = self.comm.all_gather_object({c.cid: model_hash(c.model) for c in self.clients})
        val = self._val_accuracy(to_all=False) if self.store.has_val else None
        if not self.rt.is_main:
            return None
        allrows = allrows.cpu()
        n_test = allrows[:, 0]
        correct = allrows[:, 1:1 + m]
        nth = (allrows.shape[1] - 1 - m) // (2 + m)
        o = 1 + m
        dyn = {"correct": allrows[:, o:o + nth].sum(0).round().to(torch.int64),
               "macs": allrows[:, o + nth:o + 2 * nth].sum(0),
               "exits": allrows[:, o + 2 * nth:].reshape(self.n, nth, m).sum(0).round().to(torch.int64),
               "n": n_test.sum().round().to(torch.int64)}
        table = dynamic_table(dyn, self.macs)
        acc = (correct.sum(0) / n_test.sum()).tolist()
        merged_hashes = {k: v for part in hashes for k, v in part.items()}
        per_client_bytes = records[-1]["bytes_up"] + records[-1]["bytes_down"] if records else 0
        fedavg_bytes = 2 * self.n_params * 4
        val_fields = {"val_acc_per_exit": val[0], "val_acc_per_client": val[1]} if val is not None else {}
        return {
            "algorithm": self.cfg.algorithm.name,
            "rounds": self.cfg.train.rounds,
            "num_clients": self.n,
            "world_size": self.rt.world_size,
            "acc_per_exit": acc,
            "acc_per_client": [(correct[i] / n_test[i]).tolist() for i in range(self.n)],
            **val_fields,
            "macs_per_exit": self.macs,
            "dynamic": table,
            "mac_reduction_at_1pt": mac_reduction_at_loss(table, acc[-1], 0.01),
            "bytes_per_client_per_round": per_client_bytes,
            "fedavg_bytes_per_client_per_round": fedavg_bytes,
            "ratio_to_fedavg": per_client_bytes / fedavg_bytes,
            "n_params": self.n_params,
            "model_hashes": {str(k): merged_hashes[k] for k in sorted(merged_hashes)},
            "config_hash": self.hash,
            "wall_seconds": round(wall, 3),
        }


# ----------------------------------------------------------------------------- entry point
def prepare_run_dir(cfg: Config, run_dir: Path, resume: str) -> bool:
    """Rank 0, with the run's lock held and every input validated: carry out the run-directory plan.

    Moves an earlier run aside (``--resume none``) and writes ``config.yaml``, except under
    ``--resume force`` onto a different config: then the old ``config.yaml`` stays until the
    first new round is checkpointed. Returns whether that write is still due.
    """
    plan = plan_run_dir(cfg, run_dir, resume)  # again, under the lock: the directory may have changed
    if plan is RunDirPlan.ASIDE:
        moved = move_aside(run_dir)
        log.warning("--resume none: moved the previous run in %s to %s", run_dir, moved)
    if plan is RunDirPlan.DEFER:
        log.warning("--resume force: %s/config.yaml keeps the old config until the first new checkpoint", run_dir)
        return True
    write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
    return False


def train(cfg: Config, run_dir: str | Path, resume: str = "auto", rt: Runtime | None = None,
          progress: bool = True) -> RunResult:
    """Run (or resume) a training run; every rank calls this. Returns on every rank."""
    if resume not in ("auto", "none", "force"):
        raise CheckpointError(f"--resume: expected auto, none or force, got {resume!r}")
    own_rt = rt is None
    watch = guard_launched_rank()  # under torchrun/srun/mpiexec: die with the launcher, write nothing more
    try:
        rt = rt or init_runtime(cfg.dist.backend, cfg.dist.device, cfg.dist.timeout_s)
        stop = StopFlag().install()
        try:
            result = _train(cfg, Path(run_dir), resume, rt, stop, progress)
        finally:
            stop.uninstall()
    finally:
        if watch is not None:
            watch.stop()
    # only a healthy group is torn down: destroying one whose peer died can hang or abort
    if own_rt:
        shutdown_runtime(rt)
    return result


def _agree(comm: Comm, error: str | None) -> None:
    """Every rank raises if any rank hit a (user-facing) error at start-up."""
    errors = [e for e in comm.all_gather_object(error) if e]
    if errors:
        raise CafeError(errors[0])


def _agreed(comm: Comm, step: Any) -> Any:
    """Run ``step()`` on this rank; if it raised a user-facing error on any rank, raise it on every rank."""
    result, err = None, None
    try:
        result = step()
    except CafeError as exc:
        err = str(exc)
    _agree(comm, err)
    return result


def _train(cfg: Config, run_dir: Path, resume: str, rt: Runtime, stop: StopFlag, progress: bool) -> RunResult:
    comm = Comm(rt)
    h = config_hash(cfg)
    hashes = comm.all_gather_object(h)
    if len(set(hashes)) > 1:
        bad = [r for r, x in enumerate(hashes) if x != hashes[0]]
        raise DistError(f"config differs between ranks: rank(s) {bad} disagree with rank 0 "
                        f"(same config file and overrides on every rank?)")
    lock = RunLock(run_dir) if rt.is_main else None

    def check_run_dir() -> None:  # read-only
        if rt.is_main:
            check_paths(cfg, run_dir)
            plan_run_dir(cfg, run_dir, resume)

    def take_run_dir() -> bool:  # the first write: only once every check has passed
        if not rt.is_main:
            return False
        lock.acquire()
        return prepare_run_dir(cfg, run_dir, resume)

    # validate everything before the run directory is touched: paths and what the directory
    # holds (rank 0), then store, model and algorithm (every rank, building the trainer)
    _agreed(comm, check_run_dir)
    trainer = _agreed(comm, lambda: Trainer(cfg, run_dir, rt))
    metrics = None
    try:
        config_due = _agreed(comm, take_run_dir)
        trainer._resume_mode = resume
        start = _agreed(comm, trainer.load_checkpoint) if resume != "none" else 0
        metrics = MetricsLog(run_dir, tensorboard=rt.is_main) if rt.is_main else None
        if metrics is not None:
            metrics.truncate_after(start - 1)
        bar = Progress(cfg.train.rounds, start=start, enabled=progress and rt.is_main)
        t0 = time.perf_counter()
        last_done = start - 1
        stopped = False
        for rnd in range(start, cfg.train.rounds):
            record = trainer.run_round(rnd)
            last_done = rnd
            record["world_size"] = rt.world_size
            record["clients_per_rank"] = trainer.counts
            if metrics is not None:
                metrics.append(record)
            acc = record.get("acc_per_exit")
            bar.update(rnd + 1, f"last-exit acc {acc[-1]:.3f}" if acc else "")
            want_stop = trainer._sum_int(1 if stop.requested else 0) > 0
            every = cfg.checkpoint.every
            if want_stop or rnd == cfg.train.rounds - 1 or (every and (rnd + 1) % every == 0):
                trainer.save_checkpoint(rnd)
                if config_due:  # --resume force: the new config now has a checkpoint of its own
                    write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
                    config_due = False
            if want_stop and rnd < cfg.train.rounds - 1:
                stopped = True
                if rt.is_main:
                    log.warning("stop signal received: checkpoint of round %d written, exiting for requeue", rnd)
                break
        summary = None
        if not stopped:
            records = metrics.read() if metrics is not None else []
            summary = trainer.summary(records, time.perf_counter() - t0)
            if summary is not None:
                write_json_atomic(run_dir / "summary.json", summary)
        return RunResult(last_round=last_done, stopped=stopped, summary=summary)
    finally:
        if metrics is not None:
            metrics.close()
        trainer.store.close()
        if lock is not None:
            lock.release()
