"""``cafedist eval RUN_DIR``: re-evaluate a run's final models in one process.

Reads the resolved ``config.yaml``, opens the run's store read-only, builds the clients and
loads them from the newest verified checkpoint (:mod:`cafedist.run`), then writes
``eval.json`` (per-exit and per-client accuracy, dynamic inference over thresholds 0..1 with
mean MACs, the MAC reduction within the accuracy budget) and ``accuracy_vs_macs.png``; when
the run recorded ``train.diagnostics: [conflict]``, also ``conflict.png`` (conflict over rounds);
with ``--budget`` also per-client exit policies within budgets, the budget's table and figure in
``budget/`` and as ``budget.csv``, ``budget.png``; eval.json keeps the budgets evaluated earlier
for the same models (:mod:`cafedist.eval.budget_keep`).

The report names the round and checkpoint it evaluated. When that is not the run's final
round (an unfinished run, or a final checkpoint that no longer verifies) the evaluation is
refused unless ``allow_partial``, and marked ``"partial": true``: its numbers are not the
run's result. Evaluating a run while it trains is allowed: eval does not take the run's lock,
but its outputs lock (:data:`cafedist.rundir.OUTPUTS_LOCK_NAME`) from the models loaded to its
outputs written — a second eval waits, ``--resume none`` cannot move the run aside meanwhile,
and temporary files of a killed eval are removed — and it refuses to write when the run was
started over between loading and the lock (its results would describe models moved aside).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from cafedist import provenance
from cafedist.config import Config, config_hash, read_run_config, run_identity
from cafedist.distributed.client_rows import ClientRows
from cafedist.distributed.comm import Comm
from cafedist.distributed.runtime import Runtime, deterministic_cuda, resolve_device
from cafedist.errors import CafeError, CheckpointError, ConfigError
from cafedist.eval.budget_keep import BUDGET_FOLDER, budget_files_of, budget_name, kept_budgets
from cafedist.eval.budget_run import (
    BUDGET_OUTPUTS,
    BudgetOptions,
    check_not_an_output,
    current_paths,
    resolve_run_budgets,
    run_budget,
)
from cafedist.eval.clients import final_evaluation
from cafedist.eval.dynamic import dynamic_table, mac_reduction_at_loss
from cafedist.eval.plots import plot_accuracy_vs_macs, plot_conflict
from cafedist.fsutil import remove_stale_temps, remove_together, replaced_together, write_json_atomic
from cafedist.run.build import build_run, close_run
from cafedist.run.checkpoint import CheckpointDir, load_checkpoint
from cafedist.run.metrics import read_rounds
from cafedist.rundir import live_holder, outputs_lock, unfinished_move
from cafedist.typed import is_finite_number

log = logging.getLogger("cafedist")


def check_max_loss(max_loss: Any) -> float:
    """``--max-loss`` is an accuracy loss: a finite number in [0, 1]."""
    if not is_finite_number(max_loss) or not 0 <= max_loss <= 1:
        raise ConfigError(f"--max-loss: expected an accuracy loss in [0, 1] (0.01 = 1 point), got {max_loss!r}")
    return float(max_loss)


@dataclass
class LoadedRun:
    """A run directory's final models, loaded for evaluation: the built run
    (:class:`~cafedist.run.build.Run`, store open read-only, ``run.cfg`` its config), the
    restored checkpoint, the round it holds and the run's final round."""

    run: Any
    restored: Any
    done: int
    final: int
    incarnation: int | None = None  # inode of RUN/checkpoints when loaded: --resume none makes another


def _incarnation(run_dir: Path) -> int | None:
    """Which run a run directory holds now: its ``checkpoints`` folder (pruning keeps it;
    ``--resume none`` moves it aside and the new run makes another)."""
    try:
        return (run_dir / "checkpoints").stat().st_ino
    except OSError:
        return None


#: the files eval writes beside eval.json (and a temporary name's suffix for each)
_EVAL_OUTPUTS = {"eval.json": "", "accuracy_vs_macs.png": ".png", "conflict.png": ".png", "budget.csv": "",
                 "budget.png": ".png"}


