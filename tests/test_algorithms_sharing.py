"""The parameter-sharing family on the real loop: FedPer, FedRep, FedBABU, Ditto, DepthFL, ScaleFL.

Each test checks a method's defining behaviour: what is averaged (and over whom), what stays
personal, what is frozen when. Pre-aggregation values come from a twin trainer (same seed,
same data) whose clients only run their local update: training is keyed by (seed, client,
round), so the twin's clients hold exactly what the real trainer's clients send.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from algo_harness import make_trainer, params_of

from cafedist.algorithms.base import LocalBatch
from cafedist.algorithms.common import equal_groups, exit_index, is_body, is_head, mutual_distillation
from cafedist.algorithms.depthfl import consistency_weight
from cafedist.algorithms.fedrep import FedRepParams
from cafedist.algorithms.proxy_math import kd_loss as kd_kl
from cafedist.algorithms.scalefl import ScaleFLParams, width_mask
from cafedist.errors import ConfigError
from cafedist.train.local import local_update
from cafedist.train.schedule import participating


def locally_trained(tr, rnd: int = 0) -> list[dict[str, torch.Tensor]]:
    """Run every client's local update of round ``rnd`` without any aggregation."""
    for c in tr.clients:
        local_update(c, tr.algo, tr.cfg.train, rnd, tr.cfg.seed)
    return [params_of(c.model) for c in tr.clients]


def weights(tr) -> list[float]:
    return [float(w) for w in tr.setup.data_weights]


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> bool:
    return a.numel() == 0 or bool((a - b).abs().max() <= tol)


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-6)


