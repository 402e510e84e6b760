"""Distillation baselines on the real loop: FedMD, DS-FL, KT-pFL and cafedistill-heads."""

import json

import pytest
import torch
from algo_harness import load, make_trainer, params_of, save
from conftest import ROOT, cafedist_in_process, summary
from torch.nn.utils import parameters_to_vector

from cafedist.algorithms.base import LocalBatch, Phase
from cafedist.algorithms.common import is_body
from cafedist.algorithms.ktpfl import coefficient_objective, learn_coefficients
from cafedist.algorithms.proxy_math import cosine_similarity_matrix, teacher_weights
from cafedist.errors import ConfigError, TrainingDiverged
from cafedist.train.local import proxy_logits, run_phase
from cafedist.train.schedule import proxy_subset

PROXY = {"proxy_size": 48}


def round_logits(tr, rnd):
    """[n, m, P', C]: every client's current proxy logits on round ``rnd``'s subset."""
    idx = proxy_subset(tr.cfg.seed, rnd, tr.run.proxy_x.shape[0], tr.run.proxy_size)
    return torch.stack([proxy_logits(c.model, tr.run.proxy_x[idx]) for c in tr.clients]), idx


def entropy(p):
    return -(torch.xlogy(p, p)).sum(-1)


def on_simplex(rows):
    return bool((rows >= 0).all()) and torch.allclose(rows.sum(1), torch.ones(rows.shape[0], dtype=rows.dtype))


# ----------------------------------------------------------------------------- targets and proxy items
def test_cafedistill_targets_and_proxy_batches_are_on_the_items_the_targets_were_computed_on(tmp_path):
    """With local KD only (cross_client_kd: false) a client's targets are its own tempered last
    exit on round 0's proxy subset, which its targets_round names; in round 1 every proxy batch
    is rows of that subset, its positions naming the same rows of the targets."""
    tr = make_trainer(tmp_path, "cafedistill", {**PROXY, "cross_client_kd": False, "student_selection": False})
    tr.run_round(0)
    _, idx = round_logits(tr, 0)
    for c in tr.clients:
        assert int(c.state["targets_round"]) == 0
        own = proxy_logits(c.model, tr.run.proxy_x[tr.exchange.targets_subset(c.state)])[-1]
        torch.testing.assert_close(c.state["targets"], torch.softmax(own / 3.0, dim=1))
    seen = []
    loss = tr.algo.local_loss
    def spy(state, batch):
        seen.append((batch.proxy_x, batch.proxy_pos))
        return loss(state, batch)

    tr.algo.local_loss = spy
    tr.run_round(1)
    del tr.algo.local_loss
    assert seen and all(xp is not None for xp, _ in seen)
    for xp, pos in seen:
        assert torch.equal(xp, tr.run.proxy_x[idx][pos])


# ----------------------------------------------------------------------------- FedMD
def test_fedmd_consensus_is_the_mean_and_digest_then_revisit(tmp_path):
    tr = make_trainer(tmp_path, "fedmd", PROXY)
    c0 = tr.clients[0]
    assert [p.name for p in tr.algo.local_phases(c0.view, 0)] == ["revisit"]  # nothing to digest yet
    tr.run_round(0)
    logits, idx = round_logits(tr, 0)
    consensus = logits.mean(0)  # [m, P', C]: plain mean over clients, exit by exit
    for c in tr.clients:
        assert torch.allclose(c.state["targets"], consensus, atol=1e-5)
    assert [p.name for p in tr.algo.local_phases(c0.view, 1)] == ["digest", "revisit"]

    # both phases run in round 1, and only the digest phase sees proxy batches
    seen = []
    loss = tr.algo.local_loss
    def spy(state, batch):
        seen.append((batch.phase, batch.proxy_logits is not None))
        return loss(state, batch)

    tr.algo.local_loss = spy
    tr.run_round(1)
    del tr.algo.local_loss
    assert ("digest", True) in seen and ("revisit", False) in seen
    assert {s for s in seen if s[0] == "digest"} == {("digest", True)}

    # digesting pulls a client's proxy logits toward the consensus it received
    consensus = c0.state["targets"]
    idx = proxy_subset(tr.cfg.seed, 1, tr.run.proxy_x.shape[0], tr.run.proxy_size)
    def gap() -> float:
        return float((proxy_logits(c0.model, tr.run.proxy_x[idx]) - consensus).abs().mean())
    before = gap()
    run_phase(c0, tr.algo, Phase(name="digest", epochs=3), tr.cfg.train, 2, tr.cfg.seed, tr.run.proxy_x, idx)
    assert gap() < before


