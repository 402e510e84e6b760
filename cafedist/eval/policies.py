"""Exit policies (how confident is an exit?) and per-exit temperature scaling.

A policy turns one exit's logits into a score in [0, 1], higher meaning "more sure"; a
sample leaves at the first exit whose score is >= the threshold θ, with the same rule as
:mod:`cafedist.eval.dynamic` (θ >= 1: no early exit; the last exit always answers). Keeping
every policy on [0, 1] lets one threshold grid and one search serve all of them.

- ``max-softmax``: the largest class probability (what ``cafedist eval`` always used);
- ``entropy``: ``1 - H(p) / log C``, i.e. 1 for a one-hot distribution, 0 for a uniform one;
- ``margin``: the gap between the two largest probabilities.

Temperature scaling divides an exit's logits by a scalar T > 0 before the softmax. It keeps
each exit's prediction and only reshapes its confidence, which matters here because one
threshold is shared by all exits: a shallow exit that is over-confident compared with a deep
one leaves too early. :func:`fit_temperatures` fits one T per exit by minimising the
negative log-likelihood on a client's calibration split.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# the score functions live in the file `cafedist export` ships beside exported models, so an
# exported policy scores exactly as the evaluation that chose it
from cafedist.deploy.early_exit import SCORES

# The order is also the tie-break order of the budget search (cafedist.eval.budget_search).
POLICIES: tuple[str, ...] = tuple(SCORES)

# T is searched in [1/BETA_MAX, 1/BETA_MIN]: wide enough for any sensible calibration,
# bounded so that a separable calibration set (NLL -> 0 as T -> 0) cannot run away.
BETA_MIN, BETA_MAX = 0.05, 20.0
_GOLDEN_STEPS = 80  # the bracket shrinks by 0.618 per step: 80 steps reach float64 resolution


def check_policy(name: str) -> str:
    """``name`` if it is a known policy, else a ValueError listing them."""
    if name not in SCORES:
        raise ValueError(f"unknown exit policy {name!r}; expected one of {', '.join(POLICIES)}")
    return name


def exit_scores(logits: Tensor, policy: str, temperatures: Tensor | None = None) -> Tensor:
    """Each exit's confidence score under ``policy``: ``logits`` [m, N, C] -> [m, N] in [0, 1].

    ``temperatures`` [m] (optional) divides each exit's logits before the softmax. Computed
    in float64 so that scores near 1 keep their order (float32 saturates at margins ~17).
    """
    if logits.dim() != 3:
        raise ValueError(f"expected logits of shape [m, N, C], got {tuple(logits.shape)}")
    z = logits.double()
    if temperatures is not None:
        z = z / _check_temperatures(temperatures, logits.shape[0]).to(z.device).view(-1, 1, 1)
    return SCORES[check_policy(policy)](z.softmax(dim=-1))


def _check_temperatures(temperatures: Tensor, m: int) -> Tensor:
    t = torch.as_tensor(temperatures, dtype=torch.float64)
    if t.shape != (m,) or not bool((t > 0).all()) or not bool(torch.isfinite(t).all()):
        raise ValueError(f"temperatures must be {m} finite positive numbers, got {t.tolist()}")
    return t


def _nll(logits: Tensor, y: Tensor, beta: Tensor) -> Tensor:
    """Mean NLL per exit of ``softmax(beta * logits)``: [m, N, C], [N], [m] -> [m]."""
    z = logits * beta.view(-1, 1, 1)
    picked = z.gather(2, y.view(1, -1, 1).expand(z.shape[0], -1, 1)).squeeze(2)
    return (z.logsumexp(dim=2) - picked).mean(dim=1)


def fit_temperatures(logits: Tensor, y: Tensor) -> Tensor:
    """One temperature per exit minimising the NLL of ``y`` on these logits: [m, N, C] -> [m].

    The NLL is convex in β = 1/T (a log-sum-exp of functions linear in β, minus a linear
    term), so a golden-section search over β in [BETA_MIN, BETA_MAX] finds its minimum
    without step sizes or random starts: the fit is deterministic and bounded. All exits are
    searched at once. With no calibration samples every T is 1 (no scaling).
    """
    if logits.dim() != 3 or y.dim() != 1 or y.shape[0] != logits.shape[1]:
        raise ValueError(f"expected logits [m, N, C] and y [N], got {tuple(logits.shape)} and {tuple(y.shape)}")
    m = logits.shape[0]
    if logits.shape[1] == 0:
        return torch.ones(m, dtype=torch.float64)
    z = logits.detach().double().cpu()
    y = y.detach().long().cpu()
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    lo = torch.full((m,), BETA_MIN, dtype=torch.float64)
    hi = torch.full((m,), BETA_MAX, dtype=torch.float64)
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll(z, y, a), _nll(z, y, b)
    for _ in range(_GOLDEN_STEPS):
        left = fa <= fb  # the minimum lies in [lo, b]; otherwise in [a, hi]
        hi = torch.where(left, b, hi)
        lo = torch.where(left, lo, a)
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        fa, fb = _nll(z, y, a), _nll(z, y, b)
    return 1.0 / ((lo + hi) / 2.0)


__all__ = ["BETA_MAX", "BETA_MIN", "POLICIES", "check_policy", "exit_scores", "fit_temperatures"]
