"""Every registered algorithm (and every `cafedist compare` ablation) under torchrun with 2 ranks.

Determinism is a product requirement: a run is a function of its config, so the 2-rank result
must equal the 1-rank one bit for bit (model hashes, every metric but timings), with all
clients training each round and with half of them (partial participation).

The 1-rank reference runs in this process (no interpreter start-up), on one thread like the
torchrun ranks (conftest's ``one_thread``; ``OMP_NUM_THREADS=1`` from ``env_for_tests``).
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT, comparable, env_for_tests, metrics, summary, torchrun

from cafedist.algorithms import ALGORITHMS
from cafedist.compare import available_variants
from cafedist.config import load_config
from cafedist.distributed.runtime import Runtime
from cafedist.run.build import build_run
from cafedist.train import round as loop
from cafedist.train.loop import train
from cafedist.train.schedule import participating

VARIANTS = available_variants()  # registered algorithms + ablations, fixed at collection time
PROXY_SIZE = 32


def _overrides(name: str, *extra: str) -> list[str]:
    """The variant's overrides, and a small proxy subset for algorithms that exchange logits."""
    variant = VARIANTS[name]
    fields = {f.name for f in dataclasses.fields(ALGORITHMS[variant.algorithm].Params)}
    small = [f"algorithm.{variant.algorithm}.proxy_size={PROXY_SIZE}"] if "proxy_size" in fields else []
    return [*variant.overrides, *small, *extra]


def _single_rank(cfg: Path, out: Path, overrides: list[str]) -> None:
    rt = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None, launcher="single")
    result = train(load_config(cfg, overrides), out, rt=rt, progress=False)
    assert result.summary is not None and not result.stopped


def _two_ranks(cfg: Path, out: Path, overrides: list[str]) -> None:
    proc = subprocess.run(torchrun(2) + ["-m", "cafedist", "train", "--config", str(cfg), "--out", str(out),
                                         "--no-progress", *overrides],
                          cwd=ROOT, env=env_for_tests(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _assert_same_run(two: Path, one: Path, rounds: int) -> None:
    s2, s1 = summary(two), summary(one)
    assert (s2["world_size"], s1["world_size"], s2["rounds"]) == (2, 1, rounds)
    assert sorted(metrics(two)[0]["clients_per_rank"]) == [2, 2]
    assert s2["model_hashes"] == s1["model_hashes"]
    assert comparable(metrics(two)) == comparable(metrics(one))
    assert s2["acc_per_exit"] == s1["acc_per_exit"] and s2["dynamic"] == s1["dynamic"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_ranks_under_torchrun_equal_one_rank(name, tiny_config, tmp_path):
    cfg = tiny_config(rounds=2, clients=4, every=1)
    _single_rank(cfg, tmp_path / "w1", _overrides(name))
    _two_ranks(cfg, tmp_path / "w2", _overrides(name))
    _assert_same_run(tmp_path / "w2", tmp_path / "w1", rounds=2)
    assert [r["clients_trained"] for r in metrics(tmp_path / "w2")] == [4, 4]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_partial_participation_is_the_same_on_two_ranks(name, tiny_config, tmp_path):
    cfg = tiny_config(rounds=2, clients=4, every=1)
    extra = _overrides(name, "train.clients_per_round=0.5")
    _single_rank(cfg, tmp_path / "w1", extra)
    _two_ranks(cfg, tmp_path / "w2", extra)
    _assert_same_run(tmp_path / "w2", tmp_path / "w1", rounds=2)
    assert [r["clients_trained"] for r in metrics(tmp_path / "w2")] == [2, 2]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_partial_participation_trains_exactly_the_sampled_half(name, tiny_config, tmp_path, monkeypatch):
    """In-process, every round: the local update runs for the sampled half and for no one else."""
    trained: list[tuple[int, int]] = []
    real = loop.local_update

    def spy(client, algo, train_cfg, round_idx, seed, *args, phases=None, **kwargs):
        if phases is None:  # the round's local update (post-aggregation phases pass their phases)
            trained.append((round_idx, client.cid))
        return real(client, algo, train_cfg, round_idx, seed, *args, phases=phases, **kwargs)

    monkeypatch.setattr(loop, "local_update", spy)
    cfg = load_config(tiny_config(rounds=3, clients=4), _overrides(name, "train.clients_per_round=0.5"))
    rt = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None, launcher="single")
    trainer = loop.Trainer(build_run(cfg, rt))
    try:
        samples = set()
        for rnd in range(cfg.train.rounds):
            active = participating(cfg.seed, rnd, 4, 0.5)
            samples.add(tuple(active.tolist()))
            record = trainer.run_round(rnd)
            assert record["clients_trained"] == 2
            assert sorted(cid for r, cid in trained if r == rnd) == torch.nonzero(active).flatten().tolist()
        assert len(samples) > 1  # the sample is redrawn every round
    finally:
        trainer.run.store.close()