@contextmanager
def writing_outputs(run_dir: str | Path, loaded: LoadedRun, outputs: dict[str, str]) -> Iterator[None]:
    """Hold the run's outputs lock (waiting for another eval) while writing ``outputs`` (file
    name -> temporary suffix) about ``loaded``'s models: temporary files a killed writer left
    are removed, and a run started over since it was loaded is refused."""
    run_dir = Path(run_dir)
    lock = outputs_lock(run_dir).acquire(wait=True)
    try:
        # a --resume none killed while moving the run aside leaves checkpoints/ (the incarnation) in
        # place: writing then would split the old run's outputs across two previous-* folders
        if _incarnation(run_dir) != loaded.incarnation or unfinished_move(run_dir) is not None:
            raise CheckpointError(f"{run_dir}: the run was started over (--resume none) while its models were "
                                  f"read; nothing written (the results would describe the models moved aside): "
                                  f"evaluate again")
        for name, suffix in outputs.items():
            remove_stale_temps(run_dir / name, suffix)
        yield
    finally:
        lock.release()


def _with_store_found(cfg: Config, run_dir: Path) -> Config:
    """``cfg`` reading its store where training left it: a relative ``data.cache_dir`` or
    ``data.store`` is relative to the directory train ran in, so from elsewhere the store is
    found through the absolute path its newest checkpoint records (``data.store`` is not part
    of the run's identity; the store is still checked against the config's partition)."""
    path = cfg.data.store_path(cfg.seed)
    recorded = None if path.is_file() else CheckpointDir(run_dir).recorded_store()
    if recorded is None or not recorded.is_file():
        return cfg
    log.info("the run's store is not at %s from here; using %s, where training wrote it", path, recorded)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, store=str(recorded)))


