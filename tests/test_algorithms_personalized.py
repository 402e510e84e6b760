"""Personalized aggregation on the real loop: FedAMP, pFedGraph, FedRoD, FedPAC.

Each algorithm's defining behaviour: what rank 0 computes from the uploaded rows (attention,
collaboration graph, classifier-combination QP, global prototypes), what every client ends
up holding, and that clients that did not train this round influence no one. The uploaded
rows are captured by wrapping ``algo.aggregate``; the solvers are checked against brute force.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from algo_harness import make_trainer, params_of

from cafedist.algorithms.base import LocalBatch
from cafedist.algorithms.fedamp import cosine_attention, kernel_attention
from cafedist.algorithms.fedpac import GLOBAL, FedPAC, head_weights
from cafedist.algorithms.fedrod import COUNTS, balanced_softmax_ce
from cafedist.algorithms.personalization import (
    INIT,
    classifier_names,
    cosine_from_gram,
    feature_tap,
    gram_matrix,
    params_row,
    simplex_qp,
    sq_distances_from_gram,
)
from cafedist.algorithms.pfedgraph import TARGET, graph_rows
from cafedist.algorithms.proxy_math import simplex_qp_identity
from cafedist.errors import ConfigError
from cafedist.train.local import local_update
from cafedist.train.schedule import participating


def spy(tr) -> dict:
    """Record what the coordinator receives and returns in the next aggregations."""
    seen: dict = {}
    inner = tr.algo.aggregate

    def wrapped(rnd, gathered, active):
        payload, report = inner(rnd, gathered, active)
        seen.update(gathered={k: v.clone() for k, v in gathered.items()}, payload=payload, active=active.clone())
        return payload, report

    tr.algo.aggregate = wrapped
    return seen


def model_row(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def on_simplex(w: torch.Tensor, tol: float = 1e-9) -> bool:
    return bool((w >= -tol).all()) and bool(torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-6))


def two_groups() -> torch.Tensor:
    """Updates of 4 clients: 0 and 1 point one way, 2 and 3 another."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    noise = 0.1 * torch.randn(4, 50, generator=g)
    return torch.stack([a, a, b, b]) + noise


# ----------------------------------------------------------------------------- solvers
def grid_simplex(n: int, steps: int) -> torch.Tensor:
    """All points of the n-simplex with coordinates in multiples of 1/steps."""
    pts = [c for c in itertools.product(range(steps + 1), repeat=n - 1) if sum(c) <= steps]
    return torch.tensor([list(c) + [steps - sum(c)] for c in pts], dtype=torch.float64) / steps


def test_graph_qp_is_on_the_simplex_and_beats_brute_force():
    g = torch.Generator().manual_seed(1)
    n, lam = 3, 0.8
    d = -torch.rand(n, n, generator=g, dtype=torch.float64)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    x = simplex_qp_identity(d, p, lam, torch.ones(n, dtype=torch.bool))
    assert on_simplex(x)
    grid = grid_simplex(n, 100)
    for i in range(n):
        q = d[i] - 2 * lam * p
        best = (lam * (grid * grid).sum(1) + grid @ q).min()
        assert lam * x[i] @ x[i] + q @ x[i] <= best + 1e-12
        # the general solver (used by FedPAC) finds the same minimiser
        generic = simplex_qp((lam * torch.eye(n, dtype=torch.float64))[None], q[None], iters=2000)[0]
        assert torch.allclose(generic, x[i], atol=1e-6)


def test_graph_qp_leaves_inactive_clients_out():
    d = -torch.eye(3, dtype=torch.float64)
    x = simplex_qp_identity(d, torch.full((3,), 1 / 3, dtype=torch.float64), 0.8, torch.tensor([True, False, True]))
    assert on_simplex(x) and bool((x[:, 1] == 0).all())


def test_general_simplex_qp_beats_brute_force_on_a_psd_problem():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64)
    quad = a @ a.T + 0.1 * torch.eye(3, dtype=torch.float64)
    x = simplex_qp(quad[None])[0]
    grid = grid_simplex(3, 100)
    assert on_simplex(x)
    assert x @ quad @ x <= torch.einsum("bi,ij,bj->b", grid, quad, grid).min() + 1e-12


def test_graph_favours_similar_clients():
    cos = cosine_from_gram(gram_matrix(two_groups()))
    w = graph_rows(cos, torch.full((4,), 0.25), alpha=0.8, active=torch.ones(4, dtype=torch.bool))
    assert on_simplex(w)
    assert w[0, 1] > w[0, 2] and w[0, 1] > w[0, 3] and w[3, 2] > w[3, 0]


