"""FedPAC-EE: feature alignment to global prototypes and classifier collaboration, per exit.

Source: Xu, Tong, Huang, "Personalized Federated Learning with Feature Alignment and
Classifier Collaboration" (ICLR 2023); reference code JianXu95/FedPAC (``methods/fedpac.py``,
``tools.py``) and PFLlib's FedPAC (``clientpac.py`` / ``serverpac.py``).

Split of the early-exit network: exit k's *classifier* is the final Linear of head k; the
*feature extractor* is everything else (body and the heads' inner layers), so exit k's
feature f_k is the classifier's input. Per round and client:

1. classifier phase (1 epoch, extractor frozen): CE at every exit. The extractor is the one
   just received, so this pass also yields the statistics of the classifier QP
   (per exit: ``h_k[c] = p(c) mu_c`` and the variance term ``v_k``, as the reference's
   ``statistics_extraction``);
2. extractor phase (``train.local_epochs``, classifiers frozen):
   ``sum_k CE_k + lam * MSE(f_k, P_k[y])`` toward the global prototypes ``P_k`` of last round;
3. upload: per exit v_k, h_k, the class sums and counts of f_k (local prototypes) and the
   classifiers; rank 0 computes the global prototypes (sample-weighted class means over
   participants), and for every client i and exit k the classifier weights
   ``alpha = argmin_{simplex} alpha^T (diag(v) + D_i) alpha``,
   ``D_i[j, l] = <h_i - h_j, h_i - h_l>``, and sends the combined classifier
   ``sum_j alpha_j W_j`` and the prototypes; the extractor is averaged (sample-weighted).

Deviations (forced by the interface or by numerics): the QP is solved by batched accelerated
projected gradient instead of cvxpy (no eigenvalue clipping is needed: the matrix is PSD by
construction); weights below 1e-3 are zeroed as in the reference and then renormalised so the
rows stay on the simplex. The local prototypes are the class means of the features seen
during the last epoch of the extractor phase (the algorithm sees data only through training
steps; the reference makes one more pass after training). Classes without a global prototype
get no alignment term (the reference falls back to the client's pre-training prototype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cafedist.algorithms.base import Algorithm, Check, ClientView, LocalBatch, Phase, Setup, Spec
from cafedist.algorithms.common import exit_index, exits_ce
from cafedist.algorithms.personalization import (
    ParamLayout,
    epoch_window,
    feature_tap,
    gram_matrix,
    load_row,
    masked_rows,
    mix_rows,
    params_row,
    simplex_qp,
    sparsify_simplex,
)

SIZE = "pac.size"  # the client's number of training samples
SEEN = "pac.seen"  # samples of the extractor phase so far this round
STAT = "pac.stat."  # prefix of the classifier-phase statistics (counts, sums, squared norms)
PROTO = "pac.proto."  # prefix of the local prototype accumulators (counts, sums)
GLOBAL = "pac.global."  # prefix of the received global prototypes (per exit) and their class mask


@dataclass
class FedPACParams:
    """FedPAC hyperparameters (reference default lam = 1)."""

    lam: float = 1.0  # weight of the feature-alignment (prototype MSE) term
    qp_iters: int = 500  # iterations of the classifier-weight QP solver

    def checks(self) -> list[Check]:
        return [("lam", self.lam >= 0, ">= 0"), ("qp_iters", self.qp_iters >= 1, ">= 1")]


def accumulate_classes(state: dict[str, Tensor], prefix: str, feats: list[Tensor], y: Tensor,
                       num_classes: int, squares: bool = False) -> None:
    """Add per-class counts, feature sums (and squared-norm sums) of a batch to ``state``."""
    onehot = F.one_hot(y, num_classes).to(torch.float64)  # [B, C]
    zero = torch.zeros(num_classes, dtype=torch.float64, device=y.device)
    state[prefix + "count"] = state.get(prefix + "count", zero).to(y.device) + onehot.sum(0)
    for k, f in enumerate(feats):
        f = f.detach().to(torch.float64)
        key = f"{prefix}sum.{k}"
        state[key] = state.get(key, torch.zeros(num_classes, f.shape[1], dtype=torch.float64,
                                                device=y.device)) + onehot.T @ f
        if squares:
            key = f"{prefix}sq.{k}"
            state[key] = state.get(key, zero) + onehot.T @ f.pow(2).sum(1)


def classifier_statistics(count: Tensor, sums: Tensor, squares: Tensor) -> tuple[Tensor, Tensor]:
    """``(v, h)`` of one exit from class counts [C], feature sums [C, d], squared-norm sums [C].

    ``h[c] = p(c) mu_c`` and ``v = sum_c (p(c) E_c||f||^2 - p(c)^2 ||mu_c||^2) / N`` (the
    reference's variance term, divided by the local sample size N).
    """
    total = count.sum().clamp_min(1.0)
    h = sums / total
    v = (squares.sum() / total - sums.pow(2).sum() / total**2) / total
    return v, h


def head_weights(v: Tensor, h: Tensor, active: Tensor, iters: int, chunk: int = 64) -> Tensor:
    """Classifier-combination weights [n, n] of one exit from ``v`` [n] and ``h`` [n, C*d].

    Row i solves ``min_{alpha in simplex} alpha^T (diag(v) + D_i) alpha`` over the active
    clients with ``D_i[j, l] = <h_i - h_j, h_i - h_l>``, built from one Gram matrix; the
    [n, n] matrices of ``chunk`` clients are solved together.
    """
    g = gram_matrix(h)
    diag = torch.diagonal(g)
    var = torch.diag(v.to(torch.float64)).unsqueeze(0)
    rows = []
    for s in range(0, g.shape[0], chunk):
        i = slice(s, s + chunk)
        # D_i[j, l] = G[j, l] - G[i, j] - G[i, l] + G[i, i]   for the clients i of this chunk
        dist = g.unsqueeze(0) - g[i].unsqueeze(2) - g[i].unsqueeze(1) + diag[i].view(-1, 1, 1)
        rows.append(simplex_qp(dist + var, active=active, iters=iters))
    return sparsify_simplex(torch.cat(rows))


class FedPAC(Algorithm):
    """Shared feature extractor aligned to global prototypes; per-client classifier mixtures."""

    name = "fedpac"
    Params = FedPACParams
    common_init = True

    def __init__(self, params: FedPACParams, setup: Setup):
        super().__init__(params, setup)
        self.layout = ParamLayout()
        self.last_weights: Tensor | None = None  # [m, n, n] classifier weights of the latest round

    # ---------------------------------------------------------------- layout
    def _is_classifier(self, key: str) -> bool:
        return self.layout.is_classifier(key, self.setup.num_classes)

    def _extractor(self, key: str) -> bool:
        return not self._is_classifier(key)

    def bind_model(self, model: nn.Module) -> None:
        self.layout.record_model(model)

    def shared_mask(self, cid: int, key: str, tensor: Tensor) -> bool:
        return self._extractor(key)

    def _feature_sizes(self) -> list[int]:
        return [self.setup.num_classes * d for d in self.layout.feature_dims(self.setup.num_classes)]

    # ---------------------------------------------------------------- client side
    def init_client_state(self, cid: int) -> dict[str, Tensor]:
        return {SIZE: torch.tensor(self.setup.train_sizes[cid], dtype=torch.int64)}

    def on_local_start(self, client: ClientView, round_idx: int) -> None:
        feature_tap(client.model)
        for key in [k for k in client.state if k.startswith((STAT, PROTO, SEEN))]:
            del client.state[key]  # statistics are per round

    def local_phases(self, client: ClientView, round_idx: int) -> list[Phase]:
        return [Phase(name="classifier", epochs=1, trainable=self._is_classifier),
                Phase(name="extractor", trainable=self._extractor)]

    def local_loss(self, state: dict[str, Tensor], batch: LocalBatch) -> Tensor:
        feats = feature_tap(batch.module).features[:len(batch.logits)]
        loss = exits_ce(batch.logits, batch.y)
        c = self.setup.num_classes
        if batch.phase == "classifier":
            # the extractor is frozen and still the received one: its class statistics
            accumulate_classes(state, STAT, feats, batch.y, c, squares=True)
            return loss
        n = int(state[SIZE])
        if epoch_window(state, SEEN, batch.y.shape[0], (self.setup.local_epochs - 1) * n, n):
            accumulate_classes(state, PROTO, feats, batch.y, c)
        return loss + self.params.lam * self.alignment(state, feats, batch.y)

    @staticmethod
    def alignment(state: dict[str, Tensor], feats: list[Tensor], y: Tensor) -> Tensor:
        """``sum_k MSE(f_k, P_k[y])`` over the batch; rows of classes without a prototype add 0."""
        mask = state.get(GLOBAL + "mask")
        if mask is None:
            return torch.zeros((), device=y.device)
        has = mask.to(y.device)[y].unsqueeze(1)  # [B, 1]
        total = torch.zeros((), device=y.device)
        for k, f in enumerate(feats):
            target = state[f"{GLOBAL}{k}"].to(f)[y]
            # the reference's MSE is a mean over all B x d entries, missing classes included as 0
            total = total + torch.where(has, f - target, torch.zeros_like(f)).pow(2).mean()
        return total

    # ---------------------------------------------------------------- exchange
    def upload_spec(self) -> Spec:
        m, c = self.setup.num_exits, self.setup.num_classes
        feat = sum(self._feature_sizes())
        return {"v": ((m,), torch.float32), "h": ((feat,), torch.float32), "proto_sum": ((feat,), torch.float32),
                "proto_count": ((c,), torch.float32),
                "classifier": ((self.layout.numel(self._is_classifier),), torch.float32)}

    def upload(self, client: ClientView) -> dict[str, Tensor]:
        state, c = client.state, self.setup.num_classes
        device = next(client.model.parameters()).device
        sizes = self._feature_sizes()
        vs, hs, sums = [], [], []
        for k, size in enumerate(sizes):
            d = size // c
            zero_cd = torch.zeros(c, d, dtype=torch.float64, device=device)
            zero_c = torch.zeros(c, dtype=torch.float64, device=device)
            v, h = classifier_statistics(state.get(STAT + "count", zero_c), state.get(f"{STAT}sum.{k}", zero_cd),
                                         state.get(f"{STAT}sq.{k}", zero_c))
            vs.append(v.reshape(1))
            hs.append(h.reshape(-1))
            sums.append(state.get(f"{PROTO}sum.{k}", zero_cd).reshape(-1))
        count = state.get(PROTO + "count", torch.zeros(c, dtype=torch.float64, device=device))
        return {"v": torch.cat(vs).float(), "h": torch.cat(hs).float(), "proto_sum": torch.cat(sums).float(),
                "proto_count": count.float(),
                "classifier": params_row(client.model, self.layout.classifier_keys(c))}

    def payload_spec(self) -> Spec:
        c = self.setup.num_classes
        return {"classifier": ((self.layout.numel(self._is_classifier),), torch.float32),
                "protos": ((sum(self._feature_sizes()),), torch.float32), "mask": ((c,), torch.float32)}

    def aggregate(self, round_idx: int, gathered: dict[str, Tensor],
                  active: Tensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
        n, c = active.shape[0], self.setup.num_classes
        a = active.to(torch.float64).unsqueeze(1)  # [n, 1]
        # global prototypes: sample-weighted class means over the participants
        count = (gathered["proto_count"].to(torch.float64) * a).sum(0)  # [C]
        sums = (gathered["proto_sum"].to(torch.float64) * a).sum(0)  # [sum_k C d_k]
        protos, offset = [], 0
        for size in self._feature_sizes():
            block = sums[offset:offset + size].view(c, -1)
            protos.append((block / count.clamp_min(1.0).unsqueeze(1)).reshape(-1))
            offset += size
        # classifier combination, one QP per client and exit
        keys = self.layout.classifier_keys(c)
        classifiers = gathered["classifier"]
        mixed = torch.empty_like(classifiers)
        weights, h_off, c_off = [], 0, 0
        for k, size in enumerate(self._feature_sizes()):
            w_k = masked_rows(head_weights(gathered["v"][:, k], gathered["h"][:, h_off:h_off + size], active,
                                           self.params.qp_iters), active)
            width = sum(int(torch.Size(self.layout.shapes[key]).numel()) for key in keys if exit_index(key) == k)
            mixed[:, c_off:c_off + width] = mix_rows(w_k, classifiers[:, c_off:c_off + width])
            weights.append(w_k)
            h_off, c_off = h_off + size, c_off + width
        self.last_weights = torch.stack(weights).cpu()
        diag = torch.diagonal(self.last_weights, dim1=1, dim2=2)[:, active.cpu()]
        report = {"head_self_weight": float(diag.mean()), "classes_with_prototype": int((count > 0).sum())}
        payload = {"classifier": mixed, "protos": torch.cat(protos).float().expand(n, -1),
                   "mask": (count > 0).float().expand(n, -1)}
        return payload, report

    def receive(self, client: ClientView, payload: dict[str, Tensor], round_idx: int) -> None:
        c = self.setup.num_classes
        load_row(client.model, self.layout.classifier_keys(c), payload["classifier"])
        offset = 0
        for k, size in enumerate(self._feature_sizes()):
            client.state[f"{GLOBAL}{k}"] = payload["protos"][offset:offset + size].view(c, -1).clone()
            offset += size
        client.state[GLOBAL + "mask"] = payload["mask"] > 0.5
