"""CAFEDistill's coordinator math: the QP, its mu limits, targets, selection, quarantine."""

import math

import pytest
import torch
import torch.nn.functional as F

from cafedist.algorithms.base import ClientView, LocalBatch, Phase, Setup
from cafedist.algorithms.cafedistill import CAFEDistill, CAFEDistillParams
from cafedist.algorithms.proxy_math import (
    _mixture_blocks,
    _teacher_components,
    cosine_similarity_matrix,
    cosine_similarity_rows,
    healthy_clients,
    kd_loss,
    mix_targets,
    project_rows_to_simplex,
    teacher_weights,
)
from cafedist.algorithms.students import greedy_similar, selection_counts, student_masks


def _setup(n=6, m=3, c=5, rounds=10, sizes=None):
    return Setup(num_clients=n, num_exits=m, num_classes=c, rounds=rounds,
                 train_sizes=tuple(sizes or [10 * (i + 1) for i in range(n)]), seed=0)


def _qp_objective(a, d, w, mu):
    return float((a * d).sum() + mu * ((a - w) ** 2).sum())


def test_projection_lands_on_simplex_and_is_identity_inside():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(50, 7, generator=g, dtype=torch.float64) * 3
    p = project_rows_to_simplex(v)
    assert torch.all(p >= 0)
    assert torch.allclose(p.sum(1), torch.ones(50, dtype=torch.float64))
    inside = torch.softmax(torch.randn(5, 7, generator=g, dtype=torch.float64), 1)
    assert torch.allclose(project_rows_to_simplex(inside), inside)


def test_masked_projection_equals_projecting_the_subvector():
    v = torch.tensor([[0.3, -0.2, 0.9, 0.1]], dtype=torch.float64)
    active = torch.tensor([True, False, True, True])
    full = project_rows_to_simplex(v, active)
    sub = project_rows_to_simplex(v[:, active])
    assert full[0, 1] == 0
    assert torch.equal(full[:, active], sub)


@pytest.mark.parametrize("mu", [0.05, 0.5, 5.0])
def test_teacher_weights_solve_the_qp_better_than_brute_force(mu):
    g = torch.Generator().manual_seed(1)
    n = 4
    q = torch.rand(n, 20, generator=g, dtype=torch.float64)
    sim = cosine_similarity_matrix(q)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    alpha = teacher_weights(sim, w, mu)
    # brute force: many random simplex points plus the vertices
    cand = torch.distributions.Dirichlet(torch.ones(n, dtype=torch.float64) * 0.7).sample((100_000,))
    cand = torch.cat([cand, torch.eye(n, dtype=torch.float64)])
    d = 1 - sim
    for i in range(n):
        ours = _qp_objective(alpha[i], d[i], w, mu)
        brute = ((cand * d[i]).sum(1) + mu * ((cand - w) ** 2).sum(1)).min().item()
        assert ours <= brute + 1e-9, (i, ours, brute)


def test_mu_limits_local_kd_and_data_size_weights():
    g = torch.Generator().manual_seed(2)
    q = torch.rand(5, 30, generator=g, dtype=torch.float64)
    sim = cosine_similarity_matrix(q)
    w = torch.tensor([1, 2, 3, 4, 5], dtype=torch.float64) / 15
    small = teacher_weights(sim, w, mu=1e-6)
    assert torch.allclose(small, torch.eye(5, dtype=torch.float64))
    large = teacher_weights(sim, w, mu=1e6)
    assert torch.allclose(large, w.expand(5, 5), atol=1e-5)


def test_targets_are_exact_mixtures():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(3, 4, 5, generator=g), dim=2)
    alpha = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    t = mix_targets(alpha, probs)
    assert torch.allclose(t[1], 0.5 * probs[0] + 0.5 * probs[1])
    assert torch.allclose(t.sum(2), torch.ones(3, 4))


