"""``cafedist compare --budget SPEC|FILE``: every finished run under per-client inference budgets.

Each budget is what ``cafedist eval RUN --budget`` takes (``macs=F``, ``loss=P`` or a
per-client CSV/YAML file) and is evaluated by the same code
(:func:`cafedist.eval.budget_run.budget_section`, with its default scope): every client's exit
policy is chosen on calibration (validation) data within its own budget and checked on its
test split. The report gets, per method and budget, the pooled test accuracy, the mean MACs
as a fraction of the last exit's, the share of clients within budget on test, and the global
threshold's accuracy at the same mean MACs (read off the run's ``summary.json``
dynamic-inference curve, as eval does); and, where every client has the same budget, one
global threshold chosen on calibration for that budget: its accuracy and share of clients
within their budget.

The sections are kept in ``RUN_DIR/budgets.json``, keyed by the budget and the search's
options, for the run's models (its ``config_hash`` and ``model_hashes``): rerunning compare
reuses them and loads no model unless a run or a budget changed.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

from cafedist.compare.plan import resolve_seeds
from cafedist.errors import CafeError, CheckpointError, ConfigError
from cafedist.eval.budget import SEARCH_VERSION
from cafedist.eval.budget_run import BudgetOptions
from cafedist.eval.budget_spec import check_feasible, looks_like_spec
from cafedist.fsutil import write_json_atomic

log = logging.getLogger("cafedist")

BUDGETS_FILE = "budgets.json"

class BudgetMetric(NamedTuple):
    """One per-run number of one budget, and how the reports show it."""

    metric: str  # results.csv's metric, runs.csv's column prefix
    key: str  # of :func:`numbers`' input: the eval section, plus the global thresholds' numbers
    header: str  # results.md's column
    digits: int  # results.md's decimals (of percentages)


#: the per-run numbers of one budget, in the reports' order
METRICS: tuple[BudgetMetric, ...] = (
    BudgetMetric("budget_accuracy", "accuracy", "accuracy", 2),
    BudgetMetric("budget_macs_fraction", "macs_fraction", "MACs (% of last exit)", 1),
    BudgetMetric("budget_share_within", "share_within_budget", "clients within budget", 0),
    BudgetMetric("budget_global_accuracy", "global_accuracy", "global threshold, same MACs", 2),
    BudgetMetric("budget_global_cal_accuracy", "global_cal_accuracy", "global threshold on calibration", 2),
    BudgetMetric("budget_global_cal_share_within", "global_cal_share_within", "its clients within budget", 0),
    BudgetMetric("budget_global_all_accuracy", "global_all_accuracy", "global threshold within every budget", 2),
    BudgetMetric("budget_global_all_macs_fraction", "global_all_macs_fraction", "its MACs (% of last exit)", 1),
)


def parse_budgets(values: Sequence[str]) -> list[BudgetOptions]:
    """``--budget`` (repeatable, each comma-separated) -> validated options, in order, without
    duplicates (specs compared in canonical form). A bad spec, an empty item or an unreadable
    file is a one-line ConfigError; a value naming an existing file is that file even if its
    name has a comma."""
    specs = []
    for value in map(str, values):
        items = [value] if Path(value).is_file() else [item.strip() for item in value.split(",")]
        if not all(items):
            raise ConfigError(f"--budget {value!r}: an empty item; expected comma-separated budgets "
                              f"(macs=F, loss=P or per-client budget files)")
        specs += items
    out: dict[str, BudgetOptions] = {}
    for spec in specs:
        if not looks_like_spec(spec) and spec.isdigit() and not Path(spec).exists():
            raise ConfigError(f"--budget {spec}: expected an inference budget (macs=F, loss=P or a per-client "
                              f"budget file); the cap on tuning trials per method is --max-trials {spec}")
        options = BudgetOptions(spec)
        out.setdefault(options.budget, options)  # canonical: macs=0.5 and MACS=0.50 are one budget
    return list(out.values())


def check_runs(budgets: Sequence[BudgetOptions], configs: Iterable[tuple[str, Any]],
               seeds: str | int | Sequence[int] = 1, prepare: bool = True) -> None:
    """Refuse, before anything trains, what would make every budget evaluation fail
    (``configs``: (method, a resolved config of its runs); ``seeds``: compare's ``--seeds``):
    a method whose runs have no validation split, on which each client's policy is chosen, a
    budget file that does not cover the runs' clients, and a MACs budget below exit 1's cost
    of a method's model (its data store is prepared for the first seed to learn the inputs'
    shape, and training reuses it; without ``prepare``, as for ``--submit``, whose jobs
    prepare their stores on the cluster, a missing store skips this check)."""
    from cafedist.run.build import exit_macs, open_store

    configs = list(configs)
    lacking = list(dict.fromkeys(name for name, cfg in configs if not cfg.data.val_fraction > 0))
    if lacking:
        raise ConfigError(f"--budget: {', '.join(lacking)} would train without a validation split "
                          f"(data.val_fraction = 0), on which each client's exit policy is chosen; "
                          f"add e.g. data.val_fraction=0.1")
    resolved = {n: [b.per_client(n) for b in budgets]
                for n in dict.fromkeys(cfg.data.clients for _, cfg in configs)}
    checked: set[str] = set()
    for name, cfg in configs:
        per_budget = resolved[cfg.data.clients]
        if not any(b.kind == "macs" for clients in per_budget for b in clients):
            continue
        cfg = replace(cfg, seed=resolve_seeds(seeds, cfg.seed)[0])
        model = json.dumps([str(cfg.data.store_path(cfg.seed)), cfg.model.arch, cfg.model.options],
                           sort_keys=True, default=str)
        if model in checked:
            continue
        checked.add(model)
        if not prepare and not cfg.data.store_path(cfg.seed).is_file():
            log.info("compare: %s's store is not prepared yet; --budget's MACs are checked after training", name)
            continue
        with closing(open_store(cfg)) as store:
            macs = exit_macs(cfg, store)
        for options, clients in zip(budgets, per_budget):
            try:
                check_feasible(clients, macs, options.source)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (method {name}, model {cfg.model.arch})") from None


def _key(options: BudgetOptions) -> str:
    """What a kept section depends on besides the run's models: the budget (a file by its
    resolved path and content), the search's options and the search's version."""
    key: dict[str, Any] = {"budget": options.budget, "policies": options.policies,
                           "temperature": options.temperature, "confidence": options.confidence,
                           "scope": options.scope, "search": SEARCH_VERSION}
    if options.is_file:
        key.update(budget=str(Path(options.budget).resolve()), sha256=options.sha256)
    return json.dumps(key, sort_keys=True)


def _read_kept(path: Path, models: dict[str, Any]) -> dict[str, dict]:
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(kept, dict) and kept.get("models") == models and isinstance(kept.get("sections"), dict)
    return kept["sections"] if ok else {}


def run_budgets(run_dir: str | os.PathLike, summary: dict, budgets: Sequence[BudgetOptions]) -> list[dict]:
    """The eval ``budget`` section of each budget for the finished run in ``run_dir`` (whose
    ``summary.json`` is ``summary``), reused from ``budgets.json`` when kept for these models."""
    from cafedist.eval.budget_run import budget_section, client_splits
    from cafedist.eval.run import load_run, writing_outputs
    from cafedist.run.client import model_hash

    run_dir = Path(run_dir)
    path = run_dir / BUDGETS_FILE
    models = {"config_hash": summary.get("config_hash"), "model_hashes": summary.get("model_hashes")}
    sections = _read_kept(path, models)
    keys = [_key(b) for b in budgets]
    todo = [(k, b) for k, b in zip(keys, budgets) if k not in sections]
    if todo:
        with load_run(run_dir) as loaded, writing_outputs(run_dir, loaded, {BUDGETS_FILE: ""}):
            kept = summary.get("model_hashes") or {}
            pool = loaded.run.pool  # every client, parked ones too (a resident_clients bound)
            if any(kept.get(str(c.cid)) != model_hash(c.model) for c in pool.each(pool.ids, modify=False)):
                # trained on (e.g. --resume force with more rounds) since its summary was read
                raise CheckpointError(f"{loaded.restored.path}: not the models of the summary.json compare read "
                                      f"(the run was trained on meanwhile); compare again")
            splits = client_splits(loaded.run)  # one forward pass for every budget
            for k, b in todo:
                sections[k] = budget_section(loaded.run, run_dir, b, summary["dynamic"], splits)[0]
            write_json_atomic(path, {"models": models, "sections": sections})
    return [sections[k] for k in keys]


def numbers(section: dict) -> dict[str, float | None]:
    """The report's metrics of one run under one budget (None where undefined)."""
    fair = section.get("global_on_calibration") or {}  # None when clients' budgets differ
    # None when budgets are of both kinds or no threshold suits every client
    everyone = section.get("global_within_every_budget") or {}
    values = {**section, "global_accuracy": section["global_at_same_macs"]["accuracy"],
              "global_cal_accuracy": fair.get("accuracy"), "global_cal_share_within": fair.get("share_within_budget"),
              "global_all_accuracy": everyone.get("accuracy"),
              "global_all_macs_fraction": everyone.get("macs_fraction")}
    return {m.metric: values.get(m.key) for m in METRICS}


