"""``train.diagnostics: [conflict]``: the cosine math, the record, and that training never notices it."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from conftest import ROOT, cafedist_in_process, comparable, env_for_tests, metrics, summary, torchrun
from torch import nn

from cafedist.algorithms.base import Algorithm, LocalBatch, Setup
from cafedist.config import load_config
from cafedist.data.store import ClientData
from cafedist.distributed.runtime import Runtime
from cafedist.errors import ConfigError
from cafedist.eval.run import evaluate_run
from cafedist.models.base import EarlyExitNet
from cafedist.rng import generator
from cafedist.run.client import Client
from cafedist.train.diagnostics import Diagnostics, client_conflict, conflict_record, exit_pairs, pair_cosines
from cafedist.train.loop import train

ON = ["train.diagnostics=[conflict]"]


# ----------------------------------------------------------------------------- hand-made models
def _net(head1_scale: float, seed: int = 0) -> EarlyExitNet:
    """Two exits over 3 features. Block 1 is the identity *with parameters*, so exit 1 sees
    exit 0's features and head 1 = ``head1_scale`` x head 0: with summed logits as losses, exit
    1's gradient on block 0 is exactly ``head1_scale`` x exit 0's. Block 1's own (nonzero)
    gradient is not shared with exit 0 and must be left out of the cosine."""
    torch.manual_seed(seed)
    block0, block1 = nn.Linear(3, 3), nn.Linear(3, 3)
    head0, head1 = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        block1.weight.copy_(torch.eye(3))
        block1.bias.zero_()
        head1.weight.copy_(head1_scale * head0.weight)
        head1.bias.zero_()
    return EarlyExitNet([block0, block1], [head0, head1])


def _summed_logit_losses(net: EarlyExitNet, x: torch.Tensor) -> list[torch.Tensor]:
    return [z.sum() for z in net(x)]


@pytest.mark.parametrize("scale, expected", [(2.0, 1.0), (-0.5, -1.0)])
def test_parallel_and_opposite_exits_give_plus_and_minus_one(scale, expected):
    net = _net(scale)
    cos = pair_cosines(_summed_logit_losses(net, torch.randn(5, 3)), net.blocks, 2)
    assert cos.shape == (1,) and cos.dtype == torch.float64
    assert cos[0].item() == pytest.approx(expected, abs=1e-9)


def test_cosine_is_over_the_shared_blocks_only_and_matches_a_manual_one():
    """Three exits: pair (0, 2) shares block 0 only, pair (1, 2) blocks 0-1; checked against
    torch.autograd on the same parameter sets."""
    torch.manual_seed(1)
    net = EarlyExitNet([nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 3) for _ in range(3)])
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    losses = [nn.functional.cross_entropy(z, y) for z in net(x)]
    cos = pair_cosines(losses, net.blocks, 3)

    def grad(k: int, upto: int) -> torch.Tensor:
        params = [p for b in net.blocks[: upto + 1] for p in b.parameters()]
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[k], params, retain_graph=True)])

    for n, (i, j) in enumerate(exit_pairs(3)):
        want = torch.nn.functional.cosine_similarity(grad(i, i).double(), grad(j, i).double(), dim=0)
        assert cos[n].item() == pytest.approx(want.item(), abs=1e-6), (i, j)
    assert not any(p.grad is not None for p in net.parameters())  # autograd.grad: .grad untouched


def test_missing_losses_and_exits_are_nan():
    net = _net(1.0)
    losses = _summed_logit_losses(net, torch.randn(4, 3))
    assert math.isnan(pair_cosines([losses[0], None], net.blocks, 2)[0].item())
    assert math.isnan(pair_cosines(losses[:1], net.blocks, 2)[0].item())  # depth-limited: exit 1 not run


class _HalfTrained(Algorithm):
    """Exit 0 gets no loss (None); exit 1 its CE: the pair is not trained, its 'all' value uses
    exit 0's plain CE."""

    name = "half"

    def exit_losses(self, state, batch: LocalBatch):
        return [None, nn.functional.cross_entropy(batch.logits[1], batch.y)]


