"""A per-client budget search on more data: all clients' calibration halves, reweighted to each
client's label prior. Measured on calibration data only, like ``budget_halvings.py``.

    python experiments/budget_reweighted.py RUN_DIR [RUN_DIR ...] [--repeats 20] [--confidence 0.95]

The per-client search loses to estimation noise on 7–25 samples (docs/METHOD.md, "Against the
global threshold"). Under label skew every client's data is the same p(x | y) with its own
p(y), so client c's model run on *every* client's choice half, each sample weighted by
p_c(y) / p_pool(y) (p_c from c's train labels, p_pool from the pooled half), estimates c's
accuracy and MACs on its own distribution from several times more samples (it also needs
every client's calibration inputs in one place, which the pooled scope does not). Rules, each
scored on the other halves as in ``budget_halvings.py``: ``pooled`` and ``client`` (as there),
``reweighted`` (the search on the reweighted pooled half: three policies, unscaled and with the
population's temperatures; feasibility from the weighted mean + z·sd/√n_eff) and
``reweighted-unscaled`` (unscaled policies only). Simpler than ``choose_policy`` in two ways
that may cost it a little: a fixed grid of 101 thresholds, and no pseudo-sample variance floor
in the bound (the weighted effective sample size stands in for n). An experiment, not an
interface.
"""

from __future__ import annotations

import argparse
import math
import statistics
from contextlib import ExitStack
from statistics import NormalDist

import torch
from budget_halvings import halves, macs_budget, print_table, score
from torch import Tensor

from cafedist.errors import CafeError
from cafedist.eval.budget import choose_all
from cafedist.eval.budget_search import Choice, Split, choose_policy
from cafedist.eval.budget_spec import Budget
from cafedist.eval.dynamic import exit_indices
from cafedist.eval.exits import exit_logits
from cafedist.eval.policies import POLICIES, exit_scores
from cafedist.eval.run import load_run

THRESHOLDS = [i / 100 for i in range(100)] + [1.0]


def weighted_choice(logits: Tensor, y: Tensor, w: Tensor, macs: Tensor, budget: Budget, z: float,
                    temperature_options: list[Tensor | None]) -> Choice:
    """The most accurate (policy, temperatures, θ) on weighted samples whose weighted MACs bound
    meets a MACs ``budget`` (ties: more MACs, earlier policy, smaller θ)."""
    hit = (logits.argmax(-1) == y.unsqueeze(0)).double()
    share = w / w.sum()
    n_eff = float(w.sum() ** 2 / (w**2).sum())
    th = torch.tensor(THRESHOLDS, dtype=torch.float64)
    exact = (th >= 1) | (th <= 0)  # the last exit alone, everything at exit 1: costs known without data
    best: tuple | None = None
    for p, policy in enumerate(POLICIES):
        for v, temps in enumerate(temperature_options):
            idx = exit_indices(exit_scores(logits, policy, temps), THRESHOLDS)
            accuracy = (hit.gather(0, idx) * share).sum(1)
            cost = macs[idx]
            mean = (cost * share).sum(1)
            sd = (((cost - mean.unsqueeze(1)) ** 2) * share).sum(1).sqrt()
            bound = torch.where(exact, mean, mean + z * sd / math.sqrt(n_eff))
            for t in torch.nonzero(bound <= budget.value * macs[-1] * (1 + 1e-9)).flatten().tolist():
                key = (-float(accuracy[t]), -float(mean[t]), p, v, t)
                if best is None or key < best[0]:
                    best = (key, Choice(policy=policy, threshold=THRESHOLDS[t],
                                        temperatures=None if temps is None else tuple(float(x) for x in temps)))
    assert best is not None  # θ = 0 is exact and within any budget above exit 1's cost
    return best[1]


def main() -> None:
    """The four rules on ``--repeats`` random halvings of each run; prints per run and overall."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="finished run directories trained with data.val_fraction > 0")
    parser.add_argument("--budget", default="macs=0.5")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--confidence", type=float, default=0.95)
    args = parser.parse_args()
    budget, z = macs_budget(parser, args.budget), NormalDist().inv_cdf(args.confidence)
    rules = ("pooled", "client", "reweighted", "reweighted-unscaled")
    results: dict[str, list[tuple[float, float, float]]] = {r: [] for r in rules}
    for run_dir in args.runs:
        with ExitStack() as stack:
            try:
                loaded = stack.enter_context(load_run(run_dir))
            except CafeError as exc:  # not a finished run directory: one line
                parser.error(str(exc))
            run = loaded.run
            macs_list = list(run.macs)
            clients = list(run.pool.each(sorted(run.pool.ids), modify=False))
            inputs = torch.cat([c.data.x_val for c in clients])
            labels = torch.cat([c.data.y_val for c in clients]).cpu()
            owner = torch.cat([torch.full((c.data.y_val.shape[0],), i) for i, c in enumerate(clients)])
            cross = [exit_logits(run.algo.eval_model(c.view), inputs).cpu() for c in clients]  # c's model, all inputs
            k = cross[0].shape[-1]
            priors = []
            for c in clients:
                counts = torch.bincount(c.data.y_train.cpu(), minlength=k).double() + 0.5
                priors.append(counts / counts.sum())
        macs = torch.tensor([float(x) for x in macs_list], dtype=torch.float64)
        n = len(clients)
        for rep in range(args.repeats):
            g = torch.Generator().manual_seed(rep)
            firsts_idx, seconds_idx = [], []
            for i in range(n):
                own = torch.nonzero(owner == i).flatten()
                a, b = halves(own.numel(), g)
                firsts_idx.append(own[a])
                seconds_idx.append(own[b])
            pooled_idx = torch.cat(firsts_idx)
            firsts = [Split(cross[i][:, firsts_idx[i]], labels[firsts_idx[i]]) for i in range(n)]
            seconds = [Split(cross[i][:, seconds_idx[i]], labels[seconds_idx[i]]) for i in range(n)]
            pooled, population = choose_all(firsts, [budget] * n, macs_list)
            temps = population[budget].temperatures
            pooled_prior = torch.bincount(labels[pooled_idx], minlength=k).double() + 0.5
            pooled_prior /= pooled_prior.sum()
            scaled = [None] + ([torch.tensor(temps, dtype=torch.float64)] if temps is not None else [])
            chosen = {"pooled": pooled, "client": [choose_policy(f, budget, macs_list) for f in firsts]}
            for name, options in (("reweighted", scaled), ("reweighted-unscaled", [None])):
                chosen[name] = [weighted_choice(cross[i][:, pooled_idx], labels[pooled_idx],
                                                (priors[i] / pooled_prior)[labels[pooled_idx]], macs, budget, z,
                                                options) for i in range(n)]
            for name in rules:
                results[name].append(score(chosen[name], seconds, macs_list, budget))
        print(run_dir, {r: round(statistics.mean(x[0] for x in v[-args.repeats:]), 2) for r, v in results.items()},
              flush=True)
    print_table(results)


if __name__ == "__main__":
    main()