def evaluate_outcomes(outcomes: Sequence[Any], budgets: Sequence[BudgetOptions]) -> tuple[dict[str, dict], list[str]]:
    """Every finished run of ``outcomes`` (compare's RunOutcome) under every budget: run
    directory -> {budget spec: section}, and one message per run whose evaluation failed."""
    results: dict[str, dict] = {}
    errors: list[str] = []
    finished = [(o, s) for o in outcomes if o.status != "failed" and (s := o.run.finished_summary()) is not None]
    for i, (o, summary) in enumerate(finished):
        try:
            sections = run_budgets(o.run.run_dir, summary, budgets)
        except CafeError as exc:
            errors.append(f"{o.run.label}: budget evaluation failed: {exc}")
            log.error("compare: %s", errors[-1])
            continue
        results[str(o.run.run_dir)] = {b.budget: s for b, s in zip(budgets, sections)}
        log.info("compare: [%d/%d] %s: evaluated under %s", i + 1, len(finished), o.run.label,
                 ", ".join(f"{b.budget} ({100 * s['accuracy']:.2f}% at {100 * s['macs_fraction']:.1f}% MACs)"
                           for b, s in zip(budgets, sections)))
    return results, errors


__all__ = ["BUDGETS_FILE", "METRICS", "BudgetMetric", "check_runs", "evaluate_outcomes", "numbers", "parse_budgets",
           "run_budgets"]