def test_warmup_delays_the_digest_and_digest_weight_scales_it(tmp_path):
    tr = make_trainer(tmp_path / "w", "fedmd", {**PROXY, "warmup_rounds": 2})
    view = tr.clients[0].view
    view.state["targets"] = torch.zeros(3, 48, 10)
    assert [p.name for p in tr.algo.local_phases(view, 1)] == ["revisit"]
    assert [p.name for p in tr.algo.local_phases(view, 2)] == ["digest", "revisit"]

    g = torch.Generator().manual_seed(4)
    state = {"targets": torch.randn(3, 48, 10, generator=g)}
    batch = LocalBatch(logits=[], y=torch.zeros(0), phase="digest", proxy_pos=torch.arange(8),
                       proxy_logits=[torch.randn(8, 10, generator=g) for _ in range(3)])
    light = make_trainer(tmp_path / "l", "fedmd", {**PROXY, "digest_weight": 0.25}).algo
    assert torch.allclose(light.local_loss(state, batch), 0.25 * tr.algo.local_loss(state, batch))


def test_fedmd_consensus_is_the_mean_over_the_teachers_of_the_exits_it_reads(tmp_path):
    """Idle clients teach no one: the mean is over the clients that trained; with
    targets_from: last it is the last exit's, also when every exit was sent (comm.exits: all)."""
    tr = make_trainer(tmp_path, "fedmd", {**PROXY, "targets_from": "last"})
    logits = torch.randn(4, 3, 48, tr.setup.num_classes, generator=torch.Generator().manual_seed(5))
    active = torch.tensor([True, False, True, True])
    every, report = tr.algo.aggregate(0, {"logits": logits}, active)
    last, _ = tr.algo.aggregate(0, {"logits": logits[:, -1:].contiguous()}, active)
    assert report["teachers"] == 3
    want = logits[active][:, -1:].double().mean(0).float()
    for targets in (every["targets"], last["targets"]):
        assert all(torch.allclose(row, want, atol=1e-6) for row in targets)


def test_digest_epochs_sets_the_digest_phases_passes(tmp_path):
    steps = {}
    for epochs in (1, 3):
        tr = make_trainer(tmp_path / str(epochs), "fedmd", {**PROXY, "digest_epochs": epochs})
        tr.run_round(0)
        seen = []
        loss = tr.algo.local_loss
        def spy(state, batch, loss=loss, seen=seen):
            seen.append(batch.phase)
            return loss(state, batch)

        tr.algo.local_loss = spy
        tr.run_round(1)
        del tr.algo.local_loss
        steps[epochs] = (seen.count("digest"), seen.count("revisit"))
    assert steps[1][0] == steps[1][1] > 0  # one local epoch (the harness) = one digest epoch
    assert steps[3] == (3 * steps[1][0], steps[1][1])


# ----------------------------------------------------------------------------- DS-FL
def test_dsfl_targets_are_the_era_and_sharper_than_the_mean(tmp_path):
    tr = make_trainer(tmp_path, "dsfl", PROXY)
    tr.run_round(0)
    logits, _ = round_logits(tr, 0)
    mean = torch.softmax(logits.double(), -1).mean(0)  # the plain average of soft labels
    era = torch.softmax(mean / 0.1, -1)
    targets = tr.clients[2].state["targets"].double()
    assert torch.allclose(targets, era, atol=1e-5)
    assert torch.allclose(targets.sum(-1), torch.ones_like(targets[..., 0]))
    # barely trained clients are near-uniform, where ERA is close to the identity: strict only
    assert entropy(targets).mean() < entropy(mean).mean()