def test_client_conflict_flags_untrained_pairs_and_uses_plain_ce():
    net = _net(1.0)
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    client = Client(cid=2, models={"main": net}, optimizers={}, data=ClientData(x, y, x[:4], y[:4]))
    setup = Setup(num_clients=3, num_exits=2, num_classes=2, rounds=1, train_sizes=(40, 40, 40), seed=0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    row = client_conflict(client, _HalfTrained(None, setup), batch_size=16, proxy_batch_size=4, rnd=0, seed=5)
    cos, trained = row[:1], row[1:]
    assert trained.tolist() == [0.0]
    again = client_conflict(client, _HalfTrained(None, setup), batch_size=16, proxy_batch_size=4, rnd=0, seed=5)
    assert torch.equal(row, again)  # the diagnostic batch is a function of (seed, client, round)
    # by hand: the same 16 samples, CE on both exits
    idx = torch.randperm(40, generator=generator(5, "diag", 2, 0))[:16]
    logits = net(x[idx])
    losses = [nn.functional.cross_entropy(z, y[idx]) for z in logits]
    assert cos[0].item() == pytest.approx(pair_cosines(losses, net.blocks, 2)[0].item(), abs=1e-12)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_client_conflict_leaves_rng_buffers_grads_and_mode_alone():
    """BatchNorm statistics, the global RNG (dropout), ``.grad`` and eval mode are as before."""
    torch.manual_seed(3)
    net = EarlyExitNet([nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Dropout(0.5)), nn.Linear(6, 6)],
                       [nn.Linear(6, 2), nn.Linear(6, 2)])
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    client = Client(cid=0, models={"main": net}, optimizers={}, data=ClientData(x, y, x[:4], y[:4]))
    setup = Setup(num_clients=1, num_exits=2, num_classes=2, rounds=1, train_sizes=(40,), seed=0)
    net.eval()
    buffers = {k: b.clone() for k, b in net.named_buffers()}
    rng = torch.get_rng_state()
    row = client_conflict(client, Algorithm(None, setup), batch_size=16, proxy_batch_size=4, rnd=1, seed=0)
    assert torch.isfinite(row).all() and row[1:].tolist() == [1.0]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(b, buffers[k]) for k, b in net.named_buffers())
    assert all(p.grad is None for p in net.parameters())
    assert not net.training


def test_record_means_shares_and_inactive_clients():
    # pairs 0-1, 0-2, 1-2; client 1 is idle (its row must not count), client 2 trained pair 1-2 only
    nan = float("nan")
    rows = torch.tensor([[0.5, -0.5, 0.2, 1, 1, 1],
                         [9.0, 9.0, 9.0, 1, 1, 1],
                         [-0.1, 0.3, -0.4, 0, 0, 1],
                         [nan, nan, nan, 0, 0, 0]], dtype=torch.float64)
    active = torch.tensor([True, False, True, False])
    rec = conflict_record(rows, active, m=3)
    assert rec["pairs"] == ["0-1", "0-2", "1-2"]
    assert rec["clients"] == [0, 2]
    assert rec["all"] == {"0-1": pytest.approx(0.2), "0-2": pytest.approx(-0.1), "1-2": pytest.approx(-0.1)}
    assert rec["trained"] == {"0-1": pytest.approx(0.5), "0-2": pytest.approx(-0.5), "1-2": pytest.approx(-0.1)}
    assert rec["neg_all"] == pytest.approx(3 / 6)
    assert rec["neg_trained"] == pytest.approx(2 / 4)
    assert rec["cos"] == [[0.5, -0.5, 0.2], [-0.1, 0.3, -0.4]]
    assert rec["trained_mask"] == ["111", "001"]
    none = conflict_record(rows[2:3], torch.tensor([True]), m=3)
    assert none["trained"]["0-1"] is None and none["neg_trained"] == 1.0  # its one trained pair: -0.4
    json.dumps(rec, allow_nan=False)  # valid JSON: no NaN anywhere



def test_a_zero_cosine_is_no_conflict():
    """The shares count cosines < 0 (conflicting), not orthogonal gradients (cosine 0)."""
    rows = torch.tensor([[0.0, -0.5, 0.5, 1, 1, 1]], dtype=torch.float64)
    rec = conflict_record(rows, torch.tensor([True]), m=3)
    assert rec["neg_all"] == pytest.approx(1 / 3) and rec["neg_trained"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- config
def test_unknown_diagnostic_is_a_config_error(tiny_config):
    cfg = tiny_config()
    assert load_config(cfg, ON).train.diagnostics == ["conflict"]
    assert load_config(cfg).train.diagnostics == []
    for bad in ("train.diagnostics=[conflicts]", "train.diagnostics=conflict", "train.diagnostics=[conflict,conflict]"):
        with pytest.raises(ConfigError, match=r"^.*train\.diagnostics: "):
            load_config(cfg, [bad])


def test_cli_bad_diagnostic_exits_2_in_one_line(tiny_config, tmp_path):
    proc = cafedist_in_process("train", "--config", str(tiny_config()), "--out", str(tmp_path / "r"),
                               "train.diagnostics=[x]")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("cafedist: error:")]
    assert len(lines) == 1 and "train.diagnostics" in lines[0], proc.stderr[-2000:]


# ----------------------------------------------------------------------------- in a run
def _single_rank(cfg, out, overrides):
    rt = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None, launcher="single")
    result = train(load_config(cfg, overrides), out, rt=rt, progress=False)
    assert result.summary is not None


