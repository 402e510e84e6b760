"""Machinery shared by the personalized-aggregation baselines (FedAMP, pFedGraph, FedRoD, FedPAC).

* :class:`ParamLayout` -- names and shapes of the model's parameters, so an algorithm can size
  its upload/payload rows (learned from the loop's ``shared_mask`` probe, which every rank runs
  on the same freshly built model before the first round);
* rows: a model's parameters flattened into one float32 vector and back;
* rank-0 math on ``[n, D]`` rows, chunked over D so no ``n x D`` float64 copy is ever made:
  Gram matrices, cosine similarity, per-client mixtures ``W @ rows``;
* two solvers for per-client QPs over the probability simplex, batched over clients;
* :func:`feature_tap`: the input of every exit head's final Linear (the "features" of
  prototype- and classifier-based methods), recorded during the ordinary forward pass;
* :class:`ParameterMixing`: the common skeleton of FedAMP and pFedGraph (upload the update
  since the common initialisation, rank 0 mixes the updates with a per-client weight matrix,
  each client receives its own mixture).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from cafedist.algorithms.base import Algorithm, ClientView, Setup, Spec
from cafedist.algorithms.common import is_head
from cafedist.algorithms.proxy_math import project_rows_to_simplex
from cafedist.flat import flatten, unflatten_into

_CHUNK = 1 << 16  # columns of an [n, D] row block handled at once on rank 0


# ----------------------------------------------------------------------------- parameter layout
class ParamLayout:
    """Parameter names and shapes of the client model, in ``named_parameters`` order.

    Filled by :meth:`record_model` from an algorithm's ``bind_model``, which every rank calls
    with a freshly built model before anything else, so every rank learns the same layout
    without any communication.
    """

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}

    def record(self, key: str, shape: Iterable[int]) -> None:
        """Remember parameter ``key`` (idempotent)."""
        self.shapes.setdefault(key, tuple(shape))

    def record_model(self, model: nn.Module) -> None:
        """Remember every parameter of ``model``, in ``named_parameters`` order."""
        for key, p in model.named_parameters():
            self.record(key, p.shape)

    def keys(self, select: Callable[[str], bool] | None = None) -> list[str]:
        """Recorded keys (optionally filtered), in model order."""
        if not self.shapes:
            raise RuntimeError("parameter layout unknown: the loop has not probed shared_mask yet")
        return [k for k in self.shapes if select is None or select(k)]

    def numel(self, select: Callable[[str], bool] | None = None) -> int:
        """Number of scalars in the selected parameters (the length of their row)."""
        return sum(int(torch.Size(self.shapes[k]).numel()) for k in self.keys(select))

    def is_classifier(self, key: str, num_classes: int) -> bool:
        """Is ``key`` a parameter of an exit head's final Linear (its classifier)?

        The classifier is the head's 2-D weight with ``num_classes`` rows, plus the bias of the
        same module. Works on a partially recorded layout (weights are registered before their
        bias), so ``shared_mask`` can answer while the probe is still running.
        """
        if not is_head(key):
            return False
        shape = self.shapes.get(key)
        if key.endswith(".weight"):
            return shape is not None and len(shape) == 2 and shape[0] == num_classes
        if key.endswith(".bias"):
            return self.is_classifier(key[: -len("bias")] + "weight", num_classes)
        return False

    def classifier_keys(self, num_classes: int) -> list[str]:
        """All classifier parameters, exit 0 first."""
        return self.keys(lambda k: self.is_classifier(k, num_classes))

    def feature_dims(self, num_classes: int) -> list[int]:
        """Per exit, the input width of its classifier (the feature dimension d_k)."""
        return [self.shapes[k][1] for k in self.classifier_keys(num_classes) if k.endswith(".weight")]


# ----------------------------------------------------------------------------- rows
def params_row(module: nn.Module, keys: list[str]) -> Tensor:
    """The named parameters ``keys`` of ``module`` flattened into one detached float32 row."""
    named = dict(module.named_parameters())
    return flatten([named[k] for k in keys]).to(torch.float32)


def load_row(module: nn.Module, keys: list[str], row: Tensor) -> None:
    """Copy consecutive slices of ``row`` into the parameters ``keys`` of ``module`` (in place)."""
    named = dict(module.named_parameters())
    unflatten_into(row, [named[k] for k in keys])


def split_row(row: Tensor, layout: ParamLayout, keys: list[str]) -> dict[str, Tensor]:
    """A row cut back into parameter-shaped tensors (views), keyed by parameter name."""
    out, offset = {}, 0
    for k in keys:
        shape = layout.shapes[k]
        size = int(torch.Size(shape).numel())
        out[k] = row[offset:offset + size].view(shape)
        offset += size
    return out


# ----------------------------------------------------------------------------- rank-0 row math
def gram_matrix(rows: Tensor, chunk: int = _CHUNK) -> Tensor:
    """``rows @ rows.T`` [n, n] in float64, accumulated over column chunks of ``rows`` [n, D]."""
    n = rows.shape[0]
    g = torch.zeros(n, n, dtype=torch.float64, device=rows.device)
    for s in range(0, rows.shape[1], chunk):
        block = rows[:, s:s + chunk].to(torch.float64)
        g += block @ block.T
    return g


def cosine_from_gram(g: Tensor) -> Tensor:
    """Pairwise cosine similarity from a Gram matrix (zero rows have similarity 0)."""
    norm = torch.diagonal(g).clamp_min(0.0).sqrt().clamp_min(1e-12)
    return g / (norm.unsqueeze(0) * norm.unsqueeze(1))


def sq_distances_from_gram(g: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances ``||r_i - r_j||^2`` from a Gram matrix."""
    diag = torch.diagonal(g)
    return (diag.unsqueeze(0) + diag.unsqueeze(1) - 2.0 * g).clamp_min(0.0)


