"""Train many runs in one torchrun launch: ``torchrun ... tests/torchrun_variants.py PLAN.json``.

Every rank joins the process group once (:func:`init_runtime`, as ``cafedist train`` does) and
then calls :func:`cafedist.train.loop.train` for each run of the plan in turn, so a test module
pays torchrun's and torch's start-up once instead of once per run. ``PLAN.json`` is a list of
``{"key", "config", "overrides", "out"}``; each rank writes ``<out>.rank<r>.json``,
``{"error": None | "<traceback>"}``, after each run. A run that raises is recorded and the next
one starts, as long as the ranks are still in step (a check after every run); when they are
not, the launch ends and the runs left have no status file (their tests launch their own).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch.distributed as dist

from cafedist import lifecycle
from cafedist.config import load_config
from cafedist.distributed.runtime import Runtime, init_runtime, shutdown_runtime
from cafedist.fsutil import write_json_atomic
from cafedist.train.loop import train


def status_path(out: str | Path, rank: int) -> Path:
    """Where rank ``rank`` records how the run into ``out`` went."""
    return Path(f"{out}.rank{rank}.json")


def _train_one(run: dict[str, Any], rt: Runtime) -> str | None:
    """Train one run of the plan; None, or the traceback of what went wrong on this rank."""
    try:
        result = train(load_config(run["config"], run["overrides"]), run["out"], rt=rt, progress=False)
        if result.stopped or (rt.is_main and result.summary is None):
            return f"train returned {result} (expected a finished run with a summary on rank 0)"
        return None
    except Exception:  # noqa: BLE001 - recorded for the run's test; the next run still starts
        return traceback.format_exc()


def _in_step(index: int, key: str, world_size: int) -> bool:
    """Whether every rank has finished run ``index`` and the group still works: a rank that
    failed alone may have left its peer in a collective, matching later messages wrongly."""
    seen: list[Any] = [None] * world_size
    try:
        dist.all_gather_object(seen, (index, key))
    except Exception:  # noqa: BLE001 - a broken group: the launch ends
        return False
    return all(s == (index, key) for s in seen)


def main(plan_file: str) -> int:
    """Train the plan's runs on this rank; 0 when the ranks stayed in step to the end."""
    plan = json.loads(Path(plan_file).read_text())
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.WARNING, format=f"[driver r{rank}] %(levelname)s %(message)s")
    # the group is left as the CLI leaves it (os._exit, no teardown): gloo's threads can abort
    # a process whose group is destroyed at exit
    lifecycle.EXIT_WITHOUT_TEARDOWN = True
    first = load_config(plan[0]["config"], plan[0]["overrides"]).dist  # every run shares these
    rt = init_runtime(first.backend, first.device, first.timeout_s, names="dist.")
    for index, run in enumerate(plan):
        error = _train_one(run, rt)
        write_json_atomic(status_path(run["out"], rt.rank), {"key": run["key"], "error": error})
        if not _in_step(index, run["key"], rt.world_size):
            print(f"ranks out of step after {run['key']}: the runs left are not trained", file=sys.stderr)
            return 1
    shutdown_runtime(rt)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
