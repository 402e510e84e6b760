"""``cafedist eval RUN --budget ...``: glue between a loaded run and :mod:`cafedist.eval.budget`.

Collects every client's per-exit logits on its calibration (validation) and test splits,
resolves the budgets, runs the per-client search, writes the budget's table and figure
(``budget/NAME.csv``/``.png`` and ``budget.csv``/``budget.png``) and returns the ``budget``
section of eval.json. :func:`format_budget` renders the lines
``cafedist eval`` prints.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cafedist.errors import ConfigError
from cafedist.eval.budget import SCOPES, personalized_budgets
from cafedist.eval.budget_keep import BUDGET_FOLDER, budget_key, budget_paths
from cafedist.eval.budget_report import ROW_KEYS
from cafedist.eval.budget_search import DEFAULT_CONFIDENCE, Split
from cafedist.eval.budget_spec import (
    DEFAULT_KEY,
    Budget,
    check_feasible,
    load_budget_file,
    looks_like_spec,
    parse_budget_spec,
    per_client,
)
from cafedist.eval.exits import exit_logits
from cafedist.eval.policies import POLICIES
from cafedist.fsutil import write_text_atomic
from cafedist.paths import user_path

CSV_COLUMNS = ROW_KEYS  # budget.csv: every key of a client's row, in order


def parse_policies(text: str) -> list[str]:
    """``--policies`` -> the known policy names it lists, in :data:`POLICIES` order (ConfigError
    otherwise): the search breaks ties in that order, so the order they are listed in must not
    change the choice."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES]
    if not names or unknown:
        raise ConfigError(f"--policies: expected a comma-separated subset of {','.join(POLICIES)}, got {text!r}")
    return [p for p in POLICIES if p in names]


def client_splits(run: Any) -> list[tuple[Split, Split]]:
    """(calibration, test) logits of every client of a single-rank run (:class:`~cafedist.run.build.Run`),
    by client id."""
    out = []
    for c in run.pool.each(sorted(run.pool.ids), modify=False):
        model = run.algo.eval_model(c.view)
        out.append((Split(exit_logits(model, c.data.x_val).cpu(), c.data.y_val.cpu()),
                    Split(exit_logits(model, c.data.x_test).cpu(), c.data.y_test.cpu())))
    return out


