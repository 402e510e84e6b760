"""``cafedist export RUN --out DIR``: each client's early-exit network and exit policy, ready to deploy.

Per client, ``DIR/client_NNNN/`` holds one ``torch.export`` program per exit
(``exit_K.pt2``: block K and exit head K, from block K-1's output to ``(block K's output,
exit K's logits)``, batch size free) and ``policy.json`` (the exit policy, MACs per exit,
what was exported and how it did on the client's test split). ``DIR/early_exit.py`` runs
them with torch alone (:mod:`cafedist.deploy.early_exit`), and ``DIR/export.json`` says what
the export holds.

Which policy: by default each client's own, as ``cafedist eval RUN --budget ...`` chose it
on its calibration split (read from RUN/eval.json, which must describe the same models:
same round, checkpoint and model hashes): for the most recent budget evaluated, or for
``--budget SPEC|FILE``, one of those eval.json keeps; ``--threshold θ`` instead gives every
client the max-softmax rule of the global curve with that θ (no eval needed).

Every exported client is checked before the folder appears: the exported programs, run by
``early_exit.py`` on the client's test split, must answer every sample from the same exit
with the same class as the evaluation's rule on the run's own models (``agreement`` in
policy.json; a mismatch is a warning, the numbers say how many).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from cafedist.deploy import early_exit
from cafedist.errors import ConfigError
from cafedist.eval.budget_keep import describe_key, select_budget
from cafedist.eval.budget_search import Choice, Split, macs_tensor
from cafedist.eval.dynamic import exit_indices
from cafedist.eval.exits import exit_logits
from cafedist.eval.policies import exit_scores
from cafedist.eval.run import load_run, run_config_file, writing_outputs
from cafedist.fsutil import fsync_dir
from cafedist.paths import check_dir_creatable, refuse_empty_path, run_dir_arg, user_path
from cafedist.run.checkpoint import CheckpointDir
from cafedist.run.client import model_hash
from cafedist.typed import is_finite_number, is_integer
from cafedist.units import clients_phrase

log = logging.getLogger("cafedist")

_CHUNK = 512  # samples per call of the exported model in the check (as eval's chunks)


# ----------------------------------------------------------------------------- which policy
def _choice_from_row(row: dict[str, Any]) -> Choice:
    """A client's policy from its row of eval.json's budget table (``static_exit`` is 1-based there)."""
    temperatures = row.get("temperatures")
    static = row.get("static_exit")
    return Choice(policy=row["policy"], threshold=row.get("threshold"),
                  temperatures=None if temperatures is None else tuple(float(t) for t in temperatures),
                  static_exit=None if static is None else int(static) - 1)


def _usable_choice(row: dict[str, Any], num_exits: int, path: Path) -> Choice:
    """:func:`_choice_from_row`, refused in one line naming the client when export could not
    use it (eval.json edited by hand): tried on a dummy batch with the evaluation's own checks,
    before any client is traced."""
    try:
        static = row.get("static_exit")
        # a whole number in range: int() would read 2.7 as exit 2 (and "2" or true as an exit too)
        in_range = is_integer(static) and 1 <= static <= num_exits
        if (static is not None or row.get("policy") == "static") and not in_range:
            raise ValueError(f"static_exit {static!r} is not an exit 1..{num_exits}")
        choice = _choice_from_row(row)
        if choice.static_exit is None:  # a static exit answers every sample: no threshold to check
            if not is_finite_number(choice.threshold):  # float() would take "0.9", which early_exit.py cannot
                raise ValueError(f"threshold {choice.threshold!r} is not a number")
            logits = torch.zeros(num_exits, 1, 2)
            exit_indices(exit_scores(logits, choice.policy, choice.temperature_tensor()), [choice.threshold])
    except (KeyError, TypeError, ValueError) as exc:
        why = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ConfigError(f"{path}: client {row.get('client')}'s policy row is not usable ({why}): "
                          f"run `cafedist eval RUN --budget ...` again") from None
    return choice


def _eval_report(run_dir: Path, wanted: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """RUN/eval.json and the budget section whose policies to export (``wanted``: ``--budget``;
    None: the most recent eval evaluated), or a one-line error saying how to get one."""
    path = run_dir / "eval.json"
    advice = "run `cafedist eval RUN --budget ...` first, or pass --threshold for one max-softmax threshold"
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found: the per-client exit policies come from `eval --budget`; "
                          f"{advice}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not readable as JSON ({exc}); {advice}") from None
    if not isinstance(report, dict):
        raise ConfigError(f"{path}: not an eval report (a JSON object); {advice}")
    budget = select_budget(report, wanted, path)
    rows = budget.get("clients") if isinstance(budget, dict) else None
    if not isinstance(rows, list):
        raise ConfigError(f"{path}: has no per-client budget table (no eval with --budget of these models); {advice}")
    held = report.get("budgets")
    if wanted is None and isinstance(held, dict) and len(held) > 1:
        log.info("exporting the policies of the most recent budget, %s, of the %d eval.json holds "
                 "(--budget chooses another)", describe_key(budget), len(held))
    return report, budget


def _checkpoint_of(report: dict[str, Any]) -> tuple[Any, str]:
    return report.get("round"), Path(str(report.get("checkpoint", "?"))).name


def _check_same_models(report: dict[str, Any], loaded: Any, ids: Sequence[int], run_dir: Path) -> None:
    """Refuse policies that eval chose for other models than the ones loaded, before any client
    is exported: another round or checkpoint (the usual stale eval.json, after a resume), or, at
    the same round and checkpoint name, other weights (trained again) of any client in ``ids``."""
    theirs, ours = _checkpoint_of(report), (loaded.done, loaded.restored.path.name)
    advice = "run `cafedist eval RUN --budget ...` again"
    if theirs != ours:
        raise ConfigError(f"{run_dir / 'eval.json'}: describes other models (round {theirs[0]}, {theirs[1]}) than "
                          f"the run's newest checkpoint (round {ours[0]}, {ours[1]}): {advice}")
    recorded = report.get("model_hashes") or {}
    hashes = {c.cid: model_hash(c.model) for c in loaded.run.pool.each(ids, modify=False)}
    differ = sorted(cid for cid, digest in hashes.items() if recorded.get(str(cid)) != digest)
    if differ:
        which = (f"client {differ[0]}'s model hash is {hashes[differ[0]]}, eval.json has {recorded.get(str(differ[0]))}"
                 if len(differ) == 1
                 else f"the model hashes of {clients_phrase(differ)} are not the ones eval.json has")
        raise ConfigError(f"{run_dir / 'eval.json'}: describes other models (round {theirs[0]}, {theirs[1]}): {which}: "
                          f"{advice}")


def _row(budget: dict[str, Any], cid: int, run_dir: Path) -> dict[str, Any]:
    """Client ``cid``'s row of eval.json's budget table ``budget``."""
    for row in budget["clients"]:
        if isinstance(row, dict) and row.get("client") == cid:
            return row
    raise ConfigError(f"{run_dir / 'eval.json'}: its budget table has no row for client {cid}: "
                      f"run `cafedist eval RUN --budget ...` again")


def _threshold_choice(threshold: float) -> Choice:
    return Choice(policy="max-softmax", threshold=float(threshold))


def check_threshold(value: float | None) -> float | None:
    """``--threshold``: None or a number in [0, 1] (1: no early exit)."""
    if value is not None and not 0.0 <= value <= 1.0:
        raise ConfigError(f"--threshold: expected a max-softmax threshold in [0, 1], got {value!r}")
    return value


def parse_clients(text: str | None, num_clients: int) -> list[int]:
    """``--clients``: comma-separated ids and ranges (``0,3,5-7``) within the run's clients; None: all."""
    if text is None:
        return list(range(num_clients))
    ids: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if last < first:  # "5-3" names no client: a typo, not a request for none
                raise ValueError(part)
            ids.extend(range(first, last + 1))
    except ValueError:
        raise ConfigError(f"--clients: expected comma-separated client ids or ranges (0,3,5-7), got {text!r}") from None
    bad = [i for i in ids if not 0 <= i < num_clients]
    if not ids or bad:
        raise ConfigError(f"--clients: the run has clients 0..{num_clients - 1}, got {text!r}")
    return sorted(set(ids))