def _clustered_alpha(n, clusters, seed=0):
    """Block-diagonal teacher weights (clients i % clusters trust each other), rows on the simplex."""
    g = torch.Generator().manual_seed(seed)
    same = (torch.arange(n) % clusters).unsqueeze(0) == (torch.arange(n) % clusters).unsqueeze(1)
    alpha = torch.rand(n, n, generator=g, dtype=torch.float64) * same
    return alpha / alpha.sum(1, keepdim=True)


def test_mixture_blocks_follow_teacher_clusters():
    alpha = _clustered_alpha(12, 4)
    blocks = _mixture_blocks(alpha != 0, max_rows=128)
    assert len(blocks) == 4  # one block per cluster, each multiplying only its 3 teachers
    for rows, cols in blocks:
        assert set(rows.tolist()) == set(cols.tolist()) and len(cols) == 3
    assert sorted(torch.cat([r for r, _ in blocks]).tolist()) == list(range(12))
    assert len(_mixture_blocks(alpha != 0, max_rows=2)) == 8  # a block never exceeds max_rows
    assert len(_mixture_blocks(torch.eye(5, dtype=torch.bool), max_rows=128)) == 5  # local KD: rows apart


def test_mixture_blocks_group_by_component_not_just_first_teacher():
    """Two interleaved clusters whose rows start at different teachers: sorting by first teacher
    alone alternates the clusters (4 blocks); components keep each cluster together (2 blocks)."""
    supports = {0: [0, 2, 4, 6], 2: [2, 4, 6], 4: [0, 2, 4, 6], 6: [2, 4, 6],
                1: [1, 3, 5, 7], 3: [3, 5, 7], 5: [1, 3, 5, 7], 7: [3, 5, 7]}
    nonzero = torch.zeros(8, 8, dtype=torch.bool)
    for row, cols in supports.items():
        nonzero[row, cols] = True
    assert _teacher_components(nonzero).tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    blocks = _mixture_blocks(nonzero, max_rows=128)
    assert sorted(sorted(rows.tolist()) for rows, _ in blocks) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_teacher_components_of_a_long_chain_are_one():
    n = 300  # row i trusts teachers i and i + 1: one component, diameter n
    nonzero = torch.eye(n, dtype=torch.bool) | torch.eye(n, dtype=torch.bool).roll(1, dims=1)
    nonzero[n - 1, 0] = False
    assert set(_teacher_components(nonzero).tolist()) == {0}


def test_aggregation_reuses_its_buffer_without_aliasing_results():
    """Repeated calls (and a change of n) give what a fresh algorithm gives; results stay put."""
    def logits(n, seed):
        return torch.randn(n, 1, 20, 5, generator=torch.Generator().manual_seed(seed)) * 2
    algo = CAFEDistill(CAFEDistillParams(proxy_size=20), _setup(n=6, c=5))
    first, _ = algo.aggregate_logits(2, logits(6, 0))
    kept = first["targets"].clone()
    second, _ = algo.aggregate_logits(2, logits(6, 1))
    assert torch.equal(first["targets"], kept)
    fresh, _ = CAFEDistill(CAFEDistillParams(proxy_size=20), _setup(n=6, c=5)).aggregate_logits(2, logits(6, 1))
    assert torch.equal(second["targets"], fresh["targets"])
    assert torch.equal(second["students"], fresh["students"])
    algo.setup = _setup(n=4, c=5)  # another world of clients: the buffer is reshaped
    small, _ = algo.aggregate_logits(2, logits(4, 2))
    ref, _ = CAFEDistill(CAFEDistillParams(proxy_size=20), _setup(n=4, c=5)).aggregate_logits(2, logits(4, 2))
    assert torch.equal(small["targets"], ref["targets"])