def write_budget_csv(rows: Sequence[dict], path: str | Path) -> None:
    """The per-client table as CSV (temperatures joined with ';'; empty cells for None). Floats
    are written as Python writes them, the shortest text that reads back as the same float: the
    threshold is a calibration score under these temperatures, so rounded ones would move that
    sample to another exit, and the table would not hold the policy eval chose."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        cells = {k: row[k] for k in CSV_COLUMNS}
        if cells["temperatures"] is not None:
            cells["temperatures"] = ";".join(repr(float(t)) for t in cells["temperatures"])
        writer.writerow({k: "" if v is None else v for k, v in cells.items()})
    write_text_atomic(path, buf.getvalue())


#: eval.json's ``paths`` key -> the file ``--budget`` writes into the run directory
BUDGET_OUTPUTS = {"budget_csv": "budget.csv", "budget_plot": "budget.png"}
DEFAULT_POLICIES = ",".join(POLICIES)


@dataclass(frozen=True)
class BudgetOptions:
    """What ``cafedist eval --budget`` was asked: the spec or file, and the search's knobs."""

    budget: str
    policies: str = DEFAULT_POLICIES
    temperature: bool = True
    confidence: float = DEFAULT_CONFIDENCE
    scope: str = SCOPES[0]
    #: the budget as read once, here: client id (or ``default``) -> Budget
    entries: dict[int | str, Budget] = field(init=False, repr=False, compare=False)
    #: SHA-256 of the budget file's bytes (None for a spec)
    sha256: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # fail on a bad flag before the run's models are loaded and evaluated
        if not 0.5 <= self.confidence < 1.0:
            raise ConfigError(f"--budget-confidence: expected a number in [0.5, 1), got {self.confidence}")
        if self.scope not in SCOPES:
            raise ConfigError(f"--policy-scope: expected one of {', '.join(SCOPES)}, got {self.scope!r}")
        object.__setattr__(self, "policies", ",".join(parse_policies(self.policies)))  # canonical, like the spec
        if looks_like_spec(self.budget):
            spec = parse_budget_spec(self.budget)
            entries, digest = {DEFAULT_KEY: spec}, None
            object.__setattr__(self, "budget", spec.spec)  # canonical: MACS=.50 and macs=0.5 are one budget
        else:
            entries, digest = load_budget_file(self.budget)
        object.__setattr__(self, "entries", entries)  # frozen: set once, here
        object.__setattr__(self, "sha256", digest)

    @property
    def is_file(self) -> bool:
        """Whether ``budget`` named a file (decided when it was read: the file may go away since)."""
        return self.sha256 is not None

    @property
    def key(self) -> str:
        """This budget's key in eval.json's ``budgets`` (:func:`~cafedist.eval.budget_keep.budget_key`)."""
        return budget_key(self.budget, self.sha256)

    @property
    def source(self) -> str:
        """How errors name where the budgets came from: the flag, or the budget file."""
        return self.budget if self.is_file else "--budget"

    def per_client(self, num_clients: int) -> list[Budget]:
        """Every client's budget (index = client id) for a run of ``num_clients`` clients."""
        return per_client(self.entries, num_clients, self.budget)

    @classmethod
    def from_args(cls, args: Any) -> "BudgetOptions | None":
        """From the parsed flags of :func:`add_budget_arguments`; None without ``--budget``. A
        search flag without ``--budget``, or ``--budget`` twice, is a ConfigError: either
        would otherwise be dropped without a word."""
        knobs = {"--policies": args.policies is not None, "--no-temperature": args.no_temperature,
                 "--budget-confidence": args.budget_confidence is not None,
                 "--policy-scope": args.policy_scope is not None}
        if args.budget is None:
            given = [flag for flag, set_ in knobs.items() if set_]
            if given:
                raise ConfigError(f"{', '.join(given)}: only used with --budget (settings of its per-client search)")
            return None
        if len(args.budget) > 1:
            raise ConfigError(f"--budget: given {len(args.budget)} times; eval takes one (a per-client budget file "
                              f"gives clients different budgets; cafedist compare takes several)")
        if looks_like_spec(args.budget[0]) and "," in args.budget[0]:
            raise ConfigError(f"--budget {args.budget[0]}: eval takes one budget (cafedist compare takes a "
                              f"comma-separated list; a per-client budget file gives clients different budgets)")
        return cls(args.budget[0], DEFAULT_POLICIES if args.policies is None else args.policies,
                   not args.no_temperature,
                   DEFAULT_CONFIDENCE if args.budget_confidence is None else args.budget_confidence,
                   SCOPES[0] if args.policy_scope is None else args.policy_scope)


def check_not_an_output(run_dir: str | Path, options: BudgetOptions) -> None:
    """Refuse a budget file that is one of the files ``--budget`` writes into the run directory,
    or in its folder of kept tables: eval would overwrite (or later remove) its own input."""
    if not options.is_file:
        return
    given = Path(options.budget).resolve()
    if given.parent == (Path(run_dir) / BUDGET_FOLDER).resolve():
        raise ConfigError(f"--budget {options.budget}: eval keeps its per-client tables in {BUDGET_FOLDER}/ and "
                          f"may overwrite or remove it; keep the budget file elsewhere")
    for name in BUDGET_OUTPUTS.values():
        if given == (Path(run_dir) / name).resolve():
            raise ConfigError(f"--budget {options.budget}: eval writes its per-client table there and would "
                              f"overwrite it; keep the budget file under another name")