def _without_diag(records):
    return [{k: v for k, v in r.items() if k != "conflict"} for r in comparable(records)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, store_cache):
    """One tiny CAFEDistill run with the diagnostic and one without (4 rounds, 4 clients)."""
    from conftest import TINY

    base = tmp_path_factory.mktemp("diag")
    cfg = base / "tiny.yaml"
    cfg.write_text(TINY.format(rounds=4, clients=4, every=2, cache=store_cache))
    _single_rank(cfg, base / "on", ON)
    _single_rank(cfg, base / "off", [])
    return cfg, base / "on", base / "off"


def test_record_every_round_only_when_asked(runs):
    _, on, off = runs
    recs = metrics(on)
    assert all("conflict" not in r and "t_diag" not in r for r in metrics(off))
    assert [r["round"] for r in recs if "conflict" in r] == [0, 1, 2, 3]
    for r in recs:
        c = r["conflict"]
        assert c["pairs"] == ["0-1", "0-2", "1-2"] and c["clients"] == [0, 1, 2, 3]
        assert len(c["cos"]) == 4 and all(len(row) == 3 for row in c["cos"])
        assert all(v is not None and -1 <= v <= 1 for row in c["cos"] for v in row)
        assert r["t_diag"] >= 0
    # the schedule (T = 4): no students in round 0, then exit 1 (depth-prioritized), then all
    assert [r["conflict"]["trained_mask"] for r in recs] == [["000"] * 4, ["010"] * 4, ["111"] * 4, ["111"] * 4]
    assert recs[0]["conflict"]["trained"] == {"0-1": None, "0-2": None, "1-2": None}
    assert recs[0]["conflict"]["neg_trained"] is None
    last = recs[-1]["conflict"]
    assert last["trained"] == last["all"]  # every exit trained: both views agree


def test_training_is_identical_with_and_without(runs):
    _, on, off = runs
    assert summary(on)["model_hashes"] == summary(off)["model_hashes"]
    assert summary(on)["acc_per_exit"] == summary(off)["acc_per_exit"]
    assert _without_diag(metrics(on)) == _without_diag(metrics(off))


def test_off_does_no_work(tiny_config, tmp_path, monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("diagnostics ran although train.diagnostics is empty")

    monkeypatch.setattr(Diagnostics, "after_local", boom)
    assert Diagnostics.of([]) is None
    _single_rank(tiny_config(rounds=1), tmp_path / "r", [])


def test_eval_draws_conflict_png_only_for_runs_with_records(runs):
    _, on, off = runs
    report = evaluate_run(on)
    assert report["paths"]["conflict_plot"] == str(on / "conflict.png")
    assert (on / "conflict.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((on / "eval.json").read_text())["paths"]["conflict_plot"] == str(on / "conflict.png")
    assert "conflict_plot" not in evaluate_run(off)["paths"]
    assert not (off / "conflict.png").exists()


def test_eval_conflict_png_reads_the_evaluated_rounds_past_a_damaged_line(runs, tmp_path, monkeypatch):
    """conflict.png draws the evaluated checkpoint's own rounds: not the row a killed `--resume
    force` attempt left past them, and a damaged line does not cost the plot (it was dropped
    whole, with a warning, on any unreadable line)."""
    import shutil

    import cafedist.eval.run as eval_run

    run = tmp_path / "on"
    shutil.copytree(runs[1], run)
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    extra = json.loads(lines[-1]) | {"round": 4}  # a round of a longer schedule, killed before its checkpoint
    (run / "metrics.jsonl").write_bytes(b"".join(lines[:2]) + b"\xff{torn\n" + b"".join(lines[2:])
                                        + (json.dumps(extra) + "\n").encode())
    drawn = []
    monkeypatch.setattr(eval_run, "plot_conflict", lambda records, *a, **k: drawn.append(records))
    report = evaluate_run(run)
    assert [r["round"] for r in drawn[0]] == [0, 1, 2, 3]
    assert report["paths"]["conflict_plot"] == str(run.absolute() / "conflict.png")


@pytest.mark.slow
def test_two_ranks_give_the_same_record(runs, tmp_path):
    cfg, on, _ = runs
    out = tmp_path / "w2"
    proc = subprocess.run(torchrun(2) + ["-m", "cafedist", "train", "--config", str(cfg), "--out", str(out),
                                         "--no-progress", *ON],
                          cwd=ROOT, env=env_for_tests(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two, one = metrics(out), metrics(on)
    assert sorted(two[0]["clients_per_rank"]) == [2, 2]
    assert [r["conflict"] for r in two] == [r["conflict"] for r in one]
    assert comparable(two) == comparable(one)
    assert summary(out)["model_hashes"] == summary(on)["model_hashes"]
