"""The readings of CAFEDistill the paper leaves open, as options: loss weighting, what an
unselected exit gets, the similarity, and the optimizer state across rounds."""

import pytest
import torch
import torch.nn.functional as F
from algo_harness import make_trainer, params_of

from cafedist.algorithms.base import LocalBatch
from cafedist.algorithms.exit_loss import ExitLossRule, per_exit, total
from cafedist.algorithms.proxy_math import cosine_similarity_matrix, kl_batchmean, teacher_weights
from cafedist.errors import ConfigError
from cafedist.run.client import model_hash


def _batch(m=3, b=8, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(b, c, generator=g) for _ in range(m)]
    proxy = [torch.randn(6, c, generator=g) for _ in range(m)]
    teacher = torch.softmax(torch.randn(6, c, generator=g), dim=1)
    y = torch.randint(0, c, (b,), generator=g)
    return logits, proxy, teacher, y


def _kl(proxy, teacher, tau):
    return lambda k: kl_batchmean(F.log_softmax(proxy[k] / tau, dim=1), teacher)


def test_default_rule_is_the_written_out_formula_bit_for_bit():
    logits, proxy, teacher, y = _batch()
    students = torch.tensor([True, False, True])
    rule = ExitLossRule(lam=1.0, tau=3.0)
    want = F.cross_entropy(logits[2], y) + F.cross_entropy(logits[0], y)
    want = want + 1.0 * 3.0 * 3.0 * kl_batchmean(F.log_softmax(proxy[0] / 3.0, dim=1), teacher)
    got = total(rule.terms(logits, y, students, _kl(proxy, teacher, 3.0)))
    assert torch.equal(got, want)


def test_weightings_unselected_ce_and_exit_weights():
    logits, proxy, teacher, y = _batch()
    students = torch.tensor([True, False, True])
    kl = _kl(proxy, teacher, 2.0)
    ce = [F.cross_entropy(z, y) for z in logits]
    convex = ExitLossRule(lam=0.25, tau=2.0, kd_weighting="convex")
    exits = per_exit(convex.terms(logits, y, students, kl), 3)
    assert exits[1] is None  # not a student, no loss
    assert torch.allclose(exits[0], 0.75 * ce[0] + 0.25 * 4.0 * kl(0))
    assert torch.allclose(exits[2], ce[2])  # the last exit keeps its whole CE
    plain = ExitLossRule(lam=0.5, tau=2.0, kd_weighting="lam", unselected="ce")
    exits = per_exit(plain.terms(logits, y, students, kl), 3)
    assert torch.allclose(exits[0], ce[0] + 0.5 * kl(0))
    assert torch.allclose(exits[1], ce[1])  # CE only until selected: no KD
    weighted = ExitLossRule(lam=1.0, tau=2.0, exit_weights=(0.5, 1.0, 2.0))
    exits = per_exit(weighted.terms(logits, y, students, None), 3)
    assert torch.allclose(exits[0], 0.5 * ce[0]) and torch.allclose(exits[2], 2.0 * ce[2])
    assert torch.allclose(total(weighted.terms(logits, y, students, None)), 0.5 * ce[0] + 2.0 * ce[2])
    # an exit's weight multiplies its KD term as well as its CE ("every term of that exit")
    weighted_kd = ExitLossRule(lam=1.0, tau=2.0, kd_weighting="lam", exit_weights=(0.5, 1.0, 2.0))
    exits = per_exit(weighted_kd.terms(logits, y, students, kl), 3)
    assert torch.allclose(exits[0], 0.5 * (ce[0] + kl(0)))


def test_last_exit_kd_adds_the_last_exits_kd_term_only():
    logits, proxy, teacher, y = _batch()
    students = torch.tensor([True, False, True])
    kl = _kl(proxy, teacher, 3.0)
    off = per_exit(ExitLossRule(lam=0.5, tau=3.0, kd_weighting="lam").terms(logits, y, students, kl), 3)
    on = per_exit(ExitLossRule(lam=0.5, tau=3.0, kd_weighting="lam", last_exit_kd=True).terms(logits, y, students, kl),
                  3)
    assert torch.equal(on[0], off[0]) and on[1] is None
    assert torch.allclose(on[2], F.cross_entropy(logits[2], y) + 0.5 * kl(2))
    assert torch.equal(off[2], F.cross_entropy(logits[2], y))


def test_last_exit_kd_trains_the_last_exit_on_the_proxy_from_the_first_targets(tmp_path):
    """Early in a 20-round run no shallow exit is a student yet, so plain CAFEDistill draws no
    proxy batch; with last_exit_kd the last exit distils as soon as targets arrive."""
    losses = {}
    for flag in (False, True):
        tr = make_trainer(tmp_path / str(flag), "cafedistill", {"proxy_size": 48, "last_exit_kd": flag}, rounds=20)
        tr.run_round(0)  # targets arrive, no students for round 1 at T = 20 (R = 0.1)
        c = tr.clients[0]
        assert not bool(tr.algo.students(c.state)[:-1].any())
        assert tr.algo.uses_proxy_batch(c.view, None) is flag
        losses[flag] = tr.run_round(1)["loss"]
    assert losses[True] != losses[False]


@pytest.mark.parametrize("name", ["cafedistill", "cafedistill-heads"])
@pytest.mark.parametrize("params, field", [
    ({"exit_weights": [1.0, 2.0]}, "exit_weights"),
    ({"kd_weighting": "hinton"}, "kd_weighting"),
    ({"unselected": "kd"}, "unselected"),
    ({"similarity": "gradients"}, "similarity"),
    ({"kd_weighting": "convex", "lam": 2.0}, "lam"),
])
def test_bad_reading_names_the_field(tmp_path, name, params, field):
    with pytest.raises(ConfigError, match=f"algorithm.{name}.{field}"):
        make_trainer(tmp_path, name, params)


