"""Every registered algorithm (and every `cafedist compare` ablation) under torchrun with 2 ranks.

Determinism is a product requirement: a run is a function of its config, so the 2-rank result
must equal the 1-rank one bit for bit (model hashes, every metric but timings), with all
clients training each round and with half of them (partial participation).

The 1-rank reference runs in this process (no interpreter start-up), on one thread like the
torchrun ranks (conftest's ``one_thread``; ``OMP_NUM_THREADS=1`` from ``env_for_tests``). The
2-rank runs of all selected tests share one torchrun launch (``two_rank_runs``, driven by
``torchrun_variants.py``): one start-up of torchrun, torch and the process group instead of one per test.
A run the shared launch did not reach (its ranks fell out of step) gets a launch of its own.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, comparable, env_for_tests, metrics, summary, torchrun
from torchrun_variants import status_path

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
RUN = {"rounds": 2, "clients": 4, "every": 1}  # tiny_config's arguments, the same for both world sizes
#: extra overrides of each kind of two-rank run: every client trains each round, or half of them
CASES = {"all": (), "half": ("train.clients_per_round=0.5",)}
#: the kind of run each two-rank test compares (the shared launch trains those of the selected tests)
TWO_RANK_TESTS = {"test_two_ranks_under_torchrun_equal_one_rank": "all",
                  "test_partial_participation_is_the_same_on_two_ranks": "half"}
DRIVER = Path(__file__).with_name("torchrun_variants.py")


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


@dataclasses.dataclass
class TwoRankRuns:
    """The shared launch's run directories (``root/<kind>-<name>``) and its stderr's tail."""

    root: Path
    stderr: str

    def run_dir(self, kind: str, name: str, cfg: Path, own: Path) -> Path:
        """The two-rank run of variant ``name`` of ``kind`` (a key of CASES): from the shared
        launch, failing the test with the ranks' tracebacks where it raised; launched on its
        own into ``own`` (with ``cfg``) where the shared launch did not reach it."""
        key = f"{kind}-{name}"
        statuses = [status_path(self.root / key, rank) for rank in range(2)]
        if not all(p.exists() for p in statuses):
            warnings.warn(f"the shared torchrun launch did not reach {key}; it runs on its own. "
                          f"The launch's stderr ends:\n{self.stderr}", stacklevel=2)
            _two_ranks(cfg, own, _overrides(name, *CASES[kind]))
            return own
        errors = [(rank, json.loads(p.read_text())["error"]) for rank, p in enumerate(statuses)]
        failed = "\n".join(f"rank {rank}: {error}" for rank, error in errors if error)
        if failed:
            pytest.fail(f"two-rank run {key} failed in the shared torchrun launch:\n{failed}", pytrace=False)
        return self.root / key


@pytest.fixture(scope="module")
def two_rank_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                  store_cache: Path) -> TwoRankRuns:
    """One torchrun launch (2 ranks) that trains the two-rank run of every selected test of this
    module in turn, with the config ``tiny_config(**RUN)`` writes."""
    root = tmp_path_factory.mktemp("two_ranks")
    config = root / "tiny.yaml"
    config.write_text(TINY.format(cache=store_cache, **RUN))
    plan = []
    for item in request.session.items:  # after -k/-m deselection: only the runs a test will read
        kind = TWO_RANK_TESTS.get(getattr(item, "originalname", ""))
        if item.module is request.module and kind is not None:
            name = item.callspec.params["name"]
            plan.append({"key": f"{kind}-{name}", "config": str(config), "out": str(root / f"{kind}-{name}"),
                         "overrides": _overrides(name, *CASES[kind])})
    (root / "plan.json").write_text(json.dumps(plan, indent=1))
    if not plan:  # only this module's other tests are selected
        return TwoRankRuns(root, "")
    try:
        proc = subprocess.run(torchrun(2) + [str(DRIVER), str(root / "plan.json")], cwd=ROOT, env=env_for_tests(),
                              capture_output=True, text=True, timeout=120 + 60 * len(plan))
        stderr = proc.stderr
    except subprocess.TimeoutExpired as exc:  # the runs without a status launch their own
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
    return TwoRankRuns(root, stderr[-4000:])


def _assert_same_run(two: Path, one: Path, rounds: int) -> None:
    s2, s1 = summary(two), summary(one)
    assert (s2["world_size"], s1["world_size"], s2["rounds"]) == (2, 1, rounds)
    assert sorted(metrics(two)[0]["clients_per_rank"]) == [2, 2]
    assert s2["model_hashes"] == s1["model_hashes"]
    assert comparable(metrics(two)) == comparable(metrics(one))
    assert s2["acc_per_exit"] == s1["acc_per_exit"] and s2["dynamic"] == s1["dynamic"]


def _two_ranks_equal_one(kind: str, name: str, cfg: Path, tmp_path: Path, two_rank_runs: TwoRankRuns) -> Path:
    """Variant ``name``'s run of ``kind`` (a key of CASES) on 1 rank in this process equals the
    shared launch's 2-rank run; returns the latter."""
    _single_rank(cfg, tmp_path / "w1", _overrides(name, *CASES[kind]))
    two = two_rank_runs.run_dir(kind, name, cfg, tmp_path / "w2")
    _assert_same_run(two, tmp_path / "w1", rounds=2)
    return two


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_ranks_under_torchrun_equal_one_rank(name, tiny_config, tmp_path, two_rank_runs):
    two = _two_ranks_equal_one("all", name, tiny_config(**RUN), tmp_path, two_rank_runs)
    assert [r["clients_trained"] for r in metrics(two)] == [4, 4]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_partial_participation_is_the_same_on_two_ranks(name, tiny_config, tmp_path, two_rank_runs):
    two = _two_ranks_equal_one("half", name, tiny_config(**RUN), tmp_path, two_rank_runs)
    assert [r["clients_trained"] for r in metrics(two)] == [2, 2]


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
