"""``cafedist train --dry-run``: what a run would do on N ranks, without training.

Before queueing a multi-node job it is worth knowing how the clients will be spread over the
ranks, how big the model is, what a round puts on the wire and whether the clients of a rank
can be trained packed on a GPU. The plan builds rank 0's part of the run exactly as training
would (:func:`~cafedist.run.build.build_run` with a simulated runtime: same store, same
placement, same algorithm), prints those facts and stops. It prepares the data store if it is
missing, as training would, but writes nothing into the run directory and starts no process
group.
"""

from __future__ import annotations

import torch

from cafedist.config import Config
from cafedist.distributed.runtime import Runtime
from cafedist.run.build import Run, build_run, close_run
from cafedist.train.exchange import exchange_bytes
from cafedist.train.packed import pack_blocker
from cafedist.train.schedule import participating
from cafedist.units import short_count


def _ids(ids: list[int], shown: int = 8) -> str:
    text = ", ".join(map(str, ids[:shown]))
    return text + (f", ... (+{len(ids) - shown})" if len(ids) > shown else "")


def _rank0_of(world_size: int) -> Runtime:
    """Rank 0 of ``world_size`` ranks, simulated on the CPU: no process group is started."""
    return Runtime(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"), backend=None,
                   launcher="dry-run")


def describe_plan(cfg: Config, world_size: int, run_dir: str = "runs/dry-run") -> str:
    """A human-readable plan of ``cfg`` on ``world_size`` ranks (rank 0's view; no training)."""
    if world_size < 1:
        raise ValueError(f"--world-size: expected an integer >= 1, got {world_size}")
    tr = build_run(cfg, _rank0_of(world_size))
    try:
        return _describe(tr, cfg, world_size)
    finally:
        close_run(tr)


def check_buildable(cfg: Config, prepare_store: bool = True) -> bool:
    """What ``train`` checks of ``cfg`` before it touches a run directory, the directory aside:
    the data paths (:func:`~cafedist.train.preflight.check_data_paths`), then the store, model
    and algorithm, by building a rank's part of the run as train and the dry run build it
    (closed at once; nothing trains). The store is prepared when missing, as train would;
    without ``prepare_store`` (``compare --submit``) a missing store ends the check at once:
    the model needs the data's shape, and the paths are those of the machines that will build
    it. Returns whether the run was built. A bad config raises a CafeError."""
    from cafedist.train.preflight import check_data_paths

    if not prepare_store and not cfg.data.store_path(cfg.seed).is_file():
        # its jobs build it where they run: a node-local data.cache_dir need not exist here
        return False
    check_data_paths(cfg)
    # one client per simulated rank: rank 0 builds one client as training builds each of its
    # own, rather than all of them (every model of a large run would be held at once)
    close_run(build_run(cfg, _rank0_of(cfg.data.clients), prepare_store=prepare_store))
    return True


def _describe(tr: Run, cfg: Config, world_size: int) -> str:
    sizes = list(tr.setup.train_sizes)
    first_round = participating(cfg.seed, 0, tr.n, cfg.train.clients_per_round)
    ex_up, ex_down = exchange_bytes(tr)
    sh_up, sh_down = tr.shared.bytes_per_client(first_round)  # holders: round 0's
    up, down = ex_up + sh_up, ex_down + sh_down
    fedavg = 8 * tr.n_params
    lines = [
        f"data:       {cfg.data.dataset}, {tr.n} clients, {sum(sizes)} train samples "
        f"(per client {min(sizes)}..{max(sizes)}), store {tr.store.path}",
        f"model:      {cfg.model.arch}, {tr.num_exits} exits, {tr.n_params:,} parameters, "
        f"MACs per sample at each exit {' / '.join(short_count(m, '.3g') for m in tr.macs)}",
        f"algorithm:  {tr.algo.name}, {cfg.train.rounds} rounds, {int(first_round.sum())} of {tr.n} clients per round",
    ]
    if tr.algo.exchanges_logits:
        exits = tr.algo.sent_exits(every_exit=cfg.comm.exits == "all")
        lines.append(f"exchange:   proxy logits of exit(s) {', '.join(str(e + 1) for e in exits)} "
                     f"(comm.exits: {cfg.comm.exits}) on P' = {tr.proxy_size} items, {cfg.comm.logits_dtype}")
    lines.append(f"per client and round: {short_count(up, '.3g')}B up, {short_count(down, '.3g')}B down "
                 f"({(up + down) / fedavg:.4f} of FedAvg's {short_count(fedavg, '.3g')}B)")
    sample = tr.pool.sample()
    blocker = pack_blocker(sample, tr.algo, cfg.train) if len(sample) > 1 else "one client per rank"
    # the CPU differs from a GPU only under auto, and only where packing is possible at all
    cpu = "too" if blocker is not None or cfg.train.packed == "on" else "sequential unless train.packed: on"
    lines.append(f"packing:    {cfg.train.packed}: on a GPU rank 0's clients would "
                 + ("be stepped together" if blocker is None and cfg.train.packed != "off"
                    else f"be trained one after another ({blocker or 'train.packed: off'})")
                 + f"; on CPU {cpu}")
    load = [sum(sizes[c] for c in ids) for ids in tr.placement]
    mean = sum(load) / len(load)
    lines += ["", f"placement on {world_size} rank(s) (largest clients first onto the least loaded rank):",
              f"{'rank':>4}  {'clients':>7}  {'train samples':>13}  ids"]
    lines += [f"{r:>4}  {len(ids):>7}  {load[r]:>13}  {_ids(ids)}" for r, ids in enumerate(tr.placement)]
    lines.append(f"load imbalance (busiest rank / mean): {max(load) / mean:.3f}")
    return "\n".join(lines)
