"""A learned exit score under the pooled rule, measured on calibration data only like ``budget_halvings.py``.

    python experiments/budget_learned_score.py RUN_DIR [RUN_DIR ...] [--repeats 20]

The hypothesis: max-softmax, entropy and margin rank samples by one exit's confidence alone;
a score that also sees whether an exit agrees with the one before it (no extra MACs: the
earlier exit was computed on the way) might rank "will this exit be right" better, so that
the same MACs buy more accuracy and a binding client loses less when its θ is lowered. The
score of exit k < m is a logistic regression, fitted per exit on all clients' choice halves
pooled, of "exit k's prediction is correct" on six features: exit k's max-softmax, margin and
entropy score, and for k > 1 whether its class agrees with exit k-1's, exit k-1's probability
of that class, and exit k-1's max-softmax (exit 1: the first three). Rules, scored on the other
halves as in ``budget_halvings.py``: ``pooled`` and ``pooled-max-softmax`` (as there),
``pooled-learned`` (the pooled rule with the learned score as its only policy) and
``pooled-learned+`` (the learned score beside the three usual policies). docs/METHOD.md
("Against the global threshold") quotes its output.

An experiment, not an interface: the budget search knows only the policies of
:mod:`cafedist.eval.policies`, so the script swaps the search's score function for one that
also knows ``learned`` (fitted anew on each halving before the rule chooses).
"""

from __future__ import annotations

from typing import Sequence

import budget_halvings
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import Tensor

import cafedist.eval.budget_search as search
from cafedist.eval.budget import choose_all
from cafedist.eval.budget_search import Choice, Split, pooled_split
from cafedist.eval.budget_spec import Budget
from cafedist.eval.policies import POLICIES, check_policy, exit_scores

LEARNED = "learned"
# per shallow exit: a fitted classifier, or the constant hit rate when the pooled half is all right or all wrong
_fitted: list[LogisticRegression | float] = []


def features(logits: Tensor) -> list[np.ndarray]:
    """Per exit, the [N, F] feature matrix of the learned score (module docstring) from logits [m, N, C]."""
    probs = logits.double().softmax(dim=-1)
    scores = {p: exit_scores(logits, p) for p in POLICIES}
    out = []
    for k in range(probs.shape[0]):
        cols = [scores[p][k] for p in POLICIES]
        if k > 0:
            answer = probs[k].argmax(dim=-1)
            cols += [(answer == probs[k - 1].argmax(dim=-1)).double(),
                     probs[k - 1].gather(-1, answer.unsqueeze(-1)).squeeze(-1), scores["max-softmax"][k - 1]]
        out.append(torch.stack(cols, dim=-1).numpy())
    return out


def fit(splits: Sequence[Split]) -> None:
    """Fit the learned score of every shallow exit on ``splits`` pooled."""
    pooled = pooled_split(splits)
    per_exit = features(pooled.logits)
    hits = (pooled.logits.argmax(dim=-1) == pooled.y.unsqueeze(0)).numpy()
    _fitted.clear()
    for k in range(len(per_exit) - 1):
        y = hits[k]
        _fitted.append(float(y.mean()) if y.all() or not y.any() else LogisticRegression().fit(per_exit[k], y))


def scores_with_learned(logits: Tensor, policy: str, temperatures: Tensor | None = None) -> Tensor:
    """:func:`exit_scores`, plus the ``learned`` policy (its last exit scores 1: it always answers)."""
    if policy != LEARNED:
        return exit_scores(logits, policy, temperatures)
    n = logits.shape[1]
    rows = [torch.full((n,), model, dtype=torch.float64) if isinstance(model, float)
            else torch.from_numpy(model.predict_proba(x)[:, 1]) for model, x in zip(_fitted, features(logits))]
    return torch.stack(rows + [torch.ones(n, dtype=torch.float64)])


def pooled_learned(policies: Sequence[str], temperature: bool) -> budget_halvings.Rule:
    """The pooled rule over ``policies`` (with pooled temperatures if ``temperature``; the learned
    score ignores them) after fitting the learned score on the choice halves."""
    def rule(firsts: Sequence[Split], seconds: Sequence[Split], bud: Budget, macs: Sequence[int]) -> list[Choice]:
        fit(firsts)
        return choose_all(firsts, [bud] * len(firsts), macs, policies, temperature)[0]
    return rule


RULES: dict[str, budget_halvings.Rule] = {
    "pooled": budget_halvings.RULES["pooled"],
    "pooled-max-softmax": budget_halvings.RULES["pooled-max-softmax"],
    "pooled-learned": pooled_learned((LEARNED,), temperature=False),
    "pooled-learned+": pooled_learned((LEARNED, *POLICIES), temperature=True),
}

if __name__ == "__main__":
    search.exit_scores = scores_with_learned
    search.check_policy = lambda name: name if name == LEARNED else check_policy(name)
    budget_halvings.main(RULES, __doc__)
