"""Evaluation: per-exit accuracy, dynamic (early-exit) inference, accuracy-vs-MACs plots.

- :mod:`.exits`: run a model once, get every exit's prediction/confidence; per-exit correct
  counts.
- :mod:`.clients`: a rank's clients evaluated, rows gathered in client-id order (training's
  records and summary, and ``cafedist eval``).
- :mod:`.dynamic`: threshold sweep as summable counts, the table, and the MAC reduction
  at a given accuracy loss.
- :mod:`.plots`: PNG figures (matplotlib imported only when plotting): accuracy vs MACs,
  accuracy per exit, accuracy vs round per exit.
- per-client inference budgets (``cafedist eval --budget``): :mod:`.policies` (exit scores,
  temperature scaling), :mod:`.budget_spec` (specs and budget files), :mod:`.budget` (the
  search and the test check), :mod:`.budget_run` (the eval glue), :mod:`.budget_plots`.
"""

from cafedist.eval.dynamic import (
    THRESHOLDS,
    dynamic_counts,
    dynamic_table,
    exit_indices,
    mac_reduction_at_loss,
)
from cafedist.eval.exits import exit_predictions, per_exit_correct
from cafedist.eval.plots import plot_accuracy_vs_macs, plot_curves_per_exit, plot_per_exit_bars

__all__ = [
    "THRESHOLDS",
    "dynamic_counts",
    "dynamic_table",
    "exit_indices",
    "exit_predictions",
    "mac_reduction_at_loss",
    "per_exit_correct",
    "plot_accuracy_vs_macs",
    "plot_curves_per_exit",
    "plot_per_exit_bars",
]