# ----------------------------------------------------------------------------- exporting one client
def _batch_free(state: Any) -> Any:
    """``dynamic_shapes`` for a block input: dimension 0 (the batch) free in every tensor."""
    if isinstance(state, Tensor):
        return {0: getattr(torch.export.Dim, "DYNAMIC", None) or torch.export.Dim("batch")}
    return type(state)(_batch_free(part) for part in state)


def export_stages(model: nn.Module, example: Any, folder: Path) -> list[str]:
    """Save one program per exit of ``model`` (an eval model with ``exit_stages``) into
    ``folder``, traced on ``example`` (a batch of inputs); returns the file names, exit 1 first."""
    stages = getattr(model, "exit_stages", None)
    if stages is None:
        raise ConfigError(f"export: this algorithm's model ({type(model).__name__}) cannot be cut at its exits "
                          f"(it has no exit_stages)")
    names, state = [], example
    with torch.no_grad():
        for k, stage in enumerate(stages()):
            stage.eval()
            program = torch.export.export(stage, (state,), dynamic_shapes=(_batch_free(state),))
            names.append(f"exit_{k + 1}.pt2")
            torch.export.save(program, str(folder / names[-1]))
            state, _ = stage(state)
    return names


def _example(data: Any) -> Tensor:
    """Two samples to trace with, from the test split, else validation, else train (a split's
    only sample twice: traced on a batch of 1, torch.export fixes the batch size at 1)."""
    for x in (data.x_test, data.x_val, data.x_train):
        if x is not None and x.shape[0]:
            return x[[0, min(1, x.shape[0] - 1)]].cpu()
    raise ConfigError("export: a client has no samples to trace its model with")