def test_exit_losses_sum_to_the_local_loss(tmp_path):
    tr = make_trainer(tmp_path, "cafedistill", {"proxy_size": 48, "student_selection": False})
    tr.run_round(0)
    c = tr.clients[0]
    x = c.data.x_train[:8]
    xp = tr.run.proxy_x[:6]
    outs = c.model(torch.cat([x, xp]))
    batch = LocalBatch(logits=[o[:8] for o in outs], y=c.data.y_train[:8], x=x,
                       proxy_logits=[o[8:] for o in outs], proxy_pos=torch.arange(6), proxy_x=xp)
    parts = tr.algo.exit_losses(c.state, batch)
    assert all(p is not None for p in parts)
    assert torch.allclose(sum(parts), tr.algo.local_loss(c.state, batch))


def test_unselected_ce_trains_shallow_heads_from_round_zero(tmp_path):
    heads0 = {}
    for mode in ("none", "ce"):
        tr = make_trainer(tmp_path / mode, "cafedistill", {"proxy_size": 48, "unselected": mode})
        before = params_of(tr.clients[0].model, lambda k: k.startswith("heads.0."))
        tr.run_round(0)
        after = params_of(tr.clients[0].model, lambda k: k.startswith("heads.0."))
        heads0[mode] = any(not torch.equal(before[k], after[k]) for k in before)
    assert heads0 == {"none": False, "ce": True}


def test_head_params_similarity_drives_the_teacher_weights(tmp_path):
    tr = make_trainer(tmp_path, "cafedistill", {"proxy_size": 48, "similarity": "head_params"})
    assert "head" in tr.algo.upload_spec()
    tr.run_round(0)
    m = tr.run.num_exits
    heads = torch.stack([torch.cat([p.detach().reshape(-1) for p in c.model.heads[m - 1].parameters()])
                         for c in tr.clients]).double()
    n = len(tr.clients)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, 1, tr.run.proxy_size, tr.setup.num_classes, generator=g)
    out, report = tr.algo.aggregate(0, {"logits": logits, "head": heads.float()}, torch.ones(n, dtype=torch.bool))
    alpha = teacher_weights(cosine_similarity_matrix(heads), tr.setup.data_weights, tr.algo.params.mu)
    assert report["self_weight"] == pytest.approx(float(torch.diagonal(alpha).mean()), abs=1e-6)


def test_heads_with_output_similarity_exchanges_last_exit_logits(tmp_path):
    plain = make_trainer(tmp_path / "params", "cafedistill-heads")
    assert plain.run.proxy_x is None
    tr = make_trainer(tmp_path / "output", "cafedistill-heads", {"similarity": "output", "proxy_size": 32})
    assert tr.run.proxy_x is not None and tr.run.proxy_size == 32
    record = tr.run_round(0)
    assert record["bytes_up"] - plain.run_round(0)["bytes_up"] == 32 * tr.setup.num_classes * 4
    assert all("teacher" in c.state for c in tr.clients)


def test_optimizer_reset_clears_momentum_each_round(tmp_path):
    hashes = {}
    for mode in ("keep", "reset"):
        for momentum in (0.9, 0.0):
            tr = make_trainer(tmp_path / f"{mode}{momentum}", "fedavg", optimizer_state=mode, momentum=momentum)
            tr.run_round(0)
            tr.run_round(1)
            hashes[mode, momentum] = model_hash(tr.clients[0].model)
    assert hashes["keep", 0.9] != hashes["reset", 0.9]  # momentum carried across rounds matters
    assert hashes["keep", 0.0] == hashes["reset", 0.0]  # and is the only thing reset changes


def test_optimizer_reset_packed_equals_sequential(tmp_path):
    """Both local-training paths start every round without momentum (vmap: equal to float noise)."""
    models = []
    for packed in ("off", "on"):
        tr = make_trainer(tmp_path / packed, "cafedistill", {"proxy_size": 48, "student_selection": False},
                          optimizer_state="reset", packed=packed)
        assert tr.use_packed == (packed == "on")
        for r in range(3):
            tr.run_round(r)
        models.append([params_of(c.model) for c in tr.clients])
    for a, b in zip(*models):
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_packed_bf16_run_agrees_with_sequential_bf16(tmp_path):
    """train.amp reaches the packed path: both paths run the forward in bf16 (the loss in
    fp32), and their first-round losses agree to bf16 resolution."""
    losses, dtypes = {}, {}
    for packed, amp in (("off", "bf16"), ("on", "bf16"), ("on", "off")):
        tr = make_trainer(tmp_path / f"{packed}{amp}", "cafedistill", {"proxy_size": 48, "student_selection": False},
                          packed=packed, amp=amp)
        assert tr.use_packed == (packed == "on")
        seen = set()
        for c in tr.clients:  # the last head's output dtype: what the forward ran in
            c.model.heads[-1].register_forward_hook(lambda mod, args, out, seen=seen: seen.add(out.dtype))
        losses[packed, amp] = tr.run_round(0)["loss"]
        dtypes[packed, amp] = seen
    assert torch.bfloat16 in dtypes["off", "bf16"] and torch.bfloat16 in dtypes["on", "bf16"]
    assert dtypes["on", "off"] == {torch.float32}
    assert losses["off", "bf16"] == pytest.approx(losses["on", "bf16"], abs=5e-3)  # bf16 resolution


def test_fp16_is_not_packed(tmp_path):
    from cafedist.train.packed import pack_blocker

    tr = make_trainer(tmp_path, "cafedistill", {"proxy_size": 48}, amp="fp16")
    assert "fp16" in pack_blocker(tr.clients, tr.algo, tr.cfg.train)
