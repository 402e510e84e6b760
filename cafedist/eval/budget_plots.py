"""``budget.png``: per-client accuracy-vs-MACs curves, the chosen points, and the budget check.

Two panels that stay readable from a handful of clients to hundreds:

- left, one axis: each client's test curve under its chosen policy as a faint line (own
  colours up to 10 clients, one translucent colour beyond, so 100 lines read as a band),
  its chosen point on top (circle: within budget on test; red cross: over), the global
  max-softmax threshold curve in black, the overall result of the per-client policies (star)
  and of one threshold chosen on calibration for the same budget (diamond, with how many
  clients it keeps within budget) or to keep every client's own budget (grey square), and
  the budget as a dashed line when all clients share one MACs budget;
- right, the budget check: every client's slack on test (budget minus what it used, in
  points of the last exit's MACs or of accuracy), sorted, with the zero line; client ids
  are written next to the points up to 20 clients.
"""

from __future__ import annotations

import math
import os
from typing import Any

from cafedist.eval.plots import _new_figure, _save_png

_OWN_COLOURS = 10  # up to this many clients each curve gets its own colour
_LABELLED = 20  # up to this many clients the slack panel names them


def slack_points(row: dict) -> float | None:
    """Budget minus use on test, in points: MACs (% of the last exit's) or accuracy points."""
    if row["within_budget"] is None:
        return None
    kind, value = row["budget"].split("=")
    if kind == "macs":
        return 100.0 * (float(value) - row["test_macs_fraction"])
    return float(value) - 100.0 * (row["last_exit_test_accuracy"] - row["test_accuracy"])


def _curve_style(count: int) -> tuple[list[Any], float]:
    from matplotlib import colormaps

    if count <= _OWN_COLOURS:
        return list(colormaps["tab10"].colors[:count]), 0.55
    # translucent enough that the density of 100+ lines shows where most clients are
    return [(0.12, 0.35, 0.6)] * count, max(0.06, min(0.4, 2.0 / math.sqrt(count)))