def test_a_diverged_shallow_exit_quarantines_only_when_every_exit_is_sent():
    """The health check covers the exits that were sent: with the default (last exit only) a NaN
    in a shallow exit cannot be seen, and the client still teaches with its sound last exit."""
    x = torch.randn(6, 3, 20, 5, generator=torch.Generator().manual_seed(5))
    x[4, 0, 3, 1] = float("nan")
    algo = CAFEDistill(CAFEDistillParams(proxy_size=20), _setup(n=6, m=3, c=5))
    _, every = algo.aggregate_logits(3, x)
    _, last = algo.aggregate_logits(3, x[:, 2:].contiguous())
    assert every["quarantined"] == [4] and last["quarantined"] == []


def test_proxy_exits_contract_is_checked():
    class Backwards(CAFEDistill):
        def proxy_exits(self):
            return (2, 0)
    algo = Backwards(CAFEDistillParams(proxy_size=20), _setup(n=6, m=3, c=5))
    with pytest.raises(ValueError, match="increasing order"):
        algo.sent_exits()
    assert algo.sent_exits(every_exit=True) == [0, 1, 2]
    assert CAFEDistill(CAFEDistillParams(proxy_size=20), _setup(n=6, m=3, c=5)).sent_exits() == [2]


def test_all_exits_or_last_exit_only_give_the_same_aggregate():
    x = torch.randn(6, 3, 20, 5, generator=torch.Generator().manual_seed(4))
    algo = CAFEDistill(CAFEDistillParams(proxy_size=20), _setup(n=6, m=3, c=5))
    assert algo.proxy_exits() == (2,)
    every, _ = algo.aggregate_logits(3, x)
    last, _ = algo.aggregate_logits(3, x[:, 2:].contiguous())
    assert torch.equal(every["targets"], last["targets"]) and torch.equal(every["students"], last["students"])


@pytest.mark.parametrize("n,m,rounds", [(10, 3, 20), (7, 4, 9), (1, 2, 5)])
def test_selection_counts_follow_the_progressive_schedule(n, m, rounds):
    prev = -1
    for t in range(rounds):
        total, depth, extra = selection_counts(t, rounds, n, m)
        r = min(2 * t / rounds, 1)
        assert total == math.floor((m - 1) * n * r + 1e-12)
        assert depth == math.floor((m - 1) * r + 1e-12)
        assert 0 <= extra < n or depth == m - 1
        assert total >= prev  # never fewer students later
        prev = total
        mask = student_masks(t, rounds, n, m, torch.eye(n), 0.5)
        assert int(mask[:, : m - 1].sum()) == total
        assert mask[:, m - 1].all()
        # depth-prioritized: a deeper student only when every shallower exit is a student
        for k in range(1, m - 1):
            assert not (mask[:, k] & ~mask[:, k - 1]).any()
    assert selection_counts(0, rounds, n, m)[0] == 0
    assert selection_counts(rounds // 2 + 1, rounds, n, m)[0] == (m - 1) * n


def test_greedy_picks_the_similar_cluster_and_breaks_ties_by_id():
    # clients 0..2 are near-identical, 3..5 form another cluster, client 6 is an outlier
    base = torch.zeros(7, 6, dtype=torch.float64)
    base[0:3, 0] = 1
    base[0:3, 1] = torch.tensor([0.10, 0.11, 0.12], dtype=torch.float64)
    base[3:6, 2] = 1
    base[6, 5] = 1
    sim = cosine_similarity_matrix(base + 0.01)
    picked = greedy_similar(sim, 3)
    assert sorted(picked) in ([0, 1, 2], [3, 4, 5])
    tie = greedy_similar(torch.ones(4, 4, dtype=torch.float64), 2)
    assert tie == [0, 1]
    assert greedy_similar(sim, 2, eligible=torch.tensor([False, True, True, True, True, True, True])) != []
    assert 0 not in greedy_similar(sim, 6, eligible=torch.tensor([False] + [True] * 6))


def _greedy_as_documented(sim, k):
    """greedy_similar's rule written out: seed with the largest summed similarity to the others,
    then add the largest mean similarity to those chosen (ties: lowest id)."""
    n = len(sim)
    chosen = [max(range(n), key=lambda i: (sum(sim[i][j] for j in range(n) if j != i), -i))]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (sum(sim[i][j] for j in chosen) / len(chosen), -i)))
    return chosen


