"""Plots of evaluation results: accuracy vs MACs curves and per-exit accuracy bars.

matplotlib is an optional dependency (``cafedist[plot]``) and is imported only when a plot
is drawn. We use the object-oriented API with an explicit Agg canvas rather than pyplot,
so plotting never touches global backend state (safe in headless jobs and in threads).
Every file is written through :func:`cafedist.fsutil.atomic_output`.
"""

from __future__ import annotations

import os
from typing import Any

from cafedist.errors import CafeError
from cafedist.fsutil import atomic_output

_UNITS = ((1e9, "GMACs"), (1e6, "MMACs"), (1e3, "KMACs"))


def _new_figure(width: float = 6.4, height: float = 4.4) -> Any:
    """A matplotlib Figure bound to an Agg canvas (imports matplotlib lazily)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise CafeError("plotting needs matplotlib: pip install 'cafedist[plot]'") from exc
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


_CROWDED = 6  # more series than this: legend beside the axes, one style per series


def _series_styles(count: int) -> list[dict[str, Any]]:
    """Distinct colour/line/marker per series: ``tab20`` colours (default cycle's 10 repeat at
    the 11th method of a comparison), then line styles and markers vary as well."""
    from matplotlib import colormaps

    colours = colormaps["tab10" if count <= 10 else "tab20"].colors
    lines, markers = ("-", "--", ":", "-."), ("o", "^", "D", "v", "P", "X")  # "s" marks static exits
    return [{"color": colours[i % len(colours)], "linestyle": lines[(i // len(colours)) % len(lines)],
             "marker": markers[i % len(markers)]} for i in range(count)]


def _legend(fig: Any, ax: Any, count: int) -> None:
    """In the axes while it stays small, else beside them so no curve is hidden."""
    if count <= _CROWDED:
        ax.legend(fontsize=8)
    else:
        fig.legend(loc="outside right upper", fontsize=7, ncols=1 if count <= 24 else 2)


def _figure_for(count: int) -> Any:
    """Wider figures when the legend sits beside the axes."""
    return _new_figure(width=6.4 if count <= _CROWDED else 9.6)


def _save_png(fig: Any, path: str | os.PathLike) -> None:
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=150)


def _mac_unit(largest: float) -> tuple[float, str]:
    """A divisor and label so MAC counts print as e.g. 37.2 MMACs rather than 3.72e7."""
    for scale, label in _UNITS:
        if largest >= scale:
            return scale, label
    return 1.0, "MACs"


def plot_accuracy_vs_macs(
    curves: dict[str, list[dict]],
    path: str | os.PathLike,
    per_exit: dict[str, tuple[list[float], list[int]]] | None = None,
    title: str = "",
) -> None:
    """Accuracy vs mean MACs per sample, one line per name, written as a PNG to ``path``.

    ``curves`` maps a name (algorithm, run) to its :func:`~cafedist.eval.dynamic.dynamic_table`
    rows; ``per_exit`` optionally maps a name to ``(accuracy per exit, MACs per exit)``,
    drawn as labelled static points in the same colour as that name's curve.
    Accuracies are fractions in [0, 1] and are shown in percent.
    """
    per_exit = per_exit or {}
    if not curves and not per_exit:
        raise ValueError("plot_accuracy_vs_macs needs at least one curve or per-exit series")
    for name, (accs, macs) in per_exit.items():
        if len(accs) != len(macs):
            raise ValueError(f"per_exit[{name!r}]: {len(accs)} accuracies for {len(macs)} exits")
    all_macs = [row["mean_macs"] for rows in curves.values() for row in rows]
    all_macs += [float(m) for _, macs in per_exit.values() for m in macs]
    scale, unit = _mac_unit(max(all_macs, default=0.0))

    entries = len(curves) + len(per_exit)
    fig = _figure_for(entries)
    ax = fig.add_subplot()
    colours: dict[str, Any] = {}
    for (name, rows), style in zip(curves.items(), _series_styles(len(curves))):
        xs = [row["mean_macs"] / scale for row in rows]
        ys = [100.0 * row["accuracy"] for row in rows]
        (line,) = ax.plot(xs, ys, markersize=3, label=f"{name} (dynamic)", **style)
        colours[name] = line.get_color()
    for name, (accs, macs) in per_exit.items():
        xs = [m / scale for m in macs]
        ys = [100.0 * a for a in accs]
        # Reuse the curve's colour so a method's static exits sit visibly next to its curve.
        ax.scatter(xs, ys, marker="s", s=30, color=colours.get(name), label=f"{name} (exits)", zorder=3)
        for k, (x, y) in enumerate(zip(xs, ys), start=1):
            ax.annotate(f"exit {k}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.margins(x=0.08)  # room for the "exit k" labels at the ends
    ax.set_xlabel(f"mean cost per sample ({unit})")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    _legend(fig, ax, entries)
    if title:
        ax.set_title(title)
    _save_png(fig, path)


def plot_per_exit_bars(per_exit: dict[str, list[float]], path: str | os.PathLike, title: str = "") -> None:
    """Grouped bar chart of accuracy per exit (exits on x, one bar per name), as a PNG.

    Names may have different numbers of exits; a name simply has no bar at exits it lacks.
    """
    if not per_exit:
        raise ValueError("plot_per_exit_bars needs at least one series")
    n_exits = max(len(accs) for accs in per_exit.values())
    width = 0.8 / len(per_exit)
    fig = _figure_for(len(per_exit))
    ax = fig.add_subplot()
    styles = _series_styles(len(per_exit))
    for j, (name, accs) in enumerate(per_exit.items()):
        # Centre the group of bars on each exit's tick.
        xs = [k + (j - (len(per_exit) - 1) / 2) * width for k in range(1, len(accs) + 1)]
        ax.bar(xs, [100.0 * a for a in accs], width=width, label=name, color=styles[j]["color"])
    ax.set_xticks(range(1, n_exits + 1), [f"exit {k}" for k in range(1, n_exits + 1)])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, axis="y", alpha=0.3)
    _legend(fig, ax, len(per_exit))
    if title:
        ax.set_title(title)
    _save_png(fig, path)


def plot_conflict(records: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Depth-wise gradient conflict over rounds (``metrics.jsonl`` records with a ``conflict``
    object, see :mod:`cafedist.train.diagnostics`), as a PNG.

    Top: mean cosine per exit pair, solid over the clients where both exits trained, dashed
    over all pairs (untrained exits by their plain CE) -- the gap is what student selection
    keeps out of the body. Bottom: the share of negative (conflicting) pairs, same styles.
    A round where no pair trained leaves a gap in the solid lines.
    """
    rows = [r for r in records if r.get("conflict")]
    if not rows:
        raise ValueError("plot_conflict needs at least one record with a 'conflict' object")
    pairs = rows[0]["conflict"]["pairs"]
    rounds = [r["round"] for r in rows]

    def series(key: str, pair: str | None = None) -> list[float]:
        values = [r["conflict"][key] if pair is None else r["conflict"][key].get(pair) for r in rows]
        return [float("nan") if v is None else v for v in values]

    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(width=9.6, height=6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    for pair, style in zip(pairs, _series_styles(len(pairs))):
        i, j = (int(k) + 1 for k in pair.split("-"))  # exits are numbered from 1 in plots
        top.plot(rounds, series("trained", pair), color=style["color"], marker=style["marker"], markersize=3,
                 label=f"exits {i}-{j}, trained")
        top.plot(rounds, series("all", pair), color=style["color"], linestyle="--", alpha=0.7,
                 label=f"exits {i}-{j}, all (CE if untrained)")
    top.axhline(0.0, color="black", linewidth=0.8)
    top.set_ylabel("mean cosine on shared blocks")
    top.grid(True, alpha=0.3)
    fig.legend(*top.get_legend_handles_labels(), loc="outside right upper", fontsize=7)  # beside: no curve hidden
    bottom.plot(rounds, [100 * v for v in series("neg_trained")], marker="o", markersize=3, label="trained pairs")
    bottom.plot(rounds, [100 * v for v in series("neg_all")], linestyle="--", label="all pairs")
    bottom.set_ylabel("negative pairs (%)")
    bottom.set_ylim(-2, 102)
    bottom.set_xlabel("round")
    bottom.grid(True, alpha=0.3)
    bottom.legend(fontsize=7)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_title(title or "depth-wise gradient conflict between exits")
    _save_png(fig, path)


def plot_curves_per_exit(series: dict[str, list[list[tuple[int, float]]]], path: str | os.PathLike,
                         title: str = "", ylabel: str = "accuracy (%)") -> None:
    """Accuracy vs round, one panel per exit, one line per name, as a PNG.

    ``series`` maps a name (method, or method and setting) to, per exit, its ``(rounds
    completed, accuracy)`` points (fractions, shown in percent). Panels share the y axis so exits compare
    at a glance; with many names the legend sits beside the panels.
    """
    if not series:
        raise ValueError("plot_curves_per_exit needs at least one series")
    n_exits = max(len(per_exit) for per_exit in series.values())
    if n_exits == 0:
        raise ValueError("plot_curves_per_exit: no exit has any point")
    crowded = len(series) > _CROWDED
    fig = _new_figure(width=3.2 * n_exits + (3.2 if crowded else 0.0), height=3.8)
    axes = fig.subplots(1, n_exits, sharey=True, squeeze=False)[0]
    for (name, per_exit), style in zip(series.items(), _series_styles(len(series))):
        for k, points in enumerate(per_exit):
            if points:
                xs, ys = zip(*points)
                axes[k].plot(xs, [100.0 * y for y in ys], markersize=2, linewidth=1.2,
                             label=name if k == 0 else None, **style)
    from matplotlib.ticker import MaxNLocator

    for k, ax in enumerate(axes):
        ax.set_title(f"exit {k + 1}", fontsize=9)
        ax.set_xlabel("rounds completed")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(ylabel)
    _legend(fig, axes[0], len(series))
    if title:
        fig.suptitle(title)
    _save_png(fig, path)