def resolve_run_budgets(run: Any, run_dir: str | Path, options: BudgetOptions) -> list:
    """Every client's :class:`~cafedist.eval.budget_spec.Budget` for a built run, or a
    ConfigError if the run cannot be evaluated under them: a budget file that does not cover
    its clients, a MACs budget below exit 1's cost, or no validation split. Needs no trained
    model, so eval calls it before loading the checkpoint (:func:`~cafedist.eval.run.load_run`)."""
    budgets = options.per_client(run.n)
    check_feasible(budgets, run.macs, options.source)
    if not run.store.has_val:
        raise ConfigError(f"{run_dir}: --budget chooses each client's policy on its calibration split, and this run "
                          f"has none (trained with data.val_fraction = 0); train with e.g. data.val_fraction=0.1")
    return budgets


def budget_section(run: Any, run_dir: str | Path, options: BudgetOptions, global_table: list[dict],
                   splits: Sequence[tuple[Split, Split]] | None = None) -> tuple[dict[str, Any], list[list[dict]]]:
    """The ``budget`` section of eval.json for a loaded run (:class:`~cafedist.run.build.Run`)
    and each client's test curve under its chosen policy. ``splits``: the clients'
    (calibration, test) logits when already computed (:func:`client_splits`), so that several
    budgets of one run share one forward pass.

    A run whose store has no validation split is refused: the policies are chosen on that
    split, and falling back to a static exit for every client would be a report about
    nothing (a single client without calibration samples does get that fallback).
    """
    names = parse_policies(options.policies)
    budgets = resolve_run_budgets(run, run_dir, options)
    section, curves = personalized_budgets(client_splits(run) if splits is None else splits, budgets, run.macs,
                                           global_table, policies=names, temperature=options.temperature,
                                           confidence=options.confidence, scope=options.scope)
    section["spec"] = options.budget
    return section, curves


def current_paths(run_dir: Path) -> dict[str, str]:
    """eval.json's ``paths`` of the most recent budget's table and figure (absolute)."""
    return {key: str((run_dir / name).absolute()) for key, name in BUDGET_OUTPUTS.items()}


def run_budget(run: Any, run_dir: Path, options: BudgetOptions, global_table: list[dict],
               title: str = "") -> dict[str, Any]:
    """Everything ``--budget`` adds to ``cafedist eval``; returns eval.json's ``budget`` section
    (:func:`budget_section`, with its ``key``, a budget file's ``sha256`` and ``paths``: its own
    table and figure in ``RUN/budget/``, :mod:`~cafedist.eval.budget_keep`), and writes them
    there and as budget.csv and budget.png, the most recent budget's."""
    section, curves = budget_section(run, run_dir, options, global_table)
    section.update(key=options.key, sha256=options.sha256, paths=budget_paths(run_dir, options.key))
    latest = current_paths(run_dir)
    for path in (section["paths"]["budget_csv"], latest["budget_csv"]):  # the same table under both names
        write_budget_csv(section["clients"], path)
    from cafedist.eval.budget_plots import plot_budget  # matplotlib only when plotting

    plot_budget(section, curves, global_table, section["paths"]["budget_plot"], latest["budget_plot"], title=title)
    return section


def _threshold_text(threshold: float | None) -> str:
    # None: nothing was feasible on calibration (non-finite scores), so a static exit answered
    return f"threshold {threshold:g}" if threshold is not None else "no feasible threshold: a static exit"