@pytest.mark.parametrize("seed", range(5))
def test_greedy_adds_the_largest_mean_similarity_to_all_chosen(seed):
    q = torch.rand(9, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sim = cosine_similarity_matrix(q - 0.5)
    assert greedy_similar(sim, 6) == _greedy_as_documented(sim.tolist(), 6)


def _logits(n=6, m=3, p=8, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m, p, c, generator=g) * 2


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e9])
def test_a_poisoned_client_cannot_change_other_clients_targets(poison):
    setup = _setup()
    algo = CAFEDistill(CAFEDistillParams(), setup)
    clean = _logits()
    payload_clean, _ = algo.aggregate_logits(3, clean, torch.ones(6, dtype=torch.bool))
    # reference: client 2 absent as teacher (same logits, marked inactive)
    excluded = torch.ones(6, dtype=torch.bool)
    excluded[2] = False
    payload_ref, _ = algo.aggregate_logits(3, clean, excluded)
    poisoned = clean.clone()
    poisoned[2, :, :3] = poison
    payload_bad, report = algo.aggregate_logits(3, poisoned, torch.ones(6, dtype=torch.bool))
    assert report["quarantined"] == [2]
    others = [i for i in range(6) if i != 2]
    assert torch.isfinite(payload_bad["targets"]).all()
    assert torch.allclose(payload_bad["targets"][others], payload_ref["targets"][others], atol=1e-6)
    # and the quarantine is what protects them: client 2's clean logits do matter
    assert not torch.allclose(payload_clean["targets"][others], payload_ref["targets"][others], atol=1e-4)


def test_healthy_clients_flags_non_finite_and_exploding():
    x = torch.zeros(4, 2, 3, 3)
    x[1, 0, 0, 0] = float("nan")
    x[2, 1, 2, 2] = 2e4
    x[3, 1, 2, 2] = -float("inf")
    assert healthy_clients(x, 1e4).tolist() == [True, False, False, False]
    x[3, 1, 2, 2] = -2e4  # finite, but below -bound
    assert healthy_clients(x, 1e4).tolist() == [True, False, False, False]


def test_ablations_local_kd_and_all_students():
    setup = _setup()
    local = CAFEDistill(CAFEDistillParams(cross_client_kd=False), setup)
    logits = _logits()
    payload, report = local.aggregate_logits(0, logits, torch.ones(6, dtype=torch.bool))
    own = torch.softmax(logits[:, -1].double() / 3.0, dim=2).float()
    assert torch.allclose(payload["targets"], own, atol=1e-6)
    assert report["self_weight"] == 1.0
    every = CAFEDistill(CAFEDistillParams(student_selection=False), setup)
    assert every.init_client_state(0)["students"].all()
    payload, _ = every.aggregate_logits(0, logits, torch.ones(6, dtype=torch.bool))
    assert payload["students"].bool().all()


def test_local_loss_uses_ce_on_students_and_kd_on_proxy():
    setup = _setup(n=2, m=3, c=4)
    algo = CAFEDistill(CAFEDistillParams(lam=1.0, tau=2.0, unselected="none"), setup)
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 4, generator=g, requires_grad=True) for _ in range(3)]
    proxy = [torch.randn(6, 4, generator=g, requires_grad=True) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3, 0])
    state = {"students": torch.tensor([True, False, True]),
             "targets": torch.softmax(torch.randn(10, 4, generator=g), 1),
             "targets_round": torch.tensor(0)}
    assert algo.uses_proxy_batch(ClientView(cid=0, models={}, state=state), Phase())
    pos = torch.tensor([0, 3, 3, 9, 1, 2])
    loss = algo.local_loss(state, LocalBatch(logits=logits, y=y, proxy_logits=proxy, proxy_pos=pos))
    loss.backward()
    assert logits[1].grad is None and proxy[1].grad is None  # exit 2 is not a student this round
    assert logits[0].grad is not None and proxy[0].grad is not None
    assert proxy[2].grad is None  # the last exit is trained by CE only
    no_students = {"students": torch.tensor([False, False, True]), "targets": state["targets"]}
    assert not algo.uses_proxy_batch(ClientView(cid=0, models={}, state=no_students), Phase())