# ----------------------------------------------------------------------------- shared helpers
def test_exit_index_and_equal_groups():
    assert exit_index("blocks.2.0.weight") == 2 and exit_index("heads.0.4.bias") == 0
    with pytest.raises(ValueError):
        exit_index("stem.weight")
    assert equal_groups(4, 3) == [0, 0, 1, 2]
    assert equal_groups(100, 4) == [i // 25 for i in range(100)]  # the DepthFL reference's split
    assert equal_groups(5, 2, torch.tensor([4, 3, 2, 1, 0])) == [1, 1, 0, 0, 0]


def test_mutual_distillation_teaches_every_exit_from_the_others_only():
    torch.manual_seed(0)
    z = [torch.randn(8, 5, requires_grad=True) for _ in range(3)]
    terms = mutual_distillation(z)
    probs = [F.softmax(t.detach(), dim=1) for t in z]
    expected0 = (kd_kl(z[0], probs[1], 1.0) + kd_kl(z[0], probs[2], 1.0)) / 2
    assert torch.allclose(terms[0], expected0)
    terms[0].backward()
    assert z[0].grad.abs().sum() > 0 and z[1].grad is None and z[2].grad is None  # teachers detached
    same = torch.randn(8, 5)
    assert all(float(t) < 1e-6 for t in mutual_distillation([same, same.clone()]))


def test_params_validate_with_field_names():
    from cafedist.config import config_from_dict

    for name, params, field in (("fedrep", {"head_epochs": 0}, "head_epochs"),
                                ("scalefl", {"widths": [0.5, 1.5]}, "widths"),
                                ("scalefl", {"widths": [0.5, 1.0], "depths": [1]}, "depths")):
        with pytest.raises(ConfigError, match=rf"^algorithm\.{name}\.{field}: must be "):
            config_from_dict({"algorithm": {"name": name, name: params}})
    assert FedRepParams().checks() and all(ok for _, ok, _ in ScaleFLParams().checks())


# ----------------------------------------------------------------------------- FedPer
def test_fedper_averages_the_body_and_keeps_every_head_personal(tmp_path):
    tr = make_trainer(tmp_path / "a", "fedper")
    sent = locally_trained(make_trainer(tmp_path / "b", "fedper"))
    w = weights(tr)
    tr.run_round(0)
    after = [params_of(c.model) for c in tr.clients]
    for key in after[0]:
        if is_body(key):
            mean = sum(wi * s[key] for wi, s in zip(w, sent))
            assert all(close(a[key], mean) for a in after), key
        else:
            assert all(torch.equal(a[key], s[key]) for a, s in zip(after, sent)), key  # never averaged
            assert differ(after[0][key], after[1][key]), key


# ----------------------------------------------------------------------------- FedRep
def test_fedrep_trains_heads_with_the_body_frozen_then_the_body(tmp_path):
    tr = make_trainer(tmp_path, "fedrep", {"head_epochs": 2})
    c = tr.clients[0]
    heads_phase, body_phase = tr.algo.local_phases(c.view, 0)
    assert heads_phase.epochs == 2 and body_phase.epochs is None  # body: train.local_epochs
    start = params_of(c.model)
    local_update(c, tr.algo, tr.cfg.train, 0, tr.cfg.seed, phases=[heads_phase])
    mid = params_of(c.model)
    for key in start:
        assert (differ if is_head(key) else torch.equal)(mid[key], start[key]), key
    local_update(c, tr.algo, tr.cfg.train, 0, tr.cfg.seed, phases=[body_phase])
    end = params_of(c.model)
    assert all(torch.equal(end[k], mid[k]) for k in end if is_head(k))
    assert any(differ(end[k], mid[k]) for k in end if is_body(k))

    tr.run_round(1)
    after = [params_of(x.model) for x in tr.clients]
    for key in after[0]:
        same = all(close(a[key], after[0][key]) for a in after[1:])
        assert same == is_body(key), key


# ----------------------------------------------------------------------------- FedBABU
def test_fedbabu_never_updates_heads_during_fl_and_fine_tunes_them_at_the_end(tmp_path):
    tr = make_trainer(tmp_path, "fedbabu", {"finetune_epochs": 1}, rounds=2)
    init = [params_of(c.model) for c in tr.clients]
    heads = [k for k in init[0] if is_head(k)]
    assert all(torch.equal(i[k], init[0][k]) for i in init for k in heads)  # one common random head
    assert tr.algo.post_phases(tr.clients[0].view, 0, trained=True) == []

    tr.run_round(0)
    after = [params_of(c.model) for c in tr.clients]
    for key in after[0]:
        if is_head(key):
            assert all(torch.equal(a[key], init[0][key]) for a in after), key
        else:
            assert all(close(a[key], after[0][key]) for a in after), key
    assert any(differ(after[0][k], init[0][k]) for k in after[0] if is_body(k))

    tr.run_round(1)  # the last round: body trained and averaged, then heads fine-tuned locally
    final = [params_of(c.model) for c in tr.clients]
    assert all(close(f[k], final[0][k]) for f in final for k in final[0] if is_body(k))
    for key in heads:
        assert all(differ(f[key], init[0][key]) for f in final), key
        assert differ(final[0][key], final[1][key]), key


def test_fedbabu_fine_tunes_clients_idle_in_the_last_round_too(tmp_path):
    tr = make_trainer(tmp_path, "fedbabu", {"finetune_epochs": 1}, rounds=1, clients_per_round=2)
    init = [params_of(c.model, is_head) for c in tr.clients]
    tr.run_round(0)
    active = participating(tr.cfg.seed, 0, len(tr.clients), tr.cfg.train.clients_per_round)
    idle = [c for c in tr.clients if not active[c.cid]]
    assert idle  # 2 of 4 clients train
    for c in idle:
        assert all(differ(v, init[c.cid][k]) for k, v in params_of(c.model, is_head).items())


# ----------------------------------------------------------------------------- Ditto
def test_ditto_personal_model_is_regularised_toward_one_global_model(tmp_path):
    tr = make_trainer(tmp_path / "a", "ditto", {"lam": 0.1})
    start = params_of(tr.clients[0].models["global"])
    tr.run_round(0)
    glob = [params_of(c.models["global"]) for c in tr.clients]
    pers = [params_of(c.models["main"]) for c in tr.clients]
    for key in glob[0]:
        assert all(close(g[key], glob[0][key]) for g in glob), key
    for g, p in zip(glob, pers):
        assert any(differ(p[k], g[k]) for k in p)
    assert any(differ(pers[0][k], pers[1][k]) for k in pers[0])
    view = tr.clients[0].view
    assert tr.algo.eval_model(view) is tr.clients[0].models["main"]

    # the personal model starts from the global one and lam pulls it back there
    far = make_trainer(tmp_path / "b", "ditto", {"lam": 0.0})
    near = make_trainer(tmp_path / "c", "ditto", {"lam": 10.0})
    far.run_round(0)
    near.run_round(0)

    def drift(t):
        return sum(float((v - start[k]).pow(2).sum()) for k, v in params_of(t.clients[0].model).items())

    assert drift(near) < 0.5 * drift(far)


# ----------------------------------------------------------------------------- DepthFL
def test_depthfl_depths_and_kd_ramp(tmp_path):
    tr = make_trainer(tmp_path, "depthfl", rounds=10)
    assert tr.algo.depths == [1, 1, 2, 3]  # equal groups over the 3 exits, by client id
    assert [p.upto for c in tr.clients for p in tr.algo.local_phases(c.view, 0)] == [1, 1, 2, 3]
    assert consistency_weight(0, 3.0) == pytest.approx(math.exp(-5))
    assert consistency_weight(3, 3.0) == consistency_weight(7, 3.0) == 1.0
    assert consistency_weight(0, 0.0) == 1.0

    z = [torch.randn(6, 10) for _ in range(2)]
    y = torch.randint(0, 10, (6,))
    state = {"depthfl.kd_weight": torch.tensor(0.5, dtype=torch.float64)}
    loss = tr.algo.local_loss(state, LocalBatch(logits=z, y=y))
    expected = F.cross_entropy(z[0], y) + F.cross_entropy(z[1], y) + 0.5 * sum(mutual_distillation(z))
    assert torch.allclose(loss, expected)


def test_depthfl_averages_each_layer_over_its_holders_only(tmp_path):
    tr = make_trainer(tmp_path / "a", "depthfl")
    twin = make_trainer(tmp_path / "b", "depthfl")
    init = [params_of(c.model) for c in twin.clients]
    sent = locally_trained(twin)
    depth, w = tr.algo.depths, weights(tr)
    for i, (s, i0) in enumerate(zip(sent, init)):  # a client never trains beyond its depth
        assert all(torch.equal(s[k], i0[k]) for k in s if exit_index(k) >= depth[i])
    tr.run_round(0)
    after = [params_of(c.model) for c in tr.clients]
    for key in after[0]:
        holders = [i for i in range(len(sent)) if exit_index(key) < depth[i]]
        mean = sum(w[i] * sent[i][key] for i in holders) / sum(w[i] for i in holders)
        assert all(close(after[i][key], mean) for i in holders), key


def test_depthfl_shallow_clients_receive_the_deep_clients_average(tmp_path):
    tr = make_trainer(tmp_path / "a", "depthfl")
    sent = locally_trained(make_trainer(tmp_path / "b", "depthfl"))
    w = weights(tr)
    tr.run_round(0)
    shallow = params_of(tr.clients[0].model)
    for key in shallow:
        if exit_index(key) == 2:  # only client 3 holds the last block and exit
            assert close(shallow[key], sent[3][key]), key
        elif exit_index(key) == 1:
            assert close(shallow[key], (w[2] * sent[2][key] + w[3] * sent[3][key]) / (w[2] + w[3])), key


def test_depthfl_bytes_count_what_each_client_holds_up_and_the_whole_model_down(tmp_path):
    tr = make_trainer(tmp_path, "depthfl")
    record = tr.run_round(0)
    named = dict(tr.clients[0].model.named_parameters())
    full = sum(named[k].numel() for k in tr.shared.keys)
    held = [sum(named[k].numel() for k in tr.shared.keys if exit_index(k) < tr.algo.depth(i)) for i in range(4)]
    assert record["bytes_down"] == 4 * full  # every client keeps a copy of the one global model
    assert record["bytes_up"] == round(4 * sum(held) / 4) < 4 * full  # shallow clients send less
    fedavg = make_trainer(tmp_path / "f", "fedavg").run_round(0)
    assert fedavg["bytes_up"] == fedavg["bytes_down"] == 4 * full
    # partial participation: up is averaged over the clients that trained in that round
    half = make_trainer(tmp_path / "h", "depthfl", rounds=10, clients_per_round=0.5)

    def trained(r):
        return [i for i in range(4) if participating(0, r, 4, 0.5)[i]]

    # a round whose trained clients hold another amount on average than all clients do
    rnd = next(r for r in range(10) if sum(held[i] for i in trained(r)) * 4 != sum(held) * len(trained(r)))
    expected = round(4 * sum(held[i] for i in trained(rnd)) / len(trained(rnd)))
    assert half.run_round(rnd)["bytes_up"] == expected != round(4 * sum(held) / 4)


def test_depthfl_layer_no_active_client_holds_is_untouched(tmp_path):
    tr = make_trainer(tmp_path, "depthfl", rounds=10, clients_per_round=0.5)
    rnd = next(r for r in range(10) if not participating(0, r, 4, 0.5)[3])
    active = participating(0, rnd, 4, 0.5)
    before = [params_of(c.model) for c in tr.clients]
    tr.run_round(rnd)
    after = [params_of(c.model) for c in tr.clients]
    depths = [tr.algo.depth(i) for i in range(4)]
    for key in after[0]:
        e = exit_index(key)
        if not any(active[i] and depths[i] > e for i in range(4)):  # no active holder: nobody changes it
            for b, a in zip(before, after):
                assert torch.equal(a[key], b[key]), key
        else:  # every client, idle ones included, downloads the active holders' average
            for a in after[1:]:
                assert torch.equal(a[key], after[0][key]), key


# ----------------------------------------------------------------------------- ScaleFL
SCALE = {"widths": [0.5, 1.0], "depths": [2, 3]}


def test_scalefl_width_masks_keep_leading_channels_inputs_and_classes():
    conv0 = width_mask("blocks.0.0.weight", (4, 1, 3, 3), 0.5, 10)  # first conv: every input channel
    assert conv0[:2].all() and not conv0[2:].any()
    conv1 = width_mask("blocks.1.0.weight", (8, 4, 3, 3), 0.5, 10)
    assert conv1[:4, :2].all() and int(conv1.sum()) == 4 * 2 * 9
    linear = width_mask("heads.2.2.weight", (10, 16), 0.5, 10)
    assert linear[:, :8].all() and not linear[:, 8:].any()
    assert width_mask("heads.2.2.bias", (10,), 0.5, 10).all()
    assert int(width_mask("blocks.1.0.bias", (8,), 0.5, 10).sum()) == 4
    with pytest.raises(ConfigError, match="algorithm.scalefl.widths"):
        width_mask("blocks.0.0.tokens.weight", (100, 8), 0.5, 4)  # transformers: depth scaling only


def test_scalefl_narrow_clients_never_train_unheld_elements(tmp_path):
    tr = make_trainer(tmp_path, "scalefl", SCALE)
    algo = tr.algo
    assert sorted(algo.levels) == [0, 0, 1, 1]
    init = [params_of(c.model) for c in tr.clients]
    sent = locally_trained(tr)
    for c, i0, s in zip(tr.clients, init, sent):
        for key, p in c.model.named_parameters():
            mask = algo.shared_mask(c.cid, key, p)
            if mask is False:  # beyond the client's depth: never in its forward pass
                assert torch.equal(s[key], i0[key]), key
            elif isinstance(mask, torch.Tensor):
                assert algo.width(c.cid) < 1
                assert not s[key][~mask].any(), key  # zeroed and kept at zero
        narrow = isinstance(algo.shared_mask(c.cid, "blocks.1.0.weight", init[0]["blocks.1.0.weight"]), torch.Tensor)
        assert narrow == (algo.width(c.cid) < 1)
        if narrow:  # the reference's Scaler: conv outputs / width in training, global model unscaled
            conv, x = c.model.blocks[1][0], torch.randn(2, 4, 4, 4)
            conv.train()
            scaled = conv(x)
            conv.eval()
            assert torch.allclose(scaled, conv(x) / algo.width(c.cid))


def test_scalefl_averages_each_element_over_its_holders_only(tmp_path):
    tr = make_trainer(tmp_path / "a", "scalefl", SCALE)
    sent = locally_trained(make_trainer(tmp_path / "b", "scalefl", SCALE))
    w = weights(tr)
    tr.run_round(0)
    after = [params_of(c.model) for c in tr.clients]
    for key, p in tr.clients[0].model.named_parameters():
        masks = []
        for i in range(len(sent)):
            m = tr.algo.shared_mask(i, key, p)
            masks.append(m.cpu() if isinstance(m, torch.Tensor) else torch.full(p.shape, bool(m)))
        den = sum(w[i] * masks[i].double() for i in range(len(sent)))
        num = sum(w[i] * masks[i].double() * sent[i][key].double() for i in range(len(sent)))
        mean = (num / den.clamp_min(1e-12)).float()
        for i in range(len(sent)):
            held = masks[i]
            assert close(after[i][key][held], mean[held]), (i, key)
        partial = (den > 0) & (den < sum(w) - 1e-9)
        if partial.any():  # an element held by the wide clients only is their average alone
            wide = [i for i in range(len(sent)) if tr.algo.width(i) == 1.0]
            assert close(after[wide[0]][key][partial], mean[partial])


def test_scalefl_loss_weights_exits_and_distils_from_the_deepest(tmp_path):
    tr = make_trainer(tmp_path, "scalefl", {**SCALE, "gamma": 0.5})
    torch.manual_seed(1)
    z = [torch.randn(6, 10) for _ in range(2)]
    y = torch.randint(0, 10, (6,))
    off = tr.algo.local_loss({"scalefl.kd_on": torch.tensor(False)}, LocalBatch(logits=z, y=y))
    on = tr.algo.local_loss({"scalefl.kd_on": torch.tensor(True)}, LocalBatch(logits=z, y=y))
    ce = [F.cross_entropy(t, y) for t in z]
    assert torch.allclose(off, (ce[0] + 2 * ce[1]) / 3)
    kd = kd_kl(z[0], F.softmax(z[1] / 3.0, dim=1), 3.0)
    assert torch.allclose(on, (ce[0] + 0.5 * kd + 2 * ce[1]) / 3)
    # KD starts after kd_start (25 %) of the rounds
    c = tr.clients[0]
    tr.algo.on_local_start(c.view, 0)
    assert not bool(c.state["scalefl.kd_on"])
    tr.algo.on_local_start(c.view, 3)
    assert bool(c.state["scalefl.kd_on"])


def test_scalefl_gradient_masks_hold_where_groupnorm_mixes_channels(tmp_path):
    # width 0.7 of 128 channels keeps 89: a GroupNorm group (of 16 on the 1x1 map) straddles held and unheld
    # channels, so without the gradient mask the unheld conv rows would start to learn
    tr = make_trainer(tmp_path, "scalefl", {"widths": [0.7, 1.0], "depths": [4, 4]}, arch="resnet18",
                      options={"width": 16})
    c = next(x for x in tr.clients if tr.algo.width(x.cid) < 1)
    local_update(c, tr.algo, tr.cfg.train, 0, tr.cfg.seed)
    masks = {k: tr.algo.shared_mask(c.cid, k, p) for k, p in c.model.named_parameters()}
    assert any(isinstance(m, torch.Tensor) and m.shape[0] == 128 for m in masks.values())
    for key, p in c.model.named_parameters():
        if isinstance(masks[key], torch.Tensor):
            assert not p.detach()[~masks[key]].any(), key