def check_exported(folder: Path, choice: Choice, model: nn.Module, x: Tensor, y: Tensor,
                   macs_per_exit: Sequence[int]) -> dict[str, Any]:
    """Run the export in ``folder`` on (x, y) and compare it with the evaluation's rule
    (:meth:`Choice.exits`) on ``model``'s own logits: samples, agreement (same exit and
    class), and the exported model's accuracy and MACs as a fraction of the last exit's."""
    n = int(y.shape[0])
    if n == 0:
        return {"n_test": 0, "agreement": None, "test_accuracy": None, "test_macs_fraction": None}
    expected = Split(exit_logits(model, x).cpu(), y.cpu())
    want_exit = choice.exits(expected)
    want_class = expected.logits.argmax(dim=-1).gather(0, want_exit.unsqueeze(0)).squeeze(0)
    exported = early_exit.load(folder)
    parts = [exported(x[i:i + _CHUNK]) for i in range(0, n, _CHUNK)]
    got_class = torch.cat([logits.argmax(dim=-1) for logits, _ in parts]).cpu()
    got_exit = torch.cat([exits for _, exits in parts]).cpu()
    macs = macs_tensor(macs_per_exit)
    return {"n_test": n,
            "agreement": float(((got_exit == want_exit) & (got_class == want_class)).double().mean()),
            "test_accuracy": float((got_class == y.cpu()).double().mean()),
            "test_macs_fraction": float(macs[got_exit].mean() / macs[-1])}


def policy_spec(choice: Choice, stages: list[str], macs_per_exit: Sequence[int]) -> dict[str, Any]:
    """What early_exit.py reads from policy.json: the stage files (exit 1 first) and the policy."""
    return {"format": early_exit.FORMAT, "stages": stages,
            "policy": "static" if choice.static_exit is not None else choice.policy,
            "threshold": choice.threshold,
            "temperatures": None if choice.temperatures is None else list(choice.temperatures),
            "static_exit": choice.static_exit, "macs_per_exit": [int(c) for c in macs_per_exit]}


def write_policy(folder: Path, spec: dict[str, Any]) -> None:
    """``folder/policy.json``."""
    (folder / "policy.json").write_text(json.dumps(spec, indent=1) + "\n")


def _policy_json(cid: int, choice: Choice, stages: list[str], run: Any, source: str, x: Tensor,
                 budget: str | None) -> dict[str, Any]:
    """policy.json of one client (its ``test`` entry is filled in by the check)."""
    return {"client": cid, "algorithm": run.cfg.algorithm.name, "dataset": run.cfg.data.dataset,
            "input_shape": list(x.shape[1:]), "input_dtype": str(x.dtype), "num_classes": run.setup.num_classes,
            **policy_spec(choice, stages, run.macs), "policy_source": source, "budget": budget, "test": None}