def test_teacher_weights_without_some_clients_solve_the_qp_of_the_others():
    """Quarantined or idle clients leave the QP: the others' weights are the problem over the
    remaining clients alone, with w renormalised over them (METHOD.md, Quarantine)."""
    q = torch.rand(5, 30, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    sim = cosine_similarity_matrix(q)
    w = torch.tensor([1, 2, 3, 4, 5], dtype=torch.float64) / 15
    keep = torch.tensor([True, False, True, True, False])
    alpha = teacher_weights(sim, w, 0.5, keep)
    sub = teacher_weights(sim[keep][:, keep], w[keep] / w[keep].sum(), 0.5)
    assert (alpha[:, ~keep] == 0).all()
    assert torch.allclose(alpha[keep][:, keep], sub, atol=1e-12)
    assert not torch.allclose(sub, torch.eye(3, dtype=torch.float64), atol=1e-3)  # not local KD: w matters


def test_kd_loss_is_tau_squared_kl_of_the_teacher_to_the_tempered_student():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    teacher = torch.softmax(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    student = torch.softmax(z / 2.0, dim=1)
    kl = (teacher * (teacher.log() - student.log())).sum(1).mean()  # KL(teacher || student), batch mean
    assert torch.allclose(kd_loss(z, teacher, 2.0), 4.0 * kl)
    assert torch.allclose(kd_loss(z, teacher, 2.0, tau_squared=False), kl)


def test_local_loss_is_the_written_out_formula():
    """CE on the last exit and the students, lam * KL(T_i || softmax(z / tau)) on the students'
    proxy logits, the teacher rows those of the batch's proxy positions."""
    algo = CAFEDistill(CAFEDistillParams(lam=0.7, tau=2.0), _setup(n=2, m=3, c=4))
    g = torch.Generator().manual_seed(8)
    logits = [torch.randn(5, 4, generator=g) for _ in range(3)]
    proxy = [torch.randn(6, 4, generator=g) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3, 0])
    targets = torch.softmax(torch.randn(10, 4, generator=g), 1)
    state = {"students": torch.tensor([True, False, True]), "targets": targets, "targets_round": torch.tensor(0)}
    pos = torch.tensor([0, 3, 3, 9, 1, 2])
    loss = algo.local_loss(state, LocalBatch(logits=logits, y=y, proxy_logits=proxy, proxy_pos=pos))
    t = targets[pos]
    kl = (t * (t.log() - torch.log_softmax(proxy[0] / 2.0, dim=1))).sum(1).mean()
    want = F.cross_entropy(logits[2], y) + F.cross_entropy(logits[0], y) + 0.7 * kl
    assert torch.allclose(loss, want)


def test_targets_mix_each_clients_teachers_by_its_own_weights():
    """T_i = sum_j alpha_ij softmax(z_j^m / tau) with alpha_i the QP's row of client i (alpha is
    not symmetric: a transposed alpha would give another client's mixture)."""
    setup = _setup(n=5, m=3, c=5, sizes=[10, 40, 20, 80, 30])
    algo = CAFEDistill(CAFEDistillParams(proxy_size=8), setup)
    logits = _logits(n=5, m=1, p=8, c=5, seed=7)
    payload, _ = algo.aggregate_logits(2, logits)
    last = logits[:, -1].double()
    alpha = teacher_weights(cosine_similarity_matrix(torch.softmax(last, 2).reshape(5, -1)), setup.data_weights, 0.5)
    assert not torch.allclose(alpha, alpha.T, atol=1e-3)
    want = torch.einsum("ij,jpc->ipc", alpha, torch.softmax(last / 3.0, dim=2))
    assert torch.allclose(payload["targets"].double(), want, atol=1e-6)


def test_aggregation_of_round_t_selects_the_students_of_round_t_plus_1():
    """The students a round's aggregation returns train in the next round: R(t + 1)."""
    algo = CAFEDistill(CAFEDistillParams(), _setup(n=6, m=3, rounds=10))
    for t in range(10):
        payload, report = algo.aggregate_logits(t, _logits(seed=t))
        want = selection_counts(t + 1, 10, 6, 3)[0]
        assert report["n_students_next"] == int(payload["students"][:, :2].sum()) == want, t


@pytest.mark.parametrize("span", [0.25, 1.0])
def test_schedule_span_scales_the_ramp(span):
    rounds, n, m = 20, 5, 3
    for t in range(rounds):
        r = min(t / (span * rounds), 1)
        assert selection_counts(t, rounds, n, m, span)[0] == math.floor((m - 1) * n * r + 1e-12), t


def test_quarantined_clients_are_students_of_the_partial_depth_only_when_no_one_else_is_left():
    algo = CAFEDistill(CAFEDistillParams(), _setup(n=6, m=3, rounds=10))
    logits = _logits(seed=9)
    logits[[0, 1], :, 0] = float("nan")  # clients 0 and 1 are quarantined
    _, depth, extra = selection_counts(2, 10, 6, 3)  # round 1's aggregation: 4 of 6 at depth 0
    assert (depth, extra) == (0, 4)
    payload, report = algo.aggregate_logits(1, logits)
    assert report["quarantined"] == [0, 1]
    assert payload["students"][:, 0].tolist() == [False, False, True, True, True, True]


def test_the_cohort_aggregation_is_the_aggregation_over_the_cohort_and_reports_client_ids():
    """With partial participation the rows are the cohort's; the QP's prior is the cohort's own
    data weights (renormalised), so its targets are those of the full aggregation with the same
    clients active, and a quarantined row is reported by its client id."""
    setup = _setup(n=6, m=3, c=5, sizes=[10, 60, 20, 80, 30, 5])
    algo = CAFEDistill(CAFEDistillParams(proxy_size=8), setup)
    logits = _logits(seed=10)
    cohort = torch.tensor([1, 3, 4])
    active = torch.zeros(6, dtype=torch.bool)
    active[cohort] = True
    full, _ = algo.aggregate_logits(2, logits, active)
    part, _ = algo.aggregate_logits(2, logits[cohort], cohort=cohort)
    assert torch.allclose(part["targets"], full["targets"][cohort], atol=1e-6)
    poisoned = logits[cohort].clone()
    poisoned[1, :, 0] = float("inf")  # client 3
    _, report = algo.aggregate_logits(2, poisoned, cohort=cohort)
    assert report["quarantined"] == [3]


def test_local_kd_ablation_gives_a_broken_client_uniform_targets():
    """cross_client_kd: false teaches each client with its own last exit only; a quarantined
    client's own logits are broken, so its targets are uniform, never NaN."""
    algo = CAFEDistill(CAFEDistillParams(cross_client_kd=False), _setup())
    logits = _logits()
    logits[2, :, 0] = float("nan")
    payload, report = algo.aggregate_logits(3, logits)
    assert report["quarantined"] == [2]
    assert torch.equal(payload["targets"][2], torch.full_like(payload["targets"][2], 1 / 5))


def test_cosine_similarity_beyond_one_block_is_complete():
    """More clients than one block of the Gram product (256): every block, both triangles."""
    q = torch.rand(300, 7, generator=torch.Generator().manual_seed(11))
    sim = cosine_similarity_rows(q)
    direct = torch.nn.functional.cosine_similarity(q.double().unsqueeze(1), q.double().unsqueeze(0), dim=2)
    assert torch.allclose(sim, direct, atol=1e-5)
    assert torch.equal(sim, sim.T)