def format_budget(section: dict[str, Any]) -> list[str]:
    """The lines ``cafedist eval --budget`` prints: the per-client result and the comparison."""
    glob = section["global_at_same_macs"]
    judged = sum(r["within_budget"] is not None for r in section["clients"])
    share = section["share_within_budget"]
    lines = [
        f"budget {section['spec']}: {section['clients_within_budget']}/{judged} clients within budget on test"
        + (f" (share_within_budget {share:.2f})" if share is not None else ""),
        f"  personalized policies ({section['scope']} scope): accuracy {100 * section['accuracy']:.2f}% at "
        f"{100 * section['macs_fraction']:.1f}% of the last exit's MACs (last exit alone: "
        f"{100 * section['last_exit_accuracy']:.2f}%)",
        f"  global threshold at the same mean MACs: accuracy {100 * glob['accuracy']:.2f}% "
        f"(threshold {' .. '.join(f'{t:g}' for t in glob['thresholds'])})",
    ]
    fair = section.get("global_on_calibration")
    if fair is None and "global_on_calibration" in section:
        lines.append("  one global threshold chosen on calibration: not compared (the clients' budgets differ)")
    elif fair is not None:
        lines.append(f"  one global threshold chosen on calibration (no per-client budgets): accuracy "
                     f"{100 * fair['accuracy']:.2f}% at {100 * fair['macs_fraction']:.1f}% of the last exit's MACs, "
                     f"{fair['clients_within_budget']}/{judged} clients within their budget "
                     f"({_threshold_text(fair['threshold'])})")
    everyone = section.get("global_within_every_budget")
    if everyone is None and "global_within_every_budget" in section:
        lines.append("  one global threshold within every client's budget: not compared (budgets of both kinds, "
                     "or none feasible for every client on calibration)")
    elif everyone is not None:
        lines.append(f"  one global threshold that keeps every client's budget on calibration: accuracy "
                     f"{100 * everyone['accuracy']:.2f}% at {100 * everyone['macs_fraction']:.1f}% of the last exit's "
                     f"MACs, {everyone['clients_within_budget']}/{judged} clients within their budget "
                     f"(threshold {everyone['threshold']:g})")
    # a static exit for lack of calibration samples, or because no threshold was feasible on them
    # (scores that are not finite): one line per reason, from the rows that record it
    reasons: dict[str, list[int]] = {}
    for row in section["clients"]:
        if row["fallback"]:
            reasons.setdefault(row["fallback"], []).append(row["client"])
    lines += [f"  static fallback ({reason}) for clients {ids}" for reason, ids in reasons.items()]
    return lines


def add_budget_arguments(parser: Any) -> None:
    """The ``cafedist eval`` flags of personalized budgets."""
    parser.add_argument("--budget", action="append", default=None, metavar="SPEC|FILE", type=user_path,
                        help="per-client dynamic inference within a budget: macs=F (mean MACs <= F x the last "
                             "exit's), loss=P (at most P accuracy points below the last exit, on calibration), or "
                             "a CSV/YAML file 'client id -> spec' (a 'default' entry covers the rest); needs a run "
                             "trained with data.val_fraction > 0 (the calibration split). Writes its table and "
                             "figure into RUN/budget/ and as budget.csv and budget.png; eval.json keeps every "
                             "budget evaluated for the run's models")
    parser.add_argument("--policies", default=None,
                        help="with --budget: exit policies to choose from, comma-separated "
                             "(max-softmax, entropy, margin; default all); a set: ties go to that order "
                             "whatever the order listed")
    parser.add_argument("--no-temperature", action="store_true",
                        help="with --budget: do not also try per-exit temperature scaling fitted on calibration")
    parser.add_argument("--policy-scope", choices=SCOPES, default=None,
                        help="with --budget: 'pooled' (default) chooses the policy, temperatures and threshold on "
                             "all clients' calibration splits together and then moves each client's threshold until "
                             "its own budget holds on its own split; 'client' searches each client's split alone "
                             "(noisier on small splits: docs/METHOD.md)")
    parser.add_argument("--budget-confidence", type=float, default=None,
                        help="with --budget: a policy is chosen only if its calibration estimate meets the budget "
                             "with this one-sided confidence (0.5 = the plain estimate; default 0.95)")


__all__ = ["BUDGET_OUTPUTS", "CSV_COLUMNS", "BudgetOptions", "add_budget_arguments", "budget_section",
           "check_not_an_output", "client_splits", "current_paths", "format_budget", "parse_policies",
           "resolve_run_budgets", "run_budget", "write_budget_csv"]