def run_config_file(run_dir: Path) -> Path:
    """``run_dir``'s config.yaml, or a CheckpointError when ``run_dir`` is not a run directory
    (nor is either half of a run a kill left partway through being moved aside)."""
    moving = unfinished_move(run_dir)
    if moving is not None:
        raise CheckpointError(moving)
    cfg_file = run_dir / "config.yaml"
    if cfg_file.exists() and not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: not a file (a run directory's config.yaml is the config train wrote)")
    if not cfg_file.is_file():
        raise CheckpointError(f"{run_dir}: not a run directory "
                              f"(no config.yaml; expected the --out of `cafedist train`)")
    return cfg_file


def check_writable(run_dir: Path) -> None:
    """eval writes its outputs into the run directory: one it cannot write (an archived run,
    someone else's, a read-only mount) is refused before the models are loaded and evaluated,
    which takes minutes on a large run, rather than when the first file is written."""
    if os.access(run_dir, os.W_OK | os.X_OK):
        return
    try:
        why = "a read-only file system" if os.statvfs(run_dir).f_flag & os.ST_RDONLY else "permission denied"
    except OSError:
        why = "permission denied"
    raise ConfigError(f"{run_dir}: cannot write into the run directory ({why}); cafedist eval writes eval.json "
                      f"and its figures there, so it needs a run directory it may write")


@contextmanager
def load_run(run_dir: str | Path, device: str = "cpu", allow_partial: bool = False,
             check: Callable[[Any], object] | None = None) -> Iterator[LoadedRun]:
    """Build ``run_dir``'s clients and load them from its newest verified checkpoint; the
    store is closed on exit. Raises CheckpointError when that checkpoint is not the run's
    final round, unless ``allow_partial``. ``check`` (optional) is called with the built run
    before any checkpoint is read: a request the run cannot serve fails before loading."""
    run_dir = Path(run_dir)
    cfg_file = run_config_file(run_dir)
    try:
        cfg = read_run_config(cfg_file)
    except CafeError as exc:
        raise CheckpointError(f"{cfg_file}: not a usable run config ({exc})") from None
    cfg = _with_store_found(cfg, run_dir)
    dev = resolve_device(device, name="--device")
    if dev.type == "cuda":
        deterministic_cuda()
        torch.cuda.set_device(dev)
    rt = Runtime(rank=0, world_size=1, local_rank=0, device=dev, backend=None, launcher="single")
    run = build_run(cfg, rt, prepare_store=False)
    try:
        if check is not None:
            check(run)
        incarnation = _incarnation(run_dir)  # before loading: what is loaded is this run's or later's
        restored = load_checkpoint(CheckpointDir(run_dir), Comm(rt), run.pool, run.algo, run.shared,
                                   config_hash=config_hash(cfg), resume="force",
                                   evaluating=run_identity(cfg), store=run.store)
        done, final = restored.next_round - 1, cfg.train.rounds - 1
        if done < 0 and (run_dir / "summary.json").is_file():  # a finished run: its checkpoints went
            raise CheckpointError(f"{run_dir}: the run finished (summary.json) but has no checkpoint to evaluate "
                                  f"in {run_dir / 'checkpoints'}: they were moved or deleted (eval needs the "
                                  f"final one)")
        if done < 0:
            first = min(cfg.checkpoint.every or cfg.train.rounds, cfg.train.rounds)
            raise CheckpointError(f"{run_dir}: no checkpoint yet to evaluate (a run writes its first after {first} "
                                  f"round(s) or when stopped; if it is training, try again then)")
        if done != final and not allow_partial:
            # a run training now: `cafedist train` to finish it would be refused (the run's lock)
            holder = live_holder(run_dir)
            partial = f"pass --allow-partial to evaluate round {done} anyway"
            why = (f"it is training now ({holder}): evaluate it once it has finished, or {partial}" if holder else
                   f"the run is unfinished or its last checkpoint is corrupt (finish it with `cafedist train`, "
                   f"or {partial})")
            raise CheckpointError(f"{run_dir}: the newest valid checkpoint is round {done} "
                                  f"({restored.path.name}), not the final round {final}: {why}")
        yield LoadedRun(run, restored, done, final, incarnation)
    finally:
        close_run(run)


def evaluate_run(run_dir: str | Path, max_loss: float = 0.01, device: str = "cpu",
                 allow_partial: bool = False, budget: BudgetOptions | None = None) -> dict[str, Any]:
    """Evaluate the newest checkpoint of ``run_dir``; returns the report written to eval.json.

    Raises CheckpointError before writing anything when that checkpoint is not the run's
    final round, unless ``allow_partial``. With ``budget`` (``--budget``) the report also gets
    a ``budget`` section: every client's exit policy chosen within its budget on its
    calibration split, checked on test (:mod:`cafedist.eval.budget_run`; also writes its
    table and figure), and every report keeps the earlier budgets of the same models
    (``budgets``, :mod:`cafedist.eval.budget_keep`).
    """
    max_loss = check_max_loss(max_loss)
    run_dir = Path(run_dir)
    run_config_file(run_dir)  # a mistyped RUN is "not a run directory", not "cannot write"
    check_writable(run_dir)
    # a budget the run cannot serve is refused before its checkpoint is loaded
    if budget is not None:
        check_not_an_output(run_dir, budget)
    check = None if budget is None else (lambda built: resolve_run_budgets(built, run_dir, budget))
    # eval.json lists the files beside it: all are replaced (and stale ones removed) at the end
    # or, on a failure or Ctrl-C anywhere before, none is; eval.json first, so a kill amid the
    # renames leaves no file it does not list; the outputs lock is held until they are done
    with ExitStack() as outputs_lock, replaced_together(first=run_dir / "eval.json"):
        report = _evaluate(run_dir, max_loss, device, allow_partial, budget, check, outputs_lock)
    return report


def _evaluate(run_dir: Path, max_loss: float, device: str, allow_partial: bool, budget: BudgetOptions | None,
              check: Callable[[Any], object] | None, outputs_lock: ExitStack) -> dict[str, Any]:
    """:func:`evaluate_run`'s work: load, evaluate, write eval.json and its figures (taking the
    outputs lock into ``outputs_lock`` once the models are loaded)."""
    with load_run(run_dir, device, allow_partial, check) as loaded:
        outputs = dict(_EVAL_OUTPUTS)
        if budget is not None:  # this budget's own table and figure too
            outputs.update({f"{BUDGET_FOLDER}/{budget_name(budget.key)}{ext}": suffix
                            for ext, suffix in ((".csv", ""), (".png", ".png"))})
        outputs_lock.enter_context(writing_outputs(run_dir, loaded, outputs))
        run, restored, done, final = loaded.run, loaded.restored, loaded.done, loaded.final
        cfg = run.cfg
        summary = final_evaluation(run.pool, run.algo, ClientRows(Comm(run.rt), run.placement, run.rt.device),
                                   run.macs, run.num_exits, run.store.has_val, is_main=True)
        summary.update(algorithm=cfg.algorithm.name, num_clients=run.n)
        # float sums differ between devices and CPU models: the numbers name where they came from
        environment = provenance.environment(provenance.software(), [provenance.machine(run.rt.device)])
        # --budget: needs the loaded models, so it runs before the store closes
        budget_section = None if budget is None else run_budget(
            run, run_dir, budget, summary["dynamic"],
            title=f"{cfg.data.dataset}, {summary['num_clients']} clients, {summary['algorithm']}")
    assert summary is not None
    table = summary["dynamic"]
    acc = summary["acc_per_exit"]
    reduction = mac_reduction_at_loss(table, acc[-1], max_loss)
    # paths absolute: eval.json is read from anywhere (export, a user's script), not only from where eval ran
    where = run_dir.absolute()
    paths = {"json": str(where / "eval.json"), "plot": str(where / "accuracy_vs_macs.png")}
    # the evaluated checkpoint's own rounds: rows past it are a live run's newer ones or a killed
    # `--resume force` attempt's; a torn or damaged line is passed over (the plot is optional)
    conflict = [r for r in read_rounds(run_dir, before=done + 1) if r.get("conflict")]
    if conflict:
        paths["conflict_plot"] = str(where / "conflict.png")
    report = {
        "run_dir": str(where),
        "round": done,
        "final_round": final,
        "partial": done != final,
        "checkpoint": str(Path(restored.path).absolute()),
        "algorithm": summary["algorithm"],
        "acc_per_exit": acc,
        "macs_per_exit": summary["macs_per_exit"],
        "per_client": [{"client": i, "acc_per_exit": a} for i, a in enumerate(summary["acc_per_client"])],
        "dynamic": table,
        "max_loss": max_loss,
        "mac_reduction": reduction,
        "model_hashes": summary["model_hashes"],
        "environment": environment,
        "paths": paths,
    }
    _keep_budgets(run_dir, report, budget_section)
    write_json_atomic(paths["json"], report)
    plot_accuracy_vs_macs({summary["algorithm"]: table}, paths["plot"],
                          per_exit={summary["algorithm"]: (acc, summary["macs_per_exit"])},
                          title=f"{cfg.data.dataset}, {summary['num_clients']} clients: accuracy vs MACs")
    if conflict:
        plot_conflict(conflict, paths["conflict_plot"],
                      title=f"{cfg.data.dataset}, {summary['algorithm']}: gradient conflict between exits")
    return report


def _keep_budgets(run_dir: Path, report: dict[str, Any], new: dict[str, Any] | None) -> None:
    """Put into ``report`` (the new eval.json) the budgets evaluated for its models: those of
    the earlier eval.json that describe the same models (:mod:`~cafedist.eval.budget_keep`) and
    ``new`` (this eval's ``--budget``, replacing its own earlier entry), the most recent also as
    ``budget``; the tables and figures of the budgets dropped are removed with the commit."""
    try:
        previous = json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        previous = None
    kept, why = kept_budgets(previous, report, run_dir)
    if why is not None:
        log.info("dropping the budget tables of an earlier `eval --budget` in eval.json: %s", why)
    if new is not None:
        kept.pop(new["key"], None)
        kept[new["key"]] = new  # the most recent last
    written = {Path(p) for entry in kept.values() for p in entry["paths"].values()}
    stale = [p for p in budget_files_of(previous, run_dir) if p.absolute() not in written]
    if kept:
        report.update(budget=list(kept.values())[-1], budgets=kept)
        report["paths"].update(current_paths(run_dir))
    else:  # budget.csv/png of an earlier `eval --budget` would describe no entry of the new eval.json
        stale += _budget_outputs_of_last_eval(run_dir)
    remove_together(stale)
    if stale:
        log.info("removing %s of an earlier `eval --budget`", ", ".join(str(p.relative_to(run_dir)) for p in stale))


def _budget_outputs_of_last_eval(run_dir: Path) -> list[Path]:
    """The budget.csv and budget.png that the run's current eval.json says an ``eval --budget``
    wrote (and that are still files): only those are eval's to remove, not a file of the user's
    that happens to have the name."""
    try:
        previous = json.loads((run_dir / "eval.json").read_text())
        written = previous["paths"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not isinstance(written, dict):
        return []
    return [run_dir / name for key, name in BUDGET_OUTPUTS.items()
            if isinstance(written.get(key), str) and Path(written[key]).name == name and (run_dir / name).is_file()]


__all__ = ["LoadedRun", "evaluate_run", "dynamic_table", "load_run"]