def mix_rows(weights: Tensor, rows: Tensor, chunk: int = _CHUNK) -> Tensor:
    """Per-client mixtures ``weights @ rows`` ([r, n] x [n, D] -> [r, D] float32), float64 inside."""
    w = weights.to(torch.float64)
    out = torch.empty(w.shape[0], rows.shape[1], dtype=torch.float32, device=rows.device)
    for s in range(0, rows.shape[1], chunk):
        out[:, s:s + chunk] = (w @ rows[:, s:s + chunk].to(torch.float64)).to(torch.float32)
    return out


def masked_rows(weights: Tensor, active: Tensor) -> Tensor:
    """Zero the rows and columns of inactive clients (they neither give nor receive)."""
    a = active.to(device=weights.device, dtype=weights.dtype)
    return weights * a.unsqueeze(0) * a.unsqueeze(1)


# ----------------------------------------------------------------------------- simplex QPs
def simplex_qp(quad: Tensor, lin: Tensor | None = None, active: Tensor | None = None,
               iters: int = 500) -> Tensor:
    """Batched ``argmin_{x in simplex} x^T Q_b x + c_b^T x`` for ``quad`` [b, n, n] (PSD).

    Accelerated projected gradient (FISTA) with step ``1 / L``, ``L = 2 lambda_max(Q_b)``, a
    fixed number of iterations (deterministic) and the start at the uniform point. ``active``
    (bool [n]) restricts every simplex to those coordinates.
    """
    q = quad.to(torch.float64)
    b, n, _ = q.shape
    c = torch.zeros(b, n, dtype=q.dtype, device=q.device) if lin is None else lin.to(q)
    a = torch.ones(n, dtype=torch.bool, device=q.device) if active is None else active.to(q.device)
    step = 1.0 / (2.0 * torch.linalg.eigvalsh(q).amax(dim=-1).clamp_min(1e-12))  # [b]
    x = (a.to(q.dtype) / a.sum()).expand(b, n).clone()
    y, t = x.clone(), 1.0
    for _ in range(iters):
        grad = 2.0 * torch.bmm(q, y.unsqueeze(-1)).squeeze(-1) + c
        x_next = project_rows_to_simplex(y - step.unsqueeze(1) * grad, active=a)
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        y = x_next + ((t - 1.0) / t_next) * (x_next - x)
        x, t = x_next, t_next
    return x


def sparsify_simplex(x: Tensor, eps: float = 1e-3) -> Tensor:
    """Zero the weights below ``eps`` and renormalise each row to sum to 1."""
    x = torch.where(x < eps, torch.zeros_like(x), x)
    return x / x.sum(dim=-1, keepdim=True).clamp_min(1e-300)


# ----------------------------------------------------------------------------- features
def final_linear(head: nn.Module) -> nn.Linear:
    """The Linear that ends an exit head (its classifier)."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"exit head {type(head).__name__} has no Linear layer")
    return linears[-1]


def classifier_prefixes(model: nn.Module) -> list[str]:
    """Module names of every exit head's final Linear (e.g. ``heads.0.4``), exit 0 first."""
    prefixes = []
    for k, head in enumerate(model.heads):
        fc = final_linear(head)
        prefixes.append(f"heads.{k}." + next(n for n, m in head.named_modules() if m is fc))
    return prefixes


def classifier_names(model: nn.Module) -> list[str]:
    """Parameter names of every exit head's final Linear, exit 0 first."""
    modules = dict(model.named_modules())
    return [f"{prefix}.{p}" for prefix in classifier_prefixes(model) for p, _ in modules[prefix].named_parameters()]