# ----------------------------------------------------------------------------- FedAMP
def test_attention_prefers_similar_clients_and_rows_sum_to_one():
    deltas = two_groups()
    gram = gram_matrix(deltas)
    everyone = torch.ones(4, dtype=torch.bool)
    heur = cosine_attention(cosine_from_gram(gram), everyone, sigma=10.0, self_weight=0.3)
    assert on_simplex(heur) and torch.allclose(torch.diagonal(heur), torch.full((4,), 0.3, dtype=torch.float64))
    assert heur[0, 1] > heur[0, 2] and heur[2, 3] > heur[2, 1]
    kernel = kernel_attention(sq_distances_from_gram(gram), everyone, alpha_k=1.0, sigma=50.0)
    assert on_simplex(kernel) and kernel[0, 1] > kernel[0, 2]
    # too large a step alpha_k would make the self weight negative: rows stay on the simplex
    assert on_simplex(kernel_attention(torch.zeros(4, 4), everyone, alpha_k=10.0, sigma=1.0))
    # an inactive client receives no attention; a client alone keeps its own model
    some = torch.tensor([True, True, True, False])
    masked = cosine_attention(cosine_from_gram(gram), some, 10.0, 0.3)
    assert bool((masked[:3, 3] == 0).all()) and on_simplex(masked[:3])
    alone = cosine_attention(cosine_from_gram(gram), torch.tensor([True, False, False, False]), 10.0, 0.3)
    assert alone[0, 0] == 1.0


def test_fedamp_returns_each_client_its_attention_mixture(tmp_path):
    tr = make_trainer(tmp_path, "fedamp")
    seen = spy(tr)
    tr.run_round(0)
    w = tr.algo.last_weights
    assert on_simplex(w) and torch.allclose(torch.diagonal(w), torch.full((4,), 0.3, dtype=torch.float64))
    # FedAMP keeps each client's own model: the uploaded w_j are still the models
    models = torch.stack([model_row(c.model) for c in tr.clients]).to(torch.float64)
    assert torch.allclose(models.float(), seen["gathered"]["delta"] + tr.clients[0].state[INIT], atol=1e-6)
    keys = [k for k, _ in tr.clients[0].model.named_parameters()]
    for i, c in enumerate(tr.clients):
        cloud = torch.cat([c.state[f"ref.{k}"].reshape(-1) for k in keys]).to(torch.float64)
        assert torch.allclose(cloud, w[i] @ models, atol=1e-5)


def test_fedamp_proximal_term_pulls_toward_the_cloud_model(tmp_path):
    dist = {}
    for lam in (0.0, 5.0):
        tr = make_trainer(tmp_path / str(lam), "fedamp", {"lam": lam})
        tr.run_round(0)
        c = tr.clients[0]
        cloud = {k: c.state[f"ref.{k}"].clone() for k, _ in c.model.named_parameters()}
        tr.run_round(1)
        dist[lam] = sum(float((p - cloud[k]).pow(2).sum()) for k, p in params_of(c.model).items())
    assert dist[5.0] < dist[0.0]


# ----------------------------------------------------------------------------- pFedGraph
def test_pfedgraph_replaces_models_by_their_graph_aggregates(tmp_path):
    tr = make_trainer(tmp_path, "pfedgraph")
    seen = spy(tr)
    tr.run_round(0)
    w = tr.algo.last_weights
    assert on_simplex(w)
    uploaded = (seen["gathered"]["delta"] + tr.clients[0].state[INIT]).to(torch.float64)
    for i, c in enumerate(tr.clients):
        row = model_row(c.model)
        assert torch.allclose(row.to(torch.float64), w[i] @ uploaded, atol=1e-5)
        assert torch.equal(c.state[TARGET], row)


def test_pfedgraph_regulariser_rewards_similarity_to_the_aggregate(tmp_path):
    tr = make_trainer(tmp_path, "pfedgraph", {"lam": 0.5})
    c = tr.clients[0]
    x, y = c.data.x_train[:8], c.data.y_train[:8]
    batch = LocalBatch(logits=c.model(x), y=y, x=x, module=c.model)
    plain = tr.algo.local_loss({}, batch)
    row = model_row(c.model)
    assert torch.allclose(tr.algo.local_loss({TARGET: row}, batch), plain - 0.5, atol=1e-5)  # cos = 1
    assert torch.allclose(tr.algo.local_loss({TARGET: -row}, batch), plain + 0.5, atol=1e-5)  # cos = -1