def test_dsfl_era_sharpens_confident_disagreeing_clients(tmp_path):
    sharp = make_trainer(tmp_path / "a", "dsfl", {**PROXY, "era_temperature": 0.1})
    flat = make_trainer(tmp_path / "b", "dsfl", {**PROXY, "era_temperature": 1.0})
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 48, 10, generator=g) * 3
    active = torch.ones(4, dtype=torch.bool)
    mean = torch.softmax(logits.double(), -1).mean(0)
    t_sharp = sharp.algo.aggregate(0, {"logits": logits}, active)[0]["targets"][0].double()
    t_flat = flat.algo.aggregate(0, {"logits": logits}, active)[0]["targets"][0].double()
    assert entropy(t_sharp).mean() < entropy(mean).mean() - 0.1
    assert entropy(t_sharp).mean() < entropy(t_flat).mean()


# ----------------------------------------------------------------------------- KT-pFL
def test_ktpfl_coefficients_learn_on_the_simplex_and_survive_resume(tmp_path):
    tr = make_trainer(tmp_path, "ktpfl", PROXY)
    n = tr.run.n
    uniform = torch.full((n, n), 1.0 / n, dtype=torch.float64)
    assert torch.equal(tr.algo.coef, uniform)
    tr.run_round(0)
    coef = tr.algo.coef
    assert on_simplex(coef) and not torch.allclose(coef, uniform)

    # the learned c beats the uniform start on this round's objective; targets are sum_j c_ij s_j
    logits, _ = round_logits(tr, 0)
    soft = torch.softmax(logits.double() / tr.algo.params.tau, -1).reshape(n, -1)
    items, rho = tr.run.proxy_size, tr.algo.params.rho
    assert coefficient_objective(coef, soft, items, rho) < coefficient_objective(uniform, soft, items, rho)
    for i, c in enumerate(tr.clients):
        want = (coef[i] @ soft).reshape(c.state["targets"].shape)
        assert torch.allclose(c.state["targets"].double(), want, atol=1e-5)

    tr.run_round(1)
    assert on_simplex(tr.algo.coef)
    save(tr, 1)
    resumed = make_trainer(tmp_path, "ktpfl", PROXY)
    assert load(resumed) == 2
    assert torch.equal(resumed.algo.coef, tr.algo.coef)
    tr.run_round(2)
    resumed.run_round(2)
    assert torch.equal(resumed.algo.coef, tr.algo.coef)


def test_ktpfl_only_teachers_rows_move():
    g = torch.Generator().manual_seed(3)
    n = 5
    coef = torch.softmax(torch.randn(n, n, generator=g, dtype=torch.float64), 1)
    soft = torch.softmax(torch.randn(n, 40, generator=g, dtype=torch.float64), 1)
    teachers = torch.tensor([True, True, False, True, True])
    soft[~teachers] = 0
    out = learn_coefficients(coef, soft, 4, teachers, rho=0.1, steps=10, lr=0.5)
    assert torch.equal(out[2], coef[2])
    assert on_simplex(out[teachers][:, teachers]) and bool((out[teachers][:, 2] == 0).all())


def test_cafedistill_shared_body_starts_every_client_from_one_body(tmp_path):
    # averaging bodies that started apart, each under heads trained on it alone, stalled training
    def bodies(tr):
        return [params_of(c.model, is_body) for c in tr.clients]

    shared = make_trainer(tmp_path / "shared", "cafedistill", {"shared_body": True})
    first, *rest = bodies(shared)
    assert first and all(torch.equal(v, first[k]) for other in rest for k, v in other.items())
    shared.run_round(0)
    first, *rest = bodies(shared)
    assert all(torch.equal(v, first[k]) for other in rest for k, v in other.items())  # averaged
    heads = [params_of(c.model, lambda k: not is_body(k)) for c in shared.clients]
    assert all(any(not torch.equal(v, heads[0][k]) for k, v in other.items()) for other in heads[1:])  # personal
    first, *rest = bodies(make_trainer(tmp_path / "own", "cafedistill"))  # personal models start apart
    assert all(any(not torch.equal(v, first[k]) for k, v in other.items()) for other in rest)


