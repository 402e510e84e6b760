"""CAFEDistill: conflict-aware federated exit distillation over a public proxy set.

Source: Liu, Zhou, Tong, "CAFEDistill: Learning Personalized and Dynamic Models through
Federated Early-Exit Network Distillation", arXiv 2601.10015 (2026). No reference code was
released; ``docs/METHOD.md`` lists what follows the paper and what is our reading.

One round (the loop in :mod:`cafedist.train.loop` drives it):

1. local update: CE on the last exit and on this round's student exits, plus
   ``lam * KL(T_i || softmax(z_i^k / tau))`` on proxy items for every student exit k (the
   weighting is an option, :mod:`cafedist.algorithms.exit_loss`), where ``T_i`` is the
   personalized teacher received last round;
2. every client evaluates all exits on this round's proxy subset P'(t) (keyed by seed and
   round, identical on every rank) and the logits are gathered to rank 0 in client-id order;
3. rank 0 (:meth:`CAFEDistill.aggregate_logits`, batched over clients):
   a. teacher weights per client, one small QP solved in closed form
      ``alpha_i = proj_simplex(w - d_i / (2 mu))``, ``d_ij = 1 - cos(q_i, q_j)``;
   b. targets ``T_i = sum_j alpha_ij softmax(z_j^m / tau)`` (an exact mixture of distributions);
   c. students of the next round: depth-prioritized (shallow exits first), the partial depth
      filled greedily by similarity (conflict-aware);
   d. quarantine: clients with non-finite or exploding logits are no teachers this round;
4. each client receives only its own targets and student mask (client-decoupled).

Deviation from the paper: the paper's client-decoupled step averages teacher *head
parameters*; exchanging proxy logits lets us mix the teachers' *distributions* exactly.
Our reading of the selection: the similarity used by the greedy step is the cosine similarity
of the clients' last-exit proxy probabilities (the same matrix as the QP), because the last
exit is trained from round 0 while a not-yet-selected shallow exit is still untrained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from cafedist.algorithms.base import Algorithm, ClientView, LocalBatch, Phase, Setup, Spec
from cafedist.algorithms.exit_loss import ExitLossRule, per_exit, total, validate_choices
from cafedist.errors import ConfigError

#: what the teacher QP and the student selection compare: the clients' last-exit proxy
#: probabilities, or the parameters of their last exit heads (what public summaries of the paper say)
SIMILARITIES = ("output", "head_params")


@dataclass
class CAFEDistillParams:
    """CAFEDistill hyperparameters (defaults from ``docs/METHOD.md``)."""

    tau: float = 3.0  # distillation temperature
    lam: float = 1.0  # weight of the KD term
    mu: float = 0.5  # QP regulariser: small -> own teacher only, large -> data-size weights
    proxy_size: int = 1000  # P' = min(proxy_size, |P|) proxy items per round
    schedule_span: float = 0.5  # R(t) = min(t / (schedule_span * T), 1); 0.5 gives the paper's 2t/T
    cross_client_kd: bool = True  # ablation "no cross-client KD": False = local KD only
    student_selection: bool = True  # ablation "no student selection": False = all exits always
    logit_bound: float = 1.0e4  # |logit| above this quarantines a client as teacher
    shared_body: bool = False  # FedAvg the body parameters as well (paper's shared-backbone variant)
    # our readings of what the paper leaves open (docs/METHOD.md, algorithms/exit_loss.py)
    # lam: CE + lam KL (the default: +0.7 points of last-exit validation accuracy over lam_tau2 on two
    # seeds, no loss jump; docs/METHOD.md) | lam_tau2: CE + lam tau^2 KL (Hinton) | convex
    kd_weighting: str = "lam"
    unselected: str = "none"  # what a not-yet-selected shallow exit gets: none | ce
    exit_weights: list | None = None  # one loss multiplier per exit (None: all 1)
    similarity: str = "output"  # QP/selection similarity: output (last-exit proxy probs) | head_params

    def validate(self) -> None:
        for name, ok, expected in (
            ("tau", self.tau > 0, "> 0"),
            ("lam", self.lam >= 0, ">= 0"),
            ("mu", self.mu > 0, "> 0"),
            ("proxy_size", self.proxy_size >= 1, ">= 1"),
            ("schedule_span", 0 < self.schedule_span <= 1, "in (0, 1]"),
            ("logit_bound", self.logit_bound > 0, "> 0"),
            ("similarity", self.similarity in SIMILARITIES, f"one of {', '.join(SIMILARITIES)}"),
            *validate_choices("cafedistill", self),
        ):
            if not ok:
                raise ConfigError(f"algorithm.cafedistill.{name}: must be {expected}, "
                                  f"got {getattr(self, name)}")


# ----------------------------------------------------------------------------- math
def project_rows_to_simplex(v: Tensor, active: Tensor | None = None) -> Tensor:
    """Euclidean projection of every row of ``v`` [r, n] onto the probability simplex.

    ``active`` (bool [n]) restricts the simplex to those coordinates: inactive ones get
    exactly 0 and the result equals projecting the active sub-vector alone.
    Sort-based algorithm (Held et al.; Duchi et al. 2008), vectorized over rows.
    """
    v = v.to(torch.float64)
    if active is not None:
        # a finite, very negative value sorts last and never enters the threshold prefix
        v = torch.where(active.unsqueeze(0), v, torch.full_like(v, -1.0e12))
    u, _ = torch.sort(v, dim=1, descending=True)
    css = torch.cumsum(u, dim=1) - 1.0
    k = torch.arange(1, v.shape[1] + 1, dtype=v.dtype, device=v.device)
    cond = (u - css / k) > 0
    rho = cond.to(torch.int64).cumsum(dim=1).argmax(dim=1)  # last index where cond holds
    theta = css.gather(1, rho.unsqueeze(1)) / (rho + 1).to(v.dtype).unsqueeze(1)
    out = torch.clamp(v - theta, min=0.0)
    if active is not None:
        out = out * active.unsqueeze(0)
    return out


RowSel = slice | Tensor | None  # which clients' rows: a slice or 1-D index tensor of client ids; None = all


def _row_ids(rows: RowSel, n: int, device: torch.device) -> Tensor:
    """Client ids [r] (int64) of a row selection."""
    if rows is None:
        return torch.arange(n, device=device)
    if isinstance(rows, slice):
        return torch.arange(n, device=device)[rows]
    return rows.to(device=device, dtype=torch.int64).reshape(-1)


def cosine_similarity_rows(q: Tensor, rows: RowSel = None, block: int = 256) -> Tensor:
    """Cosine similarity [r, n] (float64) of the rows ``rows`` of ``q`` [n, D] with every row.

    The products run in ``q``'s dtype (float32 in the aggregation: the dominant cost, and
    float32 is accurate to ~1e-6 here), in blocks of ``block`` rows, so nothing bigger than
    [block, n] is ever created besides the result. For all rows (``rows=None``) the Gram
    matrix is symmetric and only its upper block triangle is computed (about half the work),
    then mirrored, the diagonal blocks included: the result is bit-symmetric whatever the BLAS
    kernel; the diagonal is exactly 1 (``cos(q, q)``) for non-zero rows.
    """
    n = q.shape[0]
    if rows is None:
        gram = torch.empty(n, n, dtype=q.dtype, device=q.device)
        for i in range(0, n, block):
            part = q[i:i + block] @ q[i:].T  # [b, n - i]: this block against itself and later rows
            gram[i:i + block, i:] = part
            gram[i + block:, i:i + block] = part[:, block:].T
            # a BLAS kernel need not return q_b @ q_b.T bit-symmetric: mirror its upper triangle
            diag = gram[i:i + block, i:i + block]
            upper = torch.ones(diag.shape, dtype=torch.bool, device=q.device).triu()
            diag.copy_(torch.where(upper, diag, diag.T))
        ids = torch.arange(n, device=q.device)
        norms = torch.diagonal(gram).to(torch.float64).clamp_min(0).sqrt()  # ||q_i||^2 is on the diagonal
    else:
        ids = _row_ids(rows, n, q.device)
        parts = [q[ids[i:i + block]] @ q.T for i in range(0, ids.shape[0], block)]
        gram = torch.cat(parts, dim=0) if parts else q.new_zeros(0, n)  # a rank may own no client
        norms = torch.linalg.vector_norm(q, dim=1).to(torch.float64)
    norms = norms.clamp_min(1e-12)
    sim = gram.to(torch.float64) / (norms[ids].unsqueeze(1) * norms.unsqueeze(0))
    sim[torch.arange(ids.shape[0], device=q.device), ids] = torch.where(norms[ids] > 1e-12, 1.0, 0.0).to(sim.dtype)
    return sim


def cosine_similarity_matrix(q: Tensor, chunk: int = 256) -> Tensor:
    """Pairwise cosine similarity [n, n] of the rows of ``q`` [n, D], computed in float64."""
    return cosine_similarity_rows(q.to(torch.float64), block=chunk)


def teacher_weights(sim: Tensor, w: Tensor, mu: float, healthy: Tensor | None = None,
                    rows: RowSel = None) -> Tensor:
    """Per-client teacher weights alpha [r, n] (rows on the simplex).

    Solves ``min_{alpha in simplex} sum_j alpha_j d_ij + mu * ||alpha - w||^2`` with
    ``d_ij = 1 - sim_ij`` in closed form: ``alpha_i = proj_simplex(w - d_i / (2 mu))``.
    Unhealthy clients get zero weight as teachers; ``w`` is renormalised over healthy ones,
    and an unhealthy client's own row ignores its (meaningless) distances.
    ``sim`` holds the similarity rows [r, n] of the clients ``rows`` (all n by default), so a
    rank can solve the QPs of its own clients only (rows are independent).
    """
    n = sim.shape[1]
    if healthy is None:
        healthy = torch.ones(n, dtype=torch.bool, device=sim.device)
    w = w.to(torch.float64) * healthy
    w = w / w.sum().clamp_min(1e-300)
    d = 1.0 - sim.to(torch.float64)
    healthy_rows = healthy[_row_ids(rows, n, healthy.device)]
    d = torch.where(healthy_rows.unsqueeze(1) & healthy.unsqueeze(0), d, torch.zeros_like(d))
    return project_rows_to_simplex(w.unsqueeze(0) - d / (2.0 * mu), active=healthy)


def _teacher_components(nonzero: Tensor, max_passes: int = 64) -> Tensor:
    """Component label [r] of every row of a weight pattern [r, n] (bool).

    Rows sharing a teacher, directly or through other rows, get one label (the smallest
    teacher id of the component): connected components of the bipartite row-teacher graph,
    by min-label propagation with pointer jumping (``label = label[label]``), so a long chain
    of overlapping supports takes O(log n) passes over the [r, n] mask, not O(n). The labels
    only order rows for :func:`_mixture_blocks`, which covers every non-zero whatever they
    are, so after ``max_passes`` the current labels are used as they are.
    """
    big = nonzero.shape[1]
    teacher = torch.arange(big, device=nonzero.device)
    row = torch.zeros(nonzero.shape[0], dtype=teacher.dtype, device=nonzero.device)
    for _ in range(max_passes):
        row = torch.where(nonzero, teacher.unsqueeze(0), big).amin(dim=1)  # [r]
        spread = torch.where(nonzero, row.unsqueeze(1), big).amin(dim=0)  # [n]; big: no row uses it
        new = torch.minimum(teacher, spread)
        while True:  # labels only decrease (label[k] <= k), so jumping converges
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, teacher):
            break
        teacher = new
    return row


def _mixture_blocks(nonzero: Tensor, max_rows: int) -> list[tuple[Tensor, Tensor]]:
    """Blocks ``(rows, cols)`` covering every non-zero of a sparse weight matrix [r, n].

    Rows are grouped by the connected component of their teachers (non-IID clients of one
    cluster trust each other and nobody else), then by first teacher; groups are cut at
    ``max_rows`` rows (bounding the temporaries of one product) and neighbours merge while
    that costs < 25 % more multiply-adds than keeping them apart (``rows x cols``), so a
    block-diagonal matrix gives one block per cluster.
    """
    n = nonzero.shape[1]
    first = nonzero.to(torch.uint8).argmax(dim=1)
    key = _teacher_components(nonzero) * n + first
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    starts = torch.nonzero(torch.diff(sorted_key, prepend=sorted_key[:1] - 1)).flatten().tolist()
    ends = starts[1:] + [order.shape[0]]
    groups = [order[i:min(i + max_rows, end)] for start, end in zip(starts, ends) for i in range(start, end, max_rows)]
    blocks: list[tuple[Tensor, Tensor]] = []
    cur_rows: Tensor | None = None
    cur_cols = torch.zeros(n, dtype=torch.bool, device=nonzero.device)
    for rows in groups:
        cols = nonzero[rows].any(dim=0)
        if cur_rows is not None:
            union = cur_cols | cols
            merged = (cur_rows.shape[0] + rows.shape[0]) * int(union.sum())
            apart = cur_rows.shape[0] * int(cur_cols.sum()) + rows.shape[0] * int(cols.sum())
            if cur_rows.shape[0] + rows.shape[0] <= max_rows and merged <= 1.25 * apart:
                cur_rows, cur_cols = torch.cat([cur_rows, rows]), union
                continue
            blocks.append((cur_rows, torch.nonzero(cur_cols).flatten()))
        cur_rows, cur_cols = rows, cols
    if cur_rows is not None:
        blocks.append((cur_rows, torch.nonzero(cur_cols).flatten()))
    return blocks


def mix_targets(alpha: Tensor, probs: Tensor, block: int = 128) -> Tensor:
    """``T_i = sum_j alpha_ij probs_j`` for alpha [r, n], probs [n, P, C] -> [r, P, C] (float32).

    Computed in ``probs``' dtype: the aggregation passes float32 (a mixture of distributions
    with weights summing to 1 loses nothing worth a float64 product twice as slow).
    Teacher weights are often block-sparse (non-IID clients trust their own cluster only), so
    when most weights are zero each block of rows (:func:`_mixture_blocks`, at most ``block``
    rows) multiplies only the teachers it uses; dense weights take one plain product.
    """
    n = probs.shape[0]
    flat = probs.reshape(n, -1)
    a = alpha.to(flat.dtype)
    shape = (a.shape[0], *probs.shape[1:])
    nonzero = a != 0
    if a.shape[0] == 0:
        return torch.zeros(shape, dtype=torch.float32, device=flat.device)
    if int(nonzero.sum()) > a.numel() // 2:
        return (a @ flat).reshape(shape).to(torch.float32)
    out = torch.empty(a.shape[0], flat.shape[1], dtype=flat.dtype, device=flat.device)
    for rows, cols in _mixture_blocks(nonzero, block):
        if cols.shape[0] > n // 2:  # copying most teachers costs more than multiplying by zeros
            out.index_copy_(0, rows, a[rows] @ flat)
        else:
            out.index_copy_(0, rows, a[rows][:, cols] @ flat.index_select(0, cols))
    return out.reshape(shape).to(torch.float32)


def softmax_into(out: Tensor, logits: Tensor, tau: float = 1.0) -> Tensor:
    """``softmax(logits / tau)`` over the last dim, written into ``out`` (same shape).

    Writing into a reused buffer instead of two fresh tensors (``logits / tau``, then the
    softmax) halves the time on CPU, where first-touching new memory costs more than the
    math; the in-place softmax is bitwise equal to ``torch.softmax(logits / tau)``.
    """
    if tau == 1.0:
        return torch.softmax(logits, dim=-1, out=out)
    torch.div(logits, tau, out=out)
    return torch.softmax(out, dim=-1, out=out)


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


def kl_batchmean(log_q: Tensor, p: Tensor) -> Tensor:
    """``F.kl_div(log_q, p, reduction="batchmean")``, written with ops that have vmap rules.

    Same formula as ATen's kl_div (``xlogy(p, p) - p * log_q``, summed, over the batch size),
    but aten::kl_div has no batching rule, so under ``vmap`` it fell back to a slow loop.
    """
    return (torch.xlogy(p, p) - p * log_q).sum() / log_q.shape[0]


def healthy_clients(logits: Tensor, bound: float) -> Tensor:
    """Bool [n]: clients whose gathered logits [n, ...] are all finite and within ``bound``.

    ``amax``/``amin`` propagate NaN and keep +-inf, and need no temporaries (``abs``,
    ``isfinite`` would each write a copy); they are also ~3x faster than ``aminmax`` on CPU.
    This reads every exit's logits: memory traffic comparable to the rest of the aggregation.
    """
    flat = logits.reshape(logits.shape[0], -1)
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    return torch.isfinite(lo) & torch.isfinite(hi) & (hi <= bound) & (lo >= -bound)


# ----------------------------------------------------------------------------- algorithm
class CAFEDistill(Algorithm):
    """Personalized early-exit networks taught by a per-client mixture of last exits."""

    name = "cafedistill"
    Params = CAFEDistillParams
    exchanges_logits = True
    # local_loss reads only logits, labels and state tensors: cafedist.train.packed may vmap it
    vmappable_loss = True

    def __init__(self, params: CAFEDistillParams, setup: Setup):
        super().__init__(params, setup)
        self.loss_rule = ExitLossRule.of("cafedistill", params, setup.num_exits)
        self.head_prefix = f"heads.{setup.num_exits - 1}."
        self.last_report: dict[str, Any] = {}
        self._buffer: Tensor | None = None
        self._head_numel = 0

    def bind_model(self, model: nn.Module) -> None:
        self._head_numel = sum(p.numel() for k, p in model.named_parameters() if k.startswith(self.head_prefix))

    def _workspace(self, like: Tensor) -> Tensor:
        """A float32 buffer shaped like ``like``, kept between rounds on CPU.

        Rank 0 needs one [n, P', C] scratch tensor per round; on CPU allocating it afresh costs
        page faults comparable to the softmax written into it. GPUs' caching allocator already
        reuses memory, so nothing is kept there.
        """
        buf = self._buffer
        if buf is None or buf.shape != like.shape or buf.device != like.device:
            buf = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        self._buffer = buf if buf.device.type == "cpu" else None
        return buf

    # ---------------------------------------------------------------- client side
    def init_client_state(self, cid: int) -> dict[str, Tensor]:
        m = self.setup.num_exits
        students = student_masks(0, self.setup.rounds, 1, m, torch.ones(1, 1),
                                 self.params.schedule_span)[0]
        if not self.params.student_selection:
            students = torch.ones(m, dtype=torch.bool)
        return {"students": students}

    def students(self, state: dict[str, Tensor]) -> Tensor:
        return state["students"].to(torch.bool).cpu()

    def uses_proxy_batch(self, client: ClientView, phase: Phase) -> bool:
        state = client.state
        has_students = bool(self.students(state)[:-1].any())
        return has_students and "targets" in state and self.params.lam > 0

    def _terms(self, state: dict[str, Tensor], batch: LocalBatch) -> list:
        kl = None
        if batch.proxy_logits is not None:
            tau, teacher = self.params.tau, state["targets"][batch.proxy_pos]

            def kl(k: int) -> Tensor:
                return kl_batchmean(F.log_softmax(batch.proxy_logits[k] / tau, dim=1), teacher)

        return self.loss_rule.terms(batch.logits, batch.y, self.students(state), kl)

    def local_loss(self, state: dict[str, Tensor], batch: LocalBatch) -> Tensor:
        return total(self._terms(state, batch))

    def exit_losses(self, state: dict[str, Tensor], batch: LocalBatch) -> list[Tensor | None]:
        return per_exit(self._terms(state, batch), len(batch.logits))

    def shared_mask(self, cid: int, key: str, tensor: Tensor) -> bool:
        return self.params.shared_body and not key.startswith("heads.")

    # ---------------------------------------------------------------- coordinator
    def proxy_exits(self) -> tuple[int, ...]:
        return (self.setup.num_exits - 1,)  # teachers and similarities are last-exit only

    def upload_spec(self) -> Spec:
        if self.params.similarity != "head_params":
            return {}
        return {"head": ((self._head_numel,), torch.float32)}

    def upload(self, client: ClientView) -> dict[str, Tensor]:
        if self.params.similarity != "head_params":
            return {}
        head = client.model.heads[self.setup.num_exits - 1]
        return {"head": parameters_to_vector(head.parameters()).detach().to(torch.float32)}

    def payload_spec(self) -> Spec:
        return {"targets": ((self.setup.proxy_size, self.setup.num_classes), torch.float32),
                "students": ((self.setup.num_exits,), torch.uint8)}

    def aggregate(self, round_idx: int, gathered: dict[str, Tensor],
                  active: Tensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
        heads = gathered.get("head")
        if heads is None:
            return self.aggregate_logits(round_idx, gathered["logits"], active)
        # similarity of the last heads' parameters; a client with broken heads compares as zero
        finite = healthy_clients(heads, self.params.logit_bound).to(heads.device)
        safe = torch.where(finite.unsqueeze(1), heads.to(torch.float64), torch.zeros((), dtype=torch.float64,
                                                                                     device=heads.device))
        return self.aggregate_rows(round_idx, gathered["logits"], active, sim_override=cosine_similarity_matrix(safe))

    def aggregate_logits(self, round_idx: int, logits: Tensor,
                         active: Tensor | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Teacher weights, targets and the next round's students from logits [n, e, P', C].

        ``e`` exits in increasing order, the last exit last (e = 1 by default, see
        :meth:`proxy_exits`); the health check covers every exit given.
        """
        return self.aggregate_rows(round_idx, logits, active)

    def aggregate_rows(self, round_idx: int, logits: Tensor, active: Tensor | None = None, rows: RowSel = None,
                       gather_sim: Callable[[Tensor], Tensor] | None = None, sim_override: Tensor | None = None
                       ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The payload rows of the clients ``rows`` (all by default) from logits [n, e, P', C].

        Sharded aggregation: after an all-gather of the logits, every rank calls this for its
        own clients; ``gather_sim`` turns the rank's similarity rows [r, n] into the full
        [n, n] matrix (an all-gather of n x n floats), which only the student selection needs.
        The rows equal those of rank-0-only aggregation. In the report, ``self_weight`` is
        the mean over the given rows only.

        Cost: the similarity Gram product (float32, symmetric half when all rows) and the
        target mixture ``alpha @ probs`` are the two O(r n P' C) steps; softmaxes and the
        health check are single passes over the data. Peak memory ~2 copies of [n, P', C].
        """
        p = self.params
        n, m = logits.shape[0], self.setup.num_exits
        ids = _row_ids(rows, n, logits.device)
        finite = healthy_clients(logits, p.logit_bound)
        # clients that did not train this round send stale logits: they teach no one
        healthy = finite if active is None else finite & active.to(finite.device)
        last = logits[:, -1].float()  # [n, P', C]: the last exit (a view when the logits are float32)
        # similarity on plain probabilities (discriminative); teachers at temperature tau.
        # One buffer serves both: the teacher softmax overwrites the similarity's in place.
        probs = softmax_into(self._workspace(last), last)
        if not bool(healthy.all()):
            probs[~healthy] = 1.0 / probs.shape[2]  # broken logits compare as uniform
        if sim_override is not None:  # similarity: head_params (all rows, computed by the caller)
            sim_rows = sim = sim_override.to(probs.device)
        else:
            sim_rows = cosine_similarity_rows(probs.reshape(n, -1), rows)
            sim = sim_rows if rows is None else (gather_sim(sim_rows) if gather_sim else None)
        if p.cross_client_kd:
            alpha = teacher_weights(sim_rows, self.setup.data_weights.to(sim_rows.device), p.mu, healthy, rows)
        else:
            alpha = torch.eye(n, dtype=torch.float64, device=sim_rows.device)[ids]
        teacher_probs = softmax_into(probs, last, p.tau)
        if not bool(healthy.all()):
            teacher_probs[~healthy] = 0.0
        targets = mix_targets(alpha, teacher_probs)
        del teacher_probs
        if not p.cross_client_kd:
            # local KD of an unhealthy client would copy its own broken logits: use uniform
            targets[~healthy[ids]] = 1.0 / targets.shape[2]
        if not p.student_selection:
            students = torch.ones(n, m, dtype=torch.bool)
        elif sim is None:
            raise ValueError("aggregate_rows: selecting students needs the full similarity (pass gather_sim)")
        else:
            students = student_masks(round_idx + 1, self.setup.rounds, n, m, sim, p.schedule_span, healthy)
        report = {
            "n_students_next": int(students[:, : m - 1].sum()),
            "quarantined": [int(i) for i in torch.nonzero(~finite).flatten()],
            "self_weight": (float(alpha[torch.arange(ids.shape[0], device=alpha.device), ids].mean())
                            if ids.numel() else None),
        }
        self.last_report = report
        return {"targets": targets, "students": students[ids.cpu()].to(torch.uint8)}, report

    def receive(self, client: ClientView, payload: dict[str, Tensor], round_idx: int) -> None:
        state = client.state
        state["targets"] = payload["targets"]
        state["students"] = payload["students"].to(torch.bool)
        state["targets_round"] = torch.tensor(round_idx, dtype=torch.int64)