# ----------------------------------------------------------------------------- FedRoD
def test_fedrod_shares_the_generic_model_and_keeps_personal_classifiers(tmp_path):
    tr = make_trainer(tmp_path, "fedrod")
    tr.run_round(0)
    generic = [params_of(c.model) for c in tr.clients]
    for g in generic[1:]:
        assert all(torch.allclose(v, generic[0][k], atol=1e-6) for k, v in g.items())
    names = classifier_names(tr.clients[0].model)
    personal = [params_of(c.models["personal"]) for c in tr.clients]
    for k in names:
        assert all((p[k] - personal[0][k]).abs().max() > 1e-6 for p in personal[1:]), k
    for c in tr.clients:
        # the personal model mirrors the generic feature path; the class counts are the client's
        mirror = params_of(c.models["personal"])
        assert all(torch.equal(mirror[k], v) for k, v in params_of(c.model).items() if k not in names)
        assert torch.equal(c.state[COUNTS], torch.bincount(c.data.y_train, minlength=10).to(torch.float64))


def test_fedrod_answers_with_generic_plus_personal_logits(tmp_path):
    tr = make_trainer(tmp_path, "fedrod")
    tr.run_round(0)
    c = tr.clients[1]
    x = c.data.x_test[:16]
    with torch.no_grad():
        got = tr.algo.eval_model(c.view)(x)
        h = x
        for k, z in enumerate(got):
            h = c.model.blocks[k](h)
            f = c.model.heads[k][:-1](h)  # cnn heads are Sequential(..., Linear)
            assert torch.allclose(z, c.model.heads[k][-1](f) + c.models["personal"].heads[k][-1](f), atol=1e-5)


def test_balanced_softmax_shifts_logits_by_log_counts():
    z, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    counts = torch.tensor([10.0, 1.0, 0.0])
    expected = F.cross_entropy(z + torch.log(counts.clamp_min(1e-12)), y)
    assert torch.allclose(balanced_softmax_ce(z, y, counts), expected)


# ----------------------------------------------------------------------------- FedPAC
def test_fedpac_aligns_features_and_combines_classifiers(tmp_path):
    twin = make_trainer(tmp_path, "fedpac")  # clients still at the common initialisation
    tr = make_trainer(tmp_path, "fedpac")
    seen = spy(tr)
    tr.run_round(0)
    got, c_num, m = seen["gathered"], 10, 3
    # the feature extractor (body and heads' inner layers) is shared
    names = set(classifier_names(tr.clients[0].model))
    first = params_of(tr.clients[0].model)
    for c in tr.clients[1:]:
        assert all(torch.allclose(v, first[k], atol=1e-6) for k, v in params_of(c.model).items() if k not in names)
    # classifier weights on the simplex; every client got its mixture of the uploaded classifiers
    w = tr.algo.last_weights
    assert w.shape == (m, 4, 4) and on_simplex(w)
    offsets = [0]
    for k in range(m):
        offsets.append(offsets[-1] + sum(p.numel() for n, p in tr.clients[0].model.named_parameters()
                                         if n in names and n.startswith(f"heads.{k}.")))
    keys = [n for n, _ in tr.clients[0].model.named_parameters() if n in names]
    for i, c in enumerate(tr.clients):
        row = params_row(c.model, keys).to(torch.float64)
        for k in range(m):
            s = slice(offsets[k], offsets[k + 1])
            assert torch.allclose(row[s], w[k, i] @ got["classifier"][:, s].to(torch.float64), atol=1e-5)
    # global prototypes: sample-weighted class means of the uploaded feature sums
    for i, c in enumerate(tr.clients):
        assert torch.equal(got["proto_count"][i], torch.bincount(c.data.y_train, minlength=c_num).float())
    count = got["proto_count"].sum(0)
    first_exit = got["proto_sum"].sum(0)[: c_num * tr.algo.layout.feature_dims(c_num)[0]].view(c_num, -1)
    assert torch.allclose(tr.clients[2].state[f"{GLOBAL}0"], first_exit / count.clamp_min(1).unsqueeze(1), atol=1e-5)
    assert torch.equal(tr.clients[2].state[GLOBAL + "mask"], count > 0)
    # the QP statistics h = p(c) mu_c come from the *received* extractor (here: the initial one)
    c0 = twin.clients[0]
    tap = feature_tap(c0.model)
    with torch.no_grad():
        c0.model(c0.data.x_train)
    f = tap.features[0].to(torch.float64)
    h = F.one_hot(c0.data.y_train, c_num).to(torch.float64).T @ f / f.shape[0]
    assert torch.allclose(got["h"][0, : h.numel()].to(torch.float64), h.reshape(-1), atol=1e-5)