# ----------------------------------------------------------------------------- the folder
def check_not_among_checkpoints(out: Path, run_dir: Path) -> None:
    """``--out`` (resolved) not inside ``run_dir``'s checkpoints folder: training prunes a
    checkpoint folder whole (``checkpoint.keep``), an export inside it with it, without a word."""
    checkpoints = CheckpointDir(run_dir).root.resolve()
    if out.is_relative_to(checkpoints):
        raise ConfigError(f"--out: {out} is inside the run's checkpoints folder, which training prunes (an export "
                          f"there would be deleted with its checkpoint); export into another folder, e.g. "
                          f"{run_dir / 'export'}")


def check_directly_in_run(out: Path, run_dir: Path) -> None:
    """``--out`` (resolved) inside ``run_dir`` only as a folder directly in it: ``--resume none``
    moves such an export aside with the models it describes; one deeper (``RUN/exports/v1``)
    would stay beside a new run, naming checkpoints that are no longer its models'."""
    run = run_dir.resolve()
    if out.is_relative_to(run) and run not in (out, out.parent):  # the run itself: check_out says
        raise ConfigError(f"--out: {out} is inside the run directory but not directly in it, where `train --resume "
                          f"none` would leave it beside a new run; export directly into the run directory (e.g. "
                          f"{run_dir / 'export'}) or outside it")


def check_out(out: Path) -> None:
    """``--out``: a folder that does not exist yet (and can be made), or an empty one."""
    check_dir_creatable(out, "--out")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out: {out} exists and is not empty; export writes a new folder")


@contextmanager
def _new_folder(out: Path) -> Iterator[Path]:
    """A hidden folder beside ``out`` to write into, renamed to ``out`` on success and removed
    on any failure: ``out`` appears complete or not at all (it must not exist, or be empty)."""
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, out)  # onto an empty directory too
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _export_client(run: Any, c: Any, choice: Choice, source: str, budget: str | None, tmp: Path) -> dict[str, Any]:
    """Write client ``c``'s programs and policy.json into ``tmp/client_NNNN`` and check them on
    its test split; returns export.json's entry of the client (with the check: policy.json's ``test``)."""
    folder = tmp / f"client_{c.cid:04d}"
    folder.mkdir()
    model = run.algo.eval_model(c.view)
    spec = _policy_json(c.cid, choice, export_stages(model, _example(c.data), folder), run, source,
                        c.data.x_test, budget)
    write_policy(folder, spec)  # read back by the check
    spec["test"] = checked = check_exported(folder, choice, model, c.data.x_test, c.data.y_test, run.macs)
    write_policy(folder, spec)
    if checked["agreement"] is not None and checked["agreement"] < 1.0:
        log.warning("client %d: the exported model answers %.2f%% of its test samples differently from "
                    "the evaluation (floating point at the threshold)", c.cid, 100 * (1 - checked["agreement"]))
    return {"client": c.cid, "folder": folder.name, **checked}


