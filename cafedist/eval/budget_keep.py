"""Every budget ``cafedist eval --budget`` evaluated for a run's models, kept in eval.json.

eval.json's ``budgets`` maps each budget's key (:func:`budget_key`: the canonical spec,
``macs=0.5``, or a budget file's resolved path and SHA-256) to its ``budget`` section, in the
order they were evaluated; each has its own table and figure, ``RUN/budget/NAME.csv`` and
``.png`` (:func:`budget_name`: a file name made from the key). The most recent is also
eval.json's ``budget`` and ``budget.csv``/``budget.png``, where earlier versions kept the only
one. A later eval keeps the sections only while they describe the models it evaluates (same
round, checkpoint and model hashes, computed under the same result-changing environment):
otherwise they are dropped with their files, never mixed with another checkpoint's numbers.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from cafedist import provenance
from cafedist.errors import ConfigError
from cafedist.eval.budget_spec import looks_like_spec, parse_budget_spec

#: the folder of the run directory holding each kept budget's table and figure
BUDGET_FOLDER = "budget"
_FILE_MARK = " sha256:"  # in a budget file's key, between its resolved path and its digest


def budget_key(budget: str, sha256: str | None) -> str:
    """A budget's key in eval.json's ``budgets``: the canonical spec, or for a budget file
    (``sha256`` of its bytes) ``<resolved path> sha256:<digest>``: the same file edited is
    another budget."""
    return budget if sha256 is None else f"{Path(budget).resolve()}{_FILE_MARK}{sha256}"


def budget_name(key: str) -> str:
    """The file name (no suffix) of a budget's table and figure: ``macs-0.5``, or for a file
    ``file-<its name>-<12 digits of its SHA-256>``; only letters, digits, ``.``, ``_``, ``-``."""
    path, mark, digest = key.rpartition(_FILE_MARK)
    if not mark:
        return _safe(key.replace("=", "-"))  # a canonical spec, kind=number: one spec, one name
    return f"file-{_safe(Path(path).stem)[:40]}-{_safe(digest[:12])}"


def _safe(text: str) -> str:
    """``text`` as part of a file name in the budget folder: no separator, not hidden (a key
    edited by hand into eval.json must not name a file elsewhere)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip(".") or "budget"


def budget_paths(run_dir: Path, key: str) -> dict[str, str]:
    """eval.json's ``paths`` of one kept budget (absolute): its table and figure."""
    where = run_dir.absolute() / BUDGET_FOLDER / budget_name(key)
    return {"budget_csv": f"{where}.csv", "budget_plot": f"{where}.png"}


def models_differ(previous: dict[str, Any], report: dict[str, Any]) -> str | None:
    """Why the earlier eval.json ``previous`` describes other models or numbers than ``report``
    (the new one: its ``round``, ``checkpoint``, ``model_hashes``, ``environment``); None if not.
    The checkpoint is compared by name: a run directory moved elsewhere holds the same models."""
    if previous.get("round") != report["round"]:
        return f"round {previous.get('round')}, now {report['round']}"
    if Path(str(previous.get("checkpoint"))).name != Path(report["checkpoint"]).name:
        return f"checkpoint {Path(str(previous.get('checkpoint'))).name}, now {Path(report['checkpoint']).name}"
    if previous.get("model_hashes") != report["model_hashes"]:
        return "other model weights (trained again)"
    before = previous.get("environment")
    changed = provenance.result_differences(before, report["environment"]) if isinstance(before, dict) else []
    return f"computed under {'; '.join(changed)}" if changed else None


def kept_budgets(previous: Any, report: dict[str, Any], run_dir: Path) -> tuple[dict[str, dict], str | None]:
    """The budget sections of the earlier eval.json ``previous`` that the new ``report`` keeps
    (its paths made this run directory's), and why the others are dropped (None: none is)."""
    earlier = previous.get("budgets") if isinstance(previous, dict) else None
    if not isinstance(earlier, dict) or not earlier:
        return {}, None
    why = models_differ(previous, report)
    if why is not None:
        return {}, f"they describe other models ({why})"
    kept = {key: {**entry, "paths": budget_paths(run_dir, key)} for key, entry in earlier.items()
            if isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("clients"), list)}
    return kept, None if len(kept) == len(earlier) else "some are not readable (eval.json edited by hand?)"


def budget_files_of(previous: Any, run_dir: Path) -> list[Path]:
    """The tables and figures in ``RUN/budget/`` that the earlier eval.json's ``budgets`` name
    (and that are files): only those are eval's to remove, not other files of the user's."""
    earlier = previous.get("budgets") if isinstance(previous, dict) else None
    if not isinstance(earlier, dict):
        return []
    folder = run_dir / BUDGET_FOLDER
    names = {f"{budget_name(key)}{suffix}" for key in earlier if isinstance(key, str) for suffix in (".csv", ".png")}
    return sorted(folder / name for name in names if (folder / name).is_file())


def describe_key(entry: dict[str, Any]) -> str:
    """How messages name a kept budget: its spec, or a budget file's path as given and its digest."""
    spec = str(entry.get("spec"))
    return spec if entry.get("sha256") is None else f"{spec} (sha256 {str(entry['sha256'])[:12]})"


def select_budget(report: dict[str, Any], wanted: str | None, path: Path) -> dict[str, Any]:
    """The budget section of eval.json ``report`` (read from ``path``) that ``wanted`` names
    (a spec, or a budget file as given to eval, whose path and content must match; a file gone
    since is found by its path alone when eval kept one budget of that path); None: the most
    recent. A ConfigError in one line names the budgets eval.json holds when ``wanted`` is not one."""
    latest = report.get("budget")
    if wanted is None:
        return latest
    budgets = report.get("budgets") if isinstance(report.get("budgets"), dict) else {}
    if not budgets and isinstance(latest, dict) and isinstance(latest.get("spec"), str):
        # an eval.json written before every budget was kept: its one budget is the latest
        budgets = {budget_key(latest["spec"], latest.get("sha256")): latest}
    held = ", ".join(describe_key(e) for e in budgets.values() if isinstance(e, dict)) or "none"
    advice = f"eval.json holds: {held}; run `cafedist eval RUN --budget {wanted}` first"
    if looks_like_spec(wanted):
        keys = [parse_budget_spec(wanted, "--budget").spec]
    elif Path(wanted).is_file():
        try:
            digest = hashlib.sha256(Path(wanted).read_bytes()).hexdigest()
        except OSError as exc:
            raise ConfigError(f"--budget {wanted}: cannot read budget file ({exc.strerror})") from None
        keys = [budget_key(wanted, digest)]
    else:  # the file is gone: its path alone
        prefix = f"{Path(wanted).resolve()}{_FILE_MARK}"
        keys = [k for k in budgets if k.startswith(prefix)]
        if len(keys) > 1:
            raise ConfigError(f"--budget {wanted}: no such file, and eval.json holds {len(keys)} budgets evaluated "
                              f"from files of that path (edited in between); {advice}")
    entry = budgets.get(keys[0]) if keys else None
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: no budget {wanted} was evaluated for these models; {advice}")
    return entry


__all__ = ["BUDGET_FOLDER", "budget_files_of", "budget_key", "budget_name", "budget_paths", "describe_key",
           "kept_budgets", "models_differ", "select_budget"]