# ----------------------------------------------------------------------------- cafedistill-heads
def _last_heads(tr):
    m = tr.run.num_exits
    return torch.stack([parameters_to_vector(c.model.heads[m - 1].parameters()).detach() for c in tr.clients])


def test_cafedistill_heads_shares_body_keeps_heads_and_mixes_teacher_heads(tmp_path):
    tr = make_trainer(tmp_path, "cafedistill-heads")
    tr.run_round(0)
    first = params_of(tr.clients[0].model)
    for c in tr.clients[1:]:
        mine = params_of(c.model)
        for k, v in mine.items():
            if k.startswith("blocks."):
                assert torch.equal(v, first[k]), k
        assert any(not torch.equal(v, first[k]) for k, v in mine.items() if k.startswith("heads."))

    heads = _last_heads(tr).double()  # what every client uploaded (heads untouched by averaging)
    alpha = tr.algo.last_alpha
    assert on_simplex(alpha)
    want = teacher_weights(cosine_similarity_matrix(heads), tr.setup.data_weights, tr.algo.params.mu)
    assert torch.allclose(alpha, want, atol=1e-10)
    assert (alpha - torch.diag(torch.diagonal(alpha))).sum() > 0  # other clients do teach
    for i, c in enumerate(tr.clients):
        assert torch.allclose(c.state["teacher"].double(), alpha[i] @ heads, atol=1e-5)


def test_cafedistill_heads_distils_student_exits_from_the_teacher_head(tmp_path):
    runs = {}
    for lam in (0.0, 1.0):
        tr = make_trainer(tmp_path / str(lam), "cafedistill-heads", {"lam": lam})
        tr.run_round(0)
        assert bool(tr.clients[0].state["students"][0])  # exit 0 is a student in round 1
        tr.run_round(1)
        runs[lam] = params_of(tr.clients[0].model, lambda k: k.startswith("heads.0."))
    assert any(not torch.equal(runs[0.0][k], runs[1.0][k]) for k in runs[0.0])


# ----------------------------------------------------------------------------- quarantine
@pytest.mark.parametrize("name", ["fedmd", "dsfl", "ktpfl"])
def test_poisoned_client_is_quarantined_like_an_absent_one(tmp_path, name):
    tr = make_trainer(tmp_path, name, PROXY)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, tr.run.num_exits, tr.run.proxy_size, tr.setup.num_classes, generator=g)
    poisoned = logits.clone()
    poisoned[1, 0, 3, 2] = float("nan")
    all_on = torch.ones(4, dtype=torch.bool)
    absent = torch.tensor([True, False, True, True])
    coef = getattr(tr.algo, "coef", None)
    out, report = tr.algo.aggregate(0, {"logits": poisoned}, all_on)
    assert report["quarantined"] == [1]
    if coef is not None:
        tr.algo.coef = coef
    other = logits.clone()
    other[1] *= 7  # an absent client's values must not matter
    ref, _ = tr.algo.aggregate(0, {"logits": other}, absent)
    assert torch.isfinite(out["targets"]).all()
    assert torch.allclose(out["targets"][absent], ref["targets"][absent], atol=1e-6)


def test_poisoned_model_does_not_break_the_others_targets(tmp_path):
    tr = make_trainer(tmp_path, "dsfl", PROXY)
    with torch.no_grad():
        for p in tr.clients[1].model.parameters():
            p.fill_(float("nan"))
    record = tr.run_round(0)
    assert record["quarantined"] == [1]
    assert all(torch.isfinite(c.state["targets"]).all() for c in tr.clients)


def test_a_personal_model_that_diverged_is_named_and_every_one_fails_the_run(tmp_path, caplog):
    """Only shared parameters were checked for divergence: with personal models only
    (CAFEDistill) a run whose every client's loss was NaN finished, quarantining them all, and
    compare reported its ~10 % accuracy as a result. One diverged client is named in the round's
    record and the log (the quarantine keeps it from the others' targets); all of them ends the
    run as a diverged shared parameter does."""
    tr = make_trainer(tmp_path, "cafedistill", PROXY)
    with torch.no_grad():
        for p in tr.clients[1].model.parameters():
            p.fill_(float("nan"))
    record = tr.run_round(0)
    assert record["diverged"] == [1] and record["quarantined"] == [1]
    assert any("client 1" in r.getMessage() and "diverged" in r.getMessage() for r in caplog.records)
    assert "diverged" not in make_trainer(tmp_path / "clean", "cafedistill", PROXY).run_round(0)
    with torch.no_grad():
        for c in tr.clients:
            for p in c.model.parameters():
                p.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="every client's loss in round 1 is not finite: training diverged"):
        tr.run_round(1)