def _draw_curves(ax: Any, section: dict, curves: list[list[dict]], global_table: list[dict]) -> None:
    rows = section["clients"]
    colours, alpha = _curve_style(len(rows))
    for curve, colour in zip(curves, colours):
        if curve:
            ax.plot([100.0 * r["mean_macs"] / r["last_exit_macs"] for r in curve],
                    [100.0 * r["accuracy"] for r in curve], color=colour, alpha=alpha, linewidth=0.9)
    size = 28 if len(rows) <= _LABELLED else 12
    for row, colour in zip(rows, colours):
        if row["within_budget"] is None:
            continue
        x, y = 100.0 * row["test_macs_fraction"], 100.0 * row["test_accuracy"]
        if row["within_budget"]:
            ax.scatter([x], [y], s=size, color=colour, edgecolors="black", linewidths=0.5, zorder=3)
        else:
            ax.scatter([x], [y], s=size * 1.6, marker="X", color="tab:red", edgecolors="black",
                       linewidths=0.5, zorder=4)
    last = float(global_table[0]["last_exit_macs"])
    ax.plot([100.0 * r["mean_macs"] / last for r in global_table], [100.0 * r["accuracy"] for r in global_table],
            color="black", linewidth=1.8, label="global threshold (max-softmax), all clients")
    # the two overall results eval prints: what the per-client policies reach on all clients together,
    # and the alternative without per-client budgets (one threshold chosen on calibration)
    ax.scatter([100.0 * section["macs_fraction"]], [100.0 * section["accuracy"]], s=140, marker="*", color="gold",
               edgecolors="black", linewidths=0.8, zorder=5, label="per-client policies, all clients")
    judged = sum(r["within_budget"] is not None for r in rows)
    fair = section.get("global_on_calibration")
    if fair is not None:
        ax.scatter([100.0 * fair["macs_fraction"]], [100.0 * fair["accuracy"]], s=70, marker="D", color="white",
                   edgecolors="black", linewidths=1.0, zorder=5,
                   label=f"one threshold chosen on calibration ({fair['clients_within_budget']}/"
                         f"{judged} clients within budget)")
    everyone = section.get("global_within_every_budget")
    if everyone is not None:
        ax.scatter([100.0 * everyone["macs_fraction"]], [100.0 * everyone["accuracy"]], s=60, marker="s",
                   color="lightgrey", edgecolors="black", linewidths=1.0, zorder=5,
                   label=f"one threshold within every client's budget ({everyone['clients_within_budget']}/"
                         f"{judged} on test)")
    budgets = {row["budget"] for row in rows}
    if len(budgets) == 1 and next(iter(budgets)).startswith("macs="):
        ax.axvline(100.0 * float(next(iter(budgets)).split("=")[1]), color="grey", linestyle="--",
                   linewidth=1, label="budget")
    # proxies so the legend explains the per-client marks once
    ax.plot([], [], color=colours[0] if colours else "grey", alpha=max(alpha, 0.5),
            label="a client's test curve (its chosen policy)")
    ax.scatter([], [], s=28, color="white", edgecolors="black", label="chosen point, within budget")
    ax.scatter([], [], s=40, marker="X", color="tab:red", edgecolors="black", label="chosen point, over budget")
    ax.set_xlabel("mean MACs per sample (% of the last exit)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def _draw_slack(ax: Any, rows: list[dict]) -> None:
    points = sorted(((s, row) for row in rows if (s := slack_points(row)) is not None),
                    key=lambda p: (p[0], p[1]["client"]))
    xs = list(range(1, len(points) + 1))
    for x, (s, row) in zip(xs, points):
        marker = "o" if row["budget"].startswith("macs=") else "^"
        colour = "tab:green" if row["within_budget"] else "tab:red"
        ax.scatter([x], [s], marker=marker, s=22 if len(points) <= _LABELLED else 10, color=colour, zorder=3)
        if len(points) <= _LABELLED:
            ax.annotate(str(row["client"]), (x, s), textcoords="offset points", xytext=(0, 5), fontsize=6,
                        ha="center")
    ax.axhline(0.0, color="black", linewidth=1)
    kinds = {row["budget"].split("=")[0] for row in rows}
    if len(kinds) > 1:  # mixed budgets: say which marker is which
        ax.scatter([], [], marker="o", color="grey", label="MACs budget (% of last exit)")
        ax.scatter([], [], marker="^", color="grey", label="loss budget (accuracy points)")
        ax.legend(fontsize=7, loc="upper left")
    unit = {"macs": "MACs (% of last exit)", "loss": "accuracy points"}
    ax.set_ylabel("slack on test: budget − used\n" + " / ".join(unit[k] for k in sorted(kinds)))
    ax.set_xlabel("clients, sorted by slack (below 0: over budget)")
    ax.grid(True, alpha=0.3)


def plot_budget(section: dict, curves: list[list[dict]], global_table: list[dict], path: str | os.PathLike,
                *copies: str | os.PathLike, title: str = "") -> None:
    """Write ``budget.png`` for the ``budget`` section of eval.json (see the module docstring)
    to ``path`` and to each of ``copies``."""
    fig = _new_figure(width=11.0, height=4.6)
    left, right = fig.subplots(1, 2, width_ratios=[1.6, 1.0])
    _draw_curves(left, section, curves, global_table)
    _draw_slack(right, section["clients"])
    share = section["share_within_budget"]
    head = f"budget {section.get('spec', '')}: {section['clients_within_budget']} clients within budget"
    if share is not None:
        head += f" ({100 * share:.0f}%)"
    fig.suptitle(f"{title}\n{head}" if title else head, fontsize=10)
    for where in (path, *copies):
        _save_png(fig, where)


__all__ = ["plot_budget", "slack_points"]
