"""Neutral math of methods that learn from other clients' outputs, batched over clients.

Similarity of clients (cosine of their proxy outputs or parameters), the Euclidean projection
onto the probability simplex, per-client teacher weights from a small QP, the exact mixture of
teacher distributions, the health check of gathered logits, and the one KD term. Used by
CAFEDistill and its variants, the proxy-distillation baselines and the parameter-mixing ones;
none of it knows which method calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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


def cosine_similarity_rows(q: Tensor, block: int = 256) -> Tensor:
    """Pairwise cosine similarity [n, n] (float64) of the rows of ``q`` [n, D].

    The products run in ``q``'s dtype (float32 in the aggregation: the dominant cost, and
    float32 is accurate to ~1e-6 here), in blocks of ``block`` rows, so nothing bigger than
    [block, n] is ever created besides the result. The Gram matrix is symmetric, so only its
    upper block triangle is computed (about half the work), then mirrored, the diagonal blocks
    included: the result is bit-symmetric whatever the BLAS kernel; the diagonal is exactly 1
    (``cos(q, q)``) for non-zero rows.
    """
    n = q.shape[0]
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
    norms = norms.clamp_min(1e-12)
    sim = gram.to(torch.float64) / (norms[ids].unsqueeze(1) * norms.unsqueeze(0))
    sim[ids, ids] = torch.where(norms > 1e-12, 1.0, 0.0).to(sim.dtype)
    return sim


def cosine_similarity_matrix(q: Tensor, chunk: int = 256) -> Tensor:
    """Pairwise cosine similarity [n, n] of the rows of ``q`` [n, D], computed in float64."""
    return cosine_similarity_rows(q.to(torch.float64), block=chunk)


def simplex_qp_identity(d: Tensor, p: Tensor, lam: float, active: Tensor) -> Tensor:
    """Rows ``x_i = argmin_{x in simplex} lam x^T x + (d_i - 2 lam p)^T x`` [n, n] (closed form).

    ``lam ||x||^2 - 2 lam p^T x = lam ||x - p||^2 - const``, so the minimiser is the Euclidean
    projection of ``p - d_i / (2 lam)`` onto the simplex over the active clients. ``p`` is
    renormalised over the active clients (data-size weights of this round's participants).
    """
    a = active.to(device=d.device)
    p = p.to(device=d.device, dtype=torch.float64) * a
    p = p / p.sum().clamp_min(1e-300)
    return project_rows_to_simplex(p.unsqueeze(0) - d.to(torch.float64) / (2.0 * lam), active=a)


def teacher_weights(sim: Tensor, w: Tensor, mu: float, healthy: Tensor | None = None) -> Tensor:
    """Per-client teacher weights alpha [n, n] (rows on the simplex).

    Solves ``min_{alpha in simplex} sum_j alpha_j d_ij + mu * ||alpha - w||^2`` with
    ``d_ij = 1 - sim_ij`` in closed form: ``alpha_i = proj_simplex(w - d_i / (2 mu))``.
    Unhealthy clients get zero weight as teachers; ``w`` is renormalised over healthy ones,
    and an unhealthy client's own row ignores its (meaningless) distances.
    """
    if healthy is None:
        healthy = torch.ones(sim.shape[1], dtype=torch.bool, device=sim.device)
    d = 1.0 - sim.to(torch.float64)
    d = torch.where(healthy.unsqueeze(1) & healthy.unsqueeze(0), d, torch.zeros_like(d))
    return simplex_qp_identity(d, w, mu, healthy)  # with p = w and lam = mu


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


def kd_loss(student_logits: Tensor, teacher_probs: Tensor, tau: float = 1.0, *, tau_squared: bool = True) -> Tensor:
    """The one knowledge-distillation term: ``tau^2 * KL(teacher || softmax(student / tau))``,
    batch mean (Hinton et al.); without the ``tau^2`` factor when ``tau_squared`` is false
    (methods that weight the term themselves). Written with vmap-friendly ops."""
    kl = kl_batchmean(F.log_softmax(student_logits / tau, dim=1), teacher_probs)
    return tau * tau * kl if tau_squared else kl
