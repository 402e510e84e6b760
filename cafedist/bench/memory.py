"""``bench memory``: peak memory and round time against the number of clients and the residency bound.

Two sweeps, each run a real ``cafedist train`` in a child process whose peak resident set
(``ru_maxrss`` from ``wait4``) is read when it exits:

* ``clients``: the *synthetic* dataset (labelled as such: generated users, no accuracy
  meaning; :mod:`cafedist.data.synthetic`) through the normal store, one client per user,
  100 clients per round, 3 rounds, ``train.resident_clients: 16``, ``train.client_state:
  disk``, CAFEDistill with a small CNN; n = 100, 1,000, 10,000 (``--quick``: 100, 1,000).
  Memory should follow the cohort and the bound, not n: the last row is
  ``rss_ratio_<n>_vs_100``.
* ``bound``: the quick-start model and data (mnist5k, 40 clients so that a bound of 16
  matters, every client every round) all-resident vs at most 16 (and 4) resident, parked in
  host memory or on disk: seconds per round relative to all-resident and whether the final
  model hashes are identical.

Stores are prepared before the timed children start (their cost is not the run's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cafedist import yamlio
from cafedist.childenv import child_env
from cafedist.config import config_from_dict
from cafedist.errors import CafeError
from cafedist.run.build import open_store

COHORT = 100


def synthetic_config(clients: int, cache_dir: str, rounds: int = 3) -> dict[str, Any]:
    """``clients`` synthetic users as clients (+100 proxy users), 100 per round, at most 16 resident, on disk."""
    return {
        "seed": 0,
        "data": {"dataset": "synthetic", "partition": "natural", "clients": clients, "proxy_users": 100,
                 "min_size": 4, "cache_dir": cache_dir, "options": {"users": clients + 100, "samples_per_user": 16}},
        "model": {"arch": "cnn", "options": {"width": 8}},
        "train": {"rounds": rounds, "local_epochs": 1, "batch_size": 32, "proxy_batch_size": 32,
                  "clients_per_round": min(COHORT, clients), "eval_every": rounds, "resident_clients": 16,
                  "client_state": "disk"},
        "algorithm": {"name": "cafedistill", "cafedistill": {"proxy_size": 500}},
        "checkpoint": {"every": 0, "keep": 1},
    }


#: the quick-start config of a checkout (a package installed without its checkout has none)
QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def quickstart_config(cache_dir: str, rounds: int = 3, path: Path = QUICKSTART) -> dict[str, Any]:
    """The quick-start model and data (configs/quickstart.yaml) with 40 clients, every one every round."""
    if not path.is_file():
        # the defaults instead would be another model, still labelled the quick-start one
        raise CafeError(f"bench memory: {path} is missing; the bound sweep measures the quick-start model of a "
                        f"cafedist checkout (run it from one)")
    raw = yamlio.load(path.read_text())
    raw.setdefault("data", {}).update(clients=40, cache_dir=cache_dir)
    raw.setdefault("train", {}).update(rounds=rounds, eval_every=rounds, clients_per_round=1.0)
    raw["checkpoint"] = {"every": 0, "keep": 1}
    return raw


def train_child(raw: dict[str, Any], out: Path, threads: int, timeout: float = 1800) -> dict[str, Any]:
    """Train ``raw`` in a child process; its peak RSS (MiB), wall seconds and round records."""
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out.parent / f"{out.name}.yaml"
    cfg_path.write_text(yamlio.dump(raw))
    env = child_env(OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "cafedist", "train", "--config", str(cfg_path), "--out", str(out),
           "--resume", "none", "--no-progress"]
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while True:  # wait4: this child's own peak RSS (RUSAGE_CHILDREN would mix children)
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    raise CafeError(f"bench memory: training {out.name} took over {timeout:.0f} s")
                time.sleep(0.05)
        except BaseException:
            # a timeout, Ctrl-C, SIGTERM or SIGUSR1 (a KeyboardInterrupt here): the child is no
            # launcher's rank and does not watch its parent, so left alone it went on training
            # after the bench had ended, in the temporary folder the bench removes
            proc.kill()
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (out.parent / f"{out.name}.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise CafeError(f"bench memory: training {out.name} failed (exit {proc.returncode}): {tail[0]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"rss_mb": usage.ru_maxrss / 1024.0, "wall_s": time.perf_counter() - t0, "records": records,
            "hashes": summary["model_hashes"], "device_mb": summary.get("peak_device_mb")}


def _prepare(raw: dict[str, Any]) -> None:
    open_store(config_from_dict(raw)).close()


def _round_s(records: list[dict]) -> float:
    """Mean seconds of the training rounds, without the evaluation of the last one."""
    return sum(r["seconds"] - r.get("t_eval", 0.0) for r in records) / len(records)


def bench_memory(quick: bool = False, threads: int = 1, workdir: str | Path | None = None,
                 sizes: tuple[int, ...] | None = None,
                 bounds: tuple[tuple[int | None, str], ...] | None = None) -> list[dict[str, Any]]:
    """The two sweeps of the module docstring; one row per run plus the ratio rows.
    ``sizes``: client counts of the first sweep; ``bounds``: (resident bound or None for all,
    client_state) of the second, the first of them the reference (empty: no second sweep)."""
    sizes = sizes or ((100, 1000) if quick else (100, 1000, 10000))
    if bounds is None:
        bounds = ((None, "host"), (16, "host"), (16, "disk")) + (() if quick else ((4, "disk"),))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cafedist-memory-") as tmp:
        base = Path(workdir) if workdir else Path(tmp)
        stores = str(base / "stores")
        by_n = {}
        for n in sizes:
            raw = synthetic_config(n, stores)
            _prepare(raw)
            got = train_child(raw, base / f"clients{n}", threads)
            by_n[n] = got
            rows.append({"benchmark": "memory", "sweep": "clients (synthetic data)", "clients": n,
                         "per_round": min(COHORT, n), "resident": 16, "state": "disk",
                         "rss_mb": round(got["rss_mb"], 1), "device_mb": got["device_mb"],
                         "round_s": round(_round_s(got["records"]), 3),
                         "final_eval_s": round(got["records"][-1].get("t_eval", 0.0), 2),
                         "wall_s": round(got["wall_s"], 1)})
        small, big = min(by_n), max(by_n)
        if big != small:
            rows.append({"benchmark": "memory", "sweep": "clients (synthetic data)",
                         f"rss_ratio_{big}_vs_{small}": round(by_n[big]["rss_mb"] / by_n[small]["rss_mb"], 3)})
        raw = quickstart_config(stores)
        if bounds:
            _prepare(raw)
        ref = None
        for bound, state in bounds:
            variant = dict(raw, train=dict(raw["train"], resident_clients=bound, client_state=state))
            got = train_child(variant, base / f"bound{bound}-{state}", threads)
            ref = ref or got
            rows.append({"benchmark": "memory", "sweep": "bound (quick-start model, 40 clients)",
                         "resident": bound or "all", "state": state if bound else "-",
                         "rss_mb": round(got["rss_mb"], 1), "round_s": round(_round_s(got["records"]), 3),
                         "round_ratio_vs_all": round(_round_s(got["records"]) / _round_s(ref["records"]), 3),
                         "identical": got["hashes"] == ref["hashes"]})
    return rows
