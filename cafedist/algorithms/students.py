"""CAFEDistill's student schedule: which shallow exits a client trains with CE each round.

Progressive and depth-prioritized (shallow exits first); the partial depth is filled greedily
by similarity (conflict-aware). Shared by CAFEDistill, its client-decoupled variant and the
ablations of the proxy-distillation baselines.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cafedist.algorithms.base import LocalBatch, Setup
from cafedist.algorithms.exit_loss import per_exit, total


def selection_counts(round_idx: int, rounds: int, n: int, m: int, span: float = 0.5) -> tuple[int, int, int]:
    """``(N_s, d, r)`` for round ``round_idx``: students in all, full depths, extra at depth d.

    ``R(t) = min(t / (span * T), 1)``; ``N_s = floor((m-1) n R)``; ``d = floor((m-1) R)``;
    ``r = N_s - n d``. Computed in exact rational arithmetic so no float rounding moves a count.
    """
    from fractions import Fraction

    ratio = min(Fraction(round_idx) / (Fraction(span).limit_denominator(10**6) * rounds), Fraction(1))
    total = int((m - 1) * n * ratio)
    depth = int((m - 1) * ratio)
    return total, depth, total - n * depth


def greedy_similar(sim: Tensor, k: int, eligible: Tensor | None = None) -> list[int]:
    """Pick ``k`` clients greedily by similarity (conflict-aware student selection).

    Seed: the client with the largest summed similarity to the other eligible ones; then
    repeatedly the client with the largest mean similarity to those already chosen.
    Ties go to the lowest client id; ineligible clients are chosen only when nothing else is left.
    """
    n = sim.shape[0]
    if k <= 0:
        return []
    sim = sim.to(torch.float64)
    if eligible is None:
        eligible = torch.ones(n, dtype=torch.bool, device=sim.device)
    # ineligible rows rank below every eligible one but stay orderable among themselves
    penalty = torch.where(eligible, 0.0, -1.0e6).to(sim.dtype)
    pair_ok = eligible.unsqueeze(0) & eligible.unsqueeze(1)
    s = torch.where(pair_ok, sim, torch.zeros_like(sim))
    s = s - torch.diag(torch.diagonal(s))
    score = s.sum(dim=1) + penalty
    chosen: list[int] = []
    taken = torch.zeros(n, dtype=torch.bool, device=sim.device)
    running = torch.zeros(n, dtype=sim.dtype, device=sim.device)
    for _ in range(min(k, n)):
        masked = torch.where(taken, torch.full_like(score, -float("inf")), score)
        i = int(torch.argmax(masked))  # first maximum -> lowest id on ties
        chosen.append(i)
        taken[i] = True
        running += s[:, i]
        score = running / len(chosen) + penalty
    return chosen


def student_masks(round_idx: int, rounds: int, n: int, m: int, sim: Tensor, span: float,
                  eligible: Tensor | None = None) -> Tensor:
    """Bool [n, m]: which exits of which client are students in round ``round_idx``.

    The last exit is always trained (True) but is not counted as a student.
    """
    total, depth, extra = selection_counts(round_idx, rounds, n, m, span)
    mask = torch.zeros(n, m, dtype=torch.bool)
    mask[:, m - 1] = True
    mask[:, :depth] = True
    if extra > 0 and depth < m - 1:
        mask[greedy_similar(sim.cpu(), extra, None if eligible is None else eligible.cpu()), depth] = True
    return mask


def initial_students(setup: Setup, span: float, selection: bool = True) -> Tensor:
    """Bool [m]: a client's student exits before any aggregation (round 0 of the schedule)."""
    m = setup.num_exits
    if not selection:
        return torch.ones(m, dtype=torch.bool)
    return student_masks(0, setup.rounds, 1, m, torch.ones(1, 1), span)[0]


class ScheduledStudents:
    """Client side shared by the CAFEDistill variants (a mixin, listed before the algorithm's
    base class): each client's students live in its state (``"students"``: uint8 [m], set by the
    server's schedule in ``receive``), and its loss is the exit-loss rule's terms that
    :meth:`_terms` builds, summed (``local_loss``) or per exit (``exit_losses``)."""

    setup: Setup
    params: Any  # schedule_span, student_selection

    @classmethod
    def rounds_dependence(cls, params: Any, rounds: int, done: int, new_rounds: int) -> list[str]:
        # R(t) scales with the total; the students of round t are chosen in round t - 1's
        # aggregation, so those of the first round after ``done`` were chosen under it too
        if not params.student_selection or done == 0:
            return []
        which = "round 1" if done == 1 else f"rounds 1-{done}"
        return [f"the progressive exit schedule (schedule_span {params.schedule_span}) set the students of "
                f"{which} for {rounds} rounds in all"]

    def init_client_state(self, cid: int) -> dict[str, Tensor]:
        return {"students": initial_students(self.setup, self.params.schedule_span, self.params.student_selection)}

    def students(self, state: dict[str, Tensor]) -> Tensor:
        """The client's current students as bool [m] on the CPU."""
        return state["students"].to(torch.bool).cpu()

    def _terms(self, state: dict[str, Tensor], batch: LocalBatch) -> list:
        """The exit-loss rule's terms of one batch (:mod:`cafedist.algorithms.exit_loss`)."""
        raise NotImplementedError

    def local_loss(self, state: dict[str, Tensor], batch: LocalBatch) -> Tensor:
        return total(self._terms(state, batch))

    def exit_losses(self, state: dict[str, Tensor], batch: LocalBatch) -> list[Tensor | None]:
        return per_exit(self._terms(state, batch), len(batch.logits))