def test_cafedistill_heads_quarantines_a_broken_head(tmp_path):
    tr = make_trainer(tmp_path, "cafedistill-heads")
    g = torch.Generator().manual_seed(2)
    heads = torch.randn(4, tr.algo.head_size, generator=g)
    heads[3, 0] = float("inf")
    out, report = tr.algo.aggregate(0, {"head": heads}, torch.ones(4, dtype=torch.bool))
    assert report["quarantined"] == [3]
    assert torch.isfinite(out["teacher"]).all()
    assert bool((tr.algo.last_alpha[:, 3] == 0).all())


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("name, params, field", [
    ("dsfl", {"era_temperature": 0.0}, "algorithm.dsfl.era_temperature"),
    ("ktpfl", {"rho": -1.0}, "algorithm.ktpfl.rho"),
    ("fedmd", {"digest_loss": "kl"}, "algorithm.fedmd.digest_loss"),
    ("cafedistill-heads", {"mu": 0.0}, "algorithm.cafedistill-heads.mu"),
])
def test_impossible_values_name_the_field(tmp_path, name, params, field):
    with pytest.raises(ConfigError, match=field):
        make_trainer(tmp_path, name, params)


def test_cafedistill_heads_default_trains_stably_on_digits(tmp_path):
    """Regression: with lam = 1 (the old default) the last exit fell to 0.65 after 12 rounds of
    configs/digits.yaml (the on-the-fly teacher shares the body it pulls); the default holds > 0.9."""
    out = tmp_path / "heads"
    cafedist_in_process("train", "--config", str(ROOT / "configs" / "digits.yaml"), "--out", str(out), "--no-progress",
                        "algorithm.name=cafedistill-heads", "train.rounds=12", f"data.cache_dir={tmp_path / 'stores'}",
                        check=True)
    assert summary(out)["acc_per_exit"][-1] > 0.9


def test_ktpfl_checkpoint_of_another_client_count_is_refused_in_one_line(tmp_path, tiny_config):
    """--resume force onto a changed data.clients: the n x n coefficient matrix does not fit, which
    is one 'does not fit' line (exit 2) before any round, not a traceback at the first matmul.
    With its config.yaml the run's partition change is refused first (test_run_dir); without it
    (deleted by hand) the newest checkpoint's recorded partition refuses it; and for a checkpoint
    written before manifests recorded one, nothing names the old partition, and the checkpoint's
    fit is the guard."""
    from test_run_dir import run_cli, tree_hashes

    cfg, out = str(tiny_config(rounds=2, clients=4)), str(tmp_path / "run")
    code, _, err = run_cli("train", "--config", cfg, "--out", out, "--no-progress", "algorithm.name=ktpfl")
    assert code == 0, err
    (tmp_path / "run" / "config.yaml").unlink()

    def force_five_clients() -> str:
        before = tree_hashes(tmp_path / "run")
        code, _, err = run_cli("train", "--config", cfg, "--out", out, "--no-progress", "--resume", "force",
                               "algorithm.name=ktpfl", "data.clients=5", "train.rounds=3")
        assert code == 2, err
        assert "Traceback" not in err
        assert tree_hashes(tmp_path / "run") == before
        errors = [ln for ln in err.splitlines() if ln.startswith("cafedist: error:")]
        assert len(errors) == 1, err
        return errors[0]

    assert "cannot change the data partition" in force_five_clients()
    for manifest in (tmp_path / "run" / "checkpoints").glob("*/MANIFEST.json"):  # as written before the record
        record = json.loads(manifest.read_text())
        record.pop("partition"), record.pop("store_data")
        manifest.write_text(json.dumps(record))
    error = force_five_clients()
    assert "does not fit" in error and "coefficient matrix" in error, error