class FeatureTap:
    """Records, at every forward, the input of each exit head's final Linear.

    ``features[k]`` is exit k's feature batch of the latest forward (None for exits that
    forward did not reach); it keeps its autograd graph, so a loss may use it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.features: list[Tensor | None] = [None] * len(model.heads)
        model.register_forward_pre_hook(self._reset)
        for k, head in enumerate(model.heads):
            final_linear(head).register_forward_pre_hook(self._recorder(k))

    def _reset(self, module: nn.Module, args: Any) -> None:
        # a forward with ``upto`` must not expose a deeper exit's features from an older call
        self.features = [None] * len(self.features)

    def _recorder(self, k: int) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            self.features[k] = args[0]
        return hook


_TAPS: "weakref.WeakKeyDictionary[nn.Module, FeatureTap]" = weakref.WeakKeyDictionary()


def feature_tap(model: nn.Module) -> FeatureTap:
    """The :class:`FeatureTap` of ``model``, installed on first use (hooks live with the model)."""
    tap = _TAPS.get(model)
    if tap is None:
        tap = _TAPS[model] = FeatureTap(model)
    return tap


def epoch_window(state: dict[str, Tensor], key: str, batch: int, start: int, size: int) -> bool:
    """Count ``batch`` samples under ``state[key]``; True if they fall in ``[start, start + size)``.

    Algorithms never see a client's data outside local steps, so per-epoch statistics are
    gathered from the training batches; this tells a loss which epoch a batch belongs to.
    """
    seen = int(state.get(key, torch.zeros((), dtype=torch.int64)))
    state[key] = torch.tensor(seen + batch, dtype=torch.int64)
    return start <= seen < start + size


# ----------------------------------------------------------------------------- FedAMP / pFedGraph skeleton
INIT = "mix.init"  # the client's parameters at the common initialisation (row)


class ParameterMixing(Algorithm):
    """Personalized aggregation ``u_i = sum_j W_ij w_j`` of whole models on rank 0.

    Every client starts from the same initialisation ``w_0`` (kept as a row in its state) and
    uploads its update ``delta_i = w_i - w_0``; subclasses give the weight matrix ``W`` (rows
    on the simplex over this round's participants) from the updates. Because each row of
    ``W`` sums to 1, ``u_i = w_0 + sum_j W_ij delta_j``: rank 0 mixes only updates and every
    client adds its own copy of ``w_0`` back. Parameters only (buffers stay local).
    """

    common_init = True

    def __init__(self, params: Any, setup: Setup):
        super().__init__(params, setup)
        self.layout = ParamLayout()
        self.last_weights: Tensor | None = None  # W of the latest aggregation (for reports and tests)

    # ------------------------------------------------------------- to be provided
    def mixing_weights(self, deltas: Tensor, active: Tensor) -> Tensor:
        """Per-client weights W [n, n] from the updates [n, D]; rows of active clients on the simplex."""
        raise NotImplementedError

    def take_mixture(self, client: ClientView, mixture: Tensor) -> None:
        """What a client does with its personalized model ``u_i`` (a parameter row)."""
        raise NotImplementedError

    # ------------------------------------------------------------- shared behaviour
    def bind_model(self, model: nn.Module) -> None:
        self.layout.record_model(model)

    def shared_mask(self, cid: int, key: str, tensor: Tensor) -> bool:
        return False  # nothing is averaged globally: each client gets its own mixture

    def on_local_start(self, client: ClientView, round_idx: int) -> None:
        # the first call comes before the client ever trained or received: it is still at w_0
        if INIT not in client.state:
            client.state[INIT] = params_row(client.model, self.layout.keys())

    def upload_spec(self) -> Spec:
        return {"delta": ((self.layout.numel(),), torch.float32)}

    def upload(self, client: ClientView) -> dict[str, Tensor]:
        row = params_row(client.model, self.layout.keys())
        # a client that never trained is still at w_0 (and is idle this round: its row is ignored)
        return {"delta": row - client.state[INIT] if INIT in client.state else torch.zeros_like(row)}

    def payload_spec(self) -> Spec:
        return {"mixed": ((self.layout.numel(),), torch.float32)}

    def aggregate(self, round_idx: int, gathered: dict[str, Tensor],
                  active: Tensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
        deltas = gathered["delta"]
        weights = masked_rows(self.mixing_weights(deltas, active), active)
        self.last_weights = weights.cpu()
        report = {"self_weight": float(torch.diagonal(weights)[active.to(weights.device)].mean())}
        return {"mixed": mix_rows(weights, deltas)}, report

    def receive(self, client: ClientView, payload: dict[str, Tensor], round_idx: int) -> None:
        self.take_mixture(client, client.state[INIT] + payload["mixed"].to(client.state[INIT].device))