def test_fedpac_alignment_term_is_the_masked_prototype_mse(tmp_path):
    tr = make_trainer(tmp_path, "fedpac", {"lam": 2.0})
    c = tr.clients[0]
    x, y = c.data.x_train[:16], c.data.y_train[:16]
    tap = feature_tap(c.model)
    logits = c.model(x)
    feats = [f.detach() for f in tap.features]
    protos = {f"{GLOBAL}{k}": torch.randn(10, f.shape[1]) for k, f in enumerate(feats)}
    mask = torch.ones(10, dtype=torch.bool)
    mask[y[0]] = False  # one class without a global prototype
    batch = LocalBatch(logits=logits, y=y, x=x, module=c.model, phase="extractor")
    plain = tr.algo.local_loss(dict(c.state), batch)
    aligned = tr.algo.local_loss({**c.state, **protos, GLOBAL + "mask": mask}, batch)
    keep = mask[y].unsqueeze(1)
    expected = sum(torch.where(keep, f - protos[f"{GLOBAL}{k}"][y], torch.zeros_like(f)).pow(2).mean()
                   for k, f in enumerate(feats))
    assert torch.allclose(aligned - plain, 2.0 * expected, atol=1e-5)
    assert torch.allclose(FedPAC.alignment({}, feats, y), torch.zeros(()))


def test_head_weights_pick_clients_with_the_same_class_statistics():
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    w = head_weights(torch.full((3,), 0.01, dtype=torch.float64), h, torch.ones(3, dtype=torch.bool), iters=500)
    assert on_simplex(w)
    # optimum: a0 = a1 = 201 a2 (a2 ~ 0.0025): the two with the same statistics share, the odd one is out
    assert w[0, 2] < 0.01 and torch.allclose(w[0, 0], w[0, 1], atol=1e-6)
    assert w[2, 2] > 0.9


# ----------------------------------------------------------------------------- participation
@pytest.mark.parametrize("name", ["fedamp", "pfedgraph", "fedrod", "fedpac"])
def test_clients_that_did_not_train_influence_no_one(tmp_path, name):
    """Round 0 with half the clients: whatever the idle ones hold changes nothing for the others."""
    runs = []
    idle = ~participating(0, 0, 4, 0.5)
    for perturb in (False, True):
        tr = make_trainer(tmp_path, name, clients_per_round=0.5)
        before = [({m: params_of(mod) for m, mod in c.models.items()}, dict(c.state)) for c in tr.clients]
        if perturb:  # idle clients hold other weights and stale statistics from some earlier training
            for c in tr.clients:
                if idle[c.cid]:
                    local_update(c, tr.algo, tr.cfg.train, 7, tr.cfg.seed)
                    with torch.no_grad():
                        for p in c.model.parameters():
                            p.add_(0.5)
        tr.run_round(0)
        runs.append(tr)
        shared = set(tr.shared.keys)
        for c in tr.clients:
            if idle[c.cid] and not perturb:
                # an idle client does not train: only parameters averaged by the loop (which every
                # client downloads, like a global model) may change; the rest is left exactly as it was
                models, state = before[c.cid]
                for m, mod in c.models.items():
                    own = m != tr.algo.shared_model
                    assert all(torch.equal(v, models[m][k]) for k, v in params_of(mod).items()
                               if own or k not in shared), (name, m)
                assert state.keys() == c.state.keys() and all(torch.equal(v, state[k]) for k, v in c.state.items())
    plain, perturbed = runs
    for a, b in zip(plain.clients, perturbed.clients):
        if idle[a.cid]:
            continue
        for m in a.models:
            pa, pb = params_of(a.models[m]), params_of(b.models[m])
            assert all(torch.allclose(v, pb[k], atol=1e-6) for k, v in pa.items()), (name, a.cid, m)
        for k, v in a.state.items():
            assert torch.allclose(v.to(torch.float64), b.state[k].to(torch.float64), atol=1e-6), (name, k)


@pytest.mark.parametrize("name, params", [("fedamp", {"self_weight": 1.5}), ("fedamp", {"attention": "dot"}),
                                          ("pfedgraph", {"alpha": 0.0}), ("fedrod", {"personal_epochs": 0}),
                                          ("fedpac", {"lam": -1.0})])
def test_impossible_hyperparameters_are_rejected(tmp_path, name, params):
    with pytest.raises(ConfigError, match=f"algorithm.{name}."):
        make_trainer(tmp_path, name, params)


def test_fedrod_balanced_softmax_knows_the_full_label_counts_from_the_first_step(tmp_path):
    """Label counts come with the Setup: the very first local step already uses the client's
    whole train-label distribution (not the counts of the batches seen so far)."""
    tr = make_trainer(tmp_path, "fedrod")
    for c in tr.clients:
        want = torch.bincount(c.data.y_train, minlength=tr.setup.num_classes).to(torch.float64)
        assert torch.equal(c.state[COUNTS], want)
        assert tuple(int(v) for v in want) == tr.setup.label_counts[c.cid]


def test_only_algorithms_that_read_label_counts_pay_for_them(tmp_path):
    """Reading every client's labels at start-up is skipped unless the algorithm declares it."""
    assert make_trainer(tmp_path, "fedavg").setup.label_counts == ()