def export_run(run_dir: str | Path, out: str | Path, clients: str | None = None, threshold: float | None = None,
               allow_partial: bool = False, budget: str | None = None) -> dict[str, Any]:
    """Export ``run_dir``'s clients (``clients``: :func:`parse_clients` text) into the new
    folder ``out`` (module docstring) with the policies eval chose for ``budget`` (a spec or
    budget file eval was given; None: the most recent); returns what export.json holds."""
    refuse_empty_path("--out", out, "the folder to write (new, or empty)")
    # the folder itself: "." or "x/.." name none that the written one can be renamed onto, and a
    # rename onto a symbolic link to an empty folder fails (ENOTDIR)
    run_dir, out = Path(run_dir), Path(os.path.realpath(out))
    threshold = check_threshold(threshold)
    if threshold is not None and budget is not None:
        raise ConfigError("--threshold and --budget: give one (--threshold: one max-softmax threshold for every "
                          "client; --budget: the per-client policies eval chose for that budget)")
    # a mistyped RUN is "not a run directory", not "eval.json: not found" nor a complaint about
    # where --out lies in a folder that is no run
    run_config_file(run_dir)
    check_not_among_checkpoints(out, run_dir)
    check_directly_in_run(out, run_dir)
    check_out(out)  # before the run is loaded, and again when the folder is made
    if not hasattr(torch, "export") or not hasattr(torch.export, "save"):
        raise ConfigError(f"export: needs torch.export.save, which torch {torch.__version__} does not have")
    report, section = (None, None) if threshold is not None else _eval_report(run_dir, budget)
    with load_run(run_dir, "cpu", allow_partial) as loaded:
        run = loaded.run
        ids = parse_clients(clients, run.n)
        source = f"--threshold {threshold}" if section is None else \
            (f"eval --budget {section.get('spec')} ({section.get('scope', 'pooled')} scope), eval.json of round "
             f"{report['round']}")
        if report is not None:  # all refusals before the first client is traced (seconds each)
            _check_same_models(report, loaded, ids, run_dir)
        rows = {} if section is None else {cid: _row(section, cid, run_dir) for cid in ids}
        choices = {cid: _usable_choice(row, run.num_exits, run_dir / "eval.json") for cid, row in rows.items()}
        # an export kept in the run directory is among the outputs about the run's models:
        # written under their lock, so that `--resume none` moves it aside with the run and
        # never leaves it beside a new one (a run started over since loading is refused)
        kept_in_run = out.is_relative_to(run_dir.resolve())
        with writing_outputs(run_dir, loaded, {}) if kept_in_run else nullcontext(), _new_folder(out) as tmp:
            exported = []
            for c in run.pool.each(ids, modify=False):
                row = rows.get(c.cid)
                choice = _threshold_choice(threshold) if row is None else choices[c.cid]
                exported.append(_export_client(run, c, choice, source, None if row is None else row.get("budget"), tmp))
            shutil.copyfile(early_exit.__file__, tmp / "early_exit.py")
            summary = {"format": early_exit.FORMAT, "run_dir": str(run_dir.resolve()), "round": loaded.done,
                       "final_round": loaded.final, "checkpoint": str(Path(loaded.restored.path).absolute()),
                       "algorithm": run.cfg.algorithm.name, "policy_source": source,
                       # which of eval.json's budgets: its key (a spec, or a budget file's path and SHA-256)
                       "budget": None if section is None else section.get("key", section.get("spec")),
                       "torch": torch.__version__,
                       "clients": exported}
            (tmp / "export.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# ----------------------------------------------------------------------------- the command
def add_arguments(p: argparse.ArgumentParser) -> None:
    """``cafedist export`` options."""
    p.add_argument("run_dir", type=run_dir_arg, help="a run directory written by `cafedist train`")
    p.add_argument("--out", required=True, type=user_path, help="the folder to write (new, or empty)")
    p.add_argument("--clients", help="client ids and ranges to export, e.g. 0,3,5-7 (default: all)")
    p.add_argument("--budget", metavar="SPEC|FILE", type=user_path,
                   help="export the per-client policies `cafedist eval RUN --budget` chose for this budget (a spec "
                        "or budget file, as given to eval; eval.json keeps every budget evaluated for the run's "
                        "models); default: the most recent")
    p.add_argument("--threshold", type=float,
                   help="give every client the max-softmax rule with this threshold in [0, 1] instead of the "
                        "per-client policies `cafedist eval RUN --budget ...` chose (read from RUN/eval.json)")
    p.add_argument("--allow-partial", action="store_true",
                   help="export even when the newest valid checkpoint is not the run's final round")


def main(args: argparse.Namespace) -> int:
    """Run ``cafedist export``."""
    summary = export_run(args.run_dir, args.out, args.clients, args.threshold, args.allow_partial, args.budget)
    rows = summary["clients"]
    tested = [r for r in rows if r["n_test"]]
    n = sum(r["n_test"] for r in tested)
    if n:
        acc = sum(r["test_accuracy"] * r["n_test"] for r in tested) / n
        macs = sum(r["test_macs_fraction"] * r["n_test"] for r in tested) / n
        agree = sum(r["agreement"] * r["n_test"] for r in tested) / n
        print(f"exported {len(rows)} clients of round {summary['round']} ({summary['policy_source']}): "
              f"on their test splits {100 * acc:.2f}% at {100 * macs:.1f}% of the last exit's MACs; "
              f"{100 * agree:.2f}% of samples answered as the evaluation does")
    else:
        print(f"exported {len(rows)} clients of round {summary['round']} ({summary['policy_source']})")
    if rows:
        print(f"wrote {args.out} (in that folder, with torch alone: python -c \"import early_exit; "
              f"model = early_exit.load('{rows[0]['folder']}')\")")
    return 0


__all__ = ["add_arguments", "check_exported", "export_run", "export_stages", "main", "parse_clients", "policy_spec",
           "write_policy"]
